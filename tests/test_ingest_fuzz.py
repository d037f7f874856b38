"""Seeded, time-bounded fuzzing of ingest: thousands of mutated images, sidecars, file names and
tar shards must end as manifest rows or rejects with a reason, never as a traceback, an
`internal_error` reject, invalid JSON in `extra`, or a re-run that reads anything again."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from bigasp.prep.ingest import ingest
from bigasp.store import layout
from test_ingest import cfg

SEED = 20261129
BUDGET_S = 20.0  # generation + ingest, checked between batches
BATCH = 400
MAX_CASES = 4000


def _bases(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    out = []
    for fmt, ext, kw in (("JPEG", "jpg", {"quality": 80}), ("PNG", "png", {}), ("WEBP", "webp", {}),
                         ("TIFF", "tif", {}), ("BMP", "bmp", {})):  # fmt: skip
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)).save(buf, fmt, **kw)
        out.append((ext, buf.getvalue()))
    frames = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    for fmt, ext in (("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")):  # animated GIF, APNG, WebP
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=40)
        out.append((ext, buf.getvalue()))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    frames[0].save(buf, "JPEG", exif=exif.tobytes())
    out.append(("jpg", buf.getvalue()))
    return out


def mutate(r: random.Random, data: bytes, others: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(r.randint(1, 4)):
        op = r.randrange(7)
        if op == 0 and b:  # truncate
            del b[r.randrange(len(b)) :]
        elif op == 1 and b:  # flip bytes
            for _ in range(r.randint(1, 16)):
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        elif op == 2:  # insert random bytes
            at = r.randrange(len(b) + 1)
            b[at:at] = r.randbytes(r.randint(1, 64))
        elif op == 3 and b:  # delete a run
            at = r.randrange(len(b))
            del b[at : at + r.randint(1, 256)]
        elif op == 4:  # splice another image's tail or head
            o = r.choice(others)
            cut = r.randrange(len(o))
            b = b[: r.randrange(len(b) + 1)] + bytearray(o[cut:])
        elif op == 5 and len(b) > 32:  # overwrite header fields with extreme values
            at = r.randrange(min(len(b) - 4, 64))
            b[at : at + 4] = r.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff"])
        elif op == 6:
            pass  # keep intact (valid images must still pass through mutated sidecars)
    return bytes(b)


WEIRD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "-0", "4.0", "1e-400",
                 "12345678901234567890", "0.1", "7"]  # fmt: skip
KEYS = ["caption", "captions", "tags", "score", "source", "watermark", "extra", "k\\ud800", "nested"]


def weird_value(r: random.Random, depth: int = 0) -> str:
    c = r.randrange(10)
    if c == 0:
        return r.choice(WEIRD_NUMBERS)
    if c == 1:
        return json.dumps(r.choice(["", " ", "a, b,, c", "\u00e9\u4e2d\U0001f600", "x" * 3000]))
    if c == 2:
        return '"' + r.choice(["\\ud800", "\\udfff", "\\u0000", "a\\nb", "\\\\"]) + '"'
    if c == 3:
        return r.choice(["true", "false", "null"])
    if c == 4 and depth < 4:
        return "[" + ", ".join(weird_value(r, depth + 1) for _ in range(r.randint(0, 4))) + "]"
    if c == 5 and depth < 4:
        return (
            "{"
            + ", ".join(f'"{r.choice(KEYS)}": {weird_value(r, depth + 1)}' for _ in range(r.randint(0, 3)))
            + "}"
        )
    if c == 6:
        n = r.choice([10, 70, 3000])
        return "[" * n + "]" * n
    return str(r.randint(-5, 15))


def sidecar_json(r: random.Random) -> bytes:
    text = "{" + ", ".join(f'"{r.choice(KEYS)}": {weird_value(r)}' for _ in range(r.randint(0, 6))) + "}"
    if r.random() < 0.2:  # break the JSON itself
        text = mutate(r, text.encode(), [b"{}"]).decode("utf-8", "replace")
    raw = text.encode("utf-8", "surrogatepass")
    return r.choice([raw, b"\xef\xbb\xbf" + raw, raw[: len(raw) // 2], b"\xff\xfe" + raw])


def file_name(r: random.Random, i: int, ext: str) -> bytes:
    stem = r.choice([b"img", b"caf\xe9", b"\xff\xfe", "na\u00efve \u4e2d".encode(), b"-dash", b"sp ace",
                     b"new\nline", b"UPPER", b"a.b.c"])  # fmt: skip
    ext_b = r.choice([ext.encode(), ext.upper().encode(), b"jpg", b"png", b"", b"txt.jpg"])
    return b"%s-%05d.%s" % (stem, i, ext_b) if ext_b else b"%s-%05d" % (stem, i)


def write_case(r, d: bytes, i: int, bases, blobs) -> list[tuple[bytes, bytes]]:
    """Files (name, bytes) of one case: an image and perhaps sidecars."""
    ext, data = r.choice(bases)
    name = file_name(r, i, ext)
    files = [(name, mutate(r, data, blobs) if r.random() < 0.8 else data)]
    stem = name.rsplit(b".", 1)[0]
    if r.random() < 0.5:
        files.append((stem + b".json", sidecar_json(r)))
    if r.random() < 0.3:
        files.append(
            (stem + b".txt", r.choice([b"a caption", r.randbytes(40), "\u00e9".encode("latin-1"), b""]))
        )
    return files


def write_tar(r: random.Random, path: bytes, files: list[tuple[bytes, bytes]]) -> None:
    opts = dict(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")
    with tarfile.open(os.fsdecode(path), "w", **opts) as tf:
        for name, data in files:
            info = tarfile.TarInfo(os.fsdecode(name).replace("\n", "_"))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for j in range(r.randint(0, 2)):
            info = tarfile.TarInfo(f"link{j}.jpg")
            info.type = r.choice([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
            info.linkname = os.fsdecode(files[0][0])
            tf.addfile(info)
    size = os.path.getsize(path)
    if r.random() < 0.5:  # truncate or damage the shard itself
        with open(path, "r+b") as f:
            if r.random() < 0.5:
                f.truncate(r.randrange(size))
            else:
                f.seek(r.randrange(size))
                f.write(r.randbytes(r.randint(1, 600)))


def test_fuzzed_inputs_never_raise(tmp_path):
    r = random.Random(SEED)
    bases = _bases(np.random.default_rng(SEED))
    blobs = [b for _, b in bases]
    out = tmp_path / "ds"
    start = time.monotonic()
    cases = batches = 0
    runs: list[tuple[list[str], dict]] = []
    while cases < MAX_CASES and time.monotonic() - start < BUDGET_S:
        d = os.fsencode(tmp_path / f"b{batches}")
        os.mkdir(d)
        tars: list[list[tuple[bytes, bytes]]] = []
        listed = []
        for i in range(BATCH):
            files = write_case(r, d, cases + i, bases, blobs)
            where = r.random()
            if where < 0.15:
                tars.append(files)
                continue
            for name, data in files:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(data)
            if where < 0.25:
                listed.append(os.path.join(d, files[0][0]))
        for j in range(0, len(tars), 10):
            write_tar(r, os.path.join(d, b"shard-%d.tar" % j), [f for case in tars[j : j + 10] for f in case])
        lst = os.path.join(d, b"list.txt")
        with open(lst, "wb") as f:
            f.write(b"\n".join([*listed, b"/nonexistent/x.jpg", b"caf\xe9.jpg"]))
        sources = [os.fsdecode(d)] + [
            os.fsdecode(os.path.join(d, b"shard-%d.tar" % j)) for j in range(0, len(tars), 10)
        ]
        sources.append(os.fsdecode(lst))
        settings = dict(workers=2 if batches % 3 == 2 else 1, verify=r.choice(["header", "decode"]))
        runs.append((sources, settings))
        s = ingest(sources, out, cfg(**settings))
        assert "internal_error" not in s.rejects, (
            pq.read_table(out / layout.REJECTS)
            .filter(
                pq.read_table(out / layout.REJECTS).column("reason").to_numpy(zero_copy_only=False)
                == "internal_error"
            )
            .to_pylist()[:3]
        )
        assert s.new + s.duplicates + sum(s.rejects.values()) + s.skipped == s.scanned
        cases += BATCH
        batches += 1
    manifest = pq.read_table(out / layout.MANIFEST).to_pylist()
    for row in manifest:
        json.loads(row["extra"], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        assert row["score"] is None or 0 <= row["score"] <= 9
    assert len(manifest) > 100 and cases >= 1200, (len(manifest), cases)
    for sources, settings in runs:  # the same runs again: every result is reused, nothing pruned
        again = ingest(sources, out, cfg(**settings))
        assert again.skipped == again.scanned and again.removed == 0
    print(
        f"fuzz: {cases} cases in {batches} batches, {len(manifest)} images kept, {time.monotonic() - start:.1f} s"
    )
