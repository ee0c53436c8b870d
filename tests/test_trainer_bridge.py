"""Trainer bridge against a live service: weight pushes, log-prob parity, staleness, batching."""

import asyncio
import shutil

import grpc
import pytest
import torch

ray = pytest.importorskip("ray")

from service_helpers import CALL_TIMEOUT, ServiceRunner  # noqa: E402

from rollout import Engine, SamplingParams  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.service.serve import RolloutService, init_ray  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402
from rollout.wire import weight_chunks  # noqa: E402
from trainer_bridge import (  # noqa: E402
    AsyncRolloutClient,
    RolloutClient,
    WeightSync,
    diffusion_cotrain_loss,
    pad_groups,
    tidar_forward,
    token_logprobs,
)

TOKEN = "bridge-token"
PROMPTS = [[2, 3, 4], [5, 6], [7, 8, 9, 10]]
PARAMS = SamplingParams(max_tokens=12, n=3, seed=11)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("bridge"), "qwen2", vocab_size=16, block_size=4)


@pytest.fixture(scope="module")
def service(model_dir):
    init_ray(num_cpus=6, include_dashboard=False, log_to_driver=False, namespace="test-bridge")
    runner = ServiceRunner(RolloutService(model_dir, replicas=2, port=0, auth_token=TOKEN, name="bridge",
                                          engine_config=EngineConfig(drafting="fixed")))
    runner.wait_started()
    yield runner
    runner.stop()
    ray.shutdown()


@pytest.fixture
def client(service):
    with RolloutClient(f"localhost:{service.service.port}", token=TOKEN, timeout=CALL_TIMEOUT) as c:
        yield c


def perturbed(model_dir, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = Engine.from_pretrained(model_dir).model.state_dict()
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def engine_with(model_dir, state, tmp_path) -> Engine:
    from safetensors.torch import save_file
    d = tmp_path / "fresh"
    shutil.copytree(model_dir, d, dirs_exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, d / "model.safetensors")
    return Engine.from_pretrained(d, config=EngineConfig(drafting="fixed"))


def tokens(groups):
    return [[t.token_ids.tolist() for t in g.trajectories] for g in groups]


def versions_of(client) -> set[int]:
    st = client.status()
    return {st.weight_version} | {r.weight_version for r in st.replicas}


def test_push_changes_the_served_model_to_the_pushed_weights(client, model_dir, tmp_path):
    state = perturbed(model_dir, 1)
    result = WeightSync(client, "grpc", chunk_bytes=2048).push(state)
    assert result.num_tensors == len(state) and result.num_bytes > 0
    expected = engine_with(model_dir, state, tmp_path).generate(PROMPTS, PARAMS)
    for _ in range(2):  # both replicas (idle replicas take turns)
        groups = client.generate(PROMPTS, PARAMS)
        assert tokens(groups) == [[c.token_ids for c in g] for g in expected]
        assert all(set(t.policy_versions.tolist()) == {result.version} for g in groups for t in g.trajectories)


def test_rollout_logprobs_equal_trainer_teacher_forced_logprobs_after_a_push(client, model_dir, tmp_path):
    state = perturbed(model_dir, 2)
    WeightSync(client).push(state)
    trainer = engine_with(model_dir, state, tmp_path)
    batch = pad_groups(client.generate(PROMPTS, SamplingParams(max_tokens=12, n=3, seed=1, temperature=0.9)))
    with torch.no_grad():
        ar_logits, _ = tidar_forward(trainer.model, batch.input_ids, trainer.tidar.mask_token_id,
                                     trainer.tidar.block_size)
    new = token_logprobs(ar_logits, batch.input_ids, temperature=0.9, forbidden=(trainer.tidar.mask_token_id,))
    mask = batch.loss_mask.bool()
    assert (new[mask] - batch.old_logprobs[mask]).abs().max().item() <= 1e-5


def test_push_killed_half_way_leaves_the_old_version_everywhere(client, model_dir):
    before = versions_of(client)
    assert len(before) == 1
    state = perturbed(model_dir, 3)
    chunks = list(weight_chunks(state.items(), version=0, num_tensors=len(state), chunk_bytes=1024))

    def dies_half_way():
        yield from chunks[:len(chunks) // 2]
        raise RuntimeError("trainer died")

    with pytest.raises(grpc.RpcError):
        client.stub.UpdateWeights(dies_half_way(), timeout=CALL_TIMEOUT, metadata=client.auth_metadata)
    assert versions_of(client) == before


@pytest.mark.parametrize("corrupt,code,match", [
    (lambda s: s.update({"model.norm.weight": torch.ones(5)}), grpc.StatusCode.INVALID_ARGUMENT,
     r"model.norm.weight: shape \[5\]"),
    (lambda s: s.pop("lm_head.weight"), grpc.StatusCode.INVALID_ARGUMENT, r"missing \['lm_head.weight'\]"),
])
def test_mismatched_weights_are_refused_and_nothing_changes(client, model_dir, corrupt, code, match):
    before = versions_of(client)
    state = perturbed(model_dir, 4)
    corrupt(state)
    with pytest.raises(grpc.RpcError) as info:
        WeightSync(client).push(state)
    assert info.value.code() == code
    assert pytest.importorskip("re").search(match, info.value.details())
    assert versions_of(client) == before


def test_staleness_is_refused_or_waited_for(client, model_dir):
    served = client.status().weight_version
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPTS, PARAMS, policy_version=served + 3, max_staleness=1, wait=False)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "min_policy_version" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPTS, PARAMS, policy_version=served + 3, max_staleness=1, wait=True, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.generate(PROMPTS, PARAMS, policy_version=served + 1, max_staleness=1, wait=False)


def test_broadcast_and_grpc_transports_give_identical_weights(client, model_dir):
    state = perturbed(model_dir, 5)
    WeightSync(client, "grpc").push(state)
    via_grpc = tokens(client.generate(PROMPTS, PARAMS))
    WeightSync(client, "grpc").push(perturbed(model_dir, 6))
    assert tokens(client.generate(PROMPTS, PARAMS)) != via_grpc
    sync = WeightSync(client, "broadcast", master_address="127.0.0.1", timeout=120)
    result = sync.push(state)
    assert result.version == client.status().weight_version
    for _ in range(2):  # both replicas received it
        assert tokens(client.generate(PROMPTS, PARAMS)) == via_grpc
    sync.push(perturbed(model_dir, 7))  # the group is reused
    assert versions_of(client) == {result.version + 1}


def test_a_grpc_push_reaches_a_replica_on_this_node_by_segment_and_one_elsewhere_by_the_object_store(
        client, service, model_dir, monkeypatch):
    """One replica counts as on another node: it stages from the one object-store copy, the other
    from the front end's segment; both then serve the same weights, at the same version."""
    from rollout.service.router import Router
    router = service.service.router
    local = router.replicas[0]
    monkeypatch.setattr(Router, "is_local", lambda self, r: r is local)
    puts, real = [], ray.put
    monkeypatch.setattr(ray, "put", lambda *a, **k: (puts.append(a), real(*a, **k))[1])
    result = WeightSync(client, "grpc").push(perturbed(model_dir, 8))
    assert len(puts) == 1 and router.weights_ref is not router._segment  # a restart on any node catches up
    served = ray.get([r.actor.weight_fingerprint.remote() for r in router.replicas])
    assert {s[0] for s in served} == {result.version} and served[0][1] == served[1][1]


def test_async_client_matches_the_sync_client(client, service):
    async def run():
        c = AsyncRolloutClient(f"localhost:{service.service.port}", timeout=CALL_TIMEOUT)
        try:
            return await c.generate(PROMPTS, PARAMS)
        finally:
            await c.close()
    assert tokens(asyncio.run(run())) == tokens(client.generate(PROMPTS, PARAMS))


def test_pad_groups_aligns_tokens_logprobs_and_masks(client):
    groups = client.generate(PROMPTS, PARAMS)
    batch = pad_groups(groups, pad_id=0)
    assert batch.input_ids.shape[0] == len(PROMPTS) * 3
    row = 0
    for g in groups:
        for t in g.trajectories:
            P, T = len(g.prompt), len(t.token_ids)
            assert batch.input_ids[row, :P].tolist() == g.prompt
            assert batch.input_ids[row, P:P + T].tolist() == t.token_ids.tolist()
            assert batch.loss_mask[row].sum() == T and batch.loss_mask[row, P:P + T].all()
            assert torch.equal(batch.old_logprobs[row, P:P + T], torch.tensor(t.logprobs))
            assert int(batch.group[row]) == g.prompt_index
            row += 1


def test_client_returns_top_alternatives_and_min_p_applies(client):
    import dataclasses
    groups = client.generate(PROMPTS, dataclasses.replace(PARAMS, logprobs=3, min_p=0.05))
    for g in groups:
        for t in g.trajectories:
            assert t.top_token_ids.shape == t.top_logprobs.shape == (len(t.token_ids), 3)
            assert (t.top_logprobs[:, 0] >= t.logprobs - 1e-6).all()  # the most likely is at least the sampled
            assert (t.top_logprobs[:, :-1] >= t.top_logprobs[:, 1:]).all()
    plain = client.generate(PROMPTS[:1], PARAMS)[0].trajectories[0]
    assert plain.top_token_ids.shape == (0, 0)


def test_cotrain_loss_trains_the_drafts_toward_the_policy(model_dir):
    engine = Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed"))
    model, tidar = engine.model, engine.tidar
    model.train()
    x = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2]])
    mask = torch.ones_like(x, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, ar_before = [], None
    for _ in range(8):
        ar, diff = tidar_forward(model, x, tidar.mask_token_id, tidar.block_size)
        ar_before = ar.detach() if ar_before is None else ar_before
        loss = diffusion_cotrain_loss(ar, diff, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_cotrain_loss_sends_no_gradient_into_the_ar_target():
    ar = torch.randn(2, 6, 16, requires_grad=True)
    diff = torch.randn(2, 6, 16, requires_grad=True)
    diffusion_cotrain_loss(ar, diff, torch.ones(2, 6)).backward()
    assert ar.grad is None and diff.grad is not None and diff.grad.abs().sum() > 0
    same = torch.randn(1, 5, 16)
    shifted = torch.cat((torch.zeros(1, 1, 16), same[:, :-1]), dim=1)  # q at i equals p predicting i
    assert diffusion_cotrain_loss(same, shifted, torch.ones(1, 5)).item() == pytest.approx(0.0, abs=1e-6)
