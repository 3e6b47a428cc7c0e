"""FedMAML: MAML's outer update across hospitals, second order or first order.

MAML (Finn, Abbeel and Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks"): each site adapts θ on the support set of each of its tasks and returns the gradient of
the mean query loss after adaptation with respect to θ, ``g_i = ∇_θ mean_t L_q(φ_t(θ))``, through
the inner steps (second order) or treating them as constant (first-order MAML, ``algorithm:
fomaml``). The server applies the outer optimiser to ``ḡ = Σ_i w_i g_i / Σ_i w_i``; this is the
federated meta-learning of Chen et al. 2018 ("Federated Meta-Learning with Fast Convergence and
Efficient Communication").
"""

from __future__ import annotations

from fedmeta.server.strategy import FedMetaStrategy


class FedMAML(FedMetaStrategy):
    name = "FedMAML"
    update_kind = "gradient"
