"""The federated logistic regression equals the pooled fit: scikit-learn's (one intercept) and an
independent optimiser's (site intercepts), on synthetic sites and on Fed-Heart-Disease's four
hospitals through the real coordinator and ClientApp."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from fedmeta.common.errors import FedmetaError
from fedmeta.common.glm import GlmState, newton_step, site_sums


def _sites(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = np.array([1.0, -0.5, 0.2, 0.0, 0.7])
    out = []
    for i, n in enumerate([120, 80, 40, 200]):
        x = rng.normal(size=(n, 5)) + 0.3 * i
        y = (rng.random(n) < 1 / (1 + np.exp(-(x @ w + 0.4 * i - 1)))).astype(int)
        out.append((x, y))
    return out


def _fit(sites, *, l2: float, site_intercept: bool, steps: int = 10) -> tuple[GlmState, list[float]]:
    state = GlmState.zeros(sites[0][0].shape[1], len(sites) if site_intercept else 0)
    decrements = []
    for _ in range(steps):
        step = newton_step(state, [site_sums(x, y, state.site_beta(s)) for s, (x, y) in enumerate(sites)], l2=l2)
        state = step.state
        decrements.append(step.decrement)
    return state, decrements


@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_equals_scikit_learn_pooled_fit_within_ten_steps(l2: float) -> None:
    sites = _sites()
    state, decrements = _fit(sites, l2=l2, site_intercept=False)
    x = np.vstack([x for x, _ in sites])
    y = np.concatenate([y for _, y in sites])
    ref = LogisticRegression(C=1 / l2, tol=1e-14, max_iter=100_000).fit(x, y)
    coef = np.r_[ref.coef_[0], ref.intercept_]
    ours = np.r_[state.w, state.b]
    assert np.max(np.abs(ours - coef)) / np.max(np.abs(coef)) < 1e-6
    assert decrements[6] < 1e-10  # quadratic convergence: converged well within 10 steps


def test_site_intercepts_equal_an_independent_optimiser_on_the_pooled_objective() -> None:
    sites = _sites(1)
    l2 = 1.0
    state, _ = _fit(sites, l2=l2, site_intercept=True)
    d, n_sites = 5, len(sites)

    def objective(v: np.ndarray) -> float:  # Σ log(1+e^z) − yz + λ/2 (‖w‖² + ‖u‖²), z = xw + b + u_s
        w, b, u = v[:d], v[d], v[d + 1:]
        total = 0.5 * l2 * (w @ w + u @ u)
        for s, (x, y) in enumerate(sites):
            z = x @ w + b + u[s]
            total += np.sum(np.logaddexp(0, z) - y * z)
        return float(total)

    ref = minimize(objective, np.zeros(d + 1 + n_sites), method="BFGS", options={"gtol": 1e-10}).x
    assert np.allclose(state.vector(), ref, rtol=0, atol=1e-5)
    assert objective(state.vector()) <= objective(ref) + 1e-9


def test_a_site_whose_rows_share_one_outcome_keeps_a_finite_intercept() -> None:
    sites = _sites(2)
    x, _ = sites[2]
    sites[2] = (x, np.ones(len(x), dtype=int))  # Switzerland's training split: only positives
    state, decrements = _fit(sites, l2=1.0, site_intercept=True, steps=12)
    assert decrements[-1] < 1e-12 and np.all(np.isfinite(state.u))


def test_site_sums_are_the_hand_computed_sums() -> None:
    x = np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]])
    y = np.array([1, 0, 1])
    beta = np.array([0.5, -0.25, 0.1])
    s = site_sums(x, y, beta)
    z = x @ beta[:2] + beta[2]
    p = 1 / (1 + np.exp(-z))
    xt = np.c_[x, np.ones(3)]
    assert np.allclose(s.gradient, sum((p[i] - y[i]) * xt[i] for i in range(3)))
    assert np.allclose(s.hessian, sum(p[i] * (1 - p[i]) * np.outer(xt[i], xt[i]) for i in range(3)))
    assert s.loss == pytest.approx(sum(-y[i] * np.log(p[i]) - (1 - y[i]) * np.log(1 - p[i]) for i in range(3)))
    assert (s.n, s.events) == (3, 2)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        site_sums(x, np.array([1, 2, 0]), beta)


def _heart_rows():  # type: ignore[no-untyped-def]
    from fedmeta.common.config import load_config
    from fedmeta.sitecore.data import site_for_node

    cfg = load_config(None, ["algorithm=glm", "model.name=linear"])
    sites = [site_for_node({"partition-id": i}, cfg) for i in range(4)]
    return sites


def test_the_federated_run_equals_scikit_learn_on_the_pooled_training_rows(local_run, tmp_path) -> None:
    """Four hospitals, the real coordinator and ClientApp: θ is scikit-learn's pooled fit."""
    summary, _ = local_run(tmp_path, ["algorithm=glm", "model.name=linear", "rounds=10", "glm.l2=1.0",
                                      "eval.bootstrap=0"])
    g = summary["glm"]
    assert g["converged"] and g["newton_steps"] <= 10
    sites = _heart_rows()
    x = np.vstack([s.x_train for s in sites]).astype(np.float64)  # scikit-learn fits float32 input in float32
    y = np.concatenate([s.y_train[:, 0] for s in sites])
    ref = LogisticRegression(C=1.0, tol=1e-14, max_iter=100_000).fit(x, y)
    coef = np.r_[ref.coef_[0], ref.intercept_]
    ours = np.r_[g["coefficients"], g["intercept"]]
    assert np.max(np.abs(ours - coef)) / np.max(np.abs(coef)) < 1e-6
    # θ in final.safetensors holds it: class 1's logit minus class 0's is xᵀw + b
    from safetensors.numpy import load_file

    theta = load_file(str(tmp_path / "run" / "final.safetensors"))
    weight = next(v for v in theta.values() if v.ndim == 2)
    bias = next(v for v in theta.values() if v.ndim == 1)
    assert np.allclose(weight[1] - weight[0], ref.coef_[0], atol=1e-5)
    assert bias[1] - bias[0] == pytest.approx(ref.intercept_[0], abs=1e-5)


def test_malformed_sums_are_refused_with_the_site_named() -> None:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedmeta.client.app import app
    from fedmeta.protocol import keys as K
    from fedmeta.protocol.records import record_from_arrays
    from fedmeta.server.glm import read_sums
    from fedmeta.server.local_grid import LocalGrid

    LocalGrid(app, [])  # a Message is built inside a run

    def reply(gradient, hessian, n=10):  # type: ignore[no-untyped-def]
        content = RecordDict({K.SUMS: record_from_arrays({"gradient": gradient, "hessian": hessian}),
                              K.SITE: ConfigRecord({"name": "x"}),
                              K.METRICS: MetricRecord({K.NUM_EXAMPLES: n, K.LOSS_SUM: 1.0})})
        return Message(content=content, dst_node_id=1, message_type="train")

    ok = read_sums(reply(np.zeros(3), np.eye(3)), "A", 2)
    assert ok.n == 10
    with pytest.raises(FedmetaError, match="site A: sums of shape"):
        read_sums(reply(np.zeros(4), np.eye(4)), "A", 2)
    with pytest.raises(FedmetaError, match="site A: the Hessian is not symmetric positive semi-definite"):
        read_sums(reply(np.zeros(3), np.array([[1.0, 2, 0], [0, 1, 0], [0, 0, 1]])), "A", 2)
    with pytest.raises(FedmetaError, match="site A: the Hessian does not fit 10 rows"):
        read_sums(reply(np.zeros(3), np.diag([1.0, 1.0, 100.0])), "A", 2)
    with pytest.raises(FedmetaError, match="site A: sums are not finite"):
        read_sums(reply(np.array([np.nan, 0, 0]), np.eye(3)), "A", 2)


def test_a_site_policy_may_refuse_the_glm_and_bounds_its_coefficients_per_patient() -> None:
    from fedmeta.common.config import load_config
    from fedmeta.common.data.base import TabularSite
    from fedmeta.protocol import keys as K
    from fedmeta.protocol.request import SiteRequest
    from fedmeta.sitecore.policy import PolicyRefusal, SitePolicy, check_request

    cfg = load_config(None, ["algorithm=glm", "model.name=linear"])
    request = SiteRequest(message_type="train", phase=K.GLM, experiment=cfg)
    site = _heart_rows()[2]  # Switzerland: 30 training patients, 13 features
    assert isinstance(site, TabularSite) and site.n_train == 30
    with pytest.raises(PolicyRefusal, match="the federated GLM's gradient and Hessian sums are not released here"):
        check_request(SitePolicy(min_patients=5, allow_glm=False), request, site=lambda: site)
    with pytest.raises(PolicyRefusal, match="the GLM has 14 coefficients for 30 patients, more than this "
                                            "site's glm_parameter_ratio = 0.33 per patient"):
        check_request(SitePolicy(min_patients=5), request, site=lambda: site)
    with pytest.raises(PolicyRefusal, match="the GLM's sums would rest on 30 patients, below this site's "
                                            "min_patients = 40"):
        check_request(SitePolicy(min_patients=40), request, site=lambda: site)
    check_request(SitePolicy(min_patients=5, glm_parameter_ratio=0.5), request, site=lambda: site)
