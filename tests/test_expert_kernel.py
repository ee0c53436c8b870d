"""The native grouped-expert kernel (`rollout/model/expert_kernel.py`) against the per-assignment
definition in float64: fp32 and bf16 weights, empty experts, one row, many rows, skip ids, widths
that leave 16-column tails; and that the CPU's MoE forward, eager and compiled, runs it."""

import pytest
import torch

from rollout.model import expert_kernel, moe

pytestmark = pytest.mark.skipif(expert_kernel._kernel() is None,
                                reason="no native expert kernel here (needs a C compiler and AVX-512F)")


def input_major(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def weights(E, H, I, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (input_major(torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype),
            input_major(torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype))


def reference(gate_up, down, x, experts) -> torch.Tensor:
    """Each assignment's expert output [N*k, H] in float64 (zero for ids >= E)."""
    E, H, _ = down.shape
    out = torch.zeros(experts.numel(), H, dtype=torch.float64)
    for a, e in enumerate(experts.reshape(-1).tolist()):
        if e < E:
            g, u = (gate_up[e].double() @ x[a // experts.shape[1]].double()).chunk(2)
            out[a] = down[e].double() @ (torch.nn.functional.silu(g) * u)
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest error of any assignment's row over that row's largest magnitude."""
    scale = ref.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    return ((out.double() - ref).abs() / scale).max().item()


# (experts E, hidden H, expert width I, token ids per assignment): H 80 and I 48 leave 16-column
# tails past the 64-column tiles; 9 rows of one expert are two row blocks of 4 and one of 1.
CASES = {
    "one row": (6, 32, 16, [[4, 1]]),
    "empty experts and many rows": (8, 80, 48, [[0, 3]] * 9 + [[3, 5], [5, 0], [0, 1]]),
    "skip ids": (4, 64, 32, [[0], [4], [2], [4], [2], [1], [4]]),
    "every row skipped": (4, 32, 16, [[4], [4]]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_equals_the_definition_per_assignment(case, dtype):
    """fp32 within 1e-5 relative; bf16 weights and activations (widened exactly, accumulated in
    fp32) within 1e-5 relative of the float64 definition over the same bf16 values."""
    E, H, I, ids = CASES[case]
    gate_up, down = weights(E, H, I, dtype)
    experts = torch.tensor(ids)
    x = torch.randn(len(ids), H, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        assert expert_kernel.serves(x, experts, gate_up, down)
        out = expert_kernel.expert_rows(x, experts, gate_up, down)
    ref = reference(gate_up, down, x, experts)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert relative_error(out, ref) <= 1e-5
    assert (out[experts.reshape(-1) >= E] == 0).all()


def test_the_kernel_serves_only_what_it_reads():
    """Autograd, row-major experts (PyTorch's default layout), widths off the 16-column grid and
    activations of another dtype keep torch's paths."""
    gate_up, down = weights(4, 32, 16)
    x, experts = torch.randn(3, 32), torch.tensor([[0], [1], [3]])
    with torch.no_grad():
        assert expert_kernel.serves(x, experts, gate_up, down)
        assert not expert_kernel.serves(x, experts, gate_up.contiguous(), down.contiguous())
        assert not expert_kernel.serves(x.bfloat16(), experts, gate_up, down)
        odd_up, odd_down = weights(4, 24, 16)
        assert not expert_kernel.serves(torch.randn(3, 24), experts, odd_up, odd_down)
    assert not expert_kernel.serves(x, experts, gate_up, down)  # grad enabled: the loop, which has a backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_forward_eager_and_compiled_runs_the_kernel_and_equals_torchs_grouped_gemm(dtype, monkeypatch):
    """`moe.grouped_experts` on input-major CPU experts goes through the kernel, eagerly and
    inside the compiled graph's opaque op (fullgraph: no break), and equals torch's grouped GEMM
    (fp32 1e-5; bf16: both round each expert's output to bf16, then weight and sum in bf16)."""
    E, H, I, k, N = 8, 32, 16, 2, 12
    gate_up, down = weights(E, H, I, dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, H, generator=gen).to(dtype)
    w, experts = torch.topk(torch.randn(N, E + 1, generator=gen).softmax(-1), k)  # id E: the skip expert
    w = w.to(dtype)
    calls = []
    kernel = expert_kernel.expert_rows
    monkeypatch.setattr(expert_kernel, "expert_rows", lambda *a: calls.append(1) or kernel(*a))
    compiled = torch.compile(moe.grouped_experts, fullgraph=True, dynamic=True)
    with torch.no_grad():
        eager = moe.grouped_experts(x, w, experts, gate_up, down, skip_expert=True)
        out = compiled(x, w, experts, gate_up, down, skip_expert=True)
        ref = moe.expert_grouped_gemm(x, w, experts, gate_up, down, skip_expert=True)
    assert len(calls) == 2 and torch.equal(out, eager)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= tol


@pytest.mark.parametrize("family", ["qwen3_moe", "zaya"])
def test_the_cpu_engine_decodes_through_the_kernel(family, tmp_path, monkeypatch):
    """The engine lays its experts out input-major on the CPU (Qwen3-MoE and ZAYA alike), so its
    MoE layers run the kernel (the whole-model parity tests of tests/test_moe.py and
    tests/test_zaya.py then check it against transformers)."""
    from rollout import Engine, SamplingParams
    from rollout.config import EngineConfig

    if family == "zaya":
        from test_zaya import make_tiny_zaya
        model_dir = make_tiny_zaya(tmp_path)
    else:
        from rollout.train.tiny import make_tiny_model
        model_dir = make_tiny_model(tmp_path, "qwen3_moe", vocab_size=32, hidden_size=32, num_heads=4,
                                    num_kv_heads=2, block_size=4, num_layers=2, num_experts=8,
                                    num_experts_per_tok=2, moe_intermediate_size=16)
    engine = Engine.from_pretrained(model_dir, config=EngineConfig(drafting="fixed"))
    calls = []
    kernel = expert_kernel.expert_rows
    monkeypatch.setattr(expert_kernel, "expert_rows", lambda *a: calls.append(a[1].shape[0]) or kernel(*a))
    engine.generate([[2, 3, 4], [5]], SamplingParams(sampler="ar", temperature=0, max_tokens=4))
    assert calls.count(2) >= 3 * 2  # decode steps at batch 2: every MoE layer (2 or more) of 3 or more steps
