"""The service under load with a small KV pool: limits derived from the pool are enforced at
the front door, a busy replica refuses with RESOURCE_EXHAUSTED, and after many mixed requests
(finished, cancelled, timed out, refused) every slot and every outstanding-token count is back."""

import asyncio
import threading

import grpc
import pytest

ray = pytest.importorskip("ray")

from service_helpers import CALL_TIMEOUT, ServiceRunner, request, wait_until  # noqa: E402

from rollout.config import EngineConfig  # noqa: E402
from rollout.service.serve import RolloutService, init_ray  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402

POOL = EngineConfig(drafting="fixed", max_num_seqs=4, max_model_len=200, max_sequences_per_request=8, max_waiting_sequences=8)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("load"), "qwen2", vocab_size=16, block_size=4)
    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test-load")
    r = ServiceRunner(RolloutService(model_dir, replicas=1, port=0, name="load", max_queue=64, engine_config=POOL))
    r.wait_started()
    yield r
    r.stop()
    ray.shutdown()


def on_service_loop(runner, coro):
    return asyncio.run_coroutine_threadsafe(coro, runner.loop).result(CALL_TIMEOUT)


def replica_state(runner) -> dict:
    return on_service_loop(runner, runner.service.router.replica_status())[0]


def code_and_details(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("req,limit", [
    (request([[2], [3], [4]], max_tokens=4, n=3), "max_sequences_per_request=8"),
    (request([[2] * 150], max_tokens=51), "context of 200 (max_model_len)"),
    (request([[2]], max_tokens=4, n=5), "n=5 exceeds the KV pool's 4 slots (max_num_seqs)"),
    (request([[2] * 190] * 5, max_tokens=4), "hold 950 tokens, more than the KV pool holds (4 slots x max_model_len=200)"),
])
def test_a_request_that_can_never_fit_is_invalid_argument_naming_the_limit(runner, req, limit):
    code, details = code_and_details(lambda: runner.stub().Generate(req, timeout=CALL_TIMEOUT))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and limit in details


def test_a_request_beyond_the_replicas_queue_is_resource_exhausted_and_nothing_leaks(runner):
    stub = runner.stub()
    busy = stub.GenerateStream(request([[2]], sampler="ar", max_tokens=190, n=4, seed=1), timeout=CALL_TIMEOUT)
    wait_until(lambda: replica_state(runner)["running_sequences"] == 4, what="the pool is full")
    queued = stub.GenerateStream(request([[3], [4]], max_tokens=5, n=4, seed=2), timeout=CALL_TIMEOUT)
    wait_until(lambda: replica_state(runner)["waiting_sequences"] == 8, what="the replica's queue is full")
    code, details = code_and_details(lambda: stub.Generate(request([[5]], max_tokens=3), timeout=CALL_TIMEOUT))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_waiting_sequences=8" in details
    busy.cancel()
    assert len(list(queued)) == 8  # the queued request is served once the cancelled one frees the pool
    wait_until(lambda: replica_state(runner)["free_slots"] == 4, what="slots back")


def test_slots_and_outstanding_tokens_come_back_after_a_thousand_mixed_requests(runner):
    stub = runner.stub()
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def client(k: int):
        for i in range(k, 1000, 16):
            kind = ("cancel", "deadline", "refused", "ok", "ok", "ok")[i % 6]
            n = 1 + i % 3
            req = request([[2 + i % 12, 3]], max_tokens=2 + i % 9, n=n, seed=i,
                          sampler=("lossless", "ar", "mixed")[i % 3], temperature=(1.0, 0.0, 0.7)[i % 3],
                          timeout_seconds=1e-4 if kind == "deadline" else 0.0)
            if kind == "refused":
                req = request([[2] * 150], max_tokens=60)
            try:
                if kind == "cancel":
                    stream = stub.GenerateStream(request([[2]], max_tokens=150, n=4, seed=i), timeout=CALL_TIMEOUT)
                    next(stream)
                    stream.cancel()
                    got = "cancelled"
                else:
                    got = f"ok{len(stub.Generate(req, timeout=CALL_TIMEOUT).trajectories) == n}"
            except grpc.RpcError as e:
                got = e.code().name
            with lock:
                outcomes[got] = outcomes.get(got, 0) + 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    # Every request ended in one of the documented ways (RESOURCE_EXHAUSTED: the replica's queue
    # of 8 sequences was full), and each way happened.
    assert sum(outcomes.values()) == 1000, outcomes
    assert set(outcomes) <= {"okTrue", "cancelled", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    assert all(outcomes.get(k, 0) >= 5 for k in ("okTrue", "cancelled", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT",
                                                  "RESOURCE_EXHAUSTED")), outcomes
    # A request whose caller gave up (deadline 1e-4 s) can still reach the replica after every
    # client has returned; it is aborted there at once. So wait for the whole pool to be idle,
    # not just the slots: a leak keeps one of these counts above zero for ever.
    router = runner.service.router

    def idle() -> tuple:
        st = replica_state(runner)
        return (st["free_slots"], st["running_sequences"], st["waiting_sequences"], st["running_requests"],
                [r.outstanding_tokens for r in router.replicas], router.admitted, router.waiting,
                [r.running for r in router.replicas])

    wait_until(lambda: idle() == (4, 0, 0, 0, [0], 0, 0, [0]), what="every slot, sequence and request freed")


def test_status_reports_the_pool_and_the_drafting_choices(runner):
    from rollout.v1 import rollout_pb2 as pb
    stub = runner.stub()
    # An AR request first: the status read right after the lossless one must be taken after it
    # (the loop publishes on every step that finishes a request, not a second later when idle).
    stub.Generate(request([[2, 3]], max_tokens=4, sampler="ar", seed=5), timeout=CALL_TIMEOUT)
    stub.Generate(request([[2, 3]], max_tokens=12, n=2, seed=5), timeout=CALL_TIMEOUT)
    replica = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).replicas[0]
    assert (replica.num_slots, replica.free_slots, replica.running_sequences) == (4, 4, 0)
    assert replica.drafting == "fixed" and replica.level_set == "4"  # all four levels of block 4
    assert replica.level_choices["4"] > 0
