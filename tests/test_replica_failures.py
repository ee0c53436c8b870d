"""One replica under misuse and failure (in-process, no Ray): a duplicate request id, status read
while the loop runs, weight reads that block, overlapping commits, staged tensors the caller
still owns, commands left behind by a timed-out caller."""

import pytest
from conftest import PROMPTS
from service_helpers import wait_until

from rollout.service.messages import Finished, RequestDone, Started

PARAMS = dict(max_tokens=40, seed=1)


def records(gen) -> list[dict]:
    out = []
    for message in gen:
        if isinstance(message, Finished):
            out += message.records
        if isinstance(message, RequestDone):
            break
    return out


def test_a_duplicate_request_id_is_refused_and_the_first_caller_still_gets_its_trajectories(make_replica):
    replica = make_replica("dup")
    first = replica.generate("same", PROMPTS, PARAMS, 0)
    assert isinstance(next(first), Started)
    with pytest.raises(ValueError, match="request_id 'same' is already running"):
        next(replica.generate("same", PROMPTS, PARAMS, 0))
    got = records(first)
    assert sorted((r["prompt_index"], r["sample_index"]) for r in got) == [(i, 0) for i in range(len(PROMPTS))]


def test_status_reads_a_snapshot_and_never_walks_the_engines_live_structures(make_replica):
    """status() runs on Ray's threads while the engine loop mutates the waiting queue and the
    drafting estimates; walking them there raised "deque mutated during iteration" under load.
    Here any walk of them from another thread than the loop is recorded."""
    import threading
    from collections import deque

    replica = make_replica("snap")
    off_loop = []

    def guard(cls):
        class Guarded(cls):
            def __iter__(self):
                if threading.current_thread() is not replica._loop:
                    off_loop.append(cls.__name__)
                return super().__iter__()

            def items(self):
                if threading.current_thread() is not replica._loop:
                    off_loop.append(cls.__name__)
                return super().items()
        return Guarded

    replica._call(lambda: setattr(replica.engine.scheduler, "waiting", guard(deque)(replica.engine.scheduler.waiting)),
                  "guard")
    drafting = replica.engine.drafting
    replica._call(lambda: setattr(drafting, "estimates", guard(dict)(drafting.estimates)), "guard")
    gens = [replica.generate(f"r{i}", PROMPTS, dict(PARAMS, n=8, max_tokens=200), 0) for i in range(3)]
    for g in gens:
        assert isinstance(next(g), Started)
    seen = [replica.status() for _ in range(200)]
    seen.append(wait_until(lambda: (lambda s: s if s["running_requests"] else None)(replica.status()),
                           what="a snapshot showing the running requests"))
    for g in gens:
        records(g)
    assert off_loop == []
    assert "acceptance" in seen[-1] and seen[-1]["running_requests"] > 0


def call_within(seconds: float, fn, *args):
    """fn(*args) on a helper thread; fails the test (instead of hanging it) if it blocks."""
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


@pytest.mark.parametrize("where", ["in_directory", "as_the_path"])
def test_a_fifo_in_an_update_from_disk_is_refused_without_being_opened(make_replica, tmp_path, where):
    import os

    from rollout.service.weights import WeightMismatchError
    replica = make_replica("fifo")
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(WeightMismatchError, match="is not a regular file"):
        call_within(30, replica.stage_from_disk, 1, str(tmp_path if where == "in_directory" else fifo))
    assert replica._staged is None
    assert records(replica.generate("after", PROMPTS, PARAMS, 0))  # the replica still serves


def test_a_read_that_hangs_ends_at_the_deadline_while_the_engine_keeps_stepping(make_replica, tmp_path,
                                                                                  monkeypatch):
    import threading
    import time

    import rollout.service.weights as weights
    from safetensors.torch import save_file
    replica = make_replica("slow")
    save_file({k: v.contiguous() for k, v in replica.engine.model.state_dict().items()}, tmp_path / "m.safetensors")
    release, stepped = threading.Event(), []

    def hanging_read(*args):
        before = replica.engine.totals.generated_tokens
        end = time.monotonic() + 30
        while replica.engine.totals.generated_tokens == before and time.monotonic() < end:
            time.sleep(0.01)
        stepped.append(replica.engine.totals.generated_tokens > before)
        release.wait(60)  # a read stuck in the kernel
        return {}
    monkeypatch.setattr(weights, "read_tensors", hanging_read)
    gen = replica.generate("busy", PROMPTS, dict(PARAMS, max_tokens=200), 0)
    assert isinstance(next(gen), Started)
    try:
        with pytest.raises(TimeoutError, match="before the update's deadline"):
            call_within(30, replica.stage_from_disk, 1, str(tmp_path), 2.0)
    finally:
        release.set()
    assert stepped == [True]  # the engine generated while the read was stuck
    assert len(records(gen)) == len(PROMPTS) and replica._staged is None
