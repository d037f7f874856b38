"""What every annotator shares: local-folder checks, model keys, devices and dtypes.

An annotator is one loaded model plus its settings. It has a `stage`, a results `key`, a
picklable `prepare(image) -> array` run in the decode workers, `input_side` (the largest
pixel side it needs, for JPEG draft decoding), `run(inputs, sizes) -> rows` on the
accelerator, the Arrow `schema` of its rows (without `id`), and its `provenance`.
"""

from __future__ import annotations

import re
from pathlib import Path

from bigasp.errors import ModelLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def local_folder(spec: str, stage: str, needs: tuple[str, ...] = ()) -> Path:
    """The model folder, or a clear error: models load only from local paths (no hub downloads)."""
    if not spec:
        raise ModelLoadError(f"annotate stage '{stage}' needs a model: set {stage}.model to a local folder")
    path = Path(spec).expanduser()
    if not path.is_dir():
        hint = (
            " (it looks like a hub id: download it first, e.g. `hf download "
            f"{spec} --local-dir models/{spec.split('/')[-1]}`, and pass that folder)"
            if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists()
            else ""
        )
        raise ModelLoadError(f"{stage}.model = {spec!r} is not a local folder{hint}")
    for name in needs:
        if not (path / name).is_file():
            raise ModelLoadError(f"{path}: missing {name} (the {stage} model folder needs it)")
    return path


def model_key(path: Path, key: str) -> str:
    from bigasp.store.annotations import check_key

    return check_key("model key", key or re.sub(r"[^A-Za-z0-9._-]", "-", path.name).lstrip(".") or "model")


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_kwargs(dtype) -> dict:
    """`from_pretrained` precision argument: `dtype` in transformers 5, `torch_dtype` before; loading
    straight into the run precision keeps an 8B captioner at 16 GB of host memory, not 32."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
