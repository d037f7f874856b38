"""The run config of `bigasp train`: one TOML file, every key documented here and in docs/training.md.

Defaults are bigASP v2's recipe (eps + min-SNR 5, fp16 AMP with GradScaler 65,536 growing every
500,000 samples, AdamW 1e-4 / wd 0.1, warmup 100k samples then cosine, global batch 2048, 40M
samples, validate every 50k, save every 500k). Every size and interval is in SAMPLES so a recipe
keeps its meaning when the number of GPUs changes.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from bigasp.config import Section
from bigasp.errors import ConfigError
from bigasp.models.components import ModelKind
from bigasp.train.data import DataConfig


class ModelConfig(Section):
    """`[model]`: what to finetune and which parts train."""

    source: str = Field(
        "sdxl-base",
        description="Weights to start from: a local diffusers folder, a single-file SDXL .safetensors, or a "
        "preset name (tiny, sdxl-base = random init from shipped configs). Never downloaded.",
    )
    preset: str | None = Field(
        None, description="Architecture preset of a single file when it cannot be inferred (e.g. sdxl-base)."
    )
    init_seed: int = Field(0, description="Seed for random init when `source` is a preset.")
    train_text_encoder: bool = Field(True, description="Train CLIP ViT-L (text encoder 1); bigASP v2: true.")
    train_text_encoder_2: bool = Field(
        False, description="Train OpenCLIP bigG (text encoder 2); bigASP v2 and v2.5: false."
    )
    text_encoder_layers: int | None = Field(
        None,
        ge=1,
        description="With train_text_encoder: train only the first N transformer layers of TE1; the rest, the "
        "token/position embeddings and the final norm stay frozen. Unset = the whole encoder (bigASP v2). "
        "The v2.5 card plans 'unfreezing the first couple of layers on the encoders'.",
    )
    text_encoder_2_layers: int | None = Field(
        None,
        ge=1,
        description="With train_text_encoder_2: the same for TE2 (its projection also stays frozen).",
    )
    frozen_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Storage dtype of FROZEN text encoders (they run under no_grad; lower precision "
        "saves memory and time). Trained parts always keep fp32 master weights. Checkpoints always "
        "write frozen parts exactly as loaded: when this dtype would round them (bf16 for SDXL's "
        "fp16 encoders) a CPU copy of the originals is kept for saving; fp16 holds SDXL exactly.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in backward (UNet and trained text encoders): ~10x less "
        "activation memory for ~26% more FLOPs (docs/PERFORMANCE.md).",
    )
    trained_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Storage dtype of TRAINED weights (and so of their gradients). fp32 = fp32 master weights "
        "(the cluster recipe). bf16 = no fp32 copy: 2 instead of 4 bytes per weight and per gradient; each "
        "update is computed in fp32 and stochastically rounded to bf16, so updates smaller than bf16's "
        "spacing survive on average. Needs train.precision = 'bf16'. Turns text-encoder training off "
        "unless model.train_text_encoder is set explicitly.",
    )
    save_dtype: Literal["fp32", "bf16"] | None = Field(
        None,
        description="dtype of the trained parts in checkpoints; unset = model.trained_dtype. fp32 with "
        "bf16 training writes the bf16 values exactly (twice the file size, for tools that want fp32); "
        "bf16 needs model.trained_dtype = 'bf16' (rounding fp32 master weights would break exact resume).",
    )
    save_vae: bool = Field(
        True,
        description="Load the VAE (CPU, unused by training) so checkpoints are complete diffusers folders "
        "that `bigasp generate` can open directly.",
    )
    sampling_shift: float | None = Field(
        None,
        gt=0,
        description="Flow shift recorded in the checkpoint's bigasp_model.json as the default for sampling "
        "(ComfyUI ModelSamplingSD3 shift); unset = train.flow_shift, the shift the model trains at. "
        "flow only.",
    )
    adapter: Literal["lora", "locon", "lokr", "loha"] | None = Field(
        None,
        description="Train an adapter instead of the weights (docs/training.md, 'Adapters'): lora, locon (LoRA "
        "on the resnet convs too), lokr (Kronecker product) or loha (Hadamard product), through peft. The "
        "base stays frozen; train_text_encoder / train_text_encoder_2 say which encoders get an adapter. "
        "Checkpoints hold the adapter only, also as one kohya/LyCORIS-layout lora.safetensors. Unset = "
        "full finetune.",
    )
    adapter_rank: int = Field(16, ge=1, description="Adapter rank (kohya network_dim).")
    adapter_alpha: float | None = Field(
        None,
        gt=0,
        description="Adapter alpha (kohya network_alpha): scale alpha / rank; unset = rank (scale 1).",
    )
    adapter_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout inside the adapter: on its input for lora/locon, rank dropout for lokr/loha.",
    )
    adapter_targets: Literal["attention", "attention_ff", "all"] | None = Field(
        None,
        description="Which layers get an adapter. attention: q/k/v/out of every attention; attention_ff: "
        "every linear of the transformer blocks (+ feed-forward, proj_in/out; kohya's LoRA set); all: also "
        "the resnet convs, time embedding projections and down/upsamplers (kohya's LoCon set). Text "
        "encoders: q/k/v/out, + fc1/fc2 unless 'attention'. Unset = 'all' for locon, else attention_ff.",
    )


class TrainConfig(Section):
    """`[train]`: objective, optimisation, precision, run length."""

    objective: Literal["eps", "flow"] = Field(
        "eps", description="eps = SDXL DDPM noise prediction (v2); flow = rectified flow, v target (v2.5)."
    )
    min_snr_gamma: float | None = Field(
        5.0,
        gt=0,
        description="eps only: min-SNR-gamma weight min(SNR, g)/SNR; unset = plain MSE. Ignored by flow.",
    )
    offset_noise: float = Field(0.0, ge=0, description="Offset-noise strength (bigASP: none).")
    flow_timesteps: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="flow only: distribution of t before the shift."
    )
    flow_logit_mean: float = Field(0.0, description="flow only: logit-normal mean (SD3 default 0).")
    flow_logit_std: float = Field(1.0, gt=0, description="flow only: logit-normal std (SD3 default 1).")
    flow_shift: float = Field(
        1.0, gt=0, description="flow only: training timestep shift s t / (1 + (s-1) t); 1 = none."
    )

    batch_size: int = Field(
        2048,
        ge=1,
        description="Global batch in samples = data.device_batch_size x accumulation x world size.",
    )
    gradient_accumulation: int | None = Field(
        None, ge=1, description="Micro-steps per optimizer step; unset = derived from batch_size."
    )
    max_samples: int = Field(40_000_000, ge=1, description="Run length in samples (v2: 40M, v2.5: 150M).")

    lr: float = Field(1e-4, gt=0, description="Peak learning rate of the UNet.")
    text_encoder_lr: float | None = Field(None, gt=0, description="Peak lr of text encoder 1; unset = lr.")
    text_encoder_2_lr: float | None = Field(None, gt=0, description="Peak lr of text encoder 2; unset = lr.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="After warmup: cosine to min_lr_ratio at max_samples, or constant."
    )
    warmup_samples: int = Field(100_000, ge=0, description="Linear warmup length in samples.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of the peak lr.")
    grad_clip: float | None = Field(
        1.0,
        gt=0,
        description="Clip the global gradient norm; unset = no clip. With fused_backward the default is "
        "no clip (a global norm needs every gradient at once); setting it there is refused.",
    )
    optimizer: Literal["adamw", "adafactor", "adamw8bit", "paged_adamw8bit"] = Field(
        "adamw",
        description="adamw = torch AdamW, 8 bytes of state per trained weight (bigASP). adafactor = "
        "transformers' Adafactor (factored second moment, no momentum: a few bytes per row/column; "
        "betas/adam_eps unused, weight_decay applied as lr x wd). adamw8bit = bitsandbytes' blockwise "
        "8-bit AdamW (2 bytes per weight; CPU or CUDA). paged_adamw8bit = the same with its state paged "
        "to host memory under pressure (CUDA only).",
    )
    fused_backward: bool = Field(
        False,
        description="Step each parameter as soon as its gradient is complete in backward and free that "
        "gradient, so the full set of gradients never exists (saves one gradient per trained weight). "
        "One process only; needs gradient accumulation 1, no grad_clip and no fp16 GradScaler. Turns "
        "text-encoder training off unless model.train_text_encoder is set explicitly.",
    )

    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp16",
        description="Autocast dtype over fp32 master weights. fp16 uses a GradScaler (bigASP v2); "
        "bf16 needs none (v2.5).",
    )
    grad_scaler_init: float = Field(
        65536.0, gt=0, description="fp16 only: initial loss scale (bigASP: 65,536)."
    )
    grad_scaler_growth_interval: int | None = Field(
        None,
        ge=1,
        description="fp16 only: good steps before the scale doubles; unset = 500,000 // batch_size as bigASP "
        "v2's train.py set it (244 at batch 2048).",
    )
    max_consecutive_skips: int = Field(
        25,
        ge=1,
        description="Abort after this many optimizer steps in a row skipped for non-finite loss/grads.",
    )
    parallelism: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="Multi-process strategy. ddp: full fp32 weights, grads and AdamW state on every "
        "GPU (fastest while it fits). fsdp2: `fully_shard` per UNet block (and per trained text "
        "encoder), weights/grads/AdamW state sharded across ranks, params all-gathered in the "
        "autocast dtype, gradients reduced in fp32: for memory-bound cases (bigger device batches, "
        "both encoders trained). One process: ignored. fp16 + fsdp2 is not supported (use bf16).",
    )
    tf32: bool = Field(True, description="Allow TF32 matmuls/convolutions on Ampere+ GPUs.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = CUDA when available.")

    def growth_interval(self) -> int:
        """The GradScaler growth interval in optimizer steps (bigASP: 500,000 samples' worth)."""
        if self.grad_scaler_growth_interval is not None:
            return self.grad_scaler_growth_interval
        return max(1, 500_000 // self.batch_size)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not 0 <= self.betas[0] < 1 or not 0 <= self.betas[1] < 1:
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.fused_backward and self.precision == "fp16":
            raise ValueError(
                "train.fused_backward cannot run with train.precision = 'fp16': its GradScaler must see every "
                "gradient before any step; use precision 'bf16' (or 'fp32')"
            )
        if self.fused_backward and self.gradient_accumulation not in (None, 1):
            raise ValueError(
                f"train.fused_backward steps in every backward, so train.gradient_accumulation = "
                f"{self.gradient_accumulation} cannot accumulate; use 1 (raise data.device_batch_size instead)"
            )
        if self.fused_backward and self.grad_clip is not None and "grad_clip" in self.model_fields_set:
            raise ValueError(
                "train.grad_clip cannot be combined with train.fused_backward: clipping the global norm needs "
                "every gradient at once; remove train.grad_clip (fused_backward defaults to no clip)"
            )
        if self.parallelism == "fsdp2" and self.precision == "fp16":
            raise ValueError(
                "train.parallelism = 'fsdp2' needs train.precision 'bf16' or 'fp32' (fp16's GradScaler "
                "is not wired for sharded gradients); use bf16, or parallelism = 'ddp' for fp16"
            )
        return self


class ValidationConfig(Section):
    """`[validation]`: held-out loss and the stable train loss, fixed noise and stratified t."""

    every: int = Field(50_000, ge=0, description="Validate every this many samples (0 = never).")
    at_start: bool = Field(True, description="Also validate before the first step (the baseline).")
    stable: bool = Field(
        True, description="Also compute the stable train loss on data.stable_size train images."
    )
    stable_loss: Literal["weighted", "plain"] = Field(
        "weighted",
        description="Stable train loss: 'weighted' = with the training loss weighting (min-SNR for eps), as "
        "bigASP v2's train.py computed it; 'plain' = unweighted MSE like the validation loss. Logged as "
        "stable/loss, with stable/loss_plain beside it when weighted.",
    )
    t_bins: int = Field(10, ge=1, description="Report the loss in this many equal bins of t in [0, 1].")
    device_batch_size: int | None = Field(
        None, ge=1, description="Eval micro-batch; unset = data.device_batch_size."
    )


class CheckpointConfig(Section):
    """`[checkpoint]`: when to save and what to keep."""

    every: int = Field(500_000, ge=0, description="Save every this many samples (0 = only at end/signal).")
    keep_last: int = Field(3, ge=1, description="Keep the newest this many checkpoints.")
    keep_every: int | None = Field(
        5_000_000,
        ge=1,
        description="Also keep forever the first checkpoint at/after each multiple of this "
        "many samples; unset = keep only the last ones.",
    )
    at_end: bool = Field(True, description="Save when the run reaches train.max_samples.")
    on_signal: bool = Field(True, description="On SIGTERM/SIGINT (preemption), save then exit.")


class EMAConfig(Section):
    """`[ema]`: an exponential moving average of the trained weights, written beside each checkpoint."""

    enabled: bool = Field(
        False,
        description="Keep an EMA of the trained weights; checkpoints also write it as CKPT/ema/ (bigASP: none).",
    )
    decay: float = Field(
        0.9999, gt=0, lt=1, description="Per update: ema <- decay * ema + (1 - decay) * weights."
    )
    start: int = Field(
        0, ge=0, description="Samples before the first update; the first update copies the weights."
    )
    every: int = Field(0, ge=0, description="Update every this many samples; 0 = after every optimizer step.")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Storage of the average: fp32 (exact master copy) or bf16 (half the memory, coarser).",
    )
    cpu: bool = Field(False, description="Keep the average in host memory instead of on the GPU.")


class LoggingConfig(Section):
    """`[logging]`: console progress and metric sinks."""

    every: int = Field(10_000, ge=1, description="Log training metrics every this many samples.")
    wandb_project: str | None = Field(None, description="W&B project; unset = no W&B.")
    wandb_mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="W&B mode; offline needs no network (`wandb sync` later)."
    )
    wandb_name: str | None = Field(None, description="W&B run name/id; unset = the run dir's name.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files to RUN/tensorboard.")
    flops: bool = Field(True, description="Count model FLOPs per new batch shape (meta device) for TFLOP/s.")
    batch_log: bool = Field(
        False, description="Write RUN/batches.jsonl: every micro-batch's rows and prompts (audit data order)."
    )


class RunConfig(Section):
    """The whole `bigasp train` config file."""

    run_dir: str = Field(
        "runs/bigasp", description="Output folder: checkpoints/, metrics.jsonl, config.toml."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)

    @model_validator(mode="after")
    def _lean_defaults(self) -> RunConfig:
        """A memory-lean run (bf16 trained weights or fused backward) changes two defaults a user did
        not set: no text-encoder training (it costs weights, gradients and state for a small gain)
        and, with fused backward, no gradient clipping (it needs all gradients at once)."""
        m, t = self.model, self.train
        if m.trained_dtype == "bf16" and t.precision != "bf16":
            raise ValueError(
                f"model.trained_dtype = 'bf16' needs train.precision = 'bf16' (got '{t.precision}'): bf16 "
                "weights compute in bf16; set train.precision = 'bf16' or model.trained_dtype = 'fp32'"
            )
        if m.save_dtype == "bf16" and m.trained_dtype == "fp32":
            raise ValueError(
                "model.save_dtype = 'bf16' would round fp32 master weights, so a resume would not continue "
                "the run exactly; use model.trained_dtype = 'bf16' or model.save_dtype = 'fp32'"
            )
        if m.trained_dtype == "bf16" or t.fused_backward:
            if "train_text_encoder" not in m.model_fields_set and m.train_text_encoder:
                m.train_text_encoder = False
            if t.fused_backward and "grad_clip" not in t.model_fields_set and t.grad_clip is not None:
                t.grad_clip = None
        return self

    @model_validator(mode="after")
    def _check_shifts(self) -> RunConfig:
        """The two shifts only mean something for flow; an eps config that sets them contradicts
        itself, and a flow config sampling at another shift than it trains is said out loud."""
        if self.train.objective == "eps":
            bad = [
                f"{key} = {v:g}"
                for key, v in (
                    ("train.flow_shift", self.train.flow_shift),
                    ("model.sampling_shift", self.model.sampling_shift),
                )
                if v is not None and v != 1.0
            ]
            if bad:
                raise ValueError(
                    f"{' and '.join(bad)} contradict train.objective = 'eps' (shifts apply to flow models only); "
                    "remove them or set train.objective = 'flow'"
                )
        elif self.model.sampling_shift is not None and self.model.sampling_shift != self.train.flow_shift:
            logging.getLogger(__name__).warning(
                "model.sampling_shift = %g differs from train.flow_shift = %g: checkpoints will be sampled at "
                "shift %g by default (unset model.sampling_shift to sample at the training shift)",
                self.model.sampling_shift,
                self.train.flow_shift,
                self.model.sampling_shift,
            )
        return self

    @model_validator(mode="after")
    def _check_adapter(self) -> RunConfig:
        """Adapter keys only mean something with model.adapter, and a few settings cannot combine."""
        from bigasp.train.adapters import check_adapter_config

        check_adapter_config(self)
        return self

    def model_kind(self) -> ModelKind:
        """What checkpoints record in bigasp_model.json: prediction, sampling shift, training shift."""
        if self.train.objective == "eps":
            return ModelKind(prediction="eps")
        shift = self.model.sampling_shift if self.model.sampling_shift is not None else self.train.flow_shift
        return ModelKind(prediction="flow", shift=shift, train_shift=self.train.flow_shift)


def resolve_accumulation(cfg: RunConfig, world_size: int) -> int:
    """Micro-steps per optimizer step, checking batch_size = device_batch x accumulation x world size."""
    per_step = cfg.data.device_batch_size * world_size
    b = cfg.train.batch_size
    acc = cfg.train.gradient_accumulation
    if acc is None:
        if b % per_step:
            raise ConfigError(
                f"train.batch_size = {b} is not a multiple of data.device_batch_size ({cfg.data.device_batch_size}) "
                f"x world size ({world_size}) = {per_step}; pick a batch_size that is, e.g. "
                f"{max(1, round(b / per_step)) * per_step}"
            )
        return b // per_step
    if acc * per_step != b:
        raise ConfigError(
            f"train.batch_size = {b} but data.device_batch_size ({cfg.data.device_batch_size}) x "
            f"train.gradient_accumulation ({acc}) x world size ({world_size}) = {acc * per_step}; make them "
            "agree or leave gradient_accumulation unset to derive it"
        )
    return acc
