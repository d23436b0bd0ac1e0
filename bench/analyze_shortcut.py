"""``salmap analyze`` on a planted shortcut, full size: is the cue isolated and flagged, and
what does the analysis cost per 10^4 maps?

    .venv/bin/python bench/analyze_shortcut.py --train 4000 --test 10000 --epochs 8

The planted dataset is the project's ground-truth data (``salmap.workers.synthetic``, its
spurious-cue variant, via ``bench/planted_shortcut.py``): in ``--cue-share`` of the images a
corner mark gives the class away (class 0: top left, class 1: top right). Its ``"vgg"`` CNN
is trained on them, explains ``--test`` fresh images with salmap's Grad-CAM (8 x 8 maps), and
the maps are written as a committed run (what ``salmap run`` writes; the run itself is
stubbed by that writer, not timed). Then ``analyze_run`` is timed (in-process: below the Ray
threshold unless ``--ray-threshold`` is lowered); per class, the flagged cluster holding most
marked images is the cue cluster, and its purity and recall against the planted mark must be
>= 0.9 (exit status 1 otherwise); its flags and evidence are printed (expected:
``fixed_region`` at the class's corner). The same model explains images without the mark as
the control; its flags are printed with their evidence, not judged (none expected:
BENCHMARKS.md, section 13).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def scale(rows: int, cap: int) -> None:
    """One class of ``rows`` synthetic 8 x 8 maps (30% on a corner mark, the rest a blob at a
    random place), no model: the analysis alone, run as ``salmap analyze`` in a subprocess,
    its time and peak RSS (bounded by the per-class buffer, not by ``rows``)."""
    import resource
    import subprocess
    import sys

    from bench.planted_shortcut import write_run

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    cue = rng.random(rows) < 0.3
    centres = np.where(cue[:, None], 0.5, rng.uniform(2, 7, size=(rows, 2)))
    maps = np.exp(-((yy[None] - centres[:, 0, None, None]) ** 2
                    + (xx[None] - centres[:, 1, None, None]) ** 2) / 1.5).astype(np.float32)
    maps += rng.random(maps.shape, dtype=np.float32) * 0.05
    with tempfile.TemporaryDirectory(prefix="salmap-analyze-scale-") as tmp:
        run = write_run(os.path.join(tmp, "r"), maps, np.zeros(rows, int), np.zeros(rows, int),
                        per_file=10_000)
        del maps
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "salmap.pipeline.cli", "analyze", run, "--cap",
                              str(cap), "--no-report", "--ray-threshold", str(10 * rows)],
                             capture_output=True, text=True, check=True)
        took = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        import pyarrow.parquet as pq

        r = pq.read_table(os.path.join(run, "analysis", "cnn__gradcam", "rows.parquet")).to_pandas()
    r["cue"] = cue[r.sample_id.str.split("/").str[1].astype(int).values]
    flagged = [line for line in out.stdout.splitlines() if "FLAGGED" in line]
    print(f"\n| maps in one class | cap | wall s (subprocess, imports included) | s per 10^4 "
          f"maps | peak RSS MiB | flagged |\n|---|---|---|---|---|---|\n| {rows} | {cap} | "
          f"{took:.1f} | {took * 1e4 / rows:.1f} | {peak:.0f} | {len(flagged)} |")
    for line in flagged:
        c = int(line.split(" cluster ")[1].split(":")[0])
        m = r[r.cluster == c]
        print(f"  cluster {c}: purity {m.cue.mean():.3f}, recall {m.cue.sum() / r.cue.sum():.3f}")


def cue_clusters(rows, cue: np.ndarray, flagged: list[dict]) -> list[tuple]:
    """Per class with marked images: ``(class, cluster, size, purity, recall, flags)`` of the
    flagged cluster holding most of its marked images (cluster None: none flagged)."""
    rows = rows.assign(cue=cue[rows.sample_id.str.split("/").str[1].astype(int).values])
    out = []
    for t in sorted(rows.target.unique()):
        cls = rows[rows.target == t]
        if not cls.cue.any():
            continue
        best = (t, None, 0, 0.0, 0.0, "")
        for f in (f for f in flagged if f["target"] == t):
            m = cls[cls.cluster == f["cluster"]]
            hit = (t, f["cluster"], len(m), float(m.cue.mean()),
                   float(m.cue.sum() / cls.cue.sum()), ", ".join(f["flags"]))
            if hit[4] > best[4]:
                best = hit
        out.append(best)
    return out


def main() -> int:
    from common import load_avg, versions
    from salmap.pipeline.analyze import Params, analyze_run

    from bench.planted_shortcut import UNIT, planted_run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--cue-share", type=float, default=0.5)
    p.add_argument("--cap", type=int, default=2000)
    p.add_argument("--ray-threshold", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="accepted for run_all; the CNN runs on CPU")
    p.add_argument("--scale-rows", type=int, default=0,
                   help="instead: one class of this many synthetic maps, analysis only")
    args = p.parse_args()
    if args.scale_rows:
        print(f"# analyze_shortcut --scale-rows: {load_avg()}")
        scale(args.scale_rows, args.cap)
        return 0
    print(f"# analyze_shortcut: {versions()}; {load_avg()}; torch threads "
          f"{torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="salmap-analyze-") as tmp:
        t0 = time.perf_counter()
        run, cue, facts, model = planted_run(os.path.join(tmp, "cue"), args.train, args.test,
                                             args.cue_share, epochs=args.epochs, seed=args.seed)
        t_make = time.perf_counter() - t0
        params = Params(cap=args.cap)
        t0 = time.perf_counter()
        res = analyze_run(run, params=params, ray_threshold=args.ray_threshold)
        t_an = time.perf_counter() - t0
        rows = res.rows[UNIT].to_pandas()
        flagged = res.flagged()
        lines = cue_clusters(rows, cue, flagged)
        others = [f for f in flagged if (f["target"], f["cluster"]) not in
                  {(t, c) for t, c, *_ in lines}]
        evidence = {(f["target"], f["cluster"]): f["evidence"] for f in flagged}
        clean, _, _, _ = planted_run(os.path.join(tmp, "clean"), 0, args.test, args.cue_share,
                                     seed=args.seed, test_cue_share=0.0, model=model)
        t0 = time.perf_counter()
        control = analyze_run(clean, params=params, ray_threshold=args.ray_threshold)
        t_ctl = time.perf_counter() - t0
        info = res.manifest["units"][UNIT]
    n = len(rows)
    print(f"\nmodel: accuracy {facts['acc']:.3f}, on marked images {facts['acc_marked']:.3f}, "
          f"on unmarked images {facts['acc_unmarked']:.3f}; {facts['marked']} of {n} test "
          f"images marked; training ({args.train} images, {args.epochs} epochs) + maps + "
          f"writing the run {t_make:.1f} s (not part of the analysis)\n")
    print("| maps | classes | clusters | embedded per class (cap) | where | analysis s | "
          "s per 10^4 maps |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {n} | {info['classes']} | {info['clusters']} | {args.cap} | {info['where']} | "
          f"{t_an:.1f} | {t_an * 1e4 / n:.1f} |")
    print("\n| class | cue cluster | size | purity | recall | flags |")
    print("|---|---|---|---|---|---|")
    for t, c, size, pur, rec, fl in lines:
        print(f"| {t} | {'none flagged' if c is None else c} | {size} | {pur:.3f} | {rec:.3f} "
              f"| {fl} |")
    for t, c, *_ in lines:
        if c is not None:
            print(f"- class {t} cluster {c}: {evidence[(t, c)]}")
    print(f"\nother flagged clusters: {len(others)}"
          + "".join(f"\n- class {f['target']} cluster {f['cluster']} ({f['size']} images): "
                    f"{', '.join(f['flags'])}: {f['evidence']}" for f in others))
    print(f"\ncontrol (same model, {args.test} images without the mark): "
          f"{len(control.flagged())} cluster(s) flagged, "
          f"{control.manifest['units'][UNIT]['clusters']} clusters, analysis {t_ctl:.1f} s"
          + "".join(f"\n- class {f['target']} cluster {f['cluster']} ({f['size']} images): "
                    f"{', '.join(f['flags'])}: {f['evidence']}" for f in control.flagged()))
    ok = bool(lines) and all(c is not None and pur >= 0.9 and rec >= 0.9
                             for _, c, _, pur, rec, _ in lines)
    print(f"\npurity and recall of every cue cluster >= 0.9: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
