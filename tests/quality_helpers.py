"""Shared setup for the quality tests: demo photos ingested into a dataset, a tiny CLIP built from
a transformers config, and that CLIP's embeddings written as the dataset's `embed` annotations."""

from __future__ import annotations

from pathlib import Path

from bigasp.cli import main as cli
from bigasp.demo.synthetic import write_photos
from bigasp.quality.images import manifest_ref, open_image
from bigasp.store import layout
from bigasp.store.annotations import embeddings_table, write_part
from bigasp.store.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
EMBED_KEY = "tiny-clip"


def tiny_clip(path: Path) -> Path:
    """A CLIPVisionModel with random weights (seeded) and its PIL image processor, saved locally."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    CLIPVisionModel(cfg).eval().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def photo_dataset(tmp: Path, n: int) -> Path:
    """n demo photos ingested in place (no embeddings): enough for an arena."""
    photos = tmp / "photos"
    write_photos(photos, n, seed=0, broken=False)
    root = tmp / "dataset"
    cli(["ingest", str(photos), "--out", str(root), "--config", str(REPO / "configs" / "demo-data.toml")])
    return root


def demo_dataset(tmp: Path, n: int = 24, *, clip: Path | None = None) -> tuple[Path, Path, dict[str, int]]:
    """(dataset root, clip folder, demo sidecar score by id) with every image embedded by the tiny CLIP."""
    import torch

    from bigasp.annotate.config import EmbedConfig
    from bigasp.annotate.embed import ClipEmbedder

    photos = tmp / "photos"
    write_photos(photos, n, seed=0, broken=False)
    root = tmp / "dataset"
    cli(["ingest", str(photos), "--out", str(root), "--config", str(REPO / "configs" / "demo-data.toml")])
    clip = clip or tiny_clip(tmp / "clip")
    fs, path = layout.url_to_fs(root)
    m = read_manifest(fs, path).to_pydict()
    images = [
        open_image(manifest_ref(p, o, s), r)
        for p, o, s, r in zip(m["path"], m["tar_offset"], m["file_size"], m["orientation"], strict=True)
    ]
    vectors = ClipEmbedder(EmbedConfig(model=str(clip)), torch.device("cpu"))(images)
    write_part(
        root, "embed", EMBED_KEY, embeddings_table(m["id"], vectors), session="test", rank=0, seq=0,
        provenance={"model": "tiny random CLIP"},
    )  # fmt: skip
    scores = dict(zip(m["id"], m["score"], strict=True))
    return root, clip, scores
