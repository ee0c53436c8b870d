"""Weight swap lifecycle on one replica: verify on stage, and the wait / abort / keep modes."""

import socket
import threading
from concurrent.futures import Future

import pytest
import torch
from conftest import PROMPTS
from service_helpers import wait_until

from rollout import Engine
from rollout.sampling import process_logits
from rollout.service.messages import Finished, Stale, Started
from rollout.service.weights import WeightMismatchError

PARAMS = dict(max_tokens=200, seed=1)  # long enough that a request is still running when a test acts


@pytest.fixture
def replica(make_replica):
    return make_replica("r0")


def perturbed(engine: Engine, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in engine.model.state_dict().items()}


def run(replica, request_id="req", expected_version=0):
    """Starts a request and returns its message stream once the engine has admitted it."""
    gen = replica.generate(request_id, PROMPTS, PARAMS, expected_version)
    assert isinstance(next(gen), Started)
    return gen


def pause(replica) -> threading.Event:
    """Holds the engine loop between two steps (a command that blocks); set the event to go on."""
    entered, release = threading.Event(), threading.Event()

    def hold():
        entered.set()
        release.wait(60)
    replica._commands.put((hold, Future()))
    assert entered.wait(60)
    return release


def drain(gen) -> list[dict]:
    return [r for message in gen if isinstance(message, Finished) for r in message.records]


def in_thread(fn, *args):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("result", fn(*args)))
    t.start()
    return t, out


def test_wait_mode_finishes_started_requests_on_the_old_weights_and_later_ones_on_the_new(replica):
    replica.stage_weights(1, perturbed(replica.engine, 0))
    first = run(replica, "first")
    release = pause(replica)
    commit, _ = in_thread(replica.commit_weights, 1, "wait", 60)
    wait_until(lambda: replica._commands.qsize() == 1, what="commit queued")
    later, out = in_thread(lambda: drain(replica.generate("later", PROMPTS, PARAMS, 0)))
    wait_until(lambda: replica._commands.qsize() == 2, what="later request queued")
    release.set()
    records = drain(first)
    commit.join(60)
    later.join(60)
    assert len(records) == len(PROMPTS)
    assert all(r["finish_reason"] == "length" and set(r["policy_versions"].tolist()) == {0} for r in records)
    assert all(set(r["policy_versions"].tolist()) == {1} for r in out["result"])
    assert replica.engine.weight_version == 1


def test_abort_mode_returns_partial_trajectories_then_swaps(replica):
    replica.stage_weights(1, perturbed(replica.engine, 0))
    gen = run(replica)
    release = pause(replica)
    commit, _ = in_thread(replica.commit_weights, 1, "abort", 60)
    wait_until(lambda: replica._commands.qsize() == 1, what="commit queued")
    release.set()
    records = drain(gen)
    commit.join(60)
    assert len(records) == len(PROMPTS)
    assert all(r["finish_reason"] == "abort" and 0 < len(r["token_ids"]) < PARAMS["max_tokens"] for r in records)
    assert replica.engine.weight_version == 1


def test_keep_mode_continues_on_new_weights_with_exact_logprobs(replica, tiny_dir):
    old = Engine.from_pretrained(tiny_dir)
    replica.stage_weights(1, perturbed(replica.engine, 0))
    gen = run(replica)
    release = pause(replica)
    commit, _ = in_thread(replica.commit_weights, 1, "keep", 60)
    wait_until(lambda: replica._commands.qsize() == 1, what="commit queued")
    release.set()
    records = drain(gen)  # the swap happens at the next step boundary
    commit.join(60)
    assert replica.engine.weight_version == 1
    new = replica.engine
    for r in records:
        versions = r["policy_versions"].tolist()
        assert versions[0] == 0 and versions[-1] == 1 and versions == sorted(versions)
        assert r["finish_reason"] == "length"
        prompt, tokens = PROMPTS[r["prompt_index"]], r["token_ids"].tolist()
        seq = prompt + tokens
        ref_old = process_logits(old.forward_logits([seq])[0], 1.0, 0, 1.0, (15,))
        ref_new = process_logits(new.forward_logits([seq])[0], 1.0, 0, 1.0, (15,))
        for i, (tok, v) in enumerate(zip(tokens, versions)):
            ref = (ref_old if v == 0 else ref_new)[len(prompt) - 1 + i, tok]
            assert abs(float(ref) - float(r["logprobs"][i])) <= 1e-5


def test_a_stale_replica_refuses_work(replica):
    gen = replica.generate("req", PROMPTS, PARAMS, expected_version=3)
    assert list(gen) == [Stale(0)]


@pytest.mark.parametrize("corrupt,match", [
    (lambda s: s.pop("model.norm.weight"), r"missing \['model.norm.weight'\]"),
    (lambda s: s.update({"extra.weight": torch.zeros(1)}), r"unexpected \['extra.weight'\]"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(3)}), r"model.norm.weight: shape \[3\]"),
    (lambda s: s["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
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


def test_a_request_waiting_for_a_busy_engine_loop_times_out_with_a_message(make_replica):
    replica = make_replica("r1", lock_timeout=0.2)
    release = pause(replica)
    with pytest.raises(TimeoutError, match="request second waited 0 s for the engine loop"):
        next(replica.generate("second", PROMPTS, PARAMS, 0))
    release.set()
    assert drain(replica.generate("third", PROMPTS, PARAMS, 0))  # the loop serves again


def test_close_fails_running_requests_stops_the_loop_and_frees_the_metrics_port(make_replica):
    replica = make_replica("closing")
    replica.stage_weights(1, perturbed(replica.engine, 0))
    running = run(replica, "running")
    release = pause(replica)
    commit, out = in_thread(lambda: _error_of(replica.commit_weights, 1, "wait", 60))
    wait_until(lambda: replica._commands.qsize() == 1, what="commit queued")
    closing, _ = in_thread(replica.close)
    wait_until(lambda: replica._commands.qsize() == 2, what="close's wake-up queued")
    release.set()
    closing.join(60)
    commit.join(60)
    assert not replica._loop.is_alive()
    with pytest.raises(RuntimeError, match="replica closing: replica closed"):
        drain(running)
    assert "replica closing closed before version 1 was applied" in out["result"]
    with pytest.raises(RuntimeError, match="replica closing is closed: request later refused"):
        next(replica.generate("later", PROMPTS, PARAMS, 0))
    port = int(replica.metrics.address.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert replica.engine.weight_version == 0


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return str(e)
    return ""


def test_a_broadcast_push_with_a_bad_checksum_still_receives_every_tensor(replica, monkeypatch):
    """Verify after receiving: a replica that stopped at the bad tensor would leave the trainer
    and the other replicas blocked in the collective until the timeout."""
    import rollout.service.replica as replica_module
    from rollout.wire import tensor_checksum
    state = replica.engine.model.state_dict()
    names = list(replica.engine.model.weight_names_and_shapes())
    received = []

    def fake_broadcast(group, tensor, timeout):
        name = names[len(received)]
        tensor.copy_(state[name])
        received.append(name)
    monkeypatch.setattr(replica_module, "broadcast", fake_broadcast)
    replica._group, replica._group_backend = object(), "gloo"
    manifest = [[n, str(state[n].dtype).removeprefix("torch."), list(state[n].shape), tensor_checksum(state[n])]
                for n in names]
    manifest[0][3] ^= 1  # the first tensor's checksum is wrong
    with pytest.raises(WeightMismatchError, match=f"checksum mismatch after broadcast: {names[0]}"):
        replica.receive_broadcast(1, manifest)
    assert received == names and replica._staged is None
