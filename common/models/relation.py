"""Relation Network models (Sung et al. 2018, "Learning to Compare").

A :class:`RelationNet` embeds support and query examples with an encoder ``f``, forms one class
feature per class as the *sum* of its support embeddings, ``c_k = Σ_{i: y_i = k} f(x_i)``, and scores
every (query, class) pair with a learned relation module ``g`` on the concatenation
``[c_k, f(x_q)]``: ``r_{q,k} = σ(g([c_k, f(x_q)]))``. ``forward`` returns the pre-sigmoid logits.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmeta.common.models.conv import NORMS, conv_block
from fedmeta.common.models.mlp import MLP, _check_positive


class RelationNet(nn.Module):
    """Encoder ``f`` and relation module ``g``; ``forward(xs, ys_onehot, xq) -> (Q, N)`` logits.

    ``ys_onehot`` is ``(S, N)`` float one-hot support labels (one-hot rather than indices so the
    forward pass has no data-dependent indexing and runs under ``torch.func.vmap``). Concatenation
    is along dimension 1 of the embedding (channels for feature maps, features for vectors).
    """

    def __init__(self, encoder: nn.Module, relation: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.relation = relation

    def forward(self, xs: torch.Tensor, ys_onehot: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        s = xs.shape[0]
        z = self.encoder(torch.cat([xs, xq], dim=0))
        zs, zq = z[:s], z[s:]
        classes = torch.einsum("sn,s...->n...", ys_onehot.to(zs.dtype), zs)
        n, q = classes.shape[0], zq.shape[0]
        pairs = torch.cat(
            [
                classes.unsqueeze(0).expand(q, *classes.shape),
                zq.unsqueeze(1).expand(q, n, *zq.shape[1:]),
            ],
            dim=2,
        )
        out = self.relation(pairs.reshape(q * n, *pairs.shape[2:]))
        return out.reshape(q, n)


def relation_conv4(
    in_channels: int = 1,
    hidden: int = 64,
    *,
    norm: str = "group",
    groups: int = 4,
    image_size: int = 28,
    relation_hidden: int = 8,
) -> RelationNet:
    """Sung et al.'s image architecture: four conv blocks (pooling in the first two only), then a
    relation module of two pooled conv blocks on ``2·hidden`` channels and ``FC(relation_hidden) -> FC(1)``."""
    _check_positive("in_channels", in_channels)
    _check_positive("hidden", hidden)
    _check_positive("relation_hidden", relation_hidden)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    side = image_size // 4
    rel_side = side // 4
    if rel_side < 1:
        raise ValueError(f"image_size {image_size} is too small for the relation network (need >= 16)")
    encoder = nn.Sequential(
        *(
            conv_block(in_channels if i == 0 else hidden, hidden, norm=norm, groups=groups, pool=i < 2)
            for i in range(4)
        )
    )
    relation = nn.Sequential(
        conv_block(2 * hidden, hidden, norm=norm, groups=groups),
        conv_block(hidden, hidden, norm=norm, groups=groups),
        nn.Flatten(),
        nn.Linear(hidden * rel_side * rel_side, relation_hidden),
        nn.ReLU(),
        nn.Linear(relation_hidden, 1),
    )
    return RelationNet(encoder, relation)


def relation_mlp(
    in_features: int, hidden: tuple[int, ...] = (64,), embed: int = 64, relation_hidden: int = 16
) -> RelationNet:
    """Tabular variant: an MLP encoder ``in -> hidden -> embed`` and an MLP relation module
    ``2·embed -> relation_hidden -> 1``."""
    encoder = MLP(in_features, (*hidden, embed), out_features=None)
    relation = MLP(2 * embed, (relation_hidden,), out_features=1)
    return RelationNet(encoder, relation)
