"""Weight swap lifecycle on one replica: verify on stage, and the wait / abort / keep modes."""

import threading

import pytest
import torch
from conftest import PROMPTS
from service_helpers import wait_until

from rollout import Engine
from rollout.sampling import process_logits
from rollout.service.replica import GeneratorReplica, WeightMismatchError

PARAMS = dict(max_tokens=30, seed=1)


@pytest.fixture
def replica(tiny_dir):
    return GeneratorReplica(str(tiny_dir), "r0", metrics_port=None)


def perturbed(engine: Engine, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in engine.model.state_dict().items()}


def run(replica, request_id="req", expected_version=0):
    """Starts a request and pauses it right after it took the replica (before its prefill)."""
    gen = replica.generate(request_id, PROMPTS, PARAMS, expected_version)
    assert "started" in next(gen)
    return gen


def drain(gen) -> list[dict]:
    return [r for rec in gen if "records" in rec for r in rec["records"]]


def commit_in_thread(replica, version, mode):
    t = threading.Thread(target=replica.commit_weights, args=(version, mode, 60))
    t.start()
    return t


def test_wait_mode_finishes_the_request_on_the_old_weights(replica):
    replica.stage_weights(1, perturbed(replica.engine, 0))
    gen = run(replica)
    t = commit_in_thread(replica, 1, "wait")
    records = drain(gen)
    t.join(60)
    assert all(r["finish_reason"] == "length" and set(r["policy_versions"].tolist()) == {0} for r in records)
    assert replica.engine.weight_version == 1


def test_abort_mode_returns_partial_trajectories_then_swaps(replica):
    replica.stage_weights(1, perturbed(replica.engine, 0))
    gen = run(replica)
    t = commit_in_thread(replica, 1, "abort")
    wait_until(lambda: "req" in replica._abort and replica._abort["req"].is_set(), what="abort flagged")
    records = drain(gen)
    t.join(60)
    assert len(records) == len(PROMPTS)
    assert all(r["finish_reason"] == "abort" and 0 < len(r["token_ids"]) < PARAMS["max_tokens"] for r in records)
    assert replica.engine.weight_version == 1


def test_keep_mode_continues_on_new_weights_with_exact_logprobs(replica, tiny_dir):
    old = Engine.from_pretrained(tiny_dir)
    replica.stage_weights(1, perturbed(replica.engine, 0))
    gen = run(replica)
    t = commit_in_thread(replica, 1, "keep")
    wait_until(lambda: replica._pending_swap is not None, what="swap pending")
    records = drain(gen)  # the swap happens at the first step boundary, after the prefill
    t.join(60)
    assert replica.engine.weight_version == 1
    new = replica.engine
    for r in records:
        versions = r["policy_versions"].tolist()
        assert versions[0] == 0 and set(versions[1:]) == {1} and r["finish_reason"] == "length"
        prompt, tokens = PROMPTS[r["prompt_index"]], r["token_ids"].tolist()
        seq = prompt + tokens
        ref_old = process_logits(old.forward_logits([seq])[0], 1.0, 0, 1.0)
        ref_new = process_logits(new.forward_logits([seq])[0], 1.0, 0, 1.0)
        for i, (tok, v) in enumerate(zip(tokens, versions)):
            ref = (ref_old if v == 0 else ref_new)[len(prompt) - 1 + i, tok]
            assert abs(float(ref) - float(r["logprobs"][i])) <= 1e-5


def test_a_stale_replica_refuses_work(replica):
    gen = replica.generate("req", PROMPTS, PARAMS, expected_version=3)
    assert list(gen) == [{"stale": 0}]


@pytest.mark.parametrize("corrupt,match", [
    (lambda s: s.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
    (lambda s: s.update({"extra.weight": torch.zeros(1)}), r"unexpected \['extra.weight'\]"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(3)}), r"model.norm.weight: shape \[3\]"),
    (lambda s: s["model.layers.0.mlp.up_proj.weight"].view(-1).__setitem__(0, float("nan")), "NaN or Inf"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(32, dtype=torch.long)}), "not a floating-point"),
])
def test_bad_weights_are_refused_and_nothing_changes(replica, corrupt, match):
    before = {k: v.clone() for k, v in replica.engine.model.state_dict().items()}
    state = perturbed(replica.engine, 1)
    corrupt(state)
    with pytest.raises(WeightMismatchError, match=match):
        replica.stage_weights(1, state)
    with pytest.raises(RuntimeError, match="no staged weights"):
        replica.commit_weights(1)
    assert replica.engine.weight_version == 0
    assert all(torch.equal(before[k], v) for k, v in replica.engine.model.state_dict().items())


def test_unknown_mode_is_refused(replica):
    replica.stage_weights(1, perturbed(replica.engine, 0))
    with pytest.raises(ValueError, match="mode must be one of wait, abort, keep"):
        replica.commit_weights(1, "later")


def test_a_request_waiting_for_a_busy_engine_times_out_with_a_message(tiny_dir):
    replica = GeneratorReplica(str(tiny_dir), "r1", metrics_port=None, lock_timeout=0.2)
    first = run(replica, "first")  # holds the engine, paused before its prefill
    with pytest.raises(TimeoutError, match="request second waited 0 s for the engine"):
        next(replica.generate("second", PROMPTS, PARAMS, 0))
    assert drain(first)
