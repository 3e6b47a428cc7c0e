"""Fully connected models for tabular features (EHR): a multilayer perceptron and logistic regression."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """``in_features -> hidden[0] -> ... -> hidden[-1] -> out_features`` with ReLU between layers.

    With ``out_features=None`` the last hidden layer is the output (an embedding network for the
    metric learners, with no ReLU after it).
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (64, 64), out_features: int | None = 2
    ) -> None:
        super().__init__()
        _check_positive("in_features", in_features)
        hidden = tuple(hidden)
        for h in hidden:
            _check_positive("hidden", h)
        if out_features is not None:
            _check_positive("out_features", out_features)
        if out_features is None and not hidden:
            raise ValueError("MLP needs out_features or at least one hidden layer, got neither")
        widths = (in_features, *hidden) + ((out_features,) if out_features is not None else ())
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if i > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(a, b))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: ``logits = x Wᵀ + b`` (softmax / cross-entropy applied by the loss)."""

    def __init__(self, in_features: int, out_features: int = 2) -> None:
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        self.linear = nn.Linear(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
