"""FedReptile: Reptile's outer update across hospitals.

Reptile (Nichol, Achiam and Schulman 2018, "On First-Order Meta-Learning Algorithms") moves the
initialisation toward the weights each task adapts to. Federated, each site returns
``Δ_i = θ_i − θ`` from tasks of its own data and the server applies
``θ ← θ + β · Σ_i w_i Δ_i / Σ_i w_i`` with ``w_i`` the examples site ``i`` used; with the SGD outer
optimiser (``outer.lr = β``) this is exact, and momentum or Adam act on the same direction.
"""

from __future__ import annotations

from fedmeta.server.strategy import FedMetaStrategy


class FedReptile(FedMetaStrategy):
    name = "FedReptile"
    update_kind = "delta"
