"""`bigasp model extract-lora`: a LoRA that approximates a finetune, by truncated SVD of each
weight difference (TUNED - BASE), written in kohya's layout.

Finetunes are shared as extracts: a few hundred MB that any SDXL UI applies to the base they were
trained from. The extraction follows kohya sd-scripts' `networks/extract_lora_from_models.py`
(same layers, same conventions), so the files behave as users expect:

- layers: in the UNet every Linear and 1x1 conv inside a transformer block (attention q/k/v/out,
  feed-forward, proj_in/proj_out); with a conv rank also every layer of the resnet blocks and
  down/upsamplers (3x3 convs at the conv rank, the rest at the rank), as kohya's LoCon-style
  extraction. In each text encoder the attention and MLP Linears of every layer, and only when
  that encoder changed by more than `min_diff` somewhere (kohya: 0.01), else it is left out;
- a difference `D` (a conv's flattened to out x in*kh*kw) becomes `up = U_r diag(S_r)`,
  `down = Vh_r`, the best rank-r approximation (Eckart-Young); the rank is capped at the
  matrix's smaller side;
- both factors are clamped to [-q, q] with q the `clamp_quantile` quantile of their values
  (kohya: 0.99; 1 = no clamp, an exact truncated SVD);
- `alpha` = the layer's rank, so the merge scale alpha/rank is 1;
- names: `lora_unet_` + the layer's SGM (single-file) name, `lora_te1_`/`lora_te2_` + the
  transformers name, dots as underscores, with `.lora_down.weight`, `.lora_up.weight`, `.alpha`.

Layers identical in BASE and TUNED are skipped (their factors would be zero). Components load one at
a time so only one UNet pair is in memory at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigasp.errors import BigaspError, ConfigError

log = logging.getLogger(__name__)

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
COMPONENTS = (("unet", "lora_unet"), ("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2"))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KOHYA_SDXL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL


@dataclass(frozen=True)
class ExtractSettings:
    rank: int
    conv_rank: int | None = None  # None: no resnet/sampler layers (kohya without --conv_dim)
    clamp_quantile: float = 0.99
    min_diff: float = 0.01
    lowrank: bool = False  # torch.svd_lowrank instead of the exact SVD
    dtype: str = "fp16"

    def validate(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"--rank {self.rank}: the rank must be a positive integer (e.g. 32)")
        if self.conv_rank is not None and self.conv_rank <= 0:
            raise ConfigError(f"--conv-rank {self.conv_rank}: must be a positive integer, or leave it out")
        if not 0 < self.clamp_quantile <= 1:
            raise ConfigError(f"--clamp-quantile {self.clamp_quantile}: must be in (0, 1]; 1 = no clamp")
        if self.min_diff < 0:
            raise ConfigError(f"--min-diff {self.min_diff}: must be >= 0")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class Target:
    """One LoRA-able layer: where it is in the model and its kohya name."""

    component: str
    module: str  # the module's name inside the component (diffusers / transformers)
    kohya: str  # e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    conv3x3: bool


def _is_target_layer(mod: torch.nn.Module, with_conv: bool) -> tuple[bool, bool]:
    """(is a target, is a conv with a kernel larger than 1x1)."""
    if isinstance(mod, torch.nn.Linear):
        return True, False
    if isinstance(mod, torch.nn.Conv2d):
        big = tuple(mod.kernel_size) != (1, 1)
        return (with_conv or not big), big
    return False, False


def _kohya_unet_name(unet: torch.nn.Module, module: str) -> str:
    from bigasp.models.single_file import unet_key_to_ldm

    cfg = unet.config
    with_attention = {i for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}
    ldm = unet_key_to_ldm(
        f"{module}.weight", layers_per_block=cfg.layers_per_block, up_blocks_with_attention=with_attention
    )
    return "lora_unet_" + ldm.removesuffix(".weight").replace(".", "_")


def lora_targets(component: str, model: torch.nn.Module, *, with_conv: bool) -> list[Target]:
    """The layers kohya's LoRA network puts a LoRA on, in module order."""
    prefix = dict(COMPONENTS)[component]
    blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if with_conv else ()) if component == "unet" else TE_BLOCKS
    # kohya names text-encoder layers from the CLIP*Model root: always with the `text_model.` prefix.
    te_prefix = "" if component == "unet" or hasattr(model, "text_model") else "text_model."
    out: list[Target] = []
    seen: set[str] = set()
    for block_name, block in model.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_name, child in block.named_modules():
            name = f"{block_name}.{child_name}" if child_name else block_name
            is_target, big = _is_target_layer(child, with_conv and component == "unet")
            if not is_target or name in seen:
                continue
            seen.add(name)
            kohya = (
                _kohya_unet_name(model, name)
                if component == "unet"
                else f"{prefix}_{te_prefix}{name}".replace(".", "_")
            )
            out.append(Target(component, name, kohya, big))
    return out


def low_rank_factors(
    diff: torch.Tensor, rank: int, *, clamp_quantile: float = 0.99, lowrank: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down the best rank-`rank` approximation of `diff` (flattened to 2-D),
    clamped as kohya clamps; conv factors come back in conv shapes (up: out x r x 1 x 1,
    down: r x in x kh x kw)."""
    mat = diff.detach().float().reshape(diff.shape[0], -1)
    r = min(rank, *mat.shape)
    if lowrank and r < min(mat.shape) // 2:
        # Randomised SVD (Halko et al.): a few passes over the matrix instead of a full
        # factorisation; with oversampling and 4 power iterations its error is within rounding of
        # the exact one on weight differences, whose spectrum decays fast.
        u, s, v = torch.svd_lowrank(mat, q=min(r + 10, *mat.shape), niter=4)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    else:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    up, down = u * s, vh
    if clamp_quantile < 1:
        values = torch.cat([up.flatten(), down.flatten()]).numpy()
        hi = float(np.quantile(values, clamp_quantile))
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if diff.ndim == 4:
        up = up.reshape(diff.shape[0], r, 1, 1)
        down = down.reshape(r, *diff.shape[1:])
    return up.contiguous(), down.contiguous()


def weights_identity(modules: dict[str, torch.nn.Module]) -> str:
    """`sdxl-<16 hex>` over every weight's name, shape and fp32 value of the given components:
    the base an extract was made from, whatever file layout it was loaded from."""
    h = hashlib.sha256()
    for comp, mod in modules.items():
        for name, tensor in sorted(mod.state_dict().items()):
            t = tensor.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{comp}.{name}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return "sdxl-" + h.hexdigest()[:16]


def _check_same_architecture(comp: str, base: torch.nn.Module, tuned: torch.nn.Module, names) -> None:
    b, t = base.state_dict(), tuned.state_dict()
    if set(b) != set(t):
        missing = sorted(set(b) ^ set(t))[0]
        raise BigaspError(
            f"BASE {names[0]} and TUNED {names[1]} have different architectures: {comp} parameter "
            f"{missing!r} is in only one of them; extract from a finetune of this base"
        )
    for k, v in b.items():
        if v.shape != t[k].shape:
            raise BigaspError(
                f"BASE {names[0]} and TUNED {names[1]} have different architectures: {comp}.{k} is "
                f"{tuple(v.shape)} vs {tuple(t[k].shape)}; extract from a finetune of this base"
            )


def extract(
    load: Callable[[str, str], torch.nn.Module],
    names: tuple[str, str],
    settings: ExtractSettings,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All LoRA tensors (fp32) and the file metadata. `load(which, component)` loads one component
    of "base" or "tuned" (one at a time: the caller frees it when the next is asked for)."""
    settings.validate()
    tensors: dict[str, torch.Tensor] = {}
    identity = hashlib.sha256()
    skipped: list[str] = []
    for comp, _prefix in COMPONENTS:
        base, tuned = load("base", comp), load("tuned", comp)
        _check_same_architecture(comp, base, tuned, names)
        identity.update(weights_identity({comp: base}).encode())
        targets = lora_targets(comp, base, with_conv=settings.conv_rank is not None)
        diffs = _diffs(base, tuned, targets)
        if comp != "unet" and max((d.abs().max().item() for _, d in diffs), default=0.0) <= settings.min_diff:
            skipped.append(comp)
            del base, tuned
            continue
        for target, diff in diffs:
            if not diff.any():
                continue
            rank = settings.conv_rank if target.conv3x3 and settings.conv_rank else settings.rank
            up, down = low_rank_factors(
                diff, rank, clamp_quantile=settings.clamp_quantile, lowrank=settings.lowrank
            )
            tensors[f"{target.kohya}.lora_up.weight"] = up
            tensors[f"{target.kohya}.lora_down.weight"] = down
            tensors[f"{target.kohya}.alpha"] = torch.tensor(float(down.shape[0]))
        del base, tuned
    if not tensors:
        raise BigaspError(
            f"BASE {names[0]} and TUNED {names[1]} have the same weights in every LoRA-able layer; "
            "nothing to extract"
        )
    for comp in skipped:
        log.warning("%s differs by at most --min-diff %g: left out of the LoRA", comp, settings.min_diff)
    net_args = {} if settings.conv_rank is None else {
        "conv_dim": str(settings.conv_rank), "conv_alpha": str(float(settings.conv_rank))
    }  # fmt: skip
    recipe = {
        "method": "svd_lowrank" if settings.lowrank else "svd",
        "rank": settings.rank,
        "conv_rank": settings.conv_rank,
        "clamp_quantile": settings.clamp_quantile,
        "min_diff": settings.min_diff,
        "skipped": skipped,
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(float(settings.rank)),
        "ss_network_args": json.dumps(net_args),
        "ss_base_model_version": KOHYA_SDXL_VERSION,
        "ss_v2": "False",
        "bigasp_base": names[0],
        "bigasp_base_identity": "sdxl-" + identity.hexdigest()[:16],
        "bigasp_tuned": names[1],
        "bigasp_extract": json.dumps(recipe),
    }
    return tensors, metadata


def _diffs(
    base: torch.nn.Module, tuned: torch.nn.Module, targets: list[Target]
) -> list[tuple[Target, torch.Tensor]]:
    out = []
    for t in targets:
        w0 = base.get_submodule(t.module).weight.detach()
        w1 = tuned.get_submodule(t.module).weight.detach()
        out.append((t, w1.float() - w0.float()))
    return out


def write_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path, dtype: str) -> Path:
    """Write atomically: a temp file beside `out`, then rename (an error leaves `out` as it was)."""
    from safetensors.torch import save_file

    from bigasp.fsutil import usual_mode

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    cast = {k: v.to(DTYPES[dtype]).contiguous() for k, v in sorted(tensors.items())}
    try:
        save_file(cast, str(tmp), metadata=metadata)
        usual_mode(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def extract_lora(
    base: str, tuned: str, out: Path, settings: ExtractSettings, *, arch: str | None = None
) -> tuple[Path, int]:
    """Load BASE and TUNED component by component, extract, write `out`. Returns (path, layers)."""
    from bigasp.models.io import load_model

    settings.validate()

    from bigasp.models.components import SDXL
    from bigasp.models.presets import PRESETS

    def load(which: str, comp: str) -> torch.nn.Module:
        spec = base if which == "base" else tuned
        # A preset's weights depend on the component list it is built with (a seed per component):
        # build it as everywhere else, every component at once.
        wanted = SDXL.COMPONENTS if spec in PRESETS else (comp,)
        return getattr(load_model(spec, wanted, preset=arch), comp)

    tensors, metadata = extract(load, (base, tuned), settings)
    path = write_lora(tensors, metadata, out, settings.dtype)
    return path, sum(k.endswith(".alpha") for k in tensors)
