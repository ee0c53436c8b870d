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


def perturbed_state(replica, seed: int) -> dict:
    import torch
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in replica.engine.model.state_dict().items()}


def test_a_second_commit_during_a_wait_mode_drain_fails_the_first_instead_of_leaving_it_waiting(make_replica):
    """Version 1's wait-mode commit waits for a running request; version 2 is staged (replacing
    version 1's weights) and committed meanwhile. The first committer used to wait out its whole
    timeout for a swap that had been overwritten; now it learns at once that it was superseded."""
    from concurrent.futures import ThreadPoolExecutor

    replica = make_replica("twice")
    gen = replica.generate("long", PROMPTS, dict(PARAMS, max_tokens=200), 0)
    assert isinstance(next(gen), Started)
    pool = ThreadPoolExecutor(2)
    try:
        replica.stage_weights(1, perturbed_state(replica, 1))
        first = pool.submit(replica.commit_weights, 1, "wait", 60.0)
        wait_until(lambda: replica._swap is not None, what="version 1's commit pending")
        replica.stage_weights(2, perturbed_state(replica, 2))
        second = pool.submit(replica.commit_weights, 2, "wait", 60.0)
        with pytest.raises(RuntimeError, match="version 1 was superseded by version 2"):
            first.result(timeout=30)
        records(gen)
        assert second.result(timeout=60) == 2 and replica.engine.weight_version == 2
    finally:
        pool.shutdown(wait=False)


def test_staged_weights_are_the_replicas_own_copy_not_the_callers_tensors(make_replica):
    """`t.to(device, dtype)` returns t itself when nothing changes: an in-process caller that
    edited its tensors between stage and commit changed what was served."""
    import torch
    replica = make_replica("alias")
    state = perturbed_state(replica, 3)
    expected = {k: v.clone() for k, v in state.items()}
    replica.stage_weights(1, state)
    for t in state.values():
        t.zero_()
    replica.commit_weights(1)
    served = replica.engine.model.state_dict()
    assert all(torch.equal(served[k], expected[k]) for k in expected)


def test_a_request_added_after_its_caller_timed_out_is_dropped_not_generated_for_nobody(make_replica):
    """The add command started just as the caller's wait for the loop ran out: cancelling it
    failed, and the request used to run to its end with nobody reading it."""
    import threading

    replica = make_replica("late", lock_timeout=0.5)
    entered, release, added = threading.Event(), threading.Event(), []
    check = replica.engine.check_capacity

    def slow_check(*args):
        entered.set()
        release.wait(30)  # the caller times out while the add runs
        return check(*args)
    replica.engine.check_capacity = slow_check
    add_request = replica.engine.add_request
    replica.engine.add_request = lambda *a: added.append(add_request(*a)) or added[-1]
    with pytest.raises(TimeoutError, match="waited 0 s for the engine loop"):
        next(replica.generate("late", PROMPTS, dict(PARAMS, max_tokens=200), 0))
    assert entered.is_set()
    release.set()
    wait_until(lambda: added and added[0].done, what="the late request ended")
    assert {s.out.finish_reason for s in added[0].sequences} == {"abort"}
    assert "late" not in replica._streams
