"""`bigasp bench stream`: the bookkeeping cost of a streaming first pass, per wave and on resume.

A run that trains while the encoder writes takes the dataset in by waves (train/stream.py). When
the encoder is slower than training, every wave is one shard, so a 13M-image dataset in shards of
4,096 is ~3,200 waves, and a resume takes all recorded waves in again before its first step. Both
must cost per wave what the wave holds, not what the dataset holds so far.

The bench writes a manifest of N images and W index files (N/W latents each, sizes drawn from the
card's bucket histogram; no shard bytes: a wave reads only index files), then times taking the
files in one wave each (first and last tenth of the waves, to show whether the cost grows), and a
fresh loader replaying all W recorded waves from the state, as `--resume` does.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bigasp.bench.common import BenchResult, PeakMemory, machine_info
from bigasp.bench.plan import synthetic_columns


def write_stream_dataset(root: Path, images: int, files: int, seed: int = 0) -> list[str]:
    """Manifest + `files` index files (no shards); returns the index file names in order."""
    from bigasp.store import layout
    from bigasp.store.manifest import INDEX_SCHEMA, MANIFEST_SCHEMA, init_dataset

    root.mkdir(parents=True, exist_ok=True)
    init_dataset(root)
    heights, widths, _ = synthetic_columns(images, seed)
    ids = pa.array([f"img{i:09d}" for i in range(images)], pa.string())
    words = np.array(["photo", "woman", "red", "dress", "street", "night", "smiling", "outdoors", "blue"])
    rng = np.random.default_rng(seed)
    captions = [" ".join(words[rng.integers(0, len(words), 12)]) for _ in range(min(images, 4096))]
    manifest = pa.table(
        {
            "id": ids,
            "path": pa.array([f"/photos/{i}.jpg" for i in range(images)], pa.string()),
            "width": pa.array(widths * 2, pa.int32()),
            "height": pa.array(heights * 2, pa.int32()),
            "captions": pa.array([[captions[i % len(captions)]] for i in range(images)]),
            "tags": pa.array([["photo", "woman"]] * images),
            "score": pa.array(rng.integers(1, 10, images), pa.int32()),
        }
    )
    from bigasp.store.manifest import conform

    layout.atomic_write_parquet(conform(manifest, MANIFEST_SCHEMA), root / layout.MANIFEST)
    index_dir = root / layout.INDEX_DIR
    index_dir.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(images)  # an encoder's shards do not come in id order
    names = []
    for k, part in enumerate(np.array_split(order, files)):
        part = np.sort(part)
        n = len(part)
        name = f"bench-r00000-{k:06d}"
        table = pa.table(
            {
                "id": ids.take(pa.array(part)),
                "shard": pa.array([f"{layout.SHARDS_DIR}/{name}{layout.SHARD_SUFFIX}"] * n, pa.string()),
                "record": pa.array(np.arange(n), pa.int32()),
                "offset": pa.array(np.arange(n) * 131072, pa.int64()),
                "length": pa.array(np.full(n, 131072), pa.int64()),
                "crc32": pa.array(np.zeros(n), pa.int64()),
                "compression": pa.array(["none"] * n, pa.string()),
                "bucket_height": pa.array(heights[part], pa.int32()),
                "bucket_width": pa.array(widths[part], pa.int32()),
                "original_height": pa.array(heights[part] * 2, pa.int32()),
                "original_width": pa.array(widths[part] * 2, pa.int32()),
                "crop_top": pa.array(np.zeros(n), pa.int32()),
                "crop_left": pa.array(np.zeros(n), pa.int32()),
                "variant": pa.array(np.zeros(n), pa.int32()),
            },
            schema=INDEX_SCHEMA,
        )
        layout.atomic_write_parquet(table, index_dir / f"{name}.parquet")
        names.append(f"{name}.parquet")
    return names


def run_stream_bench(*, images: int, files: int, device_batch: int, seed: int, command: str) -> BenchResult:
    import logging

    from bigasp.store.streaming import StreamingLatentDataset
    from bigasp.train.data import DataConfig
    from bigasp.train.stream import StreamingLoader

    logging.getLogger("bigasp.train.stream").setLevel(logging.WARNING)  # one line per wave otherwise
    with tempfile.TemporaryDirectory(prefix="bigasp-bench-stream-") as tmp:
        root = Path(tmp) / "ds"
        t0 = time.perf_counter()
        names = write_stream_dataset(root, images, files, seed)
        write_s = time.perf_counter() - t0
        cfg = DataConfig(
            dataset=str(root), seed=seed, device_batch_size=device_batch, num_workers=0, stream=True
        )
        with PeakMemory(torch.device("cpu")) as live_mem:
            t0 = time.perf_counter()
            loader = StreamingLoader(StreamingLatentDataset(str(root)), cfg)
            open_s = time.perf_counter() - t0
            per_wave = []
            for name in names:
                t0 = time.perf_counter()
                loader.take_wave([name])
                per_wave.append(time.perf_counter() - t0)
            live_peak = live_mem.result()["peak_rss_gib"]
        state = loader.state_dict()
        state["stream"]["done"] = True
        planned = loader.planned
        del loader
        gc.collect()
        with PeakMemory(torch.device("cpu")) as replay_mem:
            t0 = time.perf_counter()
            fresh = StreamingLoader(StreamingLatentDataset(str(root)), cfg)
            fresh.load_state_dict(state)
            replay_s = time.perf_counter() - t0
            replay_peak = replay_mem.result()["peak_rss_gib"]
        assert fresh.planned == planned and len(fresh.dataset) == images
    tenth = max(1, files // 10)
    metrics = {
        "open_s": open_s,
        "first_waves_ms": 1000 * float(np.mean(per_wave[:tenth])),
        "last_waves_ms": 1000 * float(np.mean(per_wave[-tenth:])),
        "live_total_s": float(np.sum(per_wave)),
        "replay_s": replay_s,
        "batches": int(planned),
        "live_peak_rss_gib": live_peak,
        "replay_peak_rss_gib": replay_peak,
        "write_s": write_s,
        "rss_peak_is_region": live_mem.rss_reset,
    }
    return BenchResult(
        bench="stream",
        config={"images": images, "files": files, "device_batch": device_batch, "seed": seed},
        metrics=metrics,
        headline=[
            ("first_waves_ms", "ms per wave (first tenth)"),
            ("last_waves_ms", "ms per wave (last tenth)"),
            ("replay_s", "s to replay every wave on resume"),
            ("live_peak_rss_gib", "GiB peak RSS (live pass)"),
        ],
        command=command,
        machine=machine_info(torch.device("cpu")),
    )
