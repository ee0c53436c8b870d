"""`python -m rollout generate` on the embedded model, and the delegated subcommands' help."""

import subprocess
import sys

import pytest

from rollout.cli import DEFAULT_MODEL, main


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="no embedded model")
def test_generate_prints_stats_for_each_sampler(capsys):
    assert main(["generate", "--max-tokens", "6", "--samplers", "ar,lossless,mixed", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for sampler in ("ar", "lossless", "mixed"):
        assert f"\n{sampler} " in out and f"--- {sampler}, prompt 0, sample 0" in out
    assert "tok/fwd" in out and "acceptance by draft position" in out


def test_generate_refuses_bad_sampling_flags():
    with pytest.raises(ValueError, match="top_p must be in"):
        main(["generate", "--prompt-ids", "1,2", "--top-p", "0", "--max-tokens", "2"])


@pytest.mark.parametrize("command", ["serve", "convert", "pretrain"])
def test_subcommands_have_help(command):
    out = subprocess.run([sys.executable, "-m", "rollout", command, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--" in out.stdout
