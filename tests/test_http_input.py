"""The HTTP front end under input a client should not send, or sends to break it: every answer is
strict JSON, bad fields are a 400 naming the field, bodies are bounded before they are read, and
heavy parsing never stalls /health."""

import json
import math
import re
import socket
import threading

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from service_helpers import CALL_TIMEOUT, ServiceRunner, request  # noqa: E402
from test_http import write_char_tokenizer  # noqa: E402

from rollout.service.serve import RolloutService, init_ray  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402

USER = [{"role": "user", "content": "bcd"}]


def strict_json(text: str):
    """json.loads that refuses what Python's json writes but JSON does not have (NaN, Infinity)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def stream_events(text: str) -> list:
    """The strict-JSON payloads of an SSE body, which must end with [DONE]."""
    lines = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [strict_json(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def ray_local():
    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test-http-input")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runner(ray_local, tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("http_input"), "qwen2", vocab_size=16, block_size=4)
    write_char_tokenizer(model_dir)
    r = ServiceRunner(RolloutService(model_dir, replicas=1, port=0, metrics_port=0, http_port=0, name="http-input"))
    r.wait_started()
    yield r
    r.stop()


def post(runner, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"http://localhost:{runner.service.http_port}{path}", json=body, timeout=CALL_TIMEOUT, **kw)


# ---------------------------------------------------------------- strict JSON (issue 23 item 3)
# Policies that give most alternatives log-prob -inf, in every route and both ways of answering.
MINUS_INF_POLICIES = [dict(top_k=2), dict(min_p=1.0), dict(top_k=1)]


@pytest.mark.parametrize("policy", MINUS_INF_POLICIES, ids=lambda p: "_".join(f"{k}{v}" for k, v in p.items()))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_every_response_is_strict_json_when_alternatives_have_probability_zero(runner, policy, stream):
    completions = post(runner, "/v1/completions", dict(prompt=[1, 2, 3, 4, 5], max_tokens=6, seed=2, logprobs=5,
                                                      stream=stream, **policy))
    chat = post(runner, "/v1/chat/completions", dict(messages=USER, max_tokens=6, seed=2, logprobs=True,
                                                     top_logprobs=3, stream=stream, **policy))
    generate = post(runner, "/inference/v1/generate", dict(token_ids=[1, 2, 3, 4, 5], stream=stream, sampling_params=dict(
        max_tokens=6, seed=2, logprobs=5, **policy)))
    for resp in (completions, chat, generate):
        assert resp.status_code == 200, resp.text
        bodies = stream_events(resp.text) if stream else [strict_json(resp.text)]
        values = [v for b in bodies for v in _logprob_values(b)]
        assert values and all(math.isfinite(v) and v <= 0 for v in values)
        # Probability zero is reported as vLLM does: -9999.0.
        assert -9999.0 in values


def _logprob_values(body: dict) -> list[float]:
    """Every log-prob a response carries, in any of the three routes' formats."""
    out = []
    for c in body.get("choices", []):
        lp = c.get("logprobs") or {}
        out += lp.get("token_logprobs") or []
        for top in lp.get("top_logprobs") or []:
            out += list(top.values())
        for e in lp.get("content") or []:
            out += [e["logprob"], *(t["logprob"] for t in e["top_logprobs"])]
        out += c.get("behavior_logprobs") or []
    return out
