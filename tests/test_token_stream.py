"""A replica streaming each step's tokens (in-process, no Ray): the deltas add up to the finished
trajectories, and a consumer that does not keep up gets them merged, never a growing backlog."""

from conftest import PROMPTS
from service_helpers import wait_until

from rollout.service.messages import Finished, RequestDone, Started, Tokens

PARAMS = dict(max_tokens=24, n=2, seed=3)


def drain(gen) -> tuple[list[Tokens], list[dict]]:
    tokens, finished = [], []
    for message in gen:
        if isinstance(message, Tokens):
            tokens.append(message)
        elif isinstance(message, Finished):
            finished += message.records
        elif isinstance(message, RequestDone):
            break
    return tokens, finished


def check_deltas_add_up(tokens: list[Tokens], finished: list[dict]) -> None:
    final = {(r["prompt_index"], r["sample_index"]): r for r in finished}
    got = {key: [] for key in final}
    for message in tokens:
        for r in message.records:
            ids = got[(r["prompt_index"], r["sample_index"])]
            assert r["start"] == len(ids) and len(r["token_ids"]) == len(r["logprobs"]) > 0
            ids += r["token_ids"].tolist()
    for key, r in final.items():
        # Every delta is the finished trajectory's next tokens; its last ones come in Finished only.
        assert r["token_ids"].tolist()[:len(got[key])] == got[key] and len(got[key]) < len(r["token_ids"])


def test_each_steps_tokens_stream_and_add_up_to_the_finished_trajectories(make_replica):
    replica = make_replica("tokens")
    tokens, finished = drain(replica.generate("live", PROMPTS, PARAMS, 0, stream_tokens=True))
    assert len(finished) == 2 * len(PROMPTS) and len(tokens) > 2
    check_deltas_add_up(tokens, finished)
    plain, again = drain(replica.generate("plain", PROMPTS, PARAMS, 0))
    assert plain == [] and [r["token_ids"].tolist() for r in again] == [r["token_ids"].tolist() for r in finished]


def test_a_consumer_that_falls_behind_gets_the_tokens_merged(make_replica):
    """The consumer reads nothing until the request is done on the loop: every step's tokens
    wait as one pending set (one message), not one queued message per step."""
    replica = make_replica("slow")
    gen = replica.generate("slow", PROMPTS, PARAMS, 0, stream_tokens=True)
    assert isinstance(next(gen), Started)
    wait_until(lambda: not replica.engine.requests, what="the request done on the engine loop")
    tokens, finished = drain(gen)
    assert len(tokens) == 1 and len(finished) == 2 * len(PROMPTS)
    check_deltas_add_up(tokens, finished)
