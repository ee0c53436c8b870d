"""The GPU benchmark suite's code runs (tiny shapes, CPU), so it cannot rot while no GPU is at hand."""

import math
import re

import pytest

pytest.importorskip("transformers")

from benchmarks.suite import main  # noqa: E402


def test_suite_smoke_writes_every_table(tmp_path):
    out = tmp_path / "tables.md"
    text = main(["--smoke", "--device", "cpu", "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    for title in ("## 1. Decode step time", "## 2. Tokens/s", "## 3. Capacity", "## 4. Step-speed targets"):
        assert title in text
    targets = [line for line in text.splitlines() if re.match(r"\| [01] \| [12] \|", line)]
    assert len(targets) == 2 * 2  # temperature x batch
    assert all(re.search(r"\d\.\d\dx \((>=|below) ", line) for line in targets)  # ratio and its target
    step_rows = [line for line in text.splitlines() if re.match(r"\| (dense|split) \|", line)]
    assert len(step_rows) == 2 * 2 * 2  # attention x batch x context
    throughput = [line for line in text.splitlines() if line.startswith(("| embedded", "| tiny"))]
    assert len(throughput) == 2
    numbers = [float(x) for line in step_rows + throughput for x in re.findall(r"\d+\.\d+|\b\d+\b", line)]
    assert numbers and all(math.isfinite(x) and x >= 0 for x in numbers)
    assert "no OOM" in text
