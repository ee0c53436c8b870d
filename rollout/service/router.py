"""Router: admits requests, places them on replicas, survives replica failures.

Design decisions:
- Placement: the live replica with the fewest outstanding tokens (prompt + max_tokens, times
  n, over the requests assigned to it and not yet finished), unless the request's prompts have
  a home replica that is not much busier (`_pick`): rendezvous hashing of the prompts' token
  ids over the live replicas, taken while its outstanding tokens exceed the least loaded one's
  by at most the request's own cost (or AFFINITY_SLACK of the mean load, if more). A replica
  keeps the completions of the prompts it rolled out as history drafts
  (`engine/history.py`), so an RL trainer that rolls the same prompts (or the same groups) out
  again gets them back on the replica that holds their history, without unbalancing the
  replicas: the load bound is what consistent hashing with bounded loads does. All samples of a prompt go to one
  replica in one engine request, so they share the prompt's prefill. A request is sent to its
  replica at once: the replica's engine batches it with whatever else runs there (continuous
  batching) and queues what does not fit its KV pool yet. Outstanding tokens are added when a
  request is sent and removed when it ends, however it ends (finished, failed, cancelled).
- Admission: at most `max_queue` requests in flight beyond one per replica; the next one is
  refused at once (QueueFullError -> RESOURCE_EXHAUSTED) rather than queued without bound.
  Size limits derived from the replicas' KV pools (`limits`) are checked at the front door.
- Failures: when a replica's actor dies, Ray restarts it. The trajectories already streamed back
  are kept; the samples still missing are dispatched again (to any live replica, the restarted
  one included once it has caught up with the current weights). Each trajectory reaches the
  caller exactly once. A re-dispatched sample keeps the key of the row it replaces (the
  request's seed, the caller's prompt and sample index: `Engine.add_request(rows=...)`), so it
  draws exactly what that row would have drawn and stays independent of the request's other
  samples (a request without a seed gets one drawn here, once).
- Every wait has a deadline: the request's own, else `request_timeout`.
- Weight updates are two-phase over all replicas (stage everywhere, then commit everywhere), so
  an update that fails anywhere changes nothing; each is one version, whatever its source: a
  full push, a partial one (the other tensors keep their values), safetensors on shared storage,
  or the base weights again (`reset_weights`). A replica that restarts catches up from the
  object store (full pushes) or by copying a live replica's weights (everything else).
- Catching up is eager: `supervise` (started with the service) asks every replica's status each
  CATCH_UP_INTERVAL seconds and brings one on an older version (Ray restarted it on the base
  weights, or it missed a push) to the current version at once, without waiting for a request.
  A restarted replica is therefore ready within CATCH_UP_INTERVAL plus one weight load after its
  constructor returns (a load that fails is logged and tried again at the next check). A request
  that reaches a replica first still catches it up itself (`_ensure_version`).
- Pause / resume go to every replica; a pause carries a timeout after which replicas resume by
  themselves (see replica.py), so a pause can never outlive its caller's intent forever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
from ray.exceptions import (ActorUnavailableError, ObjectFetchTimedOutError, ObjectFreedError, ObjectLostError,
                            OwnerDiedError, RayActorError, RayTaskError)

from ..params import SamplingParams
from ..engine.engine import EngineLimits
from ..wire import pack_tensors
from .shared_weights import ReceiveSegment, SharedSegmentError, host_id
from .messages import Finished, RequestDone, Stale, Started, Tokens
from .metrics import FrontendMetrics
from .replica import check_pause
from .weights import check_swap_mode

log = logging.getLogger(__name__)
REPLICA_FAILURES = (RayActorError, ActorUnavailableError)
LOST_OBJECTS = (ObjectLostError, OwnerDiedError, ObjectFetchTimedOutError, ObjectFreedError)
CATCH_UP_INTERVAL = 1.0  # seconds between the supervisor's checks of every replica's version
AFFINITY_SLACK = 0.25  # share of the mean outstanding tokens a home replica may carry above the least loaded


class QueueFullError(RuntimeError):
    pass


class DeadlineExceededError(TimeoutError):
    pass


class NoReplicaError(RuntimeError):
    pass


@dataclass
class ReplicaSlot:
    actor: object
    name: str
    outstanding_tokens: int = 0
    running: int = 0
    version: int | None = None  # last version known to be served; None: unknown (e.g. restarted)
    failures: int = 0   # deaths seen (each counted once, however many requests it failed)
    down: bool = False  # failed, and has not answered since
    restarts: int = 0   # Ray's restart count of the actor, as the replica last reported it
    catching_up: bool = False  # the current weights are being loaded onto it
    host: str = ""  # its Ray node id and shared_weights.host_id, as it last reported them


@dataclass(frozen=True)
class Routed:
    """A finished trajectory (wire record, with the caller's prompt/sample indices) and the
    replica that produced it."""
    record: dict
    replica: str


@dataclass
class SubRequest:
    prompt_indices: list[int]       # into the caller's prompts
    sample_indices: list[list[int]]  # per prompt: the caller's sample index of each engine sample


class Router:
    def __init__(self, metrics: FrontendMetrics, max_queue: int = 64, request_timeout: float = 600.0,
                 control_timeout: float = 120.0):
        self.replicas: list[ReplicaSlot] = []
        self.metrics, self.max_queue = metrics, max_queue
        self.request_timeout, self.control_timeout = request_timeout, control_timeout
        self.version = 0
        self.weight_source = "base"  # what the served version came from: base, push, disk:<path>, reset
        self.weights_ref = None  # the served version in the object store, when it holds all of it
        self.paused_until: float | None = None  # time.monotonic() when replicas resume by themselves
        self.admitted = 0
        self.waiting = 0  # sent to a replica, not started there yet
        self.limits: EngineLimits | None = None  # the tightest over the replicas, once they answered
        self._push_lock = asyncio.Lock()
        # The gRPC front end's shared-memory segment, kept between pushes (Router.claim_segment);
        # while `weights_ref` is it, a restarted replica on this node catches up from it.
        self._segment: ReceiveSegment | None = None
        self.segments_refused = False  # a replica here could not map it once: the object store from then on
        self._version_changed = asyncio.Event()
        self._placements = 0

    def add_replica(self, actor, name: str) -> None:
        self.replicas.append(ReplicaSlot(actor, name))

    # ------------------------------------------------------------------ readiness / status
    async def wait_ready(self, timeout: float) -> None:
        refs = [r.actor.status.remote() for r in self.replicas]
        done = await asyncio.wait_for(asyncio.gather(*refs), timeout)
        for r, st in zip(self.replicas, done):
            r.version = st["weight_version"]
            _note_host(r, st)
        self.limits = EngineLimits(**{f.name: min(st[f.name] for st in done) for f in dataclasses.fields(EngineLimits)})

    async def replica_status(self) -> list[dict]:
        async def one(r: ReplicaSlot) -> dict:
            try:
                st = await asyncio.wait_for(r.actor.status.remote(), self.control_timeout)
            except (*REPLICA_FAILURES, asyncio.TimeoutError) as e:
                st = dict(name=r.name, ready=False, error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            r.restarts = st.get("restarts", r.restarts)
            _note_host(r, st)
            # Ready means serving the current weights: a restarted replica is not, until it catches up.
            st.update(outstanding_tokens=r.outstanding_tokens, restarts=r.restarts, catching_up=r.catching_up,
                      ready=(bool(st.get("ready")) and st.get("weight_version") == self.version
                             and not r.catching_up))
            return st
        return list(await asyncio.gather(*(one(r) for r in self.replicas)))

    async def weight_fingerprint(self) -> tuple[str, str]:
        """(fingerprint, dtype) of the served weights from a replica serving the current version
        (see GeneratorReplica.weight_fingerprint); ("", "") when none answers with it."""
        for r in self.replicas:
            if r.version != self.version or r.catching_up:
                continue
            try:
                version, fingerprint, dtype = await asyncio.wait_for(r.actor.weight_fingerprint.remote(),
                                                                     self.control_timeout)
            except (*REPLICA_FAILURES, asyncio.TimeoutError, RuntimeError):
                continue
            if version == self.version:
                return fingerprint, dtype
        return "", ""

    # ------------------------------------------------------------------ generation
    async def generate(self, prompts: list[list[int]], params: SamplingParams, deadline: float | None = None,
                       stream_tokens: bool = False) -> AsyncIterator[Routed | Started | RequestDone | Tokens]:
        """Yields a Routed per trajectory (with the caller's prompt/sample indices); before the
        first trajectory of a replica run its Started, and after its last its RequestDone
        (per-request stats). `deadline` is a time.monotonic() value. `stream_tokens`: also the
        replicas' Tokens (each step's new tokens, the caller's indices); after a replica failure
        the re-dispatched samples start again, so a consumer checks its deltas against the
        final trajectory."""
        if not self.replicas:
            raise NoReplicaError("no generator replica has been placed yet")
        self._admit()
        deadline = deadline or time.monotonic() + self.request_timeout
        if params.seed is None:  # one seed for every part of the request, re-dispatched parts included
            params = dataclasses.replace(params, seed=int.from_bytes(os.urandom(8), "little") >> 1)
        try:
            pending = [SubRequest(list(range(len(prompts))), [list(range(params.n))] * len(prompts))]
            attempts, failed = 0, set()
            while pending:
                sub = pending.pop(0)
                missing = {(p, s) for p, samples in zip(sub.prompt_indices, sub.sample_indices) for s in samples}
                replica = self._pick(avoid=failed, prompts=[prompts[i] for i in sub.prompt_indices],
                                     cost=sum(len(prompts[i]) + params.max_tokens for i in sub.prompt_indices) * len(
                                         sub.sample_indices[0]))
                try:
                    async for event in self._run_on_replica(replica, sub, prompts, params, deadline, stream_tokens):
                        if isinstance(event, Routed):
                            missing.discard((event.record["prompt_index"], event.record["sample_index"]))
                        yield event
                except REPLICA_FAILURES as e:
                    attempts += 1
                    failed.add(replica.name)
                    self.metrics.retries.inc()
                    if attempts > 3 * len(self.replicas):
                        raise NoReplicaError(f"gave up after {attempts} replica failures: {e}") from e
                    pending = self._regroup(missing) + pending
        finally:
            self.admitted -= 1

    @staticmethod
    def _regroup(missing: set[tuple[int, int]]) -> list[SubRequest]:
        """Missing (prompt, sample) pairs -> sub-requests whose prompts all lack the same count
        (each keeps the caller's indices, which key its rows' randomness)."""
        per_prompt: dict[int, list[int]] = {}
        for p, s in sorted(missing):
            per_prompt.setdefault(p, []).append(s)
        by_count: dict[int, SubRequest] = {}
        for p, samples in per_prompt.items():
            sub = by_count.setdefault(len(samples), SubRequest([], []))
            sub.prompt_indices.append(p)
            sub.sample_indices.append(samples)
        return list(by_count.values())

    def _pick(self, avoid: set[str] = frozenset(), prompts: list[list[int]] | None = None,
              cost: int = 0) -> ReplicaSlot:
        """Least outstanding tokens; ties rotate so idle replicas share the work. With `prompts`,
        their home replica (rendezvous hashing over the live replicas) instead, while it carries
        at most max(cost, AFFINITY_SLACK x mean) outstanding tokens more than the least loaded.
        Replicas in `avoid` (failed during this request: Ray is restarting them) only if nothing
        else is left, and never as a home."""
        if not self.replicas:
            raise NoReplicaError("no generator replica has been placed yet")
        self._placements += 1
        n = len(self.replicas)
        order = [self.replicas[(self._placements + i) % n] for i in range(n)]
        least = min(order, key=lambda r: (r.name in avoid, r.outstanding_tokens, r.running))
        live = [r for r in self.replicas if r.name not in avoid and not r.down]
        if not prompts or not live:
            return least
        key = prompts_key(prompts)
        home = max(live, key=lambda r: hashlib.blake2b(key + r.name.encode(), digest_size=8).digest())
        mean = sum(r.outstanding_tokens for r in live) / len(live)
        if home.outstanding_tokens - least.outstanding_tokens <= max(cost, AFFINITY_SLACK * mean):
            return home
        return least

    async def _run_on_replica(self, replica: ReplicaSlot, sub: SubRequest, prompts, params: SamplingParams,
                              deadline: float, stream_tokens: bool = False):
        n = len(sub.sample_indices[0])
        sub_prompts = [prompts[i] for i in sub.prompt_indices]
        cost = sum(len(p) + params.max_tokens for p in sub_prompts) * n
        request_id = uuid.uuid4().hex
        gen, started = None, False
        replica.outstanding_tokens += cost
        replica.running += 1
        self.waiting += 1
        self._update_gauges()
        try:
            for _ in range(3):  # again only when the replica turns out to serve stale weights
                await self._ensure_version(replica, deadline)
                sub_params = dict(_params_dict(params), n=n)
                rows = [(p, samples) for p, samples in zip(sub.prompt_indices, sub.sample_indices)]
                gen = replica.actor.generate.remote(request_id, sub_prompts, sub_params, self.version,
                                                   _left(deadline), rows, stream_tokens)
                stale = False
                async for message in _records(gen, deadline):
                    if isinstance(message, Stale):
                        replica.version, stale = None, True
                        break
                    if isinstance(message, Started):
                        if not started:
                            started = True
                            self.waiting -= 1
                            self._update_gauges()
                        yield message
                    elif isinstance(message, Finished):
                        for r in message.records:  # the caller's indices already (the rows sent)
                            yield Routed(r, replica.name)
                    elif isinstance(message, (RequestDone, Tokens)):
                        yield message
                if not stale:
                    return
                gen = None
            raise NoReplicaError(f"replica {replica.name} kept serving stale weights")
        except REPLICA_FAILURES:
            if not replica.down:  # one death fails every request it was running: count it once
                replica.down = True
                replica.failures += 1
                self.metrics.replica_restarts.inc()
            replica.version = None
            log.warning("replica %s failed during request %s; re-dispatching", replica.name, request_id)
            raise
        except BaseException:
            if gen is not None:  # cancelled, deadline, or the caller stopped reading: free the work
                replica.actor.abort.remote(request_id)
                self.metrics.aborts.inc()
            raise
        finally:
            if not started:
                self.waiting -= 1
            replica.running -= 1
            replica.outstanding_tokens -= cost
            self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(sum(r.running for r in self.replicas) - self.waiting)

    async def _ensure_version(self, replica: ReplicaSlot, deadline: float) -> None:
        """A replica that restarted (or missed a push) loads the current weights before work,
        holding the push lock: a push staging on it meanwhile would discard what the catch-up
        staged (the request then failed with "staged weights ... were discarded")."""
        if replica.version == self.version:
            return
        await _acquire(self._push_lock, deadline)
        try:
            if replica.version != self.version:  # the push we waited for may have caught it up
                await self._catch_up(replica, deadline)
        finally:
            self._push_lock.release()

    async def _catch_up(self, replica: ReplicaSlot, deadline: float) -> None:
        st = await asyncio.wait_for(replica.actor.status.remote(), _left(deadline))
        replica.down = False
        replica.restarts = st.get("restarts", replica.restarts)
        _note_host(replica, st)
        if st["weight_version"] != self.version:
            replica.catching_up = True
            try:
                try:
                    await self._load_current(replica, deadline)
                except LOST_OBJECTS as e:  # the object-store copy is gone (its node died): copy a replica's
                    log.warning("weights of version %d lost from the object store (%s); copying a live replica's",
                                self.version, type(e).__name__)
                    self.weights_ref = None
                    await self._load_current(replica, deadline)
            finally:
                replica.catching_up = False
            self.metrics.catch_ups.inc()
            log.info("replica %s caught up from version %d to %d (%s)", replica.name, st["weight_version"],
                     self.version, self.weight_source)
        replica.version = self.version

    async def _load_current(self, replica: ReplicaSlot, deadline: float) -> None:
        """Loads the current version onto `replica`: from the object store after a whole push,
        else copied from a replica that serves it."""
        ref = self.weights_ref
        if isinstance(ref, ReceiveSegment):
            if self.is_local(replica):
                try:
                    await asyncio.wait_for(replica.actor.load_shared.remote(
                        self.version, os.getpid(), ref.fd, ref.used, ref.entries, host_id(), ref.finite),
                        _left(deadline))
                except BaseException:
                    self._abandon_segment(ref)  # the replica may still be reading it
                    raise
                return
            ref = None  # on another node: copied from a replica that serves it
        if ref is None:
            source = next((r for r in self.replicas if r is not replica and r.version == self.version), None)
            if source is None:
                raise NoReplicaError(f"no replica holds weight version {self.version} to copy from")
            ref = self.weights_ref = source.actor.export_weights.remote()
        await asyncio.wait_for(replica.actor.load_weights.remote(self.version, ref), _left(deadline))

    async def supervise(self, interval: float = CATCH_UP_INTERVAL) -> None:
        """Runs until cancelled: every `interval` seconds, `check_replicas`."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_replicas()
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one check
                log.exception("replica check failed")

    async def check_replicas(self) -> None:
        """Asks every replica its version; one behind the router's (restarted on the base weights,
        or it missed a push) loads the current weights now, and one that came back unpaused
        during a pause is paused for the time left. A replica that does not answer (restarting)
        is looked at again at the next check."""
        async def check(r: ReplicaSlot) -> bool:
            try:
                st = await asyncio.wait_for(r.actor.status.remote(), self.control_timeout)
            except (*REPLICA_FAILURES, asyncio.TimeoutError):
                return False
            r.restarts = st.get("restarts", r.restarts)
            _note_host(r, st)
            left = (self.paused_until or 0.0) - time.monotonic()
            if left > 0 and not st.get("paused", True):  # restarted during a pause: it came back unpaused
                try:
                    await asyncio.wait_for(r.actor.pause.remote("keep", left), self.control_timeout)
                    log.info("replica %s came back during a pause; paused it for the %.0f s left", r.name, left)
                except (*REPLICA_FAILURES, asyncio.TimeoutError, ValueError) as e:
                    log.warning("replica %s could not be paused again: %s", r.name, e)
            if st["weight_version"] >= self.version:  # ahead: a commit still returning to the router
                r.down = False
                return True
            r.version = None  # it answered on older weights: whatever the router believed is wrong
            try:
                await self._ensure_version(r, time.monotonic() + self.control_timeout)
            except (*REPLICA_FAILURES, DeadlineExceededError, asyncio.TimeoutError, NoReplicaError) as e:
                log.warning("replica %s could not catch up to version %d yet: %s", r.name, self.version,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                return False
            return True
        ready = await asyncio.gather(*(check(r) for r in self.replicas))
        self.metrics.ready_replicas.set(sum(ready))

    async def wait_for_version(self, version: int, deadline: float) -> None:
        """Returns once the served version is >= `version`; DeadlineExceededError otherwise. A
        request waiting here counts against the in-flight limit like one being generated."""
        if self.version >= version:
            return
        self._admit()
        try:
            while self.version < version:
                try:
                    await asyncio.wait_for(self._version_changed.wait(), _left(deadline))
                except asyncio.TimeoutError:
                    raise DeadlineExceededError(f"policy version {version} was not reached before the deadline "
                                                f"(serving {self.version})") from None
        finally:
            self.admitted -= 1

    def _admit(self) -> None:
        """Takes one of the in-flight places, or refuses (QueueFullError) when none is left."""
        if self.admitted >= self.max_queue + len(self.replicas):
            raise QueueFullError(f"queue full: {self.admitted} requests admitted "
                                 f"(max_queue={self.max_queue} + {len(self.replicas)} replicas)")
        self.admitted += 1

    # ------------------------------------------------------------------ weights
    async def push_weights(self, tensors: dict, version: int | None = None, mode: str = "wait",
                           partial: bool = False, finite: bool = False, segment: ReceiveSegment | None = None) -> int:
        """Stages `tensors` on every replica, then commits everywhere (`mode`: what in-flight
        requests do, see GeneratorReplica.commit_weights). With `partial`, the tensors left out
        keep their served values; `finite`: the front end checked every value already
        (`wire.WeightAssembler`). `segment`: `tensors` are its slots, assembled and checked by the
        front end (ReceiveSegment.manifest); replicas on this node stage from it, the others from
        one object-store copy, made only if there are any. The segment is the router's from here
        on (kept for the next push, or abandoned: `claim_segment`). Returns the new version."""
        local = [r for r in self.replicas if self.is_local(r)] if segment is not None else []
        ref = None
        try:
            if len(local) < len(self.replicas):
                ref = ray.put(pack_tensors(tensors))  # one copy, mapped by every replica (wire.pack_tensors)
        except BaseException:
            if segment is not None:
                self._abandon_segment(segment)
            raise
        if segment is not None:
            segment.finite = finite
            shared = (os.getpid(), segment.fd, segment.used, segment.entries, host_id())

        def stage(r: ReplicaSlot, v: int):
            if r in local:
                return r.actor.stage_shared.remote(v, *shared, checked=True, finite=finite)
            return r.actor.stage_weights.remote(v, ref, partial, None, finite)
        catch_up = None if partial else (ref if ref is not None else segment)
        try:
            return await self._two_phase_push(stage, version, mode, catch_up=catch_up, source="push",
                                              segment=segment)
        except Exception as e:
            if segment is None or not _segment_refused(e):
                raise
            # A replica here cannot open this process's memfds (another uid, a hardened /proc):
            # nothing changed; this push and the next ones go through the object store.
            log.warning("a replica could not map the front end's segment (%s); gRPC pushes go through the object "
                        "store from now on", str(e).splitlines()[-1])
            self.segments_refused = True
            return await self.push_weights(tensors, version, mode, partial, finite)

    def is_local(self, r: ReplicaSlot) -> bool:
        """Whether `r` runs on this process's Ray node and host (it can map this process's memfds)."""
        here = host_id()
        return bool(here) and not self.segments_refused and r.host == f"{_node_id()}/{here}"

    async def claim_segment(self, deadline: float) -> ReceiveSegment | None:
        """The front end's kept segment, for the next push to write into (None: none is kept, or
        another push holds it). Taken under the push lock, so that no catch-up still reads it,
        and no longer a catch-up source from here on."""
        if self._segment is None:
            return None
        await _acquire(self._push_lock, deadline)
        try:
            segment, self._segment = self._segment, None
            if segment is not None and self.weights_ref is segment:
                self.weights_ref = None
            return segment
        finally:
            self._push_lock.release()

    def keep_segment(self, segment: ReceiveSegment) -> None:
        """Keeps `segment` for the next push: one whose push committed everywhere, or one no
        replica was handed (its push failed before reaching them). One is kept, the catch-up
        source first."""
        if segment is self._segment or segment.fd < 0:
            return
        if self._segment is not None and self._segment is self.weights_ref:
            segment.close()
            return
        if self._segment is not None:
            self._segment.close()
        self._segment = segment

    def close_segments(self) -> None:
        """At shutdown, once no replica runs: the front end's segments are closed, so their memory
        goes now, not whenever the garbage collector reaches the stopped server's objects."""
        for segment in (self._segment, self.weights_ref):
            if isinstance(segment, ReceiveSegment):
                segment.close()
        self._segment = None
        if isinstance(self.weights_ref, ReceiveSegment):
            self.weights_ref = None

    def _abandon_segment(self, segment: ReceiveSegment) -> None:
        """A replica may still read `segment` (a push or catch-up that failed): never written
        again. Closing the front end's descriptor frees it once the replicas drop their mappings."""
        if self._segment is segment:
            self._segment = None
        if self.weights_ref is segment:
            self.weights_ref = None
        segment.close()

    async def update_from_disk(self, path: str, mode: str = "wait", version: int | None = None) -> int:
        """Every replica reads safetensors at `path` (shared storage) and stages them; then one
        commit. Returns the new version."""
        if not path:
            raise ValueError("model_path (weight_dir) must name a safetensors file or directory")
        return await self._two_phase_push(lambda r, v: r.actor.stage_from_disk.remote(v, path, self.control_timeout),
                                          version, mode, catch_up=None, source=f"disk:{path}")

    async def reset_weights(self, mode: str = "wait") -> int:
        """The weights the replicas started from (their model directory), as a new version."""
        return await self._two_phase_push(lambda r, v: r.actor.stage_from_disk.remote(v, None, self.control_timeout),
                                          None, mode, catch_up=None, source="reset")

    async def init_weight_group(self, address: str, port: int, backend: str, timeout: float) -> tuple[int, str]:
        """Tells every replica to join the trainer's torch.distributed group (ranks 1..N)."""
        if not backend:
            devices = [st.get("device", "cpu") for st in await self.replica_status()]
            backend = "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"
        world = len(self.replicas) + 1
        self._group_joins = [r.actor.join_weight_group.remote(address, port, world, i + 1, backend, timeout)
                             for i, r in enumerate(self.replicas)]
        self._group_timeout = timeout
        return world, backend

    async def push_weights_broadcast(self, manifest: list, version: int | None = None, mode: str = "wait",
                                     checksum: str = "wsum", bucket_bytes: int = 0) -> int:
        """Like push_weights, the tensors arriving by broadcast from the trainer (rank 0), in
        buckets of `bucket_bytes` checked with `checksum` (see weight_group.py)."""
        if not getattr(self, "_group_joins", None):
            raise ValueError("no weight group: call InitWeightGroup before a broadcast push")
        try:
            await asyncio.wait_for(asyncio.gather(*self._group_joins), self._group_timeout)
        except BaseException:
            self._group_joins = None
            raise
        return await self._two_phase_push(
            lambda r, v: r.actor.receive_broadcast.remote(v, manifest, checksum, bucket_bytes), version, mode,
            catch_up=None, source="push", everyone=True)

    async def push_shared(self, pid: int, fd: int, size: int, entries: list, trainer_host: str,
                          version: int | None = None, mode: str = "wait") -> int:
        """Like push_weights, every replica staging from the trainer's shared-memory segment
        (shared_weights.py); a restarted replica catches up from a live one, as after a broadcast."""
        return await self._two_phase_push(
            lambda r, v: r.actor.stage_shared.remote(v, pid, fd, size, entries, trainer_host), version, mode,
            catch_up=None, source="push")

    async def _two_phase_push(self, stage, version: int | None, mode: str, catch_up, source: str,
                              everyone: bool = False, segment: ReceiveSegment | None = None) -> int:
        """Stage on every replica, then commit on every live one. `catch_up`: the object-store
        ref of the whole new state, or the front end's segment (None: a restarted replica copies
        a live one's weights). `everyone`: a replica that cannot stage fails the update (a
        broadcast needs all ranks). `segment`: kept for the next push once every replica that
        staged from it has committed (each then done reading it: a replica's kept mapping is
        read again only by the next push's stage), else abandoned."""
        committed = False
        try:
            check_swap_mode(mode)
            async with self._push_lock:
                new_version = self.version + 1
                if version not in (None, 0, new_version):
                    raise ValueError(f"version must be the next version {new_version}, got {version}")
                try:
                    staged = await asyncio.wait_for(asyncio.gather(
                        *(stage(r, new_version) for r in self.replicas), return_exceptions=True),
                        self.control_timeout)
                    down = [r for r, res in zip(self.replicas, staged) if isinstance(res, REPLICA_FAILURES)]
                    errors = [res for res in staged
                              if isinstance(res, BaseException) and not isinstance(res, REPLICA_FAILURES)]
                    if errors:
                        raise errors[0]
                    # A replica that is restarting cannot stage; it catches up before its next request
                    # (from the object store, or from a live replica), so the update goes on without it.
                    if down and (everyone or len(down) == len(self.replicas)):
                        raise NoReplicaError(f"replica {down[0].name} is restarting and could not stage version "
                                             f"{new_version}; nothing changed, retry the update")
                except BaseException:
                    await asyncio.wait_for(asyncio.gather(*(r.actor.discard_weights.remote() for r in self.replicas),
                                                          return_exceptions=True), self.control_timeout)
                    raise
                live = [r for r in self.replicas if r not in down]
                results = await asyncio.wait_for(asyncio.gather(
                    *(r.actor.commit_weights.remote(new_version, mode) for r in live), return_exceptions=True),
                    self.request_timeout)
                self.version, self.weights_ref, self.weight_source = new_version, catch_up, source
                self._version_changed.set()
                self._version_changed = asyncio.Event()
                for r in down:
                    r.version = None
                for r, res in zip(live, results):
                    # A replica that died between stage and commit catches up before its next request.
                    r.version = new_version if res == new_version else None
                # A replica whose commit failed may still map the segment (a timed-out swap still copying).
                committed = all(res == new_version for res in results)
                self.metrics.weight_version.set(new_version)
                log.info("serving weight version %d (%s)", new_version, source)
                return new_version
        finally:
            if segment is not None:
                if committed:
                    self.keep_segment(segment)
                else:
                    self._abandon_segment(segment)

    # ------------------------------------------------------------------ pause / resume
    @property
    def paused(self) -> bool:
        return self.paused_until is not None and time.monotonic() < self.paused_until

    async def pause(self, mode: str = "keep", timeout: float = 300.0) -> int:
        """Pauses every replica (see GeneratorReplica.pause); they resume by themselves after
        `timeout` seconds. If any replica fails to pause, the others are resumed and the error
        raised. Returns the requests ended (mode "abort")."""
        check_pause(mode, timeout)
        if not self.replicas:
            raise NoReplicaError("no generator replica has been placed yet")
        results = await asyncio.wait_for(asyncio.gather(
            *(r.actor.pause.remote(mode, timeout) for r in self.replicas), return_exceptions=True),
            self.control_timeout)
        errors = [res for res in results if isinstance(res, BaseException)]
        if errors:
            await self.resume()
            raise errors[0]
        self.paused_until = time.monotonic() + timeout
        return sum(results)

    async def resume(self) -> None:
        """Resumes every replica that answers (one that is restarting comes back unpaused)."""
        self.paused_until = None
        results = await asyncio.wait_for(asyncio.gather(
            *(r.actor.resume.remote() for r in self.replicas), return_exceptions=True), self.control_timeout)
        errors = [res for res in results if isinstance(res, BaseException) and not isinstance(res, REPLICA_FAILURES)]
        if errors:
            raise errors[0]


def _segment_refused(e: BaseException) -> bool:
    cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e
    return isinstance(cause, SharedSegmentError)


def _note_host(r: ReplicaSlot, st: dict) -> None:
    if "node_id" in st and "host_id" in st:
        r.host = f"{st['node_id']}/{st['host_id']}"


def _node_id() -> str:
    """This process's Ray node id ("-" outside Ray: then no replica is local)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"


def prompts_key(prompts: list[list[int]]) -> bytes:
    """A request's prompts as bytes (the affinity key): the same prompts, the same key."""
    return b"|".join(b",".join(str(t).encode() for t in p) for p in prompts)


async def _records(gen, deadline: float):
    """Values of a Ray streaming generator, each wait bounded by the deadline."""
    while True:
        try:
            left = _left(deadline)  # before making the coroutine, which must then be awaited
            ref = await asyncio.wait_for(gen.__anext__(), left)
            record = await asyncio.wait_for(ref, _left(deadline))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise DeadlineExceededError("deadline passed during generation") from None
        yield record


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError("deadline passed")
    return left


async def _acquire(lock: asyncio.Lock, deadline: float) -> None:
    """lock.acquire() bounded by the request's deadline. asyncio.timeout (3.11+) cancels the
    acquire cleanly; wait_for on 3.10 could lose an acquisition that races the timeout."""
    try:
        if hasattr(asyncio, "timeout"):
            async with asyncio.timeout(_left(deadline)):
                await lock.acquire()
        else:
            await asyncio.wait_for(lock.acquire(), _left(deadline))
    except (asyncio.TimeoutError, TimeoutError):
        raise DeadlineExceededError("deadline passed while a weight update held the replicas") from None


def _params_dict(p: SamplingParams) -> dict:
    """Every field (a hand-written list once dropped new ones on the way to the replica)."""
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
