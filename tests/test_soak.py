"""A short soak (the long one is `python -m benchmarks.soak`): mixed requests against 2 replicas
while weights are pushed in all three modes and replicas are killed. Nothing is lost or
duplicated, token versions were live, and the service returns to idle."""

import pytest

ray = pytest.importorskip("ray")

from benchmarks.soak import run_soak  # noqa: E402
from rollout.service.serve import init_ray  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402


def test_short_soak_loses_nothing_and_returns_to_idle(tmp_path):
    model_dir = make_tiny_model(tmp_path / "soak", "qwen2", vocab_size=16, block_size=4)
    init_ray(num_cpus=6, include_dashboard=False, log_to_driver=False, namespace="test-soak")
    try:
        report = run_soak(str(model_dir), requests=5000, seconds=25, clients=6, push_every=2.0, kill_every=6.0,
                          max_tokens=16, namespace="soak")
    finally:
        ray.shutdown()
    assert not report.problems, report.problems[:5]
    assert report.outcomes.get("ok", 0) >= 100 and report.pushes >= 3 and report.kills >= 2, report.summary()
    assert report.idle["outstanding"] == [0, 0] and report.idle["in_flight"] == 0, report.summary()
    assert report.idle["free_slots"] == report.idle["slots"], report.summary()
