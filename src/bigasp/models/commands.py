"""`bigasp model ...`: inspect and convert SDXL weights."""

from __future__ import annotations

import json

import typer

model_app = typer.Typer(help="Inspect and convert SDXL models (presets, diffusers folders, single files).")


@model_app.command("info")
def info(
    model: str = typer.Argument(
        ..., help="Preset name (tiny, sdxl-base), diffusers folder or single .safetensors."
    ),
    arch: str = typer.Option(
        None, "--arch", help="Architecture preset of a single file, if it cannot be inferred."
    ),
    preset: str = typer.Option(None, "--preset", hidden=True, help="Deprecated spelling of --arch."),
) -> None:
    """Print the model kind and each component's parameter count.

    A single .safetensors file is described from its header alone (shapes, dtypes, metadata):
    instant on a multi-GB file, and no weights are loaded.
    """
    from pathlib import Path

    if Path(model).suffix in (".safetensors", ".sft") and Path(model).is_file():
        from bigasp.models.file_header import single_file_info

        typer.echo(json.dumps(single_file_info(model), indent=2))
        return

    from bigasp.models.io import load_model
    from bigasp.models.presets import PRESETS, build_preset

    # A preset is only shapes: build it on the meta device so `info sdxl-base` needs no 14 GB.
    m = (
        build_preset(model, device="meta")
        if model in PRESETS
        else load_model(model, preset=_arch(arch, preset))
    )
    out = {"source": m.source, "kind": m.kind.to_json(), "components": {}}
    for name, mod in m.modules().items():
        params = sum(p.numel() for p in mod.parameters())
        dtype = str(next(mod.parameters()).dtype).replace("torch.", "")
        out["components"][name] = {"parameters": params, "dtype": dtype}
    typer.echo(json.dumps(out, indent=2))


def _with_kind(m, prediction: str | None, shift: float | None):
    """Apply --prediction/--shift over the kind the source recorded (or eps)."""
    from dataclasses import replace

    if prediction is not None or shift is not None:
        m.kind = replace(
            m.kind,
            prediction=prediction or m.kind.prediction,
            shift=shift if shift is not None else m.kind.shift,
        )
    return m


_PREDICTION_HELP = "Record the model kind: eps or flow (default: from the source, else eps)."
_SHIFT_HELP = "Record the flow shift (default: from the source, else 1.0)."
_ARCH_HELP = "Architecture preset of a single file, if it cannot be inferred."


def _arch(arch: str | None, preset: str | None) -> str | None:
    """--arch names the architecture; --preset, its old spelling here, is accepted with a warning
    (in `generate`/`watch` --preset is the sampler-settings preset)."""
    import logging

    if preset is None:
        return arch
    from bigasp.errors import ConfigError

    if arch is not None and arch != preset:
        raise ConfigError(f"--preset {preset!r} and --arch {arch!r} disagree; pass only --arch")
    logging.getLogger(__name__).warning(
        "--preset is deprecated in `bigasp model` commands: use --arch %s (--preset means the "
        "sampler-settings preset in generate/watch)",
        preset,
    )
    return preset


@model_app.command("save")
def save(
    model: str = typer.Argument(..., help="Source: preset name, diffusers folder or single .safetensors."),
    out: str = typer.Argument(..., help="Destination diffusers folder."),
    prediction: str = typer.Option(None, help=_PREDICTION_HELP),
    shift: float = typer.Option(None, help=_SHIFT_HELP),
    arch: str = typer.Option(None, "--arch", help=_ARCH_HELP),
    preset: str = typer.Option(None, "--preset", hidden=True, help="Deprecated spelling of --arch."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already holds files."),
) -> None:
    """Save any model source as a diffusers folder with its model kind recorded."""
    from bigasp.models.io import load_model, save_diffusers_folder

    _refuse_existing(out, force)
    m = _with_kind(load_model(model, preset=_arch(arch, preset)), prediction, shift)
    path = _replace_folder(out, lambda tmp: save_diffusers_folder(m, tmp))
    typer.echo(f"saved {path} ({m.kind.prediction}, shift {m.kind.shift})")


def _refuse_existing(out: str, force: bool) -> None:
    """Never overwrite what the user did not ask to replace."""
    from pathlib import Path

    from bigasp.errors import BigaspError

    path = Path(out)
    taken = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if taken and not force:
        raise BigaspError(f"{path} already exists; choose another destination or pass --force to replace it")


def _replace_folder(out: str, write):
    """Write a folder next to `out`, then swap it in: an error midway leaves `out` as it was,
    and a replaced model leaves no stale files of the old one behind."""
    import os
    import shutil
    import uuid
    from pathlib import Path

    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".del-{final.name}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@model_app.command("export")
def export(
    model: str = typer.Argument(..., help="Source: preset name, diffusers folder or single .safetensors."),
    out: str = typer.Argument(..., help="Destination single file, e.g. my_model.safetensors."),
    prediction: str = typer.Option(None, help=_PREDICTION_HELP),
    shift: float = typer.Option(None, help=_SHIFT_HELP),
    arch: str = typer.Option(None, "--arch", help=_ARCH_HELP),
    preset: str = typer.Option(None, "--preset", hidden=True, help="Deprecated spelling of --arch."),
    dtype: str = typer.Option(
        "fp16", "--dtype", help="Tensor dtype of the file: fp16 (as SDXL files are shared), bf16 or fp32."
    ),
    workflow: bool = typer.Option(
        True,
        "--workflow/--no-workflow",
        help="For a flow model, also write a ComfyUI workflow beside the file (NAME.workflow.json to drag "
        "onto the canvas, NAME.workflow-api.json for /prompt, and NAME.workflow.png carrying both) with "
        "ModelSamplingSD3 and the card's sampler settings.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Export as one SDXL .safetensors in the original key layout (loads in ComfyUI, A1111, Civitai).

    The model kind is recorded in the file's metadata, so `bigasp generate` samples a flow
    model correctly without flags. Other tools cannot read that record: for a flow model a
    ComfyUI workflow that samples it correctly is written beside the file.
    """
    from bigasp.errors import BigaspError

    planned = _source_kind(model, prediction)  # every file to be written is checked first (no torch yet)
    for target in (out, *_workflow_targets(out, workflow and planned == "flow")):
        _refuse_existing(str(target), force)
    from bigasp.models.single_file import EXPORT_DTYPES

    if dtype not in EXPORT_DTYPES:
        raise BigaspError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(EXPORT_DTYPES)}")
    from bigasp.models.io import load_model
    from bigasp.models.single_file import save_single_file

    m = _with_kind(load_model(model, preset=_arch(arch, preset)), prediction, shift)
    if workflow and m.kind.prediction == "flow" and planned != "flow":  # a source that surprised us
        for target in _workflow_targets(out, True):
            _refuse_existing(str(target), force)
    path = save_single_file(m, out, dtype=EXPORT_DTYPES[dtype])
    typer.echo(f"exported {path} ({m.kind.prediction}, shift {m.kind.shift}, {dtype})")
    if workflow and m.kind.prediction == "flow":
        from bigasp.models.comfyui import write_workflow

        for written in write_workflow(path, m.kind):
            typer.echo(f"wrote {written}")


def _workflow_targets(out: str, wanted: bool) -> tuple:
    from bigasp.models.comfyui import workflow_paths

    return tuple(workflow_paths(out)) if wanted else ()


def _source_kind(model: str, prediction: str | None) -> str | None:
    """The prediction `export` will record, known before loading (so that every file the command
    will write is checked first): --prediction, else what the source records, else eps. None when
    the source cannot say cheaply; loading it then reports the problem."""
    from pathlib import Path

    from bigasp.errors import BigaspError
    from bigasp.models.components import ModelKind
    from bigasp.models.presets import PRESETS

    if prediction is not None:
        return prediction
    if model in PRESETS:
        return ModelKind().prediction
    path = Path(model).expanduser()
    try:
        if path.is_file() and path.suffix in (".safetensors", ".sft"):
            from bigasp.models.file_header import kind_from_metadata, read_header

            kind = kind_from_metadata(read_header(path).metadata, str(path))
        elif path.is_dir():
            kind = ModelKind.load(path)
        else:
            return None
    except (BigaspError, OSError, ValueError):
        return None
    return (kind or ModelKind()).prediction


@model_app.command("extract-lora")
def extract_lora(
    base: str = typer.Argument(..., help="The model the finetune started from (preset, folder or file)."),
    tuned: str = typer.Argument(..., help="The finetune (diffusers folder or single .safetensors)."),
    rank: int = typer.Option(..., "--rank", help="LoRA rank of linear and 1x1 conv layers (kohya's --dim)."),
    out: str = typer.Option(
        None, "--out", help="Destination .safetensors (default: TUNED-NAME_lora_rRANK.safetensors here)."
    ),
    conv_rank: int = typer.Option(
        None,
        "--conv-rank",
        help="Also extract resnet/sampler layers, 3x3 convs at this rank (kohya's --conv_dim).",
    ),
    clamp_quantile: float = typer.Option(
        0.99, help="Clamp factors to this quantile of their values (1 = no clamp)."
    ),
    min_diff: float = typer.Option(
        0.01, help="Leave out a text encoder whose weights changed by at most this."
    ),
    lowrank: bool = typer.Option(
        False, "--lowrank", help="Randomised SVD (torch.svd_lowrank): faster on SDXL."
    ),
    dtype: str = typer.Option("fp16", "--dtype", help="Tensor dtype of the file: fp16, bf16 or fp32."),
    arch: str = typer.Option(None, "--arch", help=_ARCH_HELP),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Extract a kohya-layout LoRA approximating TUNED - BASE (truncated SVD per layer).

    The file loads with `bigasp generate --lora`, ComfyUI's LoraLoader and A1111/Forge.
    """
    from pathlib import Path

    from bigasp.models.extract_lora import ExtractSettings
    from bigasp.models.extract_lora import extract_lora as run

    settings = ExtractSettings(rank, conv_rank, clamp_quantile, min_diff, lowrank, dtype)
    settings.validate()
    dest = Path(out) if out else Path(f"{Path(tuned.rstrip('/')).stem}_lora_r{rank}.safetensors")
    _refuse_existing(str(dest), force)
    path, layers = run(base, tuned, dest, settings, arch=arch)
    typer.echo(
        f"extracted {path} ({layers} layers, rank {rank}{f', conv rank {conv_rank}' if conv_rank else ''})"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
