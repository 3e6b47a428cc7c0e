"""Federated feature agreement of MEDS sites over Flower messages (in-process grid, real ClientApp
and coordinator): what a site's count reply holds, against counts recomputed here from the MEDS
files; the vocabulary the coordinator chooses, against the same reference; a run on it, resumed
without agreeing again; sites left out; the deployed policy mod on the count request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType

from fedmeta.client.app import app as client_app
from fedmeta.common import params as P
from fedmeta.common.config import load_config
from fedmeta.common.data.meds.source import with_vocabulary
from fedmeta.common.data.meds.synth import write_synth_meds
from fedmeta.common.data.meds.vocabulary import Aggregations, Vocabulary, choose_vocabulary
from fedmeta.common.data.registry import load_site
from fedmeta.common.errors import FedmetaError
from fedmeta.protocol import keys as K
from fedmeta.server.driver import run_experiment
from fedmeta.server.local_grid import LocalGrid

SEED = 1
SITES = ("hospital-01", "hospital-02", "hospital-03", "hospital-04")
FAST = ["algorithm=reptile", "rounds=2", "eval.adapt_steps=5", "tasks.meta_batch=4", "eval.bootstrap=0", "eval.repeats=1",
        "eval.folds=2", "federation.min_nodes=2"]
NOTHING = 1_000_000  # a patient floor no code reaches


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("meds-consortium")
    write_synth_meds(out, sites=len(SITES), seed=SEED, stays=80)
    return out


def _cfg(consortium: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(None, [*FAST, "data.source=meds", f"data.path={consortium}", *extra])


def reference_counts(site_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Patients per code (and per code with a numeric value) among the site's labelled patients,
    over static events and events before the patient's latest prediction time, from the files."""
    events = pd.concat([pd.read_parquet(f) for f in sorted((site_dir / "meds" / "data").rglob("*.parquet"))])
    labels = pd.concat([pd.read_parquet(f) for f in sorted((site_dir / "labels").glob("*.parquet"))])
    limit = labels.groupby("subject_id")["prediction_time"].max().rename("limit")
    ev = events.merge(limit, left_on="subject_id", right_index=True)  # labelled patients only
    usable = ev[ev["time"].isna() | (ev["time"] < ev["limit"])]
    codes = usable.groupby("code")["subject_id"].nunique()
    numeric = usable[usable["numeric_value"].notna()].groupby("code")["subject_id"].nunique()
    return {str(c): int(n) for c, n in codes.items()}, {str(c): int(n) for c, n in numeric.items()}


def _at_least(counts: dict[str, int], k: int) -> dict[str, int]:
    return {c: n for c, n in counts.items() if n >= k}


def _ask_counts(grid: LocalGrid, node: int, cfg) -> Message:  # type: ignore[no-untyped-def]
    config = ConfigRecord({K.PHASE: K.COUNTS, K.EXPERIMENT: cfg.to_json()})
    msg = Message(content=RecordDict({K.CONFIG: config}), message_type=MessageType.QUERY, dst_node_id=node)
    (reply,) = grid.send_and_receive([msg])
    return reply


def test_count_reply_holds_only_codes_seen_in_k_patients(consortium, tmp_path, as_record, only_aggregates):
    # hospital-01 as it is (k = its site file's 20), under policy floors of 40 and of NOTHING, and
    # with its site file asking k = 30: the floor raises k, never lowers it
    own = tmp_path / "h1"
    shutil.copytree(consortium / "hospital-01", own)
    doc = yaml.safe_load((own / "site.yaml").read_text())
    (own / "site.yaml").write_text(yaml.safe_dump({**doc, "min_subjects": 30}))
    grid = LocalGrid(client_app, [
        {"partition-id": 0}, {"partition-id": 0, "min-patients": 40},
        {"partition-id": 0, "min-patients": NOTHING},
        {"site-config": str(own / "site.yaml")}, {"site-config": str(own / "site.yaml"), "min-patients": 25},
    ])
    codes, numeric = reference_counts(consortium / "hospital-01")
    assert max(codes.values()) < NOTHING and min(codes.values()) < 20  # some codes stay home
    cfg = _cfg(consortium)
    replies = {node: _ask_counts(grid, node, cfg) for node in grid.nodes}
    for node, k in zip(grid.nodes, (20, 40, NOTHING, 30, 30), strict=True):
        reply = replies[node]
        assert not reply.has_error()
        assert reply.content[K.METRICS][K.MIN_SUBJECTS] == k
        assert dict(reply.content[K.CODE_COUNTS]) == _at_least(codes, k)
        assert dict(reply.content[K.NUMERIC_COUNTS]) == _at_least(numeric, k)
    sizes = [len(replies[n].content[K.CODE_COUNTS]) for n in grid.nodes]
    assert sizes[0] > sizes[3] > sizes[1] > 0 and sizes[2] == 0  # k 20 > 30 > 40; NOTHING: none
    only_aggregates([as_record("query", r) for r in replies.values()], {}, np.zeros((0, 1)))


def test_run_on_the_agreed_vocabulary_and_resume_reuses_it(consortium, tmp_path, as_record, only_aggregates):
    cfg = _cfg(consortium)
    nodes = [{"partition-id": i} for i in range(3)] + [{"partition-id": 3, "min-patients": NOTHING}]
    grid = LocalGrid(client_app, nodes)
    grid.record_sent = True
    said: list[str] = []
    out = tmp_path / "run"
    assert run_experiment(grid, cfg, out, expected_nodes=4, progress=said.append,
                          stop_after=1) == {"stopped_after": 1}

    # the vocabulary the coordinator recorded is the one the reference counts give
    windows, aggs = cfg.data.meds.windows, cfg.data.meds.aggregations
    refs = [reference_counts(consortium / s) for s in SITES[:3]]
    expected = choose_vocabulary([_at_least(c, 20) for c, _ in refs], min_sites=2, top_n=256,
                                 numeric_counts=[_at_least(n, 20) for _, n in refs], windows=windows,
                                 aggregations=Aggregations(numeric=aggs.numeric, other=aggs.other))
    record = json.loads((out / "vocabulary.json").read_text())
    vocab = Vocabulary.model_validate(record["vocabulary"])
    assert vocab == expected and record["fingerprint"] == expected.fingerprint()
    assert record["sites"] == {s: {"min_subjects": 20, "codes_shared": len(_at_least(c, 20)),
                                   "numeric_codes_shared": len(_at_least(n, 20))}
                               for s, (c, n) in zip(SITES, refs, strict=False)}
    saved = json.loads((out / "config.json").read_text())["data"]["meds"]
    assert saved["fingerprint"] == expected.fingerprint()
    assert any("hospital-04: no code is seen in at least its k = 1000000 patients" in s for s in said)

    # every site tabularised to the vocabulary's width, which is θ's input width
    theta, _ = P.load(out / "checkpoint.safetensors")
    first = next(v for k, v in theta.items() if v.ndim == 2)
    assert first.shape[1] == expected.width
    agreed = with_vocabulary(cfg, expected)
    sites = [load_site(agreed.data, s) for s in SITES[:3]]
    assert all(s.n_features == expected.width for s in sites)
    first_round = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert sorted(first_round[0]["accepted"]) == list(SITES[:3])

    sent = [as_record(r.metadata.message_type, r) for r in grid.sent]
    assert sum(K.CODE_COUNTS in r["metrics"] for r in sent) == 4

    # resumed in a new process (a new grid): no count request, the same vocabulary, to the end
    grid2 = LocalGrid(client_app, [{"partition-id": i} for i in range(3)])
    grid2.record_sent = True
    summary = run_experiment(grid2, cfg, out, expected_nodes=3, resume=True, progress=said.append)
    sent2 = [as_record(r.metadata.message_type, r) for r in grid2.sent]
    assert not any(K.CODE_COUNTS in r["metrics"] for r in sent2)
    assert summary["vocabulary"]["fingerprint"] == expected.fingerprint()
    assert summary["vocabulary"]["reused"] is True and summary["vocabulary"]["width"] == expected.width
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["vocabulary"]["fingerprint"] == expected.fingerprint()
    assert set(on_disk["sites"]) == set(SITES[:3])
    assert set(on_disk["mean"]["outcomes"]) == {"mortality", "los_gt_7d", "readmission_30d", "aki"}

    final, _ = P.load(out / "final.safetensors")
    rows = np.concatenate([np.concatenate([s.x_train, s.x_test]) for s in sites])
    only_aggregates(sent + sent2, {k: v.shape for k, v in final.items()}, rows)


def test_sites_left_out_and_too_few_left_is_a_clear_error(consortium):
    flat = consortium / "flat" / "hospital-02" / "site.yaml"  # kind: ehr: cannot count codes
    grid = LocalGrid(client_app, [{"partition-id": 0}, {"site-config": str(flat)},
                                  {"partition-id": 2, "min-patients": NOTHING}])
    with pytest.raises(FedmetaError) as err:
        run_experiment(grid, _cfg(consortium), consortium.parent / "too-few", expected_nodes=3,
                       progress=lambda _: None)
    text = str(err.value)
    assert "feature agreement: 1 site(s) shared code counts, fewer than federation.min_nodes = 2" in text
    assert "node 1001: no code counts: bad request" in text
    assert "site hospital-03: no code is seen in at least its k = 1000000 patients" in text
    # a code must be reported by more sites than shared their counts: no vocabulary can be chosen
    grid = LocalGrid(client_app, [{"partition-id": i} for i in range(4)])
    with pytest.raises(FedmetaError, match="data.meds.min_sites = 5: a code must be reported by 5 "
                                           "sites, but only 4 shared code counts"):
        run_experiment(grid, _cfg(consortium, "data.meds.min_sites=5"), consortium.parent / "five",
                       expected_nodes=4, progress=lambda _: None)


def test_deployed_policy_checks_the_count_request_before_any_data_is_read(consortium):
    from fedmeta.protocol.request import parse_request
    from fedmeta.sitecore.policy import PolicyRefusal, SitePolicy, check_request

    policy = SitePolicy(min_patients=30, algorithms=("reptile",))
    loaded: list[int] = []

    def request(*overrides: str):  # type: ignore[no-untyped-def]
        cfg = _cfg(consortium, *overrides)
        config = ConfigRecord({K.PHASE: K.COUNTS, K.EXPERIMENT: cfg.to_json()})
        return parse_request(Message(content=RecordDict({K.CONFIG: config}), message_type=MessageType.QUERY,
                                     dst_node_id=1))

    def site():  # type: ignore[no-untyped-def]
        loaded.append(1)
        raise AssertionError("the count request must not read the site's data")

    with pytest.raises(PolicyRefusal, match="algorithm 'maml' is not allowed here"):
        check_request(policy, request("algorithm=maml"), site=site)
    with pytest.raises(PolicyRefusal, match=r"a task of support \+ query = 20 patients, below "
                                            "this site's min_patients = 30"):
        check_request(policy, request(), site=site)
    check_request(policy, request("tasks.support=15", "tasks.query=15"), site=site)  # allowed
    assert not loaded


def test_experiment_whose_vocabulary_does_not_match_its_fingerprint_is_refused(consortium):
    from fedmeta.common.config import config_from_dict
    from fedmeta.common.errors import ConfigError

    cfg = with_vocabulary(_cfg(consortium), Vocabulary(codes=("A", "B"), numeric_codes=("A",)))
    values = cfg.to_dict()
    values["data"]["meds"]["vocabulary"]["codes"] = ["A", "C"]  # changed on its way
    with pytest.raises(ConfigError, match="data.meds.fingerprint = .*does not match the vocabulary's"):
        config_from_dict(values, where="<experiment from coordinator>")


def test_held_out_sites_counts_are_not_used(consortium):
    from fedmeta.server.agreement import agree_vocabulary

    cfg = _cfg(consortium, "data.holdout=[hospital-03]")
    grid = LocalGrid(client_app, [{"partition-id": i} for i in range(4)])  # training sites, then 03
    said: list[str] = []
    agreement = agree_vocabulary(grid, cfg, list(grid.nodes), said.append)
    training = ("hospital-01", "hospital-02", "hospital-04")
    assert set(agreement.shares) == set(training) and not agreement.excluded
    refs = [reference_counts(consortium / s) for s in training]
    aggs = cfg.data.meds.aggregations
    assert agreement.vocabulary == choose_vocabulary(
        [_at_least(c, 20) for c, _ in refs], min_sites=2, numeric_counts=[_at_least(n, 20) for _, n in refs],
        windows=cfg.data.meds.windows, aggregations=Aggregations(numeric=aggs.numeric, other=aggs.other))
    assert "site hospital-03 is held out of training: its counts are not used" in said


def test_a_vocabulary_code_below_the_site_s_k_is_left_empty_at_the_site(consortium):
    """The coordinator's vocabulary is checked against the site's own counts, not only its
    fingerprint: a code fewer than k of the site's patients hold contributes nothing there."""
    import numpy as np

    from fedmeta.common.data.meds.source import own_vocabulary, site_config_named
    from fedmeta.common.data.meds.vocabulary import count_codes
    from fedmeta.sitecore.data import site_for_node

    cfg = _cfg(consortium)
    config = site_config_named(cfg.data, "hospital-01")
    vocab = own_vocabulary(config, shared=None)
    counts = count_codes(config).subjects
    code = min(vocab.codes, key=lambda c: counts[c])  # the rarest shared code
    held = counts[code]
    with_vocab = with_vocabulary(cfg, vocab)
    node = {"partition-id": 0}
    column_codes = [c for _, c, _ in vocab.columns()]
    cols = [j for j, c in enumerate(column_codes) if c == code]
    assert cols

    def site(floor: int):  # type: ignore[no-untyped-def]
        import fedmeta.sitecore.data as D

        D._LOADED.clear()
        return site_for_node({**node, "min-patients": floor}, with_vocab)

    control = site(held)  # k = its own count: the code is used
    assert np.abs(control.x_train[:, cols]).sum() > 0
    masked = site(held + 1)  # one patient short of k: the code's columns are empty
    assert np.abs(masked.x_train[:, cols]).sum() == 0 and np.abs(masked.x_test[:, cols]).sum() == 0
    others = [j for j in range(masked.n_features) if j not in cols]
    kept = [j for j in others if counts.get(column_codes[j], 0) > held]
    assert np.array_equal(masked.x_train[:, kept], control.x_train[:, kept])
    # the age column (MEDS_BIRTH/age_years: its name does not end in its code) is the birth code's
    age = vocab.feature_names().index("MEDS_BIRTH/age_years")
    assert counts["MEDS_BIRTH"] > held and age in kept
    assert np.abs(masked.x_train[:, age]).sum() > 0
