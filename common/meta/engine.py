"""Execution choices for the meta-learning algorithms: device, batched (vmap) or per-task loop, compile.

Every algorithm in :mod:`fedmeta.common.meta` has two implementations that compute the same numbers:

- ``"vmap"``: one call of ``torch.func.vmap`` over the tasks of a meta-batch, each task's inner loop
  written with ``torch.func.functional_call`` and ``torch.func.grad``;
- ``"loop"``: a plain Python loop over tasks using ``torch.autograd.grad``; the outer gradient is
  accumulated task by task, so only one task's graph is alive at a time.

:func:`choose_impl` picks one per model and device (rule in its docstring); a config can force
either. The choice is never allowed to be silently wrong: second-order meta-gradients through
native normalisation kernels (``nn.BatchNorm*``, ``nn.InstanceNorm*``, ``nn.LayerNorm``, and the
functional ``F.layer_norm`` / ``F.batch_norm(training=True)`` a custom module may call) come out
wrong under ``torch.func.vmap`` in torch 2.13, by a few percent and with no error. A model made only
of module types known to be right (:data:`SAFE_MODULE_TYPES`) runs vmapped at once; any other
model is checked once per (model class, device) by :func:`vmap_matches_loop`, which compares the
two implementations on a tiny float64 problem, and runs the loop when they differ.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from fedmeta.common.meta.inner import (
    adapt_autograd,
    adapt_functional,
    batched_buffers,
    buffer_copies,
    forward,
    task_loss,
)
from fedmeta.common.meta.types import InnerConfig, TaskBatch
from fedmeta.common.models import MLP, BatchStatNorm2d, Conv4, LogisticRegression, RelationNet

log = logging.getLogger(__name__)

Impl = Literal["vmap", "loop"]
IMPLS = ("auto", "vmap", "loop")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Native norm kernels whose second-order gradients under vmap are wrong in torch 2.13.
_NATIVE_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
)

#: Module types whose forward is known to give the same second-order meta-gradients under vmap as
#: in the per-task loop (each one is checked by ``tests/common/test_engine_safety.py``). A model
#: runs vmapped without the check only if *every* one of its modules has exactly one of these
#: types: a subclass may override ``forward`` and is checked like any other module.
SAFE_MODULE_TYPES: frozenset[type[nn.Module]] = frozenset(
    {
        MLP,
        LogisticRegression,
        Conv4,
        RelationNet,
        BatchStatNorm2d,
        nn.Sequential,
        nn.ModuleList,
        nn.ModuleDict,
        nn.Identity,
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ReLU,
        nn.LeakyReLU,
        nn.ELU,
        nn.GELU,
        nn.SiLU,
        nn.Tanh,
        nn.Sigmoid,
        nn.Softplus,
        nn.Flatten,
        nn.Unflatten,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.Dropout,
        nn.GroupNorm,
        nn.RMSNorm,
    }
)

#: Verdicts of :func:`vmap_matches_loop`, per (model class, device): ``"vmap"`` or ``"loop"``.
_VERDICTS: dict[tuple[type[nn.Module], torch.device], Impl] = {}

# Settings of the check: a few examples of two tasks, two inner steps, float64.
_CHECK_TASKS, _CHECK_EXAMPLES = 2, 4
_CHECK_INNER = InnerConfig(steps=2, lr=0.1)
_CHECK_RTOL = 1e-6  # float64 paths that agree do so to ~1e-15; the vmap error is 1e-2 or more


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the current CUDA device when one is available, else the CPU; otherwise
    ``requested`` itself (``"cpu"``, ``"cuda"``, ``"cuda:1"``), checked to exist."""
    if isinstance(requested, torch.device):
        device = requested
    elif requested == "auto":
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise ValueError(f"unknown device {requested!r}; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(requested)!r} requested but CUDA is not available here")
    return device


def is_known_safe(model: nn.Module) -> bool:
    """Every module of ``model`` has exactly one of the :data:`SAFE_MODULE_TYPES`."""
    return all(type(m) in SAFE_MODULE_TYPES for m in model.modules())


def choose_impl(
    model: nn.Module,
    device: torch.device | str,
    requested: str = "auto",
    *,
    second_order: bool = True,
    probe: TaskBatch | None = None,
    loss: str = "cross_entropy",
) -> Impl:
    """The implementation to run ``model``'s meta-batches with on ``device``.

    ``second_order``: whether the caller differentiates through the inner loop (MAML, Meta-SGD);
    Reptile, first-order MAML, the metric learners and evaluation pass ``False``, and the vmap
    errors above do not affect them. ``probe``: a meta-batch of the caller's shapes, used (a few
    examples of it, in float64) if ``model`` has to be checked; ``loss`` its loss.

    Rule for ``"auto"``:

    - second order and a native ``BatchNorm``/``InstanceNorm``/``LayerNorm`` -> ``"loop"`` (known
      wrong under vmap; ``build_model('conv4', norm='batch')`` is a plain-op batch norm that is not);
    - a convolutional model on the CPU -> ``"loop"`` (batched convolution weights make vmap
      2.6–3.8x slower on CPU);
    - first order, or every module of a known-safe type -> ``"vmap"``;
    - otherwise (second order, a module of another type) the verdict of :func:`vmap_matches_loop`
      for this model class and device, computed on the first call with a ``probe`` and cached;
      without a ``probe`` and no verdict yet -> ``"loop"``.

    ``"vmap"`` or ``"loop"`` force the choice; forcing ``"vmap"`` at second order is refused
    (``ValueError``) for a model with a native norm layer or one whose check failed, since its
    meta-gradients would be silently wrong. Neither ``model`` nor the random number generators are
    changed.
    """
    if requested not in IMPLS:
        raise ValueError(f"unknown impl {requested!r}; choose one of {IMPLS}")
    device = _canonical(torch.device(device))
    if requested == "loop":
        return "loop"
    native = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _NATIVE_NORMS)})
    if requested == "vmap":
        if second_order and native:
            raise ValueError(
                f"impl='vmap' refused: the model has native {native} layers, whose "
                "second-order gradients under torch.func.vmap are wrong; use impl='loop' or a "
                "plain-op norm (build_model('conv4', norm='batch'))"
            )
        if second_order and not is_known_safe(model) and _verdict(model, device, probe, loss) == "loop":
            raise ValueError(
                f"impl='vmap' refused: {type(model).__name__}'s second-order meta-gradients under "
                f"torch.func.vmap differ from the per-task loop's on {device} (see the log); use "
                "impl='loop' or impl='auto'"
            )
        return "vmap"
    if second_order and native:
        return "loop"
    if device.type == "cpu" and any(isinstance(m, _CONV) for m in model.modules()):
        return "loop"
    if not second_order or is_known_safe(model):
        return "vmap"
    return _verdict(model, device, probe, loss) or "loop"


def _canonical(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _verdict(model: nn.Module, device: torch.device, probe: TaskBatch | None, loss: str) -> Impl | None:
    key = (type(model), device)
    if key not in _VERDICTS:
        if probe is None:
            log.info(
                "%s is not known to be right under vmap and no meta-batch was given to check it "
                "with; using the per-task loop", type(model).__name__,
            )
            return None
        agrees, detail = vmap_matches_loop(model, probe, device=device, loss=loss)
        _VERDICTS[key] = "vmap" if agrees else "loop"
        if agrees:
            log.info("%s on %s: vmap and the per-task loop agree (%s); using vmap",
                        type(model).__name__, device, detail)
        else:
            log.warning("%s on %s: %s; using the per-task loop", type(model).__name__, device, detail)
    return _VERDICTS[key]


def forget_verdicts() -> None:
    """Clear the cached results of :func:`vmap_matches_loop` (for tests)."""
    _VERDICTS.clear()


def vmap_matches_loop(
    model: nn.Module, probe: TaskBatch, *, device: torch.device | str, loss: str = "cross_entropy"
) -> tuple[bool, str]:
    """Whether vmap and the per-task loop give the same second-order MAML meta-gradient for
    ``model``, and a one-line explanation.

    On a float64 copy of ``model`` (``model`` itself is not touched), with its parameters moved by
    a seeded random perturbation (10 % of each tensor's spread, so that no symmetry such as a norm
    weight of exactly 1 hides a difference), on the first ``2`` tasks and ``4`` support and query
    examples of ``probe``, ``2`` inner steps: both implementations compute
    ``∇_θ (1/T) Σ_t L(φ_t(θ); query_t)`` as :func:`fedmeta.common.meta.maml.maml_step` does, and
    must agree to ``1e-6`` relative (float64 implementations that are right agree to ~1e-15). If
    vmap raises, they do not agree; if the model's forward is random (two loop runs differ), it
    cannot be checked and counts as not agreeing. The global random state is saved and restored.
    """
    device = _canonical(torch.device(device))
    n_t, n_e = min(_CHECK_TASKS, probe.n_tasks), _CHECK_EXAMPLES
    tiny = TaskBatch(probe.xs[:n_t, :n_e], probe.ys[:n_t, :n_e], probe.xq[:n_t, :n_e], probe.yq[:n_t, :n_e])
    tiny = tiny.to(device, torch.float64)
    fork = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        try:
            copy64 = copy.deepcopy(model).to(device=device, dtype=torch.float64)
        except Exception as e:  # noqa: BLE001 - any failure means "cannot check", reported
            return False, f"could not copy the model to check vmap ({type(e).__name__}: {e})"
        gen = torch.Generator(device=device).manual_seed(0)
        theta = {}
        for k, param in copy64.named_parameters():
            value = param.detach()
            spread = float(value.std()) if value.numel() > 1 else 0.0
            noise = torch.randn(value.shape, generator=gen, device=device, dtype=value.dtype)
            theta[k] = value + 0.1 * (spread if spread > 0 else 1.0) * noise
        try:
            loop = _check_gradient(copy64, theta, tiny, loss, "loop")
        except Exception as e:  # noqa: BLE001
            return False, f"the per-task loop failed on the check problem ({type(e).__name__}: {e})"
        try:
            batched = _check_gradient(copy64, theta, tiny, loss, "vmap")
        except Exception as e:  # noqa: BLE001
            return False, f"vmap failed ({type(e).__name__}: {e})"
        diff = _relative_difference(batched, loop)
        if diff <= _CHECK_RTOL:
            return True, f"relative difference {diff:.1e}"
        if _relative_difference(_check_gradient(copy64, theta, tiny, loss, "loop"), loop) > _CHECK_RTOL:
            return False, "the forward pass is random (two loop runs differ), so vmap cannot be checked"
        return False, (
            f"second-order meta-gradients by vmap differ from the per-task loop's by {diff:.1e} "
            "relative (a native or functional norm kernel, such as F.layer_norm or "
            "F.batch_norm(training=True), is wrong under vmap at second order)"
        )


def _check_gradient(
    model: nn.Module, theta: dict[str, torch.Tensor], tasks: TaskBatch, loss: str, impl: Impl
) -> list[torch.Tensor]:
    """Second-order MAML meta-gradient of the summed query loss, by ``impl``."""
    leaves = {k: v.detach().requires_grad_() for k, v in theta.items()}
    buffers = buffer_copies(model, tasks.xs.device)
    with torch.enable_grad():
        if impl == "vmap":
            bufs = batched_buffers(buffers, tasks.n_tasks)

            def one_task(
                b: dict[str, torch.Tensor] | None,
                xs: torch.Tensor,
                ys: torch.Tensor,
                xq: torch.Tensor,
                yq: torch.Tensor,
            ) -> torch.Tensor:
                phi = adapt_functional(model, leaves, xs, ys, _CHECK_INNER, loss=loss, buffers=b)
                return task_loss(forward(model, phi, xq, b), yq, loss, reduction="sum")

            in_dims = (0 if bufs is not None else None, 0, 0, 0, 0)
            total = torch.func.vmap(one_task, in_dims=in_dims, randomness="different")(
                bufs, tasks.xs, tasks.ys, tasks.xq, tasks.yq
            ).sum()
        else:
            total = torch.zeros((), dtype=tasks.xs.dtype, device=tasks.xs.device)
            for t in range(tasks.n_tasks):
                phi = adapt_autograd(
                    model, leaves, tasks.xs[t], tasks.ys[t], _CHECK_INNER, loss=loss,
                    create_graph=True, buffers=buffers,
                )
                total = total + task_loss(forward(model, phi, tasks.xq[t], buffers), tasks.yq[t], loss, reduction="sum")
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return [g.detach() for g in grads]


def _relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float((y**2).sum()) for y in b) ** 0.5
    if num != num or den != den:  # NaN
        return float("inf")
    return num / den if den > 0 else num


def params_device(params: dict[str, torch.Tensor]) -> torch.device:
    """The one device every tensor of ``params`` lives on (``ValueError`` if they are split)."""
    devices = {t.device for t in params.values()}
    if len(devices) != 1:
        raise ValueError(
            f"params must all be on one device, found {sorted(str(d) for d in devices) or 'none'}"
        )
    return devices.pop()


#: The ``torch.compile`` backend of :func:`compiled` (the tests use ``"aot_eager"``, which traces the
#: same graphs in seconds instead of minutes but generates no code).
COMPILE_BACKEND = "inductor"

# torch.compile'd functions per model (weakly held) and settings; see :func:`compiled`.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], Callable[..., Any]]] = (
    weakref.WeakKeyDictionary()
)


def compile_applies(model: nn.Module, impl: Impl, buffers: dict[str, torch.Tensor] | None) -> bool:
    """Whether ``compile=True`` applies: to the vmap implementation of a model without buffers
    (False, with a log line, otherwise: the per-task loop runs uncompiled)."""
    if impl == "vmap" and buffers is None:
        return True
    log.info(
        "compile=True ignored for %s: it applies to the vmap implementation of a model without "
        "buffers (here impl=%r, buffers: %s)", type(model).__name__, impl, sorted(buffers) if buffers else "none",
    )
    return False


def compiled(model: nn.Module, key: tuple[object, ...], build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """``torch.compile(build())``, built on the first call per ``model`` and ``key`` and reused.

    Compiling takes tens of seconds cold for an MLP meta-step and minutes for Conv-4, and
    recompiles for every new meta-batch shape: it pays off only for long runs of one shape.
    """
    cache = _COMPILED.setdefault(model, {})
    if key not in cache:
        log.info("compiling %s for %s (backend %s)", key[0], type(model).__name__, COMPILE_BACKEND)
        cache[key] = torch.compile(build(), backend=COMPILE_BACKEND)
    return cache[key]
