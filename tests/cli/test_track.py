"""``fedmeta track``: a finished run in MLflow (config, per-round numbers, final metrics,
artefacts), checked against the run folder, with no connection but the tracking store."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest

from fedmeta.cli.main import main
from fedmeta.cli.simulate import simulate
from fedmeta.common.config import load_config

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tracked"
    cfg = load_config(None, ["algorithm=reptile", "rounds=2", "eval.adapt_steps=5", "tasks.meta_batch=4",
                             "eval.bootstrap=0"])
    simulate(cfg, out, backend="local")
    assert main(["report", str(out)]) == 0
    return out


def test_a_run_is_logged_as_its_folder_says(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from fedmeta.cli.track import track_run

    attempts: list[object] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: object) -> None:
        attempts.append(address)
        return real_connect(self, address)  # type: ignore[arg-type]

    def getaddrinfo(*args: object, **kwargs: object) -> object:
        attempts.append(args[0])
        return real_getaddrinfo(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else tmp_path)
    run_id = track_run(run_dir, tracking_uri=uri, experiment="tests")
    assert attempts == []  # a local store: no connection at all (MLflow's telemetry is off)

    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params["tasks.meta_batch"] == "4" and run.data.params["algorithm"] == "reptile"
    assert run.data.tags["fedmeta.algorithm"] == "reptile" and run.info.run_name == "tracked"
    history = client.get_metric_history(run_id, "query_loss_after")
    assert [(m.step, m.value) for m in history] == [(r["round"], pytest.approx(r["query_loss_after"])) for r in rounds]
    assert [m.step for m in client.get_metric_history(run_id, "bytes_up")] == [1, 2]
    assert run.data.metrics["mean.after.auroc"] == pytest.approx(summary["mean"]["after"]["auroc"])
    assert run.data.metrics["site.Cleveland.after.auroc"] == pytest.approx(summary["sites"]["Cleveland"]["after"]["auroc"])
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "rounds.jsonl", "report.md", "curves.png"} <= logged
    assert run.info.status == "FINISHED"
    # the artefacts lie beside the database, not in the folder the command ran from
    assert (tmp_path / "mlflow-artifacts").is_dir() and not any((tmp_path / "elsewhere").iterdir())


def test_mlflow_alone_would_send_its_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control arm of the no-connection check: without fedmeta's switches, MLflow's own
    usage telemetry is on. MLflow also stays quiet when it believes it runs under CI or its own
    tests (read once at import from variables such as CI); that belief is set aside here, since
    a hospital's host has neither."""
    from mlflow.telemetry import utils
    from mlflow.telemetry.utils import is_telemetry_disabled

    for name in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(utils, "_IS_IN_CI_ENV_OR_TESTING", False)
    monkeypatch.setattr(utils, "_IS_MLFLOW_DEV_VERSION", False)
    assert not is_telemetry_disabled()
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    assert is_telemetry_disabled()


def test_tracking_without_mlflow_or_of_a_non_run_stops_with_one_line(run_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["track", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "no summary.json" in capsys.readouterr().err and not (tmp_path / "x.db").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["track", str(run_dir)]) == 2
    assert "pip install 'fedmeta[tracking]'" in capsys.readouterr().err
    assert main(["simulate", "--backend", "local", "--track", "sqlite:///x.db", "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'fedmeta[tracking]'" in capsys.readouterr().err and not (tmp_path / "r").exists()
