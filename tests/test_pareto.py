"""Pareto front and hypervolume on hand-made points (exact values)."""

import pytest

from ray_unlearn.pareto import choose, dominates, front, hypervolume


def P(sscd, integrity, forgotten=True, **kw):
    return {"sscd": sscd, "integrity": integrity, "forgotten": forgotten, **kw}


def test_dominates():
    assert dominates((0.3, 0.8), (0.4, 0.7))
    assert dominates((0.3, 0.8), (0.3, 0.7))
    assert not dominates((0.3, 0.8), (0.3, 0.8))
    assert not dominates((0.3, 0.6), (0.4, 0.7))


def test_front_keeps_only_forgotten_non_dominated_points():
    pts = [P(0.5, 0.9), P(0.3, 0.7), P(0.4, 0.6), P(0.2, 0.95, forgotten=False), P(0.3, 0.7), P(0.55, 0.85)]
    f = front(pts)
    assert [(p["sscd"], p["integrity"]) for p in f] == [(0.3, 0.7), (0.5, 0.9)]


def test_hypervolume_exact():
    # ref (0.6, 0): boxes [0.3,0.6]x[0,0.7] and [0.5,0.6]x[0,0.9]
    pts = [P(0.5, 0.9), P(0.3, 0.7)]
    assert hypervolume(pts, 0.6) == pytest.approx(0.2 * 0.7 + 0.1 * 0.9)
    assert hypervolume([P(0.3, 0.7)], 0.6) == pytest.approx(0.3 * 0.7)
    # a dominated point or one that did not forget adds nothing
    assert hypervolume(pts + [P(0.4, 0.6), P(0.1, 0.99, forgotten=False)], 0.6) == pytest.approx(0.23)
    # points outside the box add nothing; the integrity reference shifts the box
    assert hypervolume([P(0.7, 0.9)], 0.6) == 0.0
    assert hypervolume(pts, 0.6, ref_integrity=0.5) == pytest.approx(0.2 * 0.2 + 0.1 * 0.4)
    assert hypervolume([], 0.6) == 0.0


def test_choose_most_intact_within_bound():
    f = front([P(0.5, 0.9), P(0.3, 0.7), P(0.2, 0.5)])
    assert choose(f, 0.6)["integrity"] == 0.9
    assert choose(f, 0.95) is None
    assert choose([P(0.5, 0.9, passed=False), P(0.3, 0.7)], 0.6)["integrity"] == 0.7
