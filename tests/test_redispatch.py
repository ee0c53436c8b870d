"""Samples re-dispatched after a replica failure are the samples they replace: the router sends
them with the request's seed and the caller's prompt and sample indices, which key each row's
randomness, so a retried row draws exactly what the lost row would have drawn and stays
independent of every other sample of the request.

The replicas here are in-process fakes over a real engine that die after streaming a chosen
set of trajectories (no Ray: the failure point is exact and the test takes seconds)."""

import asyncio

import pytest
import torch
from scipy.stats import chi2_contingency

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402

from rollout import Engine, SamplingParams  # noqa: E402
from rollout.engine.engine import EngineConfig  # noqa: E402
from rollout.service.messages import Finished, RequestDone, Started  # noqa: E402
from rollout.service.metrics import FrontendMetrics  # noqa: E402
from rollout.service.router import Routed, Router  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402
from rollout.wire import completion_to_record  # noqa: E402

P = [2, 3, 4]
# A correct router fails a test with probability ALPHA (fixed seeds make the outcome deterministic).
ALPHA = 1e-4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("redispatch"), "qwen2", vocab_size=8, block_size=4,
                                init_std=0.25, seed=3)
    return Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed", max_num_seqs=128))


def done(value):
    f = asyncio.get_running_loop().create_future()
    f.set_result(value)
    return f


class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class EngineReplica:
    """Runs each request on a real engine; the first request streams only the trajectories
    whose (prompt, sample) `deliver` accepts, then dies (ActorDiedError). Later requests run whole."""

    def __init__(self, engine: Engine, deliver=None):
        self.engine, self.deliver, self.calls = engine, deliver, []
        self.generate = Method(self._generate)
        self.status = Method(lambda: done(dict(weight_version=0, ready=True)))
        self.abort = Method(lambda request_id: None)

    def _generate(self, request_id, prompts, params, expected_version, timeout, rows=None, stream_tokens=False):
        self.calls.append(rows)
        request = self.engine.add_request(prompts, SamplingParams(**params), request_id, rows)
        finished = []
        while not request.done:
            finished += self.engine.step().finished
        records = sorted((completion_to_record(s.out) for s in finished),
                         key=lambda r: (r["prompt_index"], r["sample_index"]))
        deliver, self.deliver = self.deliver, None

        async def stream():
            yield done(Started(0.0, 0))
            for r in records:
                if deliver is None or deliver(r["prompt_index"], r["sample_index"]):
                    yield done(Finished([r]))
            if deliver is not None:
                raise ActorDiedError()
            yield done(RequestDone(1.0))
        return stream()


def route(engine, prompts, params, deliver) -> dict[tuple[int, int], list[int]]:
    """Tokens per (prompt, sample) through a router whose first replica dies after `deliver`."""
    async def run():
        router = Router(FrontendMetrics(None))
        router.add_replica(EngineReplica(engine, deliver), "dying")
        router.add_replica(EngineReplica(engine), "healthy")
        router._placements = -1  # the first placement goes to "dying"
        return [e.record async for e in router.generate(prompts, params) if isinstance(e, Routed)]
    got = asyncio.run(run())
    out = {(r["prompt_index"], r["sample_index"]): r["token_ids"].tolist() for r in got}
    assert len(out) == len(got) == len(prompts) * params.n  # each sample exactly once
    return out


def reference(engine, prompts, params) -> dict[tuple[int, int], list[int]]:
    return {(c.prompt_index, c.sample_index): c.token_ids for per in engine.generate(prompts, params) for c in per}


def test_retried_samples_of_repeated_prompts_are_the_samples_they_replace(engine):
    """The issue's reproduction: [P, P, P], n = 2, seed 5, temperature 1; the replica dies after
    streaming prompt 0's samples and prompt 1's first. Deriving a new seed per attempt and
    numbering the retried prompts from 0 again made (1, 1) and (2, 0) the same row twice."""
    params = SamplingParams(max_tokens=12, n=2, seed=5, temperature=1.0)
    got = route(engine, [P, P, P], params, deliver=lambda p, s: (p, s) in {(0, 0), (0, 1), (1, 0)})
    assert got == reference(engine, [P, P, P], params)


def test_retried_rows_are_distributed_like_the_rest_and_independent_of_them(engine):
    """One request of 240 copies of P, n = 2: the dying replica streams sample 0 of every odd
    prompt, so the retry holds an n = 1 part (odd prompts, sample 1) and an n = 2 part (even
    prompts). Pairs (prompt 2i, sample 0) and (prompt 2i + 1, sample 1) were the same row under
    the old keys. Checks: every retried row is exactly the row it replaces; retried first tokens
    are distributed like un-retried ones (chi-square homogeneity); the pairs are independent
    (chi-square independence; the negative control, a row paired with itself, is rejected)."""
    num = 240
    params = SamplingParams(max_tokens=1, n=2, seed=11, temperature=1.0)
    got = route(engine, [P] * num, params, deliver=lambda p, s: p % 2 == 1 and s == 0)
    assert got == reference(engine, [P] * num, params)

    retried = [got[p, s][0] for p in range(num) for s in range(2) if not (p % 2 == 1 and s == 0)]
    first_try = [got[p, 0][0] for p in range(1, num, 2)]
    vocab = 8
    table = torch.zeros(2, vocab)
    for row, tokens in enumerate((retried, first_try)):
        for t in tokens:
            table[row, t] += 1
    table = table[:, table.sum(0) >= 5]  # categories seen too rarely carry no chi-square weight
    assert chi2_contingency(table.numpy()).pvalue > ALPHA

    def independence_pvalue(a: list[int], b: list[int]) -> float:
        joint = torch.zeros(vocab, vocab)
        for x, y in zip(a, b):
            joint[x, y] += 1
        joint = joint[joint.sum(1) > 0][:, joint.sum(0) > 0]
        return chi2_contingency(joint.numpy()).pvalue
    a = [got[2 * i, 0][0] for i in range(num // 2)]
    b = [got[2 * i + 1, 1][0] for i in range(num // 2)]
    assert independence_pvalue(a, b) > ALPHA
    assert independence_pvalue(a, a) < ALPHA  # the test sees a dependence as strong as the old bug's


@pytest.mark.parametrize("rows,match", [([(0, [0, 1])], "one .* per prompt"), ([(0, [0]), (1, [0])], "n=2"),
                                        ([(0, [0, 1]), (0, [1, 2])], "appears twice")])
def test_rows_that_do_not_name_each_sample_once_are_refused(engine, rows, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request([P, P], SamplingParams(max_tokens=2, n=2), rows=rows)
