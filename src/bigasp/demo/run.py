"""`bigasp demo`: the whole pipeline on synthetic photos, through the real CLI stages.

photos (each with a hidden quality) -> `bigasp ingest` -> `bigasp annotate` (embeddings) ->
simulated raters -> `bigasp quality import` -> `bigasp quality train / rank / fit-scorer / score`
(the scores training sees) -> `bigasp model save` (+ the shipped demo VAE) -> `bigasp encode`
-> `bigasp dataset report` -> `bigasp train configs/demo.toml --stop-at HALF` -> `bigasp train ... --resume auto`
-> `bigasp generate` (colour x shape grid with `score_9`, with `score_1`, and with `score_1` plus the
negative prompt "low quality") -> `bigasp watch --once` (HTML gallery of every checkpoint) ->
figures (Spearman of the scores with the hidden quality, colour/shape adherence, the contrast gap
between score tags and with the negative prompt) and a validation-loss plot.

`--lora` trains a LoCon adapter on the starting model instead (configs/demo-lora.toml: every base
weight frozen), generates with `bigasp generate --model base-model --lora ADAPTER`, and measures
the untrained base the same way, so the figures show what the adapter taught it.

Every stage is invoked as `bigasp.cli.main([...])`, exactly what a user would type, so the
demo exercises the product rather than a private shortcut; the demo's own code only writes
the photos, assembles the starting model folder and measures the results. Each finished
stage leaves a marker in OUT/.demo/ keyed by its parameters, so a re-run skips it
(idempotent) and a changed parameter redoes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bigasp.demo import synthetic
from bigasp.errors import BigaspError

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


STREAM_SHARD_SIZE = 32  # --stream: the encoder publishes a shard per 32 photos, so the run sees waves
STREAM_POLL_S = 0.5


def find_config(name: str) -> Path:
    """configs/<name> of the source tree (the demo runs from a checkout, as `make demo` does)."""
    for root in (Path.cwd() / "configs", CONFIG_DIR):
        if (root / name).is_file():
            return root / name
    raise BigaspError(f"cannot find configs/{name}; run `bigasp demo` from the bigasp checkout")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run. `default` fits 5 min on 2 CPU cores (curation, 32,640 training
    samples, the grid); `quick` is a smoke run for the test suite: fewer photos and ratings and a
    quarter of the training, long enough to learn colour but not the score tags (docs/demo.md)."""

    photos: int
    max_samples: int  # training length; the run stops at half, then resumes
    validate_every: int
    images_per_prompt: int  # seeds per grid prompt (more = steadier adherence figures)
    steps: int  # sampling steps
    ratings: int = 3000  # judgements of the simulated raters

    @classmethod
    def default(cls) -> DemoPlan:
        return cls(
            photos=512, max_samples=32640, validate_every=2720, images_per_prompt=4, steps=20, ratings=3000
        )

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(
            photos=384, max_samples=7200, validate_every=1440, images_per_prompt=2, steps=12, ratings=1500
        )


@dataclass
class DemoResult:
    """What the demo produced and measured (also written to OUT/summary.json)."""

    out: str
    seed: int
    quick: bool
    paths: dict[str, str] = field(default_factory=dict)
    colour_adherence: float = 0.0
    colour_chance: float = 0.0
    shape_adherence: float = 0.0
    shape_chance: float = 0.0
    sharpness_high: float = 0.0
    sharpness_low: float = 0.0
    contrast_high: float = 0.0  # RMS contrast of score_9 generations
    contrast_low: float = 0.0  # ... of score_1 generations (negative "")
    contrast_negative: float | None = None  # ... of score_1 generations with negative "low quality"
    score_spearman: float | None = None  # hidden quality vs the score bigasp's quality stage gave
    score_histogram: list[int] = field(default_factory=list)
    arena_command: str = ""
    val_loss_start: float = 0.0
    val_loss_end: float = 0.0
    stable_loss_start: float | None = None
    stable_loss_end: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    stream_waves: int | None = None  # --stream: waves of published shards the first pass took in
    lora: bool = False  # --lora: an adapter trained on the frozen starting model
    base_colour_adherence: float | None = None  # --lora: the starting model alone, same prompts and seeds
    base_shape_adherence: float | None = None

    @property
    def sharpness_ratio(self) -> float:
        return self.sharpness_high / self.sharpness_low if self.sharpness_low > 0 else float("inf")

    @property
    def contrast_ratio(self) -> float:
        return self.contrast_high / self.contrast_low if self.contrast_low > 0 else float("inf")

    @property
    def negative_ratio(self) -> float | None:
        if self.contrast_negative is None or self.contrast_low <= 0:
            return None
        return self.contrast_negative / self.contrast_low


class Stages:
    """Runs CLI stages with skip markers; one instance per demo output folder."""

    def __init__(self, out: Path, echo: Callable[[str], None]):
        self.out = out
        self.marks = out / ".demo"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    @staticmethod
    def key(params: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def done(self, name: str, params: dict[str, Any]) -> bool:
        mark = self.marks / f"{name}.json"
        return mark.is_file() and json.loads(mark.read_text()).get("key") == self.key(params)

    def mark(self, name: str, params: dict[str, Any]) -> None:
        tmp = self.marks / f".{name}.tmp"
        tmp.write_text(json.dumps({"key": self.key(params), "params": params}, default=str) + "\n")
        os.replace(tmp, self.marks / f"{name}.json")

    def run(self, name: str, params: dict[str, Any], body: Callable[[], None]) -> None:
        if self.done(name, params):
            self.echo(f"[demo] {name}: already done, reusing")
            self.reused.append(name)
            return
        t0 = time.perf_counter()
        body()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.mark(name, params)

    def cli(self, *args: str, quiet: bool = False) -> None:
        """Run one stage through the real CLI; `quiet` hides its stdout (e.g. the paths of images
        written into a temp folder that is renamed right after, which would name files that no
        longer exist)."""
        import contextlib
        import io

        from bigasp.cli import main

        self.echo("[demo] $ bigasp " + " ".join(_quote(a) for a in args))
        try:
            with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                main(list(args))
        except SystemExit as err:
            if err.code not in (0, None):
                raise BigaspError(
                    f"demo stage `bigasp {args[0]}` failed (exit {err.code}); its message is above"
                ) from None


def _quote(a: str) -> str:
    return json.dumps(a) if (" " in a or not a) else a


NEGATIVE_PROMPT = "low quality"  # the v2.5 card's advice; the grid's own halves use none ("")
# CFG scale for every demo image: the low end of the v2.5 card's CFG 2-5 (PAG 2 as the preset).
# At the preset's 3 the tiny model overshoots hues (a red square comes out orange, read as yellow);
# the score tags' contrast gap is about the same at 2.5 and 3 (docs/demo.md).
DEMO_CFG = 2.5


def grid_prompts() -> tuple[list[str], list[tuple[str, str, str]]]:
    """The generation grid: every colour x shape, once with a high and once with a low score tag.

    Backgrounds rotate so the grid is varied yet every prompt is in the training distribution.
    Returns (prompts, [(colour, shape, 'high'|'low')]) in the same order. The third column of the
    grid is the low half again, generated with the negative prompt NEGATIVE_PROMPT.
    """
    backgrounds = list(synthetic.BACKGROUNDS)
    prompts: list[str] = []
    labels: list[tuple[str, str, str]] = []
    for quality, tag in (("high", "score_9"), ("low", "score_1")):
        for colour, shape in synthetic.combinations():
            # Each colour meets several backgrounds across the shapes (never one fixed pairing).
            bg = backgrounds[
                (list(synthetic.COLOURS).index(colour) + synthetic.SHAPES.index(shape)) % len(backgrounds)
            ]
            prompts.append(f"{tag}, a photo of a {colour} {shape} on a {bg} background")
            labels.append((colour, shape, quality))
    return prompts, labels


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a TOML basic string


def run_demo(
    out: str | Path = "demo-out",
    *,
    quick: bool = False,
    seed: int = 0,
    echo: Callable[[str], None] = print,
    plan: DemoPlan | None = None,
    train_overrides: Sequence[str] = (),
    preset: str = "demo",
    force: bool = False,
    stream: bool = False,
    lora: bool = False,
) -> DemoResult:
    """Run (or finish) the demo in `out`; returns the figures and where everything is.

    `train_overrides` are extra `key=value` settings for `bigasp train` (e.g. to try a longer run);
    `preset` is the model preset the starting model is built from. `out` must be new, empty or an
    earlier demo's folder, unless `force`. `stream`: encode and train start together (the encoder
    in the background, publishing small shards; training streams its first pass, waiting on it).
    `lora`: train a LoCon adapter on the frozen starting model instead of the model itself.
    """
    from bigasp.demo.vae import DEMO_VAE_DIR

    plan = plan or (DemoPlan.quick() if quick else DemoPlan.default())
    out = Path(out).resolve()
    check_out_folder(out, force)
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out, echo)
    data_cfg = find_config("demo-data.toml")
    train_cfg = find_config("demo-lora.toml" if lora else "demo.toml")
    photos, dataset, base = out / "photos", out / "dataset", out / "base-model"
    tag = "-lora" if lora else ""  # --lora's stages and folders sit beside the full demo's
    run_dir, grid_dir = out / f"run{tag}", out / f"grid{tag}"
    t_start = time.perf_counter()

    # 1. Photos (pure function of seed; rewriting identical files is a no-op). Their hidden quality
    # is known only to this process (the simulated raters), never written next to them.
    st.run("photos", {"n": plan.photos, "seed": seed, "kind": "rated"},
           lambda: echo(f"[demo] photos: {synthetic.write_rated_photos(photos, plan.photos, seed=seed).summary()}"))  # fmt: skip
    hidden = {f"{s.name}.png": s.quality for s in synthetic.rated_specs(plan.photos, seed=seed)}

    # 2. Ingest, with the demo's scaled-down bucket rule.
    st.run("ingest", {"n": plan.photos, "seed": seed, "cfg": data_cfg.read_text()},
           lambda: st.cli("ingest", str(photos), "--out", str(dataset), "--config", str(data_cfg)))  # fmt: skip

    # 3. Starting model: the `demo` preset (random init), flow kind, with the trained demo VAE.
    def make_base() -> None:
        tmp = out / ".base-model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        st.cli("model", "save", preset, str(tmp), "--prediction", "flow", "--shift", "1.0", quiet=True)
        shutil.rmtree(tmp / "vae")
        shutil.copytree(DEMO_VAE_DIR, tmp / "vae")
        shutil.rmtree(base, ignore_errors=True)
        os.replace(tmp, base)
        st.echo(f"[demo] starting model (the demo preset with the trained demo VAE): {base}")

    st.run("base-model", {"vae": _dir_digest(DEMO_VAE_DIR), "preset": preset}, make_base)

    # 3b. Curation: embeddings, ratings, and bigasp's own quality scores for every photo.
    from bigasp.demo.curation import curate

    quality_key = curate(st, dataset, out, hidden, seed=seed, ratings=plan.ratings,
                         ingest_params={"n": plan.photos, "seed": seed, "cfg": data_cfg.read_text()})  # fmt: skip

    # 4. Encode with the shipped VAE. Redone with other parameters (seed, VAE), the old latents are
    # of another encoding, which encode refuses to mix: this folder is the demo's, so start over.
    def encode() -> None:
        if (st.marks / "encode.json").is_file():
            shutil.rmtree(dataset / "latents", ignore_errors=True)
        st.cli(
            "encode", str(dataset), "--vae", str(DEMO_VAE_DIR), "--config", str(data_cfg), "--seed", str(seed)
        )

    encode_params = {
        "vae": _dir_digest(DEMO_VAE_DIR),
        "seed": seed,
        "n": plan.photos,
        "quality": quality_key,
    } | ({"stream": True} if stream else {})
    if not stream:
        st.run("encode", encode_params, encode)
    report_dir = out / "dataset-report"

    def report() -> None:  # 4b. Dataset report: tags, caption n-grams, scores, buckets, chunk counts.
        st.run("report", {"n": plan.photos, "seed": seed, "quality": quality_key},
               lambda: st.cli("dataset", "report", str(dataset), "--out", str(report_dir), "--no-progress"))  # fmt: skip

    if not stream:
        report()

    # 5. Train half, then resume to the end (shows checkpoint + exact resume on the way).
    overrides = [
        f"run_dir={_toml_str(run_dir)}",
        f"data.dataset={_toml_str(dataset)}",
        f"model.source={_toml_str(base)}",
        f"data.seed={seed}",
        f"train.max_samples={plan.max_samples}",
        f"validation.every={plan.validate_every}",
        f"checkpoint.every={plan.max_samples // 2}",
        f"checkpoint.keep_every={plan.max_samples // 2}",
        f"logging.every={plan.validate_every}",
        *(["data.stream=true", f"data.stream_poll_s={STREAM_POLL_S}"] if stream else []),
        *train_overrides,
    ]
    train_params = {
        "cfg": train_cfg.read_text(),
        "overrides": overrides,
        "data": st.key({"n": plan.photos, "seed": seed, "quality": quality_key}),
        "base": [preset, _dir_digest(DEMO_VAE_DIR)],
    }

    def train() -> None:
        from bigasp.train.checkpoint import list_complete_checkpoints, read_meta

        ckpts = list_complete_checkpoints(run_dir)
        if not ckpts:
            st.cli("train", str(train_cfg), *overrides, "--stop-at", str(plan.max_samples // 2))
            echo("[demo] stopped at half-way on purpose; resuming from the checkpoint")
        last = list_complete_checkpoints(run_dir)
        if not last or read_meta(last[-1])["samples_seen"] < plan.max_samples:
            st.cli("train", str(train_cfg), *overrides, "--resume", "auto")

    started = st.marks / f"train{tag}.started.json"
    if not st.done(f"train{tag}", train_params):
        # Resume an interrupted run only if it was started with the same config; else start over.
        same = started.is_file() and json.loads(started.read_text()).get("key") == st.key(train_params)
        if run_dir.exists() and not same:
            shutil.rmtree(run_dir)
        started.write_text(json.dumps({"key": st.key(train_params)}) + "\n")
    if stream:  # encode in the background, publishing small shards, while training streams them in

        def encode_and_train() -> None:
            if (st.marks / "encode.json").is_file():
                shutil.rmtree(dataset / "latents", ignore_errors=True)
            args = ["encode", str(dataset), "--vae", str(DEMO_VAE_DIR), "--config", str(data_cfg),
                    "--seed", str(seed), "--set", f"shard_size={STREAM_SHARD_SIZE}"]  # fmt: skip
            echo("[demo] $ bigasp " + " ".join(_quote(a) for a in args) + " &   (in the background)")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread each (see `bigasp demo`)
            encoder = subprocess.Popen(
                [sys.executable, "-m", "bigasp.cli", *args], stdout=subprocess.DEVNULL, env=env
            )
            try:
                st.run(f"train{tag}", train_params, train)
            finally:
                if encoder.wait() != 0:
                    raise BigaspError(f"demo stage `bigasp encode` failed (exit {encoder.returncode})")
            st.mark("encode", encode_params)

        if st.done("encode", encode_params):  # the encode finished in an earlier run: nothing to wait for
            st.run("encode", encode_params, lambda: None)
            st.run(f"train{tag}", train_params, train)
        else:
            encode_and_train()
        report()
    else:
        st.run(f"train{tag}", train_params, train)
    final = _final_checkpoint(run_dir, plan.max_samples)
    adapter = final / "model" / "lora.safetensors"

    # 6. Generate the grid with the v2.5-style sampler (euler + beta, PAG 2 as the preset, CFG DEMO_CFG).
    prompts, labels = grid_prompts()
    gen_params = {"ckpt": final.name, "train": train_params, "steps": plan.steps, "cfg": DEMO_CFG,
                  "n": plan.images_per_prompt, "seed": seed, "prompts": prompts}  # fmt: skip

    low_prompts = [p for p, lab in zip(prompts, labels, strict=True) if lab[2] == "low"]

    def generate(into: Path, model: list[str], these: list[str] = prompts, negative: str = "") -> None:
        tmp = out / f".{into.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        st.cli("generate", *these, *model, "--preset", "bigasp-v2.5", "--cfg", str(DEMO_CFG), "--negative", negative,
               "--size", "64x64", "--steps", str(plan.steps), "--seed", str(seed),
               "--batch", str(plan.images_per_prompt), "--device", "cpu", "--out", str(tmp), quiet=True)  # fmt: skip
        shutil.rmtree(into, ignore_errors=True)
        os.replace(tmp, into)
        st.echo(f"[demo] {len(list(into.glob('*.png')))} images in {into}")

    if lora:  # the base with the adapter merged, as `generate --lora` loads any kohya-layout file
        st.run("generate-lora", gen_params,
               lambda: generate(grid_dir, ["--model", str(base), "--lora", str(adapter)]))  # fmt: skip
        base_grid = out / "grid-base"
        base_params = {k: v for k, v in gen_params.items() if k not in ("ckpt", "train")}
        st.run("generate-base", {**base_params, "base": train_params["base"]},
               lambda: generate(base_grid, ["--model", str(base)]))  # fmt: skip
    else:
        st.run("generate", gen_params, lambda: generate(grid_dir, ["--model", str(final / "model")]))
        # The same score_1 prompts and seeds with the negative prompt the v2.5 card advises.
        st.run("generate-negative", gen_params,
               lambda: generate(out / "grid-negative", ["--model", str(final / "model")], low_prompts,
                                NEGATIVE_PROMPT))  # fmt: skip

        # 7. Watch-style gallery: every checkpoint (half-way and final) side by side.
        prompt_file = out / "watch-prompts.txt"
        prompt_file.write_text("\n".join(prompts[: len(prompts) // 2]) + "\n")
        st.run("watch", gen_params,
               lambda: st.cli("watch", str(run_dir), "--prompts", str(prompt_file), "--seeds", str(seed), "--once",
                              "--size", "64x64", "--steps", str(plan.steps), "--cfg", str(DEMO_CFG),
                              "--device", "cpu"))  # fmt: skip

    # 8. Figures.
    from bigasp.demo.report import measure, write_grid_image, write_loss_plot

    result = DemoResult(out=str(out), seed=seed, quick=quick, lora=lora)
    if lora:
        before = DemoResult(out=str(out), seed=seed, quick=quick)
        measure(before, _grid_images(base_grid, seed, len(prompts), plan.images_per_prompt), labels)
        result.base_colour_adherence, result.base_shape_adherence = (
            before.colour_adherence,
            before.shape_adherence,
        )
    if stream:
        loader = json.loads((final / "state" / "trainer.json").read_text())["loader"][0]["stream"]
        result.stream_waves = len(loader["waves"])
    images = _grid_images(grid_dir, seed, len(prompts), plan.images_per_prompt)
    negative_images = (
        None if lora else _grid_images(out / "grid-negative", seed, len(low_prompts), plan.images_per_prompt)
    )
    measure(result, images, labels, negative_images)
    from bigasp.demo.curation import quality_figures

    quality_figures(result, dataset, hidden, out)
    grid_png = write_grid_image(out / f"grid{tag}.png", images, labels, negative_images)
    curve = write_loss_plot(out / f"validation-loss{tag}.png", run_dir / "metrics.jsonl", result)
    result.stage_seconds = {**st.seconds, "total": time.perf_counter() - t_start}
    result.reused = st.reused
    result.paths = {
        "photos": str(photos),
        "dataset": str(dataset),
        "dataset_report": str(report_dir / "index.html"),
        "rejects": str(dataset / "rejects.parquet"),
        "run": str(run_dir),
        "final_checkpoint": str(final),
        "generated": str(grid_dir),
        "grid_image": str(grid_png),
        **({"adapter": str(adapter)} if lora else {"gallery": str(run_dir / "samples" / "index.html")}),
        "loss_plot": str(curve),
        "metrics": str(run_dir / "metrics.jsonl"),
    }
    summary = out / f"summary{tag}.json"
    summary.write_text(
        json.dumps({**asdict(result), "sharpness_ratio": result.sharpness_ratio,
                    "contrast_ratio": result.contrast_ratio, "negative_ratio": result.negative_ratio},
                   indent=2) + "\n"
    )  # fmt: skip
    result.paths["summary"] = str(summary)
    return result


def check_out_folder(out: Path, force: bool) -> None:
    """The demo replaces photos/, run/, base-model/, dataset/ and grid/ in its folder and trains on
    photos/: only in a folder it made itself (`.demo/` inside), a new or empty one, or with --force."""
    if force or not out.exists() or (out / ".demo").is_dir():
        return
    if not out.is_dir():
        raise BigaspError(f"--out {out} is a file; choose a folder")
    if any(out.iterdir()):
        raise BigaspError(
            f"--out {out} is not empty and was not made by `bigasp demo`; the demo would replace its photos/, "
            "run/, base-model/, dataset/ and grid/. Choose a new folder, or pass --force to use this one anyway"
        )


def _final_checkpoint(run_dir: Path, max_samples: int) -> Path:
    from bigasp.train.checkpoint import list_complete_checkpoints, read_meta

    ckpts = list_complete_checkpoints(run_dir)
    if not ckpts or read_meta(ckpts[-1])["samples_seen"] < max_samples:
        raise BigaspError(f"training in {run_dir} did not reach {max_samples} samples; re-run `bigasp demo`")
    return ckpts[-1]


def _grid_images(grid_dir: Path, seed: int, n_prompts: int, per_prompt: int) -> list[list[Any]]:
    """images[p][j] as written by `bigasp generate` ({seed}-{p:02d}-{j:02d}.png)."""
    from PIL import Image

    out = []
    for p in range(n_prompts):
        row = []
        for j in range(per_prompt):
            path = grid_dir / f"{seed}-{p:02d}-{j:02d}.png"
            if not path.is_file():
                raise BigaspError(f"expected generated image {path} is missing; delete {grid_dir} and re-run")
            with Image.open(path) as im:
                row.append(im.convert("RGB"))
        out.append(row)
    return out


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
