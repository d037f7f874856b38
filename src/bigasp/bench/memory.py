"""`bigasp bench memory`: peak memory of one training step, split into weights / gradients /
optimizer state / activations, estimated on CPU without allocating the tensors.

How: the trainer builds its model and optimizer (`Trainer.build_processes`, `build_model` with
`configure_model`, `build_optimizer`: the same code `bigasp train` runs, from the same TOML config)
inside torch's `FakeTensorMode`, so every tensor has a shape, dtype and device but no storage; the
SDXL step then runs as the trainer runs it (autocast at `train.precision`, the denoiser, the
objective's loss, backward, clipping, the optimizer step). `LiveStorages`, a dispatch mode over
the live storages, counts every storage by kind, and its split at the peak is the table. One step runs; the reported peak is the steady
state's, the larger of that step's optimizer-step peak and its forward/backward peak plus the
optimizer state it leaves (alive through every later step's forward/backward).

What is modelled for a CUDA target on a CPU-only machine (a CPU build cannot make fake CUDA tensors):
- autocast: CPU autocast runs norms and upsampling in bf16, CUDA's upcasts them to fp32; the
  estimate applies CUDA's rule (`CudaAutocastRules`) to the ops SDXL uses;
- the optimizer: on CUDA the trainer picks fused AdamW (no full-size temporaries); the estimate uses
  the fused kernel too, as `build_optimizer` does for CUDA parameters;
- attention runs through SDPA's fused CPU flash kernel, which keeps (like CUDA's flash/efficient
  kernels) only the output and the log-sum-exp for backward.
Not modelled: the CUDA caching allocator's 512-byte rounding per block,
fragmentation and cache (`max_memory_reserved` - `max_memory_allocated`), the CUDA context
(~0.5 GB), cuDNN/cuBLAS workspaces. The figure estimates `torch.cuda.max_memory_allocated`.

`--measure` runs the same step for real on the device (CUDA: `max_memory_allocated`; CPU: the
allocator's own records through torch.profiler) to check the estimate.
"""

from __future__ import annotations

import contextlib
import tempfile
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from bigasp.bench.common import BenchResult, machine_info
from bigasp.errors import ConfigError

GIB = 1024**3
CATEGORIES = ("weights", "gradients", "optimizer", "activations")

# Named recipes: the overrides each sets on top of the config.
RECIPES: dict[str, list[str]] = {
    # bigASP's cluster recipe: fp32 master weights, AdamW, bf16 autocast, UNet + TE1 trained.
    "cluster": [
        "train.precision=bf16",
        "model.train_text_encoder=true",
        "model.gradient_checkpointing=true",
    ],
    # One 24 GB GPU: LoRA rank 32 on attention + feed-forward, UNet only, bf16, checkpointing.
    "lora": [
        "model.adapter=lora",
        "model.adapter_rank=32",
        "model.adapter_targets=attention_ff",
        "model.train_text_encoder=false",
        "model.frozen_dtype=bf16",
        "model.gradient_checkpointing=true",
        "train.precision=bf16",
    ],
    # One 24 GB GPU: full UNet, bf16 weights, Adafactor fused into backward, checkpointing.
    "lean": [
        "model.train_text_encoder=false",
        "model.frozen_dtype=bf16",
        "model.trained_dtype=bf16",
        "model.gradient_checkpointing=true",
        "train.precision=bf16",
        "train.optimizer=adafactor",
        "train.fused_backward=true",
    ],
}


@dataclass
class MemoryBenchConfig:
    arch: str | None = None  # a preset; None: the config's model.source (tiny without a config)
    height: int = 64
    width: int = 64
    batch: int = 1
    tokens: int = 231
    recipe: str | None = None
    config: str | None = None  # a `bigasp train` TOML
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE, applied last
    target: str = "cuda"  # the device the estimate is for: cuda | cpu
    measure: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.height % 8 or self.width % 8 or self.height <= 0 or self.width <= 0:
            raise ConfigError(f"--res {self.height}x{self.width}: both sides must be positive multiples of 8")
        if self.batch < 1:
            raise ConfigError(f"--batch {self.batch}: must be >= 1")
        if self.tokens % 77 or not 77 <= self.tokens <= 231:
            raise ConfigError(f"--tokens must be 77, 154 or 231 (whole 77-token chunks), got {self.tokens}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ConfigError(f"--recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}")
        if self.target not in ("cuda", "cpu"):
            raise ConfigError(f"--device {self.target!r}: choose cuda or cpu")


def recipe_overrides(recipe: str | None) -> list[str]:
    """The recipe's `--set` overrides (none without a recipe)."""
    return [] if recipe is None else list(RECIPES[recipe])


def run_config(cfg: MemoryBenchConfig, run_dir: str):
    """The `bigasp train` config of the step: the TOML (or defaults), the recipe, the bench's
    shape settings, then --set overrides. One device batch, no accumulation."""
    from bigasp.config import load_config
    from bigasp.train.config import RunConfig

    source = [] if cfg.arch is None and cfg.config is not None else [f"model.source={cfg.arch or 'tiny'}"]
    shape = [
        "model.save_vae=false",  # the VAE stays on the host in training; it is never on the GPU
        f"data.device_batch_size={cfg.batch}",
        f"train.batch_size={cfg.batch}",
        "train.gradient_accumulation=1",
        "train.device=cpu",
        f"run_dir={run_dir}",
    ]
    overrides = [
        *source,
        f"model.init_seed={cfg.seed}",
        *recipe_overrides(cfg.recipe),
        *shape,
        *cfg.overrides,
    ]
    return load_config(RunConfig, cfg.config, overrides)


class CudaAutocastRules:
    """Inside CPU autocast, run the ops CUDA autocast keeps in fp32 (its "fp32 list") that SDXL's
    step uses, group norm, layer norm and upsampling, on fp32 inputs, so the estimate stores what a
    CUDA run stores. Outside autocast nothing changes. The functions are replaced for the duration
    (not a torch-function mode: gradient checkpointing's recompute in backward runs outside any
    mode, and would then disagree with the forward)."""

    NAMES = ("group_norm", "layer_norm", "interpolate")

    def __enter__(self) -> CudaAutocastRules:
        self.saved = {name: getattr(F, name) for name in self.NAMES}
        for name, fn in self.saved.items():
            setattr(F, name, self._upcast(fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(F, name, fn)

    @staticmethod
    def _upcast(fn):
        def wrapper(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args, kwargs = tree_map_only(
                    torch.Tensor, lambda t: t.float() if t.is_floating_point() else t, (args, kwargs)
                )
            return fn(*args, **kwargs)

        return wrapper


@dataclass
class Step:
    """The trainer (built through its own methods) and one synthetic device batch."""

    trainer: Any
    latents: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    te1: torch.Tensor
    te2: torch.Tensor
    time_ids: torch.Tensor

    def inputs(self) -> list[torch.Tensor]:
        return [self.latents, self.noise, self.t, self.te1, self.te2, self.time_ids]

    def run(self) -> None:
        """One optimizer step as `Trainer.train_step` does it for one micro-batch: noise, forward
        under the trainer's autocast, the objective's loss, backward, unscale/clip, step, zero."""
        tr = self.trainer
        prep = tr.objective.prepare(self.latents, self.noise, self.t)
        with tr.autocast():
            pred = tr.net(prep.x_t, prep.timesteps, self.te1, self.te2, self.time_ids)
        loss, _, _ = tr.objective.loss(pred, prep)
        update = getattr(tr, "update", None)
        if update is not None:  # a trainer whose build_optimizer makes an update strategy
            update.check_finite_loss = False  # its one read-back per step: fake tensors hold no values
            update.backward(loss / tr.accumulation)
            update.grad_norm()
            update.step()
            update.finish()
            return
        tr.scaler.scale(loss / tr.accumulation).backward()
        if tr.scaler.is_enabled():
            tr.scaler.unscale_(tr.optimizer)
        torch.nn.utils.clip_grad_norm_(tr.trainable, tr.cfg.train.grad_clip or float("inf"))
        tr.optimizer.step()  # (GradScaler.step would read found_inf on the host: same memory)
        tr.optimizer.zero_grad(set_to_none=True)


def synthetic_batch(cfg: MemoryBenchConfig) -> dict[str, torch.Tensor]:
    """Real (small) host tensors of one device batch: latents, noise, times, token ids, time ids."""
    from bigasp.bench.train import synthetic_tokens
    from bigasp.train.denoiser import time_ids_from

    g = torch.Generator().manual_seed(cfg.seed)
    b, h, w = cfg.batch, cfg.height // 8, cfg.width // 8
    tokens = synthetic_tokens(b, cfg.tokens // 77, g)
    size = torch.tensor([[cfg.height, cfg.width]] * b)
    return {
        "latents": torch.randn(b, 4, h, w, generator=g),
        "noise": torch.randn(b, 4, h, w, generator=g),
        "t": torch.rand(b, generator=g, dtype=torch.float64).float(),
        "te1": tokens.te1,
        "te2": tokens.te2,
        "time_ids": time_ids_from(size, torch.zeros(b, 2, dtype=torch.long), size),
    }


def build_step(cfg: MemoryBenchConfig, run, batch: dict[str, torch.Tensor], device: torch.device) -> Step:
    """The trainer's build steps for `run` (no data, no run folder), then the batch on `device`."""
    from bigasp.train.trainer import Trainer, TrainState

    tr = Trainer.__new__(Trainer)
    tr.cfg = run
    tr.state = TrainState()  # the update strategy reads the step index (stochastic rounding's key)
    tr.build_processes()
    tr.device = tr.dist.device if device.type == "cpu" else device
    main = tr.dist
    # Ranks that never save skip the host copy of rounded frozen weights (host memory, not GPU; and
    # its exactness check reads values, which fake tensors do not have).
    tr.dist = replace(main, rank=max(1, main.rank), device=tr.device)
    tr.build_model(None)
    tr.dist = replace(main, device=tr.device)
    tr.build_optimizer()
    return Step(tr, **{k: v.to(tr.device) for k, v in batch.items()})


@contextlib.contextmanager
def fake_module_conversion():
    """Let `Module.to(...)` convert fake parameters: torch swaps a fake parameter in place, which
    fails because fake tensors carry a weakref (torch 2.13). While the trainer builds under
    FakeTensorMode, conversion puts a new Parameter in the module's slot instead (the optimizer is
    built after `configure_model`, so nothing holds the old one); a no-op conversion keeps it."""
    original = torch.nn.Module._apply

    def _apply(self, fn, recurse=True):
        if recurse:
            for child in self.children():
                _apply(child, fn)
        for key, param in self._parameters.items():
            if param is None:
                continue
            with torch.no_grad():
                new = fn(param)
            if new is not param:
                self._parameters[key] = torch.nn.Parameter(new, requires_grad=param.requires_grad)
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = fn(buf)
        return self

    torch.nn.Module._apply = _apply  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module._apply = original  # type: ignore[method-assign]


class LiveStorages(TorchDispatchMode):
    """Every storage alive during the step, by kind, and the split at the peak of their sum.

    Storages enter as an op's outputs (in the optimizer step: optimizer state, else activations and
    backward temporaries); a parameter's accumulated gradient moves to `gradients`; a storage
    leaves when its last tensor dies. Parameters and buffers are registered up front as weights.
    Works on fake tensors (nothing allocated) and real ones alike. (torch's own MemTracker does
    this too, but refuses modules called more than once per step, as the text encoders are, one
    call per 77-token chunk.)"""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[Any]] = {}
        self.now = dict.fromkeys(CATEGORIES, 0)
        self.peak: dict[str, int] = dict(self.now)
        self.peak_fwbw: dict[str, int] = dict(self.now)  # all but the optimizer's storages, at their peak
        self.stepped = False
        self.kind = "activations"
        self.handles: list[Any] = []

    def add(self, t: torch.Tensor, kind: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = [kind, n]
        self.now[kind] += n
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        kind, n = self.live.pop(key, (None, 0))
        if kind is not None:
            self.now[kind] -= n

    def move(self, t: torch.Tensor | None, kind: str) -> None:
        if t is None:  # a fused backward stepped and freed this gradient in an earlier hook
            return
        entry = self.live.get(t.untyped_storage()._cdata)
        if entry is None:
            self.add(t, kind)
        elif entry[0] != kind:
            self.now[entry[0]] -= entry[1]
            self.now[kind] += entry[1]
            entry[0] = kind
        self._update_peak()

    def _update_peak(self) -> None:
        if sum(self.now.values()) > sum(self.peak.values()):
            self.peak = dict(self.now)
        # Everything but the optimizer's storages, at its largest over the whole step: with the
        # optimizer fused into backward the state grows during backward, so "before the first
        # step" is not a moment; a later step has all of it alive throughout.
        rest = sum(self.now.values()) - self.now["optimizer"]
        if rest > sum(self.peak_fwbw.values()):
            self.peak_fwbw = dict(self.now, optimizer=0)

    def watch(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for p in net.parameters():
            self.add(p, "weights")
            if p.requires_grad:
                self.handles.append(
                    p.register_post_accumulate_grad_hook(lambda q: self.move(q.grad, "gradients"))
                )
        for b in net.buffers():
            self.add(b, "weights")
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    self.add(v, "optimizer")

        def enter(*_):
            self.kind = "optimizer"
            self.stepped = True

        def leave(*_):
            self.kind = "activations"

        self.handles += [optimizer.register_step_pre_hook(enter), optimizer.register_step_post_hook(leave)]
        self._update_peak()

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.add(t, self.kind)
        self._update_peak()
        return out


def pin_kernel(optimizer: torch.optim.Optimizer, target: str) -> None:
    """The AdamW kernel the trainer runs on `target`, named explicitly: fused on CUDA (no full-size
    temporaries), the per-tensor loop on CPU. Left implicit, torch decides per call from the
    parameters' types, and fake and real CPU tensors can decide differently."""
    if isinstance(optimizer, torch.optim.AdamW | torch.optim.Adam):
        fused = target == "cuda"
        for group in [*optimizer.param_groups, optimizer.defaults]:
            group["fused"], group["foreach"] = fused, False


def estimate(cfg: MemoryBenchConfig, run, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The step's peak from fake tensors: {total, weights, gradients, optimizer, activations} bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(
        allow_non_fake_inputs=True
    ) as mode:  # module constants (noise schedule) become fake on use
        fake_batch = {k: mode.from_tensor(v) for k, v in batch.items()}
        with fake_module_conversion():
            step = build_step(cfg, run, fake_batch, torch.device("cpu"))
        tr = step.trainer
        pin_kernel(tr.optimizer, cfg.target)
        tracker = LiveStorages()
        tracker.watch(tr.net, tr.optimizer)
        for v in step.inputs():
            tracker.add(v, "activations")
        rules = CudaAutocastRules() if cfg.target == "cuda" else contextlib.nullcontext()
        with rules, tracker:
            step.run()
        tracker.close()
    # One step is enough: the next one repeats the forward/backward with the optimizer state (now
    # `tracker.now["optimizer"]`) alive throughout, and its optimizer step repeats this one's.
    state = tracker.now["optimizer"]
    steady = dict(tracker.peak_fwbw, optimizer=tracker.peak_fwbw["optimizer"] + state)
    parts = max(tracker.peak, steady, key=lambda d: sum(d.values()))
    first = tracker.peak
    return {
        "total": sum(parts.values()),
        **parts,
        "first_step_total": sum(first.values()),
        "trainable_params": sum(p.numel() for p in tr.trainable),
        "params": sum(p.numel() for p in tr.net.parameters()),
    }


def measure(
    cfg: MemoryBenchConfig, run, batch: dict[str, torch.Tensor], device: torch.device
) -> dict[str, Any]:
    """The same two steps with real tensors. CUDA: `torch.cuda.max_memory_allocated`. CPU: every
    allocation and free the CPU allocator reports to torch.profiler (`profile_memory`), summed in
    order from before the model is built: the running total's maximum is the peak of live bytes.
    Nothing here shares code with the estimator's accounting."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step = build_step(cfg, run, batch, device)
        pin_kernel(step.trainer.optimizer, device.type)
        step.run()
        step.run()
        torch.cuda.synchronize(device)
        return {"total": torch.cuda.max_memory_allocated(device) - base}
    from torch.profiler import ProfilerActivity, profile

    # The model is built before the profile: a CPU build holds transients (an fp32 load cast to
    # bf16, say) that a CUDA run keeps on the host, not on the card. What is alive when the steps
    # begin (weights, buffers, the batch) is counted once, by storage.
    step = build_step(cfg, run, batch, device)
    pin_kernel(step.trainer.optimizer, device.type)
    alive = {
        t.untyped_storage()._cdata: t.untyped_storage().nbytes()
        for t in [*step.trainer.net.parameters(), *step.trainer.net.buffers(), *step.inputs()]
    }
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.run()
        step.run()
    # The raw allocator records, in order: one per allocation (+bytes) and per free (-bytes).
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return {"total": peak + sum(alive.values())}


def run_memory_bench(cfg: MemoryBenchConfig, command: str) -> BenchResult:
    cfg.validate()
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = run_config(cfg, str(Path(tmp) / "run"))
        batch = synthetic_batch(cfg)
        got = None
        if cfg.measure:
            # Measured first, as in a fresh `bigasp train` process: before the AdamW kernel was pinned
            # (`pin_kernel`), a real CPU step measured after a fake one differed by 12 MB on the tiny preset.
            device = torch.device(cfg.target)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError("--measure --device cuda needs a CUDA device; this machine has none")
            got = measure(cfg, run, batch, device)
        est = estimate(cfg, run, batch)
        metrics: dict[str, Any] = {f"{k}_gib": est[k] / GIB for k in ("total", *CATEGORIES)}
        metrics |= {f"{k}_bytes": est[k] for k in ("total", *CATEGORIES)}
        metrics |= {k: est[k] for k in ("trainable_params", "params")}
        if got is not None:
            metrics["measured_gib"] = got["total"] / GIB
            metrics["measured_bytes"] = got["total"]
            metrics["error_pct"] = 100 * (est["total"] - got["total"]) / got["total"]
    if cfg.target == "cuda":
        notes.append(
            "estimate of torch.cuda.max_memory_allocated; add ~0.5 GiB CUDA context and the allocator's cache"
        )
    headline = [("total_gib", "GiB peak"), *((f"{c}_gib", f"GiB {c}") for c in CATEGORIES)]
    if cfg.measure:
        headline += [("measured_gib", "GiB measured"), ("error_pct", "% error")]
    config = asdict(cfg) | {
        "train": run.train.model_dump(mode="json"),
        "model": run.model.model_dump(mode="json"),
    }
    return BenchResult(
        bench="memory",
        config=config,
        metrics=metrics,
        headline=headline,
        command=command,
        machine=machine_info(torch.device("cpu")),
        notes=notes,
    )
