"""How gradients become weight updates, including the memory-lean ways a 24 GB card needs.

Three update paths, chosen once by `build_update` from the run config (never branched on in the
training step):

- `WholeStep`: backward over the whole model, then unscale (fp16), clip the global norm and step
  every parameter at once; a non-finite step is skipped. fp32 master weights + AdamW (bigASP).
- `ParamwiseStep`: the same, but each parameter is stepped on its own. bf16 trained weights take
  this path: the parameter and its gradient are upcast to fp32 one at a time, the optimizer steps
  that fp32 copy, and the result is stochastically rounded back to bf16 (`stochastic_round_bf16`).
  Only one parameter's fp32 copy ever exists, and the optimizer state stays fp32.
- `FusedStep`: the per-parameter step runs inside backward, from a hook that fires as soon as a
  parameter's gradient is complete (torch's `register_post_accumulate_grad_hook`); the gradient is
  freed right after, so the model's full set of gradients never exists at once. A parameter is
  stepped after its gradient is done, and no later gradient reads it (SDXL shares no weights), so
  the result equals `ParamwiseStep` on the same optimizer bit for bit.

Stochastic rounding is keyed like every other random choice of a run: the random bits of
parameter i at optimizer step s come from (seed, s, i), so a resumed run rounds exactly as an
uninterrupted one without any RNG state in the checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch

from bigasp.errors import BigaspError, ConfigError
from bigasp.models.components import SDXL
from bigasp.train.config import RunConfig
from bigasp.train.optim import make_optimizer

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
CUDA_ONLY = {"paged_adamw8bit": "bitsandbytes pages its state through CUDA unified memory"}


class FusedStepError(BigaspError):
    """A non-finite gradient reached the weights inside a fused backward (it cannot be undone)."""


# ---------------------------------------------------------------------------------------------
# Checks and setup (before and while the model loads)


def check_setup(cfg: RunConfig, *, accumulation: int, world_size: int, device: torch.device) -> None:
    """Combinations that depend on the machine, refused in one line before any model loads."""
    t = cfg.train
    if t.optimizer in CUDA_ONLY and device.type != "cuda":
        raise ConfigError(
            f"train.optimizer = '{t.optimizer}' needs a CUDA device ({CUDA_ONLY[t.optimizer]}) but this run "
            f"trains on {device.type}; use train.optimizer = 'adamw8bit' (runs on CPU too) or a CUDA device"
        )
    if t.optimizer in ("adamw8bit", "paged_adamw8bit") and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"train.optimizer = '{t.optimizer}' needs the bitsandbytes package; install it with "
            "`pip install bitsandbytes` (or pip install 'bigasp[lean]'), or use train.optimizer = 'adafactor'"
        )
    if cfg.model.trained_dtype == "bf16" and t.parallelism == "fsdp2" and world_size > 1:
        raise ConfigError(
            "model.trained_dtype = 'bf16' is not wired for train.parallelism = 'fsdp2' (its per-parameter "
            "fp32 step would see only shards); use parallelism = 'ddp' or trained_dtype = 'fp32'"
        )
    if not t.fused_backward:
        return
    if world_size > 1:
        raise ConfigError(
            f"train.fused_backward works in one process only (got {world_size}): each parameter steps before "
            "the ranks have averaged its gradient; turn it off for DDP/FSDP2 runs"
        )
    if accumulation > 1:
        raise ConfigError(
            f"train.fused_backward steps in every backward, but train.batch_size = {t.batch_size} with "
            f"data.device_batch_size = {cfg.data.device_batch_size} means {accumulation} accumulation "
            "micro-steps; set train.batch_size = data.device_batch_size"
        )


def apply_trained_dtype(model: SDXL, cfg: RunConfig) -> None:
    """Store the trained parts in `model.trained_dtype` (bf16: rounded to nearest once, at start)."""
    if cfg.model.trained_dtype == "fp32":
        return
    for name in COMPONENTS:
        module = getattr(model, name, None)
        if module is not None and any(p.requires_grad for p in module.parameters()):
            module.to(torch.bfloat16)


def saved_copy(module: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module | None:
    """A CPU copy of a trained part in `model.save_dtype`, or None when it is saved as it is stored."""
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(cfg.model.save_dtype or "")
    if want is None or all(p.dtype == want for p in module.parameters() if p.is_floating_point()):
        return None
    from bigasp.train.parallel import unsharded_copy

    state = {
        k: v.detach().to("cpu", want) if v.is_floating_point() else v.detach().cpu()
        for k, v in module.state_dict().items()
    }
    return unsharded_copy(module, state)


# ---------------------------------------------------------------------------------------------
# Stochastic rounding


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up in magnitude with probability equal to the dropped fraction.

    bf16 is fp32 with the low 16 mantissa bits cut off. Adding a uniform random integer in
    [0, 2^16) to those bits and then cutting them carries into the kept bits with probability
    (dropped bits) / 2^16, so E[result] = x exactly (for finite x within bf16's range): an update
    smaller than half a bf16 step, which round-to-nearest always loses, is kept on average."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes float32, got {x.dtype}")
    bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits.add_(x.view(torch.int32)).bitwise_and_(-65536)  # -65536 = 0xFFFF0000: sign, exponent, 7 bits
    return bits.view(torch.float32).to(torch.bfloat16)


def rounding_seed(seed: int, step: int, index: int) -> int:
    """The key of parameter `index`'s rounding bits at optimizer step `step` (63 bits)."""
    digest = hashlib.blake2b(f"{seed}/sr/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------
# Update paths


class WholeStep:
    """Backward, then unscale (fp16) / clip the global norm / step all parameters, or skip."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        params: list[torch.nn.Parameter],
        grad_clip: float | None,
    ) -> None:
        self.optimizer, self.scaler, self.params, self.grad_clip = optimizer, scaler, params, grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm (after unscaling), clipped to `grad_clip` when set."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: global norm

    def step(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
        else:
            self.optimizer.step()

    def skip(self) -> None:
        """The step's loss or gradient was non-finite: nothing was applied, nothing to undo."""

    def finish(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


class ParamwiseStep(WholeStep):
    """Steps one parameter at a time; bf16 parameters are stepped in fp32 and stochastically rounded.

    The optimizer is stepped with its param groups narrowed to the one parameter (lr and every
    other setting shared with the real group), so any torch-style optimizer works unchanged and
    keeps one state dict in the usual layout."""

    def __init__(self, *args: Any, seed: int, step_index: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed, self.step_index = seed, step_index
        self.index = {p: i for i, p in enumerate(self.params)}
        # group positions, not the dicts: load_state_dict replaces the dicts (a resume), set_lr edits the new ones
        self.group_of = {p: i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        self.generators: dict[torch.device, torch.Generator] = {}

    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                self.step_param(p)

    def step_param(self, p: torch.nn.Parameter) -> None:
        """Apply the optimizer to `p` alone (its gradient must be in `p.grad`)."""
        low = p.dtype == torch.bfloat16
        if low:
            stored = p.data
            p.data, p.grad = stored.float(), p.grad.float()
        groups = self.optimizer.param_groups
        self.optimizer.param_groups = [{**groups[self.group_of[p]], "params": [p]}]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
            if low:
                updated = p.data
                p.data = stored
        if low:
            p.grad = None  # the fp32 gradient copy: free it before the rounding bits are drawn
            gen = self.generators.get(p.device)
            if gen is None:
                gen = self.generators[p.device] = torch.Generator(device=p.device)
            gen.manual_seed(rounding_seed(self.seed, self.step_index(), self.index[p]))
            p.data.copy_(stochastic_round_bf16(updated, gen))


class FusedStep(ParamwiseStep):
    """Each parameter steps inside backward once its gradient is complete; the gradient is freed.

    The global gradient norm is still reported (summed per parameter before its step). A loss that
    is not finite skips backward, and so the step, cleanly; a finite loss with a non-finite
    gradient cannot be undone once parameters have stepped, so it stops the run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sq_sum: torch.Tensor | None = None
        self.ran_backward = False
        # The loss check reads one value back per step; a memory estimate under FakeTensorMode
        # (no values) turns it off.
        self.check_finite_loss = True
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, p: torch.nn.Parameter) -> None:
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        self.step_param(p)
        p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        self.sq_sum, self.ran_backward = None, False
        if self.check_finite_loss and not bool(torch.isfinite(loss.detach())):
            return  # nothing steps: the trainer counts the step as skipped
        self.ran_backward = True
        loss.backward()

    def grad_norm(self) -> torch.Tensor:
        if self.sq_sum is None:
            device = self.params[0].device
            return torch.tensor(float("nan") if not self.ran_backward else 0.0, device=device)
        return self.sq_sum.sqrt()

    def step(self) -> None:
        """Already applied in backward."""

    def skip(self) -> None:
        if self.ran_backward:
            raise FusedStepError(
                f"a non-finite gradient (norm {float(self.grad_norm())}) was applied inside the fused backward "
                "and cannot be undone; resume from the last checkpoint with a lower train.lr, or turn "
                "train.fused_backward off so such steps are skipped"
            )

    def remove(self) -> None:
        """Take the hooks off (e.g. before stepping the same model another way)."""
        for h in self.handles:
            h.remove()


def optimizer_groups(cfg: RunConfig, model: SDXL) -> list[tuple[str, list[torch.nn.Parameter], float]]:
    """(name, parameters, peak lr) per model part; frozen parts contribute nothing."""
    t = cfg.train
    lrs = {
        "unet": t.lr,
        "text_encoder": t.text_encoder_lr or t.lr,
        "text_encoder_2": t.text_encoder_2_lr or t.lr,
    }
    return [(name, list(getattr(model, name).parameters()), lrs[name]) for name in COMPONENTS]


def build_update(
    cfg: RunConfig,
    model: SDXL,
    device: torch.device,
    *,
    step_index: Callable[[], int] = lambda: 0,
) -> WholeStep:
    """The optimizer (`train.optimizer`) over the model's trained parameters and the path that
    applies it (whole step / per-parameter with stochastic rounding / fused into backward; a
    `FusedStep` installs its hooks now). `step_index()` must return the optimizer step about to
    be taken (the trainer's step counter): it keys the stochastic rounding.

    The returned object has `.optimizer` and `.scaler` (the fp16 GradScaler, disabled otherwise)."""
    t = cfg.train
    optimizer = make_optimizer(
        t.optimizer,
        optimizer_groups(cfg, model),
        betas=t.betas,
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler(
        device.type,
        init_scale=t.grad_scaler_init,
        growth_interval=t.growth_interval(),
        enabled=t.precision == "fp16",
    )
    bf16 = any(p.dtype == torch.bfloat16 for p in params)
    kind = FusedStep if t.fused_backward else ParamwiseStep if bf16 else WholeStep
    if kind is WholeStep:
        return WholeStep(optimizer, scaler, params, t.grad_clip)
    return kind(optimizer, scaler, params, t.grad_clip, seed=cfg.data.seed, step_index=step_index)
