"""Site side of the wire format: reading θ from the coordinator, encoding the reply.

Top-k error feedback (the part of the update not sent yet) stays in the node's ``context.state``;
it never leaves the site.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedmeta.common.compression import encode
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.params import NDArrays

_RESIDUAL = "fedmeta.topk-residual"


def arrays_from_record(record: ArrayRecord) -> NDArrays:
    return {k: a.numpy() for k, a in record.items()}


def encode_reply(update: NDArrays, cfg: ExperimentConfig, context: Context) -> tuple[ArrayRecord, ConfigRecord]:
    """Encode ``update`` with ``cfg.compression``; returns the arrays and the ``encoding`` record."""
    method = cfg.compression.method
    residual = None
    if method == "topk" and _RESIDUAL in context.state.array_records:
        residual = arrays_from_record(context.state.array_records[_RESIDUAL])
    encoded, new_residual = encode(update, method, topk_fraction=cfg.compression.topk_fraction, error=residual)
    if method == "topk":
        context.state.array_records[_RESIDUAL] = ArrayRecord(
            array_dict={k: Array(np.ascontiguousarray(v)) for k, v in new_residual.items()}
        )
    record = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in encoded.items()})
    return record, ConfigRecord({"method": method})
