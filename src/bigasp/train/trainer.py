"""The training loop of `bigasp train`, readable top to bottom.

    setup:  processes -> model (trainable / frozen parts) -> optimizer + scaler -> data -> resume
    loop:   lr(samples) -> accumulation micro-steps (DDP syncs only on the last) -> unscale, clip,
            skip if non-finite -> optimizer step -> log / validate / checkpoint / stop on signal

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
from bigasp.train import checkpoint as ckpt_io
from bigasp.train import parallel, preflight
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
from bigasp.train.objectives import Objective, ObjectiveConfig
from bigasp.train.optim import build_optimizer, set_lr
from bigasp.train.schedule import lr_multiplier
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
        self._old: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
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
    # ---- processes, devices, numerics ------------------------------------------------------
    dist: DistInfo = init_distributed(cfg.train.device)
    device, rank, world = dist.device, dist.rank, dist.world_size
    accumulation = resolve_accumulation(cfg, world)
    batch_size = cfg.train.batch_size
    seed = cfg.data.seed
    run_dir = Path(cfg.run_dir)
    if cfg.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = None if cfg.train.precision == "fp32" else DTYPES[cfg.train.precision]

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # ---- where to start -------------------------------------------------------------------
    ckpt_path = broadcast_object(ckpt_io.resolve_resume(resume, run_dir) if dist.is_main else None)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_stale_temps(run_dir)
        (run_dir / "config.toml").write_text(dump_toml(cfg.model_dump(mode="json")))
    saved = ckpt_io.load_state(ckpt_path) if ckpt_path is not None else None

    # ---- model ------------------------------------------------------------------------------
    kind = cfg.model_kind()
    components = ("unet", "text_encoder", "text_encoder_2", *(("vae",) if cfg.model.save_vae else ()))
    source = str(ckpt_path / "model") if ckpt_path is not None else cfg.model.source
    model = load_model(source, components, kind=kind, preset=cfg.model.preset, seed=cfg.model.init_seed)
    frozen_originals = configure_model(model, cfg, device, keep_originals=dist.is_main)
    denoiser = Denoiser(model.unet, model.text_encoder, model.text_encoder_2)
    net: torch.nn.Module = denoiser
    # FSDP2 roots: the UNet (one unit per block) and each trained text encoder. Frozen encoders
    # stay replicated (no grads, no optimizer state: nothing worth sharding).
    sharded = ["unet", *(n for n in ("text_encoder", "text_encoder_2") if trained(cfg, n))]
    fsdp = cfg.train.parallelism == "fsdp2" and dist.distributed
    encoder_units = [getattr(model, n) for n in sharded[1:]]
    if fsdp:
        parallel.apply_fsdp2(
            model.unet, param_dtype=amp_dtype, reduce_dtype=torch.float32, extra_modules=encoder_units
        )
    elif dist.distributed:
        # No static_graph: with no_sync accumulation micro-steps it trips an internal reducer
        # assert (torch 2.13, "expect_autograd_hooks_"), seen in tests/test_train_fsdp.py.
        net = parallel.wrap_ddp(denoiser, device, static_graph=False)
    fsdp_roots = [model.unet, *encoder_units] if fsdp else []

    def grad_sync(enabled: bool):
        """Reduce gradients on this backward (the last micro-step) or accumulate locally."""
        if fsdp:
            parallel.set_gradient_sync(fsdp_roots, enabled)
        elif dist.distributed and not enabled:
            return net.no_sync()
        return contextlib.nullcontext()

    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    objective = Objective(objective_config(cfg))

    # ---- optimizer and loss scaler ---------------------------------------------------------
    t = cfg.train
    optimizer = build_optimizer(
        [
            ("unet", list(model.unet.parameters()), t.lr),
            ("text_encoder", list(model.text_encoder.parameters()), t.text_encoder_lr or t.lr),
            ("text_encoder_2", list(model.text_encoder_2.parameters()), t.text_encoder_2_lr or t.lr),
        ],
        betas=t.betas,
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
    )
    scaler = torch.amp.GradScaler(
        device.type,
        init_scale=t.grad_scaler_init,
        growth_interval=t.growth_interval(),
        enabled=t.precision == "fp16",
    )

    # ---- data -------------------------------------------------------------------------------
    if dataset is None:
        from bigasp.train.data import open_dataset

        dataset = open_dataset(cfg.data)
        preflight.check_dataset(dataset, model, cfg)
    # A resumed run keeps its split cutoff: images added since are assigned by it, old ones keep their side.
    split = split_dataset(
        dataset, cfg.data, seed=seed, threshold=saved["trainer"].get("split_threshold") if saved else None
    )
    loader = TrainLoader(
        dataset, cfg.data, rank=rank, world_size=world, seed=seed,
        device_batch_size=cfg.data.device_batch_size, split=split,
    )  # fmt: skip

    # ---- resume -----------------------------------------------------------------------------
    samples_seen, step, skipped, consecutive = 0, 0, 0, 0
    val_history: list[dict[str, Any]] = []
    if saved is not None:
        peak_lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
        saved_groups = [g.get("name") for g in saved["optimizer"]["param_groups"]]
        if saved_groups != list(peak_lrs):
            raise BigaspError(
                f"{ckpt_path} trained {saved_groups} but this config trains {list(peak_lrs)}; keep "
                "model.train_text_encoder / train_text_encoder_2 as they were to resume, or start a new run "
                "from the checkpoint's model/ folder (model.source) to change what trains"
            )
        try:
            if fsdp:
                parallel.load_full_optimizer_state(
                    denoiser, optimizer, parallel.fqn_keyed(denoiser, optimizer, saved["optimizer"])
                )
            else:
                optimizer.load_state_dict(
                    parallel.id_optimizer_state(denoiser, optimizer, saved["optimizer"])
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
        samples_seen, step = int(st["samples_seen"]), int(st["step"])
        skipped, consecutive = int(st["skipped_steps"]), int(st["consecutive_skips"])
        val_history = st.get("validation", [])
        loaders = st["loader"]
        loader.load_state_dict(loaders[rank] if len(loaders) == world else loaders[0])
        # All training randomness is keyed, so these only matter to third-party code using torch's RNG.
        if f"rank{rank}.torch_cpu" in saved["rng"]:
            torch.set_rng_state(saved["rng"][f"rank{rank}.torch_cpu"])
        if device.type == "cuda" and f"rank{rank}.torch_cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"][f"rank{rank}.torch_cuda"], device)
        if st.get("batch_size") != batch_size:
            log.warning("batch_size changed %s -> %s on resume", st.get("batch_size"), batch_size)
        log.info("resumed from %s at %d samples (step %d)", ckpt_path, samples_seen, step)

    tracker = Tracker(
        run_dir,
        enabled=dist.is_main,
        config=cfg.model_dump(mode="json"),
        wandb_project=cfg.logging.wandb_project,
        wandb_mode=cfg.logging.wandb_mode,
        wandb_name=cfg.logging.wandb_name,
        tensorboard=cfg.logging.tensorboard,
        resume_samples=samples_seen if saved is not None else None,
    )
    batch_log = None
    if cfg.logging.batch_log:
        path = run_dir / f"batches.rank{rank}.jsonl"
        if saved is not None:
            truncate_jsonl(path, samples_seen, inclusive=False)
        elif path.exists():
            path.unlink()
        batch_log = path.open("a", encoding="utf-8")
    flops = TrainFlops(model.unet, model.text_encoder, model.text_encoder_2) if cfg.logging.flops else None

    result = TrainResult(samples_seen, step, skipped)

    # ---- validation and checkpoint closures -----------------------------------------------------
    loss_labels = {"val/loss": " (plain MSE)", "stable/loss": f" ({stable_loss_label(cfg)})"}

    def run_validation() -> dict[str, Any]:
        denoiser.eval()
        vb = cfg.validation.device_batch_size or cfg.data.device_batch_size
        sets = [("val", split.validation)] + ([("stable", split.stable)] if cfg.validation.stable else [])
        out: dict[str, Any] = {}
        start = time.perf_counter()
        for name, rows in sets:
            if len(rows) == 0:
                continue
            batches = eval_batches(
                dataset, rows, cfg.data, rank=rank, world_size=world, device_batch_size=vb, seed=seed
            )
            filler: list = []
            if fsdp:  # every rank must run the same number of forwards (each one all-gathers weights)
                batches = list(batches)
                most = int(all_reduce_max(torch.tensor([len(batches)], device=device)).item())
                if len(batches) < most:
                    first = next(iter(eval_batches(
                        dataset, rows, cfg.data, rank=0, world_size=world, device_batch_size=vb, seed=seed
                    )))  # fmt: skip
                    filler = [first] * (most - len(batches))
            out.update(
                evaluate(
                    denoiser, objective, batches, indices=rows, name=name, seed=seed, device=device,
                    autocast=autocast, t_bins=cfg.validation.t_bins, filler=filler,
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
        tracker.log(out, samples=samples_seen, step=step)
        if dist.is_main:
            log.info(
                "validation at %d samples: %s",
                samples_seen,
                ", ".join(
                    f"{k}{loss_labels.get(k, '')} {v:.5f}" for k, v in out.items() if k.endswith("/loss")
                ),
            )
        val_history.append({"samples": samples_seen, **{k: v for k, v in out.items() if k.endswith("/loss")}})
        result.validation.append({"samples": samples_seen, **out})
        return out

    def save(reason: str) -> Path | None:
        loader_states = all_gather_objects(loader.state_dict())
        rngs = all_gather_objects(ckpt_io.rng_tensors())
        to_save, opt_state = model, None
        if fsdp:  # collectives: every rank gathers, rank 0 receives the full (unsharded) state
            full = {n: parallel.full_state_dict(getattr(model, n)) for n in sharded}
            opt_state = parallel.full_optimizer_state(denoiser, optimizer)
            if dist.is_main:
                to_save = replace(
                    model, **{n: parallel.unsharded_copy(getattr(model, n), full[n]) for n in full}
                )
        elif dist.is_main:
            opt_state = parallel.fqn_optimizer_state(denoiser, optimizer)
        if dist.is_main and frozen_originals:  # frozen parts exactly as loaded, never rounded
            to_save = replace(
                to_save,
                **{n: parallel.unsharded_copy(getattr(model, n), sd) for n, sd in frozen_originals.items()},
            )
        path = None
        if dist.is_main:
            path = ckpt_io.save_checkpoint(
                run_dir,
                samples_seen=samples_seen,
                step=step,
                write_model=lambda folder: save_diffusers_folder(to_save, folder),
                optimizer_state=opt_state,
                scaler_state=ckpt_io.scaler_to_json(scaler) if scaler.is_enabled() else None,
                trainer_state={
                    "samples_seen": samples_seen,
                    "step": step,
                    "skipped_steps": skipped,
                    "consecutive_skips": consecutive,
                    "loader": loader_states,
                    "world_size": world,
                    "parallelism": "fsdp2" if fsdp else "ddp",
                    "batch_size": batch_size,
                    "accumulation": accumulation,
                    "validation": val_history,
                    "split_threshold": split.threshold,
                },
                rng_states=rngs,  # type: ignore[arg-type]
                config_toml=dump_toml(cfg.model_dump(mode="json")),
                extra_meta={"reason": reason, "objective": cfg.train.objective, "world_size": world},
            )
            ckpt_io.apply_retention(
                run_dir, keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every
            )
            log.info("saved checkpoint %s (%s)", path, reason)
        barrier()
        return path

    # ---- the loop -------------------------------------------------------------------------------
    stop = StopFlag(cfg.checkpoint.on_signal)
    if saved is None and cfg.validation.at_start and cfg.validation.every:
        run_validation()
    batches = iter(loader)
    window = new_window()
    last_saved_at = samples_seen if saved is not None else -1
    try:
        while samples_seen < t.max_samples:
            step_start = time.perf_counter()
            lr_mult = lr_multiplier(
                samples_seen + batch_size,
                warmup_samples=t.warmup_samples,
                total_samples=t.max_samples,
                schedule=t.lr_schedule,
                min_ratio=t.min_lr_ratio,
            )
            set_lr(optimizer, lr_mult)
            # stats: weighted loss, mse, micro-batches, non-finite, tokens padded, tokens used, flops,
            # stop requested. Kept on the device: one host sync per optimizer step, not per micro-step.
            stats = torch.zeros(8, dtype=torch.float64, device=device)
            for micro in range(accumulation):
                try:
                    host_batch = next(batches)
                except BigaspError:  # a bad shard or record: keep the finished steps if that is safe
                    if micro == 0 and not dist.distributed and 0 < samples_seen != last_saved_at:
                        result.last_checkpoint = save("data_error")
                    raise
                rows = host_batch.indices.tolist()  # from the host copy: no device sync
                batch = host_batch.to(device, non_blocking=True)
                if batch_log is not None:
                    batch_log.write(json.dumps({
                        "samples": samples_seen, "step": step, "micro": micro, "epoch": batch.epoch,
                        "position": batch.position, "rows": rows, "prompts": batch.prompts,
                    }) + "\n")  # fmt: skip
                keys = [(seed, "noise", batch.epoch, r) for r in rows]
                prep = objective.sample_batch(batch.latents, keys)
                time_ids = time_ids_from(batch.original_size, batch.crop, batch.target_size)
                last = micro == accumulation - 1
                with grad_sync(last):
                    with autocast():
                        pred = net(prep.x_t, prep.timesteps, batch.te1_ids, batch.te2_ids, time_ids)
                    loss, mse, _ = objective.loss(pred, prep)
                    scaler.scale(loss / accumulation).backward()
                stats[0] += loss.detach().double()
                stats[1] += mse.detach().double()
                stats[2] += 1
                stats[3] += (~torch.isfinite(loss)).double()
                stats[4] += batch.te2_ids.numel()
                stats[5] += (batch.te2_ids != TE2_PAD).sum()
                if flops is not None:
                    stats[6] += flops.per_batch(batch)
            # Gradients are synced now; unscale (fp16), clip, and skip the step if anything is non-finite.
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards -> global norm
                grad_norm = grad_norm.full_tensor()
            stats[3] += (~torch.isfinite(grad_norm)).double()
            stats[7] = float(stop.set)
            all_reduce_sum(stats)
            stats = stats.cpu()
            finite = stats[3].item() == 0
            stop_now = stats[7].item() > 0  # any rank got SIGTERM: all stop at this step
            if finite:
                if scaler.is_enabled():
                    scaler.step(optimizer)
                else:
                    optimizer.step()
                consecutive = 0
            else:
                skipped += 1
                consecutive += 1
                log.warning(
                    "step %d: non-finite loss or gradient (grad norm %s); step skipped (%d in a row, %d total)",
                    step, float(grad_norm), consecutive, skipped,
                )  # fmt: skip
            if scaler.is_enabled():
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples_seen += batch_size
            result.samples_seen, result.step, result.skipped_steps = samples_seen, step, skipped
            if consecutive >= t.max_consecutive_skips:
                tracker.log({"train/skipped_steps": skipped}, samples=samples_seen, step=step)
                raise TrainingDiverged(
                    f"{consecutive} consecutive steps had a non-finite loss or gradient (last at step {step}, "
                    f"{samples_seen} samples); training stopped without saving. Resume from the last "
                    "checkpoint with a lower train.lr, train.precision='bf16', or a higher "
                    "train.max_consecutive_skips if fp16 loss-scale warm-up needs it."
                )

            # ---- logging -----------------------------------------------------------------------
            step_time = time.perf_counter() - step_start
            window["stats"] += stats
            window["samples"] += batch_size
            window["step_time"] += step_time
            log_now = samples_seen // cfg.logging.every != (samples_seen - batch_size) // cfg.logging.every
            if log_now or samples_seen >= t.max_samples:
                s = window["stats"]
                elapsed = window["step_time"]
                sps = window["samples"] / elapsed if elapsed > 0 else float("nan")
                micro_n = max(float(s[2]), 1.0)
                metrics = {
                    "train/loss": float(s[0]) / micro_n,
                    "train/mse": float(s[1]) / micro_n,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/grad_norm": float(grad_norm),
                    "train/skipped_steps": skipped,
                    "perf/samples_per_s": sps,
                    "perf/samples_per_s_per_gpu": sps / world,
                    "perf/tokens_padded": float(s[4]),
                    "perf/tokens_used": float(s[5]),
                    "perf/token_efficiency": float(s[5]) / max(float(s[4]), 1.0),
                    "epoch": loader.epoch,
                }
                if scaler.is_enabled():
                    metrics["train/loss_scale"] = float(scaler.get_scale())
                if flops is not None and elapsed > 0:
                    metrics["perf/tflops_per_gpu"] = float(s[6]) / elapsed / world / 1e12
                    metrics["perf/model_tflop_per_sample"] = float(s[6]) / max(window["samples"], 1) / 1e12
                tracker.log(metrics, samples=samples_seen, step=step)
                if dist.is_main:
                    eta = (t.max_samples - samples_seen) / sps if sps > 0 else float("inf")
                    line = (
                        f"samples {samples_seen:,}/{t.max_samples:,} ({100 * samples_seen / t.max_samples:.1f}%)"
                        f" | step {step} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.3g}"
                        f" | {sps:,.1f} samples/s | ETA {format_duration(eta)}"
                    )
                    if "perf/tflops_per_gpu" in metrics:
                        line += f" | {metrics['perf/tflops_per_gpu']:.3g} TFLOP/s/GPU"
                    log.info(line)
                window = new_window()
            if batch_log is not None:
                batch_log.flush()

            # ---- validation, checkpoints, preemption --------------------------------------------------
            v_every = cfg.validation.every
            if v_every and samples_seen // v_every != (samples_seen - batch_size) // v_every:
                run_validation()
            sliced = stop_at is not None and samples_seen >= stop_at and samples_seen < t.max_samples
            c_every = cfg.checkpoint.every
            due = c_every and samples_seen // c_every != (samples_seen - batch_size) // c_every
            if due or (stop_now and cfg.checkpoint.on_signal) or sliced:
                reason = "interval" if due else "signal" if stop_now else "stop_at"
                result.last_checkpoint = save(reason)
                last_saved_at = samples_seen
            if stop_now:
                result.stopped_by_signal = True
                log.warning("stopped by signal at %d samples", samples_seen)
                break
            if sliced:
                log.info("reached stop_at=%d samples; resume with --resume auto", stop_at)
                break
        if samples_seen >= t.max_samples and cfg.checkpoint.at_end and last_saved_at != samples_seen:
            result.last_checkpoint = save("end")
    finally:
        batches.close()  # shut down and reap the loader's workers now, also on an error
        stop.restore()
        tracker.close()
        if batch_log is not None:
            batch_log.close()
    return result
