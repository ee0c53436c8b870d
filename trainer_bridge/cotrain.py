"""Keeping the model's drafting ability while RL moves the policy.

RL updates only the AR (clean-half) predictions; the mask-block (diffusion) predictions then
drift away from the policy and acceptance decays. `tidar_forward` runs the training layout of
DESIGN.md section 2 ([x | MASK*S], one forward) and returns both halves' logits: the clean half
is exactly the causal policy (it never sees mask tokens), so the RL loss uses it, and
`diffusion_cotrain_loss` trains the mask half toward the (detached) AR distribution on the same
rollout tokens: KL(p_AR(. | x_<i) || q_diff(. | block context)) at each completion position.

`tidar_forward` takes our `Decoder` / `ZayaDecoder` or the transformers `*ForCausalLM` a TRL / veRL
user trains (not transformers' ZAYA: its convolutions cannot follow the layout, so it is refused).
Both get the same layout from `rollout.train.objective` (ids `[x | MASK*S]`, positions
`[0..S-1 | 0..S-1]`, the dense visibility of `rollout.step_layout.training_visible`); the HF
model receives it as an explicit `position_ids` and a 4D additive float mask `[B, 1, 2S, 2S]`
(0 visible, dtype-min hidden), which transformers passes through unchanged to the "eager" and
"sdpa" attention implementations (eager only adds a mask, so a boolean one would be wrong;
flash-attention and flex take no dense mask and are refused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout.model.batch import SequenceBatch
from rollout.model.decoder import Decoder
from rollout.model.zaya import ZayaDecoder
from rollout.sampling import process_logits
from rollout.step_layout import training_visible
from rollout.train.objective import needs_dense_mask, training_inputs, training_mask


DENSE_MASK_ATTENTION = ("eager", "sdpa")


def tidar_forward(model: Decoder | torch.nn.Module, input_ids: torch.Tensor, mask_token_id: int, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, S] -> (ar_logits [B, S, V]: position i predicts x_{i+1};
    diffusion_logits [B, S, V]: mask position i predicts x_i), float32. `model` is our Decoder
    or a transformers causal LM with attn_implementation "eager" or "sdpa"."""
    S = input_ids.shape[1]
    ids, positions = training_inputs(input_ids, mask_token_id)
    if isinstance(model, (Decoder, ZayaDecoder)):
        mask = training_mask(S, block_size, input_ids.device, needs_dense_mask(model))
        hidden = model(ids, SequenceBatch(positions, mask), None)
        return model.logits(hidden[:, :S]), model.logits(hidden[:, S:])
    if getattr(getattr(model, "config", None), "model_type", None) == "zaya":
        raise ValueError("transformers' ZAYA cannot run the TiDAR training layout: its CCA convolutions and delayed "
                         "value mix tokens in sequence order, so the mask half would read the clean half's last "
                         "tokens, not its own block's visibility; co-train our decoder "
                         "(rollout.model.loader.load_decoder) instead")
    logits = model(input_ids=ids, position_ids=positions, attention_mask=hf_training_mask(model, S, block_size, ids),
                   use_cache=False).logits.float()
    return logits[:, :S], logits[:, S:]


def hf_training_mask(model: torch.nn.Module, seq_len: int, block_size: int, ids: torch.Tensor) -> torch.Tensor:
    """The training visibility as the 4D additive mask [B, 1, 2S, 2S] a transformers model takes."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in DENSE_MASK_ATTENTION:
        raise ValueError(f"attn_implementation must be one of {', '.join(DENSE_MASK_ATTENTION)} for the TiDAR "
                         f"training layout (it needs a dense 4D mask), got {impl!r}: load the model with "
                         "attn_implementation='sdpa'")
    dtype = model.get_input_embeddings().weight.dtype
    visible = training_visible(seq_len, block_size).to(ids.device)
    mask = torch.zeros(visible.shape, dtype=dtype, device=ids.device).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[None, None].expand(ids.shape[0], 1, -1, -1)


def token_logprobs(ar_logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, forbidden: tuple[int, ...] = (), min_p: float = 0.0) -> torch.Tensor:
    """[B, S] log-prob of each token under the AR policy (position 0: 0), aligned with input_ids
    like RolloutBatch.old_logprobs. The policy is the rollout's, by the same function
    (`rollout.sampling.process_logits`): pass the request's temperature, top_k, top_p, min_p and the
    model's mask token id as `forbidden` (the served policy never emits it)."""
    logp = process_logits(ar_logits[:, :-1], temperature, top_k, top_p, forbidden, min_p)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(picked, (1, 0))


def diffusion_cotrain_loss(ar_logits: torch.Tensor, diffusion_logits: torch.Tensor, loss_mask: torch.Tensor
                           ) -> torch.Tensor:
    """Mean over masked positions i of KL(p_AR(x_i | x_<i) || q_diff at i). The AR side is
    detached: only the drafting predictions move. loss_mask [B, S] marks the positions to train
    (the completion tokens; position 0 has no AR target and is ignored)."""
    target = torch.log_softmax(ar_logits[:, :-1].detach().float(), dim=-1)  # predicts positions 1..S-1
    draft = torch.log_softmax(diffusion_logits[:, 1:].float(), dim=-1)
    kl = F.kl_div(draft, target, log_target=True, reduction="none").sum(-1)  # [B, S-1]
    mask = loss_mask[:, 1:].to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)
