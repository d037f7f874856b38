"""The `bigasp` command: help for every group, `bigasp model info|save|export`, user errors exit 2."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from bigasp.cli import app, main
from bigasp.models.single_file import META_KIND

runner = CliRunner()


def test_console_entry_point_help(capsys):
    """`bigasp` is installed as bigasp.cli:run (main, then an exit without interpreter teardown), and `bigasp --help` exits 0 listing the stages."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "bigasp"]
    assert ep.value == "bigasp.cli:run"
    try:
        main(["--help"])
    except SystemExit as e:  # click may exit 0 after printing help
        assert e.code in (0, None)
    out = capsys.readouterr().out
    assert "Usage" in out and "model" in out


def test_every_group_has_help():
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    groups = [g.name for g in app.registered_groups]
    assert "model" in groups
    for group in groups:
        assert group in top.output
        sub = runner.invoke(app, [group, "--help"])
        assert sub.exit_code == 0, (group, sub.output)
        assert "Usage" in sub.output


def test_model_help_lists_commands():
    out = runner.invoke(app, ["model", "--help"])
    assert out.exit_code == 0
    for cmd in ("info", "save", "export"):
        assert cmd in out.output
    export_help = runner.invoke(app, ["model", "export", "--help"])
    assert (
        export_help.exit_code == 0
        and "--prediction" in export_help.output
        and "--shift" in export_help.output
    )


def test_model_info_reports_sdxl_parameters_without_allocating_them():
    out = runner.invoke(app, ["model", "info", "sdxl-base"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["kind"]["prediction"] == "eps"
    params = {c: v["parameters"] for c, v in info["components"].items()}
    assert params == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }


def test_model_export_records_the_kind_and_info_reads_it(tmp_path):
    out_file = tmp_path / "flow.safetensors"
    res = runner.invoke(
        app, ["model", "export", "tiny", str(out_file), "--prediction", "flow", "--shift", "3"]
    )
    assert res.exit_code == 0, res.output
    with safe_open(str(out_file), "pt") as f:
        assert json.loads(f.metadata()[META_KIND]) == {
            "format_version": 1,
            "prediction": "flow",
            "shift": 3.0,
        }
    info = runner.invoke(app, ["model", "info", str(out_file)])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["kind"] == {"format_version": 1, "prediction": "flow", "shift": 3.0}
    folder = tmp_path / "as_folder"
    saved = runner.invoke(app, ["model", "save", str(out_file), str(folder)])
    assert saved.exit_code == 0, saved.output
    assert json.loads((folder / "bigasp_model.json").read_text())["prediction"] == "flow"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model", "info", "stabilityai/stable-diffusion-xl-base-1.0"], "never downloads"),
        (["model", "info", "/nonexistent/model.safetensors"], "does not exist"),
        (["model", "export", "tiny", "out.safetensors", "--prediction", "v"], "'eps' or 'flow'"),
    ],
)
def test_user_errors_exit_2_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_help_does_not_import_torch():
    """`bigasp --help` builds every stage's help; a torch import there costs seconds per call."""
    import subprocess
    import sys

    code = "import sys, bigasp.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
