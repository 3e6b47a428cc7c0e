"""Test fixture, not product code: turns one hospital into a faulty one.

Put on ``PYTHONPATH`` of a SuperNode only. In that SuperNode's ClientApp processes
(``flwr-clientapp``) it wraps the train_update its ClientApp calls so the delta it returns holds a
NaN, as a buggy or hostile site would send. Every other process is left alone.
"""

import os
import sys

if os.path.basename(sys.argv[0]) == "flwr-clientapp":
    import dataclasses

    import numpy as np

    from fedmeta.client import app as task

    _honest = task.train_update

    def _malformed(*args, **kwargs):  # type: ignore[no-untyped-def]
        update = _honest(*args, **kwargs)
        arrays = {k: np.array(v, copy=True) for k, v in update.arrays.items()}
        first = next(iter(arrays))
        arrays[first].reshape(-1)[0] = np.nan
        return dataclasses.replace(update, arrays=arrays)

    task.train_update = _malformed
