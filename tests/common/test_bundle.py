"""Site-model bundles: end to end on Fed-Heart-Disease, round trips, ProtoNets and refusals."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import save_file

from fedmeta.common import params as P
from fedmeta.common.adaptation import (
    AdaptationSettings,
    adapt_with_policy,
    predict_logit,
    stratified_shots,
    support_head,
)
from fedmeta.common.bundle import (
    META_KEY,
    BundleError,
    ModelSpec,
    Provenance,
    SiteModel,
    SiteModelBundle,
    config_hash,
    load_site_model,
)
from fedmeta.common.clinical.calibration import Calibration
from fedmeta.common.clinical.thresholds import Threshold
from fedmeta.common.config import load_config
from fedmeta.common.data import heart
from fedmeta.common.data.registry import DataSpec
from fedmeta.common.errors import DataError
from fedmeta.common.experiment import build_model_for
from fedmeta.common.meta.inner import adapt
from fedmeta.common.meta.matching import MATCHING, matching_logits
from fedmeta.common.meta.protonet import PROTOTYPES, protonet_logits
from fedmeta.common.meta.relation import RELATION
from fedmeta.common.meta.types import InnerConfig
from fedmeta.common.models import init_params
from fedmeta.common.preprocessing import HeartPreprocessing, ImagePreprocessing


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _raw_rows(name: str, site) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = heart.load_frame()
    rows = frame[frame["dataset"] == name].set_index("id", drop=False)
    return rows.loc[list(site.row_ids_train)].reset_index(drop=True), rows.loc[list(site.row_ids_test)].reset_index(drop=True)


def _provenance(**kw) -> Provenance:
    base = dict(site="Cleveland", source_run="runs/test/final.safetensors", config_hash=config_hash('{"seed": 0}'),
                algorithm="reptile", contributing_sites=("Hungary", "Switzerland", "VA Long Beach"),
                n_labelled=0, class_counts={})
    base.update(kw)
    return Provenance(**base)


SPEC = ModelSpec("mlp", {"in_features": 13, "hidden": [16], "out_features": 2})


@pytest.fixture(scope="module")
def cleveland(tmp_path_factory):
    """θ from a tiny local training on the other hospitals; the policy on 10 stratified shots."""
    sites = {h: heart.load_hospital(h) for h in heart.HOSPITALS}
    others = [h for h in heart.HOSPITALS if h != "Cleveland"]
    x = torch.from_numpy(np.concatenate([sites[h].x_train for h in others]))
    y = torch.from_numpy(np.concatenate([sites[h].y_train[:, 0] for h in others]))
    torch.manual_seed(0)
    model = SPEC.build()
    theta = adapt(model, init_params(model), x, y, InnerConfig(steps=60, lr=0.1))
    site = sites["Cleveland"]
    rng = np.random.default_rng(0)
    idx = stratified_shots(site.y_train[:, 0], 10, rng)
    xs, ys = torch.from_numpy(site.x_train[idx]), torch.from_numpy(site.y_train[idx, 0])
    res = adapt_with_policy(model, theta, xs, ys, rng=rng, settings=AdaptationSettings(max_steps=30))
    train_raw, test_raw = _raw_rows("Cleveland", site)
    pre = HeartPreprocessing.fit(train_raw)
    bundle = SiteModelBundle.from_adaptation(SPEC, None, pre, heart.OUTCOME, res, _provenance(), id_column="id")
    path = bundle.save(tmp_path_factory.mktemp("bundle") / "cleveland.fedmeta")
    return {"model": model, "res": res, "site": site, "test_raw": test_raw, "bundle": bundle, "path": path}


def test_predict_on_raw_rows_equals_the_in_memory_model(cleveland):
    c = cleveland
    out = load_site_model(c["path"]).predict_proba(c["test_raw"])
    s = predict_logit(c["model"], c["res"].params, torch.from_numpy(c["site"].x_test))
    want = c["res"].calibration.apply(s)
    assert list(out.columns) == ["id", "risk", "decision"]
    assert out["id"].tolist() == list(c["site"].row_ids_test)
    # same inputs (the twin preprocessing is exact), same float32 weights: only kernel rounding
    assert np.allclose(out["risk"].to_numpy(), want, rtol=0, atol=1e-6)
    t = c["res"].threshold.value
    clear = np.abs(want - t) > 1e-6
    assert (out["decision"].to_numpy()[clear] == (want[clear] >= t)).all()


def test_bundle_round_trip_keeps_everything(cleveland):
    b, loaded = cleveland["bundle"], SiteModelBundle.load(cleveland["path"])
    doc_a, doc_b = b.document(), loaded.document()
    assert doc_a == doc_b
    assert loaded.provenance.n_labelled == 10 and sum(loaded.provenance.class_counts.values()) == 10
    assert min(loaded.provenance.class_counts.values()) >= 1
    assert loaded.adaptation["choice"]["scope"] == cleveland["res"].choice.scope
    assert loaded.threshold == cleveland["res"].threshold and loaded.calibration == cleveland["res"].calibration
    assert all(np.array_equal(loaded.params[k], b.params[k]) for k in b.params)
    assert doc_b["provenance"]["torch_version"] == torch.__version__


def test_reordered_and_extra_columns_are_scored_the_same(cleveland):
    test_raw = cleveland["test_raw"]
    m = load_site_model(cleveland["path"])
    a = m.predict_proba(test_raw)
    b = m.predict_proba(test_raw[list(reversed(test_raw.columns))].assign(note="x"))
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(DataError, match=r"'id' that the model needs are missing"):
        m.predict_proba(test_raw.drop(columns=["id"]))
    with pytest.raises(DataError, match="scores tables"):
        m.predict_proba(np.zeros((2, 13)))


def _rewrite(path, out, *, doc=None, tensors=None):
    b = SiteModelBundle.load(path)
    d = b.document() if doc is None else doc
    save_file(tensors if tensors is not None else b.tensors(), str(out), metadata={META_KEY: json.dumps(d)})
    return out


def test_files_that_are_not_bundles_or_are_newer_are_refused(cleveland, tmp_path):
    path = cleveland["path"]
    with pytest.raises(BundleError, match="bundle file not found"):
        load_site_model(tmp_path / "nope.fedmeta")
    (tmp_path / "junk.fedmeta").write_bytes(b"not a safetensors file at all")
    with pytest.raises(BundleError, match="not a fedmeta site-model bundle"):
        load_site_model(tmp_path / "junk.fedmeta")
    P.save(tmp_path / "final.safetensors", {"w": np.zeros(3, dtype=np.float32)}, {"config": "{}"})
    with pytest.raises(BundleError, match="final.safetensors holds parameters only"):
        load_site_model(tmp_path / "final.safetensors")
    doc = SiteModelBundle.load(path).document()
    with pytest.raises(BundleError, match=r"newer fedmeta \(bundle format 3; this fedmeta reads up to 2\)"):
        load_site_model(_rewrite(path, tmp_path / "v3.fedmeta", doc={**doc, "format_version": 3}))
    with pytest.raises(BundleError, match="format 'other' is not 'fedmeta-site-model'"):
        load_site_model(_rewrite(path, tmp_path / "o.fedmeta", doc={**doc, "format": "other"}))
    tensors = SiteModelBundle.load(path).tensors()
    tensors["param/net.0.bias"] = tensors["param/net.0.bias"] + 1
    with pytest.raises(BundleError, match="modified or damaged"):
        load_site_model(_rewrite(path, tmp_path / "t.fedmeta", tensors=tensors))
    broken = {k: v for k, v in doc.items() if k != "outcome"}
    with pytest.raises(BundleError, match="incomplete or invalid"):
        load_site_model(_rewrite(path, tmp_path / "b.fedmeta", doc=broken))


def test_weights_that_do_not_fit_the_architecture_are_refused(cleveland):
    b = cleveland["bundle"]
    wrong = SiteModelBundle(ModelSpec("mlp", {"in_features": 13, "hidden": [8], "out_features": 2}),
                            b.params, b.preprocessing, b.outcome, b.classes, b.provenance,
                            threshold=b.threshold)
    with pytest.raises(BundleError, match=r"do not fit the model: \(given, expected\) shapes .*'net.0.weight': \(\(16, 13\), \(8, 13\)\)"):
        SiteModel(wrong)


def test_a_site_with_another_width_is_named_not_a_shape_error():
    from fedmeta.common.bundle import check_input_width, check_params

    net = SPEC.build()
    with pytest.raises(DataError, match=r"site.csv: the data encode to 22 features \(a, b, c, .*, …\), but the model takes 13"):
        check_input_width(net, 22, source="site.csv", feature_names=["a", "b"] + ["c"] * 20)
    check_input_width(net, 13, source="site.csv")
    other = {k: v for k, v in init_params(ModelSpec("mlp", {"in_features": 22, "hidden": [16], "out_features": 2}).build()).items()}
    with pytest.raises(DataError, match="the model takes 13 input features"):
        check_params(net, other, source="final.safetensors")
    with pytest.raises(DataError, match=r"missing \['net.2.bias'\]"):
        check_params(net, {k: v for k, v in init_params(net).items() if k != "net.2.bias"}, source="x")


def test_model_spec_builds_what_the_experiment_builds():
    cfg = load_config(None, [])
    spec = DataSpec("tabular", (13,), 2, ("a",))
    ref = {k: v.shape for k, v in build_model_for(cfg, spec).named_parameters()}
    assert {k: v.shape for k, v in ModelSpec.for_experiment(cfg, spec).build().named_parameters()} == ref
    cfg = load_config(None, ["model.name=conv4", "data.source=synth-images", "algorithm=protonet"])
    spec = DataSpec("images", (1, 28, 28), 10, ("a",))
    ref = {k: v.shape for k, v in build_model_for(cfg, spec).named_parameters()}
    assert {k: v.shape for k, v in ModelSpec.for_experiment(cfg, spec).build().named_parameters()} == ref


def _support_bundle(cleveland, tmp_path, algorithm: str):  # type: ignore[no-untyped-def]
    """A binary bundle of ``algorithm``'s classifier of 12 Cleveland patients (a small untrained
    network), saved and loaded; returns the loaded model, the network, θ, the support set and the head."""
    site = cleveland["site"]
    torch.manual_seed(1)
    spec = (ModelSpec("relation-mlp", {"in_features": 13, "hidden": [8], "embed": 4}) if algorithm == "relation"
            else ModelSpec("mlp", {"in_features": 13, "hidden": [8, 4], "out_features": None}))
    net = spec.build()
    params = init_params(net)
    idx = stratified_shots(site.y_train[:, 0], 12, np.random.default_rng(2))
    xs, ys = torch.from_numpy(site.x_train[idx]), torch.from_numpy(site.y_train[idx, 0])
    metric = {"protonet": PROTOTYPES, "matching": MATCHING, "relation": RELATION}[algorithm]
    head = support_head(metric, net, params, xs, ys, threshold="youden")
    pre = HeartPreprocessing.fit(_raw_rows("Cleveland", site)[0])
    saved = SiteModelBundle.from_support(spec, params, pre, heart.OUTCOME, algorithm, head, _provenance(),
                                         id_column="id").save(tmp_path / f"{algorithm}.fedmeta")
    return load_site_model(saved), net, params, xs, ys, head


def test_binary_protonet_bundle_matches_the_engines_prototype_logits(cleveland, tmp_path):
    model, net, params, xs, ys, head = _support_bundle(cleveland, tmp_path, "protonet")
    out = model.predict_proba(cleveland["test_raw"])
    ref = protonet_logits(net, params, xs, ys, torch.from_numpy(cleveland["site"].x_test), n_way=2).double()
    want = head.calibration.apply((ref[:, 1] - ref[:, 0]).numpy())
    assert np.allclose(out["risk"].to_numpy(), want, atol=1e-5)
    assert model.bundle.head == "protonet" and model.bundle.provenance.n_labelled == 12
    assert torch.allclose(torch.as_tensor(model.bundle.memory["prototypes"][1]),
                          torch.func.functional_call(net, params, (xs[ys == 1],)).mean(dim=0), atol=1e-6)


@pytest.mark.parametrize("algorithm", ["matching", "relation"])
def test_binary_matching_and_relation_bundles_match_the_engine(cleveland, tmp_path, algorithm):
    """A bundle's risks are the calibrated score of an episode whose support set is the site's
    labelled patients and whose queries are the new patients, as the engine trains it."""
    model, net, params, xs, ys, head = _support_bundle(cleveland, tmp_path, algorithm)
    out = model.predict_proba(cleveland["test_raw"])
    xq = torch.from_numpy(cleveland["site"].x_test)
    ref = head.metric.logits(net, params, xs, ys, xq, n_way=2).double()
    if algorithm == "matching":  # the engine's own formula, written separately
        assert torch.allclose(ref, matching_logits(net, params, xs, ys, xq, n_way=2).double())
    else:  # the model's own forward pass (RelationNet.forward) is an independent implementation
        with torch.no_grad():
            fwd = net(xs, torch.nn.functional.one_hot(ys, 2).float(), xq).double()
        assert torch.allclose(ref, fwd, atol=1e-6)
    want = head.calibration.apply((ref[:, 1] - ref[:, 0]).numpy())
    assert np.allclose(out["risk"].to_numpy(), want, atol=1e-5)
    assert model.bundle.head == algorithm
    assert model.bundle.provenance.class_counts == {"0": int((ys == 0).sum()), "1": int((ys == 1).sum())}


def test_a_format_1_protonet_bundle_still_loads(cleveland, tmp_path):
    """Format 1 named the ProtoNet head ``prototypes``; the same file reads as a ``protonet`` head."""
    now = _support_bundle(cleveland, tmp_path, "protonet")[0].bundle.save(tmp_path / "v2.fedmeta")
    doc = SiteModelBundle.load(now).document()
    old = _rewrite(now, tmp_path / "v1.fedmeta", doc={**doc, "format_version": 1, "head": "prototypes"})
    assert load_site_model(old).bundle.head == "protonet"
    pd.testing.assert_frame_equal(load_site_model(old).predict_proba(cleveland["test_raw"]),
                                  load_site_model(now).predict_proba(cleveland["test_raw"]))
    with pytest.raises(BundleError, match="neither 'logits' nor a metric learner"):  # format 2 has no such head
        load_site_model(_rewrite(now, tmp_path / "bad.fedmeta", doc={**doc, "head": "prototypes"}))


def test_image_protonet_and_conv4_bundles_match_the_engine(tmp_path):
    torch.manual_seed(0)
    pre = ImagePreprocessing(1, 28, 28)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    xq = torch.from_numpy(pre.transform(images))
    spec = ModelSpec("conv4", {"in_channels": 1, "hidden": 8, "out_features": None})
    net = spec.build()
    params = init_params(net)
    xs = torch.rand(10, 1, 28, 28)
    ys = torch.arange(5).repeat(2)
    head = support_head(PROTOTYPES, net, params, xs, ys, n_classes=5)
    classes = ("a", "b", "c", "d", "e")
    b = SiteModelBundle.from_support(spec, params, pre, "finding", "protonet", head, _provenance(site="Imaging"),
                                     classes=classes)
    out = load_site_model(b.save(tmp_path / "p.fedmeta")).predict_proba(images)
    want = torch.softmax(protonet_logits(net, params, xs, ys, xq, n_way=5).double(), dim=1).numpy()
    assert np.allclose(out[[f"p_{c}" for c in classes]].to_numpy(), want, atol=1e-5)
    assert out["decision"].tolist() == [classes[i] for i in want.argmax(axis=1)]
    with pytest.raises(DataError, match="images are 32x32"):
        load_site_model(tmp_path / "p.fedmeta").predict_proba(np.zeros((1, 32, 32), dtype=np.uint8))
    spec4 = ModelSpec("conv4", {"in_channels": 1, "hidden": 8, "out_features": 3})
    net4 = spec4.build()
    p4 = init_params(net4)
    b4 = SiteModelBundle(spec4, {k: v.numpy() for k, v in p4.items()}, pre, "finding", ("x", "y", "z"),
                         _provenance(site="Imaging"))
    out4 = load_site_model(b4.save(tmp_path / "c.fedmeta")).predict_proba(images)
    with torch.no_grad():
        ref = torch.softmax(torch.func.functional_call(net4, p4, (xq,)).double(), dim=1).numpy()
    assert np.allclose(out4[["p_x", "p_y", "p_z"]].to_numpy(), ref, atol=1e-6)


def test_bundle_invariants_are_checked(cleveland):
    b = cleveland["bundle"]
    with pytest.raises(ValueError, match="needs a decision threshold"):
        SiteModelBundle(b.model, b.params, b.preprocessing, b.outcome, ("0", "1"), b.provenance)
    with pytest.raises(ValueError, match=r"a protonet head keeps \['prototypes'\] of the support set, the bundle has \[\]"):
        SiteModelBundle(b.model, b.params, b.preprocessing, b.outcome, ("0", "1"), b.provenance,
                        head="protonet", threshold=Threshold(0.5, "fixed:0.5"))
    with pytest.raises(ValueError, match="head 'maml': algorithm maml has no support-set classifier"):
        SiteModelBundle(b.model, b.params, b.preprocessing, b.outcome, ("0", "1"), b.provenance,
                        head="maml", threshold=Threshold(0.5, "fixed:0.5"))
    assert Calibration().method == "none"
