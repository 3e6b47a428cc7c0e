"""A site cannot take over the FedAvg aggregate by declaring more training rows than it has.

A FedAvg reply weighs its site's training rows; the coordinator can hold a claim to the rows the
site declared at its greeting, but cannot check the declaration. ``validation.max_weight_share``
(0.5) caps any one site's share of a round's aggregate; honest rounds, in which no site holds
more, are aggregated exactly as before. The control arm, with the cap off (the coordinator before
it), shows the declared 10⁹ rows really make the hostile update the aggregate.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmeta.protocol import keys as K
from fedmeta.protocol.records import record_from_arrays
from fedmeta.server.aggregation import cap_weight_shares, weighted_mean

NODES = {1000: "Cleveland", 1001: "Hungary", 1002: "Switzerland", 1003: "VA Long Beach"}
ROWS = {1000: 200, 1001: 194, 1002: 81, 1003: 132}  # the training rows each really holds


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    from fedmeta.client.app import app
    from fedmeta.server.local_grid import LocalGrid

    LocalGrid(app, [])


def test_the_cap_by_hand() -> None:
    # a hostile 10⁹ among Fed-Heart-Disease's rows: cut to c = 0.5 · 607 / (1 − 0.5) = 607
    assert cap_weight_shares([1e9, 200, 194, 81, 132], 0.5) == [607.0, 200, 194, 81, 132]
    # two hostile sites at a share of 0.3: c = 0.3 · 300 / (1 − 2 · 0.3) = 225, each 225/750
    assert cap_weight_shares([1e9, 1e9, 100, 100, 100], 0.3) == pytest.approx([225, 225, 100, 100, 100])
    honest = [200.0, 194.0, 81.0, 132.0]  # largest share 0.33: untouched
    assert cap_weight_shares(honest, 0.5) == honest
    assert cap_weight_shares([200, 194], 0.5) == [194, 194]  # two sites: equal weights
    assert cap_weight_shares([5, 2, 1], 0.2) == [1.0, 1.0, 1.0]  # below 1/n: equal weights
    assert cap_weight_shares([1e9, 1], 1.0) == [1e9, 1]  # 1: no cap
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = list(rng.lognormal(0, 3, size=int(rng.integers(2, 9))))
        s = float(rng.uniform(0.15, 0.9))
        c = cap_weight_shares(w, s)
        shares = np.array(c) / sum(c)
        assert shares.max() <= max(s, 1 / len(w)) + 1e-9
        assert all(b == a for a, b in zip(w, c, strict=True) if a / sum(c) < s - 1e-9)  # the rest unchanged


def _round(overrides: list[str], claims: dict[int, int], hostile: dict[str, np.ndarray] | None):
    """One FedAvg round of the four hospitals, the replies built by hand; Hungary sends
    ``hostile`` (if given) and every site declares and claims ``claims``."""
    from fedmeta.common.config import load_config
    from fedmeta.common.data.registry import data_spec
    from fedmeta.common.experiment import initial_parameters
    from fedmeta.server.strategy import FedMetaStrategy

    cfg = load_config(None, ["algorithm=fedavg", "model.name=linear", *overrides])
    spec = data_spec(cfg.data)
    strategy = FedMetaStrategy(cfg, spec, initial_parameters(cfg, spec))
    theta = strategy.state()
    rng = np.random.default_rng(1)
    honest = {n: {k: (0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in theta.items()}
              for n in NODES}
    sent = {n: (hostile if hostile is not None and n == 1001 else honest[n]) for n in NODES}
    plan = strategy.configure_train(1, NODES)
    assert sorted(plan.nodes) == sorted(NODES)
    replies = [Message(RecordDict({K.UPDATE: record_from_arrays(sent[m.metadata.dst_node_id]),
                                   K.ENCODING: ConfigRecord({"method": "none"}),
                                   K.METRICS: MetricRecord({K.NUM_EXAMPLES: claims[m.metadata.dst_node_id]})}),
                       reply_to=m) for m in plan.messages]
    result = strategy.aggregate_train(plan, replies, declared=claims)
    assert result.state is not None and sorted(result.log.accepted) == sorted(NODES.values())
    moved = {k: result.state[k] - theta[k] for k in theta}
    return moved, result.log, sent


def _cos(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    x = np.concatenate([a[k].ravel() for k in sorted(a)]).astype(np.float64)
    y = np.concatenate([b[k].ravel() for k in sorted(a)]).astype(np.float64)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_a_site_declaring_a_billion_rows_takes_half_the_aggregate_at_most() -> None:
    """Hungary declares and claims 10⁹ rows and sends an update of an honest update's length in
    its own direction (under every norm check). Control: without the cap the round moves θ along
    Hungary's update alone (its share 1 − 4·10⁻⁷); with it, Hungary's share is 0.5 and the
    other half is the honest sites' example-weighted mean."""
    claims = {**ROWS, 1001: 10**9}
    rng = np.random.default_rng(7)
    _, _, honest = _round([], ROWS, None)
    hostile = {k: (np.linalg.norm(v) * u / np.linalg.norm(u)).astype(v.dtype)
               for k, v in honest[1001].items() for u in [rng.standard_normal(v.shape)]}

    moved, log, _ = _round(["validation.max_weight_share=1"], claims, hostile)  # control arm
    assert log.site_metrics["Hungary"]["weight_share"] == pytest.approx(1, abs=1e-6)
    assert _cos(moved, hostile) > 0.999999  # the round is Hungary's

    moved, log, sent = _round([], claims, hostile)
    assert log.site_metrics["Hungary"]["weight_share"] == pytest.approx(0.5, rel=1e-12)
    others = [n for n in NODES if n != 1001]
    # Hungary's weight cut to c = 0.5 · (200 + 81 + 132) / (1 − 0.5) = 413, half the total
    expected = weighted_mean([sent[n] for n in (1001, *others)], [413.0, *(ROWS[n] for n in others)])
    mean_honest = weighted_mean([sent[n] for n in others], [ROWS[n] for n in others])
    for k in moved:  # half Hungary's update, half the honest sites' example-weighted mean
        np.testing.assert_allclose(moved[k], expected[k], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(moved[k], 0.5 * hostile[k] + 0.5 * mean_honest[k], rtol=1e-5, atol=1e-8)


def test_honest_rounds_are_aggregated_exactly_as_without_the_cap() -> None:
    """The four hospitals' real training rows (largest share 0.33): the same round with the cap
    on (default) and off moves θ by exactly the same arrays."""
    capped, log, _ = _round([], ROWS, None)
    uncapped, _, _ = _round(["validation.max_weight_share=1"], ROWS, None)
    for k in capped:
        np.testing.assert_array_equal(capped[k], uncapped[k])
    assert log.site_metrics["Cleveland"]["weight_share"] == pytest.approx(200 / 607)
