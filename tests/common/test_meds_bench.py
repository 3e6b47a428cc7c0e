"""``fedmeta bench meds --quick``: well-formed rows, table and plot (not the figures themselves)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedmeta.bench import meds as bench


def test_quick_benchmark_rows_table_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "meds_tab_bin", lambda: None)  # the row must say why it is missing
    rows = bench.run(quick=True, out_dir=tmp_path)
    json.dumps(rows, allow_nan=False)
    by = {(r["method"], r["metric"]): r for r in rows}
    for workers in ("1 process", "2 processes"):
        method = f"fedmeta tabularise ({workers})"
        rate = by[(method, "events_per_s")]
        assert rate["benchmark"] == "meds" and rate["site"] == "synthetic-1000"
        assert rate["n_events"] > 400_000 and rate["n_samples"] == 1000
        for metric in ("events_per_s", "events_per_s_per_core", "events_per_cpu_s", "wall_s", "peak_rss_mb"):
            v = by[(method, metric)]["value"]
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (method, metric)
    assert by[("fedmeta tabularise (2 processes)", "events_per_s_per_core")]["value"] == pytest.approx(
        by[("fedmeta tabularise (2 processes)", "events_per_s")]["value"] / 2
    )
    missing = by[("meds-tab", "events_per_s")]
    assert missing["value"] is None and "meds-tab not found" in missing["note"]
    assert "| fedmeta tabularise (1 process) | synthetic-1000 |" in (tmp_path / "meds.md").read_text()
    assert (tmp_path / "meds_events_per_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
