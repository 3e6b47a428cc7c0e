"""``fedmeta predict`` and ``fedmeta export`` on a saved bundle."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from fedmeta.cli.main import main
from fedmeta.common.bundle import ModelSpec, Provenance, SiteModelBundle, load_site_model
from fedmeta.common.clinical.calibration import Calibration
from fedmeta.common.clinical.thresholds import Threshold
from fedmeta.common.data import heart
from fedmeta.common.models import init_params
from fedmeta.common.preprocessing import HeartPreprocessing


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    frame = heart.load_frame()
    rows = frame[frame["dataset"] == "VA Long Beach"].reset_index(drop=True)
    spec = ModelSpec("mlp", {"in_features": 13, "hidden": [8], "out_features": 2})
    torch.manual_seed(0)
    params = {k: v.numpy() for k, v in init_params(spec.build()).items()}
    bundle = SiteModelBundle(spec, params, HeartPreprocessing.fit(rows.iloc[:80]), heart.OUTCOME, ("0", "1"),
                             Provenance("VA Long Beach", "run", "0" * 64, "reptile", ("Cleveland",), 80, {"0": 20, "1": 60}),
                             calibration=Calibration("platt", 0.2, 1.3), threshold=Threshold(0.6, "prevalence"),
                             id_column="id")
    path = bundle.save(d / "va.fedmeta")
    new = rows.iloc[80:].drop(columns=["num"])
    new.to_csv(d / "new.csv", index=False)
    new.to_parquet(d / "new.parquet")
    new.drop(columns=["chol"]).to_csv(d / "nochol.csv", index=False)
    new.assign(cp="angina").to_csv(d / "badcp.csv", index=False)
    return {"dir": d, "bundle": path, "new": new}


@pytest.mark.parametrize("data", ["new.csv", "new.parquet"])
def test_predict_writes_what_the_python_api_returns(files, data, capsys):
    out = files["dir"] / f"risks-{data}.csv"
    assert main(["predict", "--model", str(files["bundle"]), "--data", str(files["dir"] / data), "--out", str(out)]) == 0
    got = pd.read_csv(out)
    want = load_site_model(files["bundle"]).predict_proba(files["new"])
    assert got["id"].tolist() == want["id"].tolist()
    assert np.allclose(got["risk"], want["risk"], rtol=0, atol=1e-12)
    assert got["decision"].tolist() == want["decision"].tolist()
    text = capsys.readouterr().out
    assert f"scored {len(want)} patients for heart_disease; {int(want['decision'].sum())} flagged" in text
    assert "note:" in text and "'dataset'" in text  # the extra column is named, then ignored


@pytest.mark.parametrize("data, message", [
    ("nochol.csv", "column(s) 'chol' that the model needs are missing"),
    ("badcp.csv", "column 'cp' holds 'angina', not among the levels"),
    ("missing.csv", "data file not found"),
])
def test_predict_refuses_a_table_that_differs_without_a_traceback(files, data, message, capsys):
    code = main(["predict", "--model", str(files["bundle"]), "--data", str(files["dir"] / data),
                 "--out", str(files["dir"] / "x.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedmeta: error:") and message in err and "Traceback" not in err


def test_predict_refuses_a_file_that_is_not_a_bundle(files, capsys):
    code = main(["predict", "--model", str(files["dir"] / "new.csv"), "--data", str(files["dir"] / "new.csv"),
                 "--out", str(files["dir"] / "x.csv")])
    assert code == 2 and "not a fedmeta site-model bundle" in capsys.readouterr().err


def test_export_writes_onnx_that_agrees_with_pytorch(files, capsys):
    pytest.importorskip("onnxruntime")
    out = files["dir"] / "va.onnx"
    code = main(["export", "--model", str(files["bundle"]), "--onnx", str(out),
                 "--check-data", str(files["dir"] / "new.csv")])
    assert code == 0 and out.is_file()
    assert "largest difference" in capsys.readouterr().out


def test_the_commands_import_nothing_heavy_until_run():
    code = ("import sys, fedmeta.cli.predict, fedmeta.cli.export; "
            "print(sorted(k for k in ('torch', 'pandas', 'numpy', 'onnx', 'sklearn') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
