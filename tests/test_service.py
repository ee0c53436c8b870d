"""The gRPC service end to end on localhost: Ray replicas (local Ray), real channels."""

import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

ray = pytest.importorskip("ray")

from service_helpers import CALL_TIMEOUT, ServiceRunner, request, wait_until  # noqa: E402

from rollout import Engine, SamplingParams  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.service.serve import RolloutService, init_ray  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402
from rollout.v1 import rollout_pb2 as pb  # noqa: E402
from rollout.wire import trajectory_arrays, weight_chunks  # noqa: E402

PROMPTS = [[2, 3, 4], [5, 6, 7, 8, 9], [10]]
TOKEN = "test-token"
# A request that keeps a replica busy for a good while (many rows, long completions).
LONG = dict(prompts=[[2 + i % 12, 3] for i in range(48)], max_tokens=240, n=4, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("svc"), "qwen2", vocab_size=16, block_size=4)


@pytest.fixture(scope="module")
def ray_local():
    init_ray(num_cpus=6, include_dashboard=False, log_to_driver=False, namespace="test-service")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runner(ray_local, model_dir):
    r = ServiceRunner(RolloutService(model_dir, replicas=2, port=0, auth_token=TOKEN, metrics_port=0,
                                     engine_config=EngineConfig(drafting="fixed")))
    r.wait_started()
    yield r
    r.stop()


def in_flight(stub) -> int:
    """Requests the front end has sent to replicas (started there or queued)."""
    st = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
    return st.queue_depth + st.running_requests


def running_requests(stub) -> int:
    st = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
    return sum(r.running_requests for r in st.replicas)


def test_generate_returns_what_the_engine_returns(runner, model_dir):
    engine = Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed"))
    for sampler in ("lossless", "mixed", "ar"):
        direct = engine.generate(PROMPTS, SamplingParams(sampler=sampler, max_tokens=20, n=2, seed=3))
        resp = runner.stub().Generate(request(PROMPTS, "g1", sampler=sampler, max_tokens=20, n=2, seed=3),
                                      timeout=CALL_TIMEOUT)
        assert [(t.prompt_index, t.sample_index) for t in resp.trajectories] == [
            (i, j) for i in range(len(PROMPTS)) for j in range(2)]
        for t in resp.trajectories:
            c = direct[t.prompt_index][t.sample_index]
            a = trajectory_arrays(t)
            assert a["token_ids"].tolist() == c.token_ids
            # Same tokens; log-probs within the fp32 parity bound (a Ray replica runs with one intra-op
            # thread, so its matmuls may sum in another order than this process's).
            np.testing.assert_allclose(a["logprobs"], np.asarray(c.logprobs, dtype=np.float32), rtol=0, atol=1e-5)
            np.testing.assert_allclose(a["behavior_logprobs"], np.asarray(c.behavior_logprobs, dtype=np.float32),
                                       rtol=0, atol=1e-5)
            assert a["from_draft"].tolist() == c.from_draft
            assert a["policy_versions"].tolist() == [0] * len(c.token_ids)
            assert t.group_id == "g1" and t.finish_reason == pb.LENGTH and t.num_forward_passes == c.num_forward_passes
            assert 0 <= t.timings.queue_seconds <= t.timings.first_token_seconds <= t.timings.total_seconds


def test_generate_stream_returns_each_trajectory_once_matching_the_engine(runner, model_dir):
    engine = Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed"))
    direct = engine.generate(PROMPTS, SamplingParams(max_tokens=30, n=3, seed=4, stop_token_ids=(1,)))
    streamed = list(runner.stub().GenerateStream(request(PROMPTS, max_tokens=30, n=3, seed=4, stop_token_ids=[1]),
                                                 timeout=CALL_TIMEOUT))
    assert sorted((t.prompt_index, t.sample_index) for t in streamed) == [(i, j) for i in range(3) for j in range(3)]
    for t in streamed:
        c = direct[t.prompt_index][t.sample_index]
        assert trajectory_arrays(t)["token_ids"].tolist() == c.token_ids
        assert {pb.STOP: "stop", pb.LENGTH: "length"}[t.finish_reason] == c.finish_reason


@pytest.mark.parametrize("req,field", [
    (pb.GenerateRequest(params=pb.SamplingParams(max_tokens=4)), "prompts must hold at least one prompt"),
    (request([[2], []], max_tokens=4), r"prompt_token_ids\[1\] is empty"),
    (request([[2, 99]], max_tokens=4), r"prompt_token_ids\[0\] has token id 99 outside the vocabulary"),
    (request([[2] * 200], max_tokens=100), "exceeds the model's context of 256"),
    (request([[2]], max_tokens=0), "max_tokens must be an integer >= 1"),
    (request([[2]], max_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (request([[2]], max_tokens=4, temperature=-1.0), "temperature must be a finite number >= 0"),
    (request([[2]], max_tokens=4, sampler="beam"), "sampler must be one of"),
    (request([[2, 15]], max_tokens=4), "contains the mask token id 15"),
    (request([[2]], "g" * 257, max_tokens=4), "group_id has 257 characters, at most 256"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(runner, req, field):
    with pytest.raises(grpc.RpcError) as info:
        runner.stub().Generate(req, timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert pytest.importorskip("re").search(field, info.value.details())
    # A malformed request never takes a replica down: the service still serves.
    assert runner.stub().Generate(request([[2]], max_tokens=3, seed=0), timeout=CALL_TIMEOUT).trajectories


def test_server_side_deadline_is_deadline_exceeded_and_frees_the_replica(runner):
    stub = runner.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request(timeout_seconds=0.05, **LONG), timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: running_requests(stub) == 0, what="replicas idle after the deadline")


def test_client_cancel_frees_the_work(runner):
    stub = runner.stub()
    call = stub.GenerateStream(request(**LONG), timeout=CALL_TIMEOUT)
    wait_until(lambda: running_requests(stub) == 1, what="the long request running")
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: running_requests(stub) == 0, what="the replica freed after cancel")


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
                                      (("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}"))])
def test_update_weights_without_the_token_is_unauthenticated(runner, metadata):
    chunks = weight_chunks([("model.norm.weight", torch.ones(32))], version=0, num_tensors=1)
    with pytest.raises(grpc.RpcError) as info:
        runner.stub().UpdateWeights(chunks, timeout=CALL_TIMEOUT, metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_update_weights_with_a_corrupt_checksum_changes_nothing(runner):
    stub = runner.stub()
    before = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).weight_version
    chunks = list(weight_chunks([("model.norm.weight", torch.ones(32))], version=0, num_tensors=1))
    chunks[0].data = b"\xff" + chunks[0].data[1:]
    with pytest.raises(grpc.RpcError) as info:
        stub.UpdateWeights(iter(chunks), timeout=CALL_TIMEOUT, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "checksum" in info.value.details()
    assert stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).weight_version == before


def test_health_is_serving_and_status_lists_replicas(runner):
    assert runner.health() == health_pb2.HealthCheckResponse.SERVING
    st = runner.stub().GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
    assert [r.name for r in st.replicas] == ["rollout-replica-0", "rollout-replica-1"]
    assert all(r.ready for r in st.replicas)
    assert st.block_size == 4 and list(st.levels) == [1, 2, 3, 4]


def test_metrics_endpoints_export_the_counters(runner):
    runner.stub().Generate(request([[2, 3]], max_tokens=8, seed=0), timeout=CALL_TIMEOUT)
    front = urllib.request.urlopen(f"http://{runner.service.metrics_address}/metrics", timeout=10).read().decode()
    for name in ("rollout_queue_depth", "rollout_running_requests", "rollout_generated_tokens_total",
                 "rollout_weight_version", "rollout_requests_total"):
        assert name in front
    st = runner.stub().GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
    replica = urllib.request.urlopen(f"http://{st.replicas[0].metrics_address}/metrics", timeout=10).read().decode()
    for name in ("rollout_replica_tokens_per_forward", "rollout_replica_draft_acceptance",
                 "rollout_replica_weight_version", "rollout_replica_generated_tokens_total"):
        assert name in replica


def test_status_shows_each_draft_sources_row_steps_and_acceptance(runner, model_dir):
    """GetStatus counts a request's decode row-steps by draft source exactly as the engine's own
    stats do (same request, same seed: the same steps), per replica and summed."""
    def counts(sources):
        return {name: (v.row_steps, v.drafts_offered, v.drafts_accepted) for name, v in sources.items()}

    stub = runner.stub()
    before = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
    stub.Generate(request(PROMPTS, sampler="lossless", max_tokens=20, n=2, seed=5), timeout=CALL_TIMEOUT)
    engine = Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed"))
    engine.generate(PROMPTS, SamplingParams(sampler="lossless", max_tokens=20, n=2, seed=5))
    expected = {name: tuple(v) for name, v in engine.last_stats.draft_sources.items()}
    assert expected.get("model", (0, 0, 0))[1] > 0  # the model's drafts were verified

    def delta(now, then):
        old = counts(then)
        return {name: tuple(x - y for x, y in zip(v, old.get(name, (0, 0, 0)))) for name, v in counts(now).items()
                if v != old.get(name)}
    # An idle replica publishes its status snapshot within a second of its last step.
    def counted():
        st = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
        return st if delta(st.draft_sources, before.draft_sources) == expected else None
    after = wait_until(counted, timeout=30, what="GetStatus counting the request's row-steps")
    grew = [delta(a.draft_sources, b.draft_sources) for a, b in zip(after.replicas, before.replicas)]
    assert sorted(grew, key=len) == [{}, expected]  # one replica ran the request
    total = sum(v.row_steps for v in after.draft_sources.values())
    for name, v in after.draft_sources.items():
        assert v.share == pytest.approx(v.row_steps / total, abs=1e-4)
        assert v.acceptance == pytest.approx(v.drafts_accepted / v.drafts_offered if v.drafts_offered else 0.0,
                                             abs=1e-4)


def test_full_queue_is_resource_exhausted(ray_local, model_dir):
    r = ServiceRunner(RolloutService(model_dir, replicas=1, port=0, max_queue=1, name="queue"))
    r.wait_started()
    try:
        stub = r.stub()
        first = stub.GenerateStream(request(**LONG), timeout=CALL_TIMEOUT)
        wait_until(lambda: running_requests(stub) == 1, what="first request running")
        second = stub.GenerateStream(request(**LONG), timeout=CALL_TIMEOUT)
        wait_until(lambda: in_flight(stub) == 2, what="second request sent")
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(request([[2]], max_tokens=2), timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in info.value.details()
        first.cancel()
        second.cancel()
        wait_until(lambda: running_requests(stub) == 0, what="queue drained after cancel")
    finally:
        r.stop()


def test_health_is_not_serving_until_a_replica_is_ready(ray_local, model_dir):
    # Replicas that need a GPU can never be placed on this CPU-only Ray: readiness never comes.
    r = ServiceRunner(RolloutService(model_dir, replicas=1, port=0, gpus_per_replica=1, ready_timeout=600,
                                     name="unplaceable"))
    try:
        wait_until(lambda: r.service.server is not None, what="server started")
        assert r.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            r.stub().Generate(request([[2]], max_tokens=2), timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        r.stop()


def test_killed_replica_mid_batch_all_trajectories_come_back_once(runner):
    """The kill lands while the replica is generating (LONG takes seconds); the partial-stream
    case (some trajectories streamed before the failure) is pinned down in test_router.py."""
    stub = runner.stub()
    before = sum(r.restarts for r in stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).replicas)
    call = stub.GenerateStream(request(**LONG), timeout=120)
    running = wait_until(lambda: [r for r in stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).replicas
                                  if r.running_requests], what="the request running on a replica")
    ray.kill(ray.get_actor(running[0].name, namespace="test-service"), no_restart=False)
    got = list(call)
    keys = [(t.prompt_index, t.sample_index) for t in got]
    assert sorted(keys) == [(i, j) for i in range(len(LONG["prompts"])) for j in range(LONG["n"])]
    assert len(set(keys)) == len(keys)
    assert all(t.finish_reason == pb.LENGTH and len(t.token_ids) == 4 * LONG["max_tokens"] for t in got)
    st = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
    assert sum(r.restarts for r in st.replicas) == before + 1
    wait_until(lambda: all(r.ready for r in stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).replicas),
               what="the killed replica restarted")


def test_reflection_lists_the_services(runner):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    services = set(ProtoReflectionDescriptorDatabase(runner.channel()).get_services())
    assert {"rollout.v1.RolloutService", "grpc.health.v1.Health"} <= services

def perturbed_state(model_dir, seed: int) -> dict[str, torch.Tensor]:
    state = Engine.from_pretrained(model_dir).model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def perturbed_fingerprint(state: dict[str, torch.Tensor]) -> str:
    from rollout.wire import weights_fingerprint
    return weights_fingerprint(state.items(), torch.float32)


def test_pushed_weights_are_served_and_a_restarted_replica_catches_up(runner, model_dir, tmp_path):
    """Runs last in this module: it moves the served version to 1."""
    import shutil

    from safetensors.torch import save_file

    stub, auth = runner.stub(), (("authorization", f"Bearer {TOKEN}"),)
    state = perturbed_state(model_dir, seed=1)
    resp = stub.UpdateWeights(weight_chunks(state.items(), version=1, num_tensors=len(state), chunk_bytes=4096),
                              timeout=CALL_TIMEOUT, metadata=auth)
    assert resp.version == 1 and resp.num_tensors == len(state)
    router = runner.service.router
    assert router.weights_ref is router._segment is not None  # restarted replicas catch up from the front end's segment
    fresh_dir = tmp_path / "pushed"
    shutil.copytree(model_dir, fresh_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, fresh_dir / "model.safetensors")
    fresh = Engine.from_pretrained(fresh_dir, config=EngineConfig(drafting="fixed"))
    expected = fresh.generate(PROMPTS, SamplingParams(max_tokens=16, n=2, seed=8))
    served_by = set()
    # Prompts have a home replica (router affinity): different one-prompt requests reach both.
    for prompt in ([p] for p in range(2, 14)):
        got = stub.Generate(request([prompt], max_tokens=16, n=2, seed=8), timeout=CALL_TIMEOUT)
        served_by |= {t.replica for t in got.trajectories}
        want = fresh.generate([prompt], SamplingParams(max_tokens=16, n=2, seed=8))[0]
        for t in got.trajectories:
            a = trajectory_arrays(t)
            assert a["token_ids"].tolist() == want[t.sample_index].token_ids
            assert a["policy_versions"].tolist() == [1] * len(a["token_ids"])
        if len(served_by) == 2:
            break
    assert served_by == {"rollout-replica-0", "rollout-replica-1"}
    # Kill both replicas: Ray restarts them on the base weights. With no request arriving, the
    # router's supervisor loads version 1 onto each (ready within CATCH_UP_INTERVAL + one load of
    # the restart), and GetStatus.restarts is Ray's own count.
    from ray._private.state import actors

    def ray_restarts(name: str) -> int:
        return actors(actor_id=ray.get_actor(name, namespace="test-service")._actor_id.hex())["NumRestarts"]
    names = ("rollout-replica-0", "rollout-replica-1")
    before = {n: ray_restarts(n) for n in names}
    for name in names:
        ray.kill(ray.get_actor(name, namespace="test-service"), no_restart=False)

    def caught_up() -> bool:
        st = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
        return all(r.ready and r.weight_version == 1 and r.restarts == before[r.name] + 1 for r in st.replicas)
    wait_until(caught_up, timeout=120, what="both replicas restarted and back on version 1 without a request")
    st = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
    assert {r.name: r.restarts for r in st.replicas} == {n: ray_restarts(n) for n in names}
    assert st.weight_fingerprint == perturbed_fingerprint(state)
    got = stub.Generate(request(PROMPTS, max_tokens=16, n=2, seed=8), timeout=CALL_TIMEOUT)
    for t in got.trajectories:
        assert trajectory_arrays(t)["token_ids"].tolist() == expected[t.prompt_index][t.sample_index].token_ids
        assert set(trajectory_arrays(t)["policy_versions"].tolist()) == {1}
    served = {r.name: r for r in stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).replicas}
    assert all(served[t.replica].ready and served[t.replica].weight_version == 1 for t in got.trajectories)




def test_require_auth_for_generate_guards_generation_status_and_http(ray_local, model_dir):
    import httpx
    r = ServiceRunner(RolloutService(model_dir, replicas=1, port=0, auth_token=TOKEN, name="authall", http_port=0,
                                     require_auth_for_generate=True))
    r.wait_started()
    try:
        stub, good = r.stub(), (("authorization", f"Bearer {TOKEN}"),)
        for call in (lambda md: stub.Generate(request([[2]], max_tokens=2), timeout=CALL_TIMEOUT, metadata=md),
                     lambda md: list(stub.GenerateStream(request([[2]], max_tokens=2), timeout=CALL_TIMEOUT,
                                                         metadata=md)),
                     lambda md: stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT, metadata=md)):
            with pytest.raises(grpc.RpcError) as info:
                call(None)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call(good)
        url = f"http://localhost:{r.service.http_port}"
        body = dict(prompt=[2, 3], max_tokens=2)
        assert httpx.get(f"{url}/health", timeout=CALL_TIMEOUT).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=CALL_TIMEOUT).status_code == 401
        assert httpx.get(f"{url}/v1/models", timeout=CALL_TIMEOUT).status_code == 401
        ok = httpx.post(f"{url}/v1/completions", json=body, timeout=CALL_TIMEOUT,
                        headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 1
    finally:
        r.stop()
