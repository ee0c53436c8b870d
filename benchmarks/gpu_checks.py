"""Part (a) of `benchmarks.gpu_run`: correctness on the device, before any figure is worth reading.

Each check runs the engine on the device under test and compares it with a reference that
does not share its code path (HF transformers, the dense attention oracle, the eager step, an
enumerated distribution). Every check returns a dict: name, ok (True / False / None when it
could not run here, with the reason), the figures it compared and the tolerance it applied.
The tests under `tests/` prove the same properties on the CPU; these prove them on the device
(kernels, dtypes and CUDA graphs that only exist there).

Tolerances (stated, not tuned to pass):
- greedy lossless == greedy AR (fp32): every token identical.
- log-probs vs HF, fp32: max |ours - HF| <= 1e-3 over every generated token. bf16: our error
  against HF in fp32 at most 1.5x HF bf16's own error against HF fp32, plus 0.02.
- chi-square of lossless (seed-stable, the default, and the residual rule) vs the enumerated AR
  distribution: p > 1e-4 each (a correct sampler fails with that probability); the control
  (mixed, w = 0.3, residual rule: not the AR distribution) must give p < 1e-4.
- triton split-KV == dense oracle: max |diff| <= 1e-4 (fp32), 2e-2 (bf16) on out and lse.
- CUDA-graph replay == eager: identical tokens, log-probs within 1e-4 (fp32).
- weight push then generate: greedy tokens after the push equal HF's greedy tokens on the
  pushed weights, every token tagged with the new version, and the tokens differ from before.
"""

from __future__ import annotations

import functools
import random
import tempfile
import time
import traceback
from pathlib import Path

import torch

from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.model.triton_attention import prefix_attention, prefix_attention_reference, triton_unavailable_reason
from rollout.sampling import process_logits
from rollout.train.tiny import make_tiny_model

EMBEDDED = Path(__file__).resolve().parents[1] / "rollout" / "default_model"
ALPHA = 1e-4
CHI_PROMPT, CHI_VOCAB = [2, 3], 8


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square of observed counts against probabilities, outcomes with an expected
    count under 5 pooled into one cell; the p-value from the regularised upper incomplete gamma
    function (torch only: no scipy on a bare GPU machine)."""
    expected = probs.flatten().double() * counts.sum()
    big = expected >= 5
    obs = torch.cat((counts[big], counts[~big].sum()[None])).double()
    exp = torch.cat((expected[big], expected[~big].sum()[None]))
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab - 1) for _ in range(length)] for _ in range(count)]


@functools.cache
def _loaded(device: str, dtype: torch.dtype, model_dir: Path) -> Engine:
    return Engine.from_pretrained(model_dir, device=device, dtype=dtype,
                                  config=EngineConfig(max_num_seqs=1, max_model_len=64))


def _engine(device: str, dtype=torch.float32, model_dir: Path = EMBEDDED, fresh: bool = False, **config) -> Engine:
    """An engine on the model (loaded once per device and dtype, shared by the engines that only
    read it; `fresh`: a private copy, for a check that writes weights)."""
    # Fixed drafting: two engines compared token for token run the same step shapes.
    config = EngineConfig(**{"max_num_seqs": 16, "max_model_len": 256, "drafting": "fixed", **config})
    if fresh:
        return Engine.from_pretrained(model_dir, device=device, dtype=dtype, config=config)
    loaded = _loaded(device, dtype, model_dir)
    return Engine(loaded.model, loaded.tidar, device, dtype, config)


@functools.cache
def _hf(device: str, dtype, model_dir: Path = EMBEDDED):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def greedy_lossless_equals_ar(device: str, size: dict) -> dict:
    engine = _engine(device)
    prompts = random_prompts(engine.config.vocab_size, size["rows"], size["prompt_len"])
    ar = engine.generate(prompts, SamplingParams(sampler="ar", temperature=0, max_tokens=size["tokens"]))
    tidar = engine.generate(prompts, SamplingParams(sampler="lossless", temperature=0, max_tokens=size["tokens"]))
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(ar, tidar))
    return dict(ok=same == len(prompts), identical_rows=same, rows=len(prompts), tokens=size["tokens"],
                tokens_per_forward=round(engine.last_stats.tokens_per_forward, 2), tolerance="every token identical")


def logprobs_match_hf(device: str, size: dict) -> dict:
    """Log-probs the engine returns for its own samples against HF's, teacher-forced on the same
    tokens, on the device; fp32 and bf16."""
    mask_id = None
    reference = _hf(device, torch.float32)
    result = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        engine = _engine(device, dtype)
        mask_id = engine.tidar.mask_token_id
        prompts = random_prompts(engine.config.vocab_size, size["rows"], size["prompt_len"], seed=1)
        outs = engine.generate(prompts, SamplingParams(sampler="lossless", temperature=1.0, max_tokens=size["tokens"],
                                                       seed=5))
        hf = reference if dtype == torch.float32 else _hf(device, dtype)
        ours_err, hf_err = [], []
        with torch.inference_mode():
            for prompt, (c,) in zip(prompts, outs):
                ids = torch.tensor([prompt + c.token_ids], device=device)
                at = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c.token_ids), device=device)
                tok = torch.tensor(c.token_ids, device=device)
                ref = process_logits(reference(ids).logits[0].float(), 1.0, 0, 1.0, (mask_id,))[at, tok]
                ours_err.append((torch.tensor(c.logprobs, device=device) - ref).abs().max().item())
                if dtype != torch.float32:
                    same = process_logits(hf(ids).logits[0].float(), 1.0, 0, 1.0, (mask_id,))[at, tok]
                    hf_err.append((same - ref).abs().max().item())
        if dtype == torch.float32:
            limit = 1e-3
        else:
            limit = 1.5 * max(hf_err) + 0.02
            result["bf16_hf_vs_hf_fp32_max"] = round(max(hf_err), 5)
        result[f"{name}_max_abs_diff"] = round(max(ours_err), 6)
        result[f"{name}_limit"] = round(limit, 6)
        result[f"{name}_ok"] = max(ours_err) <= limit
        del engine
    result["ok"] = result["fp32_ok"] and result["bf16_ok"]
    result["tolerance"] = "fp32 <= 1e-3; bf16 <= 1.5 x HF bf16's own error vs HF fp32 + 0.02"
    return result


def exact_ar_distribution(model_dir: Path, mask_id: int) -> torch.Tensor:
    """P(x1, x2, x3 | CHI_PROMPT) [V, V, V] at T = 1, enumerated with HF in float64 on the CPU."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    V = CHI_VOCAB
    with torch.no_grad():
        def next_probs(prefixes):
            logits = hf(torch.tensor([CHI_PROMPT + p for p in prefixes])).logits[:, -1]
            return process_logits(logits, 1.0, 0, 1.0, (mask_id,)).exp()
        p1 = next_probs([[]])[0]
        p2 = next_probs([[a] for a in range(V)])
        p3 = next_probs([[a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_lossless_vs_ar(device: str, size: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp), "qwen2", vocab_size=CHI_VOCAB, block_size=4, hidden_size=32,
                                    init_std=0.25, seed=3)
        probs = exact_ar_distribution(model_dir, CHI_VOCAB - 1)
        engine = _engine(device, model_dir=model_dir, fresh=True, max_num_seqs=min(size["samples"], 4096),
                         max_model_len=16)
    pvalues = {}
    n = size["samples"]
    # Both verification rules (seed-stable Gumbel coupling, the default, and the residual rule);
    # the control is the residual rule's mixed sampler, whose target is not the AR distribution.
    for label, params in (("lossless", SamplingParams(sampler="lossless", max_tokens=3, n=n, seed=11)),
                          ("lossless residual", SamplingParams(sampler="lossless", max_tokens=3, n=n, seed=13,
                                                               seed_stable=False)),
                          ("mixed w=0.3 (control)", SamplingParams(sampler="mixed", mix_weight=0.3, max_tokens=3,
                                                                   n=n, seed=12, seed_stable=False))):
        counts = torch.zeros(CHI_VOCAB ** 3, dtype=torch.float64)
        for c in engine.generate([CHI_PROMPT], params)[0]:
            a, b, d = c.token_ids
            counts[(a * CHI_VOCAB + b) * CHI_VOCAB + d] += 1
        pvalues[label] = chi_square_pvalue(counts, probs)
    ok = (pvalues["lossless"] > ALPHA and pvalues["lossless residual"] > ALPHA
          and pvalues["mixed w=0.3 (control)"] < ALPHA)
    return dict(ok=ok, samples=size["samples"], **{f"p {k}": float(f"{v:.3g}") for k, v in pvalues.items()},
                tolerance=f"lossless p > {ALPHA} (both rules); the control must be rejected (p < {ALPHA})")


def triton_equals_dense(device: str, size: dict) -> dict:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return dict(ok=None, skipped=reason)
    worst, ok = {}, True
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype, limit in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for H, Hkv, D, T in size["attention_shapes"]:
            B, slot_len = 3, size["slot_len"]
            cache_k = torch.randn(B + 1, Hkv, slot_len, D, generator=gen).to(device, dtype)
            cache_v = torch.randn(B + 1, Hkv, slot_len, D, generator=gen).to(device, dtype)
            q = torch.randn(B, H, T, D, generator=gen).to(device, dtype)
            slots = torch.tensor([2, 0, 1], device=device)
            lens = torch.tensor([slot_len, 0, slot_len // 3 + 1], device=device)
            out, lse = prefix_attention(q, cache_k, cache_v, slots, lens, slot_len)
            ref_out, ref_lse = prefix_attention_reference(q, cache_k, cache_v, slots, lens, slot_len)
            finite = torch.isfinite(ref_lse)
            diff = max((out - ref_out).abs().max().item(), (lse[finite] - ref_lse[finite]).abs().max().item())
            same_empty = bool((torch.isfinite(lse) == finite).all())
            key = f"{str(dtype).removeprefix('torch.')} H{H}/{Hkv} D{D} T{T}"
            worst[key] = float(f"{diff:.3g}")
            ok = ok and diff <= limit and same_empty
    # The engine on both paths, fp32: the same samples (fewer under the interpreter: size "triton_rows").
    outs = []
    rows, tokens = size.get("triton_rows", size["rows"]), size.get("triton_tokens", size["tokens"])
    for attention in ("dense", "triton"):
        engine = _engine(device, attention=attention)
        prompts = random_prompts(engine.config.vocab_size, rows, size["prompt_len"], seed=2)
        outs.append(engine.generate(prompts, SamplingParams(sampler="lossless", max_tokens=tokens, seed=3)))
    tokens_same = all(a[0].token_ids == b[0].token_ids for a, b in zip(*outs))
    lp = max(abs(x - y) for a, b in zip(*outs) for x, y in zip(a[0].logprobs, b[0].logprobs))
    return dict(ok=ok and tokens_same and lp <= 1e-4, kernel_max_abs_diff=worst, engine_tokens_identical=tokens_same,
                engine_logprob_max_abs_diff=float(f"{lp:.3g}"),
                tolerance="kernel: 1e-4 fp32, 2e-2 bf16 (out and lse); engine: same tokens, log-probs 1e-4")


def graphs_equal_eager(device: str, size: dict) -> dict:
    # Triton's graphs only where it is compiled: interpreted (the CPU) it adds minutes, not coverage.
    on_gpu = torch.device(device).type == "cuda"
    attentions = ["dense"] + (["triton"] if on_gpu and triton_unavailable_reason(device) is None else [])
    found = {}
    for attention in attentions:
        eager = _engine(device, attention=attention)
        graphs = _engine(device, attention=attention, cuda_graphs=True)
        for sampler in ("ar", "lossless"):
            prompts = random_prompts(eager.config.vocab_size, size["rows"], size["prompt_len"], seed=4)
            params = SamplingParams(sampler=sampler, temperature=0.9, max_tokens=size["tokens"], seed=7)
            a, b = eager.generate(prompts, params), graphs.generate(prompts, params)
            same = all(x[0].token_ids == y[0].token_ids for x, y in zip(a, b))
            lp = max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x[0].logprobs, y[0].logprobs))
            found[f"{attention} {sampler}"] = dict(tokens_identical=same, logprob_max_abs_diff=float(f"{lp:.3g}"))
        status = graphs.runner.graphs.status()
        found[f"{attention} graphs"] = {k: status[k] for k in ("captured", "replays", "static_eager_steps",
                                                               "dynamic_steps", "device_graphs")}
    ok = all(v["tokens_identical"] and v["logprob_max_abs_diff"] <= 1e-4 for k, v in found.items()
             if "tokens_identical" in v)
    ok = ok and all(v["replays"] > 0 if on_gpu else v["static_eager_steps"] > 0
                    for k, v in found.items() if k.endswith("graphs"))
    return dict(ok=ok, **found, tolerance="identical tokens, log-probs within 1e-4 (fp32); graphs replayed")


def weight_push_then_generate(device: str, size: dict) -> dict:
    """A push into a running engine (with CUDA graphs captured before it) and greedy decoding
    after it, checked against HF on the pushed weights."""
    engine = _engine(device, fresh=True, cuda_graphs=True)
    prompts = random_prompts(engine.config.vocab_size, size["rows"], size["prompt_len"], seed=6)
    greedy = SamplingParams(sampler="lossless", temperature=0, max_tokens=size["tokens"])
    before = engine.generate(prompts, greedy)
    gen = torch.Generator(device="cpu").manual_seed(9)
    pushed = {name: (t.float().cpu() + 0.02 * torch.randn(t.shape, generator=gen)).to(device, t.dtype)
              for name, t in engine.model.state_dict().items()}
    engine.load_weights(pushed, version=1)
    after = engine.generate(prompts, greedy)
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(EMBEDDED, dtype=torch.float32).to(device).eval()
    hf.load_state_dict({**hf.state_dict(), **{k: v.float() for k, v in pushed.items() if k in hf.state_dict()}})
    if getattr(hf.config, "tie_word_embeddings", False):
        hf.tie_weights()
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=size["tokens"],
                          min_new_tokens=size["tokens"], suppress_tokens=[engine.tidar.mask_token_id],
                          pad_token_id=0)[:, ids.shape[1]:].tolist()
    matches = sum(a[0].token_ids == r for a, r in zip(after, ref))
    versions = {v for a in after for v in a[0].policy_versions}
    changed = sum(a[0].token_ids != b[0].token_ids for a, b in zip(after, before))
    return dict(ok=matches == len(prompts) and versions == {1} and changed > 0, rows_equal_to_hf=matches,
                rows=len(prompts), versions_after=sorted(versions), rows_changed_by_push=changed,
                tolerance="greedy tokens equal HF's on the pushed weights; all tagged version 1")


CHECKS = (("greedy lossless == greedy AR", greedy_lossless_equals_ar),
          ("log-probs vs HF (fp32, bf16)", logprobs_match_hf),
          ("chi-square lossless vs AR", chi_square_lossless_vs_ar),
          ("triton split-KV == dense", triton_equals_dense),
          ("CUDA-graph replay == eager", graphs_equal_eager),
          ("weight push then generate", weight_push_then_generate))


def run_checks(device: str, size: dict, budget) -> list[dict]:
    """Every check in turn; one that raises is recorded as failed with its error, and the rest run."""
    results = []
    for name, check in CHECKS:
        if budget.left() <= 0:  # every check is wanted: only a spent budget stops them
            results.append(dict(name=name, ok=None, skipped="time budget"))
            continue
        t0 = time.perf_counter()
        try:
            result = check(device, size)
        except Exception as e:  # noqa: BLE001 -- a failing check is a finding, not the end of the run
            result = dict(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
        results.append(dict(name=name, seconds=round(time.perf_counter() - t0, 2), **result))
    _loaded.cache_clear()  # the later parts get the device's memory back
    _hf.cache_clear()
    return results
