"""Weight swap lifecycle on one replica: verify on stage, and the wait / abort / keep modes."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS
from safetensors.torch import save_file
from service_helpers import wait_until

from rollout import Engine
from rollout.config import EngineConfig
from rollout.sampling import process_logits
from rollout.service.messages import Finished, Stale, Started
from rollout.service.shared_weights import SharedEntry, SharedSegmentError, host_id
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
    old = Engine.from_pretrained(tiny_dir, config=EngineConfig(drafting="fixed"))
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
    and the other replicas blocked in the collective until the timeout. Small buckets: several
    tensors share one, the large ones travel alone."""
    import rollout.service.weight_group as weight_group
    from rollout.wire import tensor_digest
    state = replica.engine.model.state_dict()
    names = list(replica.engine.model.weight_names_and_shapes())
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    buckets = weight_group.bucket_layout(sizes, 4096)
    assert any(len(b.items) > 1 for b in buckets) and any(b.alone for b in buckets)
    received = []

    class Done:
        def wait(self):
            return True

    def fake_broadcast(group, tensor, timeout):  # the sender's bytes, as rank 0 would pack them
        bucket = buckets[len(received)]
        for i, offset, nbytes in bucket.items:
            src = state[names[i]].reshape(-1).view(torch.uint8)
            (tensor.reshape(-1).view(torch.uint8) if bucket.alone else tensor[offset:offset + nbytes]).copy_(src)
        received.append(bucket)
        return Done()
    monkeypatch.setattr(weight_group, "broadcast_async", fake_broadcast)
    replica._group, replica._group_backend = object(), "gloo"
    manifest = [[n, str(state[n].dtype).removeprefix("torch."), list(state[n].shape), tensor_digest(state[n])]
                for n in names]
    manifest[0][3] ^= 1  # the first tensor's checksum is wrong
    with pytest.raises(WeightMismatchError, match=f"checksum mismatch after broadcast: {names[0]}"):
        replica.receive_broadcast(1, manifest, "xxh3", 4096)
    assert received == buckets and replica._staged is None
    manifest[0][3] ^= 1  # the same bytes, every checksum right: staged, equal to what was sent
    received.clear()
    kept = replica._kept_receive.data_ptr()
    replica.receive_broadcast(1, manifest, "xxh3", 4096)
    assert all(torch.equal(replica._staged.tensors[n], state[n]) for n in names)
    # received in place: the staged tensors are views of the buffer kept from the last push
    assert replica._kept_receive.data_ptr() == kept
    assert replica._staged.tensors[names[0]].untyped_storage().data_ptr() == kept


TRAINER = """
import json, sys, time
from safetensors.torch import load_file
from rollout.service.shared_weights import SharedSegment
segment = SharedSegment(list(load_file(sys.argv[1]).items()))
print(json.dumps(dict(fd=segment.fd, size=segment.size, entries=[list(e.__dict__.values()) for e in segment.entries])),
      flush=True)
time.sleep(600)
"""


def _memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:rollout-weights" in line for line in f)


@contextlib.contextmanager
def _segment_held_by(script: str, state: dict[str, torch.Tensor], tmp_path):
    """Runs `script` in another process over `state` (saved to a file) and yields (its pid, the
    segment it printed: fd, size, entries); the process is SIGKILLed on the way out, as a crash
    mid-push would end it."""
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "state.safetensors")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "state.safetensors")],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        seg = json.loads(holder.stdout.readline())
        yield holder.pid, seg["fd"], seg["size"], [SharedEntry(*e) for e in seg["entries"]]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)


def test_a_trainer_killed_mid_push_leaves_no_segment_and_the_old_version_serving(replica, tmp_path):
    """Same-host push: the trainer (another process) writes a memfd, the replica maps and
    stages it, the trainer is killed before the commit: nothing is left in /dev/shm, the mapping
    goes with the discarded staging, and the replica serves version 0 as before; a push naming
    the dead trainer's segment is refused."""
    before_shm = set(os.listdir("/dev/shm"))
    before_out = [r["token_ids"].tolist() for r in drain(replica.generate("before", PROMPTS, dict(max_tokens=8, seed=1), 0))]
    with _segment_held_by(TRAINER, perturbed(replica.engine, 3), tmp_path) as (pid, fd, size, entries):
        assert replica.stage_shared(1, pid, fd, size, entries, host_id()) > 0
        assert _memfd_mappings() >= 1  # staged: views of the trainer's segment
    replica.discard_weights()  # what the router does when the push's RPC fails
    assert _memfd_mappings() == 0
    assert set(os.listdir("/dev/shm")) == before_shm
    with pytest.raises(SharedSegmentError, match="did the trainer exit"):
        replica.stage_shared(1, pid, fd, size, entries, host_id())
    with pytest.raises(SharedSegmentError, match="another host|trainer on this replica's host"):
        replica.stage_shared(1, os.getpid(), 0, size, entries, "elsewhere/1")
    assert replica.engine.weight_version == 0
    after = drain(replica.generate("after", PROMPTS, dict(max_tokens=8, seed=1), 0))
    assert [r["token_ids"].tolist() for r in after] == before_out


FRONT_END = """
import json, sys, time
from safetensors.torch import load_file
from rollout.service.shared_weights import ReceiveSegment
from rollout.wire import WeightAssembler, parse_chunk, weight_frames
state = load_file(sys.argv[1])
shapes = {k: tuple(v.shape) for k, v in state.items()}
segment = ReceiveSegment(shapes, 4)
assembler = WeightAssembler(shapes, buffers=segment.slots())
for frame in weight_frames(state.items(), 0, len(state), chunk_bytes=4096):
    assembler.add(parse_chunk(frame))
tensors = assembler.finish()
assert segment.manifest(tensors, assembler.digests) and assembler.finite_checked >= set(tensors)
print(json.dumps(dict(fd=segment.fd, size=segment.used, entries=[list(e.__dict__.values()) for e in segment.entries])),
      flush=True)
time.sleep(600)
"""


def test_a_front_end_killed_mid_push_leaves_no_segment_and_the_old_version_serving(replica, tmp_path):
    """gRPC push to a replica on the front end's node: the front end (another process) assembles
    the chunks into its ReceiveSegment, the replica stages it without checks of its own
    (checked), the front end is killed before the commit: nothing in /dev/shm, the mapping goes
    with the discarded staging, the replica serves version 0 as before."""
    before_shm = set(os.listdir("/dev/shm"))
    before_out = [r["token_ids"].tolist() for r in drain(replica.generate("before", PROMPTS, dict(max_tokens=8, seed=1), 0))]
    with _segment_held_by(FRONT_END, perturbed(replica.engine, 4), tmp_path) as (pid, fd, size, entries):
        assert replica.stage_shared(1, pid, fd, size, entries, host_id(), checked=True, finite=True) > 0
        assert _memfd_mappings() >= 1
    replica.discard_weights()
    assert _memfd_mappings() == 0 and set(os.listdir("/dev/shm")) == before_shm
    assert replica.engine.weight_version == 0
    after = drain(replica.generate("after", PROMPTS, dict(max_tokens=8, seed=1), 0))
    assert [r["token_ids"].tolist() for r in after] == before_out


def test_a_shared_segment_is_checked_whole_and_rewritten_in_place_for_the_next_push(replica):
    """The replica stages views of the segment only after every tensor's XXH3-64 matched and its
    values are finite, and commits exactly those bytes; the trainer then writes the next push
    into the same file. A file that can change size is refused (a mapping of it could fault)."""
    from rollout.service.shared_weights import SharedSegment
    state = perturbed(replica.engine, 4)
    with SharedSegment(list(state.items())) as seg:
        with pytest.raises(PermissionError):  # sealed against resizing: not even the trainer can
            os.ftruncate(seg.fd, seg.size // 2)
        bad = list(seg.entries)
        bad[1] = type(bad[1])(**dict(bad[1].__dict__, xxh3=bad[1].xxh3 ^ 1))
        with pytest.raises(ValueError, match=f"tensor {bad[1].name}: checksum mismatch"):
            replica.stage_shared(1, os.getpid(), seg.fd, seg.size, bad, host_id())
        assert replica._staged is None
        replica.stage_shared(1, os.getpid(), seg.fd, seg.size, seg.entries, host_id())
        assert replica.commit_weights(1) == 1
        served = replica.engine.model.state_dict()
        assert all(torch.equal(served[k], v) for k, v in state.items())
        assert _memfd_mappings() == 2  # the trainer's own mapping and the replica's, kept for the next push

        fd, nxt = seg.fd, perturbed(replica.engine, 5)
        last = list(nxt)[-1]
        nxt[last] = nxt[last].contiguous().clone()
        nxt[last].view(-1)[-1] = float("inf")  # in the last chunk of the last tensor
        assert seg.fits(list(nxt.items()))
        seg.write(list(nxt.items()))
        with pytest.raises(WeightMismatchError, match=f"{last}: contains NaN or Inf"):
            replica.stage_shared(2, os.getpid(), seg.fd, seg.size, seg.entries, host_id())
        nxt[last].view(-1)[-1] = 0.5
        seg.write(list(nxt.items()))
        assert seg.fd == fd  # the same file, rewritten
        replica.stage_shared(2, os.getpid(), seg.fd, seg.size, seg.entries, host_id())
        assert replica.commit_weights(2) == 2
        served = replica.engine.model.state_dict()
        assert all(torch.equal(served[k], v) for k, v in nxt.items())
        assert not seg.fits(list(nxt.items())[1:])
    replica._segment_map.drop_if_orphaned()  # what the engine loop does about once a second
    assert _memfd_mappings() == 0 and not replica._segment_map.held
    fd = os.memfd_create("rollout-weights")
    try:
        os.ftruncate(fd, 64)
        with pytest.raises(SharedSegmentError, match="not a memfd sealed against resizing"):
            replica.stage_shared(3, os.getpid(), fd, 64, [], host_id())
    finally:
        os.close(fd)


def _kept(replica) -> list:
    """The replica's kept segment mappings, least recently staged from first."""
    return list(replica._segment_map._files.values())


def test_the_replica_keeps_its_mappings_for_the_next_pushes_from_the_same_files(replica):
    """The replica maps a segment once and stages the next push from the same file through the
    same mapping, still checking every byte (a NaN in the last tensor is refused, nothing
    changes); pushes from a second file (a trainer's segment and the gRPC front end's,
    alternating) keep both mappings; a third file lets the least recently used one go, and the
    engine loop's look (`drop_if_orphaned`, called here) unmaps it, as it drops those whose
    owner closed the file."""
    from rollout.service.shared_weights import KEPT_FILES, SharedSegment
    assert KEPT_FILES == 2
    replica._orphan_check_at = float("inf")  # the loop's own looks off: this test makes them
    first, second = perturbed(replica.engine, 6), perturbed(replica.engine, 7)

    def push(seg, version):
        replica.stage_shared(version, os.getpid(), seg.fd, seg.size, seg.entries, host_id())
        assert replica.commit_weights(version) == version

    with SharedSegment(list(first.items())) as seg:
        push(seg, 1)
        [kept] = _kept(replica)
        assert not replica._segment_map.drop_if_orphaned()  # the trainer still holds it
        last = list(second)[-1]
        second[last] = second[last].contiguous().clone()
        second[last].view(-1)[-1] = float("nan")
        seg.write(list(second.items()))
        with pytest.raises(WeightMismatchError, match=f"{last}: contains NaN or Inf"):
            replica.stage_shared(2, os.getpid(), seg.fd, seg.size, seg.entries, host_id())
        assert replica.engine.weight_version == 1 and not replica._segment_map.held  # refused: let go
        served = replica.engine.model.state_dict()
        assert all(torch.equal(served[k], v) for k, v in first.items())
        second[last].view(-1)[-1] = 0.25
        seg.write(list(second.items()))
        push(seg, 2)
        [kept] = _kept(replica)
        seg.write(list(first.items()))
        push(seg, 3)
        assert _kept(replica) == [kept] and _kept(replica)[0] is kept  # the same mapping, no new one
        served = replica.engine.model.state_dict()
        assert all(torch.equal(served[k], v) for k, v in first.items())
        with SharedSegment(list(second.items())) as other:
            push(other, 4)
            assert len(_kept(replica)) == 2 and _kept(replica)[0] is kept  # both kept
            other_kept = _kept(replica)[1]
            push(seg, 5)  # alternating files: neither is mapped again
            assert _kept(replica)[1] is kept and _kept(replica)[0] is other_kept
            served = replica.engine.model.state_dict()
            assert all(torch.equal(served[k], v) for k, v in first.items())
            with SharedSegment(list(second.items())) as third:
                push(third, 6)  # `other` was the least recently staged from: let go
                assert _kept(replica)[0] is kept and len(_kept(replica)) == 2
                del other_kept
                assert _memfd_mappings() == 3 + 3  # each file's own mapping, the replica's of all three
                assert replica._segment_map.drop_if_orphaned()  # the engine loop's look unmaps it
                assert _memfd_mappings() == 3 + 2
                push(seg, 7)
                assert _kept(replica)[1] is kept
        # `third` and `other` closed: the engine loop's look lets the replica's mapping of `third` go
        assert replica._segment_map.drop_if_orphaned() and len(_kept(replica)) == 1
        del kept
        assert _memfd_mappings() == 1 + 1  # seg's own and the replica's of it
    assert replica._segment_map.drop_if_orphaned() and not replica._segment_map.held
    assert _memfd_mappings() == 0
    served = replica.engine.model.state_dict()
    assert all(torch.equal(served[k], v) for k, v in first.items())


def test_a_dropped_segment_closes_its_file_and_mapping():
    """A SharedSegment (a WeightSync's kept one) that is dropped without close() does not keep
    its model-sized file open until the process exits."""
    import gc

    from rollout.service.shared_weights import SharedSegment
    before = _memfd_mappings()
    segment = SharedSegment([("w", torch.ones(1000))])
    fd = segment.fd
    assert _memfd_mappings() == before + 1 and "memfd:rollout-weights" in os.readlink(f"/proc/self/fd/{fd}")
    del segment
    gc.collect()
    assert _memfd_mappings() == before
    assert not os.path.exists(f"/proc/self/fd/{fd}") or "rollout-weights" not in os.readlink(f"/proc/self/fd/{fd}")
