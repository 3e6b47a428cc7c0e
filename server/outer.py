"""The server's outer optimiser: SGD (with momentum), Adam or Yogi applied to an aggregated direction.

Each algorithm gives a pseudo-gradient ``g``: the mean meta-gradient for MAML-family methods, and
``-Δ̄`` for Reptile and FedAvg, so that SGD with ``lr = β`` and no momentum is exactly
``θ ← θ + β Δ̄`` (Nichol et al. 2018; Reddi et al. 2021 for adaptive server optimisers).
State (momentum buffers, Adam/Yogi moments, step count) is returned as arrays for checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedmeta.common.config import OuterConfig
from fedmeta.common.params import NDArrays


class Yogi(torch.optim.Optimizer):
    """The Yogi server optimiser of FedYogi (Reddi et al. 2021, "Adaptive Federated
    Optimization", Algorithm 2; Zaheer et al. 2018 for Yogi itself).

    With pseudo-gradient ``g`` (``-Δ̄`` for delta updates), per coordinate and without bias
    correction, as in the paper::

        m ← β₁ m + (1 − β₁) g
        v ← v − (1 − β₂) g² sign(v − g²)
        θ ← θ − η m / (√v + τ)

    ``m₀ = 0`` and ``v₀ = τ²`` (the paper asks ``v₋₁ ≥ τ²``). Unlike Adam's ``v``, which moves
    toward ``g²`` multiplicatively, Yogi's changes by at most ``(1 − β₂) g²`` per step, so the
    effective step size grows slowly when gradients become small.
    """

    def __init__(self, params: list[torch.Tensor], *, lr: float, betas: tuple[float, float],
                 eps: float) -> None:
        if not lr > 0:
            raise ValueError(f"Yogi lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Yogi betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"Yogi eps (τ) must be > 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, tau = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, tau * tau)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                v.sub_((1 - beta2) * g2 * torch.sign(v - g2))
                p.sub_(lr * m / (v.sqrt() + tau))


class OuterOptimizer:
    """Holds θ as float32 tensors and steps them with ``torch.optim`` on a given pseudo-gradient."""

    def __init__(self, params: Mapping[str, np.ndarray], cfg: OuterConfig) -> None:
        self.names = list(params)
        self.tensors = {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in params.items()}
        plist = [self.tensors[k] for k in self.names]
        if cfg.optimizer == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(plist, lr=cfg.lr, momentum=cfg.momentum)
        elif cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(plist, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        elif cfg.optimizer == "yogi":
            self.opt = Yogi(plist, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        else:
            raise ValueError(f"outer.optimizer = {cfg.optimizer!r}: use sgd, adam or yogi")

    def params(self) -> NDArrays:
        return {k: self.tensors[k].detach().numpy().copy() for k in self.names}

    def step(self, pseudo_grad: Mapping[str, np.ndarray]) -> NDArrays:
        """One optimiser step with ``pseudo_grad`` as the gradient; returns the new θ."""
        for k in self.names:
            self.tensors[k].grad = torch.as_tensor(np.asarray(pseudo_grad[k]), dtype=torch.float32).clone()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.params()

    def state_arrays(self) -> NDArrays:
        """Optimiser state as flat arrays ``<param name>::<field>`` for a safetensors checkpoint."""
        out: NDArrays = {}
        for name in self.names:
            for field, value in self.opt.state.get(self.tensors[name], {}).items():
                out[f"{name}::{field}"] = np.asarray(torch.as_tensor(value).detach().numpy()).copy()
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_arrays` produced."""
        for key, value in arrays.items():
            name, sep, field = key.rpartition("::")
            if not sep or name not in self.tensors:
                raise KeyError(f"optimiser state {key!r} names no parameter of this model")
            self.opt.state[self.tensors[name]][field] = torch.as_tensor(np.asarray(value)).clone()
