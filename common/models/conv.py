"""Conv-4 (Vinyals et al. 2016; Finn et al. 2017; Snell et al. 2017) and a vmap-safe batch norm.

Each of the four blocks is ``conv 3x3 (padding 1) -> norm -> ReLU -> max-pool 2x2``. With
``out_features`` a linear head follows (MAML-style classifier); with ``out_features=None`` the
flattened feature map is the output (the ProtoNet / Matching Networks embedding).
"""

from __future__ import annotations

import torch
from torch import nn

from fedmeta.common.models.mlp import _check_positive

NORMS = ("group", "batch", "none")


class BatchStatNorm2d(nn.Module):
    """Batch normalisation with batch statistics only, written with plain tensor operations.

    ``y = γ · (x − μ) / sqrt(σ² + ε) + β`` with ``μ``, ``σ²`` (biased) taken over the batch and
    spatial dimensions of the current input, per channel. There are no running statistics, as in
    MAML (Finn et al. 2017) where batch norm always uses the statistics of the current batch. It is
    used instead of ``nn.BatchNorm2d`` because second-order gradients through the native kernel are
    wrong under ``torch.func.vmap`` in torch 2.13 (they disagree with finite differences, while the
    per-task loop agrees); mean/var compose correctly.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        _check_positive("num_features", num_features)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchStatNorm2d expects (N, C, H, W), got shape {tuple(x.shape)}")
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return x_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def make_norm(norm: str, channels: int, *, groups: int = 4) -> nn.Module:
    """Norm layer by name: ``group`` (GroupNorm), ``batch`` (:class:`BatchStatNorm2d`) or ``none``."""
    if norm == "group":
        if channels % groups != 0:
            raise ValueError(f"GroupNorm needs channels ({channels}) divisible by groups ({groups})")
        return nn.GroupNorm(groups, channels)
    if norm == "batch":
        return BatchStatNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


def conv_block(
    in_channels: int, out_channels: int, *, norm: str, groups: int = 4, pool: bool = True
) -> nn.Sequential:
    """``conv 3x3 (padding 1) -> norm -> ReLU [-> max-pool 2x2]``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        make_norm(norm, out_channels, groups=groups),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four conv blocks on ``in_channels x image_size x image_size`` images, then an optional head.

    On 1x28x28 inputs the feature map after the four 2x2 pools is ``hidden x 1 x 1``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_features: int | None = 5,
        *,
        norm: str = "group",
        groups: int = 4,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("hidden", hidden)
        _check_positive("image_size", image_size)
        if out_features is not None:
            _check_positive("out_features", out_features)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2x2 pools (need >= 16)")
        self.features = nn.Sequential(
            *(
                conv_block(in_channels if i == 0 else hidden, hidden, norm=norm, groups=groups)
                for i in range(4)
            )
        )
        self.embedding_dim = hidden * side * side
        self.head = nn.Linear(self.embedding_dim, out_features) if out_features else None
        self.out_features = out_features if out_features else self.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x).flatten(start_dim=1)
        return self.head(z) if self.head is not None else z
