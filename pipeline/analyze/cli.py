"""The ``salmap analyze`` subcommand: its options and what it prints."""

from __future__ import annotations

import argparse
import sys

from salmap.workers.unit_id import UnitId


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``analyze`` to the ``salmap`` subparsers."""
    from . import RAY_THRESHOLD
    from .core import DEFAULT_CAP, MAX_CLUSTERS, MERGE_COSINE, SIDE

    an = sub.add_parser("analyze", help="strategy clusters and shortcut flags per class (SpRAy)")
    an.add_argument("run", help="<run.output>/<run.id> (local or s3://)")
    an.add_argument("--unit", help="<model>__<method> (default: every unit)")
    an.add_argument("--side", type=int, default=SIDE, help="maps are compared at SIDE x SIDE")
    an.add_argument("--cap", type=int, default=DEFAULT_CAP,
                    help="maps per class embedded at most (hash sample); the rest are assigned "
                         "to the nearest cluster")
    an.add_argument("--max-clusters", type=int, default=MAX_CLUSTERS)
    an.add_argument("--merge-cosine", type=float, default=MERGE_COSINE,
                    help="merge clusters whose centroids are at least this similar")
    an.add_argument("--ray-threshold", type=int, default=RAY_THRESHOLD,
                    help="a unit with more rows is analysed in Ray tasks (classes in parallel)")
    an.add_argument("--ray-address", help="the run's Ray cluster (default: a local instance, "
                                          "only above --ray-threshold)")
    an.add_argument("--fiftyone", metavar="FOLDER", nargs="?", const="",
                    help="also export the run to a FiftyOne dataset folder (default "
                         "<run>/export/fiftyone; local runs)")
    an.add_argument("--no-report", action="store_true",
                    help="do not rewrite the run's HTML report with the analysis section")
    an.add_argument("--endpoint", help="S3 endpoint for s3:// runs")
    return an


def run_analyze(args: argparse.Namespace) -> int:
    from ..read import RunNotFound, UnitNotFound
    from ..run import EXIT_CONFIG, EXIT_OK
    from . import Params, analyze_run, summary_lines

    storage = {"endpoint": args.endpoint} if args.endpoint else None
    if args.side < 4 or args.cap < 3 or args.max_clusters < 1:
        print("salmap: analyze: --side must be >= 4, --cap >= 3, --max-clusters >= 1",
              file=sys.stderr)
        return EXIT_CONFIG
    params = Params(side=args.side, cap=args.cap, max_clusters=args.max_clusters,
                    merge_cosine=args.merge_cosine)
    try:
        result = analyze_run(args.run, storage=storage, unit=args.unit, params=params,
                             ray_threshold=args.ray_threshold, ray_address=args.ray_address,
                             class_names=_names(args.run, storage))
    except (RunNotFound, UnitNotFound) as err:
        print(f"salmap: {err}", file=sys.stderr)
        return EXIT_CONFIG
    for line in summary_lines(result):
        print(line)
    print(f"analysis: {args.run.rstrip('/')}/analysis/manifest.json")
    if args.fiftyone is not None:
        from ..fiftyone_export import export_fiftyone

        folder = export_fiftyone(args.run, args.fiftyone or None, storage=storage)
        print(f"fiftyone: {folder}  (load: fiftyone.Dataset.from_dir({folder!r}, "
              "dataset_type=fiftyone.types.LegacyFiftyOneDataset))")
    if not args.no_report:
        from ..report import write_report

        print(f"report: {write_report(args.run, storage=storage)}")
    return EXIT_OK


def _names(run: str, storage):
    """(unit, class id) -> class name, from the model's weights or classes.json."""
    from ..export import namer
    from ..storage import Store

    cache: dict = {}

    def name(unit: str, c: int) -> str:
        model = UnitId.parse(unit).model
        if model not in cache:
            try:
                cache[model] = namer(Store.open(run, storage), model, None)
            except Exception:  # noqa: BLE001 - names are a convenience
                cache[model] = lambda c: f"class_{int(c)}"
        return cache[model](c)

    return name
