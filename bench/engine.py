"""``fedmeta bench engine``: speed and memory of the meta-learning engine against a per-task loop
and learn2learn, on the two workloads of issue 3, and the scaling with meta-batch and inner steps.

Workloads (random inputs; only shapes matter for speed):

- ``mlp``: MLP 13-64-64-2, 32 tasks of 10-shot support / 20-query, 5 inner steps;
- ``conv4``: Conv-4 (64 channels, plain-op batch norm) on 1x28x28, 5-way 5-shot with 15 queries
  per class, 8 tasks, 5 inner steps.

For every algorithm each implementation is timed in this one process: ``vmap`` and ``loop`` (the
engine's two paths, :mod:`fedmeta.common.meta.engine`), and ``learn2learn`` (MAML, FOMAML and
Meta-SGD, clone/adapt per task, ``backward`` per task) when it can be imported. ``auto`` marks the
implementation the engine picks by itself. A row's ``median_ms`` is the median wall time of one
outer step (meta-gradient or delta for the whole meta-batch; on CUDA after a synchronise);
``peak_mb`` is the peak memory of one more outer step above the level before it: on CUDA
``max_memory_allocated``, on the CPU the resident set size sampled every millisecond after
``malloc_trim`` (approximate). Implementations are timed round-robin, repetition by repetition,
so that load from other processes affects them alike; ``load_avg_1min`` is recorded per row.
Engine rows include the query loss before adaptation (one extra query forward per task), which
the learn2learn rows do not compute.

learn2learn 0.2.0's top-level package imports gym and torchvision, which must not be installed
here; if ``import learn2learn`` fails, only its ``algorithms.maml``/``meta_sgd`` modules are loaded.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
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

logger = logging.getLogger(__name__)

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
        logger.info("import learn2learn failed (%s); loading only its algorithms modules", e)
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
        logger.warning("learn2learn could not be loaded, its rows are skipped: %s", e)
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
    params = init_params(model)
    if impl == "vmap+compile":
        if algorithm == "maml":
            return lambda: maml_step(model, params, tasks, inner, impl="vmap", compile=True)
        fo = replace(inner, first_order=True)
        return lambda: maml_step(model, params, tasks, fo, impl="vmap", compile=True)
    if algorithm == "maml":
        return lambda: maml_step(model, params, tasks, inner, impl=impl)
    if algorithm == "fomaml":
        fo = replace(inner, first_order=True)
        return lambda: maml_step(model, params, tasks, fo, impl=impl)
    if algorithm == "reptile":
        return lambda: reptile_step(model, params, tasks, inner, impl=impl)
    if algorithm == "metasgd":
        lrs = init_lrs(params, inner.lr)
        return lambda: metasgd_step(model, params, lrs, tasks, inner, impl=impl)
    step = {"protonet": protonet_step, "matching": matching_step, "relation": relation_step}[algorithm]
    return lambda: step(model, params, tasks, n_way=n_way, impl=impl)


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
        theirs = {k: p.grad for k, p in model.named_parameters()}
        diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
        rows.append({"section": "agreement", "workload": work.name, "algorithm": algorithm,
                     "implementation": "engine vs learn2learn", "max_abs_diff": diff,
                     "device": _device_name(device)})
        logger.info("%s: max |engine - learn2learn| meta-gradient = %.2e", algorithm, diff)
    return rows


def _release_free_memory() -> None:
    """Hand memory freed by earlier measurements back to the OS (glibc), so the next RSS peak
    is not hidden by reuse of pages already resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure(
    workload: Workload,
    algorithm: str,
    impls: tuple[str, ...],
    device: torch.device,
    l2l: Any | None,
    *,
    reps: int,
    section: str,
) -> list[dict[str, object]]:
    """Time every implementation round-robin (so load changes hit all alike), then measure each
    one's peak memory in one more call of its own."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = workload.model(algorithm).to(device)
    tasks = workload.tasks(device, gen)
    inner = InnerConfig(steps=workload.inner_steps, lr=0.05)
    auto = choose_impl(model, device, "auto")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fns: dict[str, Callable[[], object]] = {}
    compile_s: dict[str, float] = {}
    for impl in impls:
        if impl == "vmap+compile" and algorithm not in ("maml", "fomaml"):
            continue
        if impl == "learn2learn":
            if l2l is None or algorithm not in L2L_ALGORITHMS:
                continue
            fns[impl] = _l2l_step(l2l, algorithm, model, tasks, inner)
        else:
            fns[impl] = _engine_step(algorithm, model, tasks, inner, workload.n_way, impl)
        start = time.perf_counter()
        fns[impl]()  # warm-up (and compilation)
        sync()
        compile_s[impl] = time.perf_counter() - start
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(reps):
        for impl, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[impl].append((time.perf_counter() - start) * 1000)
    rows = []
    for impl, fn in fns.items():
        _release_free_memory()
        with _PeakMemory(device) as mem:
            fn()
        row = {
            "section": section,
            "workload": workload.name,
            "algorithm": algorithm,
            "implementation": impl,
            "auto": impl == auto,
            "median_ms": round(statistics.median(times[impl]), 2),
            "peak_mb": None if mem.peak_mb is None else round(mem.peak_mb, 1),
            "device": _device_name(device),
            "meta_batch": workload.meta_batch,
            "inner_steps": workload.inner_steps,
            "threads": torch.get_num_threads(),
            "reps": reps,
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "compile_s": round(compile_s[impl], 1) if impl == "vmap+compile" else None,
        }
        logger.info("%s", row)
        rows.append(row)
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _print_table(rows: list[dict[str, object]]) -> None:
    print(f"\n{'section':<8} {'workload':<7} {'algorithm':<9} {'T':>4} {'k':>3} {'implementation':<12} "
          f"{'median ms':>10} {'peak MB':>9}  vs l2l  vs loop")
    ref: dict[tuple[object, ...], dict[str, float]] = {}
    for r in rows:
        key = (r["section"], r["workload"], r["algorithm"], r["meta_batch"], r["inner_steps"])
        ref.setdefault(key, {})[str(r["implementation"])] = float(r["median_ms"])  # type: ignore[arg-type]
    for r in rows:
        key = (r["section"], r["workload"], r["algorithm"], r["meta_batch"], r["inner_steps"])
        ms = float(r["median_ms"])  # type: ignore[arg-type]
        l2l = ref[key].get("learn2learn")
        loop = ref[key].get("loop")
        impl = f"{r['implementation']}{'*' if r['auto'] else ''}"
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(
            f"{r['section']:<8} {r['workload']:<7} {r['algorithm']:<9} {r['meta_batch']:>4} {r['inner_steps']:>3} "
            f"{impl:<12} {ms:>10.1f} {peak:>9}  {f'{l2l / ms:.1f}x' if l2l else '-':>6}  "
            f"{f'{loop / ms:.1f}x' if loop else '-':>6}"
        )
    print("* = the implementation the engine chooses with impl='auto'")


def run(*, quick: bool, out_dir: Path) -> list[dict[str, object]]:
    """Run the engine benchmark; return (and print) its rows. ``quick``: fewer repetitions and
    no Conv-4 scaling on the CPU."""
    device = resolve_device("auto")
    cuda = device.type == "cuda"
    l2l = _learn2learn()
    logger.info("engine benchmark on %s, learn2learn %s", _device_name(device), "found" if l2l else "not found")
    impls = ("vmap", "loop", "learn2learn")
    reps_mlp = 5 if quick else 15
    reps_conv = 2 if quick and not cuda else 5
    rows: list[dict[str, object]] = []
    mlp_impls = impls if quick else (*impls, "vmap+compile")
    for algorithm in ALGORITHMS:
        rows += _measure(MLP, algorithm, mlp_impls, device, l2l, reps=reps_mlp, section="main")
    for algorithm in ALGORITHMS:
        rows += _measure(CONV4, algorithm, impls, device, l2l, reps=reps_conv, section="main")

    for t in (8, 32, 128):
        rows += _measure(replace(MLP, meta_batch=t), "maml", impls, device, l2l, reps=reps_mlp, section="scaling")
    for k in (1, 10):
        rows += _measure(replace(MLP, inner_steps=k), "maml", impls, device, l2l, reps=reps_mlp, section="scaling")
    if cuda:
        for t in (8, 32, 128):
            rows += _measure(replace(CONV4, meta_batch=t), "maml", impls, device, l2l, reps=reps_conv, section="scaling")
        for k in (1, 10):
            rows += _measure(replace(CONV4, inner_steps=k), "maml", impls, device, l2l, reps=reps_conv, section="scaling")
    elif not quick:
        # vmapped second-order Conv-4 on the CPU needs ~0.5 GB per task (FACTS.md): loop and l2l only.
        for t in (32,):
            rows += _measure(replace(CONV4, meta_batch=t), "maml", ("loop", "learn2learn"), device, l2l, reps=3, section="scaling")
        for k in (1, 10):
            rows += _measure(replace(CONV4, inner_steps=k), "maml", ("loop", "learn2learn"), device, l2l, reps=3, section="scaling")
    _print_table(rows)
    if l2l is not None:
        agreement = _agreement_with_learn2learn(l2l, device)
        for r in agreement:
            print(f"agreement {r['algorithm']:<8} max |engine - learn2learn| meta-gradient: {r['max_abs_diff']:.1e}")
        rows += agreement
    from fedmeta.bench import sine

    rows += sine.run(quick=quick, out_dir=out_dir)
    return rows
