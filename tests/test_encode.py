"""Encode: EXIF pixels, draft decode, encode -> read-back round trip on the tiny VAE, resume,
non-finite rejects, VAE folder loading, and 2-process torchrun == 1 process."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bigasp.buckets import Bucket, BucketConfig, BucketSet, Placement, place
from bigasp.prep import encode as enc
from bigasp.prep.config import EncodeConfig, IngestConfig
from bigasp.prep.images import load_for_bucket, pixel_limit, probe
from bigasp.prep.ingest import ingest
from bigasp.store import LatentDataset, layout
from bigasp.store.manifest import read_index
from bigasp.store.reader import INDEX_COLUMNS

TINY = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)
SRC = Path(__file__).parents[1] / "src"


def noise(w, h, seed):
    rng = np.random.default_rng(seed)
    # smooth-ish content so resizing is meaningful
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def ecfg(**kw) -> EncodeConfig:
    base = dict(vae="tiny", num_workers=0, batch_size=3, progress=False, shard_size=4)
    return EncodeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("enc")
    src = d / "src"
    src.mkdir()
    sizes = [(120, 90), (90, 120), (100, 100), (130, 80), (64, 48), (80, 130), (110, 110), (96, 72)]
    for k, (w, h) in enumerate(sizes):
        noise(w, h, k).save(src / f"im{k}.jpg", quality=92)
    buf = io.BytesIO()
    noise(72, 96, 50).save(buf, "PNG")  # one image inside a tar: encode reads it by offset
    with tarfile.open(d / "shard.tar", "w") as tf:
        info = tarfile.TarInfo("x/in-tar.png")
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))
    rot = noise(120, 90, 99)
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(src / "rot.jpg", quality=92, exif=exif.tobytes())
    ingest([src, d / "shard.tar"], d / "ds", IngestConfig(buckets=TINY, progress=False))
    return d / "ds"


@pytest.fixture(scope="module")
def encoded(ingested, tmp_path_factory) -> tuple[Path, object]:
    """One single-process encode (with a decode worker process), shared by several tests."""
    ds_dir = _copy(ingested, tmp_path_factory.mktemp("one") / "ds")
    return ds_dir, enc.encode(ds_dir, ecfg(num_workers=1))


def _copy(ds: Path, to: Path) -> Path:
    shutil.copytree(ds, to, ignore=shutil.ignore_patterns("latents"))
    return to


def test_exif_rotation_pixels_and_size():
    upright = noise(48, 64, 5)  # w=48, h=64: exactly the 48x64 bucket
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "PNG", exif=exif.tobytes())
    data = buf.getvalue()
    with pixel_limit(10**8):
        info = probe(data, name="r.png", max_pixels=10**8, animated="reject", verify="header")
    assert (info.width, info.height, info.orientation) == (48, 64, 6)
    p = place(info.height, info.width, BucketSet(TINY.buckets()), seed=0, image_id="r")
    assert p.bucket == Bucket(64, 48) and (p.crop_top, p.crop_left) == (0, 0)
    out = load_for_bucket(data, p, orientation=info.orientation)
    np.testing.assert_array_equal(out, np.asarray(upright))


def test_jpeg_draft_decodes_smaller_with_same_result():
    big = noise(1024, 768, 3)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    p = Placement(Bucket(48, 64), 768, 1024, 48, 64, 0, 0)  # 16x downscale
    drafted = load_for_bucket(buf.getvalue(), p, orientation=1, draft_margin=1.0).astype(float)
    full = load_for_bucket(buf.getvalue(), p, orientation=1, draft_margin=0).astype(float)
    assert drafted.shape == full.shape == (48, 64, 3)
    assert np.abs(drafted - full).mean() < 4.0  # same picture, different filter
    im = Image.open(io.BytesIO(buf.getvalue()))
    im.draft("RGB", (64, 48))
    assert im.size == (128, 96)  # libjpeg decoded at 1/8 scale: the draft path is really taken


def _expected_latent(ds: LatentDataset, i: int, vae, seed: int) -> np.ndarray:
    """Recompute one latent from scratch: decode, crop, VAE posterior, keyed noise."""
    row = ds.table.slice(i, 1).to_pylist()[0]
    data = enc.Ref(row["path"].split("::")[0], row["tar_offset"], row["file_size"]).read()
    b = Bucket(row["bucket_height"], row["bucket_width"])
    p = place(row["height"], row["width"], BucketSet(TINY.buckets()), seed=seed, image_id=row["id"])
    assert (p.bucket, p.crop_top, p.crop_left) == (b, row["crop_top"], row["crop_left"])
    assert (row["original_height"], row["original_width"]) == (row["height"], row["width"])
    pix = torch.from_numpy(np.array(load_for_bucket(data, p, orientation=row["orientation"]))).permute(
        2, 0, 1
    )[None]
    with torch.inference_mode():
        dist = vae.encode(pix.float() / 127.5 - 1).latent_dist
        eps = enc.latent_noise(seed, row["id"], tuple(dist.mean.shape[1:]))
        lat = (dist.mean[0] + dist.std[0] * eps) * vae.config.scaling_factor
    return lat.half().numpy()


def test_encode_round_trip_and_resume(ingested, encoded):
    ds_dir, s = encoded
    assert s.encoded == 10 and s.skipped == 0 and not s.rejects
    assert sum(s.per_bucket.values()) == 10 and s.shards >= 3
    ds = LatentDataset(str(ds_dir))
    assert len(ds) == 10
    vae = enc.load_vae("tiny")
    rot = ds.table.column("path").to_pylist().index(str(ingested.parent / "src" / "rot.jpg"))
    in_tar = [p.endswith("::x/in-tar.png") for p in ds.table.column("path").to_pylist()].index(True)
    for i in (0, rot, in_tar):
        got = ds.read_latent(i)
        assert got.dtype == torch.float16 and tuple(got.shape) == ds.latent_shape(i)
        np.testing.assert_allclose(got.float().numpy(), _expected_latent(ds, i, vae, 0), atol=2e-3, rtol=1e-3)
    assert (ds.table["height"][rot].as_py(), ds.table["width"][rot].as_py()) == (120, 90)
    # resume: everything is done, nothing is re-encoded
    again = enc.encode(ds_dir, ecfg())
    assert again.encoded == 0 and again.skipped == 10


def test_interrupted_encode_resumes_without_loss_or_duplicates(ingested, tmp_path, monkeypatch):
    ds_dir = _copy(ingested, tmp_path / "ds")
    real, calls = enc.encode_batch, [0]

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(enc, "encode_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        enc.encode(ds_dir, ecfg(batch_size=2, shard_size=2))
    partial = len(LatentDataset(str(ds_dir)))
    assert 0 < partial < 10
    assert not any(p.name.startswith(".tmp") for p in (ds_dir / layout.SHARDS_DIR).rglob("*"))
    monkeypatch.setattr(enc, "encode_batch", real)
    s = enc.encode(ds_dir, ecfg(batch_size=2, shard_size=2))
    assert s.skipped == partial and s.encoded == 10 - partial
    ids = [
        r["id"] for p in (ds_dir / layout.INDEX_DIR).glob("*.parquet") for r in pq.read_table(p).to_pylist()
    ]
    assert len(ids) == len(set(ids)) == 10


def test_non_finite_latents_are_rejected_not_stored(ingested, tmp_path):
    ds_dir = _copy(ingested, tmp_path / "ds")
    s = enc.encode(ds_dir, ecfg(scaling_factor=1e9))  # overflows fp16 storage
    assert s.encoded == 0 and s.rejects == {"non_finite": 10}
    assert len(LatentDataset(str(ds_dir))) == 0
    from bigasp.store.info import dataset_info

    assert dataset_info(str(ds_dir))["rejects"] == {"encode:non_finite": 10}
    again = enc.encode(ds_dir, ecfg())  # recorded rejects are not tried again, nor called "done"
    assert again.skipped == 0 and again.rejected_before == 10 and again.encoded == 0
    retry = enc.encode(ds_dir, ecfg(retry_rejects=True))
    assert retry.encoded == 10 and len(LatentDataset(str(ds_dir))) == 10


def test_cli_counts_earlier_rejects_apart_with_the_retry_hint(ingested, tmp_path):
    """The installed `bigasp encode` after a pass that rejected every image: not "already done"."""
    ds_dir = _copy(ingested, tmp_path / "ds")
    exe = Path(sys.executable).with_name("bigasp")
    base = [str(exe), "encode", str(ds_dir), "--vae", "tiny", "--num-workers", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*base, "--set", "scaling_factor=1e9"], capture_output=True, text=True, env=env)
    assert first.returncode == 0 and "0 encoded" in first.stdout and "10 rejected," in first.stdout, (
        first.stderr
    )
    again = subprocess.run(base, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert "0 already done" in again.stdout and "10 rejected before" in again.stdout, again.stdout
    hint = again.stderr.strip().splitlines()[-1]
    assert (
        hint.startswith("10 image(s) an earlier encode rejected were not tried again")
        and "--retry-rejects" in hint
    )
    retry = subprocess.run([*base, "--retry-rejects"], capture_output=True, text=True, env=env)
    assert retry.returncode == 0 and "10 encoded" in retry.stdout, retry.stderr
    assert len(LatentDataset(str(ds_dir))) == 10


def test_vae_folder_loads_same_weights(tmp_path):
    folder = tmp_path / "vae"
    ref = enc.load_vae("tiny")
    ref.save_pretrained(folder, safe_serialization=True)
    got = enc.load_vae(str(folder)).state_dict()
    assert got.keys() == ref.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    with pytest.raises(Exception, match="does not exist"):
        enc.load_vae(str(tmp_path / "nope"))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(ingested, encoded, tmp_path):
    one = encoded[0]
    two = _copy(ingested, tmp_path / "two")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bigasp", "encode", str(two), "--vae", "tiny", "--num-workers", "0", "--batch-size", "3",
           "--shard-size", "4", "--no-progress", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"world_size": 2' in proc.stdout and '"encoded": 10' in proc.stdout
    ranks = {p.name.split("-r")[1][:5] for p in (two / layout.SHARDS_DIR).rglob("*.bls")}
    assert ranks == {"00000", "00001"}  # both ranks wrote their own shards
    d1, d2 = LatentDataset(str(one)), LatentDataset(str(two))
    cols = ["id", *INDEX_COLUMNS[INDEX_COLUMNS.index("bucket_height") :]]  # which image, how it was cut
    assert d1.table.select(cols).equals(d2.table.select(cols))
    for i in range(len(d1)):
        # Same image, crop and noise; only the conv kernels' float summation order may differ
        # with batch composition, i.e. at most an fp16 rounding step.
        np.testing.assert_allclose(d1.read_latent(i).numpy(), d2.read_latent(i).numpy(), rtol=2e-3, atol=2e-4)
    fs, root = layout.url_to_fs(str(two))
    assert len(read_index(fs, root)) == 10


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_encode_matches_cpu(encoded, ingested, tmp_path, dtype):
    """GPU twin of the round-trip test: same crops/noise, latents equal within precision."""
    ds_dir = _copy(ingested, tmp_path / "gpu")
    s = enc.encode(ds_dir, ecfg(device="cuda", dtype=dtype, num_workers=2))
    assert s.encoded == 10
    cpu, gpu = LatentDataset(str(encoded[0])), LatentDataset(str(ds_dir))
    cols = ["id", "bucket_height", "bucket_width", "crop_top", "crop_left"]
    assert cpu.table.select(cols).equals(gpu.table.select(cols))
    tol = 2e-3 if dtype == "fp32" else 5e-2
    for i in range(len(cpu)):
        np.testing.assert_allclose(gpu.read_latent(i).float(), cpu.read_latent(i).float(), atol=tol, rtol=tol)


def test_encode_rejects_changed_missing_and_undecodable_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for k, name in enumerate(("ok", "changed", "gone")):
        noise(100, 100, 60 + k).save(src / f"{name}.jpg", quality=90)
    buf = io.BytesIO()
    noise(100, 100, 7).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    start = png.index(b"IDAT") + 4
    png[start + 10 : start + 40] = bytes(30)  # corrupt the compressed pixels; header and IEND intact
    (src / "broken.png").write_bytes(bytes(png))
    ds = tmp_path / "ds"
    ingest([src], ds, IngestConfig(buckets=TINY, progress=False))  # header checks pass
    (src / "changed.jpg").write_bytes((src / "changed.jpg").read_bytes() + b"\0")
    (src / "gone.jpg").unlink()
    s = enc.encode(ds, ecfg())
    assert s.encoded == 1
    assert s.rejects == {"changed_since_ingest": 1, "unreadable": 1, "decode_failed": 1}
    rej = pq.read_table(next((ds / layout.ENCODE_REJECTS_DIR).glob("*.parquet"))).to_pylist()
    assert all(r["stage"] == "encode" and r["detail"] and r["id"] for r in rej)
