"""The vLLM-compatible HTTP front end: the routes RL trainers already speak (DESIGN.md section 8).

Routes: GET /health, GET /v1/models, POST /v1/completions, /v1/chat/completions (and prime-rl's
/v1/chat/completions/tokens), /tokenize, /detokenize, /inference/v1/generate. Request and response
fields are vLLM's, so its clients (the `openai` package with `extra_body`, TRL, AReaL, prime-rl,
SkyRL, verifiers) work unchanged.

Weight and control routes (all need the bearer token; the work is the gRPC front end's, shared
through `updates.WeightUpdates` and the Router): POST /pause?mode=keep|abort&timeout_seconds=T
(vLLM / prime-rl; SGLang's /pause_generation takes the same as JSON), /resume
(/continue_generation), GET /is_paused; POST /update_weights {"weight_dir"} (prime-rl) and
/update_weights_from_disk {"model_path"} (SGLang / AReaL), both with an optional "mode";
/reset_weights {"mode"}; bucketed named updates: /v1/weights/begin {"timeout_seconds"} ->
{"update_id"}, /v1/weights/{id}/tensors (body: one safetensors blob, Content-Length required),
/v1/weights/{id}/commit {"mode"}, /v1/weights/{id}/abort.

Design decisions:
- One Router behind both front ends: HTTP requests are placed, admitted, bounded and re-dispatched
  exactly like gRPC ones, and checked by the same `validate_request` against the same pool limits.
- Our provenance rides along in each choice: per-token `policy_versions`, `from_draft` and
  `behavior_logprobs`; finish reason `abort` passes through. `sampler`, `mix_weight` and
  `seed_stable` are extra body fields (default lossless, seed-stable: exact, and a seed gives
  ar's tokens).
- Log-probs: the sampled token's, plus top-N alternatives (`logprobs` N, chat `top_logprobs` N,
  up to `params.MAX_LOGPROBS`) under the same policy, computed by the engine. `min_p` is part of
  the policy (`sampling.process_logits`). The sampling features the engine lacks (penalties,
  best_of, echo, structured output, ...) are refused with a 400 naming the field, never silently
  ignored: a penalty would change the policy the trainer has to reproduce. Fields we do not know
  are ignored, as vLLM does.
- Like vLLM, generation stops at the model's EOS token unless `ignore_eos`; stop strings are
  applied here, after generation (see `_cut_at_stop`); the text leaves out the stop string or
  stop token that ended it unless `include_stop_str_in_output`. A `model` other than a served
  name is a 404; log-probs of -inf are written -9999.0 (JSON has no infinity).
- Hostile input: a generation body's size is checked before it is read (`max_body_bytes`), then
  parsed, validated (`http_protocol.parse_body`), rendered and tokenized on worker threads, never
  on the loop that serves /health and gRPC. A request `chat_template` needs
  `trust_request_chat_template`; rendering is bounded either way (`tokenizer.RenderLimits`).
- Streams send each engine step's committed tokens as they are made (`http_stream.py`), one
  chunk per choice per step; the chunks of a choice concatenate to the whole response's choice.
- Generation mutates nothing, so by default no generation route needs the bearer token; with
  `require_auth_for_generate` every route but /health does. Weight and pause routes always do
  (and are refused when the server has no token), checked before the body is read.
- A bucket is a safetensors blob (a format every trainer already writes, with a JSON header that
  is checked against the model before a tensor is built); its size is checked from Content-Length
  before the body is read: at most the whole model in float64 plus a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.exceptions import RayTaskError

from ..config import ModelConfig, TidarConfig
from ..engine.engine import LoadError
from ..params import MAX_LOGPROBS, SamplingParams
from ..tokenizer import TextTokenizer
from ..tokenizer import RenderLimits, TemplateLimitError
from .http_protocol import (UNSUPPORTED, Body, ChatRequest, CompletionRequest, DetokenizeRequest, GenerateRequest,
                            SamplingFields, TokenizeRequest, check_message, check_seconds, json_object,
                            parse_body)
from .http_stream import Choice, StreamedChoices, record_arrays
from .messages import Tokens
from .metrics import FrontendMetrics
from .router import DeadlineExceededError, NoReplicaError, QueueFullError, Routed, Router
from .servicer import bearer_matches, max_context, validate_request
from .updates import UnknownUpdateError, WeightUpdates, read_bucket

log = logging.getLogger(__name__)
MAX_CONTROL_BODY = 1 << 20  # bytes of a weight / pause route's JSON body
# A generation route's body: at most BODY_BYTES_PER_TOKEN per prompt token the KV pool could take
# (slots x max_model_len; an id is at most 7 digits and a separator, a text token a few characters,
# \uXXXX escapes included), plus BODY_OVERHEAD for the other fields.
BODY_BYTES_PER_TOKEN = 16
BODY_OVERHEAD = 1 << 16
RENDER_SECONDS = 2.0  # a chat template's rendering time
RENDER_CHARS_PER_TOKEN = 64  # its output, per token of max_model_len


class Unauthorized(Exception):
    """A mutating route without the server's bearer token (401)."""


class ModelNotFound(ValueError):
    """A request naming a model this server does not serve (404, as vLLM)."""


class BodyTooLarge(ValueError):
    """A body larger than its route allows, or without a Content-Length (413 / 411)."""

    def __init__(self, message: str, status: int = 413):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One parsed generation request: what to run and how to present what comes back."""
    prompts: list[list[int]]
    params: SamplingParams
    deadline: float | None
    stops: list[str]
    user_stop_ids: set[int]
    include_stop_str: bool
    skip_special: bool
    include_usage: bool = False  # streaming: a last chunk with the usage


class HttpFrontend:
    def __init__(self, router: Router, config: ModelConfig, tidar: TidarConfig, model_dir: str,
                 metrics: FrontendMetrics, required_token: str | None = None, updates: WeightUpdates | None = None,
                 auth_token: str | None = None, served_model_names: list[str] | None = None,
                 trust_request_chat_template: bool = False):
        self.router, self.config, self.tidar, self.metrics = router, config, tidar, metrics
        self.required_token = required_token  # set: every route but /health needs "Bearer <token>"
        self.auth_token = auth_token  # weight and pause routes need it; None: they are refused
        self.updates = updates  # bucketed updates, shared with the gRPC front end (None: no bucket routes)
        # The names a request's `model` may give (vLLM's --served-model-name); the first is reported.
        self.served_model_names = list(served_model_names or [Path(model_dir).name])
        self.model_name = self.served_model_names[0]
        self.trust_request_chat_template = trust_request_chat_template  # vLLM's --trust-request-chat-template
        self.tokenizer = TextTokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").exists() else None
        self.ready = False  # set by the service once every replica has answered
        self.app = self._build_app()

    # ------------------------------------------------------------------ parsing
    def _job(self, body: SamplingFields, prompts: list[list[int]], default_max_tokens: int | None,
             top_logprobs: int = 0) -> Job:
        for name, neutral in UNSUPPORTED.items():
            if name in (body.model_extra or {}) and body.model_extra[name] not in neutral:
                raise ValueError(f"{name} is not supported by this server (TiDAR rollout engine)")
        if not prompts:
            raise ValueError("prompt must hold at least one prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if stops and self.tokenizer is None:
            raise ValueError("stop: this model has no tokenizer.json, so stop strings cannot be matched; "
                             "use stop_token_ids")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        user_stop_ids = list(body.stop_token_ids or [])
        eos = [] if body.ignore_eos else [t for t in self.config.eos_token_ids if t not in user_stop_ids]
        timeout = None if body.timeout_seconds is None else check_seconds(body.timeout_seconds, "timeout_seconds")
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max_tokens
        if max_tokens is None:  # as vLLM: whatever the context leaves after the longest prompt
            max_tokens = max(max_context(self.router, self.config) - max(len(p) for p in prompts), 1)
        params = SamplingParams(
            sampler=body.sampler, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=0 if body.top_k in (None, -1) else body.top_k, top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens=max_tokens, n=body.n, seed=body.seed, mix_weight=body.mix_weight,
            stop_token_ids=tuple(user_stop_ids + eos), min_p=0.0 if body.min_p is None else body.min_p,
            logprobs=top_logprobs, seed_stable=body.seed_stable)
        validate_request(prompts, params, self.router, self.config, self.tidar)
        deadline = time.monotonic() + timeout if timeout is not None else None
        include_usage = bool((getattr(body, "stream_options", None) or {}).get("include_usage"))
        return Job(prompts, params, deadline, stops, set(user_stop_ids), body.include_stop_str_in_output,
                   body.skip_special_tokens, include_usage)

    def _encode(self, text: str, what: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{what}: this model has no tokenizer.json; send token ids")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError(f"{what} is empty")
        return ids

    def _completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self._encode(prompt, "prompt")]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return [self._encode(p, f"prompt[{i}]") if isinstance(p, str) else list(p) for i, p in enumerate(prompt)]

    def _chat_prompt(self, body: ChatRequest | TokenizeRequest) -> list[int]:
        if getattr(body, "tokens", None):
            # The caller's exact ids (token-in continuation of a conversation): never re-tokenized.
            return list(body.tokens)
        if not body.messages:
            raise ValueError("messages must hold at least one message (or send tokens)")
        if self.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer.json and so no chat template")
        kwargs = dict(body.chat_template_kwargs or {})
        if (body.chat_template is not None or "chat_template" in kwargs) and not self.trust_request_chat_template:
            raise ValueError("chat_template: this server renders only the model's own chat template (a template "
                             "is a program); start it with --trust-request-chat-template to accept request templates")
        messages = [check_message(m, i) for i, m in enumerate(body.messages)]
        limits = RenderLimits(RENDER_SECONDS, RENDER_CHARS_PER_TOKEN * max_context(self.router, self.config))
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
            continue_final_message=body.continue_final_message, chat_template=body.chat_template,
            limits=limits, **kwargs)

    # ------------------------------------------------------------------ generation
    async def _choices(self, job: Job) -> AsyncIterator[Choice]:
        """Finished trajectories as Choices, in the order they finish."""
        async for event in self.router.generate(job.prompts, job.params, job.deadline):
            if isinstance(event, Routed):
                choice = self._choice(event.record, job)
                self.metrics.tokens.inc(len(choice.token_ids))
                yield choice

    def _choice(self, r: dict, job: Job) -> Choice:
        c = Choice(index=r["prompt_index"] * job.params.n + r["sample_index"], prompt_index=r["prompt_index"],
                   finish_reason=r["finish_reason"], **record_arrays(r))
        tokens = c.token_ids
        if c.finish_reason == "stop" and tokens and tokens[-1] in job.user_stop_ids:
            c.stop_reason = tokens[-1]
        if self.tokenizer is None:
            return c
        # As vLLM: the text leaves out the stop token that ended the trajectory (its id stays in
        # token_ids) unless include_stop_str_in_output.
        ended_by_token = c.finish_reason == "stop" and tokens and tokens[-1] in job.params.stop_token_ids
        text_ids = tokens[:-1] if ended_by_token and not job.include_stop_str else tokens
        c.text = self.tokenizer.decode(text_ids, job.skip_special)
        cut = _cut_at_stop(text_ids, job.stops, lambda ids: self.tokenizer.decode(ids, job.skip_special))
        if cut is not None:
            keep, text_end, stop = cut
            c.token_ids, c.logprobs, c.top = tokens[:keep], c.logprobs[:keep], c.top[:keep]
            c.extras = {k: v[:keep] for k, v in c.extras.items()}
            c.text, c.finish_reason, c.stop_reason = c.text[:text_end], "stop", stop
            if job.include_stop_str:
                c.text += stop
        return c

    async def _respond(self, request: Request, route: str, job: Job, body, stream: bool) -> Response:
        """Runs `job`; `body(choices, usage)` is the JSON of the whole response. Non-streaming: all
        choices by index, and a client that disconnects first has its work aborted (the router
        aborts replica work when cancelled). Streaming: see `_stream`."""
        if stream:
            return await self._stream(request, route, job, body)
        async def collect():
            return sorted([c async for c in self._choices(job)], key=lambda c: c.index)
        choices = await _unless_disconnected(request, collect())
        if choices is GONE:
            self._count(route, 499)
            return Response(status_code=499)
        self._count(route, 200)
        return JSONResponse(body(choices, _usage(job, choices)))

    async def _chunks(self, job: Job) -> AsyncIterator[Choice]:
        """A streamed request's chunks as the steps make its tokens (see http_stream.py)."""
        decode = (lambda ids: self.tokenizer.decode(ids, job.skip_special)) if self.tokenizer is not None else None
        streams = StreamedChoices(job.params.n, decode, job.stops)
        async for event in self.router.generate(job.prompts, job.params, job.deadline, stream_tokens=True):
            if isinstance(event, Tokens):
                for r in event.records:
                    chunk = streams.delta(r)
                    if chunk is not None:
                        yield chunk
            elif isinstance(event, Routed):
                choice = self._choice(event.record, job)
                self.metrics.tokens.inc(len(choice.token_ids))
                yield streams.final(choice)

    async def _stream(self, request: Request, route: str, job: Job, body) -> Response:
        """SSE: one `data:` line per chunk (`body([chunk], None)`, the first one with `first=True`):
        each step's new tokens of a choice, its last chunk with the finish reason; a usage chunk
        when asked, then `data: [DONE]`. The first chunk is awaited before answering, so refusals
        (429, 504, ...) keep their HTTP status."""
        choices = self._chunks(job)

        async def next_choice():
            with contextlib.suppress(StopAsyncIteration):
                return await choices.__anext__()

        first = await _unless_disconnected(request, next_choice())
        if first is GONE:
            await choices.aclose()
            self._count(route, 499)
            return Response(status_code=499)
        self._count(route, 200)

        async def events():
            sent = [first] if first is not None else []
            try:
                if sent:
                    yield _sse(body(sent, None, first=True))
                async for c in choices:
                    sent.append(c)
                    yield _sse(body([c], None, first=False))
                if job.include_usage:
                    yield _sse(dict(body([], _usage(job, sent), first=False), choices=[]))
            except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
                status, message = _status_of(e)
                yield _sse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "InternalServerError"),
                                      "code": status}})
            finally:
                await choices.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _token_str(self, token_id: int, as_ids: bool) -> str:
        if as_ids or self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.token_str(token_id)

    def _completion_logprobs(self, c: Choice, as_ids: bool) -> dict:
        tokens = [self._token_str(t, as_ids) for t in c.token_ids]
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        top = []  # vLLM: the top-N alternatives and the sampled token
        for i, (s, lp) in enumerate(zip(tokens, c.logprobs)):
            alternatives = {self._token_str(t, as_ids): a for t, a in (c.top[i] if c.top else ())}
            top.append({**alternatives, s: lp})
        return dict(text_offset=offsets, token_logprobs=c.logprobs, tokens=tokens, top_logprobs=top)

    def _chat_logprobs(self, c: Choice, as_ids: bool) -> dict:
        def entry(t: int, lp: float) -> dict:
            s = self._token_str(t, as_ids)
            return dict(token=s, logprob=lp, bytes=list(s.encode()))
        content = []
        for i, (t, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            content.append(dict(entry(t, lp), top_logprobs=[entry(a, alp) for a, alp in (c.top[i] if c.top else ())]))
        return dict(content=content)

    # ------------------------------------------------------------------ routes
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="tidar-rollout (vLLM-compatible)", docs_url=None, redoc_url=None)
        for exc in (ValueError, QueueFullError, LoadError, DeadlineExceededError, TimeoutError, NoReplicaError,
                    RayTaskError, RequestValidationError, Unauthorized):
            app.add_exception_handler(exc, self._error)

        @app.middleware("http")
        async def require_token(request: Request, call_next):
            if self.required_token is not None and request.url.path != "/health" and not bearer_matches(
                    request.headers.getlist("authorization"), self.required_token):
                return JSONResponse({"error": {"message": "this server requires 'Authorization: Bearer <token>' "
                                                          "(exactly one header) on every route but /health",
                                               "type": "unauthorized", "code": 401}}, status_code=401)
            return await call_next(request)

        @app.get("/health")
        async def health():
            return Response(status_code=200 if self.ready else 503)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{
                "id": name, "object": "model", "created": 0, "owned_by": "tidar-rollout",
                "root": self.model_name, "max_model_len": max_context(self.router, self.config),
                "weight_version": self.router.version, "weight_source": self.router.weight_source,
                "family": self.config.family, "model_type": self.config.model_type}
                for name in self.served_model_names]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await self._parsed(request, CompletionRequest)
            job = await asyncio.to_thread(lambda: self._job(body, self._completion_prompts(body.prompt), 16,
                                                            top_logprobs=body.logprobs or 0))
            head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
                        model=self.model_name)
            as_ids = bool(body.return_tokens_as_token_ids)

            def choice_json(c: Choice) -> dict:
                out = dict(index=c.index, text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                           logprobs=self._completion_logprobs(c, as_ids) if body.logprobs is not None else None)
                if body.return_token_ids:  # streamed: the prompt's ids in the choice's first chunk
                    out.update(prompt_token_ids=job.prompts[c.prompt_index] if c.opening else None,
                               token_ids=c.token_ids)
                return dict(out, **c.extras)

            def response(choices: list[Choice], usage: dict | None, first: bool = True) -> dict:
                return dict(head, choices=[choice_json(c) for c in choices], usage=usage)

            return await self._respond(request, "/v1/completions", job, response, body.stream)

        async def chat(request: Request):
            body = await self._parsed(request, ChatRequest)
            if body.top_logprobs and not body.logprobs:
                raise ValueError(f"top_logprobs={body.top_logprobs} needs logprobs: true")
            if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}")
            if body.max_completion_tokens is not None:
                body.max_tokens = body.max_completion_tokens
            prompt = await asyncio.to_thread(self._chat_prompt, body)
            job = await asyncio.to_thread(self._job, body, [prompt], None,
                                          (body.top_logprobs or 0) if body.logprobs else 0)
            chunk = "chat.completion.chunk" if body.stream else "chat.completion"
            head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", object=chunk, created=int(time.time()),
                        model=self.model_name)
            as_ids = bool(body.return_tokens_as_token_ids)
            key = "delta" if body.stream else "message"

            def choice_json(c: Choice) -> dict:
                message = {"role": "assistant", "content": c.text} if c.opening else {"content": c.text}
                out = {"index": c.index, key: message,
                       "logprobs": self._chat_logprobs(c, as_ids) if body.logprobs else None,
                       "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if body.return_token_ids:
                    out["token_ids"] = c.token_ids
                return dict(out, **c.extras)

            def response(choices: list[Choice], usage: dict | None, first: bool = True) -> dict:
                out = dict(head, choices=[choice_json(c) for c in choices], usage=usage)
                if body.return_token_ids and first:  # streamed: in the first chunk only
                    out["prompt_token_ids"] = prompt
                return out

            return await self._respond(request, "/v1/chat/completions", job, response, body.stream)

        app.post("/v1/chat/completions")(chat)
        app.post("/v1/chat/completions/tokens")(chat)  # prime-rl / verifiers' route for `tokens` prompts

        @app.post("/inference/v1/generate")
        async def generate(request: Request):
            body = await self._parsed(request, GenerateRequest)
            sp = body.sampling_params
            job = await asyncio.to_thread(self._job, sp, [list(body.token_ids)], None, sp.logprobs or 0)
            rid = body.request_id or uuid.uuid4().hex

            def response(choices: list[Choice], usage: dict | None, first: bool = True) -> dict:
                return dict(request_id=rid, usage=usage, choices=[dict(
                    index=c.index, token_ids=c.token_ids, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    logprobs=self._chat_logprobs(c, True) if sp.logprobs is not None else None, **c.extras)
                    for c in choices])

            return await self._respond(request, "/inference/v1/generate", job, response, body.stream)

        @app.post("/tokenize")
        async def tokenize(request: Request):
            body = await self._parsed(request, TokenizeRequest)
            if body.prompt is not None:
                tokens = await asyncio.to_thread(self._encode, body.prompt, "prompt") if body.prompt else []
            else:
                tokens = await asyncio.to_thread(self._chat_prompt, body)
            out = dict(count=len(tokens), max_model_len=max_context(self.router, self.config), tokens=tokens)
            if body.return_token_strs:
                out["token_strs"] = [self._token_str(t, False) for t in tokens]
            return out

        @app.post("/detokenize")
        async def detokenize(request: Request):
            body = await self._parsed(request, DetokenizeRequest)
            if self.tokenizer is None:
                raise ValueError("tokens: this model has no tokenizer.json to detokenize with")
            bad = [t for t in body.tokens if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"tokens has token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
            return dict(prompt=await asyncio.to_thread(self.tokenizer.decode, body.tokens))

        self._add_weight_routes(app)
        return app

    # ------------------------------------------------------------------ weights, pause / resume
    def _authorize(self, request: Request) -> None:
        if self.auth_token is None:
            raise Unauthorized(f"{request.url.path} changes what is served: this server was started without a "
                               "token (--auth-token-file), so it refuses every such route")
        if not bearer_matches(request.headers.getlist("authorization"), self.auth_token):
            raise Unauthorized(f"{request.url.path} needs 'Authorization: Bearer <token>' with the server's token "
                               "(exactly one header)")

    async def _body(self, request: Request, limit: int) -> bytes:
        """The body, once its Content-Length says it fits `limit` (sizes before contents)."""
        length = request.headers.get("content-length")
        if length is None:
            if request.headers.get("transfer-encoding"):
                raise BodyTooLarge("Content-Length is required on this route (no chunked bodies)", 411)
            return b""
        if not length.isdigit() or int(length) > limit:
            raise BodyTooLarge(f"the body is {length} bytes; this route takes at most {limit}")
        return await request.body()

    @property
    def max_body_bytes(self) -> int:
        """The largest body a generation route reads: see BODY_BYTES_PER_TOKEN."""
        limits = self.router.limits
        tokens = limits.num_slots * limits.max_model_len if limits is not None else self.config.max_position_embeddings
        return BODY_OVERHEAD + BODY_BYTES_PER_TOKEN * tokens

    async def _parsed(self, request: Request, model: type[Body]) -> Body:
        """A generation route's body as `model`: its size checked before it is read (413; a chunked
        body is read up to the limit, no further), then parsed and validated on a worker thread.
        A `model` field must name this server's model (404 otherwise, as vLLM)."""
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                raise BodyTooLarge(f"the body is {length} bytes; this route takes at most {limit} "
                                   f"({BODY_BYTES_PER_TOKEN} bytes per token the KV pool holds + {BODY_OVERHEAD})")
            raw = await request.body()
        else:
            parts, size = [], 0
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise BodyTooLarge(f"the body is over {limit} bytes, the most this route takes")
                parts.append(part)
            raw = b"".join(parts)
        body = await asyncio.to_thread(parse_body, raw, model)
        name = getattr(body, "model", None)
        if name and name not in self.served_model_names:
            raise ModelNotFound(f"The model `{name}` does not exist (this server serves "
                                f"{', '.join(self.served_model_names)}).")
        return body

    async def _control(self, request: Request) -> dict:
        """Authorizes, then the route's fields: the JSON body's, with query parameters on top."""
        self._authorize(request)
        raw = await self._body(request, MAX_CONTROL_BODY)
        return dict(json_object(raw), **request.query_params)

    def _add_weight_routes(self, app: FastAPI) -> None:
        def number(fields: dict, name: str, default: float) -> float:
            return default if fields.get(name) is None else check_seconds(fields[name], name)

        async def pause(request: Request):
            fields = await self._control(request)
            ended = await self.router.pause(str(fields.get("mode") or "keep"), number(fields, "timeout_seconds", 300.0))
            self._count(request.url.path, 200)
            return {"paused": True, "aborted_requests": ended}

        async def resume(request: Request):
            await self._control(request)
            await self.router.resume()
            self._count(request.url.path, 200)
            return {"paused": False}

        for route in ("/pause", "/pause_generation"):
            app.post(route)(pause)
        for route in ("/resume", "/continue_generation"):
            app.post(route)(resume)

        @app.get("/is_paused")
        async def is_paused():
            return {"is_paused": self.router.paused}

        async def swapped(request: Request, version: int, started: float, **extra) -> dict:
            seconds = time.perf_counter() - started
            self.metrics.weight_push_seconds.observe(seconds)
            self._count(request.url.path, 200)
            return dict(success=True, message=f"serving weight version {version}", version=version,
                        weight_version=version, seconds=seconds, **extra)

        async def from_disk(request: Request):
            fields = await self._control(request)
            started = time.perf_counter()
            key = "weight_dir" if request.url.path == "/update_weights" else "model_path"
            path = fields.get(key) or fields.get("model_path") or fields.get("weight_dir")
            if not isinstance(path, str) or not path:
                raise ValueError(f"{key} is required: a safetensors file or directory every replica can read")
            version = await self.router.update_from_disk(path, str(fields.get("mode") or "wait"))
            return await swapped(request, version, started)

        app.post("/update_weights")(from_disk)  # prime-rl: {"weight_dir": ...}
        app.post("/update_weights_from_disk")(from_disk)  # SGLang / AReaL: {"model_path": ...}

        @app.post("/reset_weights")
        async def reset(request: Request):
            fields = await self._control(request)
            started = time.perf_counter()
            return await swapped(request, await self.router.reset_weights(str(fields.get("mode") or "wait")), started)

        if self.updates is None:
            return
        updates = self.updates

        @app.post("/v1/weights/begin")
        async def begin(request: Request):
            fields = await self._control(request)
            update = updates.begin(number(fields, "timeout_seconds", 600.0))
            self._count("/v1/weights/begin", 200)
            return {"update_id": update.update_id, "expires_in_seconds": update.deadline - time.monotonic()}

        @app.post("/v1/weights/{update_id}/tensors")
        async def tensors(update_id: str, request: Request):
            self._authorize(request)
            updates.get(update_id)  # open, before the body is read
            body = await self._body(request, updates.max_bucket_bytes)
            # Building tensors from a blob of up to a model's size is work for a thread, not the loop.
            bucket = await asyncio.to_thread(read_bucket, body, updates.canonical, updates.expected)
            staged = updates.add(update_id, bucket)
            self.metrics.weight_push_bytes.inc(len(body))
            self._count("/v1/weights/{id}/tensors", 200)
            return {"update_id": update_id, "num_tensors": len(bucket), "staged_tensors": staged,
                    "num_bytes": len(body)}

        @app.post("/v1/weights/{update_id}/commit")
        async def commit(update_id: str, request: Request):
            fields = await self._control(request)
            started = time.perf_counter()
            version, n, nbytes = await updates.commit(update_id, str(fields.get("mode") or "wait"))
            return await swapped(request, version, started, num_tensors=n, num_bytes=nbytes)

        @app.post("/v1/weights/{update_id}/abort")
        async def abort(update_id: str, request: Request):
            await self._control(request)
            freed = updates.abort(update_id)
            self._count("/v1/weights/{id}/abort", 200)
            return {"update_id": update_id, "freed_tensors": freed}

    def _count(self, route: str, status: int) -> None:
        self.metrics.requests.labels(f"POST {route}", str(status)).inc()

    async def _error(self, request: Request, e: Exception) -> JSONResponse:
        status, message = _status_of(e)
        self._count(request.url.path, status)
        if status == 500:
            log.error("%s failed", request.url.path, exc_info=e)
        return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "InternalServerError"),
                                       "param": None, "code": status}}, status_code=status)


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 411: "LengthRequired",
                413: "RequestTooLarge", 429: "RateLimitError", 503: "ServiceUnavailableError",
                504: "GatewayTimeoutError"}


def _status_of(e: BaseException) -> tuple[int, str]:
    """The HTTP twin of the gRPC front end's status mapping."""
    if isinstance(e, RayTaskError) and e.cause is not None:
        e = e.cause
    if isinstance(e, RequestValidationError):
        errors = e.errors()
        where = ".".join(str(p) for p in errors[0]["loc"] if p != "body") if errors else "body"
        return 400, f"{where}: {errors[0]['msg']}" if errors else "malformed request body"
    if isinstance(e, Unauthorized):
        return 401, str(e)
    if isinstance(e, (QueueFullError, LoadError)):
        return 429, str(e)
    if isinstance(e, (DeadlineExceededError, asyncio.TimeoutError)):
        return 504, str(e) or "deadline exceeded"
    if isinstance(e, (UnknownUpdateError, ModelNotFound)):
        return 404, str(e)
    if isinstance(e, BodyTooLarge):
        return e.status, str(e)
    if isinstance(e, ValueError):
        return 400, str(e)
    if isinstance(e, NoReplicaError):
        return 503, str(e)
    return 500, f"{type(e).__name__}: {e}"


def _cut_at_stop(tokens: list[int], stops: list[str], decode) -> tuple[int, int, str] | None:
    """Where the first stop string ends a completion: (tokens to keep, text length before the
    stop string, the stop string), or None. Whole tokens are kept up to and including the one that
    completes the stop string, as vLLM does. The engine may have generated past it (it does not
    see stop strings); those tokens are dropped here and their log-probs with them."""
    if not stops:
        return None
    text = decode(tokens)
    found = [(text.find(s), s) for s in stops if s in text]
    if not found:
        return None
    at, stop = min(found)
    end = at + len(stop)
    # Fewest tokens whose text reaches the end of the stop string (prefix texts grow with the prefix).
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(tokens[:mid])) >= end:
            hi = mid
        else:
            lo = mid + 1
    return lo, at, stop


def _usage(job: Job, choices: list[Choice]) -> dict:
    prompt, completion = sum(len(p) for p in job.prompts), sum(len(c.token_ids) for c in choices)
    return dict(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(payload: dict) -> str:
    # allow_nan=False, as JSONResponse: a non-finite float is a bug to see, never "-Infinity" on the wire.
    return f"data: {json.dumps(payload, allow_nan=False)}\n\n"


GONE = object()


async def _unless_disconnected(request: Request, coro):
    """`coro`'s result, or GONE if the client went away first (then `coro` is cancelled, which
    aborts its replica work)."""
    async def disconnect():
        # The body has been read, so the next ASGI message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(coro), asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return GONE


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The service owns SIGTERM / SIGINT (it drains both front ends); uvicorn must not take them.
        yield


async def start_http(frontend: HttpFrontend, port: int, host: str = "[::]") -> tuple[_EmbeddedServer, asyncio.Task, int]:
    """Serves `frontend.app` on the running event loop (the router's). Returns the server, its task
    and the bound port (`port` 0: any free port)."""
    host = host.strip("[]") or "::"
    if ":" in host:
        sock = socket.create_server((host, port), family=socket.AF_INET6, dualstack_ipv6=host == "::")
    else:
        sock = socket.create_server((host, port))
    server = _EmbeddedServer(uvicorn.Config(frontend.app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                           or log.error("HTTP server stopped", exc_info=t.exception()))
    return server, task, sock.getsockname()[1]


async def stop_http(server: _EmbeddedServer, task: asyncio.Task, grace: float) -> None:
    """Stops accepting, gives in-flight requests `grace` seconds, then cancels them."""
    server.config.timeout_graceful_shutdown = grace
    server.should_exit = True
    await task
