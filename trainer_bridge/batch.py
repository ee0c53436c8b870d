"""Trajectory groups -> padded tensors ready for a PPO / GRPO loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .client import TrajectoryGroup


@dataclass
class RolloutBatch:
    """One row per trajectory, prompt + completion right-padded to a common length L.

    input_ids [N, L]; attention_mask [N, L] (1 on real tokens); loss_mask [N, L] (1 on completion
    tokens); old_logprobs / behavior_logprobs [N, L]: the log-prob of the token at that position
    (0 elsewhere), so a trainer compares them with log_softmax(logits[:, :-1]).gather(input_ids[:, 1:])
    shifted by one; versions [N, L] (-1 off completion); group [N]: prompt index of each row."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor
    behavior_logprobs: torch.Tensor
    versions: torch.Tensor
    group: torch.Tensor
    prompt_lengths: torch.Tensor


def pad_groups(groups: list[TrajectoryGroup], pad_id: int = 0) -> RolloutBatch:
    rows = [(g.prompt, t, g.prompt_index) for g in groups for t in g.trajectories]
    if not rows:
        raise ValueError("groups hold no trajectories")
    L = max(len(p) + len(t.token_ids) for p, t, _ in rows)
    N = len(rows)
    ids = np.full((N, L), pad_id, dtype=np.int64)
    attn, loss = np.zeros((N, L), dtype=np.float32), np.zeros((N, L), dtype=np.float32)
    old, beh = np.zeros((N, L), dtype=np.float32), np.zeros((N, L), dtype=np.float32)
    ver = np.full((N, L), -1, dtype=np.int64)
    for i, (p, t, _) in enumerate(rows):
        P, T = len(p), len(t.token_ids)
        ids[i, :P], ids[i, P:P + T] = p, t.token_ids
        attn[i, :P + T] = 1
        loss[i, P:P + T] = 1
        old[i, P:P + T], beh[i, P:P + T] = t.logprobs, t.behavior_logprobs
        ver[i, P:P + T] = t.policy_versions
    return RolloutBatch(*(torch.from_numpy(a) for a in (ids, attn, loss, old, beh, ver)),
                        group=torch.tensor([g for _, _, g in rows]),
                        prompt_lengths=torch.tensor([len(p) for p, _, _ in rows]))
