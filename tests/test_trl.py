"""TRL's GRPOTrainer through a real rollout service on the embedded model: a weight push per step,
our log-probs equal to the trainer's, and TRL's own vLLM client against our HTTP routes."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
ray = pytest.importorskip("ray")

from service_helpers import CALL_TIMEOUT, ServiceRunner  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

from rollout.params import SamplingParams  # noqa: E402
from rollout.service.serve import DEFAULT_MODEL, RolloutService, init_ray  # noqa: E402
from trainer_bridge import RolloutClient, pad_groups, token_logprobs  # noqa: E402
from trainer_bridge.trl import check_sampling, forbid_tokens  # noqa: E402
from trainer_bridge.trl_example import train  # noqa: E402

TOKEN = "trl-token"
MASK_ID = 4096  # the embedded model's TiDAR mask token
pytestmark = pytest.mark.skipif(not (Path(DEFAULT_MODEL) / "config.json").exists(), reason="no embedded model")


@pytest.fixture(scope="module")
def service():
    torch.set_num_threads(1)
    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-trl")
    runner = ServiceRunner(RolloutService(DEFAULT_MODEL, replicas=1, port=0, http_port=0, auth_token=TOKEN,
                                          name="trl"))
    runner.wait_started()
    yield runner
    runner.stop()
    ray.shutdown()


@pytest.fixture
def client(service):
    with RolloutClient(service.address, token=TOKEN, timeout=CALL_TIMEOUT) as c:
        yield c


class ServedVersions(TrainerCallback):
    """Reads the served version after each step (runs after the trainer's push callback)."""

    def __init__(self, client):
        self.client, self.versions = client, []

    def on_step_end(self, args, state, control, **kwargs):
        self.versions.append(self.client.status().weight_version)


def test_three_grpo_steps_push_a_version_each_and_logprobs_match(service, client, tmp_path):
    base = client.status().weight_version
    served = ServedVersions(client)
    trainer = train(service.address, TOKEN, steps=3, group_size=4, max_tokens=8, output_dir=str(tmp_path),
                    callbacks=[served])
    assert served.versions == [base + 1, base + 2, base + 3]
    assert trainer.push_callback.start_push is None  # the service already served the trainer's weights
    assert [p.version for p in trainer.push_callback.pushes] == served.versions
    gaps = [h["sampling/rollout_logp_gap/max"] for h in trainer.state.log_history
            if "sampling/rollout_logp_gap/max" in h]
    assert len(gaps) == 3 and max(gaps) <= 1e-5  # TRL's log-probs (its fused head) vs ours, same weights

    # Independently of TRL's code path: the final weights (version base + 3) give the service's log-probs.
    groups = client.generate([[3, 14, 15, 92], [65, 35, 89]], SamplingParams(max_tokens=12, n=3, seed=7),
                             policy_version=base + 3, max_staleness=0)
    batch = pad_groups(groups)
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
    mask = batch.loss_mask.bool()
    ours = token_logprobs(logits, batch.input_ids, forbidden=(MASK_ID,))
    assert (ours[mask] - batch.old_logprobs[mask]).abs().max().item() <= 1e-5
    # Negative control: without the mask token removed the gap exceeds the tolerance, so the test can fail.
    del model.lm_head.bias
    model.lm_head.bias = None
    with torch.no_grad():
        unmasked = token_logprobs(model(input_ids=batch.input_ids).logits, batch.input_ids)
    assert (unmasked[mask] - batch.old_logprobs[mask]).abs().max().item() > 1e-5


class ServedAtStart(TrainerCallback):
    """The served fingerprint once training begins (after the trainer's own on_train_begin)."""

    def __init__(self, client):
        self.client, self.fingerprint = client, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.fingerprint = self.client.status().weight_fingerprint


def base_fingerprint() -> str:
    from rollout.wire import weights_fingerprint
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    return weights_fingerprint(model.state_dict().items(), torch.float32)


def test_a_service_serving_another_runs_weights_gets_the_trainers_before_the_first_rollout(service, client,
                                                                                          tmp_path, caplog):
    """The issue's case: the service serves other weights (here, the first test's trained ones, or
    any push); the trainer starts from the base model. Step 0's old log-probs came from the other
    weights (gap max 2.3 in the report); now the trainer pushes its own first and says so."""
    import logging
    if not client.status().weight_version:  # run alone: make the service serve other weights
        from trainer_bridge import WeightSync
        model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
        WeightSync(client).push({k: v + 0.05 for k, v in model.state_dict().items()})
    before = client.status()
    assert before.weight_fingerprint != base_fingerprint()
    at_start = ServedAtStart(client)
    with caplog.at_level(logging.INFO, logger="trainer_bridge"):
        trainer = train(service.address, TOKEN, steps=1, group_size=4, max_tokens=8, output_dir=str(tmp_path),
                        callbacks=[at_start])
    assert trainer.first_logp_gap[1] <= 1e-5  # step 0 is on-policy
    assert trainer.push_callback.start_push.version == before.weight_version + 1
    assert at_start.fingerprint == base_fingerprint()
    assert "pushed these as version" in caplog.text


def test_bf16_autocast_in_the_trainer_is_warned_about_on_the_first_step(service, tmp_path, caplog):
    """GRPOConfig's default bf16=True against a float32 service: a gap of ~1e-2 on every step,
    silently, before; now the first step's gap is measured and a warning names both dtypes."""
    import logging
    with caplog.at_level(logging.WARNING, logger="trainer_bridge"):
        trainer = train(service.address, TOKEN, steps=1, group_size=4, max_tokens=8, output_dir=str(tmp_path),
                        config=dict(bf16=True))
    assert trainer.first_logp_gap[1] > 1e-3
    warned = [r.getMessage() for r in caplog.records if "log-prob gap" in r.getMessage()]
    assert len(warned) == 1 and "bfloat16" in warned[0] and "float32" in warned[0] and "bf16=False" in warned[0]


def test_forbid_tokens_removes_the_mask_token_and_leaves_the_state_dict_alone():
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    before = model.state_dict().keys()
    x = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        plain = model(input_ids=x).logits
        forbid_tokens(model, (MASK_ID,))
        forbidden = model(input_ids=x).logits
    assert model.state_dict().keys() == before
    assert forbidden.softmax(-1)[..., MASK_ID].max().item() == 0.0
    expected = token_logprobs(plain, x, forbidden=(MASK_ID,))
    assert (token_logprobs(forbidden, x) - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("field,value", [("top_k", 5), ("top_p", 0.9), ("min_p", 0.1), ("repetition_penalty", 1.1)])
def test_sampling_settings_trl_cannot_score_are_refused(field, value):
    args = SimpleNamespace(top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0)
    check_sampling(args)
    setattr(args, field, value)
    with pytest.raises(ValueError, match=f"^{field}={value}"):
        check_sampling(args)


def _vllm_client_generate(client, service):
    ids = [[3, 14, 15, 92], [65, 35, 89]]
    out = client.generate(ids, n=2, max_tokens=6, temperature=1.0, generation_kwargs={"seed": 5})
    with RolloutClient(service.address, timeout=CALL_TIMEOUT) as grpc_client:
        grpc_groups = grpc_client.generate(ids, SamplingParams(max_tokens=6, n=2, seed=5, stop_token_ids=(0,)))
    assert out["prompt_ids"] == ids
    assert out["completion_ids"] == [t.token_ids.tolist() for g in grpc_groups for t in g.trajectories]
    got = [[lp[0] for lp in seq] for seq in out["logprobs"]]  # TRL keeps the top-1, the sampled token
    want = [t.logprobs.tolist() for g in grpc_groups for t in g.trajectories]
    # Same tokens, but not always the same step shapes: the second request may verify drafts from
    # the first one's history where the first ran AR steps (2e-6 apart here, float32 forwards of
    # different widths): the engine's tolerance between step shapes, 1e-5.
    assert all(g == pytest.approx(w, abs=1e-5) for g, w in zip(got, want))
    assert [[t[0] for t in seq] for seq in out["logprob_token_ids"]] == out["completion_ids"]


def test_trl_vllm_client_generate_against_http(service):
    pytest.importorskip("vllm", reason="TRL's VLLMClient refuses to start unless vllm is importable")
    from trl.generation.vllm_client import VLLMClient
    _vllm_client_generate(VLLMClient(base_url=f"http://localhost:{service.service.http_port}"), service)


def test_trl_vllm_client_generate_code_reads_our_completions(service):
    """TRL's real `VLLMClient.generate` (payload and parsing) against our /v1/completions. Its
    __init__ refuses without vllm although generate never uses it, so the instance is built
    with the attributes __init__ would set."""
    import requests
    from trl.generation.vllm_client import VLLMClient
    client = VLLMClient.__new__(VLLMClient)
    client.session, client.base_url = requests.Session(), f"http://localhost:{service.service.http_port}"
    client.model = client._get(f"{client.base_url}/v1/models")["data"][0]["id"]
    _vllm_client_generate(client, service)
