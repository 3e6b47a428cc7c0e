"""The server's outer optimiser: SGD (with momentum) or Adam applied to an aggregated direction.

Each algorithm gives a pseudo-gradient ``g``: the mean meta-gradient for MAML-family methods, and
``-Δ̄`` for Reptile and FedAvg, so that SGD with ``lr = β`` and no momentum is exactly
``θ ← θ + β Δ̄`` (Nichol et al. 2018; Reddi et al. 2021 for adaptive server optimisers).
State (momentum buffers, Adam moments, step count) is returned as arrays for checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedmeta.common.config import OuterConfig
from fedmeta.common.params import NDArrays


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
        else:
            raise ValueError(f"outer.optimizer = {cfg.optimizer!r}: use sgd or adam")

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
