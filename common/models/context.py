"""Full context embeddings of Matching Networks (Vinyals et al. 2016, appendix A.2).

:class:`ContextEmbedding` wraps an embedding network ``f'`` (``encoder``) with the two LSTMs that
make each embedding depend on the whole support set ``S``:

- support: ``g(x_i, S) = h→_i + h←_i + g'(x_i)``, a bidirectional LSTM read over the embedded
  support examples in episode order (``g' = f'``, one encoder as in the paper's experiments);
- query: ``f(x̂, S) = attLSTM(f'(x̂), g(S), K)``, ``K`` = ``steps`` steps of
  ``ĥ_k, c_k = LSTM(f'(x̂), h_{k−1} + r_{k−1}, c_{k−1})``, ``h_k = ĥ_k + f'(x̂)``,
  ``r_k = Σ_i softmax_i(h_kᵀ g(x_i)) g(x_i)``. The paper feeds ``[h, r]`` to the cell; their sum
  keeps the cell as wide as the embedding (as common implementations do).

The cells are written with two linear maps each (gates in PyTorch's ``i, f, g, o`` order), so
``torch.func.functional_call`` and ``vmap`` treat them as any layer. ``forward(z)`` gives the
support's context embeddings, ``forward(z, g)`` the queries' against them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedmeta.common.models.mlp import _check_positive


class LSTMCell(nn.Module):
    """``(x, h, c) -> (h', c')``: ``i, f, g, o = W x + U h + b``; ``c' = σ(f) c + σ(i) tanh(g)``,
    ``h' = σ(o) tanh(c')``."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.ih = nn.Linear(in_features, 4 * hidden)
        self.hh = nn.Linear(hidden, 4 * hidden, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class ContextEmbedding(nn.Module):
    """An encoder with Matching Networks' full context embeddings (module docstring)."""

    def __init__(self, encoder: nn.Module, dim: int, steps: int = 3) -> None:
        super().__init__()
        _check_positive("dim", dim)
        _check_positive("steps", steps)
        self.encoder = encoder
        self.forward_cell = LSTMCell(dim, dim)
        self.backward_cell = LSTMCell(dim, dim)
        self.query_cell = LSTMCell(dim, dim)
        self.dim, self.steps = dim, steps

    def context(self, z: torch.Tensor) -> torch.Tensor:
        """``g(x_i, S)`` ``(S, D)`` of the embedded support set ``z`` ``(S, D)``."""
        zero = z.new_zeros(self.dim)
        h, c, fwd = zero, zero, []
        for i in range(z.shape[0]):
            h, c = self.forward_cell(z[i], h, c)
            fwd.append(h)
        h, c, bwd = zero, zero, []
        for i in reversed(range(z.shape[0])):
            h, c = self.backward_cell(z[i], h, c)
            bwd.append(h)
        return z + torch.stack(fwd) + torch.stack(bwd[::-1])

    def attend(self, zq: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``f(x̂, S)`` ``(Q, D)`` of embedded queries ``zq`` ``(Q, D)`` against ``g`` ``(S, D)``."""
        h, c, r = torch.zeros_like(zq), torch.zeros_like(zq), torch.zeros_like(zq)
        for _ in range(self.steps):
            h_hat, c = self.query_cell(zq, h + r, c)
            h = h_hat + zq
            r = torch.softmax(h @ g.T, dim=1) @ g
        return h

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return self.context(z) if g is None else self.attend(z, g)


def context_embedding(encoder: Mapping[str, Any], dim: int, steps: int = 3) -> ContextEmbedding:
    """``build_model("context-embedding", encoder={"name": ..., "kwargs": ...}, dim=D)``: the
    registry's network ``encoder`` (output width ``dim``) with full context embeddings."""
    from fedmeta.common.models import build_model

    return ContextEmbedding(build_model(str(encoder["name"]), **dict(encoder.get("kwargs", {}))), int(dim), int(steps))
