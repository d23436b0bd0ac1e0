"""A round-robin timer that survives a shared CPU: wall time or this process's CPU time.

On a machine shared with other jobs (load average above the core count), wall times of the
same call vary several-fold between rounds. ``--timer cpu`` measures
``time.process_time()`` with torch limited to ``--threads`` (default 1) instead: the CPU
seconds this process spent, which other processes do not inflate (one intra-op thread, so
no OpenMP spin-waiting is counted). Rates are then images per CPU-second. ``--timer wall``
is :func:`bench.common.interleaved` (median wall time; use it on an idle machine or a GPU).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from bench.common import header, interleaved


def add_timer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timer", choices=("auto", "wall", "cpu"), default="auto",
                        help="auto: cpu on a CPU device, wall on CUDA")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 with --timer cpu, else torch's default)")


def setup_timer(args: argparse.Namespace, device: torch.device) -> str:
    """Resolve ``args.timer`` and set the torch thread count; return a line for the header."""
    if args.timer == "auto":
        args.timer = "wall" if device.type == "cuda" else "cpu"
    threads = args.threads or (1 if args.timer == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    unit = "CPU seconds of this process (time.process_time)" if args.timer == "cpu" else "wall time"
    return f"timer: {unit}, median of round-robin repeats, torch threads {torch.get_num_threads()}"


def measure(fns: dict[str, Callable[[], object]], device: torch.device, timer: str,
            repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each callable, measured round-robin."""
    clock = time.perf_counter if timer == "wall" else time.process_time
    return interleaved(fns, device, repeats=repeats, warmup=warmup, clock=clock)


def parse_timed_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                     title: str) -> tuple[argparse.Namespace, torch.device, str]:
    """Add the timer options, parse ``argv``, set up the timer and print the header: the
    arguments, the device and the timer's line for the header."""
    add_timer_args(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    timer_line = setup_timer(args, device)
    header(title, device)
    return args, device, timer_line
