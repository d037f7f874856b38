"""Progress bars of generate/watch/loading/export; quiet libraries; no vanished temp names in errors."""

from __future__ import annotations

import logging
import re

import pytest

from bigasp import progress

STEP_RATE = re.compile(r"\d+(\.\d+)?(it/s|s/it)")  # tqdm's rate per step, as ComfyUI and diffusers show it
RATE = re.compile(r"\d+(\.\d+)?(\w+/s|s/\w+)")


@pytest.fixture(autouse=True)
def _reset_progress():
    yield
    progress.configure(None)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_model):
    from bigasp.models.io import save_diffusers_folder

    return save_diffusers_folder(tiny_model, tmp_path_factory.mktemp("m") / "tiny")


def test_generate_shows_loading_and_per_step_progress_with_rate(tmp_path, tiny_folder, capsys):
    from bigasp.cli import main

    main(["generate", "a cat", "--model", str(tiny_folder), "--size", "64x64", "--steps", "3",
          "--out", str(tmp_path), "--device", "cpu", "--progress"])  # fmt: skip
    out = capsys.readouterr()
    assert out.out.strip().endswith(".png")  # stdout stays the list of written files
    assert "loading tiny" in out.err and "4/4" in out.err
    assert "sampling 1 image(s)" in out.err and "3/3" in out.err
    assert STEP_RATE.search(out.err), out.err[-500:]
    # the libraries' own bars and chatter do not leak into bigasp's output
    for library_bar in ("Loading pipeline components", "Loading checkpoint shards", "Writing model shards"):
        assert library_bar not in out.err


def test_no_progress_flag_and_non_terminal_default_print_no_bars(tmp_path, capsys):
    from bigasp.cli import main

    for extra in (["--no-progress"], []):  # captured stderr is not a terminal: tqdm stays quiet
        main(["generate", "a cat", "--model", "tiny", "--size", "64x64", "--steps", "2",
              "--out", str(tmp_path), *extra])  # fmt: skip
        assert "sampling" not in capsys.readouterr().err


def test_watch_shows_progress(tmp_path, tiny_model, capsys):
    from tests.test_watch import make_checkpoint

    from bigasp.cli import main

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints", 7, model=tiny_model)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    main(["watch", str(run), "--prompts", str(prompts), "--once", "--size", "64x64", "--steps", "2",
          "--device", "cpu", "--progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert "loading model" in err and "sampling 1 image(s)" in err and RATE.search(err)


def test_export_shows_progress(tmp_path, tiny_model, capsys):
    from bigasp.models.single_file import save_single_file

    progress.configure(True)
    save_single_file(tiny_model, tmp_path / "m.safetensors")
    err = capsys.readouterr().err
    assert "exporting m.safetensors" in err and RATE.search(err)


def test_saving_a_model_folder_prints_no_library_bars(tmp_path, tiny_model, capsys):
    from bigasp.models.io import save_diffusers_folder

    save_diffusers_folder(tiny_model, tmp_path / "m")
    assert "Writing model shards" not in capsys.readouterr().err


def test_loader_per_epoch_lines_are_debug_level():
    import inspect

    from bigasp.train import data

    src = inspect.getsource(data)
    for phrase in ('"epoch %d: %d batches', '"epoch %d done on rank'):
        i = src.index(phrase)
        assert src[:i].rstrip().endswith("log.debug("), phrase


def test_write_errors_name_the_final_file_not_the_vanished_temp(tmp_path):
    from bigasp.fsutil import atomic_path

    final = tmp_path / "out.bin"
    with pytest.raises(OSError) as e, atomic_path(final) as tmp:
        raise OSError(28, "No space left on device", str(tmp))
    assert ".tmp-" not in str(e.value) and str(final) in str(e.value) and e.value.errno == 28


def test_watch_warning_does_not_name_the_removed_temp_folder(tmp_path, tiny_model, caplog, monkeypatch):
    from tests.test_watch import make_checkpoint

    from bigasp.sample import watch as watch_mod

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints", 7, model=tiny_model)

    def full_disk(image, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("bigasp.sample.generate.save_png", full_disk)
    from bigasp.sample import GenerateSettings

    small = GenerateSettings.from_preset("bigasp-v2", width=64, height=64, steps=1)
    w = watch_mod.Watcher(run, ["a cat"], [0], settings=small, device="cpu")
    with caplog.at_level(logging.WARNING):
        assert w.run_once() == []
    assert "No space left on device" in caplog.text and ".tmp-" not in caplog.text
