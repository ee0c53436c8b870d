"""WeightSync: push a trainer's weights to every replica as a new policy version.

Transports:
- "shared" (same host): the tensors are written once into a shared-memory file (a memfd,
  `rollout.service.shared_weights`, kept and rewritten push after push: `close()` frees it),
  and only the manifest (names, dtypes, shapes, offsets, XXH3-64 checksums) goes over gRPC
  (UpdateWeightsShared); every replica maps the file, checks it and copies from it at the
  commit. Needs every replica on this host, in this pid namespace.
- "grpc" (anywhere): the tensors stream over UpdateWeights in chunks of `chunk_bytes`
  (msgpack framing, XXH3-64 per tensor), serialised without protobuf message objects.
- "broadcast": a torch.distributed group between this process (rank 0) and the replicas
  (NCCL on GPUs, gloo on CPU), formed once through the service's InitWeightGroup; each push
  announces the tensor list over UpdateWeights, then broadcasts the tensors in pipelined buckets
  of `bucket_bytes` (`rollout.service.weight_group`). Every collective carries the timeout.
- "auto" (the default): "shared" when GetStatus shows every replica on this host
  (ReplicaStatus.host_id), else "grpc"; the choice is logged and kept in `chosen_transport`.
  A replica that cannot map the segment (FAILED_PRECONDITION: another uid, a hardened /proc)
  changes nothing, and "auto" then pushes over gRPC from that push on.
Either way the service verifies everything, swaps between engine steps on every replica, and
bumps the version; a failed push leaves the old version serving everywhere.

Beyond whole pushes (always over gRPC, whatever the transport): `push_named` sends any subset of
tensors in buckets of about `bucket_bytes` as one update (one version; tensors not sent keep their
served values; wrapped names such as `module.` or `_orig_mod.` are mapped by the service),
`update_from_disk` loads a safetensors checkpoint the replicas can read, `reset` goes back to the
weights the service started with, and `pause` / `resume` hold generation around an update.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
import msgpack
import torch

from rollout.service.shared_weights import SharedSegment, host_id
from rollout.service.weight_group import bucket_layout, make_weight_group, pipelined_broadcast
from rollout.v1 import rollout_pb2 as pb
from rollout.wire import WEIGHT_CHUNK_BYTES, checksum, dtype_name, weight_frames, weights_fingerprint

from .client import RolloutClient

log = logging.getLogger(__name__)
TRANSPORTS = ("auto", "shared", "grpc", "broadcast")
BUCKET_BYTES = 256 << 20
BROADCAST_BUCKET_BYTES = 64 << 20


RESTART_RETRY_SECONDS = 120.0  # how long a push refused because a replica is restarting is retried


@dataclass
class PushResult:
    version: int
    num_tensors: int
    num_bytes: int
    seconds: float
    # Tries refused with UNAVAILABLE because a replica was restarting (each changed nothing)
    # before this one went through; the last refusal's message.
    retries: int = 0
    retried_because: str = ""
    transport: str = ""  # the transport that carried the push

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / max(self.seconds, 1e-9) / 1e9


def _local_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def restarting(e: BaseException) -> bool:
    """A push the service refused, changing nothing, because a replica is restarting: worth
    sending again once Ray has brought it back."""
    return (isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE
            and "restarting" in (e.details() or ""))


class WeightSync:
    """Pushes a trainer's weights (see the module docstring). A push refused with UNAVAILABLE
    because a replica is restarting (nothing changed) is sent again by itself, with backoff, for
    up to `restart_retry_seconds`; the result says how often (`PushResult.retries`)."""

    def __init__(self, client: RolloutClient, transport: str = "auto", *, chunk_bytes: int = WEIGHT_CHUNK_BYTES,
                 timeout: float = 600.0, master_address: str | None = None, master_port: int | None = None,
                 backend: str = "", restart_retry_seconds: float = RESTART_RETRY_SECONDS,
                 bucket_bytes: int = BROADCAST_BUCKET_BYTES, reuse_segment: bool = True):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if client.token is None:
            raise ValueError("weight pushes need the service's bearer token: RolloutClient(address, token=...)")
        if chunk_bytes <= 0 or bucket_bytes < 0:
            raise ValueError(f"chunk_bytes must be > 0 and bucket_bytes >= 0, got {chunk_bytes} and {bucket_bytes}")
        self.client, self.transport, self.chunk_bytes, self.timeout = client, transport, chunk_bytes, timeout
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.restart_retry_seconds = restart_retry_seconds
        self.bucket_bytes = bucket_bytes  # broadcast buckets
        self.chosen_transport = None if transport == "auto" else transport
        self._group = None
        # The same-host segment, kept for the next push (fresh pages cost more than the copy);
        # reuse_segment=False frees it after each push (a model-sized host allocation less).
        self.reuse_segment, self._segment = reuse_segment, None
        self._send_buffers: list[torch.Tensor] = []  # the broadcast's two packing buffers, kept
        self._update_weights_raw = client.channel.stream_unary(
            "/rollout.v1.RolloutService/UpdateWeights", request_serializer=None,
            response_deserializer=pb.UpdateWeightsResponse.FromString)  # takes weight_frames' bytes as they are
        self._push_bucket_raw = client.channel.stream_unary(
            "/rollout.v1.RolloutService/PushWeightBucket", request_serializer=None,
            response_deserializer=pb.WeightBucketResponse.FromString)

    def choose_transport(self) -> str:
        """The transport pushes use: for "auto", "shared" when every replica reports this host and
        pid namespace, else "grpc" (asked once, logged)."""
        if self.chosen_transport is None:
            replicas = self.client.stub.GetStatus(pb.StatusRequest(), timeout=self.timeout,
                                                  metadata=self.client.auth_metadata).replicas
            here = host_id()
            same = bool(here) and bool(replicas) and all(r.host_id == here for r in replicas)
            self.chosen_transport = "shared" if same else "grpc"
            log.info("weight pushes go by %s (%s)", self.chosen_transport,
                     "every replica is on this host" if same else "not every replica is on this host")
        return self.chosen_transport

    def _retrying(self, send) -> PushResult:
        """send() -> PushResult, sent again while the service refuses it because a replica is
        restarting, until `restart_retry_seconds` have passed (then the refusal is raised)."""
        started, retries, delay = time.monotonic(), 0, 0.5
        while True:
            try:
                result = send()
            except grpc.RpcError as e:
                left = started + self.restart_retry_seconds - time.monotonic()
                if not restarting(e) or left <= 0:
                    raise
                retries, reason = retries + 1, e.details()
                log.warning("weight push refused (%s); trying again in %.1f s", reason, min(delay, left))
                time.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)
                continue
            if retries:
                result.retries, result.retried_because = retries, reason
                result.seconds = time.monotonic() - started
            return result

    def push(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
             mode: str = "wait") -> PushResult:
        """Pushes a full state dict (HF parameter names). `mode`: in-flight requests "wait"
        (drain first), "abort" (return partial trajectories) or "keep" (continue on the new
        weights, tokens tagged with the version that sampled them)."""
        items = list(weights.items() if isinstance(weights, Mapping) else weights)

        def send() -> PushResult:
            started = time.perf_counter()
            transport = self.choose_transport()
            if transport == "shared":
                try:
                    resp = self._push_shared(items, mode)
                except grpc.RpcError as e:
                    # Chosen by "auto", but a replica could not map the segment (another uid, a
                    # hardened /proc): nothing changed; gRPC from now on.
                    if self.transport != "auto" or e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    log.warning("shared-memory push refused (%s); pushing over grpc from now on", e.details())
                    self.chosen_transport = transport = "grpc"
            if transport == "grpc":
                resp = self._update_weights_raw(
                    weight_frames(items, version=0, num_tensors=len(items), chunk_bytes=self.chunk_bytes, mode=mode),
                    timeout=self.timeout, metadata=self.client.auth_metadata)
            elif transport == "broadcast":
                resp = self._push_broadcast(items, mode)
            return PushResult(resp.version, resp.num_tensors, resp.num_bytes, time.perf_counter() - started,
                              transport=transport)
        # A broadcast cannot be sent again as is: the restarted replica left the weight group.
        return self._retrying(send) if self.choose_transport() != "broadcast" else send()

    def ensure_served(self, weights: Mapping[str, torch.Tensor], mode: str = "wait") -> PushResult | None:
        """Makes the service serve `weights` (a full state dict, HF names): compares their
        fingerprint (`wire.weights_fingerprint`, cast to the served dtype) with the one GetStatus
        reports and pushes only when they differ (or the service reports none). Returns the push,
        or None when the service already served them; logs which."""
        status = self.client.status(timeout=self.timeout)
        served = status.weight_fingerprint
        dtype = getattr(torch, status.weight_dtype, None) if status.weight_dtype else None
        if served and dtype is not None and weights_fingerprint(weights.items(), dtype) == served:
            log.info("the service already serves these weights (version %d, fingerprint %s): no push",
                     status.weight_version, served)
            return None
        result = self.push(weights, mode=mode)
        log.info("the service served other weights (version %d, fingerprint %s); pushed these as version %d",
                 status.weight_version, served or "not reported", result.version)
        return result

    def push_named(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                   mode: str = "wait", bucket_bytes: int = BUCKET_BYTES, update_timeout: float = 600.0) -> PushResult:
        """Pushes named tensors (any subset of the model's, HF or wrapped names) in buckets of
        about `bucket_bytes`, committed as ONE new version. On any failure the update is aborted
        (nothing changes) and the error raised."""
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        items = list(weights.items() if isinstance(weights, Mapping) else weights)
        return self._retrying(lambda: self._push_named_once(items, mode, bucket_bytes, update_timeout))

    def _push_named_once(self, items: list[tuple[str, torch.Tensor]], mode: str, bucket_bytes: int,
                         update_timeout: float) -> PushResult:
        stub, md = self.client.stub, self.client.auth_metadata
        started = time.perf_counter()
        update_id = stub.BeginWeightUpdate(pb.BeginWeightUpdateRequest(timeout_seconds=update_timeout),
                                           timeout=self.timeout, metadata=md).update_id
        try:
            for bucket in _buckets(items, bucket_bytes):
                self._push_bucket_raw(weight_frames(bucket, 0, len(bucket), self.chunk_bytes, mode, update_id),
                                      timeout=self.timeout, metadata=md)
            resp = stub.CommitWeightUpdate(pb.CommitWeightUpdateRequest(update_id=update_id, mode=mode),
                                           timeout=self.timeout, metadata=md)
        except BaseException:
            try:
                stub.AbortWeightUpdate(pb.AbortWeightUpdateRequest(update_id=update_id), timeout=self.timeout,
                                       metadata=md)
            except grpc.RpcError:
                pass  # already gone (expired, or the service is down): nothing is staged either way
            raise
        return PushResult(resp.version, resp.num_tensors, resp.num_bytes, time.perf_counter() - started)

    def update_from_disk(self, path: str, mode: str = "wait") -> PushResult:
        """Every replica loads the safetensors file or directory at `path` (shared storage) as
        one new version."""
        def send() -> PushResult:
            started = time.perf_counter()
            resp = self.client.stub.UpdateWeightsFromDisk(
                pb.UpdateWeightsFromDiskRequest(model_path=str(path), mode=mode), timeout=self.timeout,
                metadata=self.client.auth_metadata)
            return PushResult(resp.version, resp.num_tensors, 0, time.perf_counter() - started)
        return self._retrying(send)

    def reset(self, mode: str = "wait") -> int:
        """The weights the service started with, as a new version. Returns the version."""
        def send() -> PushResult:
            resp = self.client.stub.ResetWeights(pb.ResetWeightsRequest(mode=mode), timeout=self.timeout,
                                                 metadata=self.client.auth_metadata)
            return PushResult(resp.version, resp.num_tensors, resp.num_bytes, resp.seconds)
        return self._retrying(send).version

    def pause(self, mode: str = "keep", timeout_seconds: float = 300.0) -> int:
        """No engine step until `resume` (or `timeout_seconds`). "keep": running requests stay;
        "abort": they end now with finish reason abort. Returns the requests ended."""
        return self.client.stub.PauseGeneration(pb.PauseRequest(mode=mode, timeout_seconds=timeout_seconds),
                                                timeout=self.timeout, metadata=self.client.auth_metadata
                                                ).aborted_requests

    def resume(self) -> None:
        self.client.stub.ResumeGeneration(pb.ResumeRequest(), timeout=self.timeout, metadata=self.client.auth_metadata)

    def _ensure_group(self) -> None:
        if self._group is not None:
            return
        address = self.master_address or _local_address()
        port = self.master_port or _free_port()
        resp = self.client.stub.InitWeightGroup(
            pb.WeightGroupRequest(master_address=address, master_port=port, backend=self.backend,
                                  timeout_seconds=self.timeout),
            timeout=self.timeout, metadata=self.client.auth_metadata)
        self._group = make_weight_group(address, port, resp.world_size, 0, resp.backend, self.timeout)
        self._group_backend = resp.backend

    def _push_shared(self, items: list[tuple[str, torch.Tensor]], mode: str):
        """Writes the tensors into this WeightSync's memfd (kept from push to push while the
        layout stays the same; see shared_weights.py) and sends the manifest. A push whose RPC
        failed abandons the segment: a replica may still be reading it, so it is never written again."""
        segment = self._segment
        if segment is not None and segment.fits(items):
            segment.write(items)
        else:
            self.close()
            segment = SharedSegment(items)
            if self.reuse_segment:
                self._segment = segment
        request = pb.SharedWeightsRequest(
            pid=os.getpid(), fd=segment.fd, size=segment.size, mode=mode, host_id=host_id(),
            tensors=[pb.SharedTensor(name=e.name, dtype=e.dtype, shape=list(e.shape), offset=e.offset,
                                     nbytes=e.nbytes, xxh3=e.xxh3) for e in segment.entries])
        try:
            return self.client.stub.UpdateWeightsShared(request, timeout=self.timeout,
                                                        metadata=self.client.auth_metadata)
        except BaseException:
            self.close()
            raise
        finally:
            if segment is not self._segment:
                segment.close()

    def close(self) -> None:
        """Frees the shared-memory segment kept between pushes (it also goes with this process)."""
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    def _push_broadcast(self, items: list[tuple[str, torch.Tensor]], mode: str):
        self._ensure_group()
        device = "cuda" if self._group_backend == "nccl" else "cpu"
        tensors = [t.detach().to(device).contiguous() for _, t in items]
        # checksums where the tensors are (on the GPU for NCCL): no host copy of the weights
        kind = "wsum" if device != "cpu" else "xxh3"
        manifest = [[name, dtype_name(t.dtype), list(t.shape), checksum(kind, t)] for (name, _), t in zip(items, tensors)]
        head = pb.WeightChunk(metadata=msgpack.packb(dict(transport="broadcast", version=0, mode=mode, tensors=manifest,
                                                          checksum=kind, bucket_bytes=self.bucket_bytes)))
        call = self.client.stub.UpdateWeights.future(iter([head]), timeout=self.timeout,
                                                     metadata=self.client.auth_metadata)
        try:
            buckets = bucket_layout([t.numel() * t.element_size() for t in tensors], self.bucket_bytes)
            pipelined_broadcast(self._group, buckets, tensors, device, self.timeout, self._send_buffers)
        except Exception:
            self._group = None  # a broken group is formed anew on the next push
            call.cancel()
            raise
        return call.result(timeout=self.timeout)


def _buckets(items: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterable[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of about `bucket_bytes` each (a larger tensor is a bucket alone)."""
    bucket, size = [], 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket
