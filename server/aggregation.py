"""Checking and combining sites' updates: pure numpy, used by every server strategy.

An update is a dict of arrays with the global parameters' names, shapes and dtype. The weighted
mean is computed from sums and an explicit weight per site (the examples it used), never as an
average of averages: ``ū = Σ_i w_i u_i / Σ_i w_i``.

Three defences against a hostile participant act before that mean, and none changes a round in
which no site stands out (the aggregate is then exactly the weighted mean):

- :func:`cap_weight_shares`: no site's weight is more than the agreed share of the round's total
  (``validation.max_weight_share``, 0.5): a site claiming 10⁹ examples would otherwise be the
  aggregate, since the coordinator cannot check the training rows a site declares;
- :func:`clip_outliers`: an update far longer than the round's typical one is shortened to it
  (a scaled reply);
- :class:`ResponseCheck`: across rounds, a site whose update reacts to θ's movement unlike an
  honest site's, and unlike the other sites', is left out (a sign-flipped reply, which no norm
  test can see: it is as long as an honest one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmeta.common.errors import DeltaError
from fedmeta.common.params import NDArrays, clip_update, l2_norm


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_norm: float,
    source: str = "reply",
) -> float:
    """Raise :class:`DeltaError` unless ``update`` matches ``reference`` in names, shapes and dtype,
    is finite, and has L2 norm at most ``max_norm``. Returns the norm."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise DeltaError(f"{source}: parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise DeltaError(f"{source}: {name} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise DeltaError(f"{source}: {name} has dtype {arr.dtype}, expected {ref.dtype}")
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise DeltaError(f"{source}: {name} has {bad} NaN/Inf entries")
    norm = l2_norm(update)
    if norm > max_norm:
        raise DeltaError(f"{source}: update L2 norm {norm:.4g} exceeds validation.max_norm = {max_norm:g}")
    return norm


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> NDArrays:
    """``Σ_i w_i u_i / Σ_i w_i`` per array, accumulated in float64."""
    if not updates:
        raise ValueError("weighted_mean of no updates")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = {}
    for k, ref in updates[0].items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for u, w in zip(updates, weights, strict=True):
            acc += float(w) * u[k]
        out[k] = (acc / total).astype(ref.dtype)
    return out


def cap_weight_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """``weights`` lowered so that none is more than ``max_share`` of their sum.

    The largest weights are cut to one common value ``c`` (water-filling), chosen so that each
    cut site's share ``c / Σ_j min(w_j, c)`` is exactly ``max_share``; the others are left as
    they are, and weights already within the cap come back unchanged (the same list of values).
    With ``k`` sites cut and ``R`` the sum of the rest, ``c = max_share · R / (1 − k · max_share)``.
    When ``max_share`` is at most ``1 / n`` no cap is reachable but equal weights, which are
    returned (each the smallest weight). ``max_share >= 1`` turns the cap off. A site's weight is what it claims (its
    training rows under FedAvg); the coordinator can bound a claim by what the site declared, but
    not check the declaration, so this cap, not the claim, is what bounds a site's pull.
    """
    w = [float(x) for x in weights]
    n = len(w)
    if max_share >= 1 or n <= 1 or max(w) <= max_share * sum(w):
        return w
    if max_share * n <= 1:
        return [min(w)] * n
    order = sorted(range(n), key=lambda i: -w[i])
    for k in range(1, n):
        if k * max_share >= 1:
            break
        rest = sum(w[i] for i in order[k:])
        c = max_share * rest / (1 - k * max_share)
        if w[order[k]] <= c:
            return [min(x, c) for x in w]
    return [min(w)] * n


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> NDArrays:
    """Entry-wise median of the updates (Yin et al. 2018), robust to a minority of bad sites."""
    return {k: np.median(np.stack([u[k] for u in updates]), axis=0).astype(ref.dtype)
            for k, ref in updates[0].items()}


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim: float) -> NDArrays:
    """Entry-wise mean after dropping the ``floor(trim * n)`` smallest and largest values."""
    n = len(updates)
    cut = int(np.floor(trim * n))
    if n - 2 * cut < 1:
        raise ValueError(f"trim {trim} leaves no update out of {n}")
    out = {}
    for k, ref in updates[0].items():
        stacked = np.sort(np.stack([u[k] for u in updates]).astype(np.float64), axis=0)
        out[k] = stacked[cut : n - cut].mean(axis=0).astype(ref.dtype)
    return out


def lower_median(values: Sequence[float]) -> float:
    """The lower median: a minority of sites cannot raise it (with two sites: the smaller)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def clip_outliers(updates: Sequence[Mapping[str, np.ndarray]], factor: float) -> list[NDArrays]:
    """Updates whose norm exceeds ``factor`` times the round's lower-median norm ``m`` are scaled
    down to norm ``m``: an outlier then weighs no more than a typical honest update, while updates
    within the bound (every honest one, in practice) are left exactly as they are."""
    norms = [l2_norm(u) for u in updates]
    m = lower_median(norms)
    return [clip_update(u, m)[0] if m > 0 and n > factor * m else dict(u)
            for u, n in zip(updates, norms, strict=True)]


def aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    rule: str = "mean",
    trim: float = 0.1,
    clip_norm: float = 0.0,
    relative_clip: float = 0.0,
) -> NDArrays:
    """Combine validated updates by ``rule`` (mean, median, trimmed_mean), after clipping
    outliers beyond ``relative_clip`` times the round's lower-median norm (:func:`clip_outliers`)
    and every update to ``clip_norm`` (each when > 0)."""
    if relative_clip > 0 and len(updates) > 1:
        updates = clip_outliers(updates, relative_clip)
    if clip_norm > 0:
        updates = [clip_update(u, clip_norm)[0] for u in updates]
    if rule == "mean":
        return weighted_mean(updates, weights)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed_mean":
        return trimmed_mean(updates, trim)
    raise ValueError(f"unknown aggregation rule {rule!r}; use mean, median or trimmed_mean")


# -- the response check ------------------------------------------------------------------------
def _dot(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return float(sum(np.vdot(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)) for k in a))


def response_cosine(state_before: Mapping[str, np.ndarray], pseudo_before: Mapping[str, np.ndarray],
                    state_now: Mapping[str, np.ndarray], pseudo_now: Mapping[str, np.ndarray]) -> float | None:
    """``cos(p_now − p_before, s_now − s_before)`` for one site's pseudo-gradients ``p`` (what the
    outer optimiser descends: ``−Δ`` for deltas, the meta-gradient itself for gradients) computed
    at two broadcast states ``s``; None when either difference is zero.

    For a site whose update descends its own loss ``L``, ``p ≈ ∇L`` and the numerator is
    ``⟨∇L(s_now) − ∇L(s_before), s_now − s_before⟩ ≈ dᵀ ∇²L d``: positive where ``L`` curves
    upward along the move, i.e. the site's update pushes back when θ moves away from what its data
    favour. A sign-flipped update ascends ``L`` and gives the opposite sign. The cosine does not
    depend on how the site scales its update.
    """
    d_state = {k: np.asarray(state_now[k], np.float64) - np.asarray(state_before[k], np.float64)
               for k in state_now}
    d_pseudo = {k: np.asarray(pseudo_now[k], np.float64) - np.asarray(pseudo_before[k], np.float64)
                for k in pseudo_now}
    n_state, n_pseudo = np.sqrt(_dot(d_state, d_state)), np.sqrt(_dot(d_pseudo, d_pseudo))
    if not (n_state > 0 and n_pseudo > 0):
        return None
    return _dot(d_pseudo, d_state) / (n_state * n_pseudo)


@dataclass
class _Track:
    """What the check keeps of one site: the broadcast state and pseudo-gradient of its last
    ``lag`` updates, oldest first, its score (0: nothing against it) and whether it is left out
    (from when the score reaches ``−threshold`` until it is back at 0)."""

    history: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
    score: float = 0.0
    out: bool = False


class ResponseCheck:
    """Leaves out of the aggregate a site whose updates, round after round, react to θ's movement
    the opposite way to the other sites' updates.

    Each time a site replies, :func:`response_cosine` compares its update with the one it sent
    ``lag`` samplings earlier, against how the broadcast state moved in between: an honest site's
    update pushes back against the move (a positive value), a sign-flipped one goes along with it.
    (Two samplings rather than one: a longer move stands out more from the noise of the sites'
    task sampling, and top-k compression's error feedback, which re-sends what an earlier round
    left out, has evened out.) Each site's value ``c_i`` is compared with the median of the other
    sites' values in the same round, so a stretch in which every site's loss curves downward, as
    early in training, counts against nobody. Only a round in which the site's update goes along
    with the move (``c_i < 0``) counts against it, by its shortfall below the others, and the
    shortfalls accumulate as a one-sided CUSUM::

        score_i ← clamp(score_i + [c_i < 0]·(c_i − median_{j≠i} c_j) + allowance, −2·threshold, 0)

    (An honest update that pushes back less than the others', ``0 ≤ c_i`` below their median, is
    not suspect: late in a run, when θ barely moves, the site's task-sampling noise dominates its
    response. Without the ``c_i < 0`` condition an honest hospital of Fed-Heart-Disease was left out
    of the last 6-8 rounds of FedAvg on a linear model, a convex loss on which every honest
    response is positive in expectation.) A site is left out from when ``score_i`` reaches
    ``−threshold`` until it is back at 0. With ``allowance`` 0.3 and ``threshold`` 2, a site that
    goes along with the move while the others push back (about −0.7 against +0.8 for a
    sign-flipped Fed-Heart-Disease hospital) is left out after two such rounds, while the
    round-to-round scatter of honest sites (stochastic tasks, heterogeneous hospitals) is absorbed
    by the allowance: over 30-round runs of Reptile, FOMAML, Meta-SGD and FedAvg (MLP and linear,
    SGD and Yogi) no honest site's score went below −1.3. Once a site reacts like the others
    again its score rises by about ``allowance`` a round, so it is readmitted within
    ``2·threshold / allowance`` rounds (about 13); one good round does not readmit it. At most
    ``(n − 1) // 2`` of a round's ``n`` sites are left out, those with the lowest scores: with two
    sites nothing tells which one is wrong, so neither is.

    The premise, that an honest update descends a loss that curves upward along θ's path, is
    approximate for neural networks; where it fails for an honest site while a hostile one is
    present, the check can leave out the wrong site (see ``tests/common/test_aggregation.py``
    and the report in ``deploy/README.md``). The state (each site's recent broadcast states,
    pseudo-gradients and score) goes into the strategy's checkpoint through :meth:`arrays` and
    :meth:`meta` and back through :meth:`load`.
    """

    def __init__(self, *, allowance: float, threshold: float, lag: int = 2) -> None:
        if not (allowance >= 0 and threshold > 0 and lag >= 1):
            raise ValueError(f"need allowance >= 0, threshold > 0, lag >= 1; got {allowance}, {threshold}, {lag}")
        self.allowance = float(allowance)
        self.threshold = float(threshold)
        self.lag = int(lag)
        self._tracks: dict[str, _Track] = {}

    def scores(self) -> dict[str, float]:
        """Each site's current score (0 for a site never compared)."""
        return {site: t.score for site, t in self._tracks.items()}

    def observe(self, state: Mapping[str, np.ndarray],
                pseudo: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
        """Record this round's pseudo-gradients (site -> arrays), all computed at ``state``, and
        update the scores of sites with ``lag`` earlier updates. Returns this round's cosines."""
        cosines: dict[str, float] = {}
        for site, p in pseudo.items():
            track = self._tracks.get(site)
            if track is not None and len(track.history) == self.lag:
                old_state, old_pseudo = track.history[0]
                c = response_cosine(old_state, old_pseudo, state, p)
                if c is not None:
                    cosines[site] = c
        for site, c in cosines.items():
            others = [v for s, v in cosines.items() if s != site]
            if others:
                t = self._tracks[site]
                step = (c - float(np.median(others)) if c < 0 else 0.0) + self.allowance
                t.score = min(0.0, max(-2.0 * self.threshold, t.score + step))
                if t.score <= -self.threshold:
                    t.out = True
                elif t.score >= 0.0:
                    t.out = False
        snapshot = {k: np.array(v, copy=True) for k, v in state.items()}
        for site, p in pseudo.items():
            t = self._tracks.setdefault(site, _Track([]))
            t.history = [*t.history, (snapshot, {k: np.array(v, copy=True) for k, v in p.items()})][-self.lag:]
        return cosines

    def excluded(self, sites: Sequence[str]) -> list[str]:
        """Which of this round's ``sites`` to leave out: those marked out, the lowest scores
        first, at most ``(len(sites) − 1) // 2``; returned in ``sites``' order."""
        low = sorted((self._tracks[s].score, s) for s in sites if s in self._tracks and self._tracks[s].out)
        out = {s for _, s in low[: (len(sites) - 1) // 2]}
        return [s for s in sites if s in out]

    # -- checkpoint ----------------------------------------------------------------------------
    def arrays(self, prefix: str = "response/") -> dict[str, np.ndarray]:
        """``<prefix><i>/<j>/state/<name>`` and ``<prefix><i>/<j>/pseudo/<name>``: the j-th
        remembered update of the i-th site of :meth:`meta` (site names stay out of array keys)."""
        out: dict[str, np.ndarray] = {}
        for i, t in enumerate(self._tracks.values()):
            for j, (state, pseudo) in enumerate(t.history):
                out.update({f"{prefix}{i}/{j}/state/{k}": v for k, v in state.items()})
                out.update({f"{prefix}{i}/{j}/pseudo/{k}": v for k, v in pseudo.items()})
        return out

    def meta(self) -> list[dict[str, Any]]:
        """JSON-ready site names, scores, states and history lengths, in :meth:`arrays`' order."""
        return [{"site": site, "score": t.score, "out": t.out, "kept": len(t.history)}
                for site, t in self._tracks.items()]

    def load(self, arrays: Mapping[str, np.ndarray], meta: Sequence[Mapping[str, Any]],
             prefix: str = "response/") -> None:
        """Replace the state by what :meth:`arrays` and :meth:`meta` saved."""
        tracks: dict[str, _Track] = {}
        for i, entry in enumerate(meta):
            history = [(_strip(arrays, f"{prefix}{i}/{j}/state/"), _strip(arrays, f"{prefix}{i}/{j}/pseudo/"))
                       for j in range(int(entry["kept"]))]
            tracks[str(entry["site"])] = _Track(history[-self.lag:], float(entry["score"]), bool(entry["out"]))
        self._tracks = tracks


def _strip(arrays: Mapping[str, np.ndarray], head: str) -> dict[str, np.ndarray]:
    return {k[len(head):]: np.array(v, copy=True) for k, v in arrays.items() if k.startswith(head)}
