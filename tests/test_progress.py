"""Progress while a unit runs: the line's counts, rate and ETA, the in-batch reports of
iterative methods, and the counter actor that carries them from the model actors to the
driver."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from salmap.pipeline.plan import Wave
from salmap.pipeline.progress import ProgressLine, format_line
from salmap.pipeline.tracker import WaveTracker
from salmap.workers.progress import COUNTER_NAME, ProgressReporter


def _cfg(mode: str = "lines") -> SimpleNamespace:
    return SimpleNamespace(ray=SimpleNamespace(progress=mode))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_line_counts_samples_not_rows_for_topk_and_never_overshoots():
    """targets: topk:3 gives 3 rows per sample: the count is samples, the rows are rows."""
    waves = [Wave([f"/d/s-{k:06d}.tar"]) for k in range(2)]
    tracker = WaveTracker("m__ig", "h", waves, index={"s-000000": 15, "s-000001": 14})
    clock, lines = Clock(), []
    line = ProgressLine("m__ig", 29, _cfg(), lines.append, clock=clock, source=lambda: 0.0,
                        thread=False)
    for k, n in ((0, 15), (1, 14)):
        keys = [(f"s-{k:06d}/{i}", f"s-{k:06d}", t, "ok") for i in range(n) for t in (3, 7, 9)]
        tracker.add_file(f"data/m/ig/w/part-{k}.parquet", keys)
        tracker.add_marker(f"s-{k:06d}", n)
        line.update(tracker.samples_written)
        for record in tracker.ready():
            line.wave_done(record)
        clock.t += 30
        line.tick()
    assert lines[-1].startswith("salmap: m__ig: 29/29 samples (100%), 87 rows committed, ")
    assert lines[-1].endswith("ETA 0m00s")
    # a count past the total (a retried batch reported twice) is capped, the ETA never negative
    assert format_line("u", 30.0, 29, 0.5).startswith("salmap: u: 29/29 samples (100%)")
    assert "ETA 0m00s" in format_line("u", 30.0, 29, 0.5) and "-" not in format_line("u", 30.0, 29, 0.5)


def test_line_moves_with_the_actors_reports_and_gives_a_real_eta():
    clock, lines, reported = Clock(), [], [0.0]
    line = ProgressLine("m__ig", 29, _cfg(), lines.append, clock=clock,
                        source=lambda: reported[0], thread=False)
    line.tick()  # start-up: nothing yet
    assert "0/29 samples (0%)" in lines[-1] and "ETA ?" in lines[-1]
    clock.t += 60  # model loading: no progress for a minute
    line.tick()
    for _ in range(4):  # then 0.5 samples per 10 s, inside one long batch (nothing written)
        clock.t += 10
        reported[0] += 0.5
        line.tick()
    # whole samples; the percentage follows the fraction inside the batch
    assert [re.search(r"(\S+)/29 samples \((\d+)%\)", ln).groups() for ln in lines[-4:]] == \
        [("0", "2"), ("1", "3"), ("1", "5"), ("2", "7")]
    # the rate is measured from the first progress, not from the start (model loading)
    assert "0.05 samples/s" in lines[-1]
    assert lines[-1].endswith("ETA 9m00s")  # 27 samples left at 0.05/s
    # what was written never makes the count go back, a slower report neither
    line.update(3)
    reported[0] = 2.5
    clock.t += 10
    assert re.search(r" 3/29 samples", line.tick())


def test_line_is_silent_with_progress_off_and_finishes_once():
    lines: list[str] = []
    line = ProgressLine("u", 4, _cfg("off"), lines.append, source=lambda: 1.0, thread=False)
    line.tick()
    line.finish()
    assert lines == []
    clock = Clock()
    line = ProgressLine("u", 4, _cfg("auto"), lines.append, clock=clock, source=lambda: 0.0,
                        thread=False)
    line.update(4)
    clock.t += 8
    line.finish()
    assert lines == ["salmap: u: 4/4 samples (100%), 0 rows committed, 0.50 samples/s, done in 0m08s"]


def test_line_prints_every_interval_from_its_own_thread():
    lines: list[str] = []
    reported = [0.0]
    line = ProgressLine("u", 10, _cfg(), lines.append, interval=0.05, source=lambda: reported[0])
    try:
        deadline = time.time() + 5
        while len(lines) < 3 and time.time() < deadline:
            reported[0] += 1
            time.sleep(0.05)
    finally:
        line.finish()
    assert len(lines) >= 4 and lines[-1].endswith(tuple(f"done in 0m0{k}s" for k in range(10)))


# -- inside a method call ----------------------------------------------------------------------
def test_tracked_loops_report_a_monotonic_fraction_of_the_call(tiny_model):
    from salmap.workers.methods import build

    ig = build("integrated_gradients", tiny_model, steps=10, inner_batch_size=4)
    seen: list[float] = []
    ig.progress = seen.append
    ig(torch.randn(2, 3, 16, 16), [0, 1])
    assert len(seen) == 5 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)  # 20 rows / 4
    seen.clear()
    build("gradient", tiny_model)(torch.randn(2, 3, 16, 16), [0, 1])  # one pass: no loop
    # nested loops and parts divide their parent's step
    m = build("gradient", tiny_model)
    m.progress = seen.append
    m._spans = []
    for _ in m.track(2):
        with m.part(0.0, 0.5):
            list(m.track(2))
        with m.part(0.5, 1.0):
            list(m.chunks(3, track=True))
    assert seen == pytest.approx([0.125, 0.25, 0.5, 0.5, 0.625, 0.75, 1.0, 1.0])


class _Handle:
    """Stands in for the counter actor: records every report."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, float, float]] = []
        self.busy: list[float] = []
        self.report = SimpleNamespace(
            remote=lambda unit, key, f, p, busy=0.0: (self.reports.append((key, f, p)),
                                                      self.busy.append(busy)))


def _batch(n: int, size: int = 32) -> dict[str, np.ndarray]:
    from salmap.pipeline.decode import _DECODE_KINDS
    from salmap.workers.columns import numpy_column

    rng = np.random.default_rng(0)
    rows = [{"sample_id": f"s/{i}", "shard": "s", "key": str(i), "image_file": f"{i}.jpg",
             "label": i % 5, "orig_height": size, "orig_width": size, "resized_h": size,
             "resized_w": size, "crop_top": 0, "crop_left": 0, "crop_h": size, "crop_w": size,
             "status": "ok", "error": ""} for i in range(n)]
    batch = {"image": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)}
    for col, kind in _DECODE_KINDS.items():
        batch[col] = numpy_column(kind, [r.get(col) for r in rows])
    return batch


def test_explainer_reports_progress_inside_a_long_batch(tiny_model):
    """The actor tells the counter how far the batch is while the method iterates, then the
    batch's samples as finished."""
    from salmap.workers.actor import ActorSpec, Explainer
    from salmap.workers.models import LoadedModel, Preprocess

    spec = ActorSpec(model={"name": "tiny", "source": "in-memory"}, method="integrated_gradients",
                     method_params={"steps": 16, "inner_batch_size": 8}, channels_last=False,
                     device="cpu", metrics={"deletion_auc": {"steps": 4}})
    ex = Explainer(spec, loaded=LoadedModel(tiny_model, Preprocess(crop=32, resize=32), "layer4"))
    handle = _Handle()
    ex.progress = ProgressReporter(handle, "tiny__integrated_gradients", min_interval=0.0)
    ex(_batch(4))
    first = handle.reports
    partial = [p for _, f, p in first if f == 0]
    assert partial == sorted(partial) and 0 < partial[0] < 1 and max(partial) == 4
    in_method = [p for p in partial if p < 2]  # the method's half of the first batch (a guess)
    in_metrics = [p for p in partial if 2 < p < 4]  # then the metrics' forwards
    assert len(in_method) >= 6 and len(in_metrics) >= 2, partial
    assert first[-1][1:] == (4, 0.0)  # finished, nothing in flight
    # the method's share is learned from the timed batch
    assert ex.progress.method_share != 0.5 and 0.05 <= ex.progress.method_share <= 0.95
    handle.reports.clear()
    ex(_batch(2))
    partial = [p for _, f, p in handle.reports if f == 4]
    assert partial == sorted(partial) and max(partial) == 2
    assert handle.reports[-1][1:] == (6, 0.0)


@pytest.mark.slow
def test_counter_actor_carries_reports_from_ray_workers(ray_cluster):
    """The channel itself: a model actor in a Ray worker finds the unit's counter by name."""
    import ray

    lines: list[str] = []
    line = ProgressLine("m__channel", 10, _cfg(), lines.append, thread=False)

    @ray.remote(num_cpus=0)
    def work(unit: str) -> bool:
        rep = ProgressReporter.for_unit(unit)
        rep.min_interval = 0.0
        rep.set_partial(2.5)
        rep.end_batch(3)
        rep.set_partial(1.25)
        return rep.handle is not None

    other = ProgressLine("m__other", 10, _cfg(), lines.append, thread=False)
    try:
        assert ray.get(work.remote("m__channel"), timeout=60)
        deadline = time.time() + 20
        while line.current() < 4.25 and time.time() < deadline:
            time.sleep(0.2)
        assert line.current() == pytest.approx(4.25)
        assert other.current() == 0.0  # another unit of the job counts only its own
    finally:
        line.finish()
        other.finish()
    # reports left over (a driver interrupted before finish) do not count for the same unit
    # run again in this job: it starts from zero
    assert ray.get(work.remote("m__channel"), timeout=60)
    counter = ray.get_actor(COUNTER_NAME)
    deadline = time.time() + 20
    while ray.get(counter.value.remote("m__channel")) < 4.25 and time.time() < deadline:
        time.sleep(0.2)
    again = ProgressLine("m__channel", 10, _cfg(), lines.append, thread=False)
    try:
        assert again.current() == 0.0
    finally:
        again.finish()


# -- whole samples, totals without an index, the first rate, no repeated lines ----------------
def test_line_counts_whole_samples_and_marks_an_estimated_total():
    assert format_line("u", 4.6, 9, None).startswith("salmap: u: 4/9 samples (51%)")
    assert format_line("u", 0.9, None, None) == "salmap: u: 0 samples, rate ?"
    assert format_line("u", 3.0, 120, 1.0, 6, approx=True).startswith(
        "salmap: u: 3/~120 samples (2%), 6 rows committed, 1.00 samples/s")


def test_rate_comes_from_the_first_completed_batch():
    """No history yet (one line since progress started): the actors' own rate is shown."""
    clock, lines, state = Clock(), [], [(0.0, None)]
    line = ProgressLine("u", 40, _cfg(), lines.append, clock=clock, source=lambda: state[0],
                        thread=False)
    line.tick()
    clock.t += 70  # model loading, then the first batch of 8 ends after 20 s in the batch
    state[0] = (8.0, 0.4)
    line.tick()
    assert "8/40 samples (20%)" in lines[-1] and "0.40 samples/s, ETA 1m20s" in lines[-1]


def test_a_line_with_nothing_new_is_not_printed_again():
    """9/9 while the last wave is written and committed: one line, then one a minute saying
    for how long, then the commit's line; never the same line twice."""
    clock, lines = Clock(), []
    line = ProgressLine("u", 9, _cfg(), lines.append, clock=clock, source=lambda: 9.0,
                        thread=False)
    for _ in range(13):  # two minutes of ticks at 10 s
        line.tick()
        clock.t += 10
    line.wave_done({"samples": 9, "rows": 9})
    line.tick()
    assert len(lines) == len(set(lines)) == 4, lines
    assert lines[0].startswith("salmap: u: 9/9 samples (100%), 0 rows committed")
    assert lines[1].endswith(", no change for 1m00s") and lines[2].endswith("no change for 2m00s")
    assert "9 rows committed" in lines[3]


def test_reporter_sends_the_seconds_its_batches_took_and_the_counter_sums_actor_rates():
    from salmap.pipeline.progress import Counter

    clock, handle = Clock(), _Handle()
    rep = ProgressReporter(handle, "u", min_interval=0.0, clock=clock)
    rep.begin_batch()
    clock.t += 4
    rep.end_batch(8)
    assert handle.reports[-1][1:] == (8, 0.0) and handle.busy[-1] == 4.0
    counter = Counter()
    assert counter.state("u") == (0.0, None)
    counter.report("u", "a", 0, 2.5)  # still in its first batch: no rate from it yet
    assert counter.state("u") == (2.5, None)
    counter.report("u", "b", 8, 1.0, 4.0)
    counter.report("u", "c", 6, 0.0, 6.0)
    assert counter.state("u") == (17.5, 3.0)  # 2 + 1 samples/s


def _tar(path, n: int, members=("jpg", "cls", "json")) -> None:
    from conftest import jpeg_bytes, write_shard

    write_shard(path, [{"__key__": f"dir/s{i:04d}", **{m: jpeg_bytes(i) for m in members}}
                       for i in range(n)])


def test_shards_without_an_index_are_counted_from_their_tar_headers(tmp_path):
    from salmap.pipeline.shard_count import count_local, unit_total

    for k, n in enumerate((7, 12)):
        _tar(tmp_path / f"x-{k}.tar", n)
    shards = [str(tmp_path / "x-0.tar"), str(tmp_path / "x-1.tar")]
    assert count_local(shards[1]) == 12
    assert unit_total(shards, {}, {}) == (19, False)
    assert unit_total(shards, {"x-0": 100}, {}) == (112, False)  # the index wins where it has it
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    assert unit_total([str(tmp_path / "bad.tar")], {}, {}) == (None, False)


def test_s3_shards_without_an_index_are_estimated_from_their_listed_sizes(tmp_path, monkeypatch):
    """One ranged read of the first shard's head gives samples per byte; the bytes listed for
    the shards give the total (an estimate, marked)."""
    import salmap.pipeline.shard_count as sc

    _tar(tmp_path / "big.tar", 400)
    data = (tmp_path / "big.tar").read_bytes()
    monkeypatch.setattr(sc, "PREFIX_BYTES", len(data) // 5)
    monkeypatch.setattr(sc, "_prefix", lambda url, storage: (data[:sc.PREFIX_BYTES], len(data)))
    sc._cache.clear()
    shards = [f"s3://b/big-{k}.tar" for k in range(3)]
    identity = {f"big-{k}": {"size": len(data)} for k in range(3)}
    total, approx = sc.unit_total(shards, {}, identity)
    assert approx and abs(total - 1200) <= 12, total  # within 1%
    # a shard that fits the read is counted exactly
    monkeypatch.setattr(sc, "PREFIX_BYTES", len(data) + 10)
    monkeypatch.setattr(sc, "_prefix", lambda url, storage: (data, len(data)))
    assert sc.unit_total(shards[:1], {}, identity) == (400, False)
