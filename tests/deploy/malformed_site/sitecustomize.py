"""Test fixture, not product code: turns one hospital into a faulty one.

Put on ``PYTHONPATH`` of one ``fedmeta site start`` only. In that process it wraps the
``train_update`` the installed ClientApp calls, so the delta the site sends holds a NaN, as a
buggy or hostile site would send. Every other process is left alone.
"""

import sys

if sys.argv[1:3] == ["site", "start"] or ("site" in sys.argv and "start" in sys.argv):
    import dataclasses

    import numpy as np

    from fedmeta.client import app

    _honest = app.train_update

    def _malformed(*args, **kwargs):  # type: ignore[no-untyped-def]
        update = _honest(*args, **kwargs)
        arrays = {k: np.array(v, copy=True) for k, v in update.arrays.items()}
        first = next(iter(arrays))
        arrays[first].reshape(-1)[0] = np.nan
        return dataclasses.replace(update, arrays=arrays)

    app.train_update = _malformed
