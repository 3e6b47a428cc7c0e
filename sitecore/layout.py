"""Does this site's data encode to the consortium's layout? Checked at the site, at the greeting.

The coordinator sends the layout it built θ for (:meth:`fedmeta.common.data.registry.DataSpec.layout`:
encoded feature names in order, outcomes, input shape). The site compares its own loaded data
and answers with what differs, naming only the coordinator's own (public) feature and outcome
names: columns the site has beyond the layout are counted, never named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fedmeta.common.data.base import ImageSite, Site


@dataclass(frozen=True)
class LayoutCheck:
    """``missing``: the layout's features this site lacks; ``extra``: how many it has beyond;
    ``reordered``: same features, another order; ``outcomes_missing``: the layout's outcomes
    this site does not label; ``shape``: the site's input shape when it differs."""

    missing: list[str] = field(default_factory=list)
    extra: int = 0
    reordered: bool = False
    outcomes_missing: list[str] = field(default_factory=list)
    shape: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.reordered or self.outcomes_missing or self.shape)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing features {self.missing[:10]}" + (" …" if len(self.missing) > 10 else ""))
        if self.extra:
            parts.append(f"{self.extra} feature(s) the layout does not have")
        if self.reordered:
            parts.append("the same features in another order")
        if self.outcomes_missing:
            parts.append(f"no labels for outcomes {self.outcomes_missing}")
        if self.shape:
            parts.append(f"input shape {tuple(self.shape)}")
        return "; ".join(parts) or "same layout"


def compare_layout(expected: Mapping[str, Sequence], site: Site) -> LayoutCheck:
    """Compare the coordinator's ``expected`` layout with ``site``'s own data."""
    if isinstance(site, ImageSite):
        shape = [int(v) for v in site.x_train.shape[1:]]
        want = [int(v) for v in expected.get("input_shape", [])]
        return LayoutCheck(shape=shape if want and shape != want else [])
    features = [str(f) for f in expected.get("features", [])]
    outcomes = [str(o) for o in expected.get("outcomes", [])]
    mine = list(site.feature_names)
    if not features:  # the coordinator knows only the width
        width = [int(v) for v in expected.get("input_shape", [])]
        return LayoutCheck(shape=[len(mine)] if width and width != [len(mine)] else [])
    missing = [f for f in features if f not in set(mine)]
    extra = sum(1 for f in mine if f not in set(features))
    reordered = not missing and not extra and mine != features
    outcomes_missing = [o for o in outcomes if o not in set(site.outcomes)]
    return LayoutCheck(missing, extra, reordered, outcomes_missing)
