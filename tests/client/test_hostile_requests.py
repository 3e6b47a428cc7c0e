"""A hostile coordinator's hand-built requests, served by the site worker as at a deployed site.

The worker parses a request once; its policy checks that object and the handler computes from it.
Every test builds its messages by hand (not with fedmeta's strategy) and has a control arm: the
same attack served past the gate, as the site did before requests were parsed once, really
extracts what it was built to extract, so a refusal here is the fix at work and not an attack
that would have failed anyway.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType

from fedmeta.client import worker as W
from fedmeta.client.app import answer, site_of
from fedmeta.common.config import load_config
from fedmeta.common.experiment import initial_parameters
from fedmeta.protocol import keys as K
from fedmeta.protocol.errors import SiteErrorCode
from fedmeta.protocol.records import arrays_from_record, record_from_arrays
from fedmeta.protocol.request import RequestError, parse_request
from fedmeta.sitecore.data import spec_of
from fedmeta.sitecore.policy import SitePolicy

NODE = {"source": "fed-heart", "partition-id": 0}  # Cleveland: 200 training patients
POLICY = SitePolicy(min_patients=20, algorithms=("reptile", "maml"), max_rounds=5)
COMPLIANT = ["algorithm=reptile", "rounds=5"]
# What the attacker wants: one patient per update, no noise, a linear model.
EXTRACT = ["algorithm=fedavg", "rounds=100000", "model.name=linear", "fedavg.batch_size=1",
           "fedavg.local_steps=1", "fedavg.lr=1.0", "privacy.dp=false"]


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    """Flower builds a Message only inside a run: the in-process grid sets the run's identity."""
    from fedmeta.client.app import app
    from fedmeta.server.local_grid import LocalGrid

    LocalGrid(app, [])


def _worker() -> tuple[W.SiteWorker, list[tuple[str, dict]]]:
    from fedmeta.sitecore.audit import EVENTS

    audit: list[tuple[str, dict]] = []

    def record(event: str, **fields: object) -> None:
        assert set(fields) <= EVENTS[event], (event, sorted(fields))  # the site log's own schema
        audit.append((event, fields))

    settings = W.WorkerSettings(runtime_address="127.0.0.1:1", secret=b"s" * 32, node_config=NODE,
                                policy=POLICY, version="0")
    return W.SiteWorker(settings, audit=record), audit


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={**NODE, "min-patients": POLICY.min_patients},
                   state=RecordDict(), run_config={})


def _theta(overrides: list[str]) -> dict[str, np.ndarray]:
    cfg = load_config(None, overrides)
    site = site_of(_context(), cfg)
    return {k: np.zeros_like(v) for k, v in initial_parameters(cfg, spec_of(site)).items()}


def _train_message(records: dict[str, ConfigRecord], theta: dict[str, np.ndarray]) -> Message:
    content = RecordDict({**records, K.ARRAYS: record_from_arrays(theta)})
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)


def _config(overrides: list[str], phase: str = K.TRAIN, **extra: object) -> ConfigRecord:
    cfg = load_config(None, overrides)
    return ConfigRecord({K.EXPERIMENT: cfg.to_json(), K.ROUND: 1, K.PHASE: phase, **extra})


def _extracted_row(content: RecordDict) -> np.ndarray:
    update = arrays_from_record(content[K.UPDATE])
    weight = next(v for k, v in update.items() if k.endswith("weight"))
    return weight.reshape(weight.shape[0], -1)


def test_control_a_one_patient_fedavg_update_is_a_patient_row() -> None:
    """What the decoy attack gets when the handler's experiment is served: the delta of a
    linear model after one SGD step on one patient is that patient's standardised row."""
    theta = _theta(EXTRACT)
    request = parse_request(_train_message({K.CONFIG: _config(EXTRACT)}, theta))
    assert request is not None
    content = answer(request, _context())
    rows = _extracted_row(content)
    site = site_of(_context(), request.experiment)
    x = site.x_train
    # the delta of each class logit is ±lr·(p - y)·x with p = 1/2 at θ = 0: x up to its scale
    direction = rows[-1] / np.linalg.norm(rows[-1])
    cosines = np.abs(x @ direction) / np.linalg.norm(x, axis=1)
    assert cosines.max() > 1 - 1e-6  # one real patient's row, recovered exactly


def test_a_decoy_record_is_refused_before_any_data_is_read() -> None:
    """Two experiments in one message: a compliant one in a record that sorts first, the real one
    in ``config``. The site refuses the message as a whole, audits it, and releases nothing."""
    worker, audit = _worker()
    theta = _theta(EXTRACT)
    message = _train_message({"aaa": _config(COMPLIANT), K.CONFIG: _config(EXTRACT)}, theta)
    reply = worker._answer(message, _context(), run_id=7, secure_aggregation=False)
    assert reply.has_error() and reply.error.code == SiteErrorCode.BAD_REQUEST
    assert reply.error.reason == "bad request"
    assert worker.served == 0
    assert audit == [("request_failed", {"run_id": 7, "round": 1, "phase": MessageType.TRAIN,
                                         "algorithm": None, "category": "bad request"})]


def test_the_experiment_the_handler_would_run_is_the_one_the_policy_checks() -> None:
    """With the decoy gone, the real experiment meets the policy: FedAvg is not allowed here."""
    worker, audit = _worker()
    message = _train_message({K.CONFIG: _config(EXTRACT)}, _theta(EXTRACT))
    reply = worker._answer(message, _context(), run_id=8, secure_aggregation=False)
    assert reply.has_error() and reply.error.code == SiteErrorCode.POLICY_REFUSAL
    assert reply.error.reason == ("policy refusal: algorithm 'fedavg' is not allowed here "
                                  "(allowed: reptile, maml)")
    assert audit[0][1]["algorithm"] == "fedavg"


def test_a_compliant_request_is_served_and_audited_with_its_algorithm() -> None:
    worker, audit = _worker()
    message = _train_message({K.CONFIG: _config(COMPLIANT + ["tasks.meta_batch=2"])}, _theta(COMPLIANT))
    reply = worker._answer(message, _context(), run_id=9, secure_aggregation=False)
    assert not reply.has_error()
    event, fields = audit[0]
    assert event == "request_served" and fields["algorithm"] == "reptile" and fields["step"] == K.TRAIN
    assert fields["num_examples"] == 2 * 20  # two tasks of support + query patients


def test_a_duplicated_key_inside_the_experiment_is_refused() -> None:
    """JSON keeps the last of two equal keys; the site refuses rather than guess."""
    text = load_config(None, COMPLIANT).to_json()
    doubled = text.replace('"algorithm": "reptile"', '"algorithm": "reptile", "algorithm": "fedavg"', 1)
    doubled = doubled.replace('"algorithm":"reptile"', '"algorithm":"reptile","algorithm":"fedavg"', 1)
    assert doubled != text
    config = ConfigRecord({K.EXPERIMENT: doubled, K.ROUND: 1, K.PHASE: K.TRAIN})
    with pytest.raises(RequestError, match="the experiment names 'algorithm' twice"):
        parse_request(_train_message({K.CONFIG: config}, _theta(COMPLIANT)))


@pytest.mark.parametrize(("build", "match"), [
    # a record the phase does not carry, of every kind
    (lambda c, a: RecordDict({K.CONFIG: c, K.ARRAYS: a, "extra": ConfigRecord({"x": 1})}),
     r"unexpected config record 'extra'"),
    (lambda c, a: RecordDict({K.CONFIG: c, K.ARRAYS: a, "more": a}), r"unexpected array record 'more'"),
    (lambda c, a: RecordDict({K.CONFIG: c, K.ARRAYS: a, "m": __import__("flwr.app").app.MetricRecord({"x": 1})}),
     r"unexpected metric record 'm'"),
    # missing records
    (lambda c, a: RecordDict({K.CONFIG: c}), r"has no 'arrays' record"),
    (lambda c, a: RecordDict({"cfg": c, K.ARRAYS: a}), r"unexpected config record 'cfg'"),
    # entries the phase does not carry, or of the wrong type
    (lambda c, a: RecordDict({K.CONFIG: ConfigRecord({**c, "set": "x"}), K.ARRAYS: a}),
     r"unexpected entry 'set' in the 'config' record"),
    (lambda c, a: RecordDict({K.CONFIG: ConfigRecord({**c, K.PHASE: K.EVALUATE}), K.ARRAYS: a}),
     r"phase 'evaluate' is not served by a train request"),
    (lambda c, a: RecordDict({K.CONFIG: ConfigRecord({**c, K.ROUND: -1}), K.ARRAYS: a}),
     r"config.server-round must be a whole number"),
    (lambda c, a: RecordDict({K.CONFIG: ConfigRecord({**c, K.DOWN: "delta"}), K.ARRAYS: a}),
     r"a delta downlink needs down-method and down-base"),
    (lambda c, a: RecordDict({K.CONFIG: ConfigRecord({**c, K.EXPERIMENT: "[1]"}), K.ARRAYS: a}),
     r"expected a mapping at the top level"),
    (lambda c, a: RecordDict({K.CONFIG: ConfigRecord({**c, K.EXPERIMENT: "{"}), K.ARRAYS: a}),
     r"'experiment' is not JSON"),
])
def test_anything_ambiguous_is_refused(build, match) -> None:  # type: ignore[no-untyped-def]
    theta = _theta(COMPLIANT)
    config = _config(COMPLIANT)
    message = Message(content=build(config, record_from_arrays(theta)), message_type=MessageType.TRAIN,
                      dst_node_id=1)
    with pytest.raises(RequestError, match=match):
        parse_request(message)


def test_a_greeting_with_arrays_and_an_unknown_message_type_are_refused() -> None:
    config = _config(COMPLIANT, phase=K.HELLO)
    config.pop(K.ROUND)
    ok = Message(content=RecordDict({K.CONFIG: config}), message_type=MessageType.QUERY, dst_node_id=1)
    assert parse_request(ok).phase == K.HELLO  # type: ignore[union-attr]
    with_arrays = Message(content=RecordDict({K.CONFIG: config, K.ARRAYS: record_from_arrays({"a": np.zeros(1)})}),
                          message_type=MessageType.QUERY, dst_node_id=1)
    with pytest.raises(RequestError, match="unexpected array record 'arrays' in a query request"):
        parse_request(with_arrays)
    with pytest.raises(RequestError, match="phase 'train' is not served by a query request"):
        parse_request(Message(content=RecordDict({K.CONFIG: _config(COMPLIANT)}),
                              message_type=MessageType.QUERY, dst_node_id=1))
    other = Message(content=RecordDict({K.CONFIG: config}), message_type="system.x", dst_node_id=1)
    with pytest.raises(RequestError, match="message type 'system.x' is not served"):
        parse_request(other)


def test_secure_aggregation_bounds_must_match_the_checked_experiment() -> None:
    """SecAgg+ noise comes from the experiment: a round config that asks for less is refused."""
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord

    cfg = load_config(None, [*COMPLIANT, "privacy.dp=true", "privacy.clip=0.5",
                             "privacy.noise_multiplier=1.2"])
    params = parameters_to_arrayrecord(ndarrays_to_parameters([np.zeros(3)]), keep_input=True)

    def message(**bounds: object) -> Message:
        fit = {K.EXPERIMENT: cfg.to_json(), K.ROUND: 1, K.SECAGG_L2_BOUND: 0.5,
               K.SECAGG_NOISE: 1.2, K.SECAGG_N_SITES: 3, **bounds}
        content = RecordDict({"fitins.config": ConfigRecord(fit), "fitins.parameters": params,
                              "secaggplus_configs": ConfigRecord({"stage": "collect_masked_vectors"})})
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)

    request = parse_request(message(), secure_aggregation=True)
    assert request is not None and request.secagg is not None
    assert (request.secagg.l2_bound, request.secagg.noise_multiplier, request.secagg.n_sites) == (0.5, 1.2, 3)
    with pytest.raises(RequestError, match="secagg-noise-multiplier = 0 contradicts the experiment's noise multiplier 1.2"):
        parse_request(message(**{K.SECAGG_NOISE: 0.0}), secure_aggregation=True)
    with pytest.raises(RequestError, match="secagg-l2-bound = 50 contradicts the experiment's privacy.clip = 0.5"):
        parse_request(message(**{K.SECAGG_L2_BOUND: 50.0}), secure_aggregation=True)
    # a key-exchange step carries no experiment and reads no data
    step = Message(content=RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}),
                   message_type=MessageType.TRAIN, dst_node_id=1)
    assert parse_request(step, secure_aggregation=True) is None
    with pytest.raises(RequestError, match="serves only train requests"):
        parse_request(Message(content=RecordDict({K.CONFIG: _config(COMPLIANT, phase=K.EVALUATE)}),
                              message_type=MessageType.EVALUATE, dst_node_id=1), secure_aggregation=True)


def test_a_secure_round_claiming_more_noise_sharers_than_its_setup_is_refused() -> None:
    from fedmeta.protocol.request import SecAggBounds, SiteRequest
    from fedmeta.sitecore.policy import PolicyRefusal, check_request

    cfg = load_config(None, COMPLIANT)
    request = SiteRequest(message_type=MessageType.TRAIN, phase=K.TRAIN, experiment=cfg,
                          secagg=SecAggBounds(l2_bound=1.0, noise_multiplier=0.0, n_sites=50))
    with pytest.raises(PolicyRefusal, match="shared by 50 sites, but this node was set up with a "
                                            "reconstruction threshold of 3"):
        check_request(POLICY, request, site=lambda: pytest.fail("no data may be read"),
                      secure_aggregation=True, secagg_threshold=3)


def test_the_layout_is_read_from_the_parsed_request() -> None:
    config = _config(COMPLIANT, phase=K.HELLO, **{K.LAYOUT: json.dumps({"features": ["age"]})})
    config.pop(K.ROUND)
    request = parse_request(Message(content=RecordDict({K.CONFIG: config}), message_type=MessageType.QUERY,
                                    dst_node_id=1))
    assert request is not None and request.layout == {"features": ["age"]}


def test_an_evaluation_sweep_is_cut_off_at_the_site_s_budget(tmp_path) -> None:
    """The issue's sweep sent 61 evaluations in a run declared as 5 rounds; the site now counts
    them itself, across restarts, and refuses past its ceiling before reading any data."""
    from fedmeta.client.worker import WorkerSettings

    policy = SitePolicy(min_patients=20, max_evaluations_per_run=3)
    cheap = [*COMPLIANT, "eval.adapt_steps=2", "eval.bootstrap=0", "eval.repeats=1"]

    def worker() -> W.SiteWorker:
        settings = WorkerSettings(runtime_address="127.0.0.1:1", secret=b"s" * 32, node_config=NODE,
                                  policy=policy, version="0", ledger_path=tmp_path / "ledger.json")
        return W.SiteWorker(settings, audit=lambda *a, **k: None)

    def evaluate() -> Message:
        return Message(content=RecordDict({K.CONFIG: _config(cheap, phase=K.EVALUATE),
                                           K.ARRAYS: record_from_arrays(_theta(COMPLIANT))}),
                       message_type=MessageType.EVALUATE, dst_node_id=1)

    served = [worker()._answer(evaluate(), _context(), run_id=1, secure_aggregation=False) for _ in range(2)]
    again = worker()  # the site restarted mid-run
    served.append(again._answer(evaluate(), _context(), run_id=1, secure_aggregation=False))
    assert not any(r.has_error() for r in served)
    refused = again._answer(evaluate(), _context(), run_id=1, secure_aggregation=False)
    assert refused.has_error() and refused.error.code == SiteErrorCode.POLICY_REFUSAL
    assert refused.error.reason == ("policy refusal: run 1 has had 3 evaluate requests, this site's "
                                    "max_evaluations_per_run = 3")


def test_a_state_larger_than_the_experiment_s_model_is_refused() -> None:
    """The policy counts the experiment's model; the computation runs on the arrays sent. A θ of
    2048-wide layers under an experiment of [8, 8] was served; now it is a bad request."""
    worker, _ = _worker()
    small = [*COMPLIANT, "model.hidden=[8, 8]", "tasks.meta_batch=2"]
    big = _theta([*COMPLIANT, "model.hidden=[256, 256]"])
    reply = worker._answer(_train_message({K.CONFIG: _config(small)}, big), _context(), run_id=11,
                           secure_aggregation=False)
    assert reply.has_error() and reply.error.code == SiteErrorCode.BAD_REQUEST
    # control: the experiment's own shapes are served
    ok = worker._answer(_train_message({K.CONFIG: _config(small)}, _theta(small)), _context(), run_id=11,
                        secure_aggregation=False)
    assert not ok.has_error()


def test_nan_and_infinity_in_the_experiment_are_refused() -> None:
    text = load_config(None, COMPLIANT).to_json().replace('"delta": 1e-05', '"delta": NaN')
    assert "NaN" in text
    config = ConfigRecord({K.EXPERIMENT: text, K.ROUND: 1, K.PHASE: K.TRAIN})
    with pytest.raises(RequestError, match="the experiment holds NaN"):
        parse_request(_train_message({K.CONFIG: config}, _theta(COMPLIANT)))


def test_the_loaded_site_cache_is_bounded() -> None:
    import fedmeta.sitecore.data as D

    for i in range(12):  # a coordinator varying a setting the site ignores
        site_of(_context(), load_config(None, [*COMPLIANT, f"data.holdout=[h{i}]"]))
    node, _ = D._cache_key(_context().node_config, load_config(None, COMPLIANT))
    assert sum(k[0] == node for k in D._LOADED) == D._MAX_LOADED


def test_a_process_serving_many_simulated_sites_keeps_each_one_loaded(monkeypatch) -> None:
    """One simulation process serves many nodes: each keeps its rows between rounds (with one
    bound for the whole process, 200 simulated sites reloaded theirs at every message)."""
    import fedmeta.sitecore.data as D

    monkeypatch.setattr(D, "_LOADED", {})
    cfg = load_config(None, COMPLIANT)
    n = D._MAX_LOADED + 2  # more nodes than one node's bound (the old bound for the whole process)
    contexts = [Context(run_id=1, node_id=i, node_config={"source": "fed-heart", "partition-id": i % 4,
                                                         "node": i, "min-patients": 20},
                        state=RecordDict(), run_config={}) for i in range(n)]
    loads: list[object] = []
    real = D.load_site
    monkeypatch.setattr(D, "load_site", lambda *a, **k: loads.append(a) or real(*a, **k))
    first = [site_of(c, cfg) for c in contexts]
    again = [site_of(c, cfg) for c in contexts]  # the next round: every node's rows still loaded
    assert len(loads) == n and all(a is b for a, b in zip(first, again, strict=True))


def _glm_message(beta: np.ndarray) -> Message:
    cfg = [*COMPLIANT, "algorithm=glm", "model.name=linear"]
    config = _config(cfg, phase=K.GLM)
    return Message(content=RecordDict({K.CONFIG: config, K.ARRAYS: record_from_arrays({"beta": beta})}),
                   message_type=MessageType.TRAIN, dst_node_id=1)


def test_a_steep_glm_beta_that_would_isolate_one_patient_is_refused() -> None:
    """A coordinator's β with a step on one feature weighs only the rows near the threshold: two
    such gradient sums differ by one patient's row. Control: those sums really isolate rows."""
    from fedmeta.common.glm import site_sums

    policy = SitePolicy(min_patients=20, algorithms=("reptile", "glm"))
    settings = W.WorkerSettings(runtime_address="127.0.0.1:1", secret=b"s" * 32, node_config=NODE,
                                policy=policy, version="0")
    worker = W.SiteWorker(settings, audit=lambda *a, **k: None)
    site = site_of(_context(), load_config(None, COMPLIANT))
    x, y = site.x_train.astype(np.float64), site.y_train[:, 0]
    d = x.shape[1]
    j = int(np.argmax([len(np.unique(x[:, c])) for c in range(d)]))  # a continuous feature
    values = np.sort(np.unique(x[:, j]))
    lo, hi = values[len(values) // 2 - 1], values[len(values) // 2]

    def step(t: float, slope: float) -> np.ndarray:
        beta = np.zeros(d + 1)
        beta[j], beta[-1] = slope, -slope * t
        return beta

    # control: with a steep enough step the difference of two released gradients is the sum of
    # the design rows between the thresholds, a count of one or a few patients
    g1 = site_sums(x, y, step((lo + values[len(values) // 2 - 2]) / 2, 1e6)).gradient
    g2 = site_sums(x, y, step((lo + hi) / 2, 1e6)).gradient
    assert 0 < round(g1[-1] - g2[-1]) < 20  # patients between the two thresholds, below the floor
    for slope in (1e6, 25.0):
        reply = worker._answer(_glm_message(step((lo + hi) / 2, slope)), _context(), run_id=21,
                               secure_aggregation=False)
        assert reply.has_error() and reply.error.code == SiteErrorCode.POLICY_REFUSAL, slope
        assert ("glm_max_coefficient" in reply.error.reason if slope > 25 else
                "weigh the sums on about" in reply.error.reason)
    nan = worker._answer(_glm_message(np.full(d + 1, np.nan)), _context(), run_id=21, secure_aggregation=False)
    assert nan.has_error() and "not a finite number" in nan.error.reason
    # a real Newton step (from 0, and from a fitted β) is served
    for beta in (np.zeros(d + 1), np.r_[np.full(d, 0.3), -0.2]):
        ok = worker._answer(_glm_message(beta), _context(), run_id=21, secure_aggregation=False)
        assert not ok.has_error(), ok.error.reason if ok.has_error() else ""


def test_the_gate_and_the_handler_read_the_same_decoded_arrays() -> None:
    """The arrays are decoded once per request: the GLM check and the handler see one dict."""
    message = _glm_message(np.zeros(14))
    request = parse_request(message)
    assert request is not None
    assert request.decoded is request.decoded and set(request.decoded) == {"beta"}


def test_fedmeta_s_client_app_without_the_worker_or_the_simulation_releases_nothing() -> None:
    """A stock SuperNode could run fedmeta's ClientApp itself, without the site worker that sets
    the policy's floor: the handlers then have no floor and refuse (they used to read a missing
    floor as 1). fedmeta's simulation sets its own floor for its nodes (the control arm)."""
    from fedmeta.client.app import app, make_client_app
    from fedmeta.common.errors import ConfigError

    overrides = ["algorithm=reptile", "tasks.meta_batch=2"]
    message = _train_message({K.CONFIG: _config(overrides)}, _theta(overrides))
    bare = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="node config has no min-patients"):
        app(message, bare)
    simulated = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    reply = make_client_app(simulated=True)(message, simulated)
    assert not reply.has_error() and K.UPDATE in reply.content
    assert simulated.node_config[K.MIN_PATIENTS] == K.SIMULATED_FLOOR


def test_runs_past_the_site_s_epsilon_budget_are_refused_before_any_data_is_read(tmp_path, monkeypatch) -> None:
    """Each run of σ = 2 over 10 rounds is ε = 8.08 at the site's δ, under its max_epsilon = 10;
    runs are unlimited, so the site spends ε across them against its dp_epsilon_budget = 20
    (composed in RDP: 8.08, 12.3, 15.9, 19.1 after four runs; a fifth would be 22.0). Control arm:
    the worker without the ε ledger, as before, serves all five."""
    import fedmeta.client.app as A
    from fedmeta.common.privacy import composed_epsilon
    from fedmeta.sitecore.ledger import RequestLedger

    policy = SitePolicy(min_patients=20, algorithms=("reptile",), require_dp=True, max_epsilon=10.0,
                        dp_epsilon_budget=20.0)
    dp = [*COMPLIANT, "rounds=10", "privacy.dp=true", "privacy.noise_multiplier=2", "tasks.meta_batch=2",
          "inner.steps=2"]
    theta = _theta(dp)

    def worker(ledger: str) -> tuple[W.SiteWorker, list[tuple[str, dict]]]:
        audit: list[tuple[str, dict]] = []
        settings = W.WorkerSettings(runtime_address="127.0.0.1:1", secret=b"s" * 32, node_config=NODE,
                                    policy=policy, version="0", ledger_path=tmp_path / ledger)
        return W.SiteWorker(settings, audit=lambda e, **f: audit.append((e, f))), audit

    def context(run: int) -> Context:
        return Context(run_id=run, node_id=1, node_config={**NODE, "min-patients": 20},
                       state=RecordDict(), run_config={})

    def hello() -> Message:
        config = _config(dp, phase=K.HELLO)
        config.pop(K.ROUND)
        return Message(content=RecordDict({K.CONFIG: config}), message_type=MessageType.QUERY, dst_node_id=1)

    def run(w: W.SiteWorker, run_id: int) -> list[Message]:
        return [w._answer(m, context(run_id), run_id=run_id, secure_aggregation=False)
                for m in (hello(), _train_message({K.CONFIG: _config(dp)}, theta))]

    # control: without the ε ledger (the site before it) every run passes its per-run check
    with monkeypatch.context() as m:
        m.setattr(RequestLedger, "spend_epsilon", lambda *a, **k: None)
        unfixed, _ = worker("unfixed.json")
        assert all(not r.has_error() for run_id in range(1, 6) for r in run(unfixed, run_id))
    assert composed_epsilon([(10, 2.0)] * 5, delta=policy.dp_delta) == pytest.approx(22.02, abs=0.01)

    site, audit = worker("ledger.json")
    for run_id in range(1, 5):
        assert all(not r.has_error() for r in run(site, run_id))
    assert site.ledger.epsilon_spent(policy) == pytest.approx(19.05, abs=0.01)
    monkeypatch.setattr(A, "site_of", lambda *a, **k: pytest.fail("no data may be read"))
    refused = run(W.SiteWorker(site.settings, audit=lambda e, **f: audit.append((e, f))), 5)  # restarted too
    for reply in refused:
        assert reply.has_error() and reply.error.code == SiteErrorCode.POLICY_REFUSAL
        assert reply.error.reason == ("policy refusal: run 5's 10 rounds at noise_multiplier 2 would bring "
                                      "this site's ε to 22 (at δ = 1e-05, 19.1 spent before), past its "
                                      "dp_epsilon_budget = 20")
    failed = [f for e, f in audit if e == "request_failed"]
    assert [(f["run_id"], f["category"], "dp_epsilon_budget = 20" in f["rule"]) for f in failed] == [
        (5, "policy refusal", True)] * 2
    assert site.ledger.epsilon_spent(policy) == pytest.approx(19.05, abs=0.01)  # the refusals spent nothing


def test_a_dp_run_sending_more_rounds_than_it_declared_is_refused_at_the_first_extra_one(tmp_path) -> None:
    policy = SitePolicy(min_patients=20, algorithms=("reptile",), require_dp=True, max_epsilon=10.0,
                        dp_epsilon_budget=20.0)
    dp = [*COMPLIANT, "rounds=2", "privacy.dp=true", "privacy.noise_multiplier=2", "tasks.meta_batch=2",
          "inner.steps=2"]
    settings = W.WorkerSettings(runtime_address="127.0.0.1:1", secret=b"s" * 32, node_config=NODE,
                                policy=policy, version="0", ledger_path=tmp_path / "ledger.json")
    worker = W.SiteWorker(settings, audit=lambda *a, **k: None)
    theta = _theta(dp)
    replies = [worker._answer(_train_message({K.CONFIG: _config(dp)}, theta), _context(), run_id=1,
                              secure_aggregation=False) for _ in range(3)]
    assert [r.has_error() for r in replies] == [False, False, True]
    assert replies[2].error.reason == ("policy refusal: run 1 declared 2 rounds and has had 2 DP releases; "
                                       "this site charged ε for 2 only")
