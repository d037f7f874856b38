"""Classifier-free guidance and Perturbed-Attention Guidance around one SDXL UNet call.

Everything is combined in denoised (x0) space as ComfyUI does:

    D = D_uncond + cfg·(D_cond - D_uncond) + pag·(D_cond - D_perturbed)

`cfg == 1` skips the unconditional pass (ComfyUI's cfg1 optimisation). PAG replaces the
self-attention (`attn1`) of every transformer block in the UNet mid block (10 layers in
SDXL) with identity attention, `to_out(to_v(h))`, for the perturbed rows only. The layers
are switched with diffusers attention processors that know which batch rows to perturb,
so cond, uncond and perturbed run as ONE batched UNet call per step whenever the prompts'
token lengths can be repeated to a common length (ComfyUI's rule: the LCM is at most 4x
the shorter length; exact for softmax attention, which sees every key the same number of
times).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bigasp.sample.model_sampling import ModelSampling

MAX_REPEAT = 4  # ComfyUI CONDCrossAttn.can_concat


@dataclass
class Conditioning:
    """UNet conditioning for B images: embeds [B, 77n, 2048], pooled [B, 1280], time_ids [B, 6]."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.embeds.shape[0])


def can_concat(lengths: list[int]) -> bool:
    lcm = math.lcm(*lengths)
    return lcm // min(lengths) <= MAX_REPEAT


def concat(conds: list[Conditioning]) -> Conditioning:
    """Stack conditionings along the batch, repeating token sequences to their LCM length."""
    lcm = math.lcm(*(c.embeds.shape[1] for c in conds))
    embeds = [c.embeds.repeat(1, lcm // c.embeds.shape[1], 1) for c in conds]
    return Conditioning(
        embeds=torch.cat(embeds),
        pooled=torch.cat([c.pooled for c in conds]),
        time_ids=torch.cat([c.time_ids for c in conds]),
    )


# -- PAG attention processors ------------------------------------------------------------


def pag_layer_names(unet: torch.nn.Module) -> list[str]:
    """Self-attention modules of the mid block (diffusers' `pag_applied_layers="mid"`)."""
    from diffusers.models.attention_processor import Attention

    return [
        name
        for name, module in unet.named_modules()
        if name.startswith("mid_block") and name.endswith("attn1") and isinstance(module, Attention)
    ]


class PerturbState:
    """Which rows of the current UNet batch get identity attention (`start:` ; None = none)."""

    def __init__(self) -> None:
        self.start: int | None = None


class IdentityAttentionProcessor:
    """Rows `state.start:` get `to_out(to_v(h))`; the rest go through the layer's original processor."""

    def __init__(self, original, state: PerturbState) -> None:
        self.original = original
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        start = self.state.start
        if start is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise RuntimeError("identity attention applies to 3-D self-attention layers only")
        parts = []
        if start > 0:
            mask = None if attention_mask is None else attention_mask[:start]
            parts.append(self.original(attn, hidden_states[:start], None, mask, temb, **kw))
        h = hidden_states[start:]
        residual = h
        if attn.spatial_norm is not None:
            h = attn.spatial_norm(h, temb)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        h = attn.to_out[1](attn.to_out[0](attn.to_v(h)))
        if attn.residual_connection:
            h = h + residual
        parts.append(h / attn.rescale_output_factor)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


@contextmanager
def perturbed_attention(unet: torch.nn.Module, state: PerturbState) -> Iterator[list[str]]:
    """Install identity-attention processors on the PAG layers; restore the originals on exit."""
    names = pag_layer_names(unet)
    if not names:
        raise RuntimeError("this UNet has no mid-block self-attention layers; PAG cannot be applied")
    modules = dict(unet.named_modules())
    originals = {n: modules[n].processor for n in names}
    try:
        for n in names:
            modules[n].set_processor(IdentityAttentionProcessor(originals[n], state))
        yield names
    finally:
        for n, proc in originals.items():
            modules[n].set_processor(proc)


# -- the guided denoiser the samplers call ------------------------------------------------


class GuidedDenoiser:
    """`D(x, σ)` with CFG and PAG, as few UNet calls per step as the prompt lengths allow.

    The batched conditioning is assembled once; each step only tiles `x` and fills a
    timestep tensor from a host float, so the sampling loop never syncs with the device.
    Use inside `perturbed_attention(unet, self.state)` when `pag > 0`.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        ms: ModelSampling,
        cond: Conditioning,
        uncond: Conditioning | None,
        *,
        cfg: float,
        pag: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.unet, self.ms, self.cfg, self.pag = unet, ms, float(cfg), float(pag)
        self.dtype = dtype or next(unet.parameters()).dtype
        self.batch = cond.batch
        self.use_uncond = not math.isclose(self.cfg, 1.0)
        if self.use_uncond and uncond is None:
            raise ValueError("cfg != 1 needs an unconditional (negative) conditioning")
        self.state = PerturbState()
        self.calls = self._plan(cond, uncond)
        self.unet_calls = 0

    def _plan(self, cond: Conditioning, uncond: Conditioning | None) -> list[tuple[list[str], Conditioning]]:
        """Group the passes into UNet calls: [(roles in batch order, batched conditioning)]."""
        roles = [("cond", cond)]
        if self.use_uncond:
            roles.append(("uncond", uncond))
        if self.pag > 0:
            roles.append(("perturbed", cond))  # perturbed rows must be last (see processor)
        if can_concat([c.embeds.shape[1] for _, c in roles]):
            groups = [roles]
        else:
            groups = [[r for r in roles if r[0] != "uncond"], [r for r in roles if r[0] == "uncond"]]
        return [([name for name, _ in g], self._cast(concat([c for _, c in g]))) for g in groups]

    def _cast(self, c: Conditioning) -> Conditioning:
        return Conditioning(c.embeds.to(self.dtype), c.pooled.to(self.dtype), c.time_ids.to(self.dtype))

    def unet_batch_size(self) -> int:
        return max(len(roles) for roles, _ in self.calls) * self.batch

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        b = self.batch
        xc = (x * self.ms.input_scale(sigma)).to(self.dtype)
        t = float(self.ms.timestep(torch.tensor(sigma, dtype=torch.float32)))
        out: dict[str, torch.Tensor] = {}
        for roles, c in self.calls:
            k = len(roles)
            self.state.start = roles.index("perturbed") * b if "perturbed" in roles else None
            pred = self.unet(
                xc.repeat(k, 1, 1, 1) if k > 1 else xc,
                torch.full((k * b,), t, device=x.device, dtype=torch.float32),
                encoder_hidden_states=c.embeds,
                added_cond_kwargs={"text_embeds": c.pooled, "time_ids": c.time_ids},
                return_dict=False,
            )[0]
            self.unet_calls += 1
            for j, role in enumerate(roles):
                out[role] = self.ms.denoised(sigma, pred[j * b : (j + 1) * b].float(), x)
        self.state.start = None
        return combine(out["cond"], out.get("uncond"), out.get("perturbed"), cfg=self.cfg, pag=self.pag)


def combine(
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    d_perturbed: torch.Tensor | None,
    *,
    cfg: float,
    pag: float,
) -> torch.Tensor:
    """ComfyUI's cfg_function followed by the PAG post-CFG function."""
    d = d_cond if d_uncond is None else d_uncond + (d_cond - d_uncond) * cfg
    if d_perturbed is not None and pag != 0:
        d = d + (d_cond - d_perturbed) * pag
    return d
