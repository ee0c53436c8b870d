"""One replica under misuse and failure (in-process, no Ray): a duplicate request id, status read
while the loop runs, weight reads that block, overlapping commits, staged tensors the caller
still owns, commands left behind by a timed-out caller."""

import pytest
from conftest import PROMPTS

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
    gens = [replica.generate(f"r{i}", PROMPTS, dict(PARAMS, n=8), 0) for i in range(3)]
    for g in gens:
        assert isinstance(next(g), Started)
    seen = [replica.status() for _ in range(200)]
    for g in gens:
        records(g)
    assert off_loop == []
    assert any(s["running_requests"] for s in seen) and "acceptance" in seen[-1]
