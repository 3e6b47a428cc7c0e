"""``fedmeta bench engine``'s mechanics (not its figures): threads fixed and recorded, rows saved as
they are measured, learn2learn optional. The workloads are shrunk so that a run takes seconds."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedmeta.bench import engine as bench
from fedmeta.bench import sine


@pytest.fixture(autouse=True)
def _tiny_workloads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(bench, "MLP", replace(bench.MLP, meta_batch=2, inner_steps=1, shots=4, queries=4))
    # Conv-4 is built for 28x28 inputs; on 16x16 ones its four pools also end at 1x1.
    monkeypatch.setattr(bench, "CONV4", replace(bench.CONV4, meta_batch=1, inner_steps=1, shots=5, queries=5,
                                                features=(1, 16, 16)))
    monkeypatch.setattr(bench, "ALGORITHMS", ("maml", "reptile", "protonet"))
    monkeypatch.setattr(sine, "run", lambda *, quick, out_dir: [{"workload": "sine-10shot", "init": "stub"}])
    monkeypatch.delenv(bench.THREADS_ENV, raising=False)
    yield


def test_threads_come_from_the_argument_then_the_environment_then_default_to_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert bench.resolve_threads() == 1
    monkeypatch.setenv(bench.THREADS_ENV, "3")
    assert bench.resolve_threads() == 3
    assert bench.resolve_threads(2) == 2
    monkeypatch.setenv(bench.THREADS_ENV, "two")
    with pytest.raises(ValueError, match=r"\$FEDMETA_BENCH_THREADS = 'two' is not a whole number"):
        bench.resolve_threads()
    monkeypatch.setenv(bench.THREADS_ENV, "0")
    with pytest.raises(ValueError, match=r"\$FEDMETA_BENCH_THREADS = 0: the number of threads must be an integer >= 1"):
        bench.resolve_threads()
    with pytest.raises(ValueError, match="threads = -1: the number of threads must be"):
        bench.resolve_threads(-1)


@pytest.mark.parametrize("with_l2l", [False, True])
def test_quick_run_saves_rows_as_it_goes_with_fixed_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_l2l: bool
) -> None:
    if not with_l2l:
        monkeypatch.setattr(bench, "_learn2learn", lambda: None)
    elif bench._learn2learn() is None:
        pytest.skip("learn2learn is not installed (see README: comparing with learn2learn)")
    saved_before_each: list[int] = []
    threads_seen: list[int] = []
    measure = bench.measure

    def spy(*args: object, **kwargs: object) -> list[dict[str, object]]:
        path = tmp_path / "engine.json"
        saved_before_each.append(len(json.loads(path.read_text())) if path.exists() else 0)
        threads_seen.append(torch.get_num_threads())
        return measure(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bench, "measure", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = bench.run(quick=True, out_dir=tmp_path, threads=1)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(previous)

    assert saved_before_each[0] == 1  # the environment row
    assert saved_before_each == sorted(saved_before_each) and saved_before_each[-1] > saved_before_each[0]
    assert set(threads_seen) == {1}
    assert json.loads((tmp_path / "engine.json").read_text()) == rows
    assert "conv4   maml" in (tmp_path / "engine.txt").read_text()
    env = rows[0]
    assert env["section"] == "environment" and env["threads"] == 1 and env["torch"] == torch.__version__
    assert rows[-1]["section"] == "done" and float(rows[-1]["wall_s"]) > 0  # type: ignore[arg-type]
    assert not any(r["section"] == "sine" for r in rows)  # quick: no sine regression

    timing = [r for r in rows if r["section"] == "main"]
    implementations = {(r["workload"], r["algorithm"], r["implementation"]) for r in timing}
    assert ("mlp", "maml", "vmap") in implementations and ("conv4", "maml", "loop") in implementations
    assert (("mlp", "maml", "learn2learn") in implementations) == with_l2l
    assert (any(r["section"] == "agreement" for r in rows)) == with_l2l
    for r in timing:
        assert r["threads"] == 1
        assert math.isfinite(float(r["median_ms"])) and float(r["median_ms"]) > 0  # type: ignore[arg-type]
        assert r["peak_mb"] is None  # quick: no memory measurement
    assert sum(bool(r["auto"]) for r in timing if (r["workload"], r["algorithm"]) == ("conv4", "maml")) == 1
    for r in rows:
        if r["section"] == "agreement":
            assert float(r["max_abs_diff"]) < 1e-10  # type: ignore[arg-type]


def test_headline_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_learn2learn", lambda: None)
    rows = bench.headline(tmp_path, reps=1, threads=1)
    assert json.loads((tmp_path / "headline.json").read_text()) == rows
    got = [(r["workload"], r["implementation"]) for r in rows if r["section"] == "headline"]
    assert got == [("conv4", "loop"), ("conv4", "loop+before"), ("mlp", "vmap"), ("mlp", "loop")]
