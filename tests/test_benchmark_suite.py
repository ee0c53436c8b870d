"""The GPU benchmark suite's code runs (tiny shapes, CPU), so it cannot rot while no GPU is at hand."""

import math
import re

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.suite import main  # noqa: E402


def test_suite_smoke_writes_every_table(tmp_path):
    out = tmp_path / "tables.md"
    text = main(["--smoke", "--device", "cpu", "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    for title in ("## 1. Decode step time", "## 2. Tokens/s", "## 3. Capacity", "## 4. Step-speed targets"):
        assert title in text
    # Rows of the engine table (10 columns; the HF table's rows also start "| 1 | <rate> |").
    targets = [line for line in text.splitlines()
               if re.match(r"\| [01] \| [12] \|", line) and line.count("|") == 11]
    assert len(targets) == 2 * 2  # temperature x batch
    assert all(re.search(r"\d\.\d\dx \((>=|below) ", line) for line in targets)  # ratio and its target
    step_rows = [line for line in text.splitlines() if re.match(r"\| (dense|split) \|", line)]
    assert len(step_rows) == 2 * 2 * 2  # attention x batch x context
    throughput = [line for line in text.splitlines() if line.startswith(("| embedded", "| tiny"))]
    assert len(throughput) == 2
    numbers = [float(x) for line in step_rows + throughput for x in re.findall(r"\d+\.\d+|\b\d+\b", line)]
    assert numbers and all(math.isfinite(x) and x >= 0 for x in numbers)
    assert "no OOM" in text


def test_linear_rows_times_every_matmul_of_a_decode_forward(tiny_dir):
    from benchmarks.linear_rows import model_linears, time_rows
    from rollout import Engine
    model = Engine.from_pretrained(tiny_dir).model
    linears = model_linears(model)
    cfg = model.config
    assert len(linears) == 4 * cfg.num_layers + 1  # packed q/k/v, o, packed gate/up, down; the LM head
    counted = sum(w.numel() + (b.numel() if b is not None else 0) for w, b in linears)
    expected = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n and "embed" not in n)
    assert counted == expected + (model.lm_head.weight.numel() if cfg.tie_word_embeddings else 0)
    secs = time_rows(linears, [1, 3], 2, "cpu", torch.float32)
    assert set(secs) == {1, 3} and all(s > 0 for s in secs.values())


def test_packed_benchmark_times_packed_and_plain_projections_per_batch():
    from benchmarks.packed import main as packed_main
    text = packed_main(["--batches", "1,2", "--max-tokens", "3", "--repeats", "1", "--modes", "eager",
                        "--prompt-len", "8"])
    rows = [line for line in text.splitlines() if line.startswith("| eager |")]
    assert len(rows) == 2
    assert all(re.search(r"\| \d+ \| \d+ \| \d\.\d\dx \|$", line) for line in rows)


def test_weight_layout_benchmark_times_both_layouts_per_sampler():
    from benchmarks.weight_layout import main as layout_main
    text = layout_main(["--batches", "1", "--max-tokens", "3", "--repeats", "1", "--prompt-len", "8",
                        "--samplers", "ar,lossless", "--eager"])
    rows = [line for line in text.splitlines() if re.match(r"\| (ar|lossless) \| 1 \|", line)]
    assert len(rows) == 2 and all(re.search(r"\| \d+ \| \d+ \| \d\.\d{3}x \| (yes|NO) \|$", r) for r in rows)


def test_fused_ar_benchmark_times_both_variants_and_checks_their_tokens():
    from benchmarks.fused_ar import main as fused_main
    text = fused_main(["--batches", "1", "--max-tokens", "3", "--repeats", "1", "--prompt-len", "8",
                       "--samplers", "ar"])
    rows = [line for line in text.splitlines() if line.startswith("| ar | 1 |")]
    assert len(rows) == 1 and re.search(r"\| \d+ \| \d+ \| \d\.\d{3}x \| yes \|$", rows[0])


def test_speed_targets_gives_each_repeat_the_next_prompts():
    from benchmarks.speed_targets import repeat_prompts
    prompts = [[i] for i in range(5)]
    assert [repeat_prompts(prompts, 1, r) for r in range(3)] == [[[0]], [[1]], [[2]]]
    assert repeat_prompts(prompts, 2, 2) == [[4], [0]]  # wraps round
    assert repeat_prompts(prompts, 5, 1) == prompts
