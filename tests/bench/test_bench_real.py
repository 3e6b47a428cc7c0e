"""``fedmeta bench real``: its cohorts, its reference rows and its quick setting.

The benchmark's figures are results (BENCHMARKS.md), not expectations; what is checked here is
that it measures what it says: the censoring rule, the intercept refit, and that the federated
GLM's row equals scikit-learn's pooled logistic regression on the same held-out rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedmeta.bench import cohorts as C
from fedmeta.bench import real as R


def test_a_survival_outcome_at_a_horizon_leaves_out_patients_censored_before_it() -> None:
    time = pd.Series([100.0, 400.0, 100.0, 900.0, 365.0])
    event = pd.Series([1, 1, 0, 0, 1])
    got = C.at_horizon(time, event, 365)
    assert got.tolist()[:2] == [1.0, 0.0] and math.isnan(got[2]) and got[3] == 0.0 and got[4] == 1.0


def test_the_refitted_intercept_maximises_the_likelihood_with_the_slopes_fixed() -> None:
    from scipy.optimize import minimize_scalar
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (rng.random(200) < 1 / (1 + np.exp(-x[:, 0]))).astype(int)
    model = LogisticRegression().fit(x, y)
    xs, ys = x[:20] + 1.0, y[:20]
    b = R.refit_intercept(model, xs, ys)
    z = model.decision_function(xs)
    nll = lambda s: float(np.sum(np.logaddexp(0, z + s) - ys * (z + s)))  # noqa: E731
    assert b == pytest.approx(minimize_scalar(nll, bounds=(-20, 20), method="bounded",
                                              options={"xatol": 1e-10}).x, abs=1e-6)


def test_a_cohort_is_written_as_a_consortium_fedmeta_reads(tmp_path: Path) -> None:
    pytest.importorskip("sksurv")
    from fedmeta.common.config import load_config
    from fedmeta.common.data.registry import data_spec

    root = C.write_cohort(C.COHORTS["gbsg2"], tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["grade-I", "grade-II", "grade-III", "schema.yaml"]
    site = yaml.safe_load((root / "grade-II" / "site.yaml").read_text())
    assert site == {"kind": "ehr", "name": "grade-II", "path": "rows.csv", "schema": "../schema.yaml",
                    "outcomes": ["event_3y"], "id_column": "patient_id"}
    rows = sum(len(pd.read_csv(root / s / "rows.csv")) for s in ("grade-I", "grade-II", "grade-III"))
    frame = C.COHORTS["gbsg2"].frame()
    assert rows == int(frame["outcome"].notna().sum()) < len(frame) == 686  # censored before 3 y: out
    spec = data_spec(load_config(None, ["data.source=ehr", f"data.path={root}"]).data)
    assert spec.sites == ("grade-I", "grade-II", "grade-III")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    pytest.importorskip("sksurv")
    out = tmp_path_factory.mktemp("real")
    return R.run(quick=True, out_dir=out), out


@pytest.mark.slow
def test_quick_run_rows_tables_and_the_glm_reference(quick) -> None:  # type: ignore[no-untyped-def]
    rows, out = quick
    assert {r["cohort"] for r in rows} == {"fed-heart", "gbsg2", "*"}
    for r in rows:
        assert r["value"] is None or math.isfinite(r["value"])
    # the federated GLM as fitted is pooled logistic regression: same rows, same scores
    for cohort in ("fed-heart", "gbsg2"):
        for metric in ("auroc", "loss", "brier"):
            def get(method: str, metric: str = metric, cohort: str = cohort) -> dict[str, float]:
                return {r["site"]: r["value"] for r in rows if r["benchmark"] == "real" and r["cohort"] == cohort
                        and r["method"] == method and r["metric"] == metric}
            glm, pooled = get("federated GLM (as fitted)"), get(R.POOLED)
            assert glm.keys() == pooled.keys() and len(glm) >= 3
            for site in glm:
                if pooled[site] is None:
                    assert glm[site] is None
                else:
                    assert glm[site] == pytest.approx(pooled[site], abs=2e-4), (cohort, metric, site)
    new = [r for r in rows if r["benchmark"] == "real-new"]
    assert {r["k"] for r in new} == {10}
    assert {r["method"] for r in new} >= {"fedmeta auto (default) + adaptation", "others' pooled LR",
                                          "others' pooled LR + refitted intercept"}
    assert (out / "real_targets.md").read_text().startswith("**Targets")
    assert "federated GLM (as fitted)" in (out / "real_fed-heart.md").read_text()
