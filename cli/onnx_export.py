"""ONNX export of a site-model bundle: preprocessing, network, calibration and threshold in one
graph, for hospitals that run models outside Python (optional extra: ``pip install
'fedmeta[onnx]'``).

The graph is written node by node with :mod:`onnx.helper` (opset 19, IR version 9), so every
operation is one whose meaning is fixed by the ONNX specification; no tracing is involved.

Inside the graph:

- tables: one input per raw column, shape ``(N, 1)`` — numeric columns ``double`` (NaN for a
  missing value), categorical columns ``string`` ("" for a missing value). EHR: median imputation
  (``IsNaN`` / ``Where``), z-scores, one-hot encoding of categories (string ``Equal``, opset 19)
  and missing indicators, in the bundle's feature order. Fed-Heart-Disease: FLamby's encoding
  (sex, TRUE/FALSE flags, one-hot ``cp`` and ``restecg`` without their first level) and the z-score.
- images: one ``float`` input ``images (N, C, H, W)`` with values in [0, 1], then the per-channel
  normalisation when the bundle has one.
- networks: ``linear``, ``mlp`` (``Gemm``/``Relu``) and ``conv4`` with group norm or none
  (``Conv``, group norm from plain reductions, ``Relu``, ``MaxPool``), and a Relation Network's
  encoder and relation module; a metric learner's classifier writes its own scores against the
  bundled support-set tensors (:class:`fedmeta.common.meta.episodic.MetricHead` ``onnx``): the
  ProtoNet's ``−||f(x) − c_k||²``, the Matching Network's attention over the support set, the
  Relation Network's relation module on ``[c_k, f(x)]``.
- outputs: binary ``risk (N)`` = ``σ(a + b·s)`` and ``decision (N)`` = ``risk ≥ threshold``;
  multiclass ``probabilities (N, C)`` and ``decision (N)`` (class index); and ``input_ok (N)``,
  false where a categorical value is outside the model's categories or a Fed-Heart-Disease
  value is missing (the graph cannot raise an error, so it flags the row instead).

Outside the graph (:func:`onnx_feed` does it in Python): parsing text to numbers, trimming
whitespace, spelling Fed-Heart-Disease flags as ``TRUE``/``FALSE``, converting uint8 images to
[0, 1], and refusing tables with missing columns (an ONNX input cannot be optional here).
Batch-statistics norm (``conv4`` with ``norm="batch"``) is refused: its output depends on the
other images of the batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from fedmeta.common.bundle import SiteModel, SiteModelBundle
from fedmeta.common.data import heart
from fedmeta.common.data.schema import _category_strings
from fedmeta.common.errors import FedmetaError
from fedmeta.common.models import build_model
from fedmeta.common.models.conv import BatchStatNorm2d, Conv4
from fedmeta.common.models.mlp import MLP, LogisticRegression
from fedmeta.common.preprocessing import (
    EhrPreprocessing,
    HeartPreprocessing,
    ImagePreprocessing,
    check_columns,
)

OPSET = 19
IR_VERSION = 9


class ExportError(FedmetaError):
    """The bundle cannot be exported to ONNX (or the optional ``onnx`` extra is missing)."""


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ExportError("ONNX export needs the optional extra: pip install 'fedmeta[onnx]'") from e
    return onnx


class _Graph:
    """Collects nodes, constants, inputs and outputs; names are made unique."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.h = self.onnx.helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: Any, hint: str = "c", dtype: Any = np.float64) -> str:
        arr = np.asarray(value, dtype=dtype) if dtype is not object else np.asarray(value, dtype=object)
        name = self.name(hint)
        if arr.dtype == object:
            t = self.h.make_tensor(name, self.onnx.TensorProto.STRING, arr.shape,
                                   [str(v).encode() for v in arr.ravel()])
        else:
            t = self.onnx.numpy_helper.from_array(arr, name)
        self.inits.append(t)
        return name

    def op(self, kind: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        out = self.name(hint or kind.lower())
        self.nodes.append(self.h.make_node(kind, inputs, [out], **attrs))
        return out

    def input(self, name: str, elem: int, shape: list[Any]) -> str:
        self.inputs.append(self.h.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, src: str, name: str, elem: int, shape: list[Any]) -> None:
        self.nodes.append(self.h.make_node("Identity", [src], [name]))
        self.outputs.append(self.h.make_tensor_value_info(name, elem, shape))

    def model(self, doc: str, meta: Mapping[str, str]) -> Any:
        graph = self.h.make_graph(self.nodes, "fedmeta_site_model", self.inputs, self.outputs, self.inits)
        m = self.h.make_model(graph, opset_imports=[self.h.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="fedmeta", doc_string=doc)
        self.h.set_model_props(m, dict(meta))
        self.onnx.checker.check_model(m)
        return m


# --- preprocessing ------------------------------------------------------------------------------

def _T() -> Any:
    return _onnx().TensorProto


def _all(g: _Graph, flags: list[str]) -> str:
    out = flags[0]
    for f in flags[1:]:
        out = g.op("And", [out, f])
    return out


def _ehr(g: _Graph, pre: EhrPreprocessing) -> tuple[str, str]:
    """Encoded, imputed and scaled features ``(N, d)`` (double) and the row validity flag."""
    T = _T()
    numeric, indicators, onehots, ok = [], [], [], []
    for j, f in enumerate(pre.schema.numeric):
        x = g.input(f.name, T.DOUBLE, ["N", 1])
        nan = g.op("IsNaN", [x])
        filled = g.op("Where", [nan, g.const([[pre.median[j]]]), x])
        numeric.append(g.op("Div", [g.op("Sub", [filled, g.const([[pre.mean[j]]])]), g.const([[pre.std[j]]])]))
        indicators.append(g.op("Cast", [nan], to=T.DOUBLE))
    for f in pre.schema.categorical:
        s = g.input(f.name, T.STRING, ["N", 1])
        hit = g.op("Equal", [s, g.const([list(f.categories)], "cats", object)])
        hot = g.op("Cast", [hit], to=T.DOUBLE)
        onehots.append(hot)
        any_hit = g.op("Cast", [g.op("ReduceMax", [hot, g.const([1], "ax", np.int64)], keepdims=1)], to=T.BOOL)
        empty = g.op("Equal", [s, g.const([[""]], "empty", object)])
        ok.append(g.op("Or", [any_hit, empty]))
    blocks = numeric + onehots + (indicators if pre.missing_indicators else [])
    x = g.op("Concat", blocks, axis=1)
    if not ok:  # no categorical column: every row is valid
        first = g.op("Slice", [x, g.const([0], "s", np.int64), g.const([1], "e", np.int64),
                               g.const([1], "a", np.int64)])
        ok = [g.op("Equal", [first, first])]
    flag = _all(g, ok)
    return x, flag


def _heart(g: _Graph, pre: HeartPreprocessing) -> tuple[str, str]:
    T = _T()
    cols: dict[str, str] = {}
    ok: list[str] = []
    for name in ("age", "trestbps", "chol", "thalch", "oldpeak"):
        x = g.input(name, T.DOUBLE, ["N", 1])
        cols[name] = x
        ok.append(g.op("Not", [g.op("IsNaN", [x])]))

    def levels(col: str, values: tuple[str, ...]) -> str:
        s = g.input(col, T.STRING, ["N", 1])
        hit = g.op("Cast", [g.op("Equal", [s, g.const([list(values)], "lv", object)])], to=T.DOUBLE)
        ok.append(g.op("Cast", [g.op("ReduceMax", [hit, g.const([1], "ax", np.int64)], keepdims=1)], to=T.BOOL))
        return hit

    def column(block: str, k: int) -> str:
        return g.op("Slice", [block, g.const([k], "s", np.int64), g.const([k + 1], "e", np.int64),
                              g.const([1], "a", np.int64)])

    cols["sex"] = column(levels("sex", ("Female", "Male")), 1)
    for flag in ("fbs", "exang"):
        cols[flag] = column(levels(flag, ("FALSE", "TRUE")), 1)
    for col, lv in (("cp", heart.CP_LEVELS), ("restecg", heart.RESTECG_LEVELS)):
        hot = levels(col, lv)
        for k, name in enumerate(lv[1:], start=1):
            cols[f"{col}={name}"] = column(hot, k)
    x = g.op("Concat", [cols[f] for f in heart.FEATURES], axis=1)
    x = g.op("Div", [g.op("Sub", [x, g.const([pre.mean])]), g.const([pre.std])])
    return x, _all(g, ok)


# --- networks ---------------------------------------------------------------------------------

def _linear(g: _Graph, x: str, layer: nn.Linear, params: Mapping[str, np.ndarray], prefix: str) -> str:
    w = g.const(params[f"{prefix}weight"], "w", np.float32)
    b = g.const(params[f"{prefix}bias"], "b", np.float32)
    return g.op("Gemm", [x, w, b], transB=1)


def _group_norm(g: _Graph, x: str, gn: nn.GroupNorm, params: Mapping[str, np.ndarray], prefix: str) -> str:
    """``(x − mean_g) / sqrt(var_g + ε) · γ + β`` over each group's channels and pixels."""
    shape = g.op("Shape", [x])
    grouped = g.op("Reshape", [x, g.const([0, gn.num_groups, -1], "gshape", np.int64)])
    axes = g.const([2], "ax", np.int64)
    mean = g.op("ReduceMean", [grouped, axes], keepdims=1)
    centred = g.op("Sub", [grouped, mean])
    var = g.op("ReduceMean", [g.op("Mul", [centred, centred]), axes], keepdims=1)
    normed = g.op("Div", [centred, g.op("Sqrt", [g.op("Add", [var, g.const(gn.eps, "eps", np.float32)])])])
    back = g.op("Reshape", [normed, shape])
    c = gn.num_channels
    gamma = g.const(params[f"{prefix}weight"].reshape(c, 1, 1), "gamma", np.float32)
    beta = g.const(params[f"{prefix}bias"].reshape(c, 1, 1), "beta", np.float32)
    return g.op("Add", [g.op("Mul", [back, gamma]), beta])


def _module(g: _Graph, x: str, m: nn.Module, params: Mapping[str, np.ndarray], prefix: str) -> str:
    if isinstance(m, nn.Sequential):
        for name, child in m.named_children():
            x = _module(g, x, child, params, f"{prefix}{name}.")
        return x
    if isinstance(m, MLP):
        return _module(g, x, m.net, params, f"{prefix}net.")
    if isinstance(m, LogisticRegression):
        return _linear(g, x, m.linear, params, f"{prefix}linear.")
    if isinstance(m, Conv4):
        z = g.op("Flatten", [_module(g, x, m.features, params, f"{prefix}features.")], axis=1)
        return _linear(g, z, m.head, params, f"{prefix}head.") if m.head is not None else z
    if isinstance(m, nn.Linear):
        return _linear(g, x, m, params, prefix)
    if isinstance(m, nn.ReLU):
        return g.op("Relu", [x])
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return g.op("Flatten", [x], axis=1)
    if isinstance(m, nn.Identity):
        return x
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.dilation != (1, 1) or not isinstance(m.padding, tuple):
            raise ExportError(f"unsupported convolution {m}")
        ph, pw = m.padding
        inputs = [x, g.const(params[f"{prefix}weight"], "w", np.float32)]
        if m.bias is not None:
            inputs.append(g.const(params[f"{prefix}bias"], "b", np.float32))
        return g.op("Conv", inputs, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                    pads=[ph, pw, ph, pw])
    if isinstance(m, nn.GroupNorm):
        return _group_norm(g, x, m, params, prefix)
    if isinstance(m, nn.MaxPool2d):
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s = m.stride if isinstance(m.stride, int) else m.stride[0]
        return g.op("MaxPool", [x], kernel_shape=[k, k], strides=[s, s])
    if isinstance(m, BatchStatNorm2d):
        raise ExportError("conv4 with norm='batch' normalises with the statistics of each batch, so a "
                          "patient's output depends on the others scored with it; it is not exported")
    raise ExportError(f"no ONNX export for layer {type(m).__name__}")


# --- the whole model --------------------------------------------------------------------------

def build_onnx(bundle: SiteModelBundle) -> Any:
    """The ONNX ``ModelProto`` of ``bundle`` (module docstring)."""
    g = _Graph()
    T = _T()
    pre = bundle.preprocessing
    if isinstance(pre, EhrPreprocessing):
        feats, ok = _ehr(g, pre)
        x = g.op("Cast", [feats], to=T.FLOAT)
    elif isinstance(pre, HeartPreprocessing):
        feats, ok = _heart(g, pre)
        x = g.op("Cast", [feats], to=T.FLOAT)
    else:
        x = g.input("images", T.FLOAT, ["N", pre.channels, pre.height, pre.width])
        if pre.mean:
            x = g.op("Div", [g.op("Sub", [x, g.const(np.array(pre.mean).reshape(1, -1, 1, 1), "m", np.float32)]),
                             g.const(np.array(pre.std).reshape(1, -1, 1, 1), "s", np.float32)])
        finite = g.op("Not", [g.op("IsNaN", [x])])
        ok = g.op("Cast", [g.op("ReduceMin", [g.op("Cast", [finite], to=T.FLOAT),
                                              g.const([1, 2, 3], "ax", np.int64)], keepdims=0)], to=T.BOOL)
    network = build_model(bundle.model.name, **dict(bundle.model.kwargs))
    metric = SiteModel(bundle).metric
    if metric is None:
        logits = g.op("Cast", [_module(g, x, network, bundle.params, "")], to=T.DOUBLE)
    else:
        if metric.onnx is None:
            raise ExportError(f"no ONNX export for the {bundle.head} classifier")
        encoder = network.get_submodule(metric.encoder) if metric.encoder else network
        z = _module(g, x, encoder, bundle.params, f"{metric.encoder}." if metric.encoder else "")
        if metric.flatten:
            z = g.op("Cast", [g.op("Flatten", [z], axis=1)], to=T.DOUBLE)
        logits = metric.onnx(g, z, bundle.memory, model=network,
                             module=lambda inp, m, prefix: _module(g, inp, m, bundle.params, prefix))
    ok_rows = g.op("Squeeze", [ok, g.const([1], "ax", np.int64)]) if not isinstance(pre, ImagePreprocessing) else ok
    g.output(ok_rows, "input_ok", T.BOOL, ["N"])
    if bundle.binary:
        assert bundle.threshold is not None
        n_out = logits
        if bundle.head == "logits" and int(bundle.model.kwargs.get("out_features", 2)) == 1:
            s = g.op("Squeeze", [n_out, g.const([1], "ax", np.int64)])
        else:
            pos = g.op("Gather", [n_out, g.const(1, "i1", np.int64)], axis=1)
            neg = g.op("Gather", [n_out, g.const(0, "i0", np.int64)], axis=1)
            s = g.op("Sub", [pos, neg])
        cal = bundle.calibration
        risk = g.op("Sigmoid", [g.op("Add", [g.const(cal.a), g.op("Mul", [g.const(cal.b), s])])])
        decision = g.op("Cast", [g.op("GreaterOrEqual", [risk, g.const(bundle.threshold.value)])], to=T.INT64)
        g.output(risk, "risk", T.DOUBLE, ["N"])
        g.output(decision, "decision", T.INT64, ["N"])
    else:
        g.output(g.op("Softmax", [logits], axis=1), "probabilities", T.DOUBLE, ["N", len(bundle.classes)])
        g.output(g.op("ArgMax", [logits], axis=1, keepdims=0), "decision", T.INT64, ["N"])
    meta = {
        "fedmeta_outcome": bundle.outcome, "fedmeta_classes": json.dumps(list(bundle.classes)),
        "fedmeta_site": bundle.provenance.site,
        "fedmeta_threshold": json.dumps(bundle.threshold.to_dict() if bundle.threshold else None),
        "fedmeta_calibration": json.dumps(bundle.calibration.to_dict()),
        "fedmeta_weights_sha256": bundle.document()["weights_sha256"],
    }
    return g.model(f"fedmeta site model: {bundle.outcome} at {bundle.provenance.site}", meta)


def export_onnx(bundle: SiteModelBundle, path: str | Path) -> Path:
    """Write ``bundle`` as an ONNX file at ``path``."""
    onnx = _onnx()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    onnx.save(build_onnx(bundle), str(tmp))
    tmp.replace(p)
    return p


def onnx_feed(bundle: SiteModelBundle, table: pd.DataFrame | np.ndarray, *, source: str = "table"
              ) -> dict[str, np.ndarray]:
    """The ONNX inputs for ``table`` (what stays outside the graph: module docstring)."""
    pre = bundle.preprocessing
    if isinstance(pre, ImagePreprocessing):
        raw = ImagePreprocessing(pre.channels, pre.height, pre.width)
        return {"images": raw.transform(np.asarray(table), source=source)}
    if not isinstance(table, pd.DataFrame):
        raise ExportError(f"{source}: a table model needs a pandas DataFrame")
    check_columns(table, pre.columns, source=source)
    feed: dict[str, np.ndarray] = {}
    if isinstance(pre, EhrPreprocessing):
        for f in pre.schema.numeric:
            feed[f.name] = pd.to_numeric(table[f.name], errors="coerce").to_numpy(np.float64)[:, None]
        for f in pre.schema.categorical:
            col = table[f.name]
            present = col.notna().to_numpy() & ~col.astype("string").str.strip().eq("").fillna(True).to_numpy(dtype=bool)
            vals = [s if ok else "" for s, ok in zip(_category_strings(col), present, strict=True)]
            feed[f.name] = np.array(vals, dtype=object)[:, None]
        return feed
    for c in ("age", "trestbps", "chol", "thalch", "oldpeak"):
        feed[c] = pd.to_numeric(table[c], errors="coerce").to_numpy(np.float64)[:, None]
    for c in ("sex", "cp", "restecg"):
        feed[c] = table[c].astype("string").str.strip().fillna("").to_numpy(dtype=object)[:, None]
    for c in ("fbs", "exang"):
        text = table[c].astype("string").str.strip().str.upper().fillna("")
        spelled = text.map(lambda v: "TRUE" if v in ("TRUE", "1", "1.0", "YES") else
                           ("FALSE" if v in ("FALSE", "0", "0.0", "NO") else v))
        feed[c] = spelled.to_numpy(dtype=object)[:, None]
    return feed


def run_onnx(path: str | Path, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an exported model with onnxruntime; outputs by name."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("running ONNX models needs onnxruntime: pip install 'fedmeta[onnx]'") from e
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feed)), strict=True))


def compare_with_pytorch(bundle: SiteModelBundle, path: str | Path, table: pd.DataFrame | np.ndarray,
                         *, source: str = "table") -> float:
    """Largest absolute difference between the ONNX model's risks (or probabilities) and the
    PyTorch bundle's on the same rows."""
    model = SiteModel(bundle)
    ref = model.risks(model.inputs(table, source=source))
    got = run_onnx(path, onnx_feed(bundle, table, source=source))
    onnx_out = got["risk"] if bundle.binary else got["probabilities"]
    return float(np.max(np.abs(np.asarray(onnx_out, dtype=np.float64) - ref))) if len(ref) else 0.0
