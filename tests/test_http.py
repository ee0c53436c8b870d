"""The vLLM-compatible HTTP front end end to end: the real `openai` client (and httpx for the
routes it has no method for) against the service in-process on local Ray, beside its gRPC port."""

import json
import re
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from service_helpers import CALL_TIMEOUT, ServiceRunner, request, wait_until  # noqa: E402

from rollout.config import EngineConfig  # noqa: E402
from rollout.service.serve import DEFAULT_MODEL, RolloutService, init_ray  # noqa: E402
from rollout.v1 import rollout_pb2 as pb  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402
from rollout.wire import trajectory_arrays  # noqa: E402

# The tiny model's 16 ids as one character each (id 1 is EOS, 15 the mask), so text routes,
# stop strings and the chat template can be tested on it.
CHARS = ["a", "</s>", *"bcdefghijklmn", "<mask>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ 'm' if m['role'] == 'user' else 'n' }}{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}n{% endif %}")
PROMPTS = [[2, 3, 4], [5, 6, 7, 8, 9]]


def visible(ids) -> str:
    """The text of `ids` as the server shows it: special tokens (EOS) skipped, as vLLM does."""
    return "".join(CHARS[t] for t in ids if t != 1)


def write_char_tokenizer(model_dir):
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["</s>", "<mask>"])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", eos_token="</s>", chat_template=CHAT_TEMPLATE)))


@pytest.fixture(scope="module")
def ray_local():
    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="test-http")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runner(ray_local, tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("http"), "qwen2", vocab_size=16, block_size=4)
    write_char_tokenizer(model_dir)
    r = ServiceRunner(RolloutService(model_dir, replicas=1, port=0, metrics_port=0, http_port=0, name="http",
                                     served_model_names=["tiny"], engine_config=EngineConfig(drafting="fixed")))
    r.wait_started()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def client(runner):
    return openai.OpenAI(base_url=f"http://localhost:{runner.service.http_port}/v1", api_key="unused",
                         max_retries=0, timeout=CALL_TIMEOUT)


def url(runner, path: str) -> str:
    return f"http://localhost:{runner.service.http_port}{path}"


def complete(client, prompt, **kw):
    extra = kw.pop("extra_body", {})
    return client.completions.create(model="tiny", prompt=prompt, extra_body=dict(return_token_ids=True, **extra),
                                     **kw)


def test_health_and_models_report_the_model_and_its_weight_version(runner, client):
    assert httpx.get(url(runner, "/health"), timeout=CALL_TIMEOUT).status_code == 200
    [model] = client.models.list().data
    assert model.id == runner.service.http.model_name and model.weight_version == 0


def test_completions_with_token_id_prompts_return_prompt_and_completion_ids(client):
    resp = complete(client, PROMPTS, n=2, max_tokens=6, seed=1, extra_body=dict(ignore_eos=True))
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]  # prompt-major, as vLLM numbers them
    for c in resp.choices:
        assert c.prompt_token_ids == PROMPTS[c.index // 2]
        assert len(c.token_ids) == 6 and c.finish_reason == "length"
        assert len(c.policy_versions) == len(c.from_draft) == len(c.behavior_logprobs) == 6
        assert c.text == visible(c.token_ids)
    assert resp.usage.prompt_tokens == 8 and resp.usage.completion_tokens == 24


def test_http_and_grpc_return_the_same_tokens_and_logprobs_for_the_same_seed(runner, client):
    http = complete(client, PROMPTS, n=2, max_tokens=12, seed=5, logprobs=0, extra_body=dict(ignore_eos=True))
    grpc = runner.stub().Generate(request(PROMPTS, max_tokens=12, n=2, seed=5), timeout=CALL_TIMEOUT)
    assert len(http.choices) == len(grpc.trajectories) == 4
    for c, t in zip(http.choices, grpc.trajectories):
        a = trajectory_arrays(t)
        assert c.token_ids == a["token_ids"].tolist()
        assert np.float32(c.logprobs.token_logprobs).tolist() == a["logprobs"].tolist()
        assert c.from_draft == a["from_draft"].tolist() and c.policy_versions == a["policy_versions"].tolist()


def test_top_logprobs_and_min_p_are_the_same_over_http_and_grpc(runner, client):
    http = complete(client, PROMPTS, max_tokens=8, seed=6, logprobs=3,
                    extra_body=dict(ignore_eos=True, return_tokens_as_token_ids=True, min_p=0.05))
    grpc = runner.stub().Generate(request(PROMPTS, max_tokens=8, seed=6, logprobs=3, min_p=0.05),
                                  timeout=CALL_TIMEOUT)
    for c, t in zip(http.choices, grpc.trajectories):
        a = trajectory_arrays(t)
        assert a["top_token_ids"].shape == a["top_logprobs"].shape == (len(c.token_ids), 3)
        for ids, lps, top in zip(a["top_token_ids"].tolist(), a["top_logprobs"].tolist(), c.logprobs.top_logprobs):
            assert all(np.float32(top[f"token_id:{i}"]) == np.float32(lp) for i, lp in zip(ids, lps))


def test_logprobs_are_the_sampled_tokens_with_ids_as_token_strings(client):
    resp = complete(client, [PROMPTS[0]], max_tokens=5, seed=2, logprobs=1,
                    extra_body=dict(ignore_eos=True, return_tokens_as_token_ids=True))
    [c] = resp.choices
    assert c.logprobs.tokens == [f"token_id:{t}" for t in c.token_ids]
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    # lossless: the behaviour distribution is the policy's
    assert c.logprobs.token_logprobs == c.behavior_logprobs
    # logprobs=1 (vLLM): the most likely token and the sampled one (one entry when they coincide)
    for s, lp, top in zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert top[s] == lp and len(top) in (1, 2) and max(top.values()) >= lp


def test_top_n_logprobs_on_completions_chat_and_generate(runner, client):
    """logprobs=N: per token the N most likely tokens under the policy and the sampled one, in
    vLLM's formats; the sampled token's entry equals its reported log-prob."""
    resp = complete(client, [PROMPTS[0]], max_tokens=6, seed=4, logprobs=3, top_p=0.95,
                    extra_body=dict(ignore_eos=True, return_tokens_as_token_ids=True, min_p=0.02))
    [c] = resp.choices
    for token, lp, top in zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert len(top) in (3, 4) and top[token] == lp
        alternatives = sorted(top.values(), reverse=True)[:3]
        assert lp <= alternatives[0] and all(v <= 0 for v in alternatives)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "bcd"}], max_tokens=5,
                                          seed=7, logprobs=True, top_logprobs=2, extra_body=dict(ignore_eos=True))
    for e in chat.choices[0].logprobs.content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.logprob - 1e9
        assert e.logprob <= e.top_logprobs[0].logprob
    body = dict(token_ids=PROMPTS[0], sampling_params=dict(max_tokens=4, seed=9, logprobs=5, ignore_eos=True))
    gen = httpx.post(url(runner, "/inference/v1/generate"), json=body, timeout=CALL_TIMEOUT).json()
    assert all(len(e["top_logprobs"]) == 5 for e in gen["choices"][0]["logprobs"]["content"])


def test_generation_stops_at_eos_unless_ignore_eos(client):
    stopped = complete(client, PROMPTS, n=4, max_tokens=40, seed=3)
    for c in stopped.choices:
        assert (c.finish_reason == "stop") == (1 in c.token_ids)
        assert 1 not in c.token_ids[:-1]
    assert any(c.finish_reason == "stop" for c in stopped.choices), "EOS never sampled: pick another seed"


def test_stop_string_keeps_whole_tokens_through_the_one_that_completes_it(client):
    full = complete(client, [PROMPTS[1]], max_tokens=16, seed=4, extra_body=dict(ignore_eos=True)).choices[0]
    stop = full.text[5:7]
    # The fewest tokens whose text holds the stop string.
    keep = next(k for k in range(1, 17) if stop in visible(full.token_ids[:k]))
    cut = complete(client, [PROMPTS[1]], max_tokens=16, seed=4, stop=[stop],
                   extra_body=dict(ignore_eos=True)).choices[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.token_ids == full.token_ids[:keep]
    assert cut.text == full.text[:full.text.find(stop)]  # vLLM leaves the stop string out of the text
    assert len(cut.policy_versions) == len(cut.token_ids)


def streamed_choices(chunks) -> dict:
    """A stream's chunks by choice index, in order."""
    out = {}
    for chunk in chunks:
        for c in chunk.choices:
            out.setdefault(c.index, []).append(c)
    return out


def test_stream_sends_tokens_as_the_steps_make_them_and_adds_up_to_the_whole_response(runner, client):
    kw = dict(n=2, max_tokens=16, seed=6, logprobs=1, extra_body=dict(ignore_eos=True))
    whole = complete(client, PROMPTS, **kw)
    chunks = list(complete(client, PROMPTS, stream=True, stream_options=dict(include_usage=True), **kw))
    streamed = streamed_choices(chunks)
    assert sorted(streamed) == [0, 1, 2, 3]
    for c in whole.choices:
        parts = streamed[c.index]
        assert len([p for p in parts if p.token_ids]) > 1, "one chunk for the whole choice: not streamed per step"
        assert "".join(p.text for p in parts) == c.text
        assert sum((p.token_ids for p in parts), []) == c.token_ids
        assert sum((p.logprobs.token_logprobs for p in parts), []) == c.logprobs.token_logprobs
        assert sum((p.policy_versions for p in parts), []) == c.policy_versions
        assert [p.finish_reason for p in parts] == [None] * (len(parts) - 1) + [c.finish_reason]
        assert parts[0].prompt_token_ids == PROMPTS[c.index // 2] and parts[1].prompt_token_ids is None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(url(runner, "/v1/completions"), json=dict(prompt=[2, 3], max_tokens=3, stream=True),
                     timeout=CALL_TIMEOUT).text
    assert raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")


def test_openai_chat_stream_gets_content_as_it_is_made(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "bcd"}], max_tokens=16, seed=7,
              extra_body=dict(ignore_eos=True))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert len([d for d in deltas if d.content]) > 1
    assert "".join(d.content or "" for d in deltas) == whole


def test_a_streamed_stop_string_is_cut_where_the_whole_response_cuts_it(client):
    full = complete(client, [PROMPTS[1]], max_tokens=16, seed=4, extra_body=dict(ignore_eos=True)).choices[0]
    for stop in (full.text[5:7], full.text[9:10]):
        kw = dict(max_tokens=16, seed=4, stop=[stop], extra_body=dict(ignore_eos=True))
        whole = complete(client, [PROMPTS[1]], **kw).choices[0]
        [parts] = streamed_choices(complete(client, [PROMPTS[1]], stream=True, **kw)).values()
        assert "".join(p.text for p in parts) == whole.text and stop not in whole.text
        assert sum((p.token_ids for p in parts), []) == whole.token_ids
        assert parts[-1].finish_reason == "stop" and parts[-1].stop_reason == stop


def test_grpc_stream_tokens_sends_partial_trajectories_per_step_then_the_whole(runner):
    req = request(PROMPTS, max_tokens=16, n=2, seed=3)
    req.stream_tokens = True
    partial, final, messages = {}, {}, {}
    for t in runner.stub().GenerateStream(req, timeout=CALL_TIMEOUT):
        key = (t.prompt_index, t.sample_index)
        if t.partial:
            messages[key] = messages.get(key, 0) + 1
            ids = partial.setdefault(key, [])
            assert t.token_offset == len(ids) and t.finish_reason == pb.FINISH_REASON_UNSPECIFIED
            ids += trajectory_arrays(t)["token_ids"].tolist()
        else:
            final[key] = trajectory_arrays(t)["token_ids"].tolist()
    plain = runner.stub().Generate(request(PROMPTS, max_tokens=16, n=2, seed=3), timeout=CALL_TIMEOUT)
    assert {(t.prompt_index, t.sample_index): trajectory_arrays(t)["token_ids"].tolist()
            for t in plain.trajectories} == final
    assert len(final) == 4 and max(messages.values()) > 1
    for key, ids in partial.items():
        assert final[key][:len(ids)] == ids and len(ids) < len(final[key])


def test_chat_applies_the_template_and_returns_prompt_and_completion_ids(runner, client):
    messages = [{"role": "user", "content": "bcd"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, seed=7, logprobs=True,
                                          extra_body=dict(return_token_ids=True))
    expected = [CHARS.index(ch) for ch in "mbcdn"]  # the template: "m" for user, content, then "n"
    assert resp.prompt_token_ids == expected
    tokenized = httpx.post(url(runner, "/tokenize"), json=dict(messages=messages), timeout=CALL_TIMEOUT).json()
    assert tokenized["tokens"] == expected
    [c] = resp.choices
    assert [e.token for e in c.logprobs.content] == [CHARS[t] for t in c.token_ids]
    assert [e.logprob for e in c.logprobs.content] == c.behavior_logprobs
    assert c.message.content == visible(c.token_ids)


def test_chat_with_tokens_continues_from_exactly_those_ids(client):
    tokens = [13, 2, 3, 14, 4, 5, 13, 6, 14]  # a conversation so far, as the trainer holds it
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ignored"}],
                                          max_tokens=4, seed=8,
                                          extra_body=dict(tokens=tokens, return_token_ids=True))
    assert resp.prompt_token_ids == tokens and len(resp.choices[0].token_ids) <= 4


def test_generate_route_is_token_in_token_out(runner, client):
    body = dict(token_ids=PROMPTS[0], sampling_params=dict(max_tokens=6, n=2, seed=9, logprobs=0, ignore_eos=True))
    resp = httpx.post(url(runner, "/inference/v1/generate"), json=body, timeout=CALL_TIMEOUT).json()
    same = complete(client, [PROMPTS[0]], max_tokens=6, n=2, seed=9, extra_body=dict(ignore_eos=True))
    assert [c["token_ids"] for c in resp["choices"]] == [c.token_ids for c in same.choices]
    assert [e["token"] for e in resp["choices"][0]["logprobs"]["content"]] == [
        f"token_id:{t}" for t in resp["choices"][0]["token_ids"]]


def test_tokenize_and_detokenize_round_trip(runner):
    ids = httpx.post(url(runner, "/tokenize"), json=dict(prompt="bad"), timeout=CALL_TIMEOUT).json()["tokens"]
    assert ids == [2, 0, 4]
    assert httpx.post(url(runner, "/detokenize"), json=dict(tokens=ids), timeout=CALL_TIMEOUT).json() == {
        "prompt": "bad"}


@pytest.mark.parametrize("fields,named", [
    (dict(prompt=[[2, 99]]), r"prompt_token_ids\[0\] has token id 99 outside the vocabulary"),
    (dict(prompt=[[2, 15]]), "contains the mask token id 15"),
    (dict(prompt=[[2] * 250], max_tokens=10), "exceeds the model's context"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(sampler="beam"), "sampler must be one of"),
    (dict(n="many"), "n: "),
    (dict(prompt=[]), "prompt must hold at least one prompt"),
])
def test_bad_input_is_400_naming_the_field(runner, fields, named):
    body = dict(dict(prompt=[[2, 3]], max_tokens=4), **fields)
    resp = httpx.post(url(runner, "/v1/completions"), json=body, timeout=CALL_TIMEOUT)
    assert resp.status_code == 400
    assert re.search(named, resp.json()["error"]["message"])


@pytest.mark.parametrize("route,fields,named", [
    ("/v1/completions", dict(logprobs=21), r"logprobs must be an integer in \[0, 20\]"),
    ("/v1/completions", dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    ("/v1/chat/completions", dict(top_logprobs=3), "top_logprobs=3 needs logprobs: true"),
    ("/v1/chat/completions", dict(logprobs=True, top_logprobs=30), r"top_logprobs must be in \[0, 20\]"),
    ("/v1/completions", dict(presence_penalty=0.5), "presence_penalty is not supported"),
    ("/v1/completions", dict(repetition_penalty=1.2), "repetition_penalty is not supported"),
    ("/v1/completions", dict(best_of=2), "best_of is not supported"),
    ("/v1/completions", dict(echo=True), "echo is not supported"),
])
def test_unsupported_fields_are_400_naming_the_field(runner, route, fields, named):
    base = dict(prompt=[2, 3]) if route == "/v1/completions" else dict(messages=[{"role": "user", "content": "b"}])
    resp = httpx.post(url(runner, route), json=dict(base, max_tokens=4, **fields), timeout=CALL_TIMEOUT)
    assert resp.status_code == 400 and re.search(named, resp.json()["error"]["message"])


def test_openai_client_sees_a_bad_request_error_naming_the_field(client):
    with pytest.raises(openai.BadRequestError, match="frequency_penalty is not supported"):
        client.completions.create(model="tiny", prompt=[2, 3], max_tokens=4, frequency_penalty=1.0)


def test_deadline_is_504(runner):
    body = dict(prompt=[[2 + i % 12, 3] for i in range(48)], max_tokens=200, n=4, seed=0, ignore_eos=True,
                timeout_seconds=0.05)
    resp = httpx.post(url(runner, "/v1/completions"), json=body, timeout=CALL_TIMEOUT)
    assert resp.status_code == 504


def test_client_that_disconnects_has_its_work_aborted(runner):
    stub = runner.stub()

    def running() -> int:
        return sum(r.running_requests for r in stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).replicas)

    def aborts() -> float:
        text = httpx.get(f"http://{runner.service.metrics_address}/metrics", timeout=CALL_TIMEOUT).text
        return float(re.search(r"^rollout_aborts_total (\S+)$", text, re.M).group(1))

    before = aborts()

    body = json.dumps(dict(prompt=[[2 + i % 12, 3] for i in range(48)], max_tokens=200, n=4, seed=0,
                           ignore_eos=True)).encode()
    conn = socket.create_connection(("localhost", runner.service.http_port))
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: running() == 1, what="the long request running")
    conn.close()
    wait_until(lambda: aborts() == before + 1, what="the request aborted after the client left")
    wait_until(lambda: running() == 0, what="the replica freed")


def test_embedded_model_chat_renders_its_template(ray_local):
    r = ServiceRunner(RolloutService(DEFAULT_MODEL, replicas=1, port=0, metrics_port=0, http_port=0,
                                     name="embedded"))
    try:
        r.wait_started()
        client = openai.OpenAI(base_url=f"http://localhost:{r.service.http_port}/v1", api_key="unused",
                               max_retries=0, timeout=CALL_TIMEOUT)
        resp = client.chat.completions.create(model="default_model", messages=[{"role": "user", "content": "loop"}],
                                              max_tokens=8, seed=0, extra_body=dict(return_token_ids=True))
        tok = r.service.http.tokenizer
        assert tok.decode(resp.prompt_token_ids) == "# user:\nloop\n# assistant:\n"
        assert resp.choices[0].message.content == tok.decode(resp.choices[0].token_ids, True)
    finally:
        r.stop()
