"""The main job through Flower's Ray simulation engine (one Ray start: about 15 s).

One run of ``fedmeta simulate`` with a capturing client mod proves three things at once: the
command writes the documented outputs; what each hospital sent was parameter-shaped arrays and
aggregate numbers only (the rule, :func:`conftest.assert_only_aggregates`, also covers the MEDS
feature agreement's count replies, checked on a MEDS run in ``tests/server/test_meds_agreement.py``);
and the Ray run equals the same experiment over the in-process grid.
"""

import json
import pickle

import numpy as np
import pytest

from fedmeta.cli.simulate import simulate
from fedmeta.client.app import make_client_app
from fedmeta.common import params as P
from fedmeta.common.config import load_config
from fedmeta.common.data.heart import HOSPITALS, load_hospital
from fedmeta.protocol.records import arrays_from_record

pytestmark = pytest.mark.ray

OVERRIDES = ["algorithm=reptile", "rounds=2", "eval.adapt_steps=5", "tasks.meta_batch=4"]


def capture_mod(folder):
    """A client mod that saves every reply a site sends (arrays, metrics, configs) to ``folder``."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        record = {"type": msg.metadata.message_type, "arrays": {}, "metrics": {}, "configs": {}}
        if reply.has_content():
            for name, rec in reply.content.array_records.items():
                record["arrays"][name] = arrays_from_record(rec)
            for name, rec in reply.content.metric_records.items():
                record["metrics"][name] = dict(rec)
            for name, rec in reply.content.config_records.items():
                record["configs"][name] = dict(rec)
        n = len(list(folder.iterdir()))
        (folder / f"{context.node_id}-{n}-{np.random.default_rng().integers(1 << 30)}.pkl").write_bytes(
            pickle.dumps(record))
        return reply

    return mod


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    captured = root / "captured"
    captured.mkdir()
    cfg = load_config(None, OVERRIDES)
    summary = simulate(cfg, root / "run", client_app=make_client_app([capture_mod(captured)], simulated=True))
    return root, summary


def test_summary_and_outputs(ray_run):
    root, summary = ray_run
    run = root / "run"
    for name in ("summary.json", "rounds.jsonl", "final.safetensors", "checkpoint.safetensors", "config.json"):
        assert (run / name).is_file(), name
    on_disk = json.loads((run / "summary.json").read_text())
    assert set(on_disk["sites"]) == set(HOSPITALS)
    assert on_disk["comm"]["bytes_up"] > 0 and on_disk["comm"]["bytes_down"] > on_disk["comm"]["bytes_up"]
    assert 0.0 <= on_disk["mean"]["after"]["accuracy"] <= 1.0


def test_ray_run_equals_in_process_run(ray_run, tmp_path):
    root, summary = ray_run
    local = simulate(load_config(None, OVERRIDES), tmp_path / "local", backend="local")
    a, _ = P.load(root / "run" / "final.safetensors")
    b, _ = P.load(tmp_path / "local" / "final.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert summary["comm"] == local["comm"]


def test_only_parameter_shaped_arrays_and_aggregates_leave_a_site(ray_run, only_aggregates):
    root, _ = ray_run
    theta, _ = P.load(root / "run" / "final.safetensors")
    shapes = {k: v.shape for k, v in theta.items()}
    sites = [load_hospital(h) for h in HOSPITALS]
    patient_rows = np.concatenate([np.concatenate([s.x_train, s.x_test]) for s in sites])
    replies = [pickle.loads(p.read_bytes()) for p in sorted((root / "captured").iterdir())]
    types = [r["type"] for r in replies]
    assert types.count("train") == 2 * 4 and types.count("evaluate") == 4 and types.count("query") == 4
    only_aggregates(replies, shapes, patient_rows)
