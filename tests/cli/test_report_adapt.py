"""``fedmeta report`` and ``fedmeta adapt`` on a small finished run."""

import json

import numpy as np
import pytest

from fedmeta.cli.main import main
from fedmeta.cli.simulate import simulate
from fedmeta.common import params as P
from fedmeta.common.config import load_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    cfg = load_config(None, ["rounds=2", "eval.adapt_steps=5", "tasks.meta_batch=4", "data.holdout=[Hungary]"])
    simulate(cfg, out, backend="local")
    return out


def test_report_writes_pngs_and_markdown(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    for name in ("curves.png", "adaptation.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "| Cleveland |" in md
    assert "Held out of meta-training" in md and "| Hungary |" in md
    assert set(summary["holdout"]["sites"]) == {"Hungary"} and "Hungary" not in summary["sites"]
    assert f"{summary['mean']['after']['accuracy']:.3f}" in md


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no summary.json" in err and "Traceback" not in err


def test_new_hospital_adapts_locally_and_saves(run_dir, tmp_path, capsys):
    out = tmp_path / "adapted.safetensors"
    code = main(["adapt", "--params", str(run_dir / "final.safetensors"), "--site-name", "Hungary",
                 "--shots", "10", "--set", "eval.adapt_steps=20", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "Hungary: adapted on 10 labelled patients" in text
    adapted, meta = P.load(out)
    theta, _ = P.load(run_dir / "final.safetensors")
    assert adapted.keys() == theta.keys() and meta["site"] == "Hungary" and meta["shots"] == 10
    assert any(not np.array_equal(adapted[k], theta[k]) for k in theta)
