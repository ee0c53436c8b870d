"""The gRPC front end: validation, status codes, auth, health, reflection, TLS.

Design decisions:
- Requests are validated here, against the model's config, before anything reaches a replica:
  a malformed request costs the replicas nothing and can never take one down.
- Status codes: INVALID_ARGUMENT (bad field or a request larger than the replicas' KV pools
  allow, the limit named in the message), RESOURCE_EXHAUSTED (queue full: the front end's or
  a replica's), DEADLINE_EXCEEDED, CANCELLED (the client went away: its work is aborted on the replica),
  UNAUTHENTICATED (mutating RPC without the bearer token), FAILED_PRECONDITION (policy version
  older than the caller requires), UNAVAILABLE (no replica could serve), NOT_FOUND (a weight
  update id that is not open; the message says whether it was committed, aborted or expired).
- Every RPC that changes what is served (weight updates, pause / resume) needs the bearer token;
  the work is shared with the HTTP front end: `updates.WeightUpdates` and the Router.
- The health service reports NOT_SERVING until every replica has answered once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time

import grpc
import msgpack
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from ray.exceptions import RayTaskError

from ..config import ModelConfig, TidarConfig
from ..params import SamplingParams, validate_prompts
from ..v1 import rollout_pb2 as pb
from ..v1 import rollout_pb2_grpc as pb_grpc
from ..wire import (RawChunk, WeightAssembler, chunk_update_id, params_from_proto, parse_chunk, parse_dtype,
                    record_to_trajectory)
from .metrics import FrontendMetrics
from ..engine.drafting import source_summary
from ..engine.engine import LoadError, check_request_size
from ..model.loader import build_decoder
from .messages import RequestDone, Started, Tokens
from .router import REPLICA_FAILURES, DeadlineExceededError, NoReplicaError, QueueFullError, Router
from .shared_weights import ReceiveSegment, SharedEntry, SharedSegmentError, check_entries
from .updates import UnknownUpdateError, WeightUpdates
from .weights import check_tensor_header, total_bytes

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RolloutService"].full_name


def validate_request(prompts: list[list[int]], params: SamplingParams, router: Router, config: ModelConfig,
                     tidar: TidarConfig) -> None:
    """The checks every front end makes before a request reaches a replica: the model's vocabulary
    and mask token, and the replicas' pool-derived limits once they are known (the model's
    context before). Raises ValueError naming the field and the limit."""
    limits = router.limits
    if limits is not None:
        check_request_size(len(prompts), params.n, limits, sum(len(p) for p in prompts))
        validate_prompts(prompts, params, config.vocab_size, limits.max_model_len, tidar.mask_token_id,
                         context_name="max_model_len")
    else:
        validate_prompts(prompts, params, config.vocab_size, config.max_position_embeddings, tidar.mask_token_id)


def model_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a weight push may carry (HF names -> shapes), from the config alone (the
    decoder built on the meta device: no memory). A tied lm_head may be sent as well."""
    with torch.device("meta"):
        shapes = {k: tuple(v) for k, v in build_decoder(config).weight_names_and_shapes().items()}
    if config.tie_word_embeddings:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def max_context(router: Router, config: ModelConfig) -> int:
    """Longest prompt + completion a request may ask for."""
    return router.limits.max_model_len if router.limits is not None else config.max_position_embeddings


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    def __init__(self, router: Router, config: ModelConfig, tidar: TidarConfig, model_name: str,
                 auth_token: str | None, metrics: FrontendMetrics, require_auth_for_generate: bool = False):
        self.router, self.config, self.tidar, self.model_name = router, config, tidar, model_name
        self.auth_token, self.metrics = auth_token, metrics
        self.require_auth_for_generate = require_auth_for_generate and auth_token is not None
        self.weight_shapes = model_weight_shapes(config)
        self.max_shared_bytes = total_bytes(self.weight_shapes) + 64 * len(self.weight_shapes)  # float64 + alignment
        self.updates = WeightUpdates(router, self.weight_shapes, config.tie_word_embeddings)  # shared with HTTP
        self._assembly_buffers: dict = {}  # UpdateWeights' reassembly buffers, kept from push to push

    async def _check_read_access(self, context, method: str) -> None:
        """With require_auth_for_generate, generation and status need the token too."""
        if self.require_auth_for_generate and not self._authorized(context):
            self.metrics.requests.labels(method, "UNAUTHENTICATED").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} needs 'authorization: Bearer <token>' metadata with the server's token "
                                "(exactly one authorization header)")

    # ------------------------------------------------------------------ helpers
    def _parse(self, request: pb.GenerateRequest, context):
        if not request.prompts:
            raise ValueError("prompts must hold at least one prompt")
        if not request.HasField("params"):
            raise ValueError("params is required (at least params.max_tokens)")
        params = params_from_proto(request.params)
        # Sizes first, from the message's lengths, before any token is copied or looked at.
        if len(request.group_id) > MAX_GROUP_ID:
            raise ValueError(f"group_id has {len(request.group_id)} characters, at most {MAX_GROUP_ID}")
        if self.router.limits is not None:
            check_request_size(len(request.prompts), params.n, self.router.limits,
                               sum(len(p.token_ids) for p in request.prompts))
        longest = max_context(self.router, self.config)
        for i, p in enumerate(request.prompts):
            if len(p.token_ids) + params.max_tokens > longest:
                raise ValueError(f"prompts[{i}] has {len(p.token_ids)} tokens; with max_tokens={params.max_tokens} "
                                 f"that exceeds the model's context of {longest} (max_model_len)")
        prompts = [list(p.token_ids) for p in request.prompts]
        validate_request(prompts, params, self.router, self.config, self.tidar)
        if not (math.isfinite(request.timeout_seconds) and request.timeout_seconds >= 0):
            raise ValueError(f"timeout_seconds must be a finite number of seconds >= 0 (0: the server's request "
                             f"timeout), got {request.timeout_seconds}")
        if request.min_policy_version > self.router.version and not request.wait_for_version:
            raise PolicyVersionError(f"served policy version {self.router.version} is older than "
                                     f"min_policy_version {request.min_policy_version}")
        deadline = None
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = time.monotonic() + remaining
        if request.timeout_seconds > 0:
            own = time.monotonic() + request.timeout_seconds
            deadline = own if deadline is None else min(deadline, own)
        return prompts, params, deadline

    async def _trajectories(self, request, context, stream_tokens: bool = False):
        """Finished trajectories; with `stream_tokens` also partial ones (each step's new tokens)."""
        accepted = time.time()
        prompts, params, deadline = self._parse(request, context)
        if request.min_policy_version > self.router.version:
            await self.router.wait_for_version(request.min_policy_version,
                                               deadline or time.monotonic() + self.router.request_timeout)
        started = accepted
        async for event in self.router.generate(prompts, params, deadline, stream_tokens):
            if isinstance(event, Tokens):
                for record in event.records:
                    # Built as a finished one, then marked partial: it has no finish reason yet.
                    t = record_to_trajectory(dict(record, finish_reason="abort"), request.group_id, "", {})
                    t.finish_reason, t.partial, t.token_offset = pb.FINISH_REASON_UNSPECIFIED, True, record["start"]
                    yield t
            elif isinstance(event, Started):
                started = event.at
            elif isinstance(event, RequestDone):
                self.metrics.tokens_per_forward.set(event.tokens_per_forward)
                for i, a in enumerate(event.acceptance_by_position):
                    self.metrics.acceptance.labels(str(i + 1)).set(a)
            else:
                record = event.record
                timings = dict(queue_seconds=max(started - accepted, 0.0),
                               first_token_seconds=max(record["first_token_at"] - accepted, 0.0),
                               total_seconds=max(record["finished_at"] - accepted, 0.0))
                self.metrics.tokens.inc(len(record["token_ids"]))
                yield record_to_trajectory(record, request.group_id, event.replica, timings)

    async def _fail(self, context, method: str, e: BaseException):
        code, msg = _status_of(e)
        self.metrics.requests.labels(method, code.name).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=e)
        await context.abort(code, msg)

    # ------------------------------------------------------------------ RPCs
    async def Generate(self, request, context):
        await self._check_read_access(context, "Generate")
        try:
            trajectories = [t async for t in self._trajectories(request, context)]
        except asyncio.CancelledError:
            self.metrics.requests.labels("Generate", "CANCELLED").inc()
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status for the caller
            await self._fail(context, "Generate", e)
        self.metrics.requests.labels("Generate", "OK").inc()
        trajectories.sort(key=lambda t: (t.prompt_index, t.sample_index))
        return pb.GenerateResponse(trajectories=trajectories)

    async def GenerateStream(self, request, context):
        await self._check_read_access(context, "GenerateStream")
        try:
            async for t in self._trajectories(request, context, request.stream_tokens):
                yield t
        except asyncio.CancelledError:
            self.metrics.requests.labels("GenerateStream", "CANCELLED").inc()
            raise
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "GenerateStream", e)
        self.metrics.requests.labels("GenerateStream", "OK").inc()

    async def UpdateWeights(self, request_iterator, context):
        if not self._authorized(context):
            self.metrics.requests.labels("UpdateWeights", "UNAUTHENTICATED").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "UpdateWeights needs 'authorization: Bearer <token>' metadata with the server's token")
        started = time.perf_counter()
        # The kept assembly buffers (a concurrent push finds none and allocates its own).
        kept, self._assembly_buffers = self._assembly_buffers, {}
        assembler = WeightAssembler(self.weight_shapes, self.updates.canonical, kept)
        segment = None  # the shared-memory segment chunks are assembled into, for replicas on this node
        try:
            async for chunk in request_iterator:
                manifest = assembler.broadcast_manifest(chunk)
                if manifest is not None:
                    version = await self.router.push_weights_broadcast(manifest, assembler.version, assembler.mode,
                                                                       **assembler.broadcast_options)
                    break
                if assembler.version is None:
                    segment = await self._receive_segment(chunk, context)
                    if segment is not None:
                        assembler.buffers = segment.slots()
                assembler.add(chunk)
            else:
                tensors = assembler.finish()
                finite = assembler.finite_checked >= set(tensors)
                shared = (segment is not None and set(tensors) <= set(assembler.digests)
                          and segment.manifest(tensors, assembler.digests))
                handed, segment = (segment, None) if shared else (None, segment)
                # the router owns a segment handed to it (kept for the next push, or abandoned)
                version = await self.router.push_weights(tensors, assembler.version, assembler.mode, finite=finite,
                                                         segment=handed)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "UpdateWeights", e)
        finally:
            if segment is not None:  # no replica was handed it: written again by the next push
                self.router.keep_segment(segment)
            # The object store holds its own copy (router.push_weights): the buffers are free again.
            self._assembly_buffers = {} if assembler.buffers is not kept else assembler.kept_buffers()
        seconds = time.perf_counter() - started
        self.metrics.weight_push_seconds.observe(seconds)
        self.metrics.weight_push_bytes.inc(assembler.num_bytes)
        self.metrics.requests.labels("UpdateWeights", "OK").inc()
        return pb.UpdateWeightsResponse(version=version, num_tensors=assembler.num_tensors,
                                        num_bytes=assembler.num_bytes, seconds=seconds)

    async def _receive_segment(self, first: RawChunk, context) -> ReceiveSegment | None:
        """The segment a push is assembled in when a replica runs on this node (the router's kept
        one if it has the layout: the served model's tensors at the first tensor's element size),
        else None: the chunks go to private buffers and the object store."""
        if not any(self.router.is_local(r) for r in self.router.replicas):
            return None
        try:
            meta = msgpack.unpackb(first.metadata)
            itemsize = parse_dtype(meta.get("dtype"), str(meta.get("name"))).itemsize
        except Exception:  # noqa: BLE001 - the assembler refuses the chunk with the reason
            return None
        remaining = context.time_remaining()
        segment = await self.router.claim_segment(time.monotonic() + min(remaining or 60.0, 60.0))
        if segment is not None and segment.fits_plan(self.weight_shapes, itemsize):
            return segment
        if segment is not None:
            segment.close()  # claimed: no replica reads it any more
        return ReceiveSegment(self.weight_shapes, itemsize)

    async def UpdateWeightsShared(self, request, context):
        """A same-host push (shared_weights.py): the manifest is checked here against the model
        (names, shapes, dtypes, byte ranges) before any replica maps the segment."""
        async def work():
            started = time.perf_counter()
            entries = self._shared_entries(request)
            version = await self.router.push_shared(request.pid, request.fd, request.size, entries, request.host_id,
                                                    request.version, request.mode or "wait")
            nbytes = sum(e.nbytes for e in entries)
            self.metrics.weight_push_bytes.inc(nbytes)
            return self._swapped(version, started, len(entries), nbytes)
        return await self._mutating(context, "UpdateWeightsShared", work)

    def _shared_entries(self, request: pb.SharedWeightsRequest) -> list[SharedEntry]:
        if request.pid <= 0 or request.fd < 0:
            raise ValueError(f"pid must be > 0 and fd >= 0, got pid {request.pid}, fd {request.fd}")
        if not 0 < request.size <= self.max_shared_bytes:
            raise ValueError(f"size must be in (0, {self.max_shared_bytes}] bytes for this model, got {request.size}")
        if not request.tensors or len(request.tensors) > len(self.weight_shapes):
            raise ValueError(f"tensors must hold 1 to {len(self.weight_shapes)} entries, got {len(request.tensors)}")
        entries, seen = [], set()
        for t in request.tensors:
            name = self.updates.canonical(t.name)
            if name in seen:
                raise ValueError(f"tensor {name} was sent twice")
            seen.add(name)
            dtype = parse_dtype(t.dtype, name)
            check_tensor_header(name, list(t.shape), dtype, self.weight_shapes)
            entries.append(SharedEntry(name, t.dtype, tuple(t.shape), t.offset, t.nbytes, t.xxh3))
        check_entries(entries, request.size)
        return entries

    async def InitWeightGroup(self, request, context):
        if not self._authorized(context):
            self.metrics.requests.labels("InitWeightGroup", "UNAUTHENTICATED").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "InitWeightGroup needs 'authorization: Bearer <token>' metadata with the server's token")
        try:
            if not request.master_address or not 0 < request.master_port < 65536:
                raise ValueError("master_address and master_port (1..65535) are required")
            if not (math.isfinite(request.timeout_seconds) and request.timeout_seconds >= 0):
                raise ValueError(f"timeout_seconds must be a finite number of seconds >= 0 (0: 300 s), "
                                 f"got {request.timeout_seconds}")
            if request.backend not in ("", "nccl", "gloo"):
                raise ValueError(f"backend must be 'nccl' or 'gloo', got {request.backend!r}")
            world, backend = await self.router.init_weight_group(
                request.master_address, request.master_port, request.backend, request.timeout_seconds or 300.0)
        except Exception as e:  # noqa: BLE001
            await self._fail(context, "InitWeightGroup", e)
        return pb.WeightGroupResponse(world_size=world, backend=backend)

    async def _mutating(self, context, method: str, work):
        """Runs `work()` (a coroutine function) for a mutating RPC: the token first, every failure
        a status, the outcome counted."""
        await self._require_token(context, method)
        try:
            result = await work()
        except Exception as e:  # noqa: BLE001
            await self._fail(context, method, e)
        self.metrics.requests.labels(method, "OK").inc()
        return result

    async def _require_token(self, context, method: str) -> None:
        if not self._authorized(context):
            self.metrics.requests.labels(method, "UNAUTHENTICATED").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} needs 'authorization: Bearer <token>' metadata with the server's token")

    def _swapped(self, version: int, started: float, num_tensors: int = 0, num_bytes: int = 0):
        seconds = time.perf_counter() - started
        self.metrics.weight_push_seconds.observe(seconds)
        return pb.UpdateWeightsResponse(version=version, num_tensors=num_tensors, num_bytes=num_bytes,
                                        seconds=seconds)

    async def BeginWeightUpdate(self, request, context):
        async def work():
            update = self.updates.begin(request.timeout_seconds or 600.0)
            return pb.BeginWeightUpdateResponse(update_id=update.update_id,
                                                expires_in_seconds=update.deadline - time.monotonic())
        return await self._mutating(context, "BeginWeightUpdate", work)

    async def PushWeightBucket(self, request_iterator, context):
        assembler = WeightAssembler(self.weight_shapes, self.updates.canonical)

        async def work():
            async for chunk in request_iterator:
                if assembler.update_id is None:  # the update must be open before its bytes are taken
                    self.updates.get(chunk_update_id(chunk))
                assembler.add(chunk)
            if assembler.update_id is None:
                raise ValueError("the bucket was empty")
            tensors = assembler.finish()
            staged = self.updates.add(assembler.update_id, tensors)
            self.metrics.weight_push_bytes.inc(assembler.num_bytes)
            return pb.WeightBucketResponse(update_id=assembler.update_id, num_tensors=len(tensors),
                                           staged_tensors=staged, num_bytes=assembler.num_bytes)
        return await self._mutating(context, "PushWeightBucket", work)

    async def CommitWeightUpdate(self, request, context):
        async def work():
            started = time.perf_counter()
            version, n, nbytes = await self.updates.commit(request.update_id, request.mode or "wait")
            return self._swapped(version, started, n, nbytes)
        return await self._mutating(context, "CommitWeightUpdate", work)

    async def AbortWeightUpdate(self, request, context):
        async def work():
            return pb.AbortWeightUpdateResponse(freed_tensors=self.updates.abort(request.update_id))
        return await self._mutating(context, "AbortWeightUpdate", work)

    async def UpdateWeightsFromDisk(self, request, context):
        async def work():
            started = time.perf_counter()
            version = await self.router.update_from_disk(request.model_path, request.mode or "wait")
            return self._swapped(version, started, len(self.weight_shapes))
        return await self._mutating(context, "UpdateWeightsFromDisk", work)

    async def ResetWeights(self, request, context):
        async def work():
            started = time.perf_counter()
            return self._swapped(await self.router.reset_weights(request.mode or "wait"), started,
                                 len(self.weight_shapes))
        return await self._mutating(context, "ResetWeights", work)

    async def PauseGeneration(self, request, context):
        async def work():
            ended = await self.router.pause(request.mode or "keep", request.timeout_seconds or 300.0)
            return pb.PauseResponse(paused=True, aborted_requests=ended)
        return await self._mutating(context, "PauseGeneration", work)

    async def ResumeGeneration(self, request, context):
        async def work():
            await self.router.resume()
            return pb.PauseResponse(paused=False)
        return await self._mutating(context, "ResumeGeneration", work)

    async def GetStatus(self, request, context):
        await self._check_read_access(context, "GetStatus")
        replicas, (fingerprint, dtype) = await asyncio.gather(self.router.replica_status(),
                                                             self.router.weight_fingerprint())
        # Lifetime counters of every replica that answered: tokens per forward and acceptance.
        tokens = sum(r.get("generated_tokens", 0) for r in replicas)
        forwards = sum(r.get("row_forward_passes", 0) for r in replicas)
        width = max((len(r.get("draft_attempts", [])) for r in replicas), default=0)
        attempts, accepts = [0] * width, [0] * width
        for r in replicas:
            for i, (n, a) in enumerate(zip(r.get("draft_attempts", []), r.get("draft_accepts", []))):
                attempts[i] += n
                accepts[i] += a
        sources: dict[str, list[int]] = {}
        for r in replicas:
            for name, v in r.get("draft_sources", {}).items():
                total = sources.setdefault(name, [0, 0, 0])
                sources[name] = [x + y for x, y in zip(total, (v["row_steps"], v["offered"], v["accepted"]))]
        return pb.StatusResponse(
            model=self.model_name, weight_version=self.router.version,
            replicas=[pb.ReplicaStatus(name=r["name"], node_id=r.get("node_id", ""), ready=r.get("ready", False),
                                       weight_version=r.get("weight_version", -1), paused=r.get("paused", False),
                                       running_requests=r.get("running_requests", 0),
                                       outstanding_tokens=r["outstanding_tokens"], restarts=r["restarts"],
                                       metrics_address=r.get("metrics_address", ""),
                                       drafting=r.get("drafting", ""), level_set=r.get("level_set", ""),
                                       level_choices=r.get("level_choices", {}), num_slots=r.get("num_slots", 0),
                                       free_slots=r.get("free_slots", 0),
                                       running_sequences=r.get("running_sequences", 0),
                                       waiting_sequences=r.get("waiting_sequences", 0),
                                       catching_up=r.get("catching_up", False), host_id=r.get("host_id", ""),
                                       threads=r.get("threads", 0),
                                       draft_sources=draft_source_messages(r.get("draft_sources", {})))
                      for r in replicas],
            queue_depth=self.router.waiting,
            running_requests=sum(r.running for r in self.router.replicas) - self.router.waiting,
            tokens_per_forward=tokens / forwards if forwards else 0.0,
            acceptance_by_position=[a / n if n else 0.0 for a, n in zip(accepts, attempts)],
            block_size=self.tidar.block_size, levels=list(self.tidar.level_set),
            weight_source=self.router.weight_source, paused=self.router.paused,
            open_weight_updates=len(self.updates.open), weight_fingerprint=fingerprint, weight_dtype=dtype,
            family=self.config.family, draft_sources=draft_source_messages(source_summary(sources)))

    def _authorized(self, context) -> bool:
        if self.auth_token is None:
            return False  # mutating RPCs are refused when the server was started without a token
        return bearer_matches([v for k, v in context.invocation_metadata() if k == "authorization"],
                              self.auth_token)


def draft_source_messages(summary: dict[str, dict]) -> dict[str, pb.DraftSource]:
    """`drafting.source_summary` rows as GetStatus's DraftSource messages."""
    return {name: pb.DraftSource(row_steps=v["row_steps"], drafts_offered=v["offered"], drafts_accepted=v["accepted"],
                                 share=v["share"], acceptance=v["acceptance"]) for name, v in summary.items()}


MAX_GROUP_ID = 256  # characters of a request's group_id (it is echoed in every trajectory)


class PolicyVersionError(RuntimeError):
    """The served policy version is older than the caller requires (FAILED_PRECONDITION)."""


def bearer_matches(values: list[str], token: str) -> bool:
    """Exactly one authorization value, equal to "Bearer <token>" (compared in constant time).
    Two values are refused rather than resolved: which one a proxy or server keeps differs."""
    return len(values) == 1 and hmac.compare_digest(values[0].encode(), f"Bearer {token}".encode())


def _status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, RayTaskError) and e.cause is not None:
        e = e.cause
    if isinstance(e, (QueueFullError, LoadError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, (DeadlineExceededError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(e) or "deadline exceeded"
    if isinstance(e, PolicyVersionError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, UnknownUpdateError):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, SharedSegmentError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, (NoReplicaError, *REPLICA_FAILURES)):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


class _RawWeightChunks:
    """The server as the generated registration sees it, with weight chunks deserialised by
    `wire.parse_chunk` (views of the received bytes) instead of protobuf (two copies of each)."""

    RAW = ("UpdateWeights", "PushWeightBucket")

    def __init__(self, server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        handlers = dict(handlers)
        for name in self.RAW:
            h = handlers[name]
            handlers[name] = grpc.stream_unary_rpc_method_handler(
                h.stream_unary, request_deserializer=parse_chunk, response_serializer=h.response_serializer)
        self.server.add_registered_method_handlers(service, handlers)


async def start_server(servicer: RolloutServicer, port: int, host: str = "[::]",
                       tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
    """Starts the gRPC server (health NOT_SERVING until `set_serving`). Returns the bound port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 256 << 20)])
    pb_grpc.add_RolloutServiceServicer_to_server(servicer, _RawWeightChunks(server))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, grpc.ssl_server_credentials([tls[::-1]])) if tls
             else server.add_insecure_port(address))
    await server.start()
    return server, health, bound


async def set_serving(health: health_aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health.set(name, status)
