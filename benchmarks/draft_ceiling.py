"""How much acceptance a block drafter could get at temperature 1, and how much ours gets.

A TiDAR draft block is drafted in parallel: the draft for position s+1 comes from the mask block
placed after the clean prefix x_<s, without seeing the token x_s the verifier samples at s. So
even a perfect drafter is limited by how much x_s changes the next distribution. For held-out
prefixes this script computes, at the first drafted position (s+1), with the AR policy p at
temperature 1 (mask token removed, as served):

    ceiling  = E_{v ~ p(.|x_<s)} [ sum_w min(p(w | x_<s, v), q*(w)) ],
               q* = sum_v p(v | x_<s) p(. | x_<s, v)   (the exact two-step marginal)
    achieved = the same expectation with the model's own draft distribution q (diffusion head)

i.e. the lossless acceptance probability of the first draft (1 - TV) for the best factorised
drafter (the marginal) and for ours. Candidates v are the most likely tokens of p(.|x_<s) up to
--top-m (their mass is reported; the rest is left out of both numbers alike).

    python benchmarks/draft_ceiling.py --model rollout/default_model [OTHER ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acceptance import heldout_prompts  # noqa: E402

from rollout.model.batch import SequenceBatch  # noqa: E402
from rollout.model.loader import load_decoder, read_model_config  # noqa: E402
from rollout.config import load_tidar_config  # noqa: E402
from rollout.sampling import process_logits  # noqa: E402
from rollout.train.objective import training_inputs, training_mask  # noqa: E402


@torch.no_grad()
def causal_next(model, seqs: torch.Tensor, forbidden: tuple[int, ...], batch: int = 256) -> torch.Tensor:
    """Policy probabilities (temperature 1) of the token after each row of seqs [N, S] -> [N, V]."""
    out = []
    S = seqs.shape[1]
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    for i in range(0, seqs.shape[0], batch):
        x = seqs[i:i + batch]
        hidden = model(x, SequenceBatch(torch.arange(S)[None].expand(x.shape[0], S), mask), None)
        out.append(process_logits(model.logits(hidden[:, -1]), 1.0, 0, 1.0, forbidden).exp())
    return torch.cat(out)


@torch.no_grad()
def first_draft(model, prefixes: torch.Tensor, mask_id: int, block: int) -> torch.Tensor:
    """The diffusion head's distribution at s+1 from the mask block after prefixes [N, s] (s a
    multiple of the block size), as the engine drafts it -> [N, V]."""
    N, s = prefixes.shape
    x = torch.cat((prefixes, torch.zeros(N, block, dtype=torch.long)), dim=1)  # tokens >= s are never seen
    ids, positions = training_inputs(x, mask_id)
    hidden = model(ids, SequenceBatch(positions, training_mask(s + block, block, "cpu")), None)
    logits = model.logits(hidden[:, s + block + s + 1])  # mask half, position s + 1
    return process_logits(logits, 1.0, 0, 1.0, (mask_id,)).exp()


def measure(model_dir: Path, prompts: list[list[int]], top_m: int) -> dict:
    path, hf_cfg, cfg = read_model_config(model_dir)
    tidar = load_tidar_config(path, hf_cfg, None, None)
    model = load_decoder(path, cfg, "cpu", torch.float32).eval()
    forbidden = (tidar.mask_token_id,)
    prefixes = torch.tensor(prompts)
    N = prefixes.shape[0]
    p0 = causal_next(model, prefixes, forbidden)                               # [N, V]
    mass, cand = p0.topk(top_m, dim=-1)                                        # [N, M]
    ext = torch.cat((prefixes[:, None].expand(-1, top_m, -1), cand[..., None]), dim=-1).reshape(N * top_m, -1)
    p1 = causal_next(model, ext, forbidden).view(N, top_m, -1)                 # [N, M, V]
    weights = mass / mass.sum(-1, keepdim=True)
    marginal = (weights[..., None] * p1).sum(1)                                # q* [N, V]
    q = first_draft(model, prefixes, tidar.mask_token_id, tidar.block_size)    # [N, V]

    def acceptance(draft: torch.Tensor) -> float:
        overlap = torch.minimum(p1, draft[:, None]).sum(-1)                    # [N, M]
        return float((weights * overlap).sum(-1).mean())

    entropy = float(-(p0 * p0.clamp_min(1e-30).log()).sum(-1).mean())
    return {"model": str(model_dir), "prompts": N, "prompt_len": prefixes.shape[1], "top_m": top_m,
            "candidate_mass": round(float(mass.sum(-1).mean()), 4), "entropy_next_nats": round(entropy, 3),
            "ceiling_first_draft_acceptance": round(acceptance(marginal), 4),
            "achieved_first_draft_acceptance": round(acceptance(q), 4)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", required=True, help="TiDAR model directories (same tokenizer)")
    p.add_argument("--corpus", default="python-sources", help="corpus whose held-out split gives the prefixes")
    p.add_argument("--prompts", type=int, default=64, help="held-out prefixes")
    p.add_argument("--prompt-len", type=int, default=64, help="prefix length (rounded down to the block size)")
    p.add_argument("--top-m", type=int, default=64, help="candidates for the token at s (most likely first)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    first = Path(args.model[0])
    _, hf_cfg, _ = read_model_config(first)
    block = load_tidar_config(first, hf_cfg, None, None).block_size
    length = max(block, args.prompt_len // block * block)
    prompts = heldout_prompts(first, args.corpus, args.prompts, length)
    reports = [measure(Path(m), prompts, args.top_m) for m in args.model]
    for r in reports:
        r["host"] = platform.processor() or platform.machine()
    print(json.dumps(reports, indent=2))
    return reports


if __name__ == "__main__":
    main()
