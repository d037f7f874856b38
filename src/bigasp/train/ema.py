"""An exponential moving average (EMA) of the trained weights, for sampling a smoother model.

The update is `torch.optim.swa_utils.get_ema_multi_avg_fn`'s: the first update copies the
weights, every later one is `ema <- ema + (1 - decay) * (w - ema)` as one `_foreach_lerp_`, so
it equals `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))` bit for bit (tested).
Only trained parameters are averaged; frozen parts are the model's own. The average lives on
rank 0 only (DDP replicas are identical), optionally on the CPU, in fp32 or bf16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from bigasp.train.checkpoint import CheckpointError

EMA_DIR = "ema"


class EMA:
    """The running average of `params` (name -> live parameter), updated after optimizer steps."""

    def __init__(
        self, params: dict[str, torch.Tensor], *, decay: float, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.params = params
        self.decay = decay
        self.dtype = dtype
        self.device = device
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self) -> None:
        current = [p.detach().to(self.device, self.dtype) for p in self.params.values()]
        if self.updates == 0:
            self.shadow = {
                n: c.clone() if c.data_ptr() == p.data_ptr() else c
                for (n, p), c in zip(self.params.items(), current, strict=True)
            }
        else:
            torch._foreach_lerp_(list(self.shadow.values()), current, 1 - self.decay)
        self.updates += 1

    def component_state(self, component: str, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`full` (a component's state dict) with its averaged parameters swapped in, in `full`'s dtype."""
        prefix = f"{component}."
        out = {k: v.detach().to("cpu") for k, v in full.items()}
        for name, value in self.shadow.items():
            if name.startswith(prefix):
                key = name[len(prefix) :]
                out[key] = value.to("cpu", full[key].dtype, copy=True)
        return out

    def components(self) -> list[str]:
        return sorted({n.split(".", 1)[0] for n in self.params})

    def load_folder(self, folder: Path, updates: int) -> None:
        """Read the average back from a checkpoint's `ema/` model folder (exact: written at fp32 or wider)."""
        if updates == 0:
            self.updates, self.shadow = 0, {}
            return
        found: dict[str, torch.Tensor] = {}
        for comp in self.components():
            files = sorted((folder / comp).glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder / comp}: no weights; the checkpoint's EMA is missing")
            for f in files:
                try:
                    found.update({f"{comp}.{k}": v for k, v in load_file(str(f)).items()})
                except Exception as err:  # safetensors raises its own error types
                    raise CheckpointError(
                        f"{f}: cannot be read ({err}); the checkpoint's EMA is damaged"
                    ) from None
        missing = [n for n in self.params if n not in found]
        if missing:
            raise CheckpointError(
                f"{folder}: EMA weights lack {missing[:3]}; the checkpoint's EMA is damaged"
            )
        self.shadow = {n: found[n].to(self.device, self.dtype) for n in self.params}
        self.updates = updates
