"""TRL's GRPOTrainer on tidar-rollout: generation through the service, a weight push per step.

    rollout = ServiceRollout(RolloutClient(address, token=token), mask_token_id=tidar.mask_token_id)
    trainer = ServiceGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
                                 train_dataset=dataset, rollout=rollout)
    trainer.train()

Design decisions:
- Generation goes through TRL's `rollout_func` hook (experimental in TRL 1.16, hence the pin in
  the `[trl]` extra): `ServiceRollout(prompts, trainer)` tokenizes as TRL does, asks the service
  for one completion per prompt entry (TRL's sampler already repeats each prompt
  `num_generations` times) and returns `prompt_ids`, `completion_ids` and our per-token
  `logprobs`.
- On-policy by construction: before the first rollout `PushWeightsCallback.on_train_begin`
  makes the service serve the trainer's weights (`WeightSync.ensure_served`: the fingerprint
  GetStatus reports against the trainer's, a push when they differ, logged either way; a
  service still serving another run's weights made step 0's old log-probs off-policy without a
  word). Then every optimiser step pushes once, so the version the trainer holds is
  `base_version + global_step` on every rank; generation asks for it with `max_staleness`
  (default 0) and the service waits for the push.
- `PushWeightsCallback` gathers the weights on every rank (a collective under FSDP / ZeRO-3) and
  pushes from the main process only. The default gather is `model.state_dict()`, right for one
  process or DDP. Sharded models need `gather` (it is refused otherwise, never pushed as shards):
  FSDP: `gather=lambda model: trainer.accelerator.get_state_dict(trainer.model_wrapped)` (full
  tensors on rank 0; set `fsdp_state_dict_type: FULL_STATE_DICT`); ZeRO-3: the same
  `accelerator.get_state_dict` (it gathers through `deepspeed.zero.GatheredParameters`, and
  needs `stage3_gather_16bit_weights_on_model_save: true`). LoRA: merge into HF names first.
- The served policy never emits the TiDAR mask token; `forbid_tokens` gives the trained model's
  output head a non-persistent bias of FORBIDDEN_LOGIT on it, so TRL's own log-probs (its fused
  LM head reads `lm_head.bias`) and `model.generate` are of the same distribution. It is finite
  (not -inf) so TRL's entropy (sum p * logit) stays finite; exp of it is exactly 0 in float32.
  Non-persistent: it is not in `state_dict()`, so pushes and checkpoints are unchanged.
- `ServiceGRPOTrainer` uses our log-probs as TRL's old log-probs (the behaviour policy, exact
  also with staleness) and logs `sampling/rollout_logp_gap/{mean,max}`: |ours - TRL's log-prob
  under the current weights| over completion tokens (one extra no-grad forward per generation,
  as TRL pays for vLLM's importance-sampling correction). On the first generation it warns when
  the gap's max exceeds LOGP_GAP_TOLERANCE (1e-3; one dtype on both sides gives ~5e-6), naming
  the dtypes: GRPOConfig enables bf16 by default, and bf16 autocast in the trainer against a
  float32 service gives gaps of ~1e-2 on every step. `bf16=False` (and a float32 model) keeps
  them exact.
- TRL scores completions under the temperature-scaled, untruncated distribution, so top_k,
  top_p, min_p and repetition_penalty are refused rather than silently mismatched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from rollout.params import SamplingParams

from .client import RolloutClient
from .weight_sync import WeightSync

log = logging.getLogger(__name__)
FORBIDDEN_LOGIT = -1e4
LOGP_GAP_TOLERANCE = 1e-3  # max |rollout - trainer| log-prob on the first step before we warn
NEUTRAL = dict(top_k=(0, None, -1), top_p=(1.0, None), min_p=(0.0, None), repetition_penalty=(1.0, None))


def forbid_tokens(model: torch.nn.Module, token_ids: tuple[int, ...]) -> None:
    """Adds FORBIDDEN_LOGIT to `token_ids`' logits in `model`'s output head (a non-persistent bias,
    so `state_dict()` is unchanged). Refuses a head that has a trained bias."""
    head = model.get_output_embeddings()
    if head.bias is not None and "bias" in head._parameters:
        raise ValueError("the output head has a trained bias; forbid_tokens would replace it")
    bias = torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device)
    bias[list(token_ids)] = FORBIDDEN_LOGIT
    del head.bias
    head.register_buffer("bias", bias, persistent=False)


def check_sampling(args) -> None:
    """Refuses sampling settings under which TRL's log-probs are not the served policy's."""
    for name, neutral in NEUTRAL.items():
        value = getattr(args, name, None)
        if value not in neutral:
            raise ValueError(f"{name}={value}: TRL scores completions under the temperature-scaled, untruncated "
                             f"distribution, so the served log-probs would differ; set {name} to {neutral[0]}")


class ServiceRollout:
    """TRL `rollout_func`: generates through the rollout service (gRPC).

    mask_token_id: the model's TiDAR mask token (tidar_config.json), removed from the policy.
    sampler: "lossless" (exact samples of the policy) or "ar"; "mixed" is not exact and refused.
    max_staleness: versions the samples may lag the trainer by (0: on-policy).
    seed: None draws fresh entropy per call; an int makes the run reproducible."""

    def __init__(self, client: RolloutClient, mask_token_id: int, *, sampler: str = "lossless",
                 max_staleness: int = 0, seed: int | None = None, timeout: float | None = None):
        if sampler not in ("lossless", "ar"):
            raise ValueError(f"sampler must be 'lossless' or 'ar' (exact samples of the policy), got {sampler!r}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.client, self.mask_token_id, self.sampler = client, mask_token_id, sampler
        self.max_staleness, self.seed, self.timeout = max_staleness, seed, timeout
        self.base_version = client.status().weight_version  # the version before the first push
        self.calls = 0

    def expected_version(self, global_step: int) -> int:
        return self.base_version + global_step

    def __call__(self, prompts: list, trainer: GRPOTrainer) -> dict[str, list]:
        check_sampling(trainer.args)
        prompt_ids, images, _ = trainer._tokenize_prompts(prompts)
        if images is not None:
            raise ValueError("prompts carry images; the rollout service generates text only")
        seed = None
        if self.seed is not None:
            seed = (self.seed * 1_000_003 + self.calls) * 4099 + trainer.accelerator.process_index
        self.calls += 1
        params = SamplingParams(sampler=self.sampler, temperature=trainer.temperature,
                                max_tokens=trainer.max_completion_length, n=1, seed=seed,
                                stop_token_ids=tuple(trainer.eos_token_ids))
        groups = self.client.generate([list(p) for p in prompt_ids], params,
                                      policy_version=self.expected_version(trainer.state.global_step),
                                      max_staleness=self.max_staleness, wait=True, timeout=self.timeout)
        trajectories = [g.trajectories[0] for g in groups]
        return dict(prompt_ids=[g.prompt for g in groups],
                    completion_ids=[t.token_ids.tolist() for t in trajectories],
                    logprobs=[t.logprobs.tolist() for t in trajectories])


def plain_state_dict(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """The default gather: the model's own state dict, refused for sharded parameters."""
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or type(p.data).__name__ == "DTensor" or p.numel() == 0:
            raise ValueError(f"parameter {name} is sharded (ZeRO-3 / FSDP): pass PushWeightsCallback(gather=...) "
                             "that returns full tensors, e.g. trainer.accelerator.get_state_dict(trainer.model_wrapped)")
    return model.state_dict()


class PushWeightsCallback(TrainerCallback):
    """After each optimiser step: gather the weights on every rank, push them from the main
    process, and check that the served version is the one the next rollout will ask for."""

    def __init__(self, sync: WeightSync, rollout: ServiceRollout,
                 gather: Callable[[torch.nn.Module], Mapping[str, torch.Tensor]] = plain_state_dict,
                 mode: str = "wait"):
        self.sync, self.rollout, self.gather, self.mode = sync, rollout, gather, mode
        self.pushes = []  # PushResult of each push made by this process
        self.start_push = None  # on_train_begin's push; None: none made (or not the main process)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Before the first rollout, the service must serve the trainer's weights: pushed when
        the served fingerprint differs (`WeightSync.ensure_served`, which logs what it did);
        every rank then takes the served version as its base."""
        weights = self.gather(model)  # every rank: a collective when the model is sharded
        if state.is_world_process_zero:
            self.start_push = self.sync.ensure_served(weights, mode=self.mode)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank reads the version before the push is served
        self.rollout.base_version = self.rollout.client.status().weight_version - state.global_step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        weights = self.gather(model)  # every rank: a collective when the model is sharded
        if not state.is_world_process_zero:
            return
        result = self.sync.push(weights, mode=self.mode)
        expected = self.rollout.expected_version(state.global_step)
        if result.version != expected:
            raise RuntimeError(f"the service now serves version {result.version}, expected {expected} "
                               f"(base {self.rollout.base_version} + step {state.global_step}): "
                               "another trainer pushes to this service")
        self.pushes.append(result)


class ServiceGRPOTrainer(GRPOTrainer):
    """GRPOTrainer wired to the rollout service: `rollout` as its rollout_func, a weight push per
    step (`weight_sync`, default gRPC on the rollout's client), the mask token forbidden in the
    trained model's head, and our log-probs as the old log-probs."""

    def __init__(self, *args, rollout: ServiceRollout, weight_sync: WeightSync | None = None,
                 gather: Callable[[torch.nn.Module], Mapping[str, torch.Tensor]] = plain_state_dict, **kwargs):
        if "rollout_func" in kwargs:
            raise ValueError("rollout_func is set by ServiceGRPOTrainer (it is `rollout`)")
        self.push_callback = PushWeightsCallback(weight_sync or WeightSync(rollout.client), rollout, gather)
        kwargs["callbacks"] = [self.push_callback, *(kwargs.get("callbacks") or [])]
        super().__init__(*args, rollout_func=rollout, **kwargs)
        check_sampling(self.args)
        self.rollout = rollout
        self.first_logp_gap: tuple[float, float] | None = None  # (mean, max) on the first generation
        for m in (self.model, self.ref_model):
            if m is not None:
                forbid_tokens(self.accelerator.unwrap_model(m), (rollout.mask_token_id,))

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        ours = output["sampling_per_token_logps"]
        mask = output["completion_mask"].bool()
        with torch.no_grad():
            theirs, _, _ = self._get_per_token_logps_and_entropies(
                self.model, torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1),
                torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1), output["completion_ids"].size(1))
        gap = (theirs - ours).abs()[mask]
        mode = "train" if self.model.training else "eval"
        mean, worst = (gap.mean().item(), gap.max().item()) if gap.numel() else (0.0, 0.0)
        self._metrics[mode]["sampling/rollout_logp_gap/mean"].append(mean)
        self._metrics[mode]["sampling/rollout_logp_gap/max"].append(worst)
        if self.first_logp_gap is None:
            self.first_logp_gap = (mean, worst)
            self._check_first_gap(mean, worst)
        output["old_per_token_logps"] = ours
        return output

    def _check_first_gap(self, mean: float, worst: float) -> None:
        """Warns when the first step's rollout/trainer log-prob gap says the two compute in
        different precisions (the usual cause: GRPOConfig's default bf16=True)."""
        if worst <= LOGP_GAP_TOLERANCE:
            log.info("rollout/trainer log-prob gap on the first step: mean %.1e, max %.1e (tolerance %.0e)",
                     mean, worst, LOGP_GAP_TOLERANCE)
            return
        params = next(self.model.parameters()).dtype
        trainer = ("bfloat16 (GRPOConfig bf16=True: autocast)" if self.args.bf16 else
                   "float16 (GRPOConfig fp16=True: autocast)" if self.args.fp16 else str(params).replace("torch.", ""))
        served = self.rollout.client.status().weight_dtype or "unknown"
        log.warning("rollout/trainer log-prob gap on the first step: mean %.1e, max %.1e > tolerance %.0e. "
                    "The trainer computes log-probs in %s, the service samples in %s: a dtype mismatch makes the "
                    "old log-probs those of another policy on every step. Keep one dtype on both sides, e.g. "
                    "GRPOConfig(bf16=False) with a float32 model against a float32 service "
                    "(`rollout serve --dtype float32`).", mean, worst, LOGP_GAP_TOLERANCE, trainer, served)
