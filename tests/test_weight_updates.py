"""Weight updates on one replica and in the front end's pieces, without Ray: names, bucket
headers, partial and from-disk staging, pause / resume."""

import asyncio
import json
import struct
import threading
from concurrent.futures import Future

import pytest
import torch
from conftest import PROMPTS
from safetensors.torch import save, save_file
from service_helpers import wait_until

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.service.messages import Finished, Started
from rollout.service.servicer import model_weight_shapes
from rollout.service.updates import read_bucket
from rollout.service.weights import WeightMismatchError, canonical_name, read_weights_from_disk

PARAMS = dict(max_tokens=200, seed=1)


@pytest.fixture
def replica(make_replica):
    return make_replica("r0")


@pytest.fixture(scope="module")
def expected(tiny_dir):
    return model_weight_shapes(Engine.from_pretrained(tiny_dir).config)


def perturbed(engine: Engine, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in engine.model.state_dict().items()}


def hold(replica) -> threading.Event:
    """Holds the engine loop between two steps; set the event to let it go on."""
    entered, release = threading.Event(), threading.Event()

    def wait():
        entered.set()
        release.wait(60)
    replica._commands.put((wait, Future()))
    assert entered.wait(60)
    return release


def started(replica, request_id="req"):
    gen = replica.generate(request_id, PROMPTS, PARAMS, 0)
    assert isinstance(next(gen), Started)
    return gen


def drain(gen) -> list[dict]:
    return [r for message in gen if isinstance(message, Finished) for r in message.records]


def paused_while_running(replica, mode: str, timeout: float = 60.0) -> tuple:
    """A started request, then a pause applied before its next step. Returns (stream, ended)."""
    gen = started(replica)
    release = hold(replica)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ended", replica.pause(mode, timeout)))
    t.start()
    wait_until(lambda: replica._commands.qsize() == 1, what="pause queued")
    release.set()
    t.join(60)
    return gen, out["ended"]


def tokens_so_far(replica, request_id="req") -> list[int]:
    return [len(s.out.token_ids) for s in replica.engine.requests[request_id].sequences]


SAMPLING = dict(max_tokens=12, n=2, seed=5)


def generations(engine: Engine) -> list:
    return [[c.token_ids for c in row] for row in engine.generate(PROMPTS, SamplingParams(**SAMPLING))]


def served(replica, request_id: str = "check") -> list:
    """What the replica generates (through its own loop, which alone may step its engine)."""
    records = sorted(drain(replica.generate(request_id, PROMPTS, SAMPLING, 0)),
                     key=lambda r: (r["prompt_index"], r["sample_index"]))
    n = SAMPLING["n"]
    return [[r["token_ids"].tolist() for r in records[i * n:(i + 1) * n]] for i in range(len(PROMPTS))]


# ---------------------------------------------------------------------------- names
@pytest.mark.parametrize("name,canonical", [
    ("model.norm.weight", "model.norm.weight"),
    ("module.model.norm.weight", "model.norm.weight"),
    ("_orig_mod.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("model.model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"),
    ("base_model.model.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.self_attn.k_proj.bias",
     "model.layers.0.self_attn.k_proj.bias"),
    ("module._orig_mod.model.norm.weight", "model.norm.weight"),
])
def test_wrapped_names_map_to_the_model_names(expected, name, canonical):
    assert canonical_name(name, expected) == canonical


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.lora_A.weight", "norm.weight", "model.norms.weight"])
def test_unknown_names_are_refused_naming_them(expected, name):
    with pytest.raises(WeightMismatchError, match=f"tensor '{name}' is not a weight of the served model"):
        canonical_name(name, expected)


def test_an_ambiguous_name_is_refused_naming_the_candidates():
    expected = {"model.x.weight": (2,), "x.weight": (2,)}
    with pytest.raises(WeightMismatchError, match=r"'module.model.x.weight' is ambiguous: .*model.x.weight.*x.weight"):
        canonical_name("module.model.x.weight", expected)


# ---------------------------------------------------------------------------- bucket headers
def test_a_bucket_maps_names_and_keeps_values(expected):
    t = torch.randn(32)
    bucket = read_bucket(save({"module.model.norm.weight": t}), lambda n: canonical_name(n, expected), expected)
    assert list(bucket) == ["model.norm.weight"] and torch.equal(bucket["model.norm.weight"], t)


def test_a_bucket_with_a_wrong_shape_is_refused_from_its_header(expected, monkeypatch):
    import rollout.service.updates as updates
    monkeypatch.setattr(updates, "load_safetensors", lambda body: pytest.fail("tensors built before the check"))
    body = save({"model.norm.weight": torch.zeros(32), "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(WeightMismatchError, match=r"model.layers.0.mlp.up_proj.weight: shape \[3, 3\], the model has"):
        read_bucket(body, lambda n: canonical_name(n, expected), expected)


def test_a_bucket_whose_offsets_lie_about_its_size_is_refused(expected):
    header = json.dumps({"model.norm.weight": dict(dtype="F32", shape=[32], data_offsets=[0, 1 << 40])}).encode()
    body = struct.pack("<Q", len(header)) + header + bytes(128)
    with pytest.raises(ValueError, match=r"data_offsets \[0, 1099511627776\] do not hold 128 bytes"):
        read_bucket(body, lambda n: canonical_name(n, expected), expected)


# ---------------------------------------------------------------------------- partial and from disk
def test_a_partial_update_changes_only_the_tensors_sent(replica):
    before = {k: v.clone() for k, v in replica.engine.model.state_dict().items()}
    new = perturbed(replica.engine, 0)["model.norm.weight"]
    replica.stage_weights(1, {"model.norm.weight": new}, partial=True)
    assert replica.commit_weights(1) == 1
    after = replica.engine.model.state_dict()
    assert torch.equal(after["model.norm.weight"], new)
    assert all(torch.equal(before[k], v) for k, v in after.items() if k != "model.norm.weight")


def test_update_from_a_sharded_directory_serves_those_weights(replica, tiny_dir, tmp_path):
    state = {k: v.contiguous() for k, v in perturbed(replica.engine, 2).items()}
    names = sorted(state)
    half = len(names) // 2
    save_file({k: state[k] for k in names[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}}))
    replica.stage_from_disk(1, str(tmp_path))
    replica.commit_weights(1)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            (reference_dir / f.name).write_bytes(f.read_bytes())
    save_file(state, reference_dir / "model.safetensors")
    assert served(replica) == generations(Engine.from_pretrained(reference_dir, config=EngineConfig(drafting="fixed")))


def test_update_from_a_missing_path_is_refused_naming_it(replica, tmp_path):
    with pytest.raises(WeightMismatchError, match=f"weight path {tmp_path / 'nowhere'} does not exist"):
        replica.stage_from_disk(1, str(tmp_path / "nowhere"))
    assert replica._staged is None


def test_a_checkpoint_with_a_wrong_shape_is_refused_before_any_tensor_is_read(replica, tmp_path, monkeypatch):
    state = {k: v.contiguous() for k, v in replica.engine.model.state_dict().items()}
    state["model.norm.weight"] = torch.zeros(7)
    save_file(state, tmp_path / "model.safetensors")
    import rollout.service.weights as weights
    monkeypatch.setattr(weights, "read_tensors",
                        lambda *a: pytest.fail("a tensor was read before the headers were checked"))
    with pytest.raises(WeightMismatchError, match=r"model.norm.weight: shape \[7\], the model has \[32\]"):
        read_weights_from_disk(tmp_path, replica.engine.model)


def test_a_checkpoint_missing_weights_is_refused_naming_them(replica, tmp_path):
    state = {k: v.contiguous() for k, v in replica.engine.model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightMismatchError, match=r"lacks 1 weights of the model: \['model.norm.weight'\]"):
        replica.stage_from_disk(1, str(tmp_path / "model.safetensors"))


def test_reset_stages_the_weights_the_replica_started_with(replica, tiny_dir):
    base = generations(Engine.from_pretrained(tiny_dir, config=EngineConfig(drafting="fixed")))
    replica.stage_weights(1, perturbed(replica.engine, 3))
    replica.commit_weights(1)
    assert served(replica, "pushed") != base
    replica.stage_from_disk(2, None)
    assert replica.commit_weights(2) == 2
    assert served(replica, "reset") == base and replica.engine.weight_version == 2


# ---------------------------------------------------------------------------- pause / resume
def test_pause_keep_takes_no_step_until_resume_which_finishes_the_requests(replica):
    gen, ended = paused_while_running(replica, "keep")
    assert ended == 0 and replica.status()["paused"]
    held = tokens_so_far(replica)
    for _ in range(5):  # the loop goes round (it runs these commands) yet takes no step
        replica._call(lambda: None, "probe")
    assert tokens_so_far(replica) == held and min(held) < PARAMS["max_tokens"]
    replica.resume()
    records = drain(gen)
    assert len(records) == len(PROMPTS) and all(r["finish_reason"] == "length" for r in records)
    assert not replica.status()["paused"]


def test_pause_abort_ends_running_requests_and_later_ones_run_after_resume(replica):
    gen, ended = paused_while_running(replica, "abort")
    records = drain(gen)
    assert ended == 1
    assert all(r["finish_reason"] == "abort" and len(r["token_ids"]) < PARAMS["max_tokens"] for r in records)
    later = replica.generate("later", PROMPTS, dict(max_tokens=5, seed=2), 0)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("records", drain(later)))
    t.start()
    wait_until(lambda: "later" in replica.engine.requests, what="the later request queued")
    assert tokens_so_far(replica, "later") == [0] * len(PROMPTS)
    replica.resume()
    t.join(60)
    assert [r["finish_reason"] for r in got["records"]] == ["length"] * len(PROMPTS)


def test_a_pause_lifts_itself_after_its_timeout(replica):
    gen, _ = paused_while_running(replica, "keep", timeout=0.2)
    wait_until(lambda: not replica.paused, what="the pause timed out")
    assert all(r["finish_reason"] == "length" for r in drain(gen))


def test_a_commit_while_paused_applies_at_once_and_running_requests_continue_on_it(replica):
    gen, _ = paused_while_running(replica, "keep")
    replica.stage_weights(1, perturbed(replica.engine, 4))
    assert replica.commit_weights(1, "wait", timeout=30) == 1  # no drain while paused
    replica.resume()
    for r in drain(gen):
        versions = r["policy_versions"].tolist()
        assert versions[0] == 0 and versions[-1] == 1 and versions == sorted(versions)


@pytest.mark.parametrize("mode,timeout,match", [("wait", 10, "mode must be one of keep, abort"),
                                                ("keep", 0, r"timeout_seconds must be in \(0, 3600\]")])
def test_bad_pause_arguments_are_refused(replica, mode, timeout, match):
    with pytest.raises(ValueError, match=match):
        replica.pause(mode, timeout)


# ---------------------------------------------------------------------------- open updates (front end)
class FakeRouter:
    def __init__(self):
        self.pushes = []

    async def push_weights(self, tensors, version=None, mode="wait", partial=False):
        self.pushes.append((dict(tensors), mode, partial))
        return len(self.pushes)


def test_buckets_commit_as_one_partial_push_with_the_tied_head_folded(expected):
    from rollout.service.updates import WeightUpdates, UnknownUpdateError

    async def run():
        router = FakeRouter()
        updates = WeightUpdates(router, expected, tied=True)
        update = updates.begin(60)
        updates.add(update.update_id, {"model.norm.weight": torch.ones(32)})
        updates.add(update.update_id, {"lm_head.weight": torch.ones(expected["lm_head.weight"])})
        with pytest.raises(WeightMismatchError, match="model.norm.weight was already sent"):
            updates.add(update.update_id, {"model.norm.weight": torch.ones(32)})
        version, n, _ = await updates.commit(update.update_id, "keep")
        with pytest.raises(UnknownUpdateError, match="was committed as version 1"):
            updates.get(update.update_id)
        return router, version, n
    router, version, n = asyncio.run(run())
    [(tensors, mode, partial)] = router.pushes
    assert version == 1 and n == 2 and mode == "keep" and partial
    assert sorted(tensors) == ["model.embed_tokens.weight", "model.norm.weight"]  # the head is the embedding


def test_an_update_past_its_deadline_is_aborted_and_freed(expected):
    from rollout.service.updates import WeightUpdates, UnknownUpdateError

    async def run():
        updates = WeightUpdates(FakeRouter(), expected, tied=True)
        update = updates.begin(0.05)
        updates.add(update.update_id, {"model.norm.weight": torch.ones(32)})
        for _ in range(500):  # the loop's timer fires at the deadline
            if update.update_id not in updates.open:
                break
            await asyncio.sleep(0.01)
        assert update.tensors == {}
        with pytest.raises(UnknownUpdateError, match="expired .* staged tensors were freed"):
            await updates.commit(update.update_id)
    asyncio.run(run())


def test_at_most_two_updates_are_open(expected):
    from rollout.service.router import QueueFullError
    from rollout.service.updates import WeightUpdates

    async def run():
        updates = WeightUpdates(FakeRouter(), expected, tied=True)
        first, _ = updates.begin(60), updates.begin(60)
        with pytest.raises(QueueFullError, match="2 weight updates are open"):
            updates.begin(60)
        assert updates.abort(first.update_id) == 0
        updates.begin(60)
    asyncio.run(run())


# ---------------------------------------------------------------- dtype policy (issue 11, item 7)
@pytest.mark.parametrize("pushed,served,ok", [
    (torch.float32, torch.float32, True),
    (torch.float32, torch.bfloat16, True),    # wider than served: rounded to the served precision
    (torch.float64, torch.float32, True),
    (torch.float16, torch.float32, False),    # the trainer rounded: the served policy would differ
    (torch.bfloat16, torch.float32, False),
    (torch.bfloat16, torch.float16, False),   # different 16-bit formats: lossy both ways
])
def test_strict_dtype_policy_takes_the_served_dtype_or_wider(tiny_dir, pushed, served, ok):
    from rollout.service.weights import stage_weights
    engine = Engine.from_pretrained(tiny_dir, dtype=served, config=EngineConfig(drafting="fixed"))
    tensors = {k: v.to(pushed) for k, v in perturbed(engine, 3).items()}
    if ok:
        staged = stage_weights(engine.model, 1, tensors, "cpu")
        assert all(t.dtype == served for t in staged.tensors.values())
    else:
        with pytest.raises(WeightMismatchError, match=f"pushed as {pushed}, the replica serves {served}.*"
                                                      "--weight-dtype-policy cast"):
            stage_weights(engine.model, 1, tensors, "cpu")
        staged = stage_weights(engine.model, 1, tensors, "cpu", dtype_policy="cast")
        assert all(t.dtype == served for t in staged.tensors.values())


def test_owned_wider_tensors_are_cast_by_the_commits_copy_into_default_layout_weights(tiny_dir):
    """Tensors nothing else can change (a segment's views) are staged as they are into a CPU
    engine whose weights keep nn.Linear's layout (dense bfloat16), and the commit's copy rounds
    them: no model-sized cast before it. Into input-major weights (float32 CPU engines) they
    are cast while staging, so that the commit's copy is the native transpose."""
    from rollout.service.weights import stage_weights
    for served, pushed in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        engine = Engine.from_pretrained(tiny_dir, dtype=served, config=EngineConfig(drafting="fixed"))
        assert engine.model.input_major == (served == torch.float32)
        tensors = {k: v.to(pushed) for k, v in perturbed(engine, 5).items()}
        staged = stage_weights(engine.model, 1, tensors, "cpu", owned=True)
        params = engine.model.state_dict()
        as_pushed = {k: staged.tensors[k] is t for k, t in tensors.items() if k in staged.tensors}
        assert as_pushed == {k: params[k].is_contiguous() for k in as_pushed}
        assert all(as_pushed.values()) == (served == torch.bfloat16) and any(as_pushed.values())
        engine.load_weights(staged.tensors, 1)
        served_now = engine.model.state_dict()
        assert all(torch.equal(served_now[k], t.to(served)) for k, t in tensors.items() if k in staged.tensors)


def test_replica_applies_its_dtype_policy_and_reset_casts_the_base(make_replica, tmp_path):
    strict = make_replica("strict")
    half = {k: v.half() for k, v in perturbed(strict.engine, 4).items()}
    with pytest.raises(WeightMismatchError, match="pushed as torch.float16"):
        strict.stage_weights(1, half)
    cast = make_replica("cast", weight_dtype_policy="cast")
    assert cast.stage_weights(1, half) > 0
    # a float16 checkpoint on disk is refused by the strict replica, the base weights are not
    save_file({k: v.contiguous() for k, v in half.items()}, tmp_path / "model.safetensors")
    with pytest.raises(WeightMismatchError, match="pushed as torch.float16"):
        strict.stage_from_disk(1, str(tmp_path))
    assert strict.stage_from_disk(1, None) > 0


def test_engine_loads_a_half_precision_checkpoint_in_its_declared_dtype(tmp_path):
    """A bfloat16 checkpoint loaded without a dtype gets bfloat16 weights and a bfloat16 KV cache
    (it used to get float32 for both)."""
    import transformers

    from rollout.train.tiny import make_tiny_model
    path = make_tiny_model(tmp_path / "fp32", vocab_size=16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "tidar_config.json").write_text((path / "tidar_config.json").read_text())
    engine = Engine.from_pretrained(tmp_path / "bf16", config=EngineConfig(drafting="fixed"))
    assert engine.dtype == torch.bfloat16
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.runner.cache.k.dtype == torch.bfloat16
    assert Engine.from_pretrained(path).dtype == torch.float32
    out = engine.generate([[2, 3]], SamplingParams(max_tokens=6, seed=0))
    assert len(out[0][0].token_ids) == 6
