"""`bigasp encode`: VAE-encode every manifest image into bucket-grouped latent shards.

Pipeline per rank: plan (bucket + crop of every image, a pure function of its size, id and
the seed) -> DataLoader workers decode/resize/crop whole bucket batches -> the VAE encodes
on the accelerator -> a writer thread compresses, checksums and appends to shards. Each
rank takes every world_size-th image of the (bucket, id)-sorted plan, so ranks never
overlap and need no coordination; finished work is whatever the committed shard indexes
list, so a restart (with any world size) skips it. The dataset may live on object storage
(`s3://bucket/ds`): shards and index files are then written straight to it, each as one
object (see `ShardWriter`). Latent noise is drawn per image from a
generator keyed by (seed, id), so the result does not depend on batching or rank count.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bigasp.buckets import Bucket, BucketConfig, BucketSet, Placement, place
from bigasp.devices import resolve
from bigasp.errors import ConfigError, DataError, ModelLoadError
from bigasp.holdpoint import hold
from bigasp.prep.config import EncodeConfig
from bigasp.prep.images import Reject, load_for_bucket, pixel_limit
from bigasp.prep.ingest import read_ingested
from bigasp.prep.sources import Ref, manifest_ref
from bigasp.store import layout, remote
from bigasp.store.manifest import REJECTS_SCHEMA, read_dataset_json, read_index, read_manifest, read_rejects
from bigasp.store.shard import RecordMeta, ShardWriter, list_shards, rebuild_missing_indexes
from bigasp.workshare import dist_env, gather_summary, summary_group

log = logging.getLogger(__name__)


def load_vae(spec: str):
    """A diffusers AutoencoderKL from a preset, a VAE folder, or a full model (folder or file)."""
    from bigasp.models.io import load_model
    from bigasp.models.presets import PRESETS

    if not spec:
        raise ConfigError(
            "encode needs a VAE: pass --vae (a preset such as tiny, a VAE folder or a model path)"
        )
    path = Path(spec).expanduser()
    if spec not in PRESETS and path.is_dir() and (path / "config.json").is_file():
        from diffusers import AutoencoderKL

        try:
            return AutoencoderKL.from_pretrained(
                str(path), local_files_only=True, use_safetensors=True
            ).eval()
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load the VAE folder {path}: {err}") from None
    return load_model(spec, components=["vae"]).vae


def _key(seed: int, image_id: str, purpose: str) -> int:
    d = hashlib.blake2b(f"{seed}:{image_id}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


@dataclass
class Job:
    id: str
    ref: Ref
    orientation: int
    placement: Placement
    variant: int = 0


def variant_key(image_id: str, variant: int) -> str:
    """What keys variant `variant`'s crop and latent noise (with the seed): the image id for
    variant 0 (so a dataset encoded before variants existed is variant 0), else `id:variant`."""
    return image_id if variant == 0 else f"{image_id}:{variant}"


PLAN_COLUMNS = ("id", "path", "tar_offset", "file_size", "width", "height", "orientation", "row")


def plan(
    manifest: pa.Table,
    buckets: BucketSet,
    seed: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    variants: int = 1,
) -> list[Job]:
    """This rank's (image, variant) jobs with bucket and crop: every world_size-th entry of the
    whole manifest sorted by (bucket, id, variant). The order depends only on the manifest and
    `variants`, so ranks never overlap."""
    h = manifest.column("height").to_numpy(zero_copy_only=False)
    w = manifest.column("width").to_numpy(zero_copy_only=False)
    bidx = buckets.nearest_indices(h, w)
    bh = np.array([b.height for b in buckets.buckets], dtype=np.int32)[bidx]
    bw = np.array([b.width for b in buckets.buckets], dtype=np.int32)[bidx]
    keys = pa.table({"bh": bh, "bw": bw, "id": manifest.column("id")})
    order = pc.sort_indices(keys, sort_keys=[("bh", "ascending"), ("bw", "ascending"), ("id", "ascending")])
    expanded = np.repeat(order.to_numpy(), variants)  # (bucket, id, variant) order
    variant_of = np.tile(np.arange(variants), len(order))[rank::world_size]
    mine = manifest.select(list(PLAN_COLUMNS)).take(expanded[rank::world_size])
    cols = mine.to_pydict()
    jobs = []
    for i in range(len(mine)):
        path, off, iid = cols["path"][i], cols["tar_offset"][i], cols["id"][i]
        v = int(variant_of[i])
        ref = manifest_ref(path, off, cols["file_size"][i], cols["row"][i])
        p = place(cols["height"][i], cols["width"][i], buckets, seed=seed, image_id=variant_key(iid, v))
        jobs.append(Job(iid, ref, cols["orientation"][i] or 1, p, v))
    return jobs


def latent_noise(seed: int, image_id: str, shape: tuple[int, ...], variant: int = 0):
    """The N(0,1) draw that turns an image's latent distribution into its sample; keyed by
    (seed, id, variant) so it is the same in any process, batch or rank."""
    import torch

    key = _key(seed, variant_key(image_id, variant), "vae")
    return torch.randn(shape, generator=torch.Generator().manual_seed(key))


class DecodeDataset:
    """Map-style dataset for DataLoader workers: index -> (index, pixels | None, noise, reason, detail).

    Workers also draw each image's latent noise (when `noise_channels` is set), which keeps
    the per-image generators off the accelerator's critical path.
    """

    def __init__(
        self,
        jobs: list[Job],
        draft_margin: float,
        max_pixels: int,
        *,
        seed: int = 0,
        noise_channels: int | None = None,
    ):
        self.jobs = jobs
        self.draft_margin = draft_margin
        self.max_pixels = max_pixels
        self.seed = seed
        self.noise_channels = noise_channels

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        job = self.jobs[i]
        try:
            with pixel_limit(self.max_pixels):
                data = read_ingested(job.ref, job.id)
                try:
                    arr = load_for_bucket(
                        data, job.placement, orientation=job.orientation, draft_margin=self.draft_margin
                    )
                except Reject:
                    raise
                except Exception as err:
                    raise Reject("decode_failed", f"{type(err).__name__}: {err}") from None
        except Reject as r:
            return i, None, None, r.reason, r.detail
        noise = None
        if self.noise_channels:
            b = job.placement.bucket
            noise = latent_noise(
                self.seed, job.id, (self.noise_channels, b.height // 8, b.width // 8), job.variant
            )
        return i, arr, noise, "", ""


def collate(items):
    """-> (indices, uint8 pixels [B,3,H,W] | None, noise [B,C,h,w] | None, [(index, reason, detail)])."""
    import torch

    ok = [(i, a, n) for i, a, n, _, _ in items if a is not None]
    bad = [(i, r, d) for i, a, _, r, d in items if a is None]
    pixels = torch.from_numpy(np.stack([a for _, a, _ in ok])).permute(0, 3, 1, 2) if ok else None
    noise = torch.stack([n for _, _, n in ok]) if ok and ok[0][2] is not None else None
    return [i for i, _, _ in ok], pixels, noise, bad


def bucket_batches(jobs: list[Job], batch_size: int) -> list[list[int]]:
    """Consecutive runs of `jobs` (sorted by bucket) cut into batches that never mix buckets."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i, job in enumerate(jobs):
        if cur and (len(cur) == batch_size or jobs[cur[0]].placement.bucket != job.placement.bucket):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class _ShardSink(threading.Thread):
    """Writes latents off the critical path: one open shard per bucket, rotated at shard_size."""

    def __init__(self, root: str | Path, stem_prefix: str, cfg: EncodeConfig, header: dict[str, Any]):
        super().__init__(daemon=True, name="bigasp-shard-writer")
        self.root, self.prefix, self.cfg, self.header = root, stem_prefix, cfg, header
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.open: dict[Bucket, ShardWriter] = {}
        self.seq = 0
        self.error: BaseException | None = None
        self.shards = 0

    def run(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                bucket, latents, metas = item
                for lat, meta in zip(latents, metas, strict=True):
                    w = self.open.get(bucket)
                    if w is None:
                        self.seq += 1
                        w = self.open[bucket] = ShardWriter(
                            self.root,
                            f"{self.prefix}-{self.seq:06d}",
                            bucket.height,
                            bucket.width,
                            channels=lat.shape[0],
                            compression=self.cfg.compression,
                            level=self.cfg.zstd_level,
                            header=self.header,
                            storage_options=self.cfg.storage_options,
                        )
                    w.add(lat, meta)
                    if len(w) >= self.cfg.shard_size:
                        w.close()
                        self.shards += 1
                        del self.open[bucket]
            for w in self.open.values():
                w.close()
                self.shards += 1
            self.open.clear()
        except BaseException as err:  # surfaced in the main thread
            self.error = err
            if isinstance(err, OSError):  # a full disk, a lost mount: say where, keep what is committed
                where = next(iter(self.open.values())).final if self.open else self.root
                self.error = DataError(
                    f"writing latents under {where} failed ({err}); the shards finished so far are kept and "
                    "no partial file is left: free space (or fix the disk) and re-run `bigasp encode` to continue"
                )
            for w in self.open.values():
                w.abort()
            self.open.clear()

    def put(self, item) -> None:
        while self.is_alive():
            try:
                self.q.put(item, timeout=1.0)
                return
            except queue.Full:
                continue
        raise _SinkStopped


class _SinkStopped(Exception):
    """The writer thread has ended (its error is `_ShardSink.error`)."""


@dataclass
class EncodeSummary:
    rank: int = 0
    world_size: int = 1
    planned: int = 0  # this rank's share of the manifest
    skipped: int = 0  # already encoded by an earlier run
    rejected_before: int = 0  # rejected by an earlier encode and not retried (`retry_rejects`)
    encoded: int = 0
    rejects: Counter = field(default_factory=Counter)
    per_bucket: Counter = field(default_factory=Counter)  # "WxH" -> latents written now
    shards: int = 0
    seconds: float = 0.0  # whole call, including planning and loading the VAE
    encode_seconds: float = 0.0  # from the first batch to the last shard written

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "planned": self.planned,
            "skipped": self.skipped,
            "rejected_before": self.rejected_before,
            "encoded": self.encoded,
            "rejects": dict(sorted(self.rejects.items())),
            "per_bucket": dict(sorted(self.per_bucket.items(), key=lambda kv: -kv[1])),
            "shards": self.shards,
            "seconds": round(self.seconds, 3),
            "encode_seconds": round(self.encode_seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
        }

    def merge(self, other: EncodeSummary) -> None:
        self.planned += other.planned
        self.skipped += other.skipped
        self.rejected_before += other.rejected_before
        self.encoded += other.encoded
        self.rejects.update(other.rejects)
        self.per_bucket.update(other.per_bucket)
        self.shards += other.shards
        self.seconds = max(self.seconds, other.seconds)
        self.encode_seconds = max(self.encode_seconds, other.encode_seconds)


def encode_batch(vae, pixels, noise, scaling: float, device, dtype) -> np.ndarray:
    """uint8 [B,3,H,W] -> fp16 latents [B,C,H/8,W/8] (numpy; may hold non-finite values).

    `noise` None = the distribution mean; else mean + std * noise (diffusers' sample()).
    """
    import torch

    x = pixels.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0
    with torch.inference_mode():
        dist = vae.encode(x).latent_dist
        lat = dist.mean.float()
        if noise is not None:
            lat = lat + dist.std.float() * noise.to(device, non_blocking=True)
        lat = lat * scaling
    return lat.to(torch.float16).cpu().numpy()


ENCODE_LOCK = ".encode.lock"


def encode(dataset: str | os.PathLike, cfg: EncodeConfig) -> EncodeSummary:
    """Encode this rank's share of `dataset`; returns the summary (merged over ranks on rank 0).

    The dataset is locked meanwhile (each rank of one job holds its own slot), so a second
    `bigasp encode` on it stops at once instead of encoding every image again."""
    from bigasp.locks import folder_lock

    fs, rootp = layout.url_to_fs(str(dataset), cfg.storage_options)
    read_dataset_json(fs, rootp)  # a clear error before anything is created
    if not layout.is_local(fs):  # object storage has no lock files; see docs/datasets.md
        return _encode(str(dataset), cfg)
    root = Path(dataset)
    rank = dist_env()[0]
    busy = f"another `bigasp encode` is writing {root}; wait for it to finish"
    with folder_lock(root / ENCODE_LOCK, busy, slot=rank):
        return _encode(root, cfg)


def existing_encodings(root: str | Path, storage_options: dict | None = None) -> dict[tuple, list[str]]:
    """Encodings (`shard.encoding_of`) of the shards already in `root` -> their shard names."""
    from bigasp.store.shard import ENCODING_KEYS, encoding_of, read_shard_header

    fs, rootp = layout.url_to_fs(str(root), storage_options)
    out: dict[tuple, list[str]] = {}
    for rel in list_shards(fs, rootp):
        enc = encoding_of(read_shard_header(f"{rootp}/{rel}", fs))
        out.setdefault(tuple(enc[k] for k in ENCODING_KEYS), []).append(rel)
    return out


def check_same_encoding(root: str | Path, new: dict[str, Any], storage_options: dict | None = None) -> None:
    """Refuse to add latents of another encoding (VAE, scaling, seed, latent mode) to a dataset."""
    from bigasp.store.shard import ENCODING_KEYS, describe_encoding

    for enc, shards in existing_encodings(root, storage_options).items():
        old = dict(zip(ENCODING_KEYS, enc, strict=True))
        differs = [k for k in ENCODING_KEYS if old[k] is not None and old[k] != new[k]]
        if differs:
            raise DataError(
                f"{root} already holds latents made with {describe_encoding(old)} ({len(shards)} shard(s), e.g. "
                f"{shards[0]}); this encode uses {describe_encoding(new)} ({', '.join(differs)} differ). Mixed "
                "latents cannot train one model: re-run with the same --vae/--seed, or encode into a new dataset "
                f"(ingest again with another --out), or delete {root}/{layout.LATENTS_DIR} to re-encode everything"
            )


def _encode(root: str | Path, cfg: EncodeConfig) -> EncodeSummary:
    import torch
    from torch.utils.data import DataLoader

    from bigasp.models.identity import vae_identity

    t0 = time.perf_counter()
    remote.configure(cfg.storage_options)  # photos ingested from URLs: read with the dataset's options
    fs, rootp = layout.url_to_fs(str(root), cfg.storage_options)
    meta = read_dataset_json(fs, rootp)
    rank, world, local_rank = dist_env()
    device = resolve(cfg.device, local_rank=local_rank, setting="encode.device")  # before any model loads
    pg = summary_group(world, "encode")
    bcfg = cfg.buckets or BucketConfig(**meta.get("buckets", {}))
    buckets = BucketSet(bcfg.buckets())
    session = uuid.uuid4().hex[:8]
    rebuild_missing_indexes(root, storage_options=cfg.storage_options)  # index write interrupted
    manifest = read_manifest(fs, rootp, columns=list(PLAN_COLUMNS))
    if len(manifest) == 0:
        raise DataError(f"{root}/{layout.MANIFEST} has no images; run `bigasp ingest` first")
    jobs = plan(manifest, buckets, cfg.seed, rank=rank, world_size=world, variants=cfg.variants)
    rej = read_rejects(fs, rootp)
    rej = rej.filter(pc.equal(rej.column("stage"), "encode")) if not cfg.retry_rejects else rej.slice(0, 0)
    index = read_index(fs, rootp)
    done_keys = pc.binary_join_element_wise(
        index.column("id"), index.column("variant").cast(pa.string()), "#"
    ).combine_chunks()
    encoded_before = pc.is_in(
        pa.array([f"{j.id}#{j.variant}" for j in jobs], pa.string()), value_set=done_keys
    ).to_numpy(zero_copy_only=False)
    rejected_before = pc.is_in(  # a rejected image is rejected in every variant
        pa.array([j.id for j in jobs], pa.string()),
        value_set=rej.column("id").combine_chunks().cast(pa.string()),
    ).to_numpy(zero_copy_only=False)
    summary = EncodeSummary(rank=rank, world_size=world, planned=len(jobs))
    todo = [j for j, d in zip(jobs, encoded_before | rejected_before, strict=True) if not d]
    summary.rejected_before = int((rejected_before & ~encoded_before).sum())
    summary.skipped = len(jobs) - len(todo) - summary.rejected_before

    # The VAE is loaded even when nothing is left to do: "already done" must mean done with THIS
    # VAE, scaling and seed, not with whatever encoded the dataset before.
    vae = load_vae(cfg.vae)
    scaling = cfg.scaling_factor if cfg.scaling_factor is not None else float(vae.config.scaling_factor)
    encoding = {
        "vae_id": vae_identity(vae),
        "scaling_factor": scaling,
        "seed": cfg.seed,
        "latent": cfg.latent,
    }
    check_same_encoding(root, encoding, cfg.storage_options)

    if todo:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
        vae = vae.to(device)
        if next(vae.parameters()).dtype != dtype:
            vae = vae.to(dtype=dtype)
        vae.eval()
        header = {
            "vae": cfg.vae,
            **encoding,
            "vae_dtype": cfg.dtype,
            "buckets": bcfg.model_dump(),
        }
        sink = _ShardSink(root, f"{session}-r{rank:05d}", cfg, header)
        sink.start()
        reject_rows: list[dict] = []
        loader = DataLoader(
            DecodeDataset(
                todo,
                cfg.draft_margin,
                cfg.max_pixels,
                seed=cfg.seed,
                noise_channels=int(vae.config.latent_channels) if cfg.latent == "sample" else None,
            ),
            batch_sampler=bucket_batches(todo, cfg.batch_size),
            num_workers=cfg.num_workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if cfg.num_workers > 0 else None,
        )
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc=f"encode r{rank}", disable=not cfg.progress or rank != 0)
        t_enc = time.perf_counter()
        interrupted = False
        try:
            for idx, pixels, noise, bad in loader:
                for i, reason, detail in bad:
                    reject_rows.append(_reject(todo[i], reason, detail))
                if pixels is not None:
                    ids = [todo[i].id for i in idx]
                    lat = encode_batch(vae, pixels, noise, scaling, device, dtype)
                    finite = np.isfinite(lat).reshape(len(ids), -1).all(axis=1)
                    keep = [k for k in range(len(ids)) if finite[k]]
                    for k in range(len(ids)):
                        if not finite[k]:
                            reject_rows.append(
                                _reject(todo[idx[k]], "non_finite", "VAE produced inf/nan (try --dtype fp32)")
                            )
                    if keep:
                        p0 = todo[idx[0]].placement
                        metas = [_meta(todo[idx[k]]) for k in keep]
                        sink.put((p0.bucket, lat[keep], metas))
                        summary.per_bucket[p0.bucket.name] += len(keep)
                        summary.encoded += len(keep)
                bar.update(len(idx) + len(bad))
                hold("encode.batch")
        except _SinkStopped:
            pass  # its error is raised below
        except KeyboardInterrupt:
            interrupted = True  # commit what is encoded (below), then say so
        finally:
            bar.close()
            with contextlib.suppress(_SinkStopped):
                sink.put(None)
            sink.join()
        if sink.error is not None:
            raise sink.error
        summary.encode_seconds = time.perf_counter() - t_enc
        summary.shards = sink.shards
        for r in reject_rows:
            summary.rejects[r["reason"]] += 1
        if reject_rows:
            layout.write_parquet(
                fs,
                f"{rootp}/{layout.ENCODE_REJECTS_DIR}/{session}-r{rank:05d}.parquet",
                pa.Table.from_pylist(reject_rows, schema=REJECTS_SCHEMA),
            )
        if interrupted:
            raise KeyboardInterrupt(
                f"encode stopped by Ctrl-C: {summary.encoded} latent(s) committed in {summary.shards} shard(s) and "
                f"{len(reject_rows)} reject(s) recorded this run (plus {summary.skipped} done before); "
                f"re-run `bigasp encode {root}` to continue"
            )
    summary.seconds = time.perf_counter() - t0
    if pg:
        summary = gather_summary(summary)
    return summary


def _meta(job: Job) -> RecordMeta:
    p = job.placement
    return RecordMeta(
        job.id, p.original_height, p.original_width, p.crop_top, p.crop_left, variant=job.variant
    )


def _reject(job: Job, reason: str, detail: str) -> dict[str, Any]:
    return {
        "path": job.ref.file if job.ref.offset is None else f"{job.ref.file}@{job.ref.offset}",
        "reason": reason,
        "detail": detail,
        "file_size": job.ref.size,
        "mtime": None,
        "id": job.id,
        "stage": "encode",
    }
