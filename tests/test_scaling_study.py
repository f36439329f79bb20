"""bench/scaling_study.py's sizes and fits (the training runs are the study)."""

import os
import sys

import numpy as np
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import scaling_study  # noqa: E402


def test_sizes_span_the_range_and_follow_kaplans_learning_rate():
    n = [scaling_study.non_embedding_params(*size) for size in scaling_study.SIZES]
    assert n == sorted(n) and 0.09e6 < n[0] < 0.11e6 and 15e6 < n[-1] < 20e6
    # Eq. D.1 of Kaplan et al.: about 1.6e-3 at 1e5 parameters, 9e-4 at 2e7.
    assert abs(scaling_study.learning_rate(1e5) - 1.633e-3) < 1e-6
    assert abs(scaling_study.learning_rate(2e7) - 8.94e-4) < 1e-6


def test_fits_recover_known_laws():
    n_S = np.geomspace(1e5, 2e7, 5)
    power = scaling_study.fit_power_law(n_S, (8.8e13 / n_S) ** 0.076)
    assert abs(power["alpha"] - 0.076) < 1e-9 and abs(power["n_c"] / 8.8e13 - 1) < 1e-6
    floor = scaling_study.fit_with_floor(n_S, 1.7 + 40.0 * n_S**-0.3)
    assert abs(floor["e"] - 1.7) < 1e-3 and abs(floor["alpha"] - 0.3) < 1e-3


def test_compute_frontier_keeps_the_lowest_loss_per_compute_and_fits_it():
    """Two sizes' learning curves, each averaged over its seeds: the frontier
    holds only points no other point beats at equal or less compute, and a
    frontier on an exact power law gives back its exponent."""

    def row(curves):  # curves: per seed, [(compute, loss)]
        runs = [
            {"curve": [{"compute": c, "loss": v} for c, v in curve]} for curve in curves
        ]
        return {"runs": runs}

    small = row([[(1, 5.0), (2, 4.0), (4, 3.6)], [(1, 5.2), (2, 4.2), (4, 3.8)]])
    large = row([[(2, 4.5), (4, 3.4), (8, 3.0)], [(2, 4.5), (4, 3.4), (8, 3.0)]])
    assert scaling_study.mean_curve(small) == [(1, 5.1), (2, 4.1), (4, 3.7)]
    frontier = scaling_study.compute_frontier([small, large])
    assert frontier == [(1, 5.1), (2, 4.1), (4, 3.4), (8, 3.0)]
    exact = [(c, (1e9 / c) ** 0.05) for c in np.geomspace(1e10, 1e14, 6)]
    fit = scaling_study.fit_compute(exact)
    assert abs(fit["alpha"] - 0.05) < 1e-9 and fit["points"] == 6
