"""Datasets against damage and careless use: `verify` checks shard headers and footers and one
encoding per dataset; encode refuses another VAE or seed and a second concurrent encoder, names
every damaged file, and leaves no temp file on a full disk; import-bigasp rejects bad latents and
scores and never leaves shards without a manifest; training checks the dataset against the model."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bigasp.buckets import BucketConfig
from bigasp.errors import BigaspError, DataError
from bigasp.prep import encode as enc
from bigasp.prep.config import EncodeConfig, IngestConfig
from bigasp.prep.ingest import ingest
from bigasp.store import LatentDataset, RecordMeta, ShardWriter, layout
from bigasp.store.legacy import LegacyLatent, write_bigasp_latent
from bigasp.store.manifest import read_index

TINY = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)
BIGASP = Path(sys.executable).with_name("bigasp")


def ecfg(**kw) -> EncodeConfig:
    return EncodeConfig(
        **{**dict(vae="tiny", num_workers=0, batch_size=2, progress=False, shard_size=2), **kw}
    )


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rob")
    src = d / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / f"im{k}.png")
    ingest([src], d / "ds", IngestConfig(buckets=TINY, progress=False))
    return d / "ds"


@pytest.fixture(scope="module")
def encoded(ingested, tmp_path_factory) -> Path:
    ds = _copy(ingested, tmp_path_factory.mktemp("enc") / "ds")
    assert enc.encode(ds, ecfg()).encoded == 6
    return ds


def _copy(ds: Path, to: Path, latents: bool = False) -> Path:
    shutil.copytree(ds, to, ignore=None if latents else shutil.ignore_patterns("latents"))
    return to


def _other_vae(folder: Path) -> Path:
    vae = enc.load_vae("tiny")
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIGASP), *args], capture_output=True, text=True, timeout=120)


# ---- encode: one encoding per dataset, one encoder at a time -------------------------------------


def test_encode_with_another_vae_or_seed_is_refused_even_when_all_done(encoded, tmp_path):
    ds = _copy(encoded, tmp_path / "ds", latents=True)
    assert enc.encode(ds, ecfg()).skipped == 6  # same VAE and seed: really done
    with pytest.raises(DataError, match=r"already holds latents made with VAE vae-.*\(seed differ\)"):
        enc.encode(ds, ecfg(seed=1))
    with pytest.raises(DataError, match=r"\(vae_id differ\).*delete .*latents to re-encode"):
        enc.encode(ds, ecfg(vae=str(_other_vae(tmp_path / "vae"))))
    # A resumed encode with another VAE: some shards exist, the rest would be mixed in. Refused too.
    for p in sorted((ds / layout.SHARDS_DIR).rglob("*.bls"))[1:]:
        p.unlink()
        (ds / layout.INDEX_DIR / (p.stem + ".parquet")).unlink()
    with pytest.raises(DataError, match="vae_id differ"):
        enc.encode(ds, ecfg(vae=str(tmp_path / "vae")))
    assert len(LatentDataset(str(ds))) == 2 and LatentDataset(str(ds)).verify() == []


def test_second_encoder_on_one_dataset_is_refused(ingested, tmp_path):
    """Another process holds the encode lock (as a running `bigasp encode` does): refused at once."""
    ds = _copy(ingested, tmp_path / "ds")
    code = (
        "import sys; from bigasp.locks import folder_lock\n"
        f"with folder_lock({str(ds / enc.ENCODE_LOCK)!r}, 'x', slot=0):\n"
        "    print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BigaspError, match=rf"another `bigasp encode` is writing .*pid {holder.pid}"):
            enc.encode(ds, ecfg())
    finally:
        holder.communicate("", timeout=30)
    assert not (ds / layout.SHARDS_DIR).exists()


# ---- verify: headers, footers, encodings; exit status of the installed command ---------------------


def _shard(ds: Path) -> Path:
    return sorted((ds / layout.SHARDS_DIR).rglob("*.bls"))[0]


def test_verify_finds_corrupt_header_footer_and_mixed_encodings_and_exits_1(encoded, tmp_path):
    ds = _copy(encoded, tmp_path / "ds", latents=True)
    assert _cli("dataset", "verify", str(ds)).returncode == 0
    shard = _shard(ds)
    raw = bytearray(shard.read_bytes())
    raw[16] = ord("x")  # header JSON broken; the records and the index are intact
    tail = len(raw) - 16 - 4
    raw[tail] ^= 0xFF  # a byte of the footer JSON
    shard.write_bytes(bytes(raw))
    errors = LatentDataset(str(ds)).verify()
    assert any(str(shard) in e and "corrupt header" in e for e in errors), errors
    # the footer is checked on its own: restore the header, keep the footer damage
    raw[16] = ord("{")
    shard.write_bytes(bytes(raw))
    errors = LatentDataset(str(ds)).verify()
    assert any(str(shard) in e and "footer" in e for e in errors), errors

    # Shards of another encoding (as a resumed encode with another VAE used to write): found.
    mixed = _copy(encoded, tmp_path / "mixed", latents=True)
    w = ShardWriter(mixed, "other-000", 64, 64, header={"vae_id": "vae-0000000000000000", "scaling_factor": 0.13025,
                                                          "seed": 0, "latent": "sample"})  # fmt: skip
    w.add(np.zeros((4, 8, 8), np.float16), RecordMeta("extra-id", 64, 64, 0, 0))
    w.close()
    manifest = pq.read_table(mixed / layout.MANIFEST)
    extra = pa.Table.from_pylist(
        [{**manifest.slice(0, 1).to_pylist()[0], "id": "extra-id"}], schema=manifest.schema
    )
    layout.atomic_write_parquet(pa.concat_tables([manifest, extra]), mixed / layout.MANIFEST)
    res = _cli("dataset", "verify", str(mixed))
    assert res.returncode == 1 and "different encodings" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_encode_names_a_corrupt_shard_whose_index_is_missing(encoded, tmp_path):
    ds = _copy(encoded, tmp_path / "ds", latents=True)
    shard = _shard(ds)
    (ds / layout.INDEX_DIR / (shard.stem + ".parquet")).unlink()
    raw = bytearray(shard.read_bytes())
    raw[-16:-12] = b"\xff\xff\xff\xff"  # footer position points nowhere
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{shard}.*corrupt footer"):
        enc.encode(ds, ecfg())


# ---- a full disk during encode --------------------------------------------------------------------


def _no_temp_files(ds: Path) -> None:
    left = [p for p in ds.rglob("*") if p.name.startswith(".tmp")]
    assert left == [], left


def test_full_disk_during_encode_leaves_no_temp_file(ingested, tmp_path, monkeypatch):
    """Portable twin of the tmpfs test: the shard writer's file writes fail with ENOSPC midway."""
    from bigasp.store import shard as shard_mod

    ds = _copy(ingested, tmp_path / "ds")
    real, calls = shard_mod.encode_record, [0]

    def full(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(shard_mod, "encode_record", full)
    with pytest.raises(
        DataError, match=r"writing latents under .* failed .*No space left.*re-run `bigasp encode`"
    ):
        enc.encode(ds, ecfg())
    _no_temp_files(ds)
    monkeypatch.setattr(shard_mod, "encode_record", real)
    again = enc.encode(ds, ecfg())
    assert again.encoded + again.skipped == 6 and LatentDataset(str(ds)).verify() == []


def test_full_disk_on_a_real_tiny_filesystem(ingested, tmp_path):
    """A real ENOSPC: the dataset on a tmpfs a few KB larger than its manifest (needs mount rights,
    as CI has as root; skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    used = sum(p.stat().st_size for p in ingested.rglob("*") if p.is_file())
    size_kb = (used + 4095) // 4096 * 4 + 4 * 6  # manifest pages + room for a few small files
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                       check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err})")
    try:
        ds = _copy(ingested, mnt / "ds")
        with pytest.raises(BigaspError, match="No space left"):
            enc.encode(ds, ecfg(shard_size=1))
        _no_temp_files(ds)
        assert LatentDataset(str(ds)).verify() == []  # what was committed is whole
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


# ---- import-bigasp ---------------------------------------------------------------------------------


def test_import_bigasp_rejects_bad_latents_and_scores_and_is_all_or_nothing(tmp_path, monkeypatch):
    from bigasp.store.importer import import_bigasp

    vaes = tmp_path / "vaes"
    rows = []
    for k, (score, bad) in enumerate(
        [(5, False), (float("nan"), False), (12, False), (3, True), (None, False)]
    ):
        h = f"{k:02x}" * 16
        lat = np.full((4, 8, 8), 0.5, np.float16)
        if bad:
            lat[0, 0, 0] = np.inf
        p = vaes / h[:2] / h[2:4] / f"{h}.bin.gz"
        p.parent.mkdir(parents=True, exist_ok=True)
        write_bigasp_latent(p, LegacyLatent(lat, 64, 64, 0, 0))
        rows.append({"image_hash": h, "tag_string": "a", "caption": "c", "score": score})
    index = tmp_path / "index.parquet"
    pq.write_table(pa.Table.from_pylist(rows), index)

    # A failure midway (after shards were written) leaves nothing under --out.
    from bigasp.store import importer

    monkeypatch.setattr(
        importer, "init_dataset", lambda root: (_ for _ in ()).throw(OSError(errno.EIO, "boom"))
    )
    with pytest.raises(OSError):
        import_bigasp(vaes, tmp_path / "ds", index=index, shard_size=1)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".tmp-import-*"))
    monkeypatch.undo()

    counts = import_bigasp(vaes, tmp_path / "ds", index=index, shard_size=1)
    assert counts == {"imported": 2, "bad_score": 2, "non_finite": 1}
    ds = LatentDataset(str(tmp_path / "ds"))
    assert sorted(ds.table.column("score").to_pylist(), key=str) == [5, None]
    assert len(read_index(*layout.url_to_fs(str(tmp_path / "ds")))) == 2 and ds.verify() == []
    with pytest.raises(DataError, match="not empty"):
        import_bigasp(vaes, tmp_path / "ds", index=index)


# ---- the dataset against the model, at train start ------------------------------------------------


def test_train_start_checks_latents_exist_and_match_the_models_vae(ingested, encoded, tmp_path):
    from bigasp.models.io import load_model, save_diffusers_folder
    from bigasp.train import preflight
    from train_helpers import make_cfg

    with pytest.raises(DataError, match=r"6 ingested image\(s\) but no latents yet: run `bigasp encode"):
        preflight.check_dataset(LatentDataset(str(ingested)), None, make_cfg(tmp_path / "r", ingested))

    # A model folder whose VAE is the encode VAE: accepted. Another VAE: refused, unless check_vae=false.
    base = load_model("tiny", ("unet", "text_encoder", "text_encoder_2"))
    base.vae = enc.load_vae("tiny")
    save_diffusers_folder(base, tmp_path / "same")
    cfg = make_cfg(tmp_path / "r", encoded, model={"source": str(tmp_path / "same")})
    ds = LatentDataset(str(encoded))
    preflight.check_dataset(ds, load_model(tmp_path / "same", ("vae",)), cfg)
    base.vae = enc.load_vae(str(_other_vae(tmp_path / "vae")))
    save_diffusers_folder(base, tmp_path / "other")
    other = load_model(tmp_path / "other", ("vae",))
    cfg = make_cfg(tmp_path / "r", encoded, model={"source": str(tmp_path / "other")})
    with pytest.raises(DataError, match=r"encoded with VAE vae-\w+ but the model's VAE .* is vae-\w+"):
        preflight.check_dataset(ds, other, cfg)
    preflight.check_dataset(ds, other, make_cfg(tmp_path / "r", encoded, model={"source": str(tmp_path / "other")},
                                                data={"check_vae": False}))  # fmt: skip
    # Another scaling factor is always wrong.
    cfg_path = tmp_path / "other" / "vae" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "scaling_factor": 0.18215}))
    with pytest.raises(
        DataError, match=r"scaled by 0.13025 but the model's VAE .* uses scaling_factor 0.18215"
    ):
        preflight.check_dataset(ds, load_model(tmp_path / "other", ("vae",)), cfg)


def test_unfinished_encode_or_lost_index_is_refused_unless_allow_partial(encoded, tmp_path):
    """The installed `bigasp train` on a dataset whose encode did not finish (a shard's index file is
    lost: 2 of 6 images have no latent the store can see): one line with the count and the fix;
    `data.allow_partial = true` trains on the 4. `dataset verify` reports the unindexed shard."""
    from bigasp.config import dump_toml
    from train_helpers import make_cfg

    ds = _copy(encoded, tmp_path / "ds", latents=True)
    index = sorted((ds / layout.INDEX_DIR).glob("*.parquet"))[0]
    index.unlink()
    shard_rel = next(p for p in (ds / layout.SHARDS_DIR).rglob("*.bls") if p.stem == index.stem)
    res = _cli("dataset", "verify", str(ds))
    assert res.returncode == 1 and "has no index file" in res.stderr and shard_rel.name in res.stderr, (
        res.stderr
    )
    assert "1 problem(s)" in res.stderr

    def run(**data) -> subprocess.CompletedProcess:
        cfg = make_cfg(tmp_path / "run", ds, train={"max_samples": 4, "warmup_samples": 0}, data=data)
        path = tmp_path / "run.toml"
        path.write_text(dump_toml(cfg.model_dump(mode="json")))
        return subprocess.run([str(BIGASP), "train", str(path)], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)  # fmt: skip

    res = run()
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: 2 of 6 ingested images in {ds} have no latent; 1 shard(s) of {ds} have no index"
    ), last
    assert f"run `bigasp encode {ds}` to finish" in last and "data.allow_partial = true" in last
    assert "Traceback" not in res.stderr
    res = run(allow_partial=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "data.allow_partial = true: training on the 4 that have one" in res.stderr


def test_images_encode_rejected_do_not_count_as_missing(encoded, tmp_path):
    from bigasp.store.manifest import REJECTS_SCHEMA
    from bigasp.train import preflight
    from train_helpers import make_cfg

    ds = _copy(encoded, tmp_path / "ds", latents=True)
    index = sorted((ds / layout.INDEX_DIR).glob("*.parquet"))[0]
    ids = pq.read_table(index).column("id").to_pylist()
    next(p for p in (ds / layout.SHARDS_DIR).rglob("*.bls") if p.stem == index.stem).unlink()
    index.unlink()
    cfg = make_cfg(tmp_path / "r", ds)
    with pytest.raises(
        DataError, match=rf"^2 of 6 ingested images in {ds} have no latent: run `bigasp encode"
    ):
        preflight.check_complete(LatentDataset(str(ds)), cfg)
    rows = [
        {"path": f"/x/{i}.png", "reason": "non_finite", "detail": "", "id": i, "stage": "encode"} for i in ids
    ]
    (ds / layout.ENCODE_REJECTS_DIR).mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA), ds / layout.ENCODE_REJECTS_DIR / "r.parquet"
    )
    preflight.check_complete(LatentDataset(str(ds)), cfg)  # rejected by encode: nothing left to finish
