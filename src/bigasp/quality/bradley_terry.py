"""Bradley–Terry strengths straight from rating votes (an option; bigASP used the ELO route).

The fit is choix's maximum-a-posteriori pairwise estimate. choix takes (winner, loser)
pairs only, so each decisive vote enters twice and a tie once in each direction: that is the
likelihood with a tie counted as half a win for each side — the same (0.5, 0.5) reading of a
tie that the pairwise classifier's labels use.
"""

from __future__ import annotations

import numpy as np


def fit(n_items: int, first: np.ndarray, second: np.ndarray, first_score: np.ndarray, *, alpha: float = 0.01):
    """Log-strengths (mean 0) of n items; `first_score` is 1 (first won), 0 (lost) or 0.5 (tie)."""
    import choix

    data: list[tuple[int, int]] = []
    for a, b, s in zip(first.tolist(), second.tolist(), first_score.tolist(), strict=True):
        if s == 0.5:
            data += [(a, b), (b, a)]
        elif s == 1.0:
            data += [(a, b), (a, b)]
        elif s == 0.0:
            data += [(b, a), (b, a)]
        else:
            raise ValueError(f"vote score must be 0, 0.5 or 1, got {s}")
    # Doubling the data doubles the log-likelihood; doubling alpha keeps the prior's weight.
    params = choix.opt_pairwise(n_items, data, alpha=2 * alpha)
    return params - params.mean()
