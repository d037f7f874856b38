"""The training loop of `bigasp train`: a `Trainer` whose methods are its named steps.

    build:    processes -> model (trainable / frozen parts) -> optimizer + scaler -> EMA -> data
    restore:  optimizer, scaler, counters (`TrainState`), EMA, loader position, RNG
    run:      train_step (lr(samples) -> accumulation micro-steps, DDP syncs only on the last ->
              unscale, clip, skip if non-finite -> optimizer step) -> update_ema -> log_step ->
              validate / save / stop on signal, each at its sample boundary

Everything random is keyed: a sample's noise and timestep come from (seed, epoch, row), so a run
is the same on 1 or 32 GPUs (up to float summation order) and bitwise the same after a resume on
CPU. Sizes and intervals are in samples (docs/training.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bigasp.config import dump_toml
from bigasp.errors import BigaspError, ConfigError
from bigasp.flops import TrainFlops
from bigasp.models.components import SDXL
from bigasp.models.io import load_model, save_diffusers_folder
from bigasp.text import TE2_PAD
from bigasp.train import adapters, lean, parallel, preflight
from bigasp.train import checkpoint as ckpt_io
from bigasp.train.config import RunConfig, resolve_accumulation
from bigasp.train.data import TrainLoader, eval_batches, split_dataset
from bigasp.train.denoiser import Denoiser, time_ids_from
from bigasp.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
)
from bigasp.train.ema import EMA, EMA_DIR
from bigasp.train.objectives import Objective, ObjectiveConfig
from bigasp.train.optim import load_optimizer_state, set_lr
from bigasp.train.schedule import lr_multiplier
from bigasp.train.stream import StreamingLoader, StreamStopped
from bigasp.train.tracking import Tracker, truncate_jsonl
from bigasp.train.validation import evaluate

log = logging.getLogger("bigasp.train")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(BigaspError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    samples_seen: int
    step: int
    skipped_steps: int
    stopped_by_signal: bool = False
    stop_signal: int | None = None  # the signal this process received (None: another rank's, or none)
    last_checkpoint: Path | None = None
    validation: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Setup helpers


def objective_config(cfg: RunConfig) -> ObjectiveConfig:
    t = cfg.train
    return ObjectiveConfig(
        prediction=t.objective,
        min_snr_gamma=t.min_snr_gamma,
        offset_noise=t.offset_noise,
        flow_timesteps=t.flow_timesteps,
        flow_logit_mean=t.flow_logit_mean,
        flow_logit_std=t.flow_logit_std,
        flow_shift=t.flow_shift,
    )


def trained(cfg: RunConfig, component: str) -> bool:
    return {
        "unet": True,
        "text_encoder": cfg.model.train_text_encoder,
        "text_encoder_2": cfg.model.train_text_encoder_2,
    }[component]


def lossless_dtype(module: torch.nn.Module, candidates: tuple[torch.dtype, ...]) -> torch.dtype | None:
    """The first dtype in `candidates` that holds every parameter and buffer of `module` exactly."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    for dt in candidates:
        if all(t.dtype == dt or torch.equal(t.to(dt).to(t.dtype), t) for t in tensors):
            return dt
    return None


def train_first_layers(encoder: torch.nn.Module, n: int, key: str) -> None:
    """Only transformer layers 0..n-1 of a CLIP text encoder train; everything else is frozen.

    The token and position embeddings stay frozen too: light training should not move the
    interface every token goes through, and AdamW's decoupled weight decay would shrink all
    49,408 token rows every step, also those of tokens the data never uses.
    """
    layers = getattr(encoder, "text_model", encoder).encoder.layers  # transformers 4 vs 5
    if n > len(layers):
        raise ConfigError(f"{key} = {n} but the encoder has {len(layers)} layers; use 1..{len(layers)}")
    encoder.requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(True)


def configure_model(
    model: SDXL, cfg: RunConfig, device: torch.device, *, keep_originals: bool = True
) -> dict[str, dict[str, torch.Tensor]]:
    """Trainable parts: train mode, grads on. Frozen parts: eval, no grads, `frozen_dtype` storage.

    Returns the weights checkpoints must write for frozen parts that `frozen_dtype` would round
    (e.g. SDXL's fp16 text encoders in bf16): a CPU copy in the smallest dtype that holds them
    exactly. A frozen part never changes, so every checkpoint must reproduce it bit for bit;
    parts that `frozen_dtype` stores exactly (SDXL's fp16 release in fp16) need no copy.
    `keep_originals=False` (ranks that never save) skips the copy."""
    m = cfg.model
    originals: dict[str, dict[str, torch.Tensor]] = {}
    model.unet.requires_grad_(True).train()
    for name, trains in (("text_encoder", m.train_text_encoder), ("text_encoder_2", m.train_text_encoder_2)):
        enc = getattr(model, name)
        if trains:
            enc.requires_grad_(True).train()
            continue
        storage = DTYPES[m.frozen_dtype]
        if keep_originals and lossless_dtype(enc, (storage,)) is None:
            keep = lossless_dtype(enc, (torch.float16, torch.bfloat16)) or torch.float32
            originals[name] = {k: v.detach().to("cpu", keep, copy=True) for k, v in enc.state_dict().items()}
            size = sum(v.numel() * v.element_size() for v in originals[name].values())
            log.warning(
                "model.frozen_dtype = %s rounds %s's weights; checkpoints write a %s CPU copy of the "
                "original (%.2f GB host memory). A frozen_dtype that holds them exactly (fp16 for SDXL's "
                "release) needs no copy.",
                m.frozen_dtype, name, str(keep).removeprefix("torch."), size / 1e9,
            )  # fmt: skip
        enc.requires_grad_(False).eval().to(storage)
    for name, layers in (
        ("text_encoder", m.text_encoder_layers),
        ("text_encoder_2", m.text_encoder_2_layers),
    ):
        if layers is not None and trained(cfg, name):
            train_first_layers(getattr(model, name), layers, f"model.{name}_layers")
    if m.train_text_encoder:
        # Conditioning uses TE1's penultimate hidden state: its last layer and final norm never
        # receive a gradient, so they are frozen (keeps DDP free of find_unused_parameters).
        te1 = getattr(model.text_encoder, "text_model", model.text_encoder)  # transformers 4 vs 5
        te1.encoder.layers[-1].requires_grad_(False)
        te1.final_layer_norm.requires_grad_(False)
    if m.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for name, trains in (
            ("text_encoder", m.train_text_encoder),
            ("text_encoder_2", m.train_text_encoder_2),
        ):
            if trains:
                getattr(model, name).gradient_checkpointing_enable()
    lean.apply_trained_dtype(model, cfg)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        getattr(model, name).to(device)
    if model.vae is not None:
        model.vae.requires_grad_(False).eval()  # stays on CPU: only saved with checkpoints
    return originals


def stable_loss_label(cfg: RunConfig) -> str:
    """What `stable/loss` is, in words, for the log (bigASP's was min-SNR weighted)."""
    t = cfg.train
    if cfg.validation.stable_loss == "weighted" and t.objective == "eps" and t.min_snr_gamma is not None:
        return f"min-SNR-{t.min_snr_gamma:g} weighted"
    return "plain MSE"


def new_window() -> dict[str, Any]:
    """Accumulators between two log lines: summed step stats, samples, pure step time."""
    return {"samples": 0, "step_time": 0.0, "stats": torch.zeros(8, dtype=torch.float64)}


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary, then exits.
    A second SIGINT interrupts immediately."""

    def __init__(self, enabled: bool):
        self.set = False
        self.signum: int | None = None  # the first signal received (SIGINT: the CLI exits 130)
        self._old: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        self.signum = self.signum or signum
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------
# The run


def train(
    cfg: RunConfig,
    *,
    resume: str | None = None,
    stop_at: int | None = None,
    dataset=None,
    overwrite: bool = False,
) -> TrainResult:
    """Run (or resume) training as configured; returns where it stopped.

    `stop_at`: checkpoint and stop once this many samples are seen (a slice of the schedule, e.g.
    to fit a cluster time limit; the lr schedule still spans `train.max_samples`). `dataset`: an
    already-open `LatentDataset` (default: open `data.dataset`). A fresh run refuses a run folder
    that holds checkpoints unless `overwrite` (which deletes them); the folder is locked meanwhile.
    """
    from bigasp.train.distributed import read_env

    main = read_env()[0] == 0
    with ckpt_io.run_folder_guard(Path(cfg.run_dir), resume=resume, overwrite=overwrite, main=main):
        return _train(cfg, resume=resume, stop_at=stop_at, dataset=dataset)


def _train(cfg: RunConfig, *, resume: str | None, stop_at: int | None, dataset) -> TrainResult:
    return Trainer(cfg, resume=resume, dataset=dataset).run(stop_at=stop_at)


@dataclass
class TrainState:
    """Everything the loop advances; checkpoints write it and a resume reads it back."""

    samples_seen: int = 0
    step: int = 0
    skipped: int = 0
    consecutive: int = 0
    validation: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepOutcome:
    """One optimizer step as the loop sees it after the host sync."""

    stats: torch.Tensor  # summed over ranks: see `Trainer.train_step`
    grad_norm: torch.Tensor
    stop_now: bool


class Trainer:
    """One run, in named steps: build (processes, model, optimizer, data) -> restore -> run
    (train_step -> log_step -> validate / save / stop). A new feature is a few lines in one step."""

    # ---- build ----------------------------------------------------------------------------------

    def __init__(self, cfg: RunConfig, *, resume: str | None, dataset) -> None:
        self.cfg = cfg
        self.build_processes()
        ckpt_path, saved = self.prepare_run_dir(resume)
        self.build_model(ckpt_path)
        self.write_run_config()  # after build_model: a refused resume leaves the run folder as it was
        self.build_optimizer()
        self.build_ema()
        self.build_data(dataset, saved)
        self.state = TrainState()
        self.restored = saved is not None
        if saved is not None:
            self.restore(ckpt_path, saved)
        else:  # torch's global RNG (adapter dropout) starts from the run's seed; a resume restores it
            torch.manual_seed((self.seed << 16) + self.rank)
        self.build_logging()
        self.result = TrainResult(self.state.samples_seen, self.state.step, self.state.skipped)

    def build_processes(self) -> None:
        """Processes, devices, numerics."""
        cfg = self.cfg
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.device, self.rank, self.world = self.dist.device, self.dist.rank, self.dist.world_size
        self.accumulation = resolve_accumulation(cfg, self.world)
        self.batch_size = cfg.train.batch_size
        self.seed = cfg.data.seed
        self.run_dir = Path(cfg.run_dir)
        if cfg.train.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype = None if cfg.train.precision == "fp32" else DTYPES[cfg.train.precision]
        lean.check_setup(cfg, accumulation=self.accumulation, world_size=self.world, device=self.device)

    def autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def prepare_run_dir(self, resume: str | None) -> tuple[Path | None, dict[str, Any] | None]:
        """Where to start: the checkpoint to resume (same on every rank) and its state."""
        dist, run_dir = self.dist, self.run_dir
        ckpt_path = broadcast_object(ckpt_io.resolve_resume(resume, run_dir) if dist.is_main else None)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.clean_stale_temps(run_dir)
        saved = ckpt_io.load_state(ckpt_path) if ckpt_path is not None else None
        return ckpt_path, saved

    def write_run_config(self) -> None:
        if self.dist.is_main:
            (self.run_dir / "config.toml").write_text(dump_toml(self.cfg.model_dump(mode="json")))

    def build_model(self, ckpt_path: Path | None) -> None:
        """Load the model (from the checkpoint on resume), freeze/train its parts, wrap DDP/FSDP2.

        With `model.adapter` the model is the frozen base (always `model.source`) with an adapter
        injected (`bigasp.train.adapters`); a resume checks the base and loads the adapter's weights."""
        cfg, dist, device = self.cfg, self.dist, self.device
        components = ("unet", "text_encoder", "text_encoder_2", *(("vae",) if cfg.model.save_vae else ()))
        with_adapter = cfg.model.adapter is not None
        if ckpt_path is not None:
            adapters.check_resume(ckpt_path, cfg)
        source = str(ckpt_path / "model") if ckpt_path is not None and not with_adapter else cfg.model.source
        model = load_model(
            source, components, kind=cfg.model_kind(), preset=cfg.model.preset, seed=cfg.model.init_seed
        )
        self.model = model
        self.base_identity: str | None = None
        if with_adapter:
            if ckpt_path is not None or dist.is_main:  # read to check a resume and to write checkpoints
                self.base_identity = adapters.base_identity(model)
            if ckpt_path is not None:
                adapters.check_base(ckpt_path, cfg, self.base_identity)
            self.frozen_originals = {}
            adapters.configure_adapted_model(model, cfg, device)
            if ckpt_path is not None:
                adapters.load_state(model, ckpt_path / "model")
        else:
            self.frozen_originals = configure_model(model, cfg, device, keep_originals=dist.is_main)
        self.denoiser = Denoiser(model.unet, model.text_encoder, model.text_encoder_2)
        self.net: torch.nn.Module = self.denoiser
        # FSDP2 roots: the UNet (one unit per block) and each trained text encoder. Frozen encoders
        # stay replicated (no grads, no optimizer state: nothing worth sharding).
        self.sharded = ["unet", *(n for n in ("text_encoder", "text_encoder_2") if trained(cfg, n))]
        self.fsdp = cfg.train.parallelism == "fsdp2" and dist.distributed
        encoder_units = [getattr(model, n) for n in self.sharded[1:]]
        if self.fsdp:
            parallel.apply_fsdp2(
                model.unet,
                param_dtype=self.amp_dtype,
                reduce_dtype=torch.float32,
                extra_modules=encoder_units,
            )
        elif dist.distributed:
            # No static_graph: with no_sync accumulation micro-steps it trips an internal reducer
            # assert (torch 2.13, "expect_autograd_hooks_"), seen in tests/test_train_fsdp.py.
            self.net = parallel.wrap_ddp(self.denoiser, device, static_graph=False)
        self.fsdp_roots = [model.unet, *encoder_units] if self.fsdp else []
        self.trainable = [p for p in self.denoiser.parameters() if p.requires_grad]
        self.objective = Objective(objective_config(cfg))

    def grad_sync(self, enabled: bool):
        """Reduce gradients on this backward (the last micro-step) or accumulate locally."""
        if self.fsdp:
            parallel.set_gradient_sync(self.fsdp_roots, enabled)
        elif self.dist.distributed and not enabled:
            return self.net.no_sync()
        return contextlib.nullcontext()

    def build_optimizer(self) -> None:
        """`train.optimizer` with one param group per model part, the fp16 loss scaler, and how the
        update is applied (`self.update`: whole step, per parameter with stochastic rounding for bf16
        weights, or fused into backward; bigasp.train.lean)."""
        self.update = lean.build_update(self.cfg, self.model, self.device, step_index=lambda: self.state.step)
        self.optimizer, self.scaler = self.update.optimizer, self.update.scaler

    def build_ema(self) -> None:
        """The EMA of the trained parameters (rank 0 only; `[ema] enabled`)."""
        e = self.cfg.ema
        self.ema: EMA | None = None
        if not e.enabled:
            return
        if self.fsdp:
            raise ConfigError(
                "ema.enabled is not supported with train.parallelism = 'fsdp2' on several processes; use 'ddp'"
            )
        if not self.dist.is_main:
            return
        params = {
            f"{comp}.{name}": p
            for comp in ("unet", "text_encoder", "text_encoder_2")
            for name, p in getattr(self.model, comp).named_parameters()
            if p.requires_grad
        }
        device = torch.device("cpu") if e.cpu else self.device
        self.ema = EMA(params, decay=e.decay, dtype=DTYPES[e.dtype], device=device)

    def update_ema(self) -> None:
        e, st = self.cfg.ema, self.state
        if self.ema is not None and st.samples_seen >= e.start and (e.every == 0 or self.crossed(e.every)):
            self.ema.update()

    def build_data(self, dataset, saved: dict[str, Any] | None) -> None:
        """The dataset, its train/validation split and this rank's planned loader."""
        cfg = self.cfg
        threshold = saved["trainer"].get("split_threshold") if saved else None
        # A run that started streaming keeps streaming semantics (rows in the order taken in) for life.
        streaming = bool(saved["trainer"]["loader"][0].get("stream")) if saved else cfg.data.stream
        if saved and cfg.data.stream and not streaming:
            log.warning("data.stream is ignored: the resumed run did not start streaming")
        if dataset is None:
            from bigasp.train.data import open_dataset

            dataset = open_dataset(cfg.data, streaming=streaming)
            if not streaming:
                preflight.check_dataset(dataset, self.model, cfg)
        if saved:
            from bigasp.store.multi import check_resumed_names

            check_resumed_names(saved["trainer"].get("datasets"), dataset)
        self.dataset = dataset
        if streaming:
            self.loader = StreamingLoader(
                dataset, cfg.data, rank=self.rank, world_size=self.world, seed=self.seed,
                device_batch_size=cfg.data.device_batch_size, threshold=threshold,
                check=lambda shards: preflight.check_dataset(dataset, self.model, cfg, shards=shards),
            )  # fmt: skip
            return
        # A resumed run keeps its split cutoff: images added since are assigned by it, old ones keep their side.
        split = split_dataset(dataset, cfg.data, seed=self.seed, threshold=threshold)
        self.loader = TrainLoader(
            dataset, cfg.data, rank=self.rank, world_size=self.world, seed=self.seed,
            device_batch_size=cfg.data.device_batch_size, split=split,
        )  # fmt: skip

    @property
    def split(self):
        """Validation / stable / train rows (a streaming run's grow as images are taken in)."""
        return self.loader.split

    def build_logging(self) -> None:
        """Metric sinks, the optional batch log, the FLOP counter."""
        cfg, st = self.cfg, self.state
        self.tracker = Tracker(
            self.run_dir,
            enabled=self.dist.is_main,
            config=cfg.model_dump(mode="json"),
            wandb_project=cfg.logging.wandb_project,
            wandb_mode=cfg.logging.wandb_mode,
            wandb_name=cfg.logging.wandb_name,
            tensorboard=cfg.logging.tensorboard,
            resume_samples=st.samples_seen if self.restored else None,
        )
        self.batch_log = None
        if cfg.logging.batch_log:
            path = self.run_dir / f"batches.rank{self.rank}.jsonl"
            if self.restored:
                truncate_jsonl(path, st.samples_seen, inclusive=False)
            elif path.exists():
                path.unlink()
            self.batch_log = path.open("a", encoding="utf-8")
        model = self.model
        self.flops = (
            TrainFlops(model.unet, model.text_encoder, model.text_encoder_2) if cfg.logging.flops else None
        )
        self.loss_labels = {"val/loss": " (plain MSE)", "stable/loss": f" ({stable_loss_label(cfg)})"}
        self.window = new_window()

    # ---- restore --------------------------------------------------------------------------------

    def restore(self, ckpt_path: Path, saved: dict[str, Any]) -> None:
        """Optimizer, scaler, counters, loader position and RNGs from a checkpoint."""
        t, optimizer, scaler, rank = self.cfg.train, self.optimizer, self.scaler, self.rank
        peak_lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
        saved_groups = [g.get("name") for g in saved["optimizer"]["param_groups"]]
        if saved_groups != list(peak_lrs):
            raise BigaspError(
                f"{ckpt_path} trained {saved_groups} but this config trains {list(peak_lrs)}; keep "
                "model.train_text_encoder / train_text_encoder_2 as they were to resume, or start a new run "
                "from the checkpoint's model/ folder (model.source) to change what trains"
            )
        try:
            if self.fsdp:
                parallel.load_full_optimizer_state(
                    self.denoiser, optimizer, parallel.fqn_keyed(self.denoiser, optimizer, saved["optimizer"])
                )
            else:
                load_optimizer_state(
                    optimizer, parallel.id_optimizer_state(self.denoiser, optimizer, saved["optimizer"])
                )
        except (KeyError, ValueError, RuntimeError) as err:
            raise ckpt_io.CheckpointError(
                f"{ckpt_path}/state/optimizer.*: cannot be loaded ({err})"
            ) from None
        ckpt_io.check_optimizer_state(optimizer, ckpt_path / "state" / "optimizer.safetensors")
        for g in optimizer.param_groups:  # the config's lr wins over the saved one (lr changes on resume)
            g["initial_lr"] = peak_lrs[g["name"]]
        st = saved["trainer"]
        if st.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(st["scaler"])  # scale and growth tracker carry over
            scaler.set_growth_interval(t.growth_interval())  # the config's interval wins, as its lr does
        self.state = TrainState(
            samples_seen=int(st["samples_seen"]),
            step=int(st["step"]),
            skipped=int(st["skipped_steps"]),
            consecutive=int(st["consecutive_skips"]),
            validation=st.get("validation", []),
        )
        if self.ema is not None:
            updates = int(st.get("ema", {}).get("updates", 0))
            if updates and not (ckpt_path / EMA_DIR).is_dir():
                raise ckpt_io.CheckpointError(
                    f"{ckpt_path}: trainer.json counts EMA updates but {EMA_DIR}/ is missing"
                )
            if "ema" not in st:
                log.warning("%s has no EMA: the average starts now (ema.enabled was off)", ckpt_path)
            self.ema.load_folder(ckpt_path / EMA_DIR, updates)
        loaders = st["loader"]
        self.loader.load_state_dict(loaders[rank] if len(loaders) == self.world else loaders[0])
        # All training randomness is keyed, so these only matter to third-party code using torch's RNG.
        if f"rank{rank}.torch_cpu" in saved["rng"]:
            torch.set_rng_state(saved["rng"][f"rank{rank}.torch_cpu"])
        if self.device.type == "cuda" and f"rank{rank}.torch_cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"][f"rank{rank}.torch_cuda"], self.device)
        if st.get("batch_size") != self.batch_size:
            log.warning("batch_size changed %s -> %s on resume", st.get("batch_size"), self.batch_size)
        log.info(
            "resumed from %s at %d samples (step %d)", ckpt_path, self.state.samples_seen, self.state.step
        )

    # ---- run ------------------------------------------------------------------------------------

    def run(self, *, stop_at: int | None) -> TrainResult:
        """The loop: step, log, then validate / checkpoint / stop at their sample boundaries."""
        cfg, t, st, result = self.cfg, self.cfg.train, self.state, self.result
        stop = StopFlag(cfg.checkpoint.on_signal)
        if not self.restored and cfg.validation.at_start and cfg.validation.every:
            self.validate()
        self.loader.stop_check = lambda: stop.set  # a streaming run may wait for the encoder: stop there too
        self.batches = iter(self.loader)
        self.last_saved_at = st.samples_seen if self.restored else -1
        try:
            while st.samples_seen < t.max_samples:
                step_start = time.perf_counter()
                try:
                    outcome = self.train_step(stop)
                except StreamStopped:  # signalled while waiting for the encoder, before this step began
                    if cfg.checkpoint.on_signal and self.last_saved_at != st.samples_seen:
                        result.last_checkpoint = self.save("signal")
                    result.stopped_by_signal, result.stop_signal = True, stop.signum
                    log.warning(
                        "stopped by signal at %d samples (while waiting for the encoder)", st.samples_seen
                    )
                    break
                self.update_ema()
                self.log_step(outcome, time.perf_counter() - step_start)
                if self.batch_log is not None:
                    self.batch_log.flush()
                if self.crossed(cfg.validation.every):
                    self.validate()
                sliced = stop_at is not None and stop_at <= st.samples_seen < t.max_samples
                due = self.crossed(cfg.checkpoint.every)
                if due or (outcome.stop_now and cfg.checkpoint.on_signal) or sliced:
                    reason = "interval" if due else "signal" if outcome.stop_now else "stop_at"
                    result.last_checkpoint = self.save(reason)
                    self.last_saved_at = st.samples_seen
                if outcome.stop_now:
                    result.stopped_by_signal = True
                    result.stop_signal = stop.signum
                    log.warning("stopped by signal at %d samples", st.samples_seen)
                    break
                if sliced:
                    log.info("reached stop_at=%d samples; resume with --resume auto", stop_at)
                    break
            if (
                st.samples_seen >= t.max_samples
                and cfg.checkpoint.at_end
                and self.last_saved_at != st.samples_seen
            ):
                result.last_checkpoint = self.save("end")
        finally:
            self.batches.close()  # shut down and reap the loader's workers now, also on an error
            stop.restore()
            self.tracker.close()
            if self.batch_log is not None:
                self.batch_log.close()
        return result

    def crossed(self, every: int) -> bool:
        """Whether the last step crossed a multiple of `every` samples (0 = never)."""
        now, bs = self.state.samples_seen, self.batch_size
        return bool(every) and now // every != (now - bs) // every

    def next_batch(self, micro: int):
        self.loader.interruptible = micro == 0  # only between steps is a stop while waiting safe to save
        try:
            # torch's loader draws worker seeds from the global RNG when an epoch's iterator starts;
            # forked, so that RNG serves the model alone (adapter dropout) and resumes exactly
            with torch.random.fork_rng(devices=[]):
                return next(self.batches)
        except BigaspError:  # a bad shard or record: keep the finished steps if that is safe
            seen = self.state.samples_seen
            if micro == 0 and not self.dist.distributed and 0 < seen != self.last_saved_at:
                self.result.last_checkpoint = self.save("data_error")
            raise

    def noise_keys(self, epoch: int, rows: list[int], copies: torch.Tensor | None) -> list[tuple]:
        """Per sample: the key of its noise and timestep. A repeated image's later copies in an epoch
        ([data.mix]) add their copy number, so each copy trains at its own timestep."""
        if copies is None:
            return [(self.seed, "noise", epoch, r) for r in rows]
        return [
            (self.seed, "noise", epoch, r, *((c,) if c else ()))
            for r, c in zip(rows, copies.tolist(), strict=True)
        ]

    def train_step(self, stop: StopFlag) -> StepOutcome:
        """One optimizer step: lr, accumulation micro-steps, unscale/clip, step or skip."""
        t, st = self.cfg.train, self.state
        optimizer, update, objective = self.optimizer, self.update, self.objective
        set_lr(
            optimizer,
            lr_multiplier(
                st.samples_seen + self.batch_size,
                warmup_samples=t.warmup_samples,
                total_samples=t.max_samples,
                schedule=t.lr_schedule,
                min_ratio=t.min_lr_ratio,
            ),
        )
        # stats: weighted loss, mse, micro-batches, non-finite, tokens padded, tokens used, flops,
        # stop requested. Kept on the device: one host sync per optimizer step, not per micro-step.
        stats = torch.zeros(8, dtype=torch.float64, device=self.device)
        for micro in range(self.accumulation):
            host_batch = self.next_batch(micro)
            rows = host_batch.indices.tolist()  # from the host copy: no device sync
            batch = host_batch.to(self.device, non_blocking=True)
            if self.batch_log is not None:
                self.batch_log.write(json.dumps({
                    "samples": st.samples_seen, "step": st.step, "micro": micro, "epoch": batch.epoch,
                    "position": batch.position, "rows": rows, "prompts": batch.prompts,
                }) + "\n")  # fmt: skip
            keys = self.noise_keys(batch.epoch, rows, host_batch.copies)
            prep = objective.sample_batch(batch.latents, keys)
            time_ids = time_ids_from(batch.original_size, batch.crop, batch.target_size)
            with self.grad_sync(micro == self.accumulation - 1):
                with self.autocast():
                    pred = self.net(prep.x_t, prep.timesteps, batch.te1_ids, batch.te2_ids, time_ids)
                loss, mse, _ = objective.loss(pred, prep)
                update.backward(loss / self.accumulation)
            stats[0] += loss.detach().double()
            stats[1] += mse.detach().double()
            stats[2] += 1
            stats[3] += (~torch.isfinite(loss)).double()
            stats[4] += batch.te2_ids.numel()
            stats[5] += (batch.te2_ids != TE2_PAD).sum()
            if self.flops is not None:
                stats[6] += self.flops.per_batch(batch)
        # Gradients are synced now; unscale (fp16), clip, and skip the step if anything is non-finite.
        grad_norm = update.grad_norm()
        stats[3] += (~torch.isfinite(grad_norm)).double()
        stats[7] = float(stop.set)
        all_reduce_sum(stats)
        stats = stats.cpu()
        if stats[3].item() == 0:
            update.step()
            st.consecutive = 0
        else:
            update.skip()
            st.skipped += 1
            st.consecutive += 1
            log.warning(
                "step %d: non-finite loss or gradient (grad norm %s); step skipped (%d in a row, %d total)",
                st.step, float(grad_norm), st.consecutive, st.skipped,
            )  # fmt: skip
        update.finish()
        st.step += 1
        st.samples_seen += self.batch_size
        self.result.samples_seen, self.result.step, self.result.skipped_steps = (
            st.samples_seen,
            st.step,
            st.skipped,
        )
        if st.consecutive >= t.max_consecutive_skips:
            self.tracker.log({"train/skipped_steps": st.skipped}, samples=st.samples_seen, step=st.step)
            raise TrainingDiverged(
                f"{st.consecutive} consecutive steps had a non-finite loss or gradient (last at step {st.step}, "
                f"{st.samples_seen} samples); training stopped without saving. Resume from the last "
                "checkpoint with a lower train.lr, train.precision='bf16', or a higher "
                "train.max_consecutive_skips if fp16 loss-scale warm-up needs it."
            )
        return StepOutcome(stats=stats, grad_norm=grad_norm, stop_now=stats[7].item() > 0)

    # ---- log ------------------------------------------------------------------------------------

    def log_step(self, outcome: StepOutcome, step_time: float) -> None:
        """Accumulate the step into the window; every `logging.every` samples, emit metrics and a line."""
        cfg, t, st, window = self.cfg, self.cfg.train, self.state, self.window
        world, scaler = self.world, self.scaler
        window["stats"] += outcome.stats
        window["samples"] += self.batch_size
        window["step_time"] += step_time
        if not (self.crossed(cfg.logging.every) or st.samples_seen >= t.max_samples):
            return
        s = window["stats"]
        elapsed = window["step_time"]
        sps = window["samples"] / elapsed if elapsed > 0 else float("nan")
        micro_n = max(float(s[2]), 1.0)
        metrics = {
            "train/loss": float(s[0]) / micro_n,
            "train/mse": float(s[1]) / micro_n,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/grad_norm": float(outcome.grad_norm),
            "train/skipped_steps": st.skipped,
            "perf/samples_per_s": sps,
            "perf/samples_per_s_per_gpu": sps / world,
            "perf/tokens_padded": float(s[4]),
            "perf/tokens_used": float(s[5]),
            "perf/token_efficiency": float(s[5]) / max(float(s[4]), 1.0),
            "epoch": self.loader.epoch,
        }
        if scaler.is_enabled():
            metrics["train/loss_scale"] = float(scaler.get_scale())
        if self.flops is not None and elapsed > 0:
            metrics["perf/tflops_per_gpu"] = float(s[6]) / elapsed / world / 1e12
            metrics["perf/model_tflop_per_sample"] = float(s[6]) / max(window["samples"], 1) / 1e12
        self.tracker.log(metrics, samples=st.samples_seen, step=st.step)
        if self.dist.is_main:
            eta = (t.max_samples - st.samples_seen) / sps if sps > 0 else float("inf")
            line = (
                f"samples {st.samples_seen:,}/{t.max_samples:,} ({100 * st.samples_seen / t.max_samples:.1f}%)"
                f" | step {st.step} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.3g}"
                f" | {sps:,.1f} samples/s | ETA {format_duration(eta)}"
            )
            if "perf/tflops_per_gpu" in metrics:
                line += f" | {metrics['perf/tflops_per_gpu']:.3g} TFLOP/s/GPU"
            log.info(line)
        self.window = new_window()

    # ---- validate -------------------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        """Held-out and stable train loss with fixed noise and stratified t (every rank takes part)."""
        cfg, st, denoiser, dataset = self.cfg, self.state, self.denoiser, self.dataset
        rank, world, seed, device = self.rank, self.world, self.seed, self.device
        denoiser.eval()
        vb = cfg.validation.device_batch_size or cfg.data.device_batch_size
        sets = [("val", self.split.validation)] + (
            [("stable", self.split.stable)] if cfg.validation.stable else []
        )
        out: dict[str, Any] = {}
        start = time.perf_counter()
        for name, rows in sets:
            if isinstance(self.loader, StreamingLoader):  # the sets grow as images are taken in
                out[f"{name}/images"] = len(rows)
            if len(rows) == 0:
                continue
            batches = eval_batches(
                dataset, rows, cfg.data, rank=rank, world_size=world, device_batch_size=vb, seed=seed
            )
            filler: list = []
            if self.fsdp:  # every rank must run the same number of forwards (each one all-gathers weights)
                batches = list(batches)
                most = int(all_reduce_max(torch.tensor([len(batches)], device=device)).item())
                if len(batches) < most:
                    first = next(iter(eval_batches(
                        dataset, rows, cfg.data, rank=0, world_size=world, device_batch_size=vb, seed=seed
                    )))  # fmt: skip
                    filler = [first] * (most - len(batches))
            out.update(
                evaluate(
                    denoiser, self.objective, batches, indices=rows, name=name, seed=seed, device=device,
                    autocast=self.autocast, t_bins=cfg.validation.t_bins, filler=filler,
                    weighted=name == "stable" and cfg.validation.stable_loss == "weighted",
                )
            )  # fmt: skip
        denoiser.unet.train()
        for name, trains in (
            ("text_encoder", cfg.model.train_text_encoder),
            ("text_encoder_2", cfg.model.train_text_encoder_2),
        ):
            getattr(denoiser, name).train(trains)
        out["val/seconds"] = time.perf_counter() - start
        self.tracker.log(out, samples=st.samples_seen, step=st.step)
        if self.dist.is_main:
            log.info(
                "validation at %d samples: %s",
                st.samples_seen,
                ", ".join(
                    f"{k}{self.loss_labels.get(k, '')} {v:.5f}" for k, v in out.items() if k.endswith("/loss")
                )
                or "no held-out image taken in yet (streaming)",
            )
        st.validation.append(
            {"samples": st.samples_seen, **{k: v for k, v in out.items() if k.endswith("/loss")}}
        )
        self.result.validation.append({"samples": st.samples_seen, **out})
        return out

    # ---- save -----------------------------------------------------------------------------------

    def trainer_state(self, loader_states: list[Any]) -> dict[str, Any]:
        """state/trainer.json: counters, every rank's loader position, the run's shape."""
        st = self.state
        return {
            "samples_seen": st.samples_seen,
            "step": st.step,
            "skipped_steps": st.skipped,
            "consecutive_skips": st.consecutive,
            "loader": loader_states,
            "world_size": self.world,
            "parallelism": "fsdp2" if self.fsdp else "ddp",
            "batch_size": self.batch_size,
            "accumulation": self.accumulation,
            "validation": st.validation,
            "split_threshold": self.split.threshold,
            **({"datasets": list(self.dataset.names)} if hasattr(self.dataset, "names") else {}),
            **({"ema": {"updates": self.ema.updates}} if self.ema is not None else {}),
        }

    def model_to_save(self) -> tuple[SDXL, dict[str, Any] | None]:
        """The full model and optimizer state on rank 0 (collectives under FSDP2: call on every rank)."""
        model, dist = self.model, self.dist
        to_save, opt_state = model, None
        if self.fsdp:  # collectives: every rank gathers, rank 0 receives the full (unsharded) state
            full = {n: parallel.full_state_dict(getattr(model, n)) for n in self.sharded}
            opt_state = parallel.full_optimizer_state(self.denoiser, self.optimizer)
            if dist.is_main:
                to_save = replace(
                    model, **{n: parallel.unsharded_copy(getattr(model, n), full[n]) for n in full}
                )
        elif dist.is_main:
            opt_state = parallel.fqn_optimizer_state(self.denoiser, self.optimizer)
        if dist.is_main and self.cfg.model.save_dtype is not None:  # trained parts in model.save_dtype
            copies = {n: lean.saved_copy(getattr(to_save, n), self.cfg) for n in self.sharded}
            to_save = replace(to_save, **{n: c for n, c in copies.items() if c is not None})
        if dist.is_main and self.frozen_originals:  # frozen parts exactly as loaded, never rounded
            to_save = replace(
                to_save,
                **{
                    n: parallel.unsharded_copy(getattr(model, n), sd)
                    for n, sd in self.frozen_originals.items()
                },
            )
        return to_save, opt_state

    def write_models(self, to_save: SDXL, folder: Path) -> None:
        """The checkpoint's model/ folder and, with EMA, a sibling ema/ folder: a complete model too.
        With an adapter: the adapter's folders (its weights, settings, base identity, files to share)."""
        if self.cfg.model.adapter is not None:
            cfg, identity = self.cfg, self.base_identity
            assert identity is not None, "the base identity is read on the rank that saves"
            adapters.write_folder(folder, to_save, cfg, identity, adapters.trainable_state(to_save))
            if self.ema is not None and self.ema.updates > 0:
                ema_state = adapters.split_flat(self.ema.shadow)
                adapters.write_folder(folder.parent / EMA_DIR, to_save, cfg, identity, ema_state)
            return
        save_diffusers_folder(to_save, folder)
        if self.ema is not None and self.ema.updates > 0:
            averaged = {
                c: parallel.unsharded_copy(
                    getattr(to_save, c), self.ema.component_state(c, getattr(to_save, c).state_dict())
                )
                for c in self.ema.components()
            }
            frozen = {c: None for c in to_save.modules() if c not in averaged}
            ema_dir = save_diffusers_folder(replace(to_save, **averaged, **frozen), folder.parent / EMA_DIR)
            ckpt_io.link_components(folder, ema_dir, list(frozen))  # frozen parts: the same files

    def save(self, reason: str) -> Path | None:
        """Write a checkpoint (rank 0) after gathering every rank's loader and RNG state."""
        cfg, st = self.cfg, self.state
        loader_states = all_gather_objects(self.loader.state_dict())
        rngs = all_gather_objects(ckpt_io.rng_tensors())
        to_save, opt_state = self.model_to_save()
        path = None
        if self.dist.is_main:
            path = ckpt_io.save_checkpoint(
                self.run_dir,
                samples_seen=st.samples_seen,
                step=st.step,
                write_model=lambda folder: self.write_models(to_save, folder),
                optimizer_state=opt_state,
                scaler_state=ckpt_io.scaler_to_json(self.scaler) if self.scaler.is_enabled() else None,
                trainer_state=self.trainer_state(loader_states),
                rng_states=rngs,  # type: ignore[arg-type]
                config_toml=dump_toml(cfg.model_dump(mode="json")),
                extra_meta={"reason": reason, "objective": cfg.train.objective, "world_size": self.world},
            )
            ckpt_io.apply_retention(
                self.run_dir, keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every
            )
            log.info("saved checkpoint %s (%s)", path, reason)
        barrier()
        return path
