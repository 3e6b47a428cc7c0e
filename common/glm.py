"""Logistic regression fitted exactly across sites: Newton–Raphson on summed gradients and Hessians.

Each site computes, at the coordinator's coefficients ``β = (w, b)``, the sums over its own rows
of the negative log-likelihood ``ℓ = Σ log(1 + e^{z}) − y z`` with ``z = xᵀw + b``, of its
gradient ``g = X̃ᵀ(p − y)`` and of its Hessian ``H = X̃ᵀ diag(p(1 − p)) X̃`` (``X̃ = [X, 1]``,
``p = σ(z)``). The coordinator adds them up and takes the Newton step on the penalised objective
``ℓ(β) + λ/2 ‖w‖²`` (the intercept unpenalised, as scikit-learn's ``LogisticRegression(C=1/λ)``):

    β ← β − (H + λ D)⁻¹ (g + λ D β),   D = diag(1, …, 1, 0).

The sums are exactly the pooled data's, so the fit is the pooled fit: this is how DataSHIELD's
``ds.glm`` fits a GLM across servers (Gaye et al. 2014, *DataSHIELD: taking the analysis to the
data, not the data to the analysis*). Newton's method converges quadratically; from β = 0 a
logistic regression is usually fitted to machine precision in 6–8 steps.

With site intercepts each site's intercept is ``b + u_s``: a common intercept and a site offset
shrunk toward 0 by the same L2 penalty (``λ/2 Σ u_s²``), so that the coefficients are estimated
within hospitals and a site whose rows all share one outcome still gets a finite intercept. The
global vector is ``(w, b, u_1, …, u_S)``; site ``s``'s row ``[x, 1]`` is ``[x, 1, e_s]`` in it,
so its sums map by ``M_s`` (``g ↦ M_sᵀ g``, ``H ↦ M_sᵀ H M_s``). Nothing here imports Flower or
torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GlmSums:
    """One site's sums at ``β``: gradient ``(d + 1,)``, Hessian ``(d + 1, d + 1)``, the summed
    negative log-likelihood, the number of rows and of events (``y = 1``)."""

    gradient: np.ndarray
    hessian: np.ndarray
    loss: float
    n: int
    events: int


def site_sums(x: np.ndarray, y: np.ndarray, beta: np.ndarray) -> GlmSums:
    """The sums of one site's rows ``x`` ``(n, d)`` with binary labels ``y`` at ``β = (w, b)``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    beta = np.asarray(beta, dtype=np.float64)
    if x.ndim != 2 or beta.shape != (x.shape[1] + 1,) or y.shape != (x.shape[0],):
        raise ValueError(f"site_sums: x {x.shape}, y {y.shape} and β {beta.shape} do not fit")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("site_sums: labels must be 0 or 1")
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    z = design @ beta
    p = 1.0 / (1.0 + np.exp(-z))
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    weights = p * (1.0 - p)
    return GlmSums(gradient=design.T @ (p - y), hessian=(design * weights[:, None]).T @ design,
                   loss=loss, n=int(x.shape[0]), events=int(y.sum()))


@dataclass(frozen=True)
class GlmState:
    """The coordinator's coefficients: ``w`` ``(d,)``, the intercept ``b`` and the sites'
    offsets ``u`` (``(S,)``, empty without site intercepts)."""

    w: np.ndarray
    b: float
    u: np.ndarray

    @classmethod
    def zeros(cls, d: int, n_sites: int = 0) -> GlmState:
        return cls(np.zeros(d), 0.0, np.zeros(n_sites))

    def site_beta(self, s: int) -> np.ndarray:
        """``(w, b + u_s)``: what site ``s`` evaluates its sums at."""
        return np.concatenate([self.w, [self.b + (self.u[s] if self.u.size else 0.0)]])

    def site_intercepts(self) -> np.ndarray:
        return self.b + self.u

    def vector(self) -> np.ndarray:
        return np.concatenate([self.w, [self.b], self.u])


@dataclass(frozen=True)
class NewtonStep:
    """A Newton step's outcome: the new state, the penalised objective at the old one, and the
    Newton decrement ``δᵀ(H + λD)δ`` (half of it bounds the objective's remaining decrease)."""

    state: GlmState
    objective: float
    decrement: float


def newton_step(state: GlmState, sums: Sequence[GlmSums], *, l2: float) -> NewtonStep:
    """One Newton–Raphson step from the sites' sums (in site order when each has its own
    offset, then ``len(sums) == len(state.u)``)."""
    if l2 < 0:
        raise ValueError(f"l2 = {l2}: must be >= 0")
    d = state.w.shape[0]
    n_sites = state.u.shape[0]
    if n_sites and len(sums) != n_sites:
        raise ValueError(f"{len(sums)} sites' sums for {n_sites} site intercepts")
    size = d + 1 + n_sites
    g = np.zeros(size)
    h = np.zeros((size, size))
    loss = 0.0
    for s, part in enumerate(sums):
        if part.gradient.shape != (d + 1,) or part.hessian.shape != (d + 1, d + 1):
            raise ValueError(f"site {s}: sums of shape {part.gradient.shape}/{part.hessian.shape}, "
                             f"expected ({d + 1},)/({d + 1}, {d + 1})")
        m = np.zeros((d + 1, size))
        m[:, : d + 1] = np.eye(d + 1)
        if n_sites:
            m[d, d + 1 + s] = 1.0
        g += m.T @ part.gradient
        h += m.T @ part.hessian @ m
        loss += part.loss
    penalty = np.r_[np.full(d, l2), [0.0], np.full(n_sites, l2)]
    beta = state.vector()
    g = g + penalty * beta
    h = h + np.diag(penalty)
    try:
        delta = np.linalg.solve(h, g)
    except np.linalg.LinAlgError:
        delta = np.linalg.lstsq(h, g, rcond=None)[0]  # separable data without a penalty
    new = beta - delta
    objective = loss + 0.5 * l2 * float(state.w @ state.w + state.u @ state.u)
    return NewtonStep(GlmState(new[:d], float(new[d]), new[d + 1:]), objective, float(delta @ h @ delta))
