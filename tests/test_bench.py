"""`bigasp bench`: FLOP counts against hand counts, and smoke runs that check the JSON record."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from bigasp.bench.common import BenchResult, command_line, parse_res
from bigasp.cli import app
from bigasp.errors import ConfigError
from bigasp.flops import (
    ModuleFlopCounter,
    attention_flops,
    conv2d_flops,
    count_flops,
    linear_flops,
)


class ConvLinearAttn(nn.Module):
    """A small known model: conv 3->8 (3x3, pad 1) -> conv 8->16 (3x3, stride 2) -> tokens -> qkv -> SDPA -> out."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        h = self.c2(F.silu(self.c1(x)))  # [B,16,8,8]
        t = h.flatten(2).transpose(1, 2)  # [B,64,16]
        q, k, v = self.qkv(t).view(t.shape[0], t.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # 2 heads of 8
        return self.out(a.transpose(1, 2).reshape(t.shape))


def hand_count(b: int) -> int:
    # Written out by hand from the layer shapes (2 FLOPs per multiply-accumulate).
    c1 = 2 * b * 16 * 16 * 8 * 3 * 3 * 3  # out 16x16, 8 ch, 3 in-ch x 3x3 kernel
    c2 = 2 * b * 8 * 8 * 16 * 8 * 3 * 3  # out 8x8, 16 ch, 8 in-ch x 3x3
    qkv = 2 * (b * 64) * 16 * 48
    attn = 2 * (2 * b * 2 * 64 * 64 * 8)  # QK^T and AV, 2 heads, 64 tokens, dim 8
    out = 2 * (b * 64) * 16 * 10
    return c1 + c2 + qkv + attn + out


def test_formulas_match_hand_count():
    b = 3
    assert conv2d_flops(b, 3, 8, (3, 3), (16, 16)) == 2 * b * 16 * 16 * 8 * 27
    assert linear_flops(b * 64, 16, 48) == 2 * b * 64 * 16 * 48
    assert attention_flops(b, 2, 64, 64, 8) == 4 * b * 2 * 64 * 64 * 8


def test_flop_counter_matches_hand_count_forward_and_backward():
    torch.manual_seed(0)
    model = ConvLinearAttn()
    x = torch.randn(3, 3, 16, 16)
    fwd, _ = count_flops(lambda: model(x))
    assert fwd.total == hand_count(3)
    # CPU flash attention is counted (torch does not register it by itself).
    assert fwd.by_op["_scaled_dot_product_flash_attention_for_cpu"] == 4 * 3 * 2 * 64 * 64 * 8
    with ModuleFlopCounter(model) as m:
        model(x)
    assert m.by_kind["conv"] + m.by_kind["linear"] == hand_count(3) - 4 * 3 * 2 * 64 * 64 * 8

    # Backward of a matmul costs 2x its forward (grad input + grad weight), except the first
    # layer's grad input when the data needs none: model FLOPs = 3 fwd - c1's input-grad term.
    # torch's raw count charges flash-attention backward 2.5x (QK^T recompute).
    fb, _ = count_flops(lambda: model(x).sum().backward())
    c1, attn = 2 * 3 * 16 * 16 * 8 * 27, 4 * 3 * 2 * 64 * 64 * 8
    assert fb.model == 3 * hand_count(3) - c1
    assert fb.total == 3 * hand_count(3) - c1 + attn // 2


def test_tiny_unet_forward_flops_match_module_hand_count(tiny_model):
    """Aten-level count == shape-level count over every Linear, Conv2d and Attention of the UNet."""
    unet = tiny_model.unet
    b = 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, 8, 8, generator=g)
    ctx = torch.randn(b, 154, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(b, 32, generator=g), "time_ids": torch.randn(b, 6, generator=g)}

    def fwd():
        with torch.no_grad():
            return unet(x, torch.tensor([1, 500]), ctx, added_cond_kwargs=added).sample

    counted, _ = count_flops(fwd)
    with ModuleFlopCounter(unet) as hand:
        fwd()
    assert counted.total == hand.total
    assert hand.by_kind["attention"] > 0 and hand.by_kind["conv"] > 0
    assert counted.by_op["convolution"] == hand.by_kind["conv"]


def test_sdxl_unet_forward_flops_match_reference():
    """The real SDXL UNet on `meta` (no memory): 1024², 77 tokens = 6.761 TFLOP, as
    ../shared/reference/performance.md §3.1 computed independently; both counters agree."""
    from bigasp.models import build_preset

    unet = build_preset("sdxl-base", components=("unet",), device="meta").unet
    with torch.device("meta"):
        x, ctx = torch.randn(1, 4, 128, 128), torch.randn(1, 77, 2048)
        added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
        t = torch.tensor([500])

    def fwd():
        with torch.no_grad():
            return unet(x, t, ctx, added_cond_kwargs=added).sample

    counted, _ = count_flops(fwd)
    assert counted.total / 1e12 == pytest.approx(6.761, abs=0.0005)
    with ModuleFlopCounter(unet) as hand:
        fwd()
    assert hand.total == counted.total


def _run_cli(args: list[str], tmp_path) -> dict:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith(f"| {args[1]} |")]
    assert len(rows) == 1, result.output  # exactly one pasteable row
    data = json.loads(out.read_text())
    assert data["format_version"] == 1 and data["bench"] == args[1]
    assert data["command"].startswith(f"bigasp bench {args[1]} ")
    assert data["machine"]["device"] == "cpu" and data["date"]
    return data


def test_bench_train_cpu_json_fields(tmp_path):
    d = _run_cli(
        [
            "bench",
            "train",
            "--res",
            "32x32",
            "--device-batch",
            "1",
            "--tokens",
            "154",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--precision",
            "fp32",
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    m = d["metrics"]
    assert d["config"]["tokens"] == 154 and d["config"]["train_te1"] is True
    assert m["img_per_s"] > 0 and m["ms_per_step"] > 0
    assert m["img_per_s"] == pytest.approx(d["config"]["device_batch"] / (m["ms_per_step"] / 1000))
    # Counted, not assumed: the step did fwd+bwd of UNet and TE1, so attention backward is in.
    assert m["flops_by_op"]["convolution_backward"] > 0
    assert m["flops_counted"] == sum(m["flops_by_op"].values())
    sdpa_bwd = m["flops_by_op"]["_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert m["flops_per_step"] == m["flops_counted"] - sdpa_bwd // 5
    assert m["model_tflops"] == pytest.approx(m["flops_per_step"] / (m["ms_per_step"] / 1000) / 1e12)
    assert m["mfu"] is None and m["mfu_pct"] is None  # no meaningful peak on CPU
    assert m["trainable_params"] > 0 and m["peak_rss_gib"] > 0
    assert m["loss"] == m["loss"]  # not NaN


def test_bench_train_flops_scale_with_batch():
    """Per-sample FLOPs do not depend on the batch (a count that did would be counting setup)."""
    from bigasp.bench.train import TrainBenchConfig, TrainStepHarness

    cfg = TrainBenchConfig(height=32, width=32, device_batch=2, tokens=77, precision="fp32")
    h = TrainStepHarness(cfg, torch.device("cpu"))
    two, _ = count_flops(h.forward_backward)
    h.latents, h.noise, h.t, h.time_ids = h.latents[:1], h.noise[:1], h.t[:1], h.time_ids[:1]
    h.tokens = replace(h.tokens, te1=h.tokens.te1[:1], te2=h.tokens.te2[:1])
    one, _ = count_flops(h.forward_backward)
    assert two.model == 2 * one.model > 0


@pytest.mark.parametrize("train_te1", [True, False])
def test_trainer_flops_equal_the_bench_count_of_a_real_step(train_te1):
    """The trainer's per-shape count (meta copies, forward + backward) is the bench's count of a
    real CPU step: one FLOP convention for MFU in `bigasp train` and `bigasp bench train`."""
    from bigasp.bench.train import TrainBenchConfig, TrainStepHarness
    from bigasp.flops import TrainFlops

    cfg = TrainBenchConfig(
        height=32, width=48, device_batch=2, tokens=154, precision="fp32", train_te1=train_te1
    )
    h = TrainStepHarness(cfg, torch.device("cpu"))
    real, _ = count_flops(h.forward_backward)
    counter = TrainFlops(h.unet, h.te1, h.te2)
    assert 2 * counter.per_sample(4, 6, 2) == real.model > 0
    fwd = TrainFlops(*(m.requires_grad_(False) for m in (h.unet, h.te1, h.te2)))  # nothing trains
    # a frozen network costs its forward only; a trained one less than 3x (no input grad at
    # conv_in, none for TE1's unused last layer)
    assert fwd.per_sample(4, 6, 2) < counter.per_sample(4, 6, 2) < 3 * fwd.per_sample(4, 6, 2)


@pytest.mark.slow
def test_sdxl_training_flops_match_reference():
    """SDXL UNet + TE1 trained, TE2 frozen, 1024², 3 chunks: 21.2 TFLOP per sample
    (../shared/reference/performance.md), counted as the trainer counts it, on `meta`."""
    from bigasp.flops import TrainFlops
    from bigasp.models import build_preset

    m = build_preset("sdxl-base", ("unet", "text_encoder", "text_encoder_2"), device="meta")
    m.text_encoder_2.requires_grad_(False)
    te1 = getattr(m.text_encoder, "text_model", m.text_encoder)
    te1.encoder.layers[-1].requires_grad_(False)  # as the trainer: penultimate-layer conditioning
    te1.final_layer_norm.requires_grad_(False)
    per_sample = TrainFlops(m.unet, m.text_encoder, m.text_encoder_2).per_sample(128, 128, 3)
    assert per_sample / 1e12 == pytest.approx(21.2, rel=1e-3)


def test_bench_encode_cpu_json_fields(tmp_path):
    d = _run_cli(
        ["bench", "encode", "--res", "64x64", "--batch", "1", "--iters", "1", "--device", "cpu"], tmp_path
    )
    m = d["metrics"]
    assert m["latent_shape"] == [4, 8, 8]
    assert m["img_per_s"] > 0 and m["tflop_per_image"] > 0 and m["mfu_pct"] is None


def test_bench_tokenize_json_fields(tmp_path):
    d = _run_cli(["bench", "tokenize", "--prompts", "200", "--repeats", "1"], tmp_path)
    m = d["metrics"]
    assert m["ms_per_1000"] > 0 and m["prompts_per_s"] == pytest.approx(1e6 / m["ms_per_1000"])
    assert m["tokens_min"] >= 30 and m["tokens_max"] <= 260


def test_realistic_prompts_are_deterministic_and_long():
    from bigasp.bench.tokenize import realistic_prompts
    from bigasp.text import tokenize

    a, b = realistic_prompts(60, seed=3), realistic_prompts(60, seed=3)
    assert a == b and a != realistic_prompts(60, seed=4)
    lengths = sorted(len(t) for t in tokenize(a))
    assert lengths[len(lengths) // 2] > 77  # most need 2+ chunks, like bigASP captions


def test_command_line_and_row_roundtrip():
    cmd = command_line(
        "train", {"arch": "tiny", "compile": False, "fsdp": True, "train_te1": False, "json_out": "x"}
    )
    assert cmd == "bigasp bench train --arch tiny --fsdp --frozen-te1"
    r = BenchResult(
        "train",
        {},
        {"img_per_s": 12.345, "mfu_pct": None},
        [("img_per_s", "img/s"), ("mfu_pct", "% MFU")],
        cmd,
    )
    assert r.table_row().startswith("| train | 12.3 img/s, n/a % MFU | `bigasp bench train")


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="HEIGHTxWIDTH"):
        parse_res("1024")
    from bigasp.bench.train import TrainBenchConfig

    with pytest.raises(ConfigError, match="--tokens"):
        TrainBenchConfig(tokens=100).validate()


@pytest.mark.slow  # ~14 s alone, 80 s on the shared 2-core box under load
def test_bench_sample_cpu_json_fields(tmp_path):
    d = _run_cli(
        [
            "bench",
            "sample",
            "--res",
            "64x64",
            "--batches",
            "1",
            "--steps",
            "1,2",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    m = d["metrics"]
    for key in (
        "bigasp_cfg_b1_it_s",
        "bigasp_cfgpag_b1_it_s",
        "diffusers_cfg_b1_it_s",
        "diffusers_cfgpag_b1_it_s",
    ):
        assert m[key] > 0
    assert m["vs_diffusers_cfg_b1"] == pytest.approx(m["bigasp_cfg_b1_it_s"] / m["diffusers_cfg_b1_it_s"])
    assert m["pag_step_ratio_b1"] == pytest.approx(m["bigasp_cfg_b1_it_s"] / m["bigasp_cfgpag_b1_it_s"])
    assert d["config"]["precision"] == "fp32"


def test_bench_load_plan_ingest_cpu_json_fields(tmp_path):
    d = _run_cli(
        ["bench", "load", "--latent", "8x8", "--images", "64", "--batch", "4", "--batches", "3"], tmp_path
    )
    assert d["metrics"]["samples"] == 12 and d["metrics"]["samples_per_s_per_worker"] > 0
    assert d["metrics"]["latent_bytes"] == 4 * 8 * 8 * 2
    d = _run_cli(["bench", "plan", "--rows", "20000", "--world-size", "4"], tmp_path)
    m = d["metrics"]
    assert m["seconds"] > 0 and m["buckets"] > 1 and 0 < m["rank0_batches"] * 4 <= m["batches"] + 3
    d = _run_cli(["bench", "ingest", "--images", "40"], tmp_path)
    assert d["metrics"]["ingested"] == 40 and d["metrics"]["incremental_skipped"] == 40


@pytest.mark.gpu
def test_bench_train_cuda_bf16_reports_mfu_and_bounded_compile():
    """GPU twin of the CPU train smoke test: MFU is a number, CUDA memory is reported, and a
    regional compile at one shape compiles each block kind once and never recompiles."""
    from bigasp.bench.train import TrainBenchConfig, run_train_bench

    cfg = TrainBenchConfig(height=64, width=64, device_batch=2, tokens=154, compile=True, iters=3, warmup=1)
    r = run_train_bench(cfg, torch.device("cuda"), "test")
    m = r.metrics
    assert 0 < m["mfu"] < 1 and m["mfu_pct"] == pytest.approx(100 * m["mfu"])
    assert m["peak_allocated_gib"] > 0 and m["loss"] == m["loss"]
    assert 0 < m["compiled_graphs"] <= 16 and m["recompiles"] == 0


def test_bench_ingest_and_encode_from_a_local_bucket(tmp_path):
    pytest.importorskip("moto.server")
    url = [
        "--url",
        "s3://bench/photos",
        "--local-s3",
        "--latency-ms",
        "1",
        "--shards",
        "1",
        "--per-shard",
        "3",
    ]
    m = _run_cli(["bench", "ingest", *url], tmp_path)["metrics"]
    assert m["images"] == 3 and m["prefetch_img_per_s"] > 0 and m["no_prefetch_img_per_s"] > 0
    assert (
        m["prefetch_fetched_per_shard_bytes"] == m["no_prefetch_fetched_per_shard_bytes"] == 1.0
    )  # once each
    m = _run_cli(["bench", "encode", *url, "--workers", "1"], tmp_path)["metrics"]
    assert m["fetched_per_image_bytes"] == 1.0 and m["prefetch_img_per_s"] > 0
