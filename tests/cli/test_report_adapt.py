"""``fedmeta report`` and ``fedmeta adapt`` on a small finished run."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from fedmeta.cli.main import main
from fedmeta.cli.simulate import simulate
from fedmeta.common.config import load_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    cfg = load_config(None, ["algorithm=reptile", "rounds=2", "eval.adapt_steps=5", "tasks.meta_batch=4", "data.holdout=[Hungary]"])
    simulate(cfg, out, backend="local")
    return out


def test_report_writes_pngs_and_markdown(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    for name in ("curves.png", "adaptation.png", "reliability.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "| Cleveland |" in md
    assert "Held out of meta-training" in md and "| Hungary |" in md
    assert set(summary["holdout"]["sites"]) == {"Hungary"} and "Hungary" not in summary["sites"]
    assert f"{summary['mean']['after']['accuracy']:.3f}" in md
    # clinical metrics with their intervals, as the summary holds them
    cle = summary["sites"]["Cleveland"]["after"]
    assert "## Clinical metrics after adaptation" in md
    assert f"{cle['auroc']:.3f} [{cle['auroc.lo']:.3f}, {cle['auroc.hi']:.3f}]" in md


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no summary.json" in err and "Traceback" not in err


def test_new_hospital_adapts_then_predicts_what_the_adapted_model_computes(run_dir, tmp_path, capsys):
    """adapt -> bundle + model card -> predict on the raw rows of the hospital's test split equals
    the adapted, calibrated model applied to the encoded test split in memory."""
    import torch

    from fedmeta.common.adaptation import predict_logit
    from fedmeta.common.bundle import load_site_model
    from fedmeta.common.data import heart
    from fedmeta.common.data.registry import load_site
    from fedmeta.common.experiment import build_model_for
    from fedmeta.sitecore.data import spec_of

    out = tmp_path / "hungary.fedmeta"
    code = main(["adapt", "--params", str(run_dir / "final.safetensors"), "--site-name", "Hungary",
                 "--shots", "10", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("Hungary: 10 labelled patients:"))
    pos = int(line.split(": ")[2].split(" with")[0])
    assert 1 <= pos <= 9 and "drawn stratified" in line
    model = load_site_model(out)
    prov = model.bundle.provenance
    assert prov.n_labelled == 10 and prov.class_counts == {"0": 10 - pos, "1": pos}
    assert set(prov.contributing_sites) == {"Cleveland", "Switzerland", "VA Long Beach"}
    card = (tmp_path / "hungary.fedmeta.md").read_text()
    assert "# Model card: heart_disease at Hungary" in card and "## Limits" in card
    assert f"{model.bundle.threshold.value:.3f}" in card

    cfg = load_config(None, ["algorithm=reptile", "rounds=2", "eval.adapt_steps=5", "tasks.meta_batch=4", "data.holdout=[Hungary]"])
    site = load_site(cfg.data, "Hungary")
    frame = heart.load_frame().set_index("id", drop=False)
    raw = frame.loc[list(site.row_ids_test)].drop(columns=["num"])
    raw.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--model", str(out), "--data", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "risks.csv")]) == 0
    got = pd.read_csv(tmp_path / "risks.csv")
    net = build_model_for(cfg, spec_of(site))
    params = {k: torch.as_tensor(v) for k, v in model.bundle.params.items()}
    want = model.bundle.calibration.apply(predict_logit(net, params, torch.from_numpy(site.x_test)))
    assert got["id"].tolist() == list(site.row_ids_test)
    assert np.allclose(got["risk"], want, rtol=0, atol=1e-5)
    assert (got["decision"] == (got["risk"] >= model.bundle.threshold.value)).all()


def test_adapt_refuses_a_site_whose_table_encodes_to_another_width(run_dir, tmp_path, capsys):
    assert main(["data", "synth-ehr", "--sites", "1", "--stays", "120", "--out", str(tmp_path / "ehr")]) == 0
    site_yaml = next((tmp_path / "ehr").glob("*/site.yaml"))
    capsys.readouterr()
    code = main(["adapt", "--params", str(run_dir / "final.safetensors"), "--site", str(site_yaml)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "the data encode to" in err and "but the model takes 13" in err


def test_adapt_refuses_shots_that_cannot_hold_both_classes(run_dir, capsys):
    code = main(["adapt", "--params", str(run_dir / "final.safetensors"), "--site-name", "Hungary", "--shots", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "need at least 2 patients, one of each class" in err and "Traceback" not in err


def test_report_without_matplotlib_writes_the_markdown_and_says_how_to_get_figures(run_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "lean-report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    md = (out / "report.md").read_text()
    assert "| Cleveland |" in md and "pip install 'fedmeta[reports]'" in md and ".png" not in md


@pytest.mark.parametrize("algorithm", ["protonet", "matching", "matching-fce", "relation"])
def test_a_metric_learner_runs_federated_then_adapt_predict_and_export(algorithm, tmp_path, capsys):
    """simulate -> adapt -> predict -> export for each metric learner. The predicted risks are the
    calibrated scores of an episode whose support set is the hospital's labelled patients and
    whose queries are its test patients, computed by the training code (the bundle computes them
    from what it keeps of the support set instead)."""
    import torch

    from fedmeta.common import algorithms
    from fedmeta.common.bundle import load_site_model
    from fedmeta.common.data import heart
    from fedmeta.common.data.registry import load_site
    from fedmeta.common.experiment import build_model_for
    from fedmeta.sitecore.data import spec_of

    cfg = load_config(None, [f"algorithm={algorithm}", "rounds=2", "tasks.meta_batch=4", "model.hidden=[16, 8]",
                             "data.holdout=[Hungary]", "eval.bootstrap=0"])
    summary = simulate(cfg, tmp_path / "run", backend="local")
    assert summary["sites"]["Cleveland"]["adapt_scope"] == "support"
    out = tmp_path / "hungary.fedmeta"
    assert main(["adapt", "--params", str(tmp_path / "run" / "final.safetensors"), "--site-name", "Hungary",
                 "--out", str(out)]) == 0
    assert f"adaptation: {algorithms.get(algorithm).metric.text}" in capsys.readouterr().out
    model = load_site_model(out)
    card = (tmp_path / "hungary.fedmeta.md").read_text()
    assert model.bundle.head == algorithm and "support set" in card
    # a Matching Network's file keeps each labelled patient's embedding and label; the card says so
    assert ("one row per labelled patient (head/" in card) == algorithm.startswith("matching")
    site = load_site(cfg.data, "Hungary")
    frame = heart.load_frame().set_index("id", drop=False)
    frame.loc[list(site.row_ids_test)].drop(columns=["num"]).to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--model", str(out), "--data", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "risks.csv")]) == 0
    got = pd.read_csv(tmp_path / "risks.csv")
    net = build_model_for(cfg, spec_of(site))
    params = {k: torch.as_tensor(v) for k, v in model.bundle.params.items()}
    lg = algorithms.get(algorithm).metric.logits(net, params, torch.from_numpy(site.x_train),
                                                 torch.from_numpy(site.y_train[:, 0]), torch.from_numpy(site.x_test),
                                                 n_way=2).double()
    want = model.bundle.calibration.apply((lg[:, 1] - lg[:, 0]).numpy())
    assert np.allclose(got["risk"], want, rtol=0, atol=1e-5)
    if importlib.util.find_spec("onnxruntime") is not None:
        code = main(["export", "--model", str(out), "--onnx", str(tmp_path / "m.onnx"),
                     "--check-data", str(tmp_path / "new.csv")])
        if algorithm == "matching-fce":  # its LSTMs are not written as ONNX nodes: refused, nothing written
            assert code == 2 and "no ONNX export for the matching-fce classifier" in capsys.readouterr().err
            assert not (tmp_path / "m.onnx").exists()
        else:
            assert code == 0 and "largest difference" in capsys.readouterr().out
