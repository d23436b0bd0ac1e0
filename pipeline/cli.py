"""``salmap run | read | report | verify | analyze | export | shards | sanity | init``, ``salmap --version``.

Exit codes: 0 every sample has a row and no unit has more error rows than
``run.max_error_rate``; 1 unexpected internal error; 2 config error (bad key, type or name; no
shard of input.shards exists; a changed config for committed rows); 3 some shard or unit could
not be completed, a missing shard among existing ones included (restated in one closing block,
and listed in manifest.json), or the run was interrupted (Ctrl-C, SIGTERM, or Ray failing under
it: a raylet, the GCS or a node that died); 4 the run is locked by another driver; 5 every
shard is done but some unit's share of error rows is above ``run.max_error_rate`` (default
0.1). The start-up storage probe exits 1 when the endpoint does not answer (may be transient; a
retry resumes) and 2 for credentials, permissions or a missing bucket; nothing was started
either way. Every line passes :func:`salmap.pipeline.redact.redact` (no credentials in URLs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .config import ConfigError, load_config
from .interrupt import interrupt_reason, sigterm_as_interrupt
from .redact import redact
from .run import (
    EXIT_CONFIG,
    EXIT_ERROR_RATE,
    EXIT_INCOMPLETE,
    EXIT_INTERNAL,
    EXIT_LOCKED,
    EXIT_OK,
)
from .storage import StorageCheckError
from .supervise import note, run_supervised, supervised

NO_SUPERVISOR = "SALMAP_NO_SUPERVISOR"  # 1: run the driver in this process (debugging)


def say(line: str, err: bool = True) -> None:
    """One line to stderr (or stdout), credentials in URLs redacted, in ONE write: a driver that
    Ray's core ends between the text and its newline would glue the next line onto it."""
    stream = sys.stderr if err else sys.stdout
    stream.write(redact(line) + "\n")
    stream.flush()

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # demo.yaml, example.yaml


def _default_config() -> str:
    """configs/demo.yaml from the working directory, else the copy installed with salmap."""
    here = Path("configs/demo.yaml")
    if here.is_file():
        return str(here)
    packaged = PACKAGED_CONFIGS / "demo.yaml"
    if packaged.is_file():
        return str(packaged)
    raise ConfigError("no config given and configs/demo.yaml not found; pass a config file "
                      "(salmap init writes the examples)")


def _state(uid: str, u: dict, result) -> str:
    """done, INCOMPLETE (shards pending, failed or missing) or ERRORS (above max_error_rate)."""
    units = getattr(result, "units", {})
    blamed = [f for f in result.failures if f.split(":", 1)[0] in units]
    if u.get("shards_pending") or u.get("shards_incomplete") or \
            any(f.startswith(f"{uid}:") for f in blamed) or len(blamed) < len(result.failures):
        return "INCOMPLETE"  # a failure naming no unit (a missing shard) concerns them all
    return "ERRORS" if uid in getattr(result, "over_error_rate", ()) else "done"


def _print_units(result, out=print) -> None:
    rows = []
    for uid, u in result.units.items():
        rate = u.get("images_per_s")
        rows.append((uid, _state(uid, u, result), str(u["rows"]), str(u["errors"]),
                     f"{rate:.2f}" if rate else "-", f"{result.output}/{u['data']}"))
    header = ("unit", "state", "rows", "errors", "images/s", "parquet")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        out(redact("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()))


def closing_block(result) -> list[str]:
    """What went wrong, restated once at the very end (after the tables), with the exit code:
    each failure, and each unit's share of error rows when one is above run.max_error_rate."""
    lines = []
    if result.over_error_rate:
        shares = ", ".join(
            f"{uid} {rate:.1%} ({result.units[uid]['errors']} of {result.units[uid]['rows']} "
            f"rows){' > max' if uid in result.over_error_rate else ''}"
            for uid, rate in sorted(result.error_rates.items()))
        lines.append(f"salmap: error rows above run.max_error_rate={result.max_error_rate:g}: "
                     f"{shares}")
    if result.failures:
        lines.append(f"salmap: run {result.run_id!r} ended incomplete: {len(result.failures)} "
                     "failure(s); run the same command again to retry what is missing:")
        lines.extend(f"salmap: FAILED {f}" for f in result.failures)
    if lines:
        lines.append(f"salmap: exit {result.exit_code} "
                     f"({'error rate' if result.exit_code == EXIT_ERROR_RATE else 'incomplete'}); "
                     f"details in {result.output}/manifest.json")
    return [redact(ln) for ln in lines]


def cmd_run(args: argparse.Namespace) -> int:
    """``salmap run``: load the config (or the demo's), run the job, print its outcome; the exit
    code."""
    from .lock import LockHeld, LockLost
    from .logs import StderrFilter, quiet_ray_logging
    from .run import run_job

    config = args.config
    overrides = list(args.overrides)
    if config and "=" in config and not os.path.exists(config):
        overrides.insert(0, config)
        config = None
    cfg = load_config(config or _default_config(), overrides,
                      allow_remote_code=getattr(args, "allow_remote_code", False))
    verbose = bool(getattr(args, "verbose", False))
    quiet_ray_logging(verbose)
    noise = StderrFilter() if not verbose else None
    try:
        if noise is not None:
            noise.start()
        with sigterm_as_interrupt():  # a scheduler's SIGTERM unwinds like Ctrl-C: exit 3
            result = run_job(cfg, out=lambda line: say(line, err=False), report=True)
    except (LockHeld, LockLost) as err:  # LockLost: another driver took the run over
        say(f"salmap: {err}")
        return EXIT_LOCKED
    finally:
        if noise is not None:
            noise.stop()
    _print_units(result)
    try:
        from .summary import print_summaries

        print_summaries(result.units)
    except ImportError:
        pass
    say(f"\nread it:  import salmap\n"
        f"          df = salmap.read({result.output!r})  # maps=True: each row's map as [h, w]\n"
        f"   or:    salmap read {result.output}", err=False)
    if result.report:  # written by run_job under the run's lock; its path is stdout's last line
        say(f"report: {result.report}", err=False)
    for line in closing_block(result):
        say(line)
    return result.exit_code


def cmd_read(args: argparse.Namespace) -> int:
    """``salmap read``: print a run's committed rows (or write its maps); the exit code."""
    from .read import (
        HEAVY_COLUMNS,
        MAP_COLUMN,
        RunNotFound,
        UnitNotFound,
        count_rows,
        head,
        read_run,
        resolve_unit,
        to_maps,
    )
    from .read import units as run_units

    try:
        found = run_units(args.run, endpoint=args.endpoint)
        if args.unit:
            found = [resolve_unit(args.unit, found)]
        datasets = {u: read_run(args.run, unit=u, endpoint=args.endpoint) for u in found}
    except (RunNotFound, UnitNotFound) as err:
        print(f"salmap: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as err:  # a run without committed rows yet
        print(f"salmap: {err}", file=sys.stderr)
        return EXIT_INTERNAL
    frames = []
    for u, ds in datasets.items():
        typ = ds.schema.field(MAP_COLUMN).type if MAP_COLUMN in ds.schema.names else None
        shape = "x".join(map(str, typ.shape)) if typ is not None else "?"
        dtype = str(typ.value_type).replace("halffloat", "float16") if typ is not None else "?"
        n = count_rows(ds)
        print(f"{u}: {n} committed rows, maps {shape} ({dtype})")
        # the first rows only: ``salmap read`` prints a head, it never loads the unit
        frames.append(head(ds, args.head, [c for c in ds.schema.names if c not in HEAVY_COLUMNS]))
    if args.maps:
        if len(datasets) != 1:
            print("salmap: --maps needs one unit (--unit)", file=sys.stderr)
            return EXIT_CONFIG
        ((u, ds),) = datasets.items()
        import numpy as np

        table = ds.to_table(columns=["sample_id", "target", "status", MAP_COLUMN])
        np.savez_compressed(args.maps, maps=to_maps(table.column(MAP_COLUMN)),
                            sample_id=np.array(table.column("sample_id").to_pylist(), dtype=str),
                            target=np.array([-1 if t is None else t for t in
                                             table.column("target").to_pylist()], dtype=np.int64),
                            status=np.array(table.column("status").to_pylist(), dtype=str))
        h, w = table.schema.field(MAP_COLUMN).type.shape
        print(f"wrote {args.maps}: maps [{table.num_rows}, {h}, {w}] float32 (NaN on error rows), "
              "sample_id, target, status")
        return EXIT_OK  # the maps were asked for, not the table of rows
    import pyarrow as pa

    table = pa.concat_tables(frames, promote_options="permissive") if len(frames) > 1 else frames[0]
    print(table.to_pandas().head(args.head).to_string())
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """``salmap report``: (re)write a run's HTML report; the exit code."""
    from .read import RunNotFound, units
    from .report import write_report

    try:
        units(args.run, endpoint=args.endpoint)
    except RunNotFound as err:  # nothing to report on: write no report/ folder there
        print(f"salmap: report: {err}", file=sys.stderr)
        return EXIT_CONFIG
    path = write_report(args.run, storage={"endpoint": args.endpoint} if args.endpoint else None,
                        signed=args.signed, max_samples=args.max_samples or None)
    print(f"report: {path}")
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    """``salmap analyze``: see :mod:`salmap.pipeline.analyze.cli`."""
    from .analyze.cli import run_analyze

    return run_analyze(args)


def cmd_export(args: argparse.Namespace) -> int:
    """``salmap export``: a run's pseudo-labels as COCO, VOC masks, Parquet or FiftyOne."""
    from .export import ExportError, export_run

    if args.format == "fiftyone":
        from .fiftyone_export import export_fiftyone

        folder = export_fiftyone(args.run, args.output, unit=args.unit,
                                 storage={"endpoint": args.endpoint} if args.endpoint else None)
        print(f"fiftyone: {folder}  (load: fiftyone.Dataset.from_dir({folder!r}, "
              "dataset_type=fiftyone.types.LegacyFiftyOneDataset))")
        return EXIT_OK

    try:
        written = export_run(args.run, args.format, output=args.output, unit=args.unit,
                             storage={"endpoint": args.endpoint} if args.endpoint else None,
                             class_names=args.class_names)
    except ExportError as err:
        print(f"salmap: export: {err}", file=sys.stderr)
        return EXIT_CONFIG
    for path in written:
        print(f"{args.format}: {path}")
    return EXIT_OK


def cmd_shards(args: argparse.Namespace) -> int:
    """``salmap shards``: an image folder -> WebDataset shards; lists what it skipped."""
    from .shards import IMAGE_SUFFIXES, ShardsError, write_shards

    skipped: list[str] = []
    notes: list[str] = []
    try:
        paths = write_shards(args.images, args.output, per_shard=args.per_shard,
                             labels=args.labels, prefix=args.prefix, endpoint=args.endpoint,
                             skipped=skipped, notes=notes)
    except ShardsError as err:
        print(f"salmap: shards: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if skipped:
        kinds = sorted({Path(f).suffix.lower() or "(no suffix)" for f in skipped})
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} file(s) that are not {'/'.join(sorted(IMAGE_SUFFIXES))} "
              f"images ({', '.join(kinds)}): {shown}")
    for line in notes:
        print(f"note: {line}")
    print(f"wrote 1 shard: {paths[0]}" if len(paths) == 1 else
          f"wrote {len(paths)} shards: {paths[0]} ... {paths[-1]}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """``salmap verify``: check a run's records, files and row counts; non-zero on damage."""
    from .verify import format_table, verify_run

    storage = {"endpoint": args.endpoint} if args.endpoint else None
    try:
        units = verify_run(args.run, storage)
    except FileNotFoundError as err:
        print(f"salmap: {err}", file=sys.stderr)
        return EXIT_CONFIG
    for line in format_table(units):
        print(line)
    damaged = [uid for uid, u in units.items() if not u.ok]
    if damaged:
        print(f"salmap: run {args.run} is damaged ({len(damaged)} unit(s)); see above",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    print(f"salmap: run {args.run} is healthy: every record, file and row count checks out")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    """Write the example configs (``configs/example.yaml``, ``configs/demo.yaml``)."""
    target = Path(args.folder)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sorted(PACKAGED_CONFIGS.glob("*.yaml")):
        dest = target / src.name
        if dest.exists() and not args.force:
            print(f"kept {dest} (exists; --force overwrites)")
            continue
        dest.write_text(src.read_text())
        written.append(str(dest))
    for w in written:
        print(f"wrote {w}")
    print(f"next: salmap shards my_images/ shards/  then  salmap run {target / 'example.yaml'}")
    return EXIT_OK


def cmd_constraints(args: argparse.Namespace) -> int:
    """Print the pinned torch / torchvision / Ray set (``pip install -c``)."""
    from .constraints import main as print_constraints

    return print_constraints()


def cmd_sanity(args: argparse.Namespace) -> int:
    """``salmap sanity``: the model-parameter randomization test of the config's methods."""
    from .sanity import run_sanity

    cfg = load_config(args.config or _default_config(), list(args.overrides),
                      allow_remote_code=getattr(args, "allow_remote_code", False))
    out = run_sanity(cfg, samples=args.samples)
    print(f"sanity check written: {out}")
    return EXIT_OK


REMOTE_CODE_HELP = ("run a config read from s3:// even though it names code to import and run "
                    "(a package.module:callable model source); only for configs you trust")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``salmap:`` line (exit 2), like the others."""

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(EXIT_CONFIG, f"salmap: {sub}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``salmap`` argument parser with every subcommand."""
    p = _Parser(prog="salmap", description="Saliency maps for whole image datasets, on Ray.")
    p.add_argument("--version", action="version", version=f"salmap {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray's own log lines (hidden by default)")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run (or resume) a job; no config: the embedded demo")
    r.add_argument("config", nargs="?", help="config YAML (local path or s3:// URL)")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. resources.batch_size=8")
    r.add_argument("--allow-remote-code", action="store_true", help=REMOTE_CODE_HELP)
    r.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's own log lines (hidden by default)")
    r.set_defaults(func=cmd_run)
    rd = sub.add_parser("read", help="show a run's committed rows")
    rd.add_argument("run", help="<run.output>/<run.id>")
    rd.add_argument("--unit", help="<model>__<method>, or the method (or model) alone when unambiguous")
    rd.add_argument("--endpoint", help="S3 endpoint for s3:// runs")
    rd.add_argument("--head", type=int, default=10)
    rd.add_argument("--maps", metavar="FILE.npz",
                    help="write the unit's maps as one float32 [N, h, w] array (with sample_id, "
                         "target, status) to this .npz file")
    rd.set_defaults(func=cmd_read)
    rp = sub.add_parser("report", help="write the HTML report of a run")
    rp.add_argument("run")
    rp.add_argument("--endpoint")
    rp.add_argument("--signed", choices=("diverging", "abs"), default="diverging",
                    help="how maps with negative values are drawn: a blue-white-red scale centred "
                         "at zero (default) or their absolute value")
    rp.add_argument("--max-samples", type=int, default=0,
                    help="at most this many samples in the gallery pages (default: every sample)")
    rp.set_defaults(func=cmd_report)
    from .analyze.cli import add_parser as add_analyze_parser

    add_analyze_parser(sub).set_defaults(func=cmd_analyze)
    vf = sub.add_parser("verify", help="check a run's commit records, files and row counts end "
                                       "to end (exit 0 healthy, 3 damaged)")
    vf.add_argument("run")
    vf.add_argument("--endpoint", help="S3 endpoint for s3:// runs")
    vf.set_defaults(func=cmd_verify)
    ex = sub.add_parser("export", help="write a run's pseudo-labels as COCO, VOC masks or Parquet")
    ex.add_argument("run", help="<run.output>/<run.id> (local or s3://)")
    ex.add_argument("--format", required=True, choices=["coco", "voc-masks", "parquet", "fiftyone"])
    ex.add_argument("--output", help="folder or s3:// prefix (default <run>/export/<format>)")
    ex.add_argument("--unit", help="<model>__<method> (default: every unit)")
    ex.add_argument("--class-names", help="JSON list / object or text file (one name a line)")
    ex.add_argument("--endpoint", help="S3 endpoint for s3:// runs")
    ex.set_defaults(func=cmd_export)
    sh = sub.add_parser("shards", help="turn an image folder into WebDataset shards")
    sh.add_argument("images", help="folder: class sub-folders, or flat with --labels")
    sh.add_argument("output", help="output folder or s3:// prefix")
    sh.add_argument("--per-shard", type=int, default=1000)
    sh.add_argument("--labels", help="CSV or JSON of labels (and boxes) for a flat folder")
    sh.add_argument("--prefix", default="shard")
    sh.add_argument("--endpoint")
    sh.set_defaults(func=cmd_shards)
    sa = sub.add_parser("sanity", help="model-parameter randomization check")
    sa.add_argument("config", nargs="?")
    sa.add_argument("overrides", nargs="*")
    sa.add_argument("--allow-remote-code", action="store_true", help=REMOTE_CODE_HELP)
    sa.add_argument("--samples", type=int, default=8)
    sa.set_defaults(func=cmd_sanity)
    it = sub.add_parser("init", help="write the example configs to ./configs (to use salmap "
                                     "outside a source checkout)")
    it.add_argument("folder", nargs="?", default="configs")
    it.add_argument("--force", action="store_true", help="overwrite existing files")
    it.set_defaults(func=cmd_init)
    co = sub.add_parser("constraints", help="print the locked package set (torch, torchvision, Ray, "
                                            "...) salmap is tested with (pip install -c); also "
                                            "`python -m salmap.pipeline.constraints` before the deps")
    co.set_defaults(func=cmd_constraints)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line. From the console (``argv`` None), ``salmap run`` runs its driver in a
    supervised child process (:mod:`salmap.pipeline.supervise`): Ray dying under it still ends in one
    salmap line, exit 3, the manifest ``interrupted`` and the lock released."""
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not [a for a in argv if a not in ("-v", "--verbose")]:
        argv = [*argv, "run"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    if (from_console and args.func is cmd_run and not supervised()
            and not os.environ.get(NO_SUPERVISOR)):
        return run_supervised(argv)
    code = _dispatch(args)
    note(exit=code)  # for the supervisor: this driver ended on its own
    return code


def _dispatch(args: argparse.Namespace) -> int:
    from .ray_failure import RayFailure

    try:
        return args.func(args)
    except ConfigError as err:
        say(f"salmap: config error: {err}")
        return EXIT_CONFIG
    except StorageCheckError as err:  # found before any work, nothing was started
        say(f"salmap: storage error: {err}")
        # an endpoint that did not answer may come back (1: schedulers retry); credentials,
        # permissions or a missing bucket need a person (2, like a config error)
        return EXIT_INTERNAL if err.transient else EXIT_CONFIG
    except KeyboardInterrupt as err:
        say(f"salmap: interrupted ({interrupt_reason(err)}); run the same command again to "
            "resume")
        note(said=True)
        return EXIT_INCOMPLETE
    except RayFailure as err:  # the manifest says interrupted, with this cause
        say(f"salmap: interrupted: Ray failed: {err.what}; run the same command again to resume")
        note(said=True)
        return EXIT_INCOMPLETE
    except Exception as err:  # noqa: BLE001
        if os.environ.get("SALMAP_DEBUG"):
            raise
        say(f"salmap: error: {type(err).__name__}: {err} (set SALMAP_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
