"""`bigasp dataset preview --n N` prints N prompts, or says how many it could and why not."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from test_train_data import make_dataset

BIGASP = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "bigasp"


def _preview(root: Path, *args: str) -> tuple[int, str]:
    res = subprocess.run(
        [str(BIGASP), "dataset", "preview", str(root), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr
    shown = len([x for x in res.stdout.splitlines() if x.startswith("[")])
    why = [x for x in res.stderr.splitlines() if x.startswith("showed ")]
    return shown, why[0] if why else ""


def test_preview_says_why_it_shows_fewer_than_asked(tmp_path, capsys):
    # 40 rows: 4 have score 0 (excluded), 3 are held out (10% cap); the other 33 fall into
    # chunk-aware buckets, some smaller than a batch of 4.
    root = make_dataset(tmp_path / "ds", n=40)
    shown, why = _preview(root, "--n", "100")
    m = re.fullmatch(
        r"showed (\d+) of 100 prompts: epoch 0 trains on (\d+) samples \((\d+) full batch\(es\) of 4\)\. "
        r"Of the dataset's rows, (\d+) are for training, (\d+) of them left over this epoch in bucket tails "
        r"smaller than one batch; (\d+) are held out for validation; (\d+) are excluded \(score 0\)\. "
        r"To see more: --set device_batch_size=1 --set validation_size=0\.",
        why,
    )
    assert m, why
    n_shown, n_trained, batches, train, tails, held, excluded = map(int, m.groups())
    assert shown == n_shown == n_trained == 4 * batches < 100
    assert n_trained + tails == train and train + held + excluded == 40
    assert (held, excluded) == (3, 4)

    shown, why = _preview(root, "--n", "100", "--set", "device_batch_size=1", "--set", "validation_size=0")
    assert shown == 36  # as advised: every row but the score-0 ones
    assert why.startswith("showed 36 of 100") and why.endswith("The dataset holds no more training rows.")

    from bigasp.cli import main

    main(["dataset", "preview", str(root), "--n", "5"])  # enough rows: five prompts, nothing to explain
    out = capsys.readouterr()
    assert len([x for x in out.out.splitlines() if x.startswith("[")]) == 5 and "showed" not in out.err
