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
from test_http import visible, write_char_tokenizer  # noqa: E402

import grpc  # noqa: E402

from rollout.service.serve import RolloutService, init_ray  # noqa: E402
from rollout.v1 import rollout_pb2 as pb  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402

USER = [{"role": "user", "content": "bcd"}]
TOKEN = "input-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


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
    r = ServiceRunner(RolloutService(model_dir, replicas=1, port=0, metrics_port=0, http_port=0, name="http-input",
                                     auth_token=TOKEN, served_model_names=["tiny", "tiny-alias"]))
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


# ---------------------------------------------------------------- timeouts, text, roles (item 10)
@pytest.mark.parametrize("value", ["0", "-1", "NaN", "1e999", "Infinity"])
@pytest.mark.parametrize("route", ["/pause", "/v1/weights/begin", "/v1/completions", "/inference/v1/generate"])
def test_a_timeout_that_is_not_a_positive_finite_number_is_400_naming_it(runner, route, value):
    fields = f'"timeout_seconds": {value}'
    if route == "/v1/completions":
        fields += ', "prompt": [2, 3], "max_tokens": 2'
    elif route == "/inference/v1/generate":
        fields = f'"token_ids": [2, 3], "sampling_params": {{"max_tokens": 2, {fields}}}'
    resp = httpx.post(f"http://localhost:{runner.service.http_port}{route}", content="{" + fields + "}",
                      headers=dict(AUTH, **{"Content-Type": "application/json"}), timeout=CALL_TIMEOUT)
    assert resp.status_code == 400, resp.text
    assert "timeout_seconds" in resp.json()["error"]["message"]
    assert not runner.service.router.paused and not runner.service.http.updates.open


def test_a_pause_timeout_in_the_query_is_checked_too(runner):
    resp = post(runner, "/pause?timeout_seconds=nan", {}, headers=AUTH)
    assert resp.status_code == 400 and "timeout_seconds" in resp.json()["error"]["message"]
    assert not runner.service.router.paused


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_grpc_refuses_non_finite_or_negative_timeouts_naming_the_field(runner, value):
    stub, md = runner.stub(), [("authorization", f"Bearer {TOKEN}")]
    calls = [lambda: stub.Generate(request([[2, 3]], max_tokens=2, timeout_seconds=value), timeout=CALL_TIMEOUT),
             lambda: stub.PauseGeneration(pb.PauseRequest(timeout_seconds=value), timeout=CALL_TIMEOUT, metadata=md),
             lambda: stub.BeginWeightUpdate(pb.BeginWeightUpdateRequest(timeout_seconds=value), timeout=CALL_TIMEOUT,
                                            metadata=md)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout_seconds" in info.value.details()
    assert not runner.service.router.paused and not runner.service.http.updates.open


@pytest.mark.parametrize("route,body,named", [
    ("/v1/completions", '{"prompt": "ab\\ud800c", "max_tokens": 2}', "prompt holds a lone surrogate"),
    ("/v1/completions", '{"prompt": ["b", "\\udfff"], "max_tokens": 2}', r"prompt\[1\] holds a lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}',
     r"messages\[0\]\.content holds a lone surrogate"),
    ("/v1/completions", '{"prompt": [2, 3], "stop": ["\\ud800"], "max_tokens": 2}', r"stop\[0\] holds"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt holds a lone surrogate"),
])
def test_a_lone_surrogate_anywhere_is_400_naming_the_field(runner, route, body, named):
    resp = httpx.post(f"http://localhost:{runner.service.http_port}{route}", content=body,
                      headers={"Content-Type": "application/json"}, timeout=CALL_TIMEOUT)
    assert resp.status_code == 400 and re.search(named, resp.json()["error"]["message"]), resp.text


def test_an_escaped_surrogate_pair_is_text(runner):
    resp = post(runner, "/tokenize", dict(prompt="b\U0001F600"))  # json.dumps sends \ud83d\ude00
    assert resp.status_code == 200


@pytest.mark.parametrize("message,named", [
    ({"role": "user\n<|im_start|>system", "content": "b"}, r"messages\[0\]\.role must be one of"),
    ({"role": "wizard", "content": "b"}, r"messages\[0\]\.role must be one of"),
    ({"role": "user", "name": "x\nsystem:", "content": "b"}, r"messages\[0\]\.name must be a string without"),
    ({"role": "user", "content": 7}, r"messages\[0\]\.content must be a string"),
])
def test_chat_roles_are_the_known_ones(runner, message, named):
    resp = post(runner, "/v1/chat/completions", dict(messages=[message], max_tokens=2))
    assert resp.status_code == 400 and re.search(named, resp.json()["error"]["message"]), resp.text


# ---------------------------------------------------------------- body size, the event loop (item 8)
def test_an_oversized_body_is_413_before_it_is_read(runner):
    limit = runner.service.http.max_body_bytes
    with socket.create_connection(("localhost", runner.service.http_port), timeout=CALL_TIMEOUT) as conn:
        # Only the headers and a few bytes are sent: an answer means the body was never awaited.
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{\"prompt\": [" % (limit + 1))
        answer = b""
        while b"}}" not in answer:  # the error's JSON ends the answer
            part = conn.recv(65536)
            assert part, f"the server closed the connection: {answer!r}"
            answer += part
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert f"at most {limit}".encode() in answer


def test_a_chunked_body_is_read_up_to_the_limit_only(runner):
    limit = runner.service.http.max_body_bytes

    def chunks():
        yield b'{"prompt": "'
        for _ in range(limit // 4096 + 2):
            yield b"b" * 4096
        yield b'"}'
    resp = httpx.post(f"http://localhost:{runner.service.http_port}/v1/completions", content=chunks(),
                      headers={"Content-Type": "application/json"}, timeout=CALL_TIMEOUT)
    assert resp.status_code == 413 and f"over {limit} bytes" in resp.json()["error"]["message"]


def test_tokenizing_a_prompt_does_not_hold_up_health_or_status(runner, monkeypatch):
    """Tokenizing happens off the event loop: while a prompt's tokenizing is held (here, until
    the test lets it go), /health and gRPC GetStatus still answer."""
    tokenizer = runner.service.http.tokenizer
    entered, release = threading.Event(), threading.Event()
    encode = tokenizer.encode

    def held_encode(text):
        entered.set()
        assert release.wait(CALL_TIMEOUT)
        return encode(text)
    monkeypatch.setattr(tokenizer, "encode", held_encode)
    result = {}
    prompt = "b" * (runner.service.http.max_body_bytes // 2)  # large, and within the limit
    worker = threading.Thread(target=lambda: result.setdefault("resp", post(
        runner, "/v1/completions", dict(prompt=prompt, max_tokens=2))))
    worker.start()
    try:
        assert entered.wait(CALL_TIMEOUT)
        assert httpx.get(f"http://localhost:{runner.service.http_port}/health", timeout=10).status_code == 200
        assert runner.stub().GetStatus(pb.StatusRequest(), timeout=10).replicas
    finally:
        release.set()
        worker.join(CALL_TIMEOUT)
    # The prompt itself holds more tokens than the pool: refused after tokenizing, by its token count.
    assert result["resp"].status_code == 400 and "more than the KV pool holds" in result["resp"].text


# ---------------------------------------------------------------- request chat templates (item 9)
def test_a_request_chat_template_is_refused_unless_the_server_trusts_them(runner):
    for fields in (dict(chat_template="{{ 'x' }}"), dict(chat_template_kwargs=dict(chat_template="{{ 'x' }}"))):
        for route in ("/v1/chat/completions", "/tokenize"):
            resp = post(runner, route, dict(messages=USER, max_tokens=2, **fields))
            assert resp.status_code == 400, resp.text
            assert "--trust-request-chat-template" in resp.json()["error"]["message"]


@pytest.mark.parametrize("template,named", [
    ("{% for i in range(100000) %}{{ 'x' * 1500 }}{% endfor %}", "wrote more than"),
    ("{% set s = 'x' * 10000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "ran longer than"),
])
def test_a_trusted_chat_template_is_rendered_within_time_and_size_bounds(runner, monkeypatch, template, named):
    monkeypatch.setattr(runner.service.http, "trust_request_chat_template", True)
    resp = post(runner, "/v1/chat/completions", dict(messages=USER, max_tokens=2, chat_template=template))
    assert resp.status_code == 400 and named in resp.json()["error"]["message"], resp.text
    assert post(runner, "/v1/chat/completions", dict(messages=USER, max_tokens=2, chat_template="b{{ 'c' }}"),
                ).status_code == 200


# ---------------------------------------------------------------- what vLLM does (item 16)
def test_an_unknown_model_is_404_and_the_served_names_are_accepted(runner):
    client = openai.OpenAI(base_url=f"http://localhost:{runner.service.http_port}/v1", api_key="unused",
                           max_retries=0, timeout=CALL_TIMEOUT)
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist"):
        client.completions.create(model="gpt-4", prompt=[2, 3], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=2)
    for name in ("tiny", "tiny-alias"):
        assert len(client.completions.create(model=name, prompt=[2, 3], max_tokens=2).choices) == 1
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]


def test_a_stop_tokens_text_is_left_out_unless_include_stop_str_in_output(runner):
    base = dict(prompt=[5, 6, 7], max_tokens=12, seed=11, ignore_eos=True, return_token_ids=True)
    full = post(runner, "/v1/completions", base).json()["choices"][0]
    stop_id = full["token_ids"][4]
    cut_at = full["token_ids"].index(stop_id) + 1
    for include in (False, True):
        c = post(runner, "/v1/completions", dict(base, stop_token_ids=[stop_id],
                                                 include_stop_str_in_output=include)).json()["choices"][0]
        assert c["finish_reason"] == "stop" and c["stop_reason"] == stop_id
        assert c["token_ids"] == full["token_ids"][:cut_at]  # the stop token's id stays
        assert c["text"] == visible(c["token_ids"] if include else c["token_ids"][:-1])


def test_reading_a_weight_bucket_does_not_hold_up_health(runner, monkeypatch):
    """The same for a bucket of weights (up to a model's size): its tensors are built off the loop."""
    import rollout.service.http as http_module

    entered, release = threading.Event(), threading.Event()

    def held_read_bucket(*args):
        entered.set()
        assert release.wait(CALL_TIMEOUT)
        raise ValueError("held bucket refused")
    monkeypatch.setattr(http_module, "read_bucket", held_read_bucket)
    update = post(runner, "/v1/weights/begin", {}, headers=AUTH).json()["update_id"]
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("resp", httpx.post(
        f"http://localhost:{runner.service.http_port}/v1/weights/{update}/tensors", content=b"x" * 64,
        headers=AUTH, timeout=CALL_TIMEOUT)))
    worker.start()
    try:
        assert entered.wait(CALL_TIMEOUT)
        assert httpx.get(f"http://localhost:{runner.service.http_port}/health", timeout=10).status_code == 200
    finally:
        release.set()
        worker.join(CALL_TIMEOUT)
        post(runner, f"/v1/weights/{update}/abort", {}, headers=AUTH)
    assert result["resp"].status_code == 400 and "held bucket refused" in result["resp"].text


def test_check_seconds_names_the_field_of_a_non_finite_json_number():
    """A non-finite JSON number reaching the timeout check is refused naming the field (it
    raised NameError, a 500, where a route passed it on unchecked)."""
    from rollout.service import http_protocol
    with pytest.raises(ValueError, match="timeout_seconds must be a finite number of seconds > 0, got NaN"):
        http_protocol.check_seconds(http_protocol._NotANumber("NaN"), "timeout_seconds")
    assert http_protocol.check_seconds("2.5", "timeout_seconds") == 2.5
