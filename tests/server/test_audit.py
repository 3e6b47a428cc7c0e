"""Audit log: append-only JSONL of identities and decisions, refusing anything that looks like data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmeta.server.audit import ENV_VAR, AuditError, AuditLog, from_env, open_log, read_log


def test_records_are_appended_with_site_names(tmp_path: Path) -> None:
    (tmp_path / "nodes.json").write_text(json.dumps({"cleveland": 11, "hungary": 22}))
    log = open_log(tmp_path / "audit.jsonl")
    log.run_started(run_id=7, algorithm="reptile", rounds=2, config_sha256="ab" * 32, nodes=[11, 22])
    log.round_started(run_id=7, round=1, nodes=[11, 22])
    log.contribution(run_id=7, round=1, node_id=11, accepted=True, num_examples=160)
    log.contribution(run_id=7, round=1, node_id=22, accepted=False, reason="non-finite values")
    log.round_completed(run_id=7, round=1, accepted=[11], rejected=[22], missing=[])
    log.run_finished(run_id=7, status="completed", rounds_completed=1)
    recs = read_log(tmp_path / "audit.jsonl")
    assert [r["event"] for r in recs] == ["run_started", "round_started", "contribution",
                                          "contribution", "round_completed", "run_finished"]
    assert recs[2]["site"] == "cleveland" and recs[2]["accepted"] is True
    assert recs[3]["site"] == "hungary" and recs[3]["reason"] == "non-finite values"
    assert all(r["time"].endswith("+00:00") for r in recs)
    # A second writer appends; nothing is rewritten.
    AuditLog(tmp_path / "audit.jsonl").checkpoint_resumed(run_id=7, round=1)
    assert len(read_log(tmp_path / "audit.jsonl")) == 7


@pytest.mark.parametrize(
    ("event", "fields", "message"),
    [
        ("exfiltrate", {}, "unknown audit event 'exfiltrate'"),
        ("contribution", {"delta": 1.0}, r"fields \['delta'\] not allowed"),
        ("run_started", {"nodes": np.zeros(3)}, "value of type ndarray refused"),
        ("run_started", {"nodes": [0.5, 1.5]}, "only short lists of ids or names"),
        ("run_finished", {"status": "x" * 500}, "longer than 200 characters"),
        ("node_registered", {"site": {"rows": [1, 2]}}, "value of type dict refused"),
    ],
)
def test_data_is_refused(tmp_path: Path, event: str, fields: dict, message: str) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(AuditError, match=message):
        log.record(event, **fields)
    assert read_log(tmp_path / "a.jsonl") == []


def test_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert from_env() is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "x" / "audit.jsonl"))
    log = from_env()
    assert log is not None and log.path == tmp_path / "x" / "audit.jsonl"
