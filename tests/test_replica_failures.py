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
