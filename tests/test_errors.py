"""root_cause: the innermost real error in one line, out of plain chains and real Ray errors."""

from __future__ import annotations

import tarfile

import pytest
from salmap.pipeline.errors import root_cause


def _raise(fn):
    try:
        fn()
    except BaseException as err:  # noqa: BLE001
        return err
    raise AssertionError("did not raise")


def test_plain_and_chained_exceptions():
    def direct():
        raise RuntimeError("wave failed") from tarfile.ReadError("unexpected end of data")

    def during():
        try:
            {}["image"]
        except KeyError:
            raise ValueError("could not decode")  # noqa: B904 - the implicit context is the test

    def suppressed():
        try:
            {}["image"]
        except KeyError:
            raise ValueError("no image member") from None

    def multi_line():
        raise OSError("first line\n\n  second line\n")

    assert root_cause(ValueError("bad")) == "ValueError: bad"
    assert root_cause(ValueError()) == "ValueError"
    assert root_cause(_raise(direct)) == "tarfile.ReadError: unexpected end of data"
    assert root_cause(_raise(during)) == "KeyError: 'image'"
    assert root_cause(_raise(suppressed)) == "ValueError: no image member"
    assert root_cause(_raise(multi_line)) == "OSError: first line second line"


@pytest.mark.slow  # the session's Ray cluster
@pytest.mark.parametrize("compute", ["tasks", "actors"])
def test_ray_data_map_failure(ray_session, compute):
    import ray.data

    # defined here, so Ray pickles them by value (workers cannot import test modules)
    def bad_rows(batch):
        raise tarfile.ReadError("unexpected end of data")

    class BadShard:
        def __call__(self, batch):
            raise tarfile.ReadError("unexpected end of data")

    ds = ray.data.range(4, override_num_blocks=1)
    if compute == "tasks":
        ds = ds.map_batches(bad_rows, num_cpus=0.25)
    else:
        ds = ds.map_batches(BadShard, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
    err = _raise(ds.materialize)
    assert "UDF failed" in str(err)  # Ray's wrapper, with its retry hint
    assert root_cause(err) == "tarfile.ReadError: unexpected end of data"


@pytest.mark.slow
def test_ray_actor_method_failure(ray_session):
    @ray_session.remote(num_cpus=0.25)
    class Reader:
        def read(self, n):
            if n > 1:
                raise ValueError(f"shard {n} is\ncut short")
            return n

    err = _raise(lambda: ray_session.get(Reader.remote().read.remote(3)))
    assert type(err).__name__.startswith("RayTaskError")
    assert root_cause(err) == "ValueError: shard 3 is cut short"


@pytest.mark.slow
def test_ray_actor_that_fails_to_start(ray_session):
    import ray.data

    class NeedsAModel:
        def __init__(self):
            raise FileNotFoundError("weights.pt not found")

        def __call__(self, batch):
            return batch

    ds = ray.data.range(4, override_num_blocks=1).map_batches(
        NeedsAModel, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
    err = _raise(ds.materialize)
    assert root_cause(err) == "FileNotFoundError: weights.pt not found"


@pytest.mark.slow
def test_ray_nested_task_failure(ray_session):
    @ray_session.remote(num_cpus=0.25)
    def inner():
        raise tarfile.ReadError("unexpected end of data")

    @ray_session.remote(num_cpus=0.25)
    def outer():
        try:
            return ray_session.get(inner.remote())
        except Exception as err:
            raise RuntimeError("wave failed") from err

    err = _raise(lambda: ray_session.get(outer.remote()))
    assert root_cause(err) == "tarfile.ReadError: unexpected end of data"
