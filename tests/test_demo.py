"""End to end: `bigasp demo --quick` runs every real stage and the model visibly learns (~1 min).

The thresholds are chosen so that a broken trainer, sampler, conditioning path or quality stage
fails: with the text embeddings zeroed, colour adherence falls to about chance (25%), and scores
that do not follow the hidden quality give a Spearman near 0 — see docs/demo.md for the measured
numbers of three seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Quick run, seeds 0 / 1 / 2 (docs/demo.md): colour 67% / 77% / 79%, Spearman 0.868 / 0.891 / 0.875,
# validation loss 83% / 85% / 84% lower. Chance colour adherence is 25%; scores unrelated to the
# hidden quality give a Spearman near 0.
MIN_COLOUR_ADHERENCE = 0.5
MIN_VAL_LOSS_DROP = 0.10  # final validation loss at least 10% below the untrained model's
MIN_SCORE_SPEARMAN = 0.8


@pytest.mark.slow
def test_quick_demo_learns_end_to_end(tmp_path: Path, capsys):
    from bigasp.cli import main

    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out), "--seed", "0"])
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())

    # Every stage ran through the CLI and left its product.
    for key in ("dataset", "dataset_report", "final_checkpoint", "grid_image", "gallery", "loss_plot"):
        assert Path(summary["paths"][key]).exists(), key
    assert (Path(summary["paths"]["final_checkpoint"]) / "model" / "vae").is_dir()
    ckpts = sorted((out / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 2  # the half-way checkpoint it resumed from, and the final one
    assert "colour adherence" in printed and str(out / "grid.png") in printed
    assert str(out / "dataset-report" / "index.html") in printed

    # Broken files were rejected and reported, not fatal.
    import pyarrow.parquet as pq

    rejects = pq.read_table(out / "dataset" / "rejects.parquet")
    assert rejects.num_rows == 3

    # Curation: the scores training saw are bigasp's own, and they follow the hidden quality.
    for stage in ("annotate", "rate", "quality"):
        assert (out / ".demo" / f"{stage}.json").is_file(), stage
    assert (out / "dataset" / "quality" / "scorer.safetensors").is_file()
    assert "$ bigasp quality score" in printed and "bigasp quality arena" in printed
    assert summary["score_spearman"] >= MIN_SCORE_SPEARMAN, summary
    assert sum(summary["score_histogram"]) == 384 and sum(n > 0 for n in summary["score_histogram"]) >= 5

    # Learning: conditioning works (colour), and the loss fell.
    assert summary["colour_adherence"] >= MIN_COLOUR_ADHERENCE, summary
    assert summary["val_loss_end"] <= (1 - MIN_VAL_LOSS_DROP) * summary["val_loss_start"], summary

    # Idempotent: a second run reuses every stage and reports the same figures.
    main(["demo", "--quick", "--out", str(out), "--seed", "0"])
    again = json.loads((out / "summary.json").read_text())
    assert set(again["reused"]) >= {"ingest", "annotate", "rate", "quality", "encode", "report", "train",
                                    "generate", "generate-negative", "watch"}  # fmt: skip
    assert again["colour_adherence"] == summary["colour_adherence"]
    assert again["contrast_ratio"] == summary["contrast_ratio"]


@pytest.mark.slow
def test_stream_demo_encodes_and_trains_together(tmp_path: Path):
    """`bigasp demo --stream` at a smaller size: the encoder runs in the background while the run
    streams its first pass; every stage still leaves its product, and a re-run reuses them."""
    from bigasp.demo.run import DemoPlan, run_demo

    plan = DemoPlan(
        photos=128, max_samples=960, validate_every=480, images_per_prompt=1, steps=4, ratings=400
    )
    out = tmp_path / "demo"
    result = run_demo(out, plan=plan, stream=True, echo=lambda _: None)
    assert result.stream_waves is not None and result.stream_waves >= 1
    final = Path(result.paths["final_checkpoint"])
    state = json.loads((final / "state" / "trainer.json").read_text())["loader"][0]
    assert state["stream"]["done"] and state["epoch"] >= 1
    taken = [f for wave in state["stream"]["waves"] for f in wave]
    published = sorted(p.name for p in (out / "dataset" / "latents" / "index").glob("*.parquet"))
    assert sorted(taken) == published and len(published) >= 4  # shards of at most 32 latents
    assert Path(result.paths["dataset_report"]).exists() and Path(result.paths["grid_image"]).exists()
    again = run_demo(out, plan=plan, stream=True, echo=lambda _: None)
    assert set(again.reused) >= {"ingest", "encode", "report", "train", "generate", "watch"}


@pytest.mark.slow
def test_lora_demo_trains_an_adapter_on_the_frozen_base(tmp_path: Path):
    """`bigasp demo --lora --quick`: a LoCon adapter trains on the frozen, untrained starting model,
    its checkpoints hold the adapter only, `generate --lora` samples the base with it (different
    images than the base alone, same prompts and seeds), and it has learned what the base was
    never taught: the colours (--quick, seeds 0 / 1 / 2: 75% / 56% / 62%; the base alone 25%,
    chance). Shorter runs are too noisy to show it (2,880 samples on 128 photos: 38-42%)."""
    from safetensors import safe_open

    from bigasp.demo.report import format_report
    from bigasp.demo.run import run_demo

    out = tmp_path / "demo"
    result = run_demo(out, quick=True, lora=True, echo=lambda _: None)
    adapter = Path(result.paths["adapter"])
    assert adapter == Path(result.paths["final_checkpoint"]) / "model" / "lora.safetensors"
    with safe_open(str(adapter), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys)
    assert not (adapter.parent / "unet" / "diffusion_pytorch_model.safetensors").exists()  # no base copy
    assert result.lora and result.base_colour_adherence is not None
    assert result.base_colour_adherence <= 0.35  # the untrained base draws no colour on request
    assert result.colour_adherence >= result.base_colour_adherence + 0.2, result
    from PIL import Image

    def pixels(path: Path) -> bytes:
        with Image.open(path) as im:
            return im.convert("RGB").tobytes()

    base_images = sorted((out / "grid-base").glob("*.png"))
    differ = [pixels(out / "grid-lora" / p.name) != pixels(p) for p in base_images]
    assert differ and all(differ)
    report = format_report(result)
    assert "the base alone" in report and str(adapter) in report
    again = run_demo(out, quick=True, lora=True, echo=lambda _: None)
    assert set(again.reused) >= {"train-lora", "generate-lora", "generate-base"}
