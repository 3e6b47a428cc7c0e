"""FedAvg with local fine-tuning: the baseline fedmeta is measured against.

FedAvg (McMahan et al. 2017): each site runs plain minibatch SGD on its own training rows from θ
and returns ``Δ_i``; the server applies ``θ ← θ + η · Σ_i w_i Δ_i / Σ_i w_i``. Evaluation then
fine-tunes θ locally, as in FLamby's "FedAvg + local fine-tuning" (Ogier du Terrail et al. 2022).
"""

from __future__ import annotations

from fedmeta.server.strategy import FedMetaStrategy


class FedAvgFineTune(FedMetaStrategy):
    name = "FedAvg"
    update_kind = "delta"
