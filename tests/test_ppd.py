"""PPD's latency/compute model (Theorem 4.1, Equations 2, 4, 6) against a Monte-Carlo simulation of the pipeline."""

from __future__ import annotations

import pytest

from bildexp import ppd

GRID = [(d, dbar, ell, p, k) for d, dbar in ((4, 2), (40, 20), (30, 20)) for ell in (8, 64)
        for p in (0.0, 0.3, 0.7, 1.0) for k in (1, 3, 5)]


@pytest.mark.parametrize("d,dbar,ell,p,k", GRID)
def test_simulation_agrees_with_theorem_4_1_within_2_percent(d, dbar, ell, p, k):
    latency, compute = ppd.simulate(d, dbar, ell, p, k, trials=4000, seed=1)
    assert latency == pytest.approx(ppd.expected_latency(d, dbar, ell, p), rel=0.02)
    assert compute == pytest.approx(ppd.expected_compute(d, dbar, ell, p, k), rel=0.02)


def test_theorem_corner_cases():
    # Never correct: every token costs d; always correct: one run of d + (ℓ - 1) d̄.
    assert ppd.expected_latency(40, 20, 10, 0.0) == 400
    assert ppd.expected_latency(40, 30, 10, 1.0) == 40 + 9 * 30
    assert ppd.simulate(40, 30, 10, 1.0, 3, trials=10) == (40 + 9 * 30, pytest.approx(ppd.expected_compute(40, 30, 10, 1.0, 3)))


@pytest.mark.parametrize("p,k", [(0.1, 1), (0.5, 3), (0.9, 5)])
def test_equations_2_4_6_are_the_theorem_for_long_sequences_at_half_depth(p, k):
    d, ell = 40, 10**6
    lat, comp = ppd.expected_latency(d, d / 2, ell, p), ppd.expected_compute(d, d / 2, ell, p, k)
    assert lat / (d * ell) == pytest.approx(ppd.latency_per_token(p), rel=1e-4)
    assert comp / lat == pytest.approx(ppd.compute_per_time(p, k), rel=1e-4)
    assert comp / (d * ell) == pytest.approx(ppd.compute_per_token(p, k), rel=1e-4)


def test_paper_figure_2_example():
    """Paper: SQUAD, trained heads, k = 3, d̄ = 20 of 40 (p = 68.37%): latency −34%, "3.2 times" the compute (3.28)."""
    assert ppd.latency_per_token(0.6837) == pytest.approx(0.66, abs=0.005)
    assert ppd.compute_per_time(0.6837, 3) == pytest.approx(3.28, abs=0.005)


def test_trade_off_figure_has_both_panels():
    fig = ppd.trade_off_figure({"multi30k layer 2": {1: 0.5, 3: 0.7, 5: 0.8}})
    points = [sum(len(c.get_offsets()) for c in ax.collections) for ax in fig.axes]
    assert len(fig.axes) == 2 and points == [3, 3]  # one point per k in each panel
