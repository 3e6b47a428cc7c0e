"""The coordinator's run end to end over an in-process grid (real ServerApp driver and ClientApp
handlers, messages serialised as on the wire): outputs, reproducibility, resume, bad replies."""

import json

import numpy as np
import pytest

from fedmeta.common import params as P
from fedmeta.common.data.heart import HOSPITALS
from fedmeta.protocol.records import arrays_from_record, record_from_arrays


def _packed(arrays):
    """Bytes of ``arrays`` in fedmeta's packed wire form, computed from its definition: a 4-byte
    header length, the JSON header [[name, dtype, shape], ...] and every array's raw bytes."""
    header = json.dumps([[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()], separators=(",", ":"))
    return 4 + len(header.encode()) + sum(v.nbytes for v in arrays.values())


SUMMARY_KEYS = {"algorithm", "rounds", "wall_s", "config", "sites", "mean", "comm"}


def test_outputs_and_summary_fields(tmp_path, local_run):
    summary, _ = local_run(tmp_path)
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["algorithm"] == "reptile" and on_disk["rounds"] == 3
    assert set(on_disk["sites"]) == set(HOSPITALS)
    for site in on_disk["sites"].values():
        for phase in ("before", "after"):
            assert {"accuracy", "auroc", "loss", "brier", "auprc", "sensitivity"} <= set(site[phase])
        assert site["n_train"] > 0 and site["n_test"] > 0
    for phase in ("before", "after"):
        for metric in ("accuracy", "auroc", "loss"):
            expected = np.nanmean([s[phase][metric] for s in on_disk["sites"].values()])
            assert on_disk["mean"][phase][metric] == pytest.approx(expected)
    lines = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert sum(x["bytes_up"] for x in lines) == on_disk["comm"]["bytes_up"]
    # Bytes: 4 sites send one float32 copy of every parameter per round, packed into one array
    # (the raw bytes plus one small header naming them).
    theta, _ = P.load(run / "final.safetensors")
    n_bytes = _packed(theta)
    assert n_bytes < sum(v.nbytes for v in theta.values()) + 64 * len(theta)
    assert on_disk["comm"]["bytes_up"] == 3 * 4 * n_bytes
    assert on_disk["comm"]["bytes_down"] == (3 + 1) * 4 * n_bytes
    assert on_disk["config"]["rounds"] == 3


def test_same_seed_same_result_other_seed_differs(tmp_path, local_run):
    local_run(tmp_path, name="a")
    local_run(tmp_path, name="b")
    local_run(tmp_path, ["seed=1"], name="c")
    a, _ = P.load(tmp_path / "a" / "final.safetensors")
    b, _ = P.load(tmp_path / "b" / "final.safetensors")
    c, _ = P.load(tmp_path / "c" / "final.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, local_run, optimizer):
    extra = [f"outer.optimizer={optimizer}", "outer.lr=0.5" if optimizer == "sgd" else "outer.lr=0.01",
             "outer.momentum=0.5" if optimizer == "sgd" else "outer.beta1=0.8"]
    local_run(tmp_path, extra, name="full")
    local_run(tmp_path, extra, name="cut", stop_after=2)
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    local_run(tmp_path, extra, name="cut", resume=True)
    full, _ = P.load(tmp_path / "full" / "final.safetensors")
    resumed, _ = P.load(tmp_path / "cut" / "final.safetensors")
    for k in full:
        np.testing.assert_array_equal(full[k], resumed[k])
    lines = (tmp_path / "cut" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]


def _tamper_update(fn):
    def tamper(reply):
        if reply.has_content() and "update" in reply.content.array_records:
            arrays = arrays_from_record(reply.content["update"])
            reply.content["update"] = record_from_arrays(fn(arrays))
        return reply
    return tamper


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()}, "NaN/Inf"),
        (lambda a: {k: (np.zeros((3, 3), np.float32) if i == 0 else v) for i, (k, v) in enumerate(a.items())}, "shape"),
        (lambda a: {k: v.astype(np.float64) for k, v in a.items()}, "dtype"),
        (lambda a: {k: v * 1e9 for k, v in a.items()}, "exceeds validation.max_norm"),
        (lambda a: dict(list(a.items())[1:]), "missing"),
    ],
)
def test_bad_reply_is_rejected_and_round_goes_on(tmp_path, local_run, fn, reason, caplog):
    def hook(grid):
        grid.tamper(1001, _tamper_update(fn))  # partition 1 = Hungary

    summary, _ = local_run(tmp_path, grid_hook=hook)
    lines = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    for line in lines:
        assert sorted(line["accepted"]) == ["Cleveland", "Switzerland", "VA Long Beach"]
        assert reason in line["rejected"]["Hungary"]
        assert line["applied"]
    assert any("rejected the reply of Hungary" in r.message for r in caplog.records)
    assert np.isfinite(summary["mean"]["after"]["accuracy"])


def test_site_dropping_out_round_completes_with_others(tmp_path, local_run):
    def hook(grid):
        grid.drop(1003, from_round=2)  # VA Long Beach disconnects after round 1

    summary, _ = local_run(tmp_path, grid_hook=hook)
    lines = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert len(lines[0]["accepted"]) == 4
    assert sorted(lines[1]["accepted"]) == ["Cleveland", "Hungary", "Switzerland"]
    assert "VA Long Beach" not in summary["sites"]


def test_too_few_valid_replies_leave_theta_unchanged(tmp_path, local_run):
    nan = _tamper_update(lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()})

    def hook(grid):
        for node in (1000, 1001, 1002):
            grid.tamper(node, nan)

    local_run(tmp_path, ["rounds=1", "federation.min_nodes=2"], grid_hook=hook)
    line = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[0])
    assert line["applied"] is False and line["accepted"] == ["VA Long Beach"]


@pytest.mark.parametrize("method", ["fp16", "int8", "topk"])
def test_compressed_uplink_and_downlink_deltas(tmp_path, local_run, method):
    """Byte counts follow the encoding exactly; after round 1 each node gets only the change."""
    summary, grid = local_run(tmp_path, [f"compression.method={method}", "compression.downlink=delta",
                                         "compression.topk_fraction=0.1", "rounds=3"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    theta, _ = P.load(tmp_path / "run" / "final.safetensors")
    full = _packed(theta)
    assert lines[0]["bytes_down"] == 4 * full  # first contact: the full θ
    assert all(line["accepted"] and not line["rejected"] for line in lines)
    per_site_up = lines[0]["bytes_up"] / 4
    if method == "fp16":
        assert per_site_up == _packed({k: v.astype(np.float16) for k, v in theta.items()})
    if method == "int8":
        assert per_site_up == _packed({**{k: v.astype(np.int8) for k, v in theta.items()},
                                       **{f"{k}::scale": np.zeros(1, np.float32) for k in theta}})
    assert lines[1]["bytes_down"] < 4 * full and lines[1]["bytes_up"] < 4 * full
    assert np.isfinite(summary["mean"]["after"]["accuracy"])


def test_node_with_a_stale_cache_is_resynchronised(tmp_path, local_run):
    def hook(grid):
        original = grid.send_and_receive

        def corrupt_then_send(messages, *, timeout=None):
            ctx = grid.nodes[1000]
            if "fedmeta.theta" in ctx.state.array_records:  # the node's cache gets out of step
                held = arrays_from_record(ctx.state.array_records["fedmeta.theta"])
                ctx.state.array_records["fedmeta.theta"] = record_from_arrays({k: v + 1.0 for k, v in held.items()})
                grid.corrupted = getattr(grid, "corrupted", 0) + 1
            return original(messages, timeout=timeout)

        grid.send_and_receive = corrupt_then_send

    local_run(tmp_path, ["compression.method=int8", "compression.downlink=delta", "rounds=3"], grid_hook=hook)
    lines = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert "stale state" in lines[1]["rejected"]["Cleveland"]  # round 2: stale cache detected
    assert "Cleveland" in lines[2]["accepted"]  # round 3: resent in full, accepted again


def test_differential_privacy_clips_on_the_site_and_reports_epsilon(tmp_path, local_run):
    from fedmeta.common.privacy import epsilon_per_round

    # Without noise the clipping is visible exactly: every accepted update has norm <= C.
    local_run(tmp_path, ["privacy.dp=true", "privacy.clip=0.01", "privacy.noise_multiplier=0.0"], name="clip")
    for line in (tmp_path / "clip" / "rounds.jsonl").read_text().splitlines():
        for site in json.loads(line)["site_metrics"].values():
            assert site["update_norm"] <= 0.01 + 1e-6
    summary, _ = local_run(tmp_path, ["privacy.dp=true", "privacy.clip=0.05", "privacy.noise_multiplier=1.1",
                                      "privacy.delta=1e-5"], name="dp")
    lines = [json.loads(x) for x in (tmp_path / "dp" / "rounds.jsonl").read_text().splitlines()]
    expected = epsilon_per_round(rounds=3, noise_multiplier=1.1, delta=1e-5)
    assert [x["epsilon"] for x in lines] == pytest.approx(expected)
    assert expected[0] < expected[1] < expected[2]
    assert summary["privacy"]["epsilon"] == pytest.approx(expected[-1])
    # Noise of std 1.1 * 0.05 per entry makes the sent norm far larger than the clipping bound.
    assert all(s["update_norm"] > 0.05 for x in lines for s in x["site_metrics"].values())
    assert all(x["query_loss_after"] is None for x in lines)  # no losses leave a site under DP


def test_site_joining_after_the_start_is_named_and_trains(tmp_path):
    from fedmeta.client.app import app as client_app
    from fedmeta.common.config import load_config
    from fedmeta.server.driver import run_experiment
    from fedmeta.server.local_grid import LocalGrid

    cfg = load_config(None, ["algorithm=reptile", "rounds=3", "eval.adapt_steps=5", "tasks.meta_batch=4", "federation.min_nodes=3"])
    grid = LocalGrid(client_app, [{"partition-id": i} for i in range(3)])
    original = grid.send_and_receive
    calls = []

    def late_join(messages, *, timeout=None):
        calls.append(1)
        if len(calls) == 2:  # while round 1 is under way, VA Long Beach connects
            grid.add_node({"partition-id": 3})
        return original(messages, timeout=timeout)

    grid.send_and_receive = late_join
    summary = run_experiment(grid, cfg, tmp_path / "run", expected_nodes=3, progress=lambda _: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert "VA Long Beach" not in lines[0]["sampled"]
    assert "VA Long Beach" in lines[1]["accepted"] and "VA Long Beach" in lines[2]["accepted"]
    assert set(summary["sites"]) == set(HOSPITALS)


def test_eval_every_records_interim_evaluations(tmp_path, local_run):
    summary, _ = local_run(tmp_path, ["rounds=4", "eval.every=2"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [("eval" in x) for x in lines] == [False, True, False, False]  # round 4 is the final one
    interim = lines[1]["eval"]
    assert set(interim["sites"]) == set(HOSPITALS)
    assert 0 <= interim["mean"]["after"]["accuracy"] <= 1
    theta, _ = P.load(tmp_path / "run" / "final.safetensors")
    full = _packed(theta)
    assert summary["comm"]["bytes_down"] == (4 + 1 + 1) * 4 * full  # 4 rounds + interim + final eval


def test_a_reply_claiming_more_examples_than_its_round_can_use_is_rejected(tmp_path, local_run):
    from flwr.app import MetricRecord

    def inflate(reply):
        if reply.has_content() and "update" in reply.content.array_records:
            m = dict(reply.content["metrics"])
            m["num-examples"] = int(m["num-examples"]) * 1000  # "weigh me more than all others"
            reply.content["metrics"] = MetricRecord(m)
        return reply

    summary, _ = local_run(tmp_path, grid_hook=lambda grid: grid.tamper(1001, inflate))
    lines = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    for line in lines:
        # tasks.meta_batch = 4 tasks of 10 + 10 patients: 80 examples a round at most.
        assert "more than the 80 its reptile round can use" in line["rejected"]["Hungary"]
        assert line["num_examples"] == 3 * 80


def test_sites_silent_at_the_greeting_are_named_as_such(tmp_path, local_run):
    """Too few sites answer the greeting: the error says how many stayed silent, for how long, and
    what to check, rather than only that too few can take part."""
    from fedmeta.common.errors import FedmetaError

    def silence(grid):  # type: ignore[no-untyped-def]
        for node in (1001, 1002, 1003):  # three of the four hospitals never answer
            grid.drop(node, 0)

    with pytest.raises(FedmetaError) as e:
        local_run(tmp_path, ["federation.timeout_s=1"], grid_hook=silence)
    assert "1 site(s) can take part, fewer than federation.min_nodes = 2" in str(e.value)
    assert "3 of 4 site(s) did not answer the greeting within federation.timeout_s = 1 s" in str(e.value)
