"""Weight updates a trainer drives, end to end on the embedded model (tied embeddings): bucketed
named pushes, update from disk, reset, pause / resume, over gRPC (WeightSync) and HTTP, on local Ray."""

import shutil
import threading

import grpc
import pytest
import torch

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from safetensors.torch import save, save_file  # noqa: E402
from service_helpers import CALL_TIMEOUT, ServiceRunner, request, wait_until  # noqa: E402

from rollout import Engine, SamplingParams  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.service.serve import DEFAULT_MODEL, RolloutService, init_ray  # noqa: E402
from rollout.v1 import rollout_pb2 as pb  # noqa: E402
from rollout.wire import trajectory_arrays  # noqa: E402
from trainer_bridge import WeightSync  # noqa: E402

TOKEN = "weights-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [[5, 6, 7], [100, 200, 300, 400], [42]]
SAMPLING = dict(max_tokens=12, n=2, seed=7)
LONG = dict(prompts=[[2 + i, 3] for i in range(4)], max_tokens=160, n=2, seed=0)  # seconds of work


@pytest.fixture(scope="module")
def runner():
    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test-weight-updates")
    r = ServiceRunner(RolloutService(DEFAULT_MODEL, replicas=1, port=0, auth_token=TOKEN, metrics_port=0,
                                     http_port=0, name="weights", engine_config=EngineConfig(drafting="fixed")))
    r.wait_started()
    yield r
    r.stop()
    ray.shutdown()


@pytest.fixture(scope="module")
def base_state():
    """The model's weights, without the tied lm_head (it is the embedding)."""
    model = Engine.from_pretrained(DEFAULT_MODEL).model
    return {k: v.clone() for k, v in model.state_dict().items() if k in model.weight_names_and_shapes()}


def url(runner, path: str) -> str:
    return f"http://localhost:{runner.service.http_port}{path}"


def post(runner, path: str, token: bool = True, **kw) -> httpx.Response:
    return httpx.post(url(runner, path), headers=AUTH if token else {}, timeout=CALL_TIMEOUT, **kw)


def served(runner) -> list[list[int]]:
    got = runner.stub().Generate(request(PROMPTS, **SAMPLING), timeout=CALL_TIMEOUT)
    return [trajectory_arrays(t)["token_ids"].tolist() for t in got.trajectories]


def expected_with(state: dict[str, torch.Tensor], tmp_path) -> list[list[int]]:
    """What an engine loaded from a model directory holding `state` generates."""
    model_dir = tmp_path / "reference"
    shutil.copytree(DEFAULT_MODEL, model_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, model_dir / "model.safetensors")
    groups = Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed")).generate(PROMPTS, SamplingParams(**SAMPLING))
    return [c.token_ids for row in groups for c in row]


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def status(runner) -> pb.StatusResponse:
    return runner.stub().GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)


def test_a_bucketed_push_is_one_version_serving_exactly_those_weights(runner, base_state, tmp_path):
    state = perturbed(base_state, 1)
    pushed = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"]})  # tied: sent too, equal
    before = status(runner).weight_version
    sync = WeightSync(runner.client(TOKEN))
    buckets_sent = []
    original = sync._push_bucket_raw
    sync._push_bucket_raw = lambda chunks, **kw: buckets_sent.append(1) or original(chunks, **kw)
    result = sync.push_named(pushed, bucket_bytes=4 << 20)
    assert len(buckets_sent) >= 2
    assert result.version == before + 1 == status(runner).weight_version
    assert served(runner) == expected_with(state, tmp_path)
    assert status(runner).weight_source == "push"


def test_a_bad_bucket_is_refused_naming_the_tensor_and_nothing_changes(runner):
    before, outputs = status(runner).weight_version, served(runner)
    update_id = post(runner, "/v1/weights/begin", json=dict(timeout_seconds=60)).json()["update_id"]
    first = post(runner, f"/v1/weights/{update_id}/tensors", content=save({"model.norm.weight": torch.ones(256)}))
    assert first.status_code == 200 and first.json()["staged_tensors"] == 1
    bad = save({"model.layers.0.mlp.up_proj.weight": torch.zeros(704, 255)})
    second = post(runner, f"/v1/weights/{update_id}/tensors", content=bad)
    assert second.status_code == 400
    assert "model.layers.0.mlp.up_proj.weight: shape [704, 255], the model has [704, 256]" in \
        second.json()["error"]["message"]
    assert status(runner).weight_version == before and served(runner) == outputs
    assert post(runner, f"/v1/weights/{update_id}/abort").json()["freed_tensors"] == 1  # bucket 1 was kept
    gone = post(runner, f"/v1/weights/{update_id}/commit")
    assert gone.status_code == 404 and "was aborted" in gone.json()["error"]["message"]
    assert status(runner).weight_version == before and served(runner) == outputs


def test_wrapped_names_are_mapped_and_a_partial_update_keeps_the_other_tensors(runner, base_state, tmp_path):
    httpx.post(url(runner, "/reset_weights"), headers=AUTH, timeout=CALL_TIMEOUT).raise_for_status()
    before = status(runner).weight_version
    norm = base_state["model.norm.weight"] * 1.5
    up = base_state["model.layers.2.mlp.up_proj.weight"] * 0.5
    update_id = post(runner, "/v1/weights/begin").json()["update_id"]
    for bucket in ({"module._orig_mod.model.norm.weight": norm},
                   {"model.model.layers.2.mlp.up_proj.weight": up}):
        post(runner, f"/v1/weights/{update_id}/tensors",
             content=save({k: v.contiguous() for k, v in bucket.items()})).raise_for_status()
    done = post(runner, f"/v1/weights/{update_id}/commit", json=dict(mode="keep")).json()
    assert done["version"] == before + 1 and done["num_tensors"] == 2
    state = dict(base_state, **{"model.norm.weight": norm, "model.layers.2.mlp.up_proj.weight": up})
    assert served(runner) == expected_with(state, tmp_path)


def test_an_unknown_name_is_refused_naming_it(runner):
    update_id = post(runner, "/v1/weights/begin").json()["update_id"]
    resp = post(runner, f"/v1/weights/{update_id}/tensors", content=save({"model.layers.0.lora_A.weight":
                                                                         torch.zeros(2)}))
    assert resp.status_code == 400 and "'model.layers.0.lora_A.weight' is not a weight" in resp.json()["error"]["message"]
    post(runner, f"/v1/weights/{update_id}/abort").raise_for_status()


@pytest.mark.parametrize("route,key", [("/update_weights", "weight_dir"), ("/update_weights_from_disk", "model_path")])
def test_update_from_disk_serves_the_checkpoint(runner, base_state, tmp_path, route, key):
    state = perturbed(base_state, 2)
    checkpoint = tmp_path / "step-100"
    checkpoint.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, checkpoint / "model.safetensors")
    before = status(runner).weight_version
    resp = post(runner, route, json={key: str(checkpoint)})
    assert resp.status_code == 200 and resp.json()["version"] == before + 1
    assert served(runner) == expected_with(state, tmp_path)
    assert status(runner).weight_source == f"disk:{checkpoint}"


def test_a_checkpoint_whose_tied_head_differs_from_the_embedding_is_refused(runner, base_state, tmp_path):
    state = dict(base_state, **{"lm_head.weight": base_state["model.embed_tokens.weight"] + 1})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    before = status(runner).weight_version
    resp = post(runner, "/update_weights", json=dict(weight_dir=str(tmp_path)))
    assert resp.status_code == 400 and "lm_head.weight differs from model.embed_tokens.weight" in \
        resp.json()["error"]["message"]
    assert status(runner).weight_version == before


def test_update_from_a_missing_path_is_a_clear_error_and_changes_nothing(runner, tmp_path):
    before = status(runner).weight_version
    resp = post(runner, "/update_weights_from_disk", json=dict(model_path=str(tmp_path / "nope")))
    assert resp.status_code == 400
    assert f"weight path {tmp_path / 'nope'} does not exist" in resp.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as info:
        WeightSync(runner.client(TOKEN)).update_from_disk(str(tmp_path / "nope"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in info.value.details()
    assert status(runner).weight_version == before


def test_reset_returns_to_the_base_outputs_as_a_new_version(runner, base_state, tmp_path):
    base = expected_with(base_state, tmp_path)
    WeightSync(runner.client(TOKEN)).push(perturbed(base_state, 3))
    assert served(runner) != base
    before = status(runner).weight_version
    resp = post(runner, "/reset_weights")
    assert resp.json()["version"] == before + 1 and served(runner) == base
    [model] = httpx.get(url(runner, "/v1/models"), timeout=CALL_TIMEOUT).json()["data"]
    assert model["id"] == "default_model" and model["weight_version"] == before + 1
    assert model["weight_source"] == "reset" and status(runner).model == "default_model"
    assert model["family"] == "dense" and model["model_type"] == "qwen2"  # the decoder family serving it


@pytest.mark.parametrize("route", ["/pause", "/pause_generation", "/resume", "/continue_generation",
                                   "/update_weights", "/update_weights_from_disk", "/reset_weights",
                                   "/v1/weights/begin", "/v1/weights/x/tensors", "/v1/weights/x/commit",
                                   "/v1/weights/x/abort"])
def test_mutating_routes_without_the_token_are_401(runner, route):
    assert post(runner, route, token=False, json={}).status_code == 401
    wrong = httpx.post(url(runner, route), headers={"Authorization": "Bearer nope"}, json={}, timeout=CALL_TIMEOUT)
    assert wrong.status_code == 401


@pytest.mark.parametrize("call", [
    lambda s: s.BeginWeightUpdate(pb.BeginWeightUpdateRequest(), timeout=CALL_TIMEOUT),
    lambda s: s.PushWeightBucket(iter([pb.WeightChunk()]), timeout=CALL_TIMEOUT),
    lambda s: s.CommitWeightUpdate(pb.CommitWeightUpdateRequest(update_id="x"), timeout=CALL_TIMEOUT),
    lambda s: s.AbortWeightUpdate(pb.AbortWeightUpdateRequest(update_id="x"), timeout=CALL_TIMEOUT),
    lambda s: s.UpdateWeightsFromDisk(pb.UpdateWeightsFromDiskRequest(model_path="/"), timeout=CALL_TIMEOUT),
    lambda s: s.ResetWeights(pb.ResetWeightsRequest(), timeout=CALL_TIMEOUT),
    lambda s: s.PauseGeneration(pb.PauseRequest(), timeout=CALL_TIMEOUT),
    lambda s: s.ResumeGeneration(pb.ResumeRequest(), timeout=CALL_TIMEOUT),
])
def test_mutating_rpcs_without_the_token_are_unauthenticated(runner, call):
    with pytest.raises(grpc.RpcError) as info:
        call(runner.stub())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def long_stream(runner) -> tuple[threading.Thread, dict]:
    out = {}
    stub = runner.stub()
    t = threading.Thread(target=lambda: out.setdefault("got", list(stub.GenerateStream(request(**LONG),
                                                                                        timeout=600))))
    t.start()
    wait_until(lambda: sum(r.running_requests for r in status(runner).replicas) == 1, what="the long request running")
    return t, out


def test_pause_keep_over_http_holds_requests_and_resume_finishes_them(runner):
    t, out = long_stream(runner)
    assert post(runner, "/pause?mode=keep&timeout_seconds=60").json() == {"paused": True, "aborted_requests": 0}
    assert httpx.get(url(runner, "/is_paused"), timeout=CALL_TIMEOUT).json() == {"is_paused": True}
    st = status(runner)
    assert st.paused and st.replicas[0].paused and st.replicas[0].running_requests == 1
    post(runner, "/resume").raise_for_status()
    t.join(600)
    assert len(out["got"]) == 8 and all(x.finish_reason == pb.LENGTH for x in out["got"])
    assert not status(runner).paused


def test_pause_abort_ends_running_requests_with_abort(runner):
    t, out = long_stream(runner)
    sync = WeightSync(runner.client(TOKEN))
    assert sync.pause("abort", timeout_seconds=60) == 1
    t.join(600)
    assert len(out["got"]) == 8 and all(x.finish_reason == pb.ABORT for x in out["got"])
    sync.resume()
    assert runner.stub().Generate(request([[5]], max_tokens=3), timeout=CALL_TIMEOUT).trajectories


def test_a_same_host_push_goes_by_shared_memory_and_serves_exactly_those_weights(runner, base_state, tmp_path):
    """WeightSync's default picks the shared-memory path here (the replica is on this host); the
    replica keeps its mapping of the segment for the next push while the trainer holds the file,
    and lets it go once the trainer closed it (its engine loop looks about once a second)."""
    import os
    state = perturbed(base_state, 5)
    before = status(runner).weight_version
    sync = WeightSync(runner.client(TOKEN))
    result = sync.push(state)
    assert (result.transport, sync.chosen_transport) == ("shared", "shared")
    assert result.version == before + 1 == status(runner).weight_version
    assert result.num_bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert served(runner) == expected_with(state, tmp_path)
    replica = runner.service.router.replicas[0].actor
    pid = ray.get(replica.status.remote())["pid"]

    def replica_maps_a_segment() -> bool:
        with open(f"/proc/{pid}/maps") as f:
            return "memfd:rollout-weights" in f.read()
    assert replica_maps_a_segment()
    sync.close()
    wait_until(lambda: not replica_maps_a_segment(), 30, "the replica let the closed segment go")
    assert os.path.isdir("/dev/shm") and not [n for n in os.listdir("/dev/shm") if "rollout-weights" in n]


def _own_segments() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:rollout-weights" in line for line in f)


def test_the_trainer_rewrites_its_segment_for_the_next_push_and_abandons_it_when_a_push_fails(runner, base_state,
                                                                                              tmp_path):
    """WeightSync keeps its memfd between pushes (fresh pages cost more than the copy) and writes
    the next push into it; a refused push (NaN) changes nothing and the segment is abandoned
    (a replica could still be reading it), so the next push writes a new one; close() frees it."""
    before_maps = _own_segments()
    sync = WeightSync(runner.client(TOKEN), "shared")
    first = sync.push(perturbed(base_state, 7))
    fd = sync._segment.fd
    second_state = perturbed(base_state, 8)
    second = sync.push(second_state)
    assert sync._segment.fd == fd and second.version == first.version + 1
    assert _own_segments() == before_maps + 1  # one segment, written twice
    expected = expected_with(second_state, tmp_path)
    assert served(runner) == expected
    bad = dict(second_state)
    bad["model.norm.weight"] = bad["model.norm.weight"].clone()
    bad["model.norm.weight"][0] = float("inf")
    with pytest.raises(grpc.RpcError) as info:
        sync.push(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "contains NaN or Inf" in info.value.details()
    assert sync._segment is None and status(runner).weight_version == second.version
    assert served(runner) == expected
    third = sync.push(perturbed(base_state, 9))
    assert third.version == second.version + 1 and sync._segment.fd >= 0
    sync.close()
    assert _own_segments() == before_maps


def shared_request(segment, **changes) -> pb.SharedWeightsRequest:
    import os

    from rollout.service.shared_weights import host_id
    tensors = [pb.SharedTensor(name=e.name, dtype=e.dtype, shape=list(e.shape), offset=e.offset, nbytes=e.nbytes,
                               xxh3=e.xxh3) for e in segment.entries]
    for i, fields in changes.pop("tensor", {}).items():
        for k, v in fields.items():
            if k == "shape":
                del tensors[i].shape[:]
                tensors[i].shape.extend(v)
            else:
                setattr(tensors[i], k, v)
    return pb.SharedWeightsRequest(**dict(dict(pid=os.getpid(), fd=segment.fd, size=segment.size, host_id=host_id(),
                                               tensors=tensors), **changes))


@pytest.mark.parametrize("case,code,match", [
    ("checksum", grpc.StatusCode.INVALID_ARGUMENT, r"checksum mismatch \(xxh3\)"),
    ("nan", grpc.StatusCode.INVALID_ARGUMENT, "contains NaN or Inf"),
    ("shape", grpc.StatusCode.INVALID_ARGUMENT, r"shape \[3\], the model has"),
    ("name", grpc.StatusCode.INVALID_ARGUMENT, "'model.nope.weight' is not a weight"),
    ("dtype", grpc.StatusCode.INVALID_ARGUMENT, "pushed as torch.float16"),
    ("range", grpc.StatusCode.INVALID_ARGUMENT, "not an aligned range"),
    ("host", grpc.StatusCode.FAILED_PRECONDITION, "trainer on this replica's host"),
])
def test_a_bad_shared_push_is_refused_and_nothing_changes(runner, base_state, case, code, match):
    from rollout.service.shared_weights import SharedSegment
    state = perturbed(base_state, 6)
    first = next(iter(state))
    changes = {}
    if case == "nan":
        state["model.norm.weight"] = state["model.norm.weight"].clone()
        state["model.norm.weight"][3] = float("nan")
    elif case == "dtype":
        state["model.norm.weight"] = state["model.norm.weight"].half()
    elif case == "checksum":
        changes = dict(tensor={0: dict(xxh3=1)})
    elif case == "shape":
        changes = dict(tensor={0: dict(shape=[3])})
    elif case == "name":
        changes = dict(tensor={0: dict(name="model.nope.weight")})
    elif case == "range":
        changes = dict(tensor={0: dict(offset=1 << 40)})
    elif case == "host":
        changes = dict(host_id="another-host/1")
    before, outputs = status(runner).weight_version, served(runner)
    with SharedSegment(list(state.items())) as segment:
        with pytest.raises(grpc.RpcError) as info:
            runner.stub().UpdateWeightsShared(shared_request(segment, **changes), timeout=CALL_TIMEOUT,
                                              metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert info.value.code() == code, info.value.details()
    assert pytest.importorskip("re").search(match, info.value.details()), (first, info.value.details())
    assert status(runner).weight_version == before and served(runner) == outputs


# ---------------------------------------------------------------- gRPC pushes through the front end's segment
@pytest.fixture
def object_store_puts(monkeypatch):
    """Every ray.put the front end makes (the router runs in this process)."""
    puts = []
    real = ray.put
    monkeypatch.setattr(ray, "put", lambda *a, **k: (puts.append(a), real(*a, **k))[1])
    return puts


def served_with_versions(runner) -> tuple[list[list[int]], set[int]]:
    got = runner.stub().Generate(request(PROMPTS, **SAMPLING), timeout=CALL_TIMEOUT)
    arrays = [trajectory_arrays(t) for t in got.trajectories]
    return [a["token_ids"].tolist() for a in arrays], {v for a in arrays for v in a["policy_versions"].tolist()}


def test_a_grpc_push_to_a_replica_on_this_node_goes_through_a_shared_segment_not_the_object_store(
        runner, base_state, tmp_path, object_store_puts):
    """The front end assembles the chunks into its memfd and the replica stages from it: no
    ray.put; the segment is kept and written again by the next push (and is the catch-up source
    of the version it holds); the replica keeps its mapping of it for the next push (the same
    pages the router keeps: no memory of its own) and stages that push through the same mapping."""
    sync = WeightSync(runner.client(TOKEN), "grpc")
    router = runner.service.router
    before, segments = status(runner).weight_version, _own_segments()
    state = perturbed(base_state, 21)
    result = sync.push(state)
    assert result.version == before + 1 == status(runner).weight_version
    tokens, versions = served_with_versions(runner)
    assert tokens == expected_with(state, tmp_path) and versions == {result.version}
    segment = router._segment
    assert segment is not None and router.weights_ref is segment and object_store_puts == []
    pid = ray.get(router.replicas[0].actor.status.remote())["pid"]

    def segment_mappings() -> list[str]:  # the address ranges of the replica's mappings of a segment
        with open(f"/proc/{pid}/maps") as f:
            return [line.split()[0] for line in f if "memfd:rollout-weights" in line]
    mapped = segment_mappings()
    assert len(mapped) == 1
    second_state = perturbed(base_state, 22)
    second = sync.push(second_state)
    assert second.version == result.version + 1 and router._segment is segment and segment.fd >= 0
    assert segment_mappings() == mapped  # the same mapping, not a new one
    assert served_with_versions(runner) == (expected_with(second_state, tmp_path / "second"), {second.version})
    assert object_store_puts == [] and _own_segments() <= segments + 1


def _corrupted_chunks(state: dict[str, torch.Tensor], case: str):
    import msgpack

    from rollout.wire import weight_chunks
    state = dict(state)
    if case == "nan":
        state["model.norm.weight"] = state["model.norm.weight"].clone()
        state["model.norm.weight"][2] = float("nan")
    elif case == "shape":
        state["model.norm.weight"] = torch.ones(5)
    elif case == "name":
        state["model.nope.weight"] = torch.ones(3)
    elif case == "dtype":  # every tensor: the segment is laid out for 2-byte elements, the replica refuses them
        state = {k: v.half() for k, v in state.items()}
    chunks = list(weight_chunks(state.items(), version=0, num_tensors=len(state), chunk_bytes=1 << 16))
    if case == "checksum":
        meta = msgpack.unpackb(chunks[-1].metadata)
        chunks[-1] = pb.WeightChunk(metadata=msgpack.packb(dict(meta, xxh3=meta["xxh3"] ^ 1)), data=chunks[-1].data)
    return chunks


@pytest.mark.parametrize("case,match", [
    ("checksum", r"checksum mismatch \(xxh3\)"),
    ("nan", "contains NaN or Inf"),
    ("shape", r"shape \[5\], the model has"),
    ("name", "'model.nope.weight' is not a weight"),
    ("dtype", "pushed as torch.float16"),
])
def test_a_bad_grpc_push_through_the_segment_is_refused_and_nothing_changes(runner, base_state, case, match,
                                                                            object_store_puts):
    before, outputs = status(runner).weight_version, served(runner)
    with pytest.raises(grpc.RpcError) as info:
        runner.stub().UpdateWeights(iter(_corrupted_chunks(perturbed(base_state, 23), case)), timeout=CALL_TIMEOUT,
                                    metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert pytest.importorskip("re").search(match, info.value.details()), info.value.details()
    assert status(runner).weight_version == before and served(runner) == outputs
    assert object_store_puts == []  # refused on the segment path, not by a fallback


def test_a_trainer_dying_mid_grpc_push_leaves_the_old_version_and_the_segment_for_the_next_push(
        runner, base_state, tmp_path, object_store_puts):
    import os

    from rollout.wire import weight_chunks
    WeightSync(runner.client(TOKEN), "grpc").push(perturbed(base_state, 24))  # a segment is kept
    before, outputs, segments = status(runner).weight_version, served(runner), _own_segments()
    shm = set(os.listdir("/dev/shm"))
    chunks = list(weight_chunks(perturbed(base_state, 25).items(), version=0, num_tensors=len(base_state),
                                chunk_bytes=1 << 16))

    def dies_half_way():
        yield from chunks[:len(chunks) // 2]
        raise RuntimeError("trainer died")
    with pytest.raises(grpc.RpcError):
        runner.stub().UpdateWeights(dies_half_way(), timeout=CALL_TIMEOUT,
                                    metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert status(runner).weight_version == before and served(runner) == outputs
    wait_until(lambda: runner.service.router._segment is not None, what="the segment given back to the router")
    assert set(os.listdir("/dev/shm")) == shm and _own_segments() <= segments
    state = perturbed(base_state, 26)
    assert WeightSync(runner.client(TOKEN), "grpc").push(state).version == before + 1
    assert served(runner) == expected_with(state, tmp_path) and object_store_puts == []


def test_a_grpc_push_to_a_replica_on_another_node_goes_through_the_object_store(runner, base_state, tmp_path,
                                                                                  object_store_puts, monkeypatch):
    from rollout.service.router import Router
    monkeypatch.setattr(Router, "is_local", lambda self, r: False)
    state = perturbed(base_state, 27)
    result = WeightSync(runner.client(TOKEN), "grpc").push(state)
    assert result.version == status(runner).weight_version and len(object_store_puts) == 1
    assert served_with_versions(runner) == (expected_with(state, tmp_path), {result.version})


def test_a_replica_that_cannot_map_the_front_ends_segment_gets_the_push_through_the_object_store(
        runner, base_state, tmp_path, object_store_puts, monkeypatch):
    """A replica here that cannot open the front end's memfd (simulated: the segment claims
    another host) refuses it; the same push then goes through the object store, and so do the next."""
    import rollout.service.router as router_module
    router = runner.service.router
    monkeypatch.setattr(router, "segments_refused", False)
    monkeypatch.setattr(router_module.Router, "is_local", lambda self, r: not self.segments_refused)
    monkeypatch.setattr(router_module, "host_id", lambda: "another-host/1")
    sync, before = WeightSync(runner.client(TOKEN), "grpc"), status(runner).weight_version
    result = sync.push(perturbed(base_state, 28))
    assert result.version == before + 1 and router.segments_refused and len(object_store_puts) == 1
    state = perturbed(base_state, 29)
    assert sync.push(state).version == before + 2 and len(object_store_puts) == 2
    assert served_with_versions(runner) == (expected_with(state, tmp_path), {before + 2})
