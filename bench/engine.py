"""``fedmeta bench engine``: speed and memory of the meta-learning engine against its per-task loop
and learn2learn, on two workloads, and the scaling with meta-batch and inner steps.

Workloads (random inputs; only shapes matter for speed):

- ``mlp``: MLP 13-64-64-2, 32 tasks of 10-shot support / 20-query, 5 inner steps;
- ``conv4``: Conv-4 (64 channels, plain-op batch norm) on 1x28x28, 5-way 5-shot with 15 queries
  per class, 8 tasks, 5 inner steps.

For every algorithm each implementation is timed in this one process: ``vmap`` and ``loop`` (the
engine's two paths, :mod:`fedmeta.common.meta.engine`), ``learn2learn`` (MAML, FOMAML and Meta-SGD,
clone/adapt per task, ``backward`` per task) when it can be imported, ``vmap+compile`` (the vmap path
``torch.compile``d; full run only, MLP MAML: compiling takes minutes) and ``auto+before`` (the
engine's own choice with the "before adaptation" query statistic switched on; MAML, full run only).
The other engine rows run with ``before_stats=False``, the same work as learn2learn's. ``auto``
marks the implementation the engine picks by itself.

A row's ``median_ms`` is the median wall time of one outer step (meta-gradient or delta for the
whole meta-batch; on CUDA after a synchronise) and ``cpu_ms`` the median CPU time of the process
over the same step (less disturbed by other jobs on a shared machine); ``peak_mb`` is the peak memory
of one more outer step above the level before it (full run only): on CUDA
``max_memory_allocated``, on the CPU the resident set size sampled every millisecond after
``malloc_trim`` (approximate). Implementations are timed round-robin, repetition by repetition, so
that load from other processes affects them alike; ``load_avg_1min`` is recorded per row.

torch runs with a fixed number of intra-op threads: ``run(threads=N)``, else the environment
variable ``FEDMETA_BENCH_THREADS``, else 1 (on a shared machine, torch's default of one thread per
core made steps 20–40x slower and the spread very wide). Rows are written to ``OUT/engine.json`` as
they are measured, so an interrupted run keeps what it measured; the first row
(``section: "environment"``) records torch's build, the device, the threads and learn2learn's version.

learn2learn 0.2.0's top-level package imports gym and torchvision, which must not be installed
here; if ``import learn2learn`` fails, only its ``algorithms.maml``/``meta_sgd`` modules are loaded.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmeta.common.meta.engine import choose_impl, resolve_device
from fedmeta.common.meta.maml import maml_step
from fedmeta.common.meta.matching import matching_step
from fedmeta.common.meta.metasgd import init_lrs, metasgd_step
from fedmeta.common.meta.protonet import protonet_step
from fedmeta.common.meta.relation import relation_step
from fedmeta.common.meta.reptile import reptile_step
from fedmeta.common.meta.types import InnerConfig, TaskBatch
from fedmeta.common.models import build_model, init_params

log = logging.getLogger(__name__)

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "protonet", "matching", "relation")
L2L_ALGORITHMS = {"maml": "MAML", "fomaml": "MAML", "metasgd": "MetaSGD"}


@dataclass(frozen=True)
class Workload:
    name: str
    meta_batch: int
    inner_steps: int
    n_way: int
    shots: int  # support examples per task
    queries: int  # query examples per task
    features: tuple[int, ...]

    def tasks(self, device: torch.device, generator: torch.Generator) -> TaskBatch:
        t, s, q = self.meta_batch, self.shots, self.queries
        ys = torch.arange(self.n_way).repeat_interleave(s // self.n_way).expand(t, -1).clone()
        yq = torch.arange(self.n_way).repeat_interleave(q // self.n_way).expand(t, -1).clone()
        batch = TaskBatch(
            torch.randn(t, s, *self.features, generator=generator), ys,
            torch.randn(t, q, *self.features, generator=generator), yq,
        )
        return batch.to(device)

    def model(self, algorithm: str) -> nn.Module:
        conv = self.name == "conv4"
        if algorithm == "relation":
            if conv:
                return build_model("relation-conv4", norm="batch")
            return build_model("relation-mlp", in_features=13, hidden=(64,), embed=64)
        head = None if algorithm in ("protonet", "matching") else self.n_way
        if conv:
            return build_model("conv4", hidden=64, out_features=head, norm="batch")
        return build_model("mlp", in_features=13, hidden=(64, 64), out_features=head)


MLP = Workload("mlp", meta_batch=32, inner_steps=5, n_way=2, shots=10, queries=20, features=(13,))
CONV4 = Workload("conv4", meta_batch=8, inner_steps=5, n_way=5, shots=25, queries=75, features=(1, 28, 28))


class _PeakMemory:
    """Peak memory above the starting level while the ``with`` block runs, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self._base = self._rss()
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(0, self._peak - self._base) / 2**20


def _learn2learn() -> Any | None:
    """``learn2learn.algorithms``' MAML and MetaSGD classes as a namespace, or None."""
    try:
        from learn2learn.algorithms import MAML, MetaSGD  # type: ignore[import-not-found]

        return types.SimpleNamespace(MAML=MAML, MetaSGD=MetaSGD)
    except ImportError as e:
        spec = importlib.util.find_spec("learn2learn")
        if spec is None or not spec.submodule_search_locations:
            return None
        log.info("import learn2learn failed (%s); loading only its algorithms modules", e)
    root = list(spec.submodule_search_locations)[0]
    saved = {k: sys.modules.get(k) for k in ("learn2learn", "learn2learn.algorithms")}
    try:
        for name, path in (("learn2learn", root), ("learn2learn.algorithms", os.path.join(root, "algorithms"))):
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
        maml = importlib.import_module("learn2learn.algorithms.maml")
        meta_sgd = importlib.import_module("learn2learn.algorithms.meta_sgd")
        return types.SimpleNamespace(MAML=maml.MAML, MetaSGD=meta_sgd.MetaSGD)
    except Exception as e:  # noqa: BLE001 - an optional comparison; report and go on without it
        log.warning("learn2learn could not be loaded, its rows are skipped: %s", e)
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _engine_step(
    algorithm: str, model: nn.Module, tasks: TaskBatch, inner: InnerConfig, n_way: int, impl: str
) -> Callable[[], object]:
    """One outer step of the engine; ``impl`` is ``vmap``, ``loop``, ``vmap+compile`` or ``X+before``
    (``X`` with the "before adaptation" statistic, which the other rows skip)."""
    params = init_params(model)
    base, _, extra = impl.partition("+")
    kw: dict[str, Any] = {"impl": base, "compile": extra == "compile", "before_stats": extra == "before"}
    if algorithm == "maml":
        return lambda: maml_step(model, params, tasks, inner, **kw)
    if algorithm == "fomaml":
        fo = replace(inner, first_order=True)
        return lambda: maml_step(model, params, tasks, fo, **kw)
    if algorithm == "reptile":
        return lambda: reptile_step(model, params, tasks, inner, **kw)
    if algorithm == "metasgd":
        lrs = init_lrs(params, inner.lr)
        return lambda: metasgd_step(model, params, lrs, tasks, inner, **kw)
    step = {"protonet": protonet_step, "matching": matching_step, "relation": relation_step}[algorithm]
    return lambda: step(model, params, tasks, n_way=n_way, **kw)


def _l2l_step(
    l2l: Any, algorithm: str, model: nn.Module, tasks: TaskBatch, inner: InnerConfig
) -> Callable[[], object]:
    """learn2learn's documented pattern: clone, adapt on support, query loss, backward per task."""
    first_order = algorithm == "fomaml"
    cls = getattr(l2l, L2L_ALGORITHMS[algorithm])
    learner = cls(model, lr=inner.lr, first_order=first_order)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        learner.zero_grad()
        for t in range(tasks.n_tasks):
            clone = learner.clone()
            for _ in range(inner.steps):
                clone.adapt(loss_fn(clone(tasks.xs[t]), tasks.ys[t]))
            (loss_fn(clone(tasks.xq[t]), tasks.yq[t]) / tasks.n_tasks).backward()

    return step


def _agreement_with_learn2learn(l2l: Any, device: torch.device) -> list[dict[str, object]]:
    """Max |difference| between this engine's and learn2learn's meta-gradients (float64, MLP
    workload, 8 tasks) for MAML, FOMAML and Meta-SGD: the speed rows compare equal work."""
    rows = []
    work = replace(MLP, meta_batch=8)
    for algorithm in L2L_ALGORITHMS:
        torch.manual_seed(0)
        model = work.model(algorithm).to(device=device, dtype=torch.float64)
        tasks = work.tasks(device, torch.Generator().manual_seed(0)).to(device, torch.float64)
        inner = InnerConfig(steps=work.inner_steps, lr=0.05, first_order=algorithm == "fomaml")
        params = init_params(model)
        if algorithm == "metasgd":
            ours, _, _ = metasgd_step(model, params, init_lrs(params, inner.lr), tasks, inner)
        else:
            ours, _ = maml_step(model, params, tasks, inner)
        _l2l_step(l2l, algorithm, model, tasks, inner)()
        theirs = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        if theirs.keys() != ours.keys():
            raise RuntimeError(f"{algorithm}: learn2learn left no gradient for {sorted(ours.keys() - theirs.keys())}")
        diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
        rows.append({"section": "agreement", "workload": work.name, "algorithm": algorithm,
                     "implementation": "engine vs learn2learn", "max_abs_diff": diff,
                     "device": _device_name(device)})
        log.info("%s: max |engine - learn2learn| meta-gradient = %.2e", algorithm, diff)
    return rows


def _release_free_memory() -> None:
    """Hand memory freed by earlier measurements back to the OS (glibc), so the next RSS peak
    is not hidden by reuse of pages already resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(
    workload: Workload,
    algorithm: str,
    impls: tuple[str, ...],
    device: torch.device,
    l2l: Any | None,
    *,
    reps: int,
    section: str,
    memory: bool,
) -> list[dict[str, object]]:
    """Time every implementation round-robin (so load changes hit all alike), then, with
    ``memory``, measure each one's peak memory in one more call of its own; one row per
    implementation. ``impls``: ``vmap``, ``loop``, ``learn2learn``, ``vmap+compile``, ``auto+before``."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = workload.model(algorithm).to(device)
    tasks = workload.tasks(device, gen)
    inner = InnerConfig(steps=workload.inner_steps, lr=0.05)
    second_order = algorithm in ("maml", "metasgd")
    auto = choose_impl(model, device, "auto", second_order=second_order, probe=tasks)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fns: dict[str, Callable[[], object]] = {}
    warm_s: dict[str, float] = {}
    for impl in impls:
        if impl == "auto+before":
            impl = f"{auto}+before"
        if impl == "learn2learn":
            if l2l is None or algorithm not in L2L_ALGORITHMS:
                continue
            fns[impl] = _l2l_step(l2l, algorithm, model, tasks, inner)
        else:
            fns[impl] = _engine_step(algorithm, model, tasks, inner, workload.n_way, impl)
        start = time.perf_counter()
        fns[impl]()  # warm-up (and compilation)
        sync()
        warm_s[impl] = time.perf_counter() - start
    wall: dict[str, list[float]] = {impl: [] for impl in fns}
    cpu: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(reps):
        for impl, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[impl].append((time.perf_counter() - start) * 1000)
            cpu[impl].append((time.process_time() - start_cpu) * 1000)
    rows = []
    for impl, fn in fns.items():
        peak: float | None = None
        if memory:
            _release_free_memory()
            with _PeakMemory(device) as mem:
                fn()
            peak = mem.peak_mb
        rows.append({
            "section": section,
            "workload": workload.name,
            "algorithm": algorithm,
            "implementation": impl,
            "auto": impl == auto,
            "median_ms": round(statistics.median(wall[impl]), 2),
            "cpu_ms": round(statistics.median(cpu[impl]), 2),
            "min_ms": round(min(wall[impl]), 2),
            "max_ms": round(max(wall[impl]), 2),
            "peak_mb": None if peak is None else round(peak, 1),
            "device": _device_name(device),
            "meta_batch": workload.meta_batch,
            "inner_steps": workload.inner_steps,
            "threads": torch.get_num_threads(),
            "reps": reps,
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "compile_s": round(warm_s[impl], 1) if impl.endswith("+compile") else None,
        })
        log.info("%s", rows[-1])
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _timing_rows(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in rows if "median_ms" in r]


def _table(rows: list[dict[str, object]]) -> list[str]:
    """The timing rows as a text table with speed-ups against learn2learn and the loop, from median
    wall times and from median CPU times."""
    rows = _timing_rows(rows)
    lines = [f"{'section':<8} {'workload':<7} {'algorithm':<9} {'T':>4} {'k':>3} {'implementation':<13} "
             f"{'median ms':>10} {'cpu ms':>9} {'peak MB':>8}  {'vs l2l':>11}  {'vs loop':>11}",
             f"{'':>80}{'wall   cpu':>11}  {'wall   cpu':>11}"]
    ref: dict[tuple[object, ...], dict[str, tuple[float, float]]] = {}

    def key(r: dict[str, object]) -> tuple[object, ...]:
        return (r["section"], r["workload"], r["algorithm"], r["meta_batch"], r["inner_steps"])

    def times(r: dict[str, object]) -> tuple[float, float]:
        return float(r["median_ms"]), float(r["cpu_ms"])  # type: ignore[arg-type]

    for r in rows:
        ref.setdefault(key(r), {})[str(r["implementation"])] = times(r)

    def ratio(other: tuple[float, float] | None, mine: tuple[float, float]) -> str:
        if other is None:
            return f"{'-':>11}"
        return f"{other[0] / mine[0]:>5.2f} {other[1] / mine[1]:>5.2f}"

    for r in rows:
        mine = times(r)
        impl = f"{r['implementation']}{'*' if r['auto'] else ''}"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(
            f"{r['section']:<8} {r['workload']:<7} {r['algorithm']:<9} {r['meta_batch']:>4} {r['inner_steps']:>3} "
            f"{impl:<13} {mine[0]:>10.1f} {mine[1]:>9.1f} {peak:>8}  "
            f"{ratio(ref[key(r)].get('learn2learn'), mine)}  {ratio(ref[key(r)].get('loop'), mine)}"
        )
    lines.append("* = the implementation the engine chooses with impl='auto'; vs X = X's time / this row's, "
                 "from median wall and median CPU times")
    return lines


THREADS_ENV = "FEDMETA_BENCH_THREADS"


def resolve_threads(threads: int | None = None) -> int:
    """The intra-op threads to run with: ``threads`` if given, else ``$FEDMETA_BENCH_THREADS``, else 1."""
    source = "threads"
    if threads is None:
        value = os.environ.get(THREADS_ENV)
        if value is None:
            return 1
        source = f"${THREADS_ENV}"
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"{source} = {value!r} is not a whole number of threads") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{source} = {threads!r}: the number of threads must be an integer >= 1")
    return threads


class RowWriter:
    """A list of rows, rewritten to ``path`` (JSON, atomically) each time one is appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, object]] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def extend(self, rows: list[dict[str, object]]) -> None:
        self.rows.extend(rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.rows, indent=2) + "\n")
        os.replace(tmp, self.path)


def _environment(device: torch.device, threads: int, quick: bool) -> dict[str, object]:
    try:
        l2l_version: str | None = importlib.metadata.version("learn2learn")
    except importlib.metadata.PackageNotFoundError:
        l2l_version = None
    return {
        "section": "environment",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": _device_name(device),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "learn2learn": l2l_version,
        "quick": quick,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(*, quick: bool, out_dir: Path, threads: int | None = None) -> list[dict[str, object]]:
    """Run the engine benchmark with ``threads`` intra-op threads (:func:`resolve_threads`); write
    its rows to ``out_dir/engine.json`` as they are measured, print its table and return the rows.

    ``quick`` (about a minute of CPU time): 3 repetitions (Conv-4: 2), no peak memory, no compiled,
    scaling or sine-regression rows, and Conv-4 at 2 tasks and 2 inner steps with MAML, FOMAML,
    Reptile and ProtoNet only (on the CPU without vmap, which the engine does not choose there); its figures are
    indicative only.
    """
    n_threads = resolve_threads(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        return _run(quick=quick, out_dir=out_dir, threads=n_threads)
    finally:
        torch.set_num_threads(previous)


def _run(*, quick: bool, out_dir: Path, threads: int) -> list[dict[str, object]]:
    started = time.perf_counter()
    device = resolve_device("auto")
    cuda = device.type == "cuda"
    l2l = _learn2learn()
    out = RowWriter(out_dir / "engine.json")
    out.extend([_environment(device, threads, quick)])
    log.info("engine benchmark on %s, learn2learn %s", _device_name(device), "found" if l2l else "not found")
    memory = not quick
    impls = ("vmap", "loop", "learn2learn")
    if quick:
        conv_impls = impls if cuda else ("loop", "learn2learn")
        for algorithm in ALGORITHMS:
            out.extend(measure(MLP, algorithm, impls, device, l2l, reps=3, section="main", memory=False))
        for algorithm in ("maml", "fomaml", "reptile", "protonet"):
            out.extend(measure(replace(CONV4, meta_batch=2, inner_steps=2), algorithm, conv_impls, device, l2l,
                                reps=2, section="main", memory=False))
    else:
        reps_mlp, reps_conv = 15, (7 if cuda else 5)
        for algorithm in ALGORITHMS:
            extra: tuple[str, ...] = ("auto+before", "vmap+compile") if algorithm == "maml" else ()
            out.extend(measure(MLP, algorithm, (*impls, *extra), device, l2l, reps=reps_mlp,
                                section="main", memory=memory))
        for algorithm in ALGORITHMS:
            extra = ("auto+before",) if algorithm == "maml" else ()
            # On the CPU vmapped Conv-4 is 2.6-3.8x slower than the loop (batched convolution
            # weights): timed apart, with fewer repetitions.
            main = impls if cuda else ("loop", "learn2learn")
            reps = reps_conv if cuda or algorithm != "maml" else 9  # the headline figure on the CPU
            out.extend(measure(CONV4, algorithm, (*main, *extra), device, l2l, reps=reps,
                                section="main", memory=memory))
            if not cuda and algorithm not in ("fomaml", "metasgd"):  # (they behave like maml)
                out.extend(measure(CONV4, algorithm, ("vmap",), device, l2l, reps=2,
                                    section="main", memory=memory))
        for t in (8, 32, 128):
            out.extend(measure(replace(MLP, meta_batch=t), "maml", impls, device, l2l, reps=reps_mlp,
                                section="scaling", memory=memory))
        for k in (1, 10):
            out.extend(measure(replace(MLP, inner_steps=k), "maml", impls, device, l2l, reps=reps_mlp,
                                section="scaling", memory=memory))
        # vmapped second-order Conv-4 on the CPU needs ~0.5 GB per task: loop and learn2learn there.
        conv_impls = impls if cuda else ("loop", "learn2learn")
        for t in (2, 32) if not cuda else (2, 32, 128):
            out.extend(measure(replace(CONV4, meta_batch=t), "maml", conv_impls, device, l2l,
                                reps=reps_conv if t <= 8 or cuda else 2, section="scaling", memory=memory))
        for k in (1, 10):
            out.extend(measure(replace(CONV4, inner_steps=k), "maml", conv_impls, device, l2l,
                                reps=reps_conv if cuda else 3, section="scaling", memory=memory))
    table = _table(out.rows)
    print("\n" + "\n".join(table))
    (out_dir / "engine.txt").write_text("\n".join(table) + "\n")
    if l2l is not None:
        agreement = _agreement_with_learn2learn(l2l, device)
        for r in agreement:
            print(f"agreement {r['algorithm']:<8} max |engine - learn2learn| meta-gradient: {r['max_abs_diff']:.1e}")
        out.extend(agreement)
    if not quick:  # a quality check (minutes of MAML training), not a speed figure
        from fedmeta.bench import sine

        out.extend([{"section": "sine", **r} for r in sine.run(quick=quick, out_dir=out_dir)])
    wall_s = time.perf_counter() - started
    out.extend([{"section": "done", "wall_s": round(wall_s, 1)}])
    print(f"engine benchmark: {wall_s:.0f} s, rows in {out.path}, table in {out_dir / 'engine.txt'}")
    return out.rows


def headline(out_dir: Path, *, reps: int = 15, threads: int | None = None) -> list[dict[str, object]]:
    """The two headline ratios alone, with more repetitions than the full run: second-order MAML on
    Conv-4 at 8 tasks (the engine's loop with and without the "before" statistic, learn2learn) and
    on the MLP at 32 tasks (vmap, loop, learn2learn), round-robin. Rows go to
    ``out_dir/headline.json`` as they are measured."""
    n_threads = resolve_threads(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        device = resolve_device("auto")
        l2l = _learn2learn()
        out = RowWriter(out_dir / "headline.json")
        out.extend([_environment(device, n_threads, quick=False)])
        out.extend(measure(CONV4, "maml", ("loop", "learn2learn", "auto+before"), device, l2l, reps=reps,
                           section="headline", memory=False))
        out.extend(measure(MLP, "maml", ("vmap", "loop", "learn2learn"), device, l2l, reps=reps,
                           section="headline", memory=False))
        table = _table(out.rows)
        print("\n" + "\n".join(table))
        (out_dir / "headline.txt").write_text("\n".join(table) + "\n")
        return out.rows
    finally:
        torch.set_num_threads(previous)

