"""``fedmeta adapt``: a new hospital adapts the meta-learned initialisation to its own patients.

Everything runs locally: the site reads the coordinator's ``final.safetensors`` (which carries the
experiment's configuration), adapts it on its training split or on ``--shots`` labelled patients,
scores its own test split before and after, and saves the adapted model. Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedmeta.common.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="adapt a meta-learned model to a new hospital's few labelled patients")
    p.add_argument("--params", type=Path, required=True, help="final.safetensors of a fedmeta run")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--site", type=Path, help="this hospital's site.yaml")
    where.add_argument("--site-name", help="a site of the run's data source (e.g. a held-out hospital)")
    p.add_argument("--shots", type=int, default=0, help="adapt on this many labelled patients (0: all training rows)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override adaptation settings, e.g. eval.adapt_steps=50")
    p.add_argument("--seed", type=int, default=0, help="which patients are drawn for --shots")
    p.add_argument("--out", type=Path, default=None, help="where to save the adapted parameters (.safetensors)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from fedmeta.common import params as P
    from fedmeta.common.config import config_from_dict, load_config
    from fedmeta.common.data.registry import data_spec, load_site
    from fedmeta.sitecore.evaluate import evaluate_site

    state, meta = P.load(args.params)
    if "config" not in meta:
        raise ConfigError(f"{args.params}: carries no experiment config (written by an older fedmeta?)")
    base = config_from_dict(json.loads(str(meta["config"])), where=str(args.params)).to_dict()
    cfg = load_config(None, [*args.overrides, f"eval.shots={args.shots}"], base=base)
    spec = data_spec(cfg.data)
    if args.site:
        from fedmeta.sitecore.data import load_local_site

        site = load_local_site(args.site, data=cfg.data)
    else:
        site = load_site(cfg.data, args.site_name)
    t0 = time.perf_counter()
    result = evaluate_site(cfg, spec, site, state, rng=np.random.default_rng(args.seed), keep_params=True)
    took = time.perf_counter() - t0
    print(f"{site.name}: adapted on {result['n_train']} labelled patients in {took:.2f} s; "
          f"scored on {result['n_test']} test patients")
    for metric in ("accuracy", "auroc", "loss"):
        print(f"  {metric:<9} before {result['before'][metric]:.3f}   after {result['after'][metric]:.3f}")
    if "params" in result:
        out = args.out or args.params.with_name(f"adapted-{site.name.replace(' ', '_')}.safetensors")
        P.save(out, result["params"], {"adapted_from": str(args.params), "site": site.name,
                                       "shots": args.shots, "config": cfg.to_json()})
        print(f"saved {out}")
    return 0
