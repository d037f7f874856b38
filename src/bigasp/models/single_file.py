"""Single-file SDXL checkpoints in the original SGM/LDM key layout (Civitai, ComfyUI, A1111).

This is how SDXL finetunes are actually distributed (bigASP v2 and v2.5 included): one
`.safetensors` holding all four networks under their original module paths:

    model.diffusion_model.*                UNet (SGM `UNetModel`: input_blocks/middle_block/output_blocks)
    first_stage_model.*                    VAE (LDM `AutoencoderKL`: encoder.down.N.block.M, mid.attn_1 ...)
    conditioner.embedders.0.transformer.*  CLIP ViT-L, already in Hugging Face key names
    conditioner.embedders.1.model.*        OpenCLIP bigG: fused q/k/v (`in_proj_weight`),
                                           `text_projection` stored as the transpose of HF's Linear

Saving uses bigasp's diffusers->LDM key mapping below; loading uses its inverse (`file_sources`)
to read each tensor straight into modules built from bigasp's shipped preset configs, so it
works offline and holds no second copy of the weights. The tests check both directions bit for
bit against diffusers' own single-file converters (the field's reference implementation).

The model kind (eps/flow, shift) is recorded in the safetensors metadata, because a flow
model sampled as eps produces garbage and a single file has no room for a side-car JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch

from bigasp import progress
from bigasp.errors import ModelLoadError
from bigasp.fsutil import atomic_path
from bigasp.models.components import SDXL, ModelKind
from bigasp.models.file_header import (  # the layout's names; re-exported for callers of this module
    FORMAT_VERSION,
    META_COMPONENTS,
    META_FORMAT,
    META_KIND,
    PREFIXES,
    kind_from_metadata,
)
from bigasp.models.presets import PRESETS, build_component, component_config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# diffusers / transformers key names -> original SGM/LDM key names
# ---------------------------------------------------------------------------------------------

# UNet ResBlock: diffusers ResnetBlock2D names -> SGM ResBlock (in_layers = [norm, act, conv], ...)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_key_to_ldm(key: str, *, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """One diffusers UNet2DConditionModel key -> its SGM `UNetModel` key (without prefix).

    SGM numbers every layer of the down path in one flat list `input_blocks`: index 0 is
    conv_in, then per resolution level `layers_per_block` (resnet[, attention]) entries and
    one downsampler entry. The up path (`output_blocks`) has `layers_per_block + 1` entries per
    level, and the upsampler rides in the last entry of its level, after the attention if any.
    Within an attention block the names are identical in both layouts.
    """
    per_down = layers_per_block + 1
    per_up = layers_per_block + 1
    module, param = _split_param(key)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        b, j, name = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + b * per_down + j}.0.{_UNET_RESNET[name]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + b * per_down + j}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{(int(m[1]) + 1) * per_down}.0.op.{param}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", module):
        return f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}.{param}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        b, j, name = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * per_up + j}.0.{_UNET_RESNET[name]}.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * per_up + j}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        b = int(m[1])
        slot = 2 if b in up_blocks_with_attention else 1
        return f"output_blocks.{b * per_up + layers_per_block}.{slot}.conv.{param}"
    raise ModelLoadError(f"UNet parameter {key!r} has no known SDXL single-file name")


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ModelLoadError("single-file export needs one layers_per_block for all UNet levels (as SDXL)")
    with_attn = {
        int(k.split(".")[1]) for k in state_dict if k.startswith("up_blocks.") and ".attentions." in k
    }
    return {
        unet_key_to_ldm(k, layers_per_block=lpb, up_blocks_with_attention=with_attn): v
        for k, v in state_dict.items()
    }


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> LDM `AutoencoderKL` keys.

    LDM numbers decoder levels from the lowest resolution up (`up.0` is the last to run),
    diffusers in execution order, so the index is reversed. LDM's mid-block attention uses
    1x1 convolutions where diffusers uses Linear layers: weights gain two unit dimensions.
    """
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, param = _split_param(key)
        new: str | None = None
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
            new = f"{m[1]}.norm_out.{param}"
        elif module in (
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
            "quant_conv",
            "post_quant_conv",
        ):
            new = key
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"encoder.down.{m[1]}.downsample.conv.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{param}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}.{param}"
        elif m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)", module
        ):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{param}"
            if param == "weight" and m[2] != "group_norm" and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        if new is None:
            raise ModelLoadError(f"VAE parameter {key!r} has no known SDXL single-file name")
        out[new] = value
    return out


def _vae_resnet(name: str) -> str:
    if name not in ("norm1", "conv1", "norm2", "conv2", "conv_shortcut"):
        raise ModelLoadError(f"VAE resnet parameter {name!r} has no known SDXL single-file name")
    return "nin_shortcut" if name == "conv_shortcut" else name


def clip_l_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L keeps Hugging Face names in SDXL files; newer transformers drop `text_model.`."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


Lazy = Callable[[], torch.Tensor]  # a tensor computed when the writer reaches it


def clip_g_to_ldm(state_dict: Mapping[str, torch.Tensor], *, lazy: bool = False) -> dict[str, Any]:
    """HF CLIPTextModelWithProjection -> OpenCLIP text tower as SGM stores it.

    OpenCLIP's attention is `nn.MultiheadAttention` (one `in_proj` = [q; k; v] rows) and its
    projection is a bare matrix applied as `x @ P`, i.e. the transpose of HF's Linear weight.
    With `lazy`, those two new tensors are returned as zero-argument functions that make them,
    so an export holds one of them at a time instead of all 32 layers' fused copies.
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        module, param = _split_param(key)
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif module == "final_layer_norm":
            out[f"ln_final.{param}"] = value
        elif key == "text_projection.weight":
            transpose = partial(_transposed, value)
            out["text_projection"] = transpose if lazy else transpose()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj", module):
            fused.setdefault((int(m[1]), param), {})[m[2]] = value
        elif (m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", module)) and m[2] in _OPENCLIP_LAYER:
            out[f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{param}"] = value
        else:
            raise ModelLoadError(f"text_encoder_2 parameter {key!r} has no known SDXL single-file name")
    for (layer, param), qkv in sorted(fused.items()):
        if set(qkv) != {"q", "k", "v"}:
            raise ModelLoadError(f"text_encoder_2 layer {layer} lacks one of q/k/v {param}")
        fuse = partial(torch.cat, [qkv["q"], qkv["k"], qkv["v"]])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = fuse if lazy else fuse()
    return out


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def component_to_ldm(component: str, module: torch.nn.Module, *, lazy: bool = False) -> dict[str, Any]:
    """A component's state dict under its full single-file key names.

    Values are the module's own tensors (or views of them) except where the layout fuses or
    transposes; with `lazy` those few are functions that compute them (see `clip_g_to_ldm`)."""
    sd = module.state_dict()
    if component == "unet":
        mapped = unet_to_ldm(sd, module.config)
    elif component == "vae":
        mapped = vae_to_ldm(sd, module.config)
    elif component == "text_encoder":
        mapped = clip_l_to_ldm(sd)
    elif component == "text_encoder_2":
        mapped = clip_g_to_ldm(sd, lazy=lazy)
    else:
        raise ModelLoadError(f"unknown component {component!r}")
    prefix = PREFIXES[component]
    return {prefix + k: v for k, v in mapped.items()}


def ldm_state_dict(model: SDXL) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for comp, module in model.modules().items():
        out.update(component_to_ldm(comp, module))
    return out


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def file_metadata(model: SDXL) -> dict[str, str]:
    return {
        META_FORMAT: str(FORMAT_VERSION),
        META_KIND: json.dumps(model.kind.to_json(), sort_keys=True),
        META_COMPONENTS: ",".join(model.modules()),
    }


EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_single_file(model: SDXL, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as one SGM-layout `.safetensors` (ComfyUI/A1111/Civitai loadable).

    `dtype` casts every floating-point tensor (fp16 is how SDXL files are shared: half the
    size of fp32); None keeps each tensor's own dtype. Atomic: written to a hidden temp file
    beside `path`, then renamed, so an interrupted export never leaves a truncated file under
    the final name.
    """
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ModelLoadError(f"single-file output {out} must end in .safetensors")
    if not model.modules():
        raise ModelLoadError("nothing to export: the model holds no components")
    out.parent.mkdir(parents=True, exist_ok=True)
    entries: dict[str, torch.Tensor | Lazy] = {}
    for comp, module in model.modules().items():
        entries.update(component_to_ldm(comp, module, lazy=True))
    with atomic_path(out) as tmp:
        write_safetensors(tmp, entries, file_metadata(model), dtype=dtype, desc=f"exporting {out.name}")
    return out


# safetensors orders the data section by dtype (larger codes first, so every tensor stays aligned),
# then by name; the same order here makes the file byte-identical to `safetensors.torch.save_file`.
_ST_CODES = {
    torch.float64: "F64",
    torch.int64: "I64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_RANK = {
    "I64": 0,
    "F64": 1,
    "I32": 3,
    "F32": 2,
    "BF16": 4,
    "F16": 5,
    "I16": 6,
    "I8": 7,
    "U8": 8,
    "BOOL": 9,
}


def _materialize(value: torch.Tensor | Lazy, dtype: torch.dtype | None) -> torch.Tensor:
    t = value() if callable(value) else value
    cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
    return t.detach().to("cpu", dtype=cast).contiguous()


def write_safetensors(
    path: str | os.PathLike,
    entries: Mapping[str, torch.Tensor | Lazy],
    metadata: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
    desc: str = "writing",
) -> None:
    """Write a .safetensors file one tensor at a time.

    `safetensors.torch.save_file` needs every output tensor at once: an fp16 export of an fp32
    SDXL held a 7 GB copy beside the 14 GB model. Here the header is computed from shapes and
    dtypes alone, then each tensor is cast (and, if lazy, computed), written and dropped, so
    the extra memory is one tensor. `dtype` casts floating-point tensors; None keeps each one's.
    """
    import struct

    specs: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for key, value in entries.items():
        if callable(value):  # computed twice (here only for its shape), never kept
            t = value()
            shape, src = tuple(t.shape), t.dtype
            del t
        else:
            shape, src = tuple(value.shape), value.dtype
        cast = dtype if dtype is not None and src.is_floating_point else src
        if cast not in _ST_CODES:
            raise ModelLoadError(f"tensor {key!r} has dtype {cast}, which a .safetensors file cannot hold")
        specs[key] = (_ST_CODES[cast], shape, math.prod(shape) * cast.itemsize)
    order = sorted(specs, key=lambda k: (_ST_RANK[specs[k][0]], k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in order:
        code, shape, nbytes = specs[key]
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in progress.bar(order, desc=desc, total=len(order), unit="tensor"):
            t = _materialize(entries[key], dtype)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


@cache
def _expected_shapes(preset: str, component: str) -> dict[str, tuple[int, ...]]:
    """Single-file key -> shape for one preset component, computed on the meta device (no memory)."""
    with torch.device("meta"):
        module = build_component(component_config(preset, component), component)
    return {k: tuple(v.shape) for k, v in component_to_ldm(component, module).items()}


def expected_shapes(preset: str, components: Iterable[str]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for comp in components:
        out.update(_expected_shapes(preset, comp))
    return out


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing unit dims: some tools store the VAE's 1x1-conv attention weights as 2-D
    matrices; diffusers' converter accepts both, so both must match here."""
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _mismatches(file_shapes: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]]) -> list[str]:
    problems = []
    for key, shape in want.items():
        got = file_shapes.get(key)
        if got is None:
            problems.append(f"{key} missing")
        elif _squeeze(got) != _squeeze(shape):
            problems.append(f"{key} has shape {list(got)}, expected {list(shape)}")
    return problems


def infer_preset(
    file_shapes: Mapping[str, tuple[int, ...]], components: Iterable[str], source: str = ""
) -> str:
    """The preset whose every tensor (for `components`) is in the file with the same shape."""
    components = tuple(components)
    report = []
    matches = []
    for name in PRESETS:
        problems = _mismatches(file_shapes, expected_shapes(name, components))
        if not problems:
            matches.append(name)
        else:
            report.append(f"  {name}: {len(problems)} mismatch(es), e.g. {problems[0]}")
    if matches:
        # Presets may share shapes yet differ elsewhere (head counts, VAE scaling factor);
        # guessing between such presets would silently change the computation.
        configs = {json.dumps([_config_sans_meta(m, c) for c in components], sort_keys=True) for m in matches}
        if len(configs) > 1:
            raise ModelLoadError(
                f"{source or 'the file'} fits several presets with different configs "
                f"({', '.join(matches)}); pass --arch to choose one."
            )
        return matches[0]
    raise ModelLoadError(
        f"cannot tell which SDXL architecture {source or 'the file'} is: it matches no preset\n"
        + "\n".join(report)
        + f"\nIf it is a standard SDXL checkpoint, pass --arch sdxl-base (presets: {', '.join(PRESETS)})."
    )


_TORCH_DTYPES = {code: dt for dt, code in _ST_CODES.items()}
_QKV = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")

# How a module tensor comes out of the file: the whole file tensor (reshaped to the module's shape:
# LDM's 1x1-conv attention weights vs diffusers' Linear), its transpose, or row block i of 3
# (OpenCLIP's fused [q; k; v] in_proj).
Source = tuple[str, str | int]


def file_sources(component: str, module: torch.nn.Module) -> dict[str, Source]:
    """Module state-dict key -> (single-file key, how), the inverse of `component_to_ldm`.

    Built from the same key mapping the export uses, so the two cannot drift apart; the
    load test checks the result against diffusers' own single-file converters."""
    sd = module.state_dict()
    prefix = PREFIXES[component]
    if component in ("unet", "text_encoder"):
        # These layouts only rename: map the names themselves.
        names = {k: k for k in sd}
        mapped = unet_to_ldm(names, module.config) if component == "unet" else clip_l_to_ldm(names)
        return {k: (prefix + ldm, "same") for ldm, k in mapped.items()}
    out: dict[str, Source] = {}
    for k, v in sd.items():
        if component == "vae":
            (ldm,) = vae_to_ldm({k: v}, module.config)
            out[k] = (prefix + ldm, "same")
        elif m := _QKV.fullmatch(k):
            out[k] = (f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", "qkv".index(m[2]))
        elif k.removeprefix("text_model.") == "text_projection.weight":
            out[k] = (prefix + "text_projection", "t")
        else:
            (ldm,) = clip_g_to_ldm({k: v})
            out[k] = (prefix + ldm, "same")
    return out


class TensorReader:
    """Reads single tensors (or row blocks) of a safetensors file with plain reads into fresh
    buffers. Unlike a memory map, whose touched pages stay in the process's resident memory
    until it is closed, the file's bytes never count against the process: loading an fp16
    SDXL into fp32 modules costs the modules plus one tensor, not the modules plus the file."""

    def __init__(self, path: Path) -> None:
        from bigasp.models.file_header import read_header

        self.path = path
        self.header = read_header(path)
        self._f = path.open("rb", buffering=0)
        self._stage: torch.Tensor | None = None

    def close(self) -> None:
        self._f.close()
        self._stage = None

    def _staging(self) -> torch.Tensor:
        """One buffer, as large as the file's largest tensor, that every tensor needing a cast is
        read into. A fresh temporary per tensor would leave freed holes between the kept tensors
        that the allocator does not give back (about 1 GB on SDXL)."""
        if self._stage is None:
            largest = max((e.offsets[1] - e.offsets[0] for e in self.header.tensors.values()), default=0)
            self._stage = torch.empty(largest, dtype=torch.uint8)
        return self._stage

    def read(self, key: str, block: int | None = None, *, staged: bool = False) -> torch.Tensor:
        """Tensor `key` (or row block `block` of 3) as stored: a fresh tensor, or with `staged` a
        view of the staging buffer that the next staged read overwrites."""
        entry = self.header.tensors[key]
        if entry.dtype not in _TORCH_DTYPES:
            raise ModelLoadError(
                f"{self.path}: tensor {key!r} has dtype {entry.dtype}, which bigasp cannot load"
            )
        dt = _TORCH_DTYPES[entry.dtype]
        shape, start = entry.shape, self.header.header_bytes + entry.offsets[0]
        if block is not None:
            rows = shape[0] // 3
            start += block * rows * math.prod(shape[1:]) * dt.itemsize
            shape = (rows, *shape[1:])
        nbytes = math.prod(shape) * dt.itemsize
        if staged:
            buf = self._staging()[:nbytes]
            out = buf.view(dt).view(shape)
        else:
            out = torch.empty(shape, dtype=dt)
            buf = out.reshape(-1).view(torch.uint8)
        view = memoryview(buf.numpy())
        self._f.seek(start)
        got = 0
        while got < nbytes:
            n = self._f.readinto(view[got:])
            if not n:
                raise ModelLoadError(f"{self.path} is damaged: tensor {key!r} runs past the end of the file")
            got += n
        return out

    def load(self, source: Source, shape: torch.Size, dtype: torch.dtype | None) -> torch.Tensor:
        """The module tensor for `source`: read as stored when it needs no cast (it becomes the
        parameter itself), else read into the staging buffer and cast into a new tensor."""
        key, how = source
        block = how if isinstance(how, int) else None
        stored = _TORCH_DTYPES.get(self.header.tensors[key].dtype)
        cast = dtype is not None and stored is not None and stored.is_floating_point and stored != dtype
        if not cast:
            t = self.read(key, block)
            return (t.t() if how == "t" else t).reshape(shape).contiguous()
        src = self.read(key, block, staged=True)
        out = torch.empty(shape, dtype=dtype)
        out.copy_((src.t() if how == "t" else src).reshape(shape))
        return out


def _load_component(
    reader: TensorReader, preset: str, component: str, dtype: torch.dtype | None
) -> torch.nn.Module:
    """Build `component` with its parameters on the meta device (no memory), then give each one
    the tensor read from the file (assign: the read tensor becomes the parameter, no copy)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build_component(component_config(preset, component), component)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    state = {}
    for key, source in file_sources(component, module).items():
        state[key] = reader.load(source, shapes[key], dtype)
    module.load_state_dict(state, strict=True, assign=True)
    del state
    return module


def load_single_file(
    path: str | os.PathLike,
    components: Iterable[str] = SDXL.COMPONENTS,
    *,
    kind: ModelKind | None = None,
    preset: str | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> SDXL:
    """Load the requested components of a single-file SDXL checkpoint, offline.

    Only the requested components' tensors are read (loading just the UNet of a 6.9 GB file
    never touches the VAE or text encoder bytes), one at a time, straight into the modules:
    memory is the loaded model plus one tensor. `dtype` is the modules' floating-point dtype
    (fp32, what training and CPU generation use; None keeps the file's own, e.g. fp16 for an
    fp16 run without a cast copy).
    `preset` names the architecture; when None it is inferred from the tensor shapes.
    The model kind comes from `kind` if given, else from the file's metadata (bigasp writes
    it), else eps, the kind of every SDXL checkpoint that predates bigasp.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    components = tuple(components)
    for comp in components:
        if comp not in PREFIXES:
            raise ModelLoadError(f"unknown component {comp!r}; choose from {', '.join(PREFIXES)}")
    if not path.is_file():
        raise ModelLoadError(f"single-file checkpoint {path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path} is not a readable .safetensors file: {err}") from None
    with handle as f:
        keys = list(f.keys())
        metadata = f.metadata()
        for comp in components:
            if not any(k.startswith(PREFIXES[comp]) for k in keys):
                raise ModelLoadError(
                    f"{path} has no {comp} weights (no keys under {PREFIXES[comp]!r}). "
                    + (
                        "It does not look like a single-file SDXL checkpoint; a diffusers component file "
                        "belongs in its folder: pass the folder instead."
                        if not any(k.startswith(tuple(PREFIXES.values())) for k in keys)
                        else f"Load without {comp}, or take it from another model."
                    )
                )
        shapes = {
            k: tuple(f.get_slice(k).get_shape()) for k in keys if k.startswith(tuple(PREFIXES.values()))
        }
        if preset is None:
            preset = infer_preset(shapes, components, str(path))
        elif preset not in PRESETS:
            raise ModelLoadError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        else:
            problems = _mismatches(shapes, expected_shapes(preset, components))
            if problems:
                raise ModelLoadError(
                    f"{path} does not match preset {preset!r} ({len(problems)} problem(s)):\n  "
                    + "\n  ".join(problems[:5])
                    + "\nOmit --arch to let bigasp infer the architecture."
                )
        recorded = kind_from_metadata(metadata, str(path))
        if kind is not None and recorded is not None and kind != recorded:
            log.warning("%s records %s; using the requested %s instead", path, recorded, kind)
        model = SDXL(kind=kind or recorded or ModelKind(), source=str(path))
    reader = TensorReader(path)
    try:
        for comp in progress.bar(components, desc=f"loading {path.name}", unit="part"):
            module = _load_component(reader, preset, comp, dtype)
            on_meta = [n for n, p in module.state_dict().items() if p.is_meta]
            if on_meta:
                raise ModelLoadError(f"{path}: {comp} tensors were not loaded: {on_meta[:3]}")
            setattr(model, comp, module.eval())
    finally:
        reader.close()
    return model


def _config_sans_meta(preset: str, component: str) -> dict[str, Any]:
    """A preset component's config without bookkeeping keys (`_class_name`, dtype, ...)."""
    cfg = component_config(preset, component)
    drop = {"architectures", "torch_dtype", "dtype"}
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in drop}
