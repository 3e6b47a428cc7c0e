"""ONNX export: onnxruntime on the same rows as the PyTorch bundle (atol 1e-5)."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fedmeta.cli.onnx_export import (  # noqa: E402
    ExportError,
    compare_with_pytorch,
    export_onnx,
    onnx_feed,
    run_onnx,
)
from fedmeta.common.bundle import ModelSpec, Provenance, SiteModel, SiteModelBundle  # noqa: E402
from fedmeta.common.clinical.calibration import Calibration  # noqa: E402
from fedmeta.common.clinical.thresholds import Threshold  # noqa: E402
from fedmeta.common.data import heart  # noqa: E402
from fedmeta.common.data.ehr import load_ehr_cohort, read_table  # noqa: E402
from fedmeta.common.data.schema import load_schema  # noqa: E402
from fedmeta.common.data.synth_ehr import write_synth_ehr  # noqa: E402
from fedmeta.common.models import init_params  # noqa: E402
from fedmeta.common.preprocessing import EhrPreprocessing, HeartPreprocessing, ImagePreprocessing  # noqa: E402

PROV = Provenance("site", "run", "0" * 64, "reptile", ("a", "b"), 10, {"0": 5, "1": 5})
CAL = Calibration("platt", -0.3, 0.8, 40, 12)
THR = Threshold(0.35, "prevalence", 40, 12)


def _params(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in init_params(spec.build()).items()}


def test_fed_heart_mlp_with_preprocessing_matches_pytorch(tmp_path):
    frame = heart.load_frame()
    rows = frame[frame["dataset"] == "Hungary"].reset_index(drop=True)
    pre = HeartPreprocessing.fit(rows.iloc[:150])
    spec = ModelSpec("mlp", {"in_features": 13, "hidden": [16, 8], "out_features": 2})
    bundle = SiteModelBundle(spec, _params(spec), pre, heart.OUTCOME, ("0", "1"), PROV,
                             calibration=CAL, threshold=THR, id_column="id")
    path = export_onnx(bundle, tmp_path / "heart.onnx")
    test = rows.iloc[150:]
    assert compare_with_pytorch(bundle, path, test) < 1e-5
    got = run_onnx(path, onnx_feed(bundle, test))
    want = SiteModel(bundle).predict_proba(test)
    assert (got["decision"] == want["decision"].to_numpy()).mean() == 1.0
    assert got["input_ok"].all()
    bad = onnx_feed(bundle, test.iloc[:2])
    bad["cp"] = np.array([["angina"], ["typical angina"]], dtype=object)
    assert run_onnx(path, bad)["input_ok"].tolist() == [False, True]


@pytest.fixture(scope="module")
def ehr(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    paths = write_synth_ehr(root, sites=1, seed=5, mean_stays=120)
    schema = load_schema(root / "schema.yaml")
    cohort = load_ehr_cohort(paths[0].parent / "stays.csv", schema, ["mortality"], name="h", id_column="stay_id")
    frame, _ = read_table(paths[0].parent / "stays.csv")
    return EhrPreprocessing.from_preprocessor(schema, cohort.preprocessor, missing_indicators=True), frame


@pytest.mark.parametrize("name, kwargs", [("linear", {}), ("mlp", {"hidden": [12]})])
def test_ehr_imputation_one_hot_and_scaling_in_onnx_match_pytorch(ehr, tmp_path, name, kwargs):
    pre, frame = ehr
    spec = ModelSpec(name, {"in_features": len(pre.feature_names), "out_features": 2, **kwargs})
    bundle = SiteModelBundle(spec, _params(spec, 1), pre, "mortality", ("0", "1"), PROV,
                             calibration=CAL, threshold=THR, id_column="stay_id")
    path = export_onnx(bundle, tmp_path / "ehr.onnx")
    assert frame.isna().any().any()  # the rows hold missing values: imputation is exercised
    assert compare_with_pytorch(bundle, path, frame) < 1e-5
    feed = onnx_feed(bundle, frame.iloc[:3])
    feed["sex"] = np.array([["X"], [""], ["M"]], dtype=object)  # unseen, missing, known
    assert run_onnx(path, feed)["input_ok"].tolist() == [False, True, True]


def test_conv4_and_protonet_heads_match_pytorch(tmp_path):
    pre = ImagePreprocessing(1, 28, 28, (0.4,), (0.3,))
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    spec = ModelSpec("conv4", {"in_channels": 1, "hidden": 8, "out_features": 3})
    b = SiteModelBundle(spec, _params(spec), pre, "finding", ("x", "y", "z"), PROV)
    assert compare_with_pytorch(b, export_onnx(b, tmp_path / "c.onnx"), images) < 1e-5
    emb = ModelSpec("conv4", {"in_channels": 1, "hidden": 8, "out_features": None})
    protos = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
    pb = SiteModelBundle(emb, _params(emb), pre, "finding", ("0", "1"), PROV, head="protonet",
                         memory={"prototypes": protos}, calibration=CAL, threshold=THR)
    assert compare_with_pytorch(pb, export_onnx(pb, tmp_path / "p.onnx"), images) < 1e-5


def test_matching_and_relation_heads_match_pytorch(tmp_path):
    """Each metric learner's classifier, written as ONNX nodes, scores as its PyTorch code does:
    binary on a table-shaped embedding, five classes on images (Relation: Sung et al.'s Conv-4
    with its convolutional relation module)."""
    pre = ImagePreprocessing(1, 28, 28, (0.4,), (0.3,))
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    rng = np.random.default_rng(1)
    emb = ModelSpec("conv4", {"in_channels": 1, "hidden": 8, "out_features": None})
    support = rng.normal(size=(10, 8)).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[np.arange(10) % 5]
    mb = SiteModelBundle(emb, _params(emb), pre, "finding", tuple("abcde"), PROV, head="matching",
                         memory={"support": support / np.linalg.norm(support, axis=1, keepdims=True), "labels": labels})
    assert compare_with_pytorch(mb, export_onnx(mb, tmp_path / "m.onnx"), images) < 1e-5
    rel = ModelSpec("relation-conv4", {"in_channels": 1, "hidden": 8})
    rb = SiteModelBundle(rel, _params(rel), pre, "finding", ("0", "1"), PROV, head="relation",
                         memory={"classes": rng.normal(size=(2, 8, 7, 7)).astype(np.float32)},
                         calibration=CAL, threshold=THR)
    assert compare_with_pytorch(rb, export_onnx(rb, tmp_path / "r.onnx"), images) < 1e-5


def test_batch_statistics_norm_is_refused(tmp_path):
    spec = ModelSpec("conv4", {"in_channels": 1, "hidden": 8, "out_features": 2, "norm": "batch"})
    b = SiteModelBundle(spec, _params(spec), ImagePreprocessing(1, 28, 28), "f", ("0", "1"), PROV,
                        threshold=THR)
    with pytest.raises(ExportError, match="norm='batch'.*not exported"):
        export_onnx(b, tmp_path / "b.onnx")
    with pytest.raises(ExportError, match="needs a pandas DataFrame"):
        onnx_feed(SiteModelBundle(ModelSpec("linear", {"in_features": 13}), _params(ModelSpec("linear", {"in_features": 13})),
                                  HeartPreprocessing((0.0,) * 13, (1.0,) * 13), "o", ("0", "1"), PROV,
                                  threshold=THR), np.zeros((1, 13)))
