"""The GRPO example's checker, and a short run of the example on the embedded model."""

from pathlib import Path

import pytest

from trainer_bridge.grpo_example import (
    DEFAULT_MODEL,
    first_line_is_valid_python,
    grpo_loss,
)


@pytest.mark.parametrize("completion,reward", [
    ("x = 1\ny", 1.0),
    ("    return foo(a, b)\n", 1.0),
    ("def f(x):\n  ", 1.0),
    ("else:\n", 1.0),
    ("except ValueError as e:\n", 1.0),
    ("x = = 1\n", 0.0),
    ("def f(x:\n", 0.0),
    ("return foo(a, b", 0.0),      # no complete line: cut by max_tokens
    ("\n\n   \nfor i in range(3):\n", 1.0),
    ("", 0.0),
])
def test_reward_checks_the_first_complete_line(completion, reward):
    assert first_line_is_valid_python(completion) == reward


def test_grpo_loss_pushes_up_positive_advantage_tokens():
    import torch
    new = torch.zeros(2, 3, requires_grad=True)
    old = torch.zeros(2, 3)
    loss = grpo_loss(new, old, torch.tensor([1.0, -1.0]), torch.ones(2, 3), clip=0.2)
    loss.backward()
    assert (new.grad[0] < 0).all() and (new.grad[1] > 0).all()


@pytest.mark.skipif(not (Path(DEFAULT_MODEL) / "config.json").exists(), reason="no embedded model")
def test_short_grpo_run_pushes_a_version_per_step_with_matching_logprobs():
    pytest.importorskip("ray")
    from trainer_bridge.grpo_example import main
    history = main(["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--max-tokens", "12",
                    "--prompt-pool", "4"])
    assert [r["version"] for r in history] == [1, 2]
    assert all(r["dlogp_max"] <= 1e-5 for r in history)  # rollout log-probs == trainer log-probs
    assert all(0 <= r["reward"] <= 1 for r in history)
