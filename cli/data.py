"""``fedmeta data``: generate synthetic hospitals and check a site's data before it joins.

- ``fedmeta data synth-ehr --sites N --out DIR``: N MIMIC-style hospitals (CSV + site.yaml each,
  one shared schema.yaml), the layout a real consortium uses.
- ``fedmeta data synth-meds --sites N --out DIR``: the same hospitals' stays as MEDS event
  streams and label files (``kind: meds`` site.yaml each), with the flat tables in ``DIR/flat``.
- ``fedmeta data synth-images --sites N --out DIR``: N imaging sites (MedMNIST .npz + site.yaml).
- ``fedmeta data check --site site.yaml``: validate a site's data and print rows, outcome
  prevalence and missingness (or images per class; for a MEDS site its shards, events, label
  prevalence per split, events past the prediction time, and what it would share for the
  feature agreement), without training.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedmeta.common.config import TaskConfig
    from fedmeta.sitecore.data import SiteSummary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate synthetic sites or check a site's data")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    e = data_sub.add_parser("synth-ehr", help="write N synthetic MIMIC-style hospitals")
    e.add_argument("--sites", type=int, required=True, help="number of hospitals")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--stays", type=int, default=400, help="mean stays per hospital (default 400)")
    e.add_argument(
        "--shift",
        type=float,
        default=1.0,
        help="scale of between-hospital differences (0: identical hospitals)",
    )
    e.add_argument("--format", choices=("csv", "parquet"), default="csv")
    e.set_defaults(func=_synth_ehr)

    m = data_sub.add_parser(
        "synth-meds", help="write N synthetic hospitals as MEDS event streams and label files"
    )
    m.add_argument("--sites", type=int, required=True, help="number of hospitals")
    m.add_argument("--out", type=Path, required=True, help="output folder")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--stays", type=int, default=400, help="mean stays per hospital (default 400)")
    m.add_argument(
        "--shift",
        type=float,
        default=1.0,
        help="scale of between-hospital differences (0: identical hospitals)",
    )
    m.add_argument(
        "--recode-rate",
        type=float,
        default=0.3,
        help="chance a hospital reports glucose/lactate/potassium under the whole-blood code",
    )
    m.add_argument(
        "--vitals-every", type=int, default=60, help="minutes between vital signs (default 60)"
    )
    m.add_argument("--shard-subjects", type=int, default=250, help="subjects per shard")
    m.add_argument(
        "--subject-splits",
        action="store_true",
        help="also write metadata/subject_splits.parquet (train/tuning/held_out)",
    )
    m.set_defaults(func=_synth_meds)

    i = data_sub.add_parser("synth-images", help="write N synthetic imaging sites (MedMNIST .npz)")
    i.add_argument("--sites", type=int, required=True, help="number of sites")
    i.add_argument("--out", type=Path, required=True, help="output folder")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    i.add_argument("--train-per-class", type=int, default=30)
    i.add_argument("--val-per-class", type=int, default=5)
    i.add_argument("--test-per-class", type=int, default=15)
    i.add_argument(
        "--shift",
        type=float,
        default=1.0,
        help="scale of between-scanner differences (0: identical scanners)",
    )
    i.set_defaults(func=_synth_images)

    c = data_sub.add_parser("check", help="validate a site's data and print a summary")
    c.add_argument("--site", type=Path, required=True, help="the site's site.yaml (or its folder)")
    c.add_argument(
        "--config",
        type=Path,
        default=None,
        help="experiment YAML: its data split and tasks settings are checked",
    )
    c.add_argument("--support", type=int, default=None, help="override tasks.support")
    c.add_argument("--query", type=int, default=None, help="override tasks.query")
    c.add_argument("--ways", type=int, default=None, help="override tasks.ways (images)")
    c.set_defaults(func=_check)


def _synth_ehr(args: argparse.Namespace) -> int:
    from fedmeta.common.data.synth_ehr import write_synth_ehr

    paths = write_synth_ehr(
        args.out,
        sites=args.sites,
        seed=args.seed,
        mean_stays=args.stays,
        shift=args.shift,
        file_format=args.format,
    )
    print(f"wrote {len(paths)} hospitals to {args.out} (schema: {args.out / 'schema.yaml'})")
    print(f"check one: fedmeta data check --site {paths[0]}")
    return 0


def _synth_meds(args: argparse.Namespace) -> int:
    from fedmeta.common.data.meds.synth import write_synth_meds

    paths = write_synth_meds(
        args.out,
        sites=args.sites,
        seed=args.seed,
        stays=args.stays,
        shift=args.shift,
        recode_rate=args.recode_rate,
        vitals_every_min=args.vitals_every,
        shard_subjects=args.shard_subjects,
        subject_splits=args.subject_splits,
    )
    print(f"wrote {len(paths)} MEDS hospitals to {args.out} (flat tables: {args.out / 'flat'})")
    print(f"site files: {paths[0]} ...")
    return 0


def _synth_images(args: argparse.Namespace) -> int:
    from fedmeta.common.data.synth_images import write_synth_images

    paths = write_synth_images(
        args.out,
        sites=args.sites,
        seed=args.seed,
        size=args.size,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        shift=args.shift,
    )
    print(f"wrote {len(paths)} imaging sites to {args.out}")
    print(f"check one: fedmeta data check --site {paths[0]}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedmeta.common.config import DataConfig, TaskConfig, load_config
    from fedmeta.sitecore.data import check_site

    if args.config is not None:
        cfg = load_config(args.config)
        data, tasks = cfg.data, cfg.tasks
    else:
        data, tasks = DataConfig(), TaskConfig()
    overrides = {
        k: getattr(args, k) for k in ("support", "query", "ways") if getattr(args, k) is not None
    }
    if overrides:
        from fedmeta.common.yamlio import validate

        tasks = validate(TaskConfig, {**tasks.model_dump(), **overrides}, source="<command line>")
    s = check_site(args.site, data=data, tasks=tasks)
    if s.kind == "meds":
        return _print_meds(s, tasks)
    print(f"site {s.name} ({s.kind}) from {s.source}")
    print(f"  data: {s.data_path}")
    unit = "rows" if s.kind == "ehr" else "images"
    print(f"  {unit}: {s.n_rows} (train {s.n_train}, test {s.n_test})")
    if s.kind == "ehr":
        print(f"  encoded features: {s.n_features}")
        print("  outcomes (prevalence among labelled rows):")
        for o, p in s.prevalence.items():
            print(f"    {o:<24} {p:6.1%}  ({s.labelled[o]} labelled)")
        print("  missing values:")
        for f, m in s.missing.items():
            if m > 0:
                print(f"    {f:<24} {m:6.1%}")
        if not any(m > 0 for m in s.missing.values()):
            print("    none")
        if s.units:
            print("  rows per unit: " + ", ".join(f"{u} {n}" for u, n in s.units.items()))
        print(f"  tasks: support {tasks.support} + query {tasks.query} patients per outcome: ok")
    else:
        print(f"  image shape: {s.image_shape}")
        print(
            "  training images per class: "
            + ", ".join(f"{c} {n}" for c, n in s.class_counts.items())
        )
        print(f"  tasks: {tasks.ways}-way, {tasks.support} shots + {tasks.query} queries: ok")
    print("ok: the site's data is valid")
    return 0



def _print_meds(s: SiteSummary, tasks: TaskConfig) -> int:
    from fedmeta.common.data.meds.check import summary_lines

    for line in summary_lines(s.meds):
        print(line)
    print(f"  tabularised: {s.n_train:,} training and {s.n_test:,} test rows, {s.n_features:,} "
          "features (from this site's own codes; a consortium agrees on its own)")
    print(f"  feature agreement: this site would share patient counts of {s.shared_codes:,} codes, "
          f"those seen in at least k = {s.min_subjects} patients (min_subjects; a deployed site's "
          "policy min_patients raises k); no other code, no id, time or value leaves the site")
    print(f"  tasks: support {tasks.support} + query {tasks.query} patients per outcome: ok")
    print("ok: the site's data is valid")
    return 0
