"""Checkpoint watcher: only complete checkpoints, fixed grid, gallery, restart without redoing work."""

from __future__ import annotations

import json
import os

import pytest

from bigasp.models import ModelKind
from bigasp.sample.watch import Watcher, complete_checkpoints, image_name, read_prompts


def make_checkpoint(ckdir, samples: int, *, complete: bool = True, model=None, meta: bool = True):
    d = ckdir / f"step-{samples:012d}"
    d.mkdir(parents=True)
    if model is not None:
        from bigasp.models.io import save_diffusers_folder

        save_diffusers_folder(model, d / "model")
    if meta:
        (d / "checkpoint.json").write_text(
            json.dumps(
                {"format_version": 1, "samples_seen": samples, "step": samples // 10, "complete": complete}
            )
        )
    return d


def test_only_complete_checkpoints_are_listed(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    make_checkpoint(ck, 200)
    make_checkpoint(ck, 100)
    make_checkpoint(ck, 300, complete=False)
    make_checkpoint(ck, 400, meta=False)
    (ck / ".tmp-step-000000000500").mkdir()
    (ck / ".tmp-step-000000000500" / "checkpoint.json").write_text('{"complete": true, "samples_seen": 500}')
    (ck / "step-000000000600").write_text("a file, not a dir")
    found = complete_checkpoints(tmp_path / "run")
    assert [c.samples_seen for c in found] == [100, 200]
    assert [c.samples_seen for c in complete_checkpoints(ck)] == [100, 200]


def test_every_samples_thins_checkpoints(tmp_path):
    ck = tmp_path / "checkpoints"
    for s in (100, 200, 300, 400, 500):
        make_checkpoint(ck, s)
    w = Watcher(tmp_path, ["x"], [0], every_samples=200)
    assert [c.samples_seen for c in w.pending()] == [100, 300, 500]
    done = tmp_path / "samples" / "step-000000000200"
    done.mkdir(parents=True)
    (done / "done.json").write_text(json.dumps({"samples_seen": 200}))
    assert [c.samples_seen for c in w.pending()] == [100, 400]  # 300 is within 200 after the done 200


def test_every_nth_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    for s in (100, 200, 300, 400, 500):
        make_checkpoint(ck, s)
    w = Watcher(tmp_path, ["x"], [0], every=2)
    assert [c.samples_seen for c in w.pending()] == [100, 300, 500]
    done = tmp_path / "samples" / "step-000000000300"
    done.mkdir(parents=True)
    (done / "done.json").write_text(json.dumps({"samples_seen": 300}))
    assert [c.samples_seen for c in w.pending()] == [100, 500]  # counted from the sampled 300
    assert [c.samples_seen for c in Watcher(tmp_path, ["x"], [0], every=3).pending()] == [100]


def test_read_prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# grid\na cat\n\n  a dog  \n")
    assert read_prompts(p) == ["a cat", "a dog"]
    p.write_text("# nothing\n")
    with pytest.raises(Exception, match="no prompts"):
        read_prompts(p)


def test_watch_generates_grid_gallery_and_resumes(tmp_path):
    from bigasp.models import build_preset
    from bigasp.sample import GenerateSettings, read_png_metadata

    model = build_preset("tiny", seed=0, kind=ModelKind("flow", 1.0))
    run = tmp_path / "run"
    ck = run / "checkpoints"
    make_checkpoint(ck, 1000, model=model)
    inprogress = ck / ".tmp-step-000000002000"
    inprogress.mkdir()
    (inprogress / "checkpoint.json").write_text('{"complete": true, "samples_seen": 2000}')  # never read
    settings = GenerateSettings.from_preset("bigasp-v2.5", width=64, height=64, steps=2, pag=0.0)
    prompts, seeds = ["a cat", "a (dog:1.2)"], [0, 1]
    w = Watcher(run, prompts, seeds, settings=settings, device="cpu")
    written = w.run_once()
    out = run / "samples" / "step-000000001000"
    assert written == [out]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*(image_name(i, s) for i in range(2) for s in seeds), "done.json"])
    meta = read_png_metadata(out / image_name(1, 1))
    assert meta["prompt"] == "a (dog:1.2)" and meta["settings"]["seed"] == 1
    done = json.loads((out / "done.json").read_text())
    assert done["samples_seen"] == 1000 and done["seeds"] == seeds
    page = (run / "samples" / "index.html").read_text()
    assert "step-000000001000/p001-seed1.png" in page and "a (dog:1.2)" in page

    # restart: nothing is redone
    stamp = os.stat(out / image_name(0, 0)).st_mtime_ns
    w2 = Watcher(run, prompts, seeds, settings=settings, device="cpu")
    assert w2.pending() == [] and w2.run_once() == []
    assert os.stat(out / image_name(0, 0)).st_mtime_ns == stamp

    # a crash mid-checkpoint leaves a temp dir: it is discarded and the checkpoint redone
    make_checkpoint(ck, 3000, model=model)
    stale = run / "samples" / ".tmp-step-000000003000"
    stale.mkdir()
    (stale / "junk.png").write_text("partial")
    assert [p.name for p in w2.run_once()] == ["step-000000003000"]
    assert not stale.exists()
    assert not (run / "samples" / "step-000000003000" / "junk.png").exists()
    page = (run / "samples" / "index.html").read_text()
    assert page.index("step-000000001000") < page.index("step-000000003000")


def test_missing_components_need_base(tmp_path):
    from bigasp.models import build_preset

    unet_only = build_preset("tiny", ["unet"], seed=0)
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints", 10, model=unet_only)
    w = Watcher(run, ["a cat"], [0], device="cpu")
    assert w.run_once() == []  # logged and skipped, not crashed
    with pytest.raises(Exception, match="--base"):
        w.load(w.pending()[0])


def test_cli_watch_once(tmp_path, tiny_model):
    from bigasp.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints", 7, model=tiny_model)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    main(["watch", str(run), "--prompts", str(prompts), "--seeds", "3", "--once", "--size", "64x64",
          "--steps", "2", "--device", "cpu"])  # fmt: skip
    assert (run / "samples" / "step-000000000007" / "p000-seed3.png").is_file()
    assert (run / "samples" / "index.html").is_file()


def test_watch_ema_samples_the_averaged_weights_into_their_own_gallery(tmp_path, tiny_model):
    from bigasp.cli import main
    from bigasp.models import build_preset
    from bigasp.models.io import save_diffusers_folder
    from bigasp.sample import read_png_metadata

    run = tmp_path / "run"
    ck = make_checkpoint(run / "checkpoints", 7, model=tiny_model)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = ["watch", str(run), "--prompts", str(prompts), "--seeds", "3", "--once", "--size", "64x64",
            "--steps", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    w = Watcher(run, ["a cat"], [3], ema=True, device="cpu")
    with pytest.raises(Exception, match="no EMA weights"):
        w.load(w.pending()[0])
    save_diffusers_folder(build_preset("tiny", seed=1), ck / "ema")  # other weights than model/
    main([*args, "--ema"])
    main(args)
    ema_png = run / "samples-ema" / "step-000000000007" / "p000-seed3.png"
    raw_png = run / "samples" / "step-000000000007" / "p000-seed3.png"
    assert ema_png.is_file() and raw_png.is_file()
    assert read_png_metadata(ema_png)["prompt"] == "a cat"
    import numpy as np
    from PIL import Image

    ema_px, raw_px = (np.asarray(Image.open(p)) for p in (ema_png, raw_png))
    assert not np.array_equal(ema_px, raw_px)  # the averaged weights were the ones sampled
