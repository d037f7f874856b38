"""Score-model files that are damaged, for another embedding size, or numerically broken, through the
installed `bigasp` executable: one-line errors naming the file and the fix, nothing scored silently;
a scorer that puts (nearly) every image in one bin is scored but warned about loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bigasp.errors import ModelLoadError
from bigasp.quality.models import ScoreClassifier, file_digest, load_model, save_model
from bigasp.store import annotations
from bigasp.store.annotations import read_embeddings
from quality_helpers import demo_dataset

BIGASP = Path(sys.executable).with_name("bigasp")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root, _, _ = demo_dataset(tmp_path_factory.mktemp("model-files"), 24)
    return root, int(read_embeddings(root).vectors.shape[1])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIGASP), *args], capture_output=True, text=True, timeout=120, env=env)


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-1000:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _state(d: int, bins: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in ScoreClassifier(d, 0.0, bins).state_dict().items()}


def _write(path: Path, state: dict[str, torch.Tensor], meta: dict | str | None) -> Path:
    metadata = None if meta is None else {"bigasp": meta if isinstance(meta, str) else json.dumps(meta)}
    save_file(state, str(path), metadata=metadata)
    return path


def _meta(d: int, bins: int = 10) -> dict:
    return {"kind": "score-classifier", "embedding_size": d, "bins": bins}


def _score(root: Path, scorer: Path) -> subprocess.CompletedProcess:
    return _cli("quality", "score", str(root), "--scorer", str(scorer))


def _nothing_scored(root: Path, scorer: Path) -> None:
    if scorer.is_file():
        assert f"bigasp-scorer-{file_digest(scorer)[:12]}" not in annotations.list_models(root, "quality")


def test_nan_weights_are_refused_at_load(dataset, tmp_path):
    root, d = dataset
    state = _state(d)
    state["linear2.weight"][3, 5] = float("nan")
    scorer = _write(tmp_path / "nan.safetensors", state, _meta(d))
    res = _score(root, scorer)
    _one_line_error(res, "nan.safetensors", "linear2.weight", "NaN/Inf", "bigasp quality fit-scorer")
    _nothing_scored(root, scorer)


def test_non_finite_outputs_of_finite_weights_are_refused_per_batch(dataset, tmp_path):
    root, d = dataset
    state = _state(d)
    state["linear2.weight"].fill_(3e38)  # finite, but every logit overflows to inf: softmax gives NaN
    scorer = _write(tmp_path / "huge.safetensors", state, _meta(d))
    res = _score(root, scorer)
    _one_line_error(res, "huge.safetensors", "NaN/Inf outputs", "nothing of this run was written")
    _nothing_scored(root, scorer)


def test_one_bin_taking_every_image_is_scored_with_a_loud_warning(dataset, tmp_path):
    root, d = dataset
    state = _state(d)
    state["linear2.bias"][0] = 1000.0  # a finite scorer that calls every image 0
    scorer = _write(tmp_path / "zero.safetensors", state, _meta(d))
    res = _cli("quality", "score", str(root), "--scorer", str(scorer), "--no-manifest", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "WARNING: 24 of 24 images (100%) got score 0" in res.stderr
    assert "left out of training" in res.stderr and "zero.safetensors" in res.stderr
    assert "score 0" in json.loads(res.stdout)["warning"]


def test_a_healthy_spread_is_not_warned_about(tmp_path):
    from bigasp.quality.pipeline import one_bin_warning

    assert one_bin_warning([2, 3, 15, 4], tmp_path / "s.safetensors") is None
    assert one_bin_warning([19, 0], tmp_path / "s.safetensors") is None  # too few images to judge
    assert "20 of 20" in one_bin_warning([0, 20], tmp_path / "s.safetensors")


def test_a_model_for_another_embedding_size_names_both_sizes(dataset, tmp_path):
    root, d = dataset
    other = d * 2
    scorer = tmp_path / "wide.safetensors"
    save_model(ScoreClassifier(other, 0.0, 10), scorer, {})
    line = _one_line_error(
        _score(root, scorer), "wide.safetensors", f"{other}-value", f"{d} values", "--embed-key"
    )
    assert "tiny-clip" in line
    _nothing_scored(root, scorer)


CLI_CASES = ("no metadata", "absurd bins", "wrong tensor names")


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("no metadata", ["has no bigasp metadata", "bigasp quality fit-scorer"]),
        ("metadata not JSON", ["not valid JSON", "bigasp quality fit-scorer"]),
        ("metadata a list", ["not a JSON object"]),
        ("no embedding_size", ["embedding_size is missing", "damaged"]),
        ("embedding_size a string", ["embedding_size is '768'"]),
        ("absurd bins", ["bins is 1000000000", "from 2 to 127"]),
        ("one bin", ["bins is 1,", "from 2 to 127"]),
        ("bins a float", ["bins is 10.5"]),
        ("wrong tensor names", ["missing: linear1.bias, linear1.weight", "unexpected: fc1.bias, fc1.weight"]),
        ("shape against metadata", ["linear2.weight has shape", "bins 12", "damaged"]),
        ("not safetensors", ["not a readable safetensors file"]),
        ("a classifier", ["holds a quality-classifier, not a score-classifier"]),
    ],
)
def test_damaged_score_model_files_are_one_line_errors(dataset, tmp_path, case, needles):
    """Three cases run the installed executable (exit 2, one line); the rest call the loader the
    command uses (the same ModelLoadError, which the CLI prints as that one line)."""
    root, d = dataset
    path = tmp_path / "scorer.safetensors"
    state, meta = _state(d), _meta(d)
    if case == "no metadata":
        _write(path, state, None)
    elif case == "metadata not JSON":
        _write(path, state, '{"kind": "score-classifier", "embedding_')
    elif case == "metadata a list":
        _write(path, state, "[1, 2]")
    elif case == "no embedding_size":
        _write(path, state, {"kind": "score-classifier", "bins": 10})
    elif case == "embedding_size a string":
        _write(path, state, {**meta, "embedding_size": "768"})
    elif case == "absurd bins":
        _write(path, state, {**meta, "bins": 10**9})
    elif case == "one bin":
        _write(path, _state(d, 1), {**meta, "bins": 1})
    elif case == "bins a float":
        _write(path, state, {**meta, "bins": 10.5})
    elif case == "wrong tensor names":
        state = {k.replace("linear1", "fc1"): v for k, v in state.items()}
        _write(path, state, meta)
    elif case == "shape against metadata":
        _write(path, state, {**meta, "bins": 12})
    elif case == "not safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    elif case == "a classifier":
        _write(path, state, {**meta, "kind": "quality-classifier"})
    if case in CLI_CASES:
        _one_line_error(_score(root, path), str(path), *needles)
    else:
        with pytest.raises(ModelLoadError) as err:
            load_model(path, "score-classifier")
        message = str(err.value)
        assert "\n" not in message and str(path) in message, message
        for n in needles:
            assert n in message, message
    _nothing_scored(root, path)


def test_rank_and_arena_refuse_a_damaged_classifier_too(dataset, tmp_path):
    root, d = dataset
    path = tmp_path / "classifier.safetensors"
    _write(path, _state(d), {"kind": "quality-classifier", "embedding_size": d})
    _one_line_error(_cli("quality", "rank", str(root), "--classifier", str(path)),
                    str(path), "missing: seq.1.bias", "bigasp quality train")  # fmt: skip
    from bigasp.quality.config import ArenaConfig
    from bigasp.quality.serve import build_arena

    with pytest.raises(ModelLoadError, match=r"missing: seq\.1\.bias"):
        build_arena(root, ArenaConfig(pool=6), ratings=tmp_path / "r.sqlite", classifier=path)


def test_a_classifier_with_non_finite_outputs_stops_the_tournament(dataset, tmp_path):
    """p > 0.5 is False for NaN: without the check every first image would lose each game silently."""
    from bigasp.quality.models import QualityClassifier

    root, d = dataset
    model = QualityClassifier(d, 0.0)
    with torch.no_grad():
        model.seq[4].weight.fill_(3e38)  # finite weights, overflowing logits
    path = save_model(model, tmp_path / "classifier.safetensors", {})
    out = tmp_path / "ranking.parquet"
    res = _cli(
        "quality", "rank", str(root), "--classifier", str(path), "--out", str(out), "--set", "rounds=4"
    )
    _one_line_error(res, str(path), "NaN/Inf probabilities", "bigasp quality train")
    assert not out.exists()


def test_rank_bins_above_int8_are_a_config_error(dataset, tmp_path):
    root, _ = dataset
    res = _cli("quality", "rank", str(root), "--method", "bradley-terry", "--set", "bins=200")
    assert res.returncode == 2 and "bins" in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]
