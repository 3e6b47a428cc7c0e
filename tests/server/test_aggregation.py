"""Weighted aggregation, robust rules, update validation and the outer optimiser, by hand."""

import numpy as np
import pytest

from fedmeta.common.config import OuterConfig
from fedmeta.common.errors import DeltaError
from fedmeta.common.params import clip_update
from fedmeta.server.aggregation import aggregate, trimmed_mean, validate_update
from fedmeta.server.outer import OuterOptimizer


def test_reptile_outer_update_by_hand():
    # θ = [1, 2]; Δ_1 = [1, 0] with 10 examples, Δ_2 = [0, 3] with 30; β = 0.5
    # Σ w Δ / Σ w = [10/40, 90/40] = [0.25, 2.25]; θ' = θ + 0.5 * that = [1.125, 3.125]
    theta = {"w": np.array([1.0, 2.0], np.float32)}
    agg = aggregate([{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 3.0], np.float32)}], [10, 30])
    np.testing.assert_allclose(agg["w"], [0.25, 2.25])
    opt = OuterOptimizer(theta, OuterConfig(optimizer="sgd", lr=0.5))
    new = opt.step({k: -v for k, v in agg.items()})
    np.testing.assert_allclose(new["w"], [1.125, 3.125])
    assert theta["w"].tolist() == [1.0, 2.0]  # the caller's θ is not mutated


def test_momentum_and_adam_match_torch_reference():
    import torch

    theta = {"w": np.array([0.5, -1.0, 2.0], np.float32)}
    grads = [np.array([0.1, -0.2, 0.3], np.float32), np.array([-0.4, 0.5, 0.0], np.float32)]
    for cfg, ref_cls, kw in (
        (OuterConfig(optimizer="sgd", lr=0.1, momentum=0.9), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (OuterConfig(optimizer="adam", lr=0.01), torch.optim.Adam, {"lr": 0.01}),
    ):
        opt = OuterOptimizer(theta, cfg)
        p = torch.tensor(theta["w"], requires_grad=True)
        ref = ref_cls([p], **kw)
        for g in grads:
            out = opt.step({"w": g})
            p.grad = torch.tensor(g)
            ref.step()
            np.testing.assert_allclose(out["w"], p.detach().numpy(), rtol=1e-6)


def test_optimizer_state_round_trip():
    theta = {"w": np.ones(3, np.float32)}
    a = OuterOptimizer(theta, OuterConfig(optimizer="adam", lr=0.1))
    a.step({"w": np.array([1.0, 2.0, 3.0], np.float32)})
    b = OuterOptimizer(a.params(), OuterConfig(optimizer="adam", lr=0.1))
    b.load_state_arrays(a.state_arrays())
    g = {"w": np.array([-1.0, 0.5, 0.0], np.float32)}
    np.testing.assert_array_equal(a.step(g)["w"], b.step(g)["w"])


def test_median_trimmed_mean_and_clipping():
    ups = [{"w": np.array([v], np.float32)} for v in (0.5, 1.0, 2.0, 100.0)]
    assert aggregate(ups, [1, 1, 1, 1], rule="median")["w"][0] == pytest.approx(1.5)
    assert trimmed_mean(ups, 0.25)["w"][0] == pytest.approx(1.5)
    clipped, _ = clip_update({"a": np.array([3.0, 4.0], np.float32)}, 1.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-6)
    zero, _ = clip_update({"a": np.zeros(2, np.float32)}, 1.0)
    assert np.all(zero["a"] == 0)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"w": np.array([np.nan, 0.0], np.float32)}, r"site X: w has 1 NaN/Inf"),
        ({"w": np.array([np.inf, 0.0], np.float32)}, r"NaN/Inf"),
        ({"w": np.zeros(3, np.float32)}, r"w has shape \(3,\), expected \(2,\)"),
        ({"w": np.zeros(2, np.float64)}, r"dtype float64, expected float32"),
        ({"v": np.zeros(2, np.float32)}, r"parameter names differ"),
        ({"w": np.array([300.0, 400.0], np.float32)}, r"norm 500 exceeds validation.max_norm = 100"),
    ],
)
def test_validation_rejects_bad_updates(update, message):
    ref = {"w": np.zeros(2, np.float32)}
    with pytest.raises(DeltaError, match=message):
        validate_update(update, ref, max_norm=100.0, source="site X")


def test_outliers_are_clipped_to_the_lower_median_norm_and_others_left_alone():
    from fedmeta.server.aggregation import clip_outliers, lower_median

    ups = [{"w": np.array([v, 0.0], np.float32)} for v in (1.0, 2.0, 3.0, 3e4)]
    assert lower_median([1.0, 2.0, 3.0, 3e4]) == 2.0 and lower_median([5.0, 1e9]) == 5.0
    out = clip_outliers(ups, 4.0)  # bound 4 × 2 = 8: only the last is an outlier
    for u, o in zip(ups[:3], out[:3], strict=True):
        np.testing.assert_array_equal(u["w"], o["w"])
    np.testing.assert_allclose(out[3]["w"], [2.0, 0.0])  # scaled to the median norm, same direction
    # Two sites: the smaller norm is the reference, so one site cannot raise the bound alone.
    pair = clip_outliers([{"w": np.array([1.0], np.float32)}, {"w": np.array([-50.0], np.float32)}], 4.0)
    np.testing.assert_allclose(pair[1]["w"], [-1.0])


# -- the response check (validation.response_check) ----------------------------------------------
def _v(*xs):
    return {"w": np.array(xs, np.float32)}


def test_response_cosine_by_hand():
    from fedmeta.server.aggregation import response_cosine

    s0, s1 = _v(0.0, 0.0), _v(2.0, 0.0)  # θ moved by d = [2, 0]
    # Δp = [3, 0]: along the move (an honest site's update pushes back) -> +1
    assert response_cosine(s0, _v(1.0, 1.0), s1, _v(4.0, 1.0)) == pytest.approx(1.0)
    # Δp = [-1, 1]: cos = -1 / √2 (a flipped site's reaction has the opposite sign)
    assert response_cosine(s0, _v(1.0, 1.0), s1, _v(0.0, 2.0)) == pytest.approx(-1 / np.sqrt(2))
    # scaling the update scales Δp, not the cosine
    assert response_cosine(s0, _v(3e4, 3e4), s1, _v(0.0, 6e4)) == pytest.approx(-1 / np.sqrt(2))
    # several arrays count as one vector: d = [1, 0 | 1], Δp = [1, 1 | 0] -> 1 / (√2 √2) = 0.5
    a = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    assert response_cosine(a, a, {"w": np.array([1.0, 0.0], np.float32), "b": np.ones(1, np.float32)},
                           {"w": np.ones(2, np.float32), "b": np.zeros(1, np.float32)}) == pytest.approx(0.5)
    assert response_cosine(s0, _v(1.0, 1.0), s0, _v(4.0, 1.0)) is None  # θ did not move
    assert response_cosine(s0, _v(1.0, 1.0), s1, _v(1.0, 1.0)) is None  # the update did not change


def _feed(check, t, changes, pseudo):
    """Round t: θ = [t, 0] (it moves by [1, 0] a round); each site's pseudo-gradient changes by
    the given vector, so with lag 1 its cosine is that vector's first entry over its length."""
    for site, d in changes.items():
        pseudo[site] = pseudo.get(site, np.zeros(2)) + np.asarray(d, float)
    return check.observe(_v(float(t), 0.0), {s: {"w": p.astype(np.float32)} for s, p in pseudo.items()})


def test_response_check_cusum_and_readmission_by_hand():
    from fedmeta.server.aggregation import ResponseCheck

    check = ResponseCheck(allowance=0.3, threshold=1.0, lag=1)
    pseudo: dict[str, np.ndarray] = {}
    honest, flipped, sideways = [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]
    _feed(check, 0, {"A": honest, "B": honest, "C": honest}, pseudo)  # first sight: no cosine
    assert check.scores() == {"A": 0.0, "B": 0.0, "C": 0.0}
    # cosines A 1, B 0, C -1. A: 1 - median(0, -1) + 0.3 > 0 -> 0; B: 0 - median(1, -1) + 0.3 -> 0;
    # C: -1 - median(1, 0) + 0.3 = -1.2 <= -1 -> left out
    c = _feed(check, 1, {"A": honest, "B": sideways, "C": flipped}, pseudo)
    assert c == pytest.approx({"A": 1.0, "B": 0.0, "C": -1.0})
    assert check.scores() == pytest.approx({"A": 0.0, "B": 0.0, "C": -1.2})
    assert check.excluded(["A", "B", "C"]) == ["C"]
    _feed(check, 2, {"A": honest, "B": sideways, "C": flipped}, pseudo)  # -2.4, floored at -2
    assert check.scores()["C"] == pytest.approx(-2.0)
    # Now every site reacts alike (cosine 1): C gains 1 - 1 + 0.3 = 0.3 a round. Its score is above
    # the threshold after four rounds, but C stays out until the score is back at 0.
    expected = [-1.7, -1.4, -1.1, -0.8, -0.5, -0.2, 0.0]
    for t, score in enumerate(expected, start=3):
        _feed(check, t, {"A": honest, "B": honest, "C": honest}, pseudo)
        assert check.scores()["C"] == pytest.approx(score)
        assert check.excluded(["A", "B", "C"]) == ([] if score == 0.0 else ["C"])
    assert check.scores()["A"] == 0.0 and check.scores()["B"] == 0.0  # honest: never below 0


def test_a_site_that_pushes_back_less_than_the_others_is_not_suspect():
    """Only a response that goes along with θ's move (cosine < 0) counts against a site: an honest
    site whose response is positive but far below the others' (noise dominating, late in a run)
    never loses score, while one whose response is negative does, by its shortfall."""
    from fedmeta.server.aggregation import ResponseCheck

    check = ResponseCheck(allowance=0.3, threshold=1.0, lag=1)
    pseudo: dict[str, np.ndarray] = {}
    weak = [0.1, 1.0]  # cosine 0.1 / √1.01 ≈ 0.0995: pushes back, weakly
    _feed(check, 0, {"A": [1, 0], "B": [1, 0], "C": weak}, pseudo)
    for t in range(1, 20):
        c = _feed(check, t, {"A": [1, 0], "B": [1, 0], "C": weak}, pseudo)
        assert c["C"] == pytest.approx(0.1 / np.sqrt(1.01))
        # (without the condition: 0.0995 - 1 + 0.3 = -0.6 a round, out after two rounds)
        assert check.scores()["C"] == 0.0 and check.excluded(["A", "B", "C"]) == []
    # slightly against the move: cos = -0.1/√1.01; step -0.0995 - 1 + 0.3 = -0.7995 a round
    _feed(check, 20, {"A": [1, 0], "B": [1, 0], "C": [-0.1, 1.0]}, pseudo)
    assert check.scores()["C"] == pytest.approx(-0.1 / np.sqrt(1.01) - 1 + 0.3)
    _feed(check, 21, {"A": [1, 0], "B": [1, 0], "C": [-0.1, 1.0]}, pseudo)
    assert check.excluded(["A", "B", "C"]) == ["C"]


def test_response_check_leaves_out_a_minority_only():
    from fedmeta.server.aggregation import ResponseCheck

    check = ResponseCheck(allowance=0.3, threshold=1.0, lag=1)
    pseudo: dict[str, np.ndarray] = {}
    _feed(check, 0, {"A": [1, 0], "B": [1, 0]}, pseudo)
    for t in range(1, 6):
        _feed(check, t, {"A": [1, 0], "B": [-1, 0]}, pseudo)
    assert check.scores()["B"] == pytest.approx(-2.0)
    assert check.excluded(["A", "B"]) == []  # two sites: nothing tells which one is wrong
    # with A, B and three sites that joined late: at most (5 - 1) // 2 = 2 left out, lowest first
    check2 = ResponseCheck(allowance=0.0, threshold=1.0, lag=1)
    check2.load({}, [{"site": s, "score": v, "out": v <= -1, "kept": 0}
                     for s, v in (("A", -1.5), ("B", -2.0), ("C", -1.0), ("D", 0.0), ("E", 0.0))])
    assert check2.excluded(["A", "B", "C", "D", "E"]) == ["A", "B"]
    assert check2.excluded(["C", "D", "E"]) == ["C"]


def _quadratic_federation(flip: str | None, rounds: int = 60, n_sites: int = 4, seed: int = 0,
                          guard: bool = True):
    """Gradient descent on Σ_i L_i, L_i(θ) = ½ (θ − a_i)ᵀ H_i (θ − a_i) with heterogeneous optima
    a_i and curvatures H_i, noisy site gradients and optionally one site sending −∇L_i."""
    from fedmeta.server.aggregation import ResponseCheck

    rng = np.random.default_rng(seed)
    dim = 12
    sites = [f"site{i}" for i in range(n_sites)]
    optima = {s: rng.normal(0, 1.0, dim) for s in sites}
    curv = {}
    for s in sites:
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        curv[s] = q @ np.diag(rng.uniform(0.05, 1.0, dim)) @ q.T
    theta = rng.normal(0, 2.0, dim)
    check = ResponseCheck(allowance=0.3, threshold=2.0)
    excluded = []
    for _ in range(rounds):
        grads = {s: curv[s] @ (theta - optima[s]) + rng.normal(0, 0.05, dim) for s in sites}
        if flip:
            grads[flip] = -grads[flip]
        pseudo = {s: {"w": g.astype(np.float32)} for s, g in grads.items()}
        check.observe({"w": theta.astype(np.float32)}, pseudo)
        out = check.excluded(sites) if guard else []
        excluded.append(out)
        kept = [s for s in sites if s not in out]
        theta = theta - 1.0 * np.mean([grads[s] for s in kept], axis=0)
    honest = [s for s in sites if s != flip]
    target = np.linalg.solve(sum(curv[s] for s in honest), sum(curv[s] @ optima[s] for s in honest))
    return excluded, float(np.linalg.norm(theta - target))


def test_response_check_on_a_quadratic_federation():
    # Honest heterogeneous sites: nobody is ever left out, so the aggregate is the plain mean.
    for seed in range(5):
        excluded, _ = _quadratic_federation(None, seed=seed)
        assert not any(excluded), seed
    # One sign-flipped site: left out within a few rounds and from then on, no honest site ever;
    # θ ends near the honest sites' joint optimum (noise floor ~0.1), far from it without the check.
    for seed in range(5):
        excluded, dist = _quadratic_federation("site1", seed=seed)
        first = next(i for i, out in enumerate(excluded) if out)
        assert first <= 5 and all(out == ["site1"] for out in excluded[first:]), seed
        assert dist < 0.25
        assert _quadratic_federation("site1", seed=seed, guard=False)[1] > 1.0
    # Two sites: the check cannot tell which is wrong and leaves both in.
    excluded, _ = _quadratic_federation("site1", n_sites=2)
    assert not any(excluded)


def test_response_check_state_round_trips_through_a_checkpoint(tmp_path):
    import json

    from fedmeta.common import params as P
    from fedmeta.server.aggregation import ResponseCheck

    rng = np.random.default_rng(1)
    sites = ["Cleveland", "Hungary", "VA Long Beach/x"]  # a name with a slash stays out of keys

    def step(check, t):
        state = {"w": np.full(3, float(t), np.float32), "lr::w": np.full(3, 0.1 * t, np.float32)}
        pseudo = {s: {k: rng.normal(size=3).astype(np.float32) * (-1 if s == "Hungary" else 1)
                      for k in state} for s in sites}
        return check.observe(state, pseudo), check.excluded(sites)

    a = ResponseCheck(allowance=0.3, threshold=0.5)
    for t in range(4):
        step(a, t)
    P.save(tmp_path / "ck.safetensors", a.arrays(), {"response": a.meta()})
    arrays, meta = P.load(tmp_path / "ck.safetensors")
    b = ResponseCheck(allowance=0.3, threshold=0.5)
    b.load(arrays, json.loads(json.dumps(meta["response"])))
    assert b.scores() == a.scores() and b.meta() == a.meta()
    state_rng = rng.bit_generator.state
    after_a = [step(a, t) for t in range(4, 8)]
    rng.bit_generator.state = state_rng
    after_b = [step(b, t) for t in range(4, 8)]
    assert after_a == after_b and a.scores() == b.scores()
