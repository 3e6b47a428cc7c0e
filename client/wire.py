"""Site side of the wire format: reading the coordinator's state, encoding the reply.

Top-k error feedback (the part of the update not sent yet) stays in the node's ``context.state``;
it never leaves the site.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedmeta.common.compression import checksum, decode, encode
from fedmeta.common.config import ExperimentConfig
from fedmeta.common.errors import DeltaError
from fedmeta.common.params import NDArrays
from fedmeta.protocol.records import arrays_from_record, record_from_arrays
from fedmeta.protocol.request import Downlink

_RESIDUAL = "fedmeta.topk-residual"
_HELD = "fedmeta.theta"


def receive_state(arrays: ArrayRecord, downlink: Downlink, context: Context) -> NDArrays:
    """The coordinator's state: sent in full, or as an encoded change to what this node holds
    (checked against the coordinator's checksum of it). Caches the result in the node's state."""
    incoming = arrays_from_record(arrays)
    if downlink.mode == "delta":
        if _HELD not in context.state.array_records:
            raise DeltaError("the coordinator sent a change but this node holds no θ; it will resend θ")
        held = arrays_from_record(context.state.array_records[_HELD])
        if checksum(held) != downlink.base:
            raise DeltaError("this node's cached θ differs from the coordinator's record; it will resend θ")
        change = decode(incoming, downlink.method, held, source="coordinator")
        state = {k: (held[k] + change[k]).astype(np.float32) for k in held}
    else:
        state = incoming
    context.state.array_records[_HELD] = record_from_arrays(state)
    return state


def encode_reply(update: NDArrays, cfg: ExperimentConfig, context: Context) -> tuple[ArrayRecord, ConfigRecord]:
    """Encode ``update`` with ``cfg.compression``; returns the arrays and the ``encoding`` record."""
    method = cfg.compression.method
    residual = None
    if method == "topk" and _RESIDUAL in context.state.array_records:
        residual = arrays_from_record(context.state.array_records[_RESIDUAL])
    encoded, new_residual = encode(update, method, topk_fraction=cfg.compression.topk_fraction, error=residual)
    if method == "topk":
        context.state.array_records[_RESIDUAL] = record_from_arrays(new_residual)
    return record_from_arrays(encoded), ConfigRecord({"method": method})
