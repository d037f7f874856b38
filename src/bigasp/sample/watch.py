"""Sample training checkpoints on a separate machine, as bigASP did.

The watcher polls a run directory for *complete* checkpoints (a `step-*` folder whose
`checkpoint.json` says `"complete": true`; anything starting with "." is in progress and
never read), renders a fixed grid (prompts × seeds) for each selected checkpoint into
`samples/<checkpoint>/`, and rewrites a static `samples/index.html` that puts the steps
side by side. A checkpoint's folder is generated under a temp name with its `done.json`
written last, then renamed into place: after a crash or restart, finished checkpoints are
skipped and half-finished ones are redone from scratch.

With `loras`, every checkpoint is loaded fresh and the LoRAs merged into it once, exactly as
`bigasp generate --lora` does for one model; components borrowed from `--base` are copied
before the merge, so nothing merged into one checkpoint reaches the next.
"""

from __future__ import annotations

import copy
import html
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bigasp.errors import BigaspError, ConfigError, ModelLoadError
from bigasp.fsutil import atomic_write_text
from bigasp.models.components import SDXL
from bigasp.sample.lora import LoraError, LoraSpec, apply_loras, lora_record, weights_label

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
GALLERY_FILE = "index.html"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    samples_seen: int
    step: int | None

    @property
    def name(self) -> str:
        return self.path.name


def checkpoints_dir(path: str | Path) -> Path:
    """A run dir holds `checkpoints/`; a checkpoints dir is accepted as is."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def complete_checkpoints(path: str | Path) -> list[Checkpoint]:
    """Complete checkpoints under a run or checkpoints dir, sorted by samples seen.

    Completeness is the trainer's own rule (`bigasp.train.checkpoint.is_complete`), so the
    two sides cannot drift apart.
    """
    from bigasp.train.checkpoint import list_complete_checkpoints, read_meta

    found = []
    for d in list_complete_checkpoints(checkpoints_dir(path)):
        try:
            meta = read_meta(d)
        except (OSError, ValueError):
            continue  # pruned by the trainer since listing
        samples = meta.get("samples_seen", int(d.name.removeprefix("step-")))
        found.append(Checkpoint(d, int(samples), meta.get("step")))
    return sorted(found, key=lambda c: (c.samples_seen, c.name))


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {path} does not exist (one prompt per line)")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts file {path} has no prompts (one per line; '#' starts a comment)")
    return prompts


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:03d}-seed{seed}.png"


class Watcher:
    """Generates the grid for each new complete checkpoint; `run_once` is one poll."""

    def __init__(
        self,
        run_dir: str | Path,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        settings=None,
        out_dir: str | Path | None = None,
        every: int = 1,
        every_samples: int = 0,
        base: str | None = None,
        device: str | None = None,
        dtype=None,
        settings_for: Callable[[SDXL], object] | None = None,
        ema: bool = False,
        loras: Sequence[LoraSpec] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.ema = ema  # sample each checkpoint's EMA weights (CKPT/ema) instead of CKPT/model
        self.loras = list(loras)  # merged into every checkpoint, each at its weight
        self.prompts, self.seeds = list(prompts), list(seeds)
        if not self.seeds:
            raise ConfigError("watch needs at least one seed")
        self.settings = settings
        self.settings_for = settings_for
        ck = checkpoints_dir(self.run_dir)
        default_out = ck.parent if ck != self.run_dir else self.run_dir
        # EMA grids get their own gallery: one page never mixes raw and averaged weights
        default_name = "samples-ema" if ema else "samples"
        self.samples_dir = Path(out_dir) if out_dir is not None else default_out / default_name
        if every < 1:
            raise ConfigError(f"--every must be >= 1 (1 = every checkpoint), got {every}")
        self.every, self.every_samples = every, every_samples
        self.base, self.device, self.dtype = base, device, dtype
        self._base_model: SDXL | None = None

    # -- bookkeeping ------------------------------------------------------------------------

    def markers(self) -> dict[str, dict]:
        """Finished checkpoint names -> their done markers (samples seen, settings, LoRAs)."""
        out = {}
        if not self.samples_dir.is_dir():
            return out
        for d in self.samples_dir.iterdir():
            marker = d / DONE_FILE
            if d.name.startswith(".") or not marker.is_file():
                continue
            try:
                data = json.loads(marker.read_text())
                data["samples_seen"] = int(data["samples_seen"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            out[d.name] = data
        return out

    def done(self) -> dict[str, int]:
        """Finished checkpoint names -> samples seen, from their done markers."""
        return {name: m["samples_seen"] for name, m in self.markers().items()}

    def pending(self) -> list[Checkpoint]:
        """Complete checkpoints not yet sampled, thinned by `every` and `every_samples`.

        `every=N` takes every N-th checkpoint counted from the last sampled one (the first
        checkpoint is always taken); `every_samples=S` skips a checkpoint when one within S
        training samples before it was sampled. Both are derived from the done markers, so a
        restart makes the same choices, and pruning old checkpoints does not shift them.
        """
        done = self.done()
        taken = sorted(done.values())
        todo = []
        gap: int | None = None  # checkpoints since the last sampled one
        for c in complete_checkpoints(self.run_dir):
            if c.name in done:
                gap = 0
                continue
            if gap is not None and gap + 1 < self.every:
                gap += 1
                continue
            if self.every_samples > 0 and any(
                c.samples_seen - self.every_samples < s <= c.samples_seen for s in taken
            ):
                continue
            todo.append(c)
            taken.append(c.samples_seen)
            gap = 0
        return todo

    # -- work --------------------------------------------------------------------------------

    def load(self, ckpt: Checkpoint) -> SDXL:
        from bigasp.models.io import load_model

        folder = ckpt.path / ("ema" if self.ema else "model")
        if self.ema and not folder.is_dir():
            raise ModelLoadError(
                f"{ckpt.path} has no EMA weights (ema/); train with [ema] enabled = true, or drop --ema"
            )
        if (folder / "adapter.json").is_file():  # an adapter run: its base with this checkpoint's adapter
            return self.load_adapter(folder)
        present = [c for c in SDXL.COMPONENTS if (folder / c).is_dir()]
        model = load_model(folder, present)
        missing = [c for c in SDXL.COMPONENTS if c not in present]
        if missing:
            if self.base is None:
                raise ModelLoadError(
                    f"{folder} has no {', '.join(missing)}; pass --base MODEL to supply them "
                    "(e.g. the model training started from)"
                )
            if self._base_model is None:
                self._base_model = load_model(self.base, missing)
            for c in missing:
                shared = getattr(self._base_model, c)
                # a LoRA merges into the UNet and text encoders in place: merge into a copy
                setattr(model, c, copy.deepcopy(shared) if self.loras and c != "vae" else shared)
        return model

    def load_adapter(self, folder: Path) -> SDXL:
        """The base the adapter trained on (--base, else the source it recorded), checked against
        the recorded identity, with the checkpoint's kohya-layout adapter file merged."""
        from bigasp.models.io import load_model
        from bigasp.train import adapters

        meta = adapters.read_meta(folder) or {}
        base = self.base or meta.get("base", {}).get("source")
        model = load_model(base, SDXL.COMPONENTS)
        if adapters.base_identity(model) != meta.get("base", {}).get("identity"):
            raise LoraError(
                f"{folder}: its adapter was trained on another base than {base}; pass --base with that base"
            )
        return apply_loras(model, [LoraSpec(folder / "lora.safetensors", 1.0)])

    def prepare(self, ckpt: Checkpoint) -> SDXL:
        """The checkpoint's model, loaded fresh, with the LoRAs merged once."""
        return apply_loras(self.load(ckpt), self.loras)

    def process(self, ckpt: Checkpoint) -> Path:
        from bigasp.sample.generate import GenerateSettings, Generator, preset_for, save_png

        final = self.samples_dir / ckpt.name
        tmp = self.samples_dir / f".tmp-{ckpt.name}"
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted run: redo from scratch
        if final.exists():
            shutil.rmtree(final)  # no done marker (or we would not be here)
        tmp.mkdir(parents=True)
        model = self.prepare(ckpt)
        if self.settings_for is not None:
            settings = self.settings_for(model)
        else:
            settings = self.settings or GenerateSettings.from_preset(preset_for(model.kind))
        gen = Generator(model, self.device, self.dtype, loras=self.loras)
        t0 = time.perf_counter()
        for seed in self.seeds:
            s = settings.model_copy(update={"seed": seed, "batch": 1})
            images = gen.generate(self.prompts, s)
            for i, im in enumerate(images):
                save_png(im, tmp / image_name(i, seed))
        marker = {
            "checkpoint": ckpt.name,
            "samples_seen": ckpt.samples_seen,
            "step": ckpt.step,
            "prompts": self.prompts,
            "seeds": self.seeds,
            "settings": settings.model_dump(mode="json"),
            "loras": lora_record(self.loras),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        atomic_write_text(tmp / DONE_FILE, json.dumps(marker, indent=2) + "\n")
        os.replace(tmp, final)
        log.info("sampled %s (%d images)", ckpt.name, len(self.prompts) * len(self.seeds))
        return final

    def run_once(self) -> list[Path]:
        """Sample every pending checkpoint, then rewrite the gallery."""
        written = []
        for ckpt in self.pending():
            if not (ckpt.path / "checkpoint.json").is_file():
                continue  # pruned by the trainer since listing
            try:
                written.append(self.process(ckpt))
            except LoraError:
                # the same for every checkpoint: stop rather than skip them all, one by one
                shutil.rmtree(self.samples_dir / f".tmp-{ckpt.name}", ignore_errors=True)
                raise
            except (BigaspError, OSError) as err:
                # An OSError names a file in the temp folder removed just below: say what failed.
                reason = f"{err.strerror} (writing samples)" if ".tmp-" in str(err) else err
                log.warning("skipping %s for now: %s", ckpt.name, reason)
                shutil.rmtree(self.samples_dir / f".tmp-{ckpt.name}", ignore_errors=True)
        if written or not (self.samples_dir / GALLERY_FILE).exists():
            self.write_gallery()
        return written

    def warn_if_mixed(self) -> None:
        """Say so when this gallery already holds checkpoints sampled with other LoRAs."""
        want = lora_record(self.loras)
        other = sorted(n for n, m in self.markers().items() if m.get("loras", []) != want)
        if other:
            log.warning(
                "%s already holds %d checkpoint(s) sampled with other LoRAs (e.g. %s); their columns "
                "say which; pass --out for a gallery of this setting alone",
                self.samples_dir,
                len(other),
                other[0],
            )

    def run(self, interval: float = 60.0) -> None:
        log.info(
            "watching %s every %.0fs; samples in %s",
            checkpoints_dir(self.run_dir),
            interval,
            self.samples_dir,
        )
        while True:
            self.run_once()
            time.sleep(interval)

    def write_gallery(self) -> Path:
        """Static HTML: one row per (prompt, seed), one column per sampled checkpoint."""
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        markers = self.markers()
        done = sorted(((n, m["samples_seen"]) for n, m in markers.items()), key=lambda kv: (kv[1], kv[0]))
        head = "".join(
            f"<th>{html.escape(name)}<br>{samples:,} samples{_lora_label(markers[name])}</th>"
            for name, samples in done
        )
        rows = []
        for i, prompt in enumerate(self.prompts):
            for seed in self.seeds:
                cells = []
                for name, _ in done:
                    rel = f"{name}/{image_name(i, seed)}"
                    exists = (self.samples_dir / rel).is_file()
                    cells.append(
                        f'<td><a href="{rel}"><img src="{rel}" loading="lazy"></a></td>'
                        if exists
                        else "<td></td>"
                    )
                label = f"{html.escape(prompt)}<br><small>seed {seed}</small>"
                rows.append(f"<tr><th class=p>{label}</th>{''.join(cells)}</tr>")
        page = (
            "<!doctype html><html><head><meta charset=utf-8><title>bigasp samples</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{padding:4px;vertical-align:top}"
            "th.p{max-width:24em;text-align:left;font-weight:normal}img{max-width:256px}</style></head><body>"
            f"<h1>Samples of {html.escape(str(self.run_dir))}</h1>"
            f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table></body></html>\n"
        )
        return atomic_write_text(self.samples_dir / GALLERY_FILE, page, durable=False)


def _lora_label(marker: dict) -> str:
    """The column header's LoRA line (name: weight, as A1111's `LoRA` field), if any."""
    loras = marker.get("loras") or []
    if not loras:
        return ""
    names = ", ".join(
        f"{Path(x['file']).stem}: {weights_label(float(x['weight']), float(x.get('weight_clip', x['weight'])))}"
        for x in loras
    )
    return f"<br><small>LoRA {html.escape(names)}</small>"
