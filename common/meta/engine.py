"""Execution choices for the meta-learning algorithms: device, batched (vmap) or per-task loop, compile.

Every algorithm in :mod:`fedmeta.common.meta` has two implementations that compute the same numbers:

- ``"vmap"``: one call of ``torch.func.vmap`` over the tasks of a meta-batch, each task's inner loop
  written with ``torch.func.functional_call`` and ``torch.func.grad``;
- ``"loop"``: a plain Python loop over tasks using ``torch.autograd.grad``; the outer gradient is
  accumulated task by task, so only one task's graph is alive at a time.

:func:`choose_impl` picks one per model and device (rule below); a config can force either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import nn

logger = logging.getLogger(__name__)

Impl = Literal["vmap", "loop"]
IMPLS = ("auto", "vmap", "loop")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Native norm kernels whose second-order gradients under vmap are wrong in torch 2.13 (FACTS.md).
_UNSAFE_UNDER_VMAP = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
)

F = TypeVar("F", bound=Callable[..., object])


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


def choose_impl(
    model: nn.Module, device: torch.device | str, requested: str = "auto"
) -> Impl:
    """The implementation to run ``model``'s meta-batches with on ``device``.

    Rule for ``"auto"`` (from the measurements in FACTS.md and ``fedmeta bench engine``):

    - a model with a native ``BatchNorm``/``InstanceNorm``/``LayerNorm`` -> ``"loop"`` (its
      second-order gradients under vmap are wrong; use ``norm="batch"``, a plain-op batch norm);
    - a convolutional model on the CPU -> ``"loop"`` (batched convolution weights make vmap
      2.6–3.8x slower on CPU);
    - anything else, including convolutions on CUDA -> ``"vmap"`` (one batched kernel per layer
      instead of ``T`` small ones).

    ``"vmap"`` or ``"loop"`` force the choice; forcing ``"vmap"`` on a model with a native norm
    layer is refused because its meta-gradients would be silently wrong.
    """
    device = torch.device(device)
    unsafe = [type(m).__name__ for m in model.modules() if isinstance(m, _UNSAFE_UNDER_VMAP)]
    if requested == "loop":
        return "loop"
    if requested == "vmap":
        if unsafe:
            raise ValueError(
                f"impl='vmap' refused: the model has native {sorted(set(unsafe))} layers, whose "
                "second-order gradients under torch.func.vmap are wrong; use impl='loop' or a "
                "plain-op norm (build_model('conv4', norm='batch'))"
            )
        return "vmap"
    if requested != "auto":
        raise ValueError(f"unknown impl {requested!r}; choose one of {IMPLS}")
    if unsafe:
        return "loop"
    has_conv = any(isinstance(m, _CONV) for m in model.modules())
    if has_conv and device.type == "cpu":
        return "loop"
    return "vmap"


def params_device(params: dict[str, torch.Tensor]) -> torch.device:
    """The one device every tensor of ``params`` lives on (``ValueError`` if they are split)."""
    devices = {t.device for t in params.values()}
    if len(devices) != 1:
        raise ValueError(
            f"params must all be on one device, found {sorted(str(d) for d in devices) or 'none'}"
        )
    return devices.pop()


def maybe_compile(fn: F, *, enabled: bool = False) -> F:
    """``torch.compile(fn)`` when ``enabled``, else ``fn`` unchanged.

    Off by default: compiling takes 25–35 s cold for an MLP meta-step and minutes for Conv-4, and
    recompiles for every new meta-batch shape; it pays off only for long runs of one shape
    (FACTS.md: 4x faster than plain vmap on the MLP workload).
    """
    if not enabled:
        return fn
    logger.info("compiling %s with torch.compile", getattr(fn, "__name__", fn))
    return torch.compile(fn)  # type: ignore[return-value]
