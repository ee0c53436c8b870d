"""GeneratorReplica: one engine on one device, driven by its own engine-loop thread, hosted as
a Ray actor.

Design decisions:
- The class is plain Python (testable without Ray); `replica_actor_class` wraps it with
  `ray.remote` as a threaded actor, so many requests can be streaming at once.
- One thread, the engine loop, owns the engine: it alone calls `step()`, adds and aborts
  requests and swaps weights, always between steps. Every other thread talks to it through
  commands on a queue and waits for their answer with a timeout; no request holds a lock for
  its lifetime, so requests share every forward (continuous batching).
- `generate` is a Ray streaming generator over the request's own message queue (`messages.py`):
  Started, then Finished per step that finished some of its trajectories, then RequestDone
  with its own stats. With `stream_tokens`, also Tokens: each step's committed tokens of its
  unfinished trajectories. The loop never queues more than one Tokens wake-up per request:
  tokens committed while the request's thread has not taken the last ones are merged into
  them (`TokenDeltas`), so a slow consumer costs the request's own tokens, never a message per
  step without bound. Abort ends the request at the next step boundary; its trajectories come
  back with finish reason abort and the tokens they had.
- Weight updates are two-phase (`weights.py`): `stage_weights` verifies and prepares;
  `commit_weights` is a command the loop applies between steps, in one of three modes:
  "wait" (requests already started finish on the old weights, new ones wait for the swap),
  "abort" (started requests end now with what they have, then the swap) or "keep" (swap at
  the next step; running rows' K/V are recomputed; every token is tagged with its version).
  Staging takes a full or partial state dict (`stage_weights`), or reads safetensors from a path
  on this replica's filesystem (`stage_from_disk`; no path: the files the replica started from,
  i.e. the base weights).
- Pause (`pause`): the loop takes no step until `resume` or until the pause's timeout passes
  (then it resumes by itself and logs it), so a trainer that dies mid-update cannot leave the
  replica stopped. Commands (requests, aborts, swaps) are still applied while paused; new requests
  queue. "keep": running requests stay where they are; "abort": they end now with what they have
  (finish reason abort). A commit while paused applies at once whatever its mode (a "wait"
  commit could not drain paused requests): running requests continue on the new weights, as
  with "keep".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from ..config import EngineConfig
from ..engine.engine import Engine, StepOutput
from ..engine.sequence import Request, Sequence
from ..params import SamplingParams
from ..wire import checksum, completion_to_record, dtype_name, parse_dtype, unpack_tensors, weights_fingerprint
from ..params import Completion
from .messages import Failed, Finished, RequestDone, Stale, Started, Tokens
from .metrics import ReplicaMetrics
from .shared_weights import KeptMapping, SharedEntry, check_segment, digest_and_finite, host_id, segment_tensors
from .weight_group import bucket_bases, bucket_layout, make_weight_group, receive_buckets, staged_views
from .weights import (StagedWeights, WeightMismatchError, check_swap_mode, read_weights_from_disk,
                      stage_weights)

log = logging.getLogger(__name__)
IDLE_WAIT = 0.05  # seconds the loop sleeps on its command queue when it has nothing to run
STATUS_INTERVAL = 0.05  # seconds between the status snapshots the loop publishes while it steps
PAUSE_MODES = ("keep", "abort")
MAX_PAUSE_SECONDS = 3600.0


def check_pause(mode: str, timeout: float) -> None:
    if mode not in PAUSE_MODES:
        raise ValueError(f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
    if not 0 < timeout <= MAX_PAUSE_SECONDS:
        raise ValueError(f"timeout_seconds must be in (0, {MAX_PAUSE_SECONDS:.0f}], got {timeout}")


@dataclass
class _Swap:
    version: int
    mode: str
    done: Future


class GeneratorReplica:
    def __init__(self, model_dir: str, name: str, device: str | None = None, dtype: str | None = None,
                 metrics_port: int | None = None, lock_timeout: float = 600.0,
                 engine_config: EngineConfig | None = None, metrics_host: str = "0.0.0.0",
                 weight_dtype_policy: str = "strict", own_process: bool = False, threads: int | None = None):
        """`own_process`: the replica is its process's whole work (a Ray actor): only the engine
        loop runs torch ops on several threads, `threads` of them (its Ray CPUs; None: torch's
        current count; see `_run_loop`)."""
        self.threads, self._own_process = threads or torch.get_num_threads(), own_process
        if own_process:
            torch.set_num_threads(1)  # this thread (Ray's) never forms an OpenMP team
        on_gpu = torch.cuda.is_available()  # true on ROCm builds too (HIP devices)
        self.device = device or ("cuda" if on_gpu else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device != "cpu" else torch.float32)
        self.name, self.model_dir = name, model_dir
        self.weight_dtype_policy = weight_dtype_policy  # weights.check_dtype
        self.lock_timeout = lock_timeout  # the longest any caller waits for the engine loop or a stream
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, queue.Queue] = {}
        self._token_deltas: dict[str, TokenDeltas] = {}  # requests that stream their tokens per step
        self._first_token_at: dict[str, float] = {}
        self._staged: StagedWeights | None = None
        self._reset_version: int | None = None  # the staged version is the base weights again
        self._swap: _Swap | None = None
        self._fingerprint: tuple[int, str, str] | None = None  # weight_fingerprint of one version
        self._paused_until: float | None = None  # time.monotonic(); set by pause, cleared by resume
        self._group, self._group_backend, self._group_timeout = None, "", 300.0
        # The broadcast's kept staging buffer; a receive into it and a swap copying from it never overlap.
        self._kept_receive: torch.Tensor | None = None
        self._receiving = threading.Lock()
        self._segment_map = KeptMapping()  # the last segments staged from, for the next pushes from them
        self._orphan_check_at = 0.0  # time.monotonic() of the loop's last look at its owner
        self.restarts = _actor_restarts()
        port = metrics_port if metrics_port is not None else int(os.environ.get("ROLLOUT_REPLICA_METRICS_PORT", "0"))
        self.metrics = ReplicaMetrics(name, port, metrics_host)
        self.metrics.weight_version.set(0)
        self.metrics.restarts.set(self.restarts)
        self._closing = False  # set by close(); the loop ends at its next turn
        # Built on the engine loop's thread, which then serves it: its start-up calibration
        # times steps on the threads that will run them.
        built: Future = Future()
        self._started = threading.Event()  # set once __init__ is done: the loop then serves
        build = lambda: Engine.from_pretrained(model_dir, device=self.device, dtype=torch_dtype,  # noqa: E731
                                               config=engine_config)
        self._loop = threading.Thread(target=self._run_loop, args=(build, built), name=f"engine-loop-{name}",
                                      daemon=True)
        self._loop.start()
        try:
            self.engine: Engine = built.result()  # a load error is raised here, the thread having ended
            if own_process:
                torch.set_num_threads(1)  # the default again for every other thread (the loop keeps its own)
            self._publish_status()
        except BaseException:
            self._closing = True  # a loop that built its engine ends without serving
            self._started.set()
            self._loop.join(self.lock_timeout)
            self.metrics.close()
            raise
        finally:
            self._started.set()
        log.info("replica %s ready on %s (%s), restarts=%d, %s", name, self.device, torch_dtype, self.restarts,
                 self.engine.limits)

    # ------------------------------------------------------------------ the engine loop
    def _call(self, fn, what: str, undo=None):
        """Runs fn() on the engine loop between steps; waits at most lock_timeout for it. After a
        timeout a command not yet started never runs; one already running (or done) is followed
        by undo() on the loop, if given, since its caller will never use what it did."""
        if self._closing:
            raise RuntimeError(f"replica {self.name} is closed: {what} refused")
        done: Future = Future()
        self._commands.put((fn, done))
        try:
            return done.result(timeout=self.lock_timeout)
        except FutureTimeout:
            if not done.cancel() and undo is not None:
                self._commands.put((undo, Future()))
            raise TimeoutError(f"replica {self.name}: {what} waited {self.lock_timeout:.0f} s for the engine loop") from None

    def _run_loop(self, build, built: Future) -> None:
        """Builds the engine, then serves it until close. In its own process (`own_process`) this
        is the one thread that runs torch on `threads` threads; every other one runs it on one.
        libgomp spins its idle workers only while the threads in its teams fit the CPUs: with a
        team of Ray's main thread (the model load) beside this one, a one-token step of the 0.5B
        model on 2 CPUs took 0.094 s against 0.084 here (every parallel op waking its workers
        from sleep)."""
        try:
            if self._own_process:
                torch.get_num_threads()  # this thread's OpenMP settings taken from the default (one) now,
                torch.set_num_threads(self.threads)  # then its own; __init__ puts the default back to one
            engine = build()
        except BaseException as e:  # noqa: BLE001 - raised by __init__
            built.set_exception(e)
            return
        built.set_result(engine)
        self._started.wait()
        if self._closing:
            return
        try:
            self._serve_steps()
        finally:
            self._fail_all("replica closed")
            self._refuse_queued_commands()
            swap, self._swap = self._swap, None
            if swap is not None and not swap.done.done():
                swap.done.set_exception(RuntimeError(f"replica {self.name} closed before version {swap.version} "
                                                     "was applied"))

    def _serve_steps(self) -> None:
        while not self._closing:
            idle = (not self.engine.has_work or self.paused) and self._swap is None
            self._run_commands(block=idle, timeout=1.0 if idle else None)
            self._apply_swap_if_due()
            if idle or time.monotonic() - self._status_at >= STATUS_INTERVAL:
                self._publish_status()
            if time.monotonic() - self._orphan_check_at >= 1.0:
                self._orphan_check_at = time.monotonic()
                self._segment_map.drop_if_orphaned()
            if not self.engine.has_work or self.paused:
                continue
            try:
                out = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the requests, keep the replica serving
                log.exception("replica %s: engine step failed", self.name)
                self._fail_all(f"{type(e).__name__}: {e}")
                continue
            if out.finished:  # a caller that has its result sees a status taken after it (not one step older)
                self._publish_status()
            self._emit(out)
            shape = self.engine.drafting.last_choice
            self.metrics.level_set.set(0 if shape is None else len(shape.levels))
            self.metrics.draft_length.set(0 if shape is None else shape.length)
            if not (out.finished or out.started) and not self.engine.scheduler.busy:
                self._run_commands(block=True, timeout=IDLE_WAIT)  # queued work that cannot start yet

    def _refuse_queued_commands(self) -> None:
        while True:
            try:
                _, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                done.set_exception(RuntimeError(f"replica {self.name} is closed"))

    def close(self, timeout: float = 60.0) -> None:
        """Stops the engine loop after its current step (running requests end with Failed,
        queued commands with RuntimeError), waits up to `timeout` for it, and stops the metrics
        server. For in-process owners (tests, benchmarks); a Ray actor ends with its process."""
        self._closing = True
        self._commands.put((lambda: None, Future()))  # wakes a loop waiting for commands
        self._loop.join(timeout)
        if self._loop.is_alive():
            raise TimeoutError(f"replica {self.name}: the engine loop did not stop within {timeout:.0f} s")
        self.metrics.close()

    def _fail_all(self, error: str) -> None:
        """After a failed step: every request ends (slots freed) and its caller gets Failed."""
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            stream = self._streams.pop(rid, None)
            self._token_deltas.pop(rid, None)
            if stream is not None:
                stream.put(Failed(error))

    def _run_commands(self, block: bool, timeout: float | None = None) -> None:
        try:
            item = self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, done = item
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the caller gets it; the loop goes on
                    done.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _emit(self, out: StepOutput) -> None:
        now = time.perf_counter()
        for request in out.started:
            stream = self._streams.get(request.request_id)
            if stream is not None:
                stream.put(Started(request.wall(request.started_at), self.engine.weight_version))
        by_request: dict[str, list[Sequence]] = {}
        for seq in out.finished:
            by_request.setdefault(seq.request.request_id, []).append(seq)
        for rid, seqs in by_request.items():
            self._send_finished(seqs[0].request, seqs, now)
        for rid, deltas in self._token_deltas.items():
            request = self.engine.requests.get(rid)
            if request is not None:
                deltas.add(request.sequences)

    def _send_finished(self, request: Request, seqs: list[Sequence], now: float) -> None:
        """Streams finished sequences (`now`: perf_counter time) and, once the request is done,
        its stats."""
        stream = self._streams.get(request.request_id)
        records = []
        for seq in seqs:
            self.metrics.observe_completion(seq.out)
            first = request.wall(seq.first_token_at or now)
            records.append(dict(completion_to_record(seq.out), finished_at=request.wall(now), first_token_at=first))
        if stream is not None:
            stream.put(Finished(records))
        if request.done:
            s = request.stats
            self.metrics.observe_stats(s)
            if stream is not None:
                stream.put(RequestDone(s.tokens_per_forward, s.acceptance_by_position, s.generated_tokens))
            self._streams.pop(request.request_id, None)
            self._token_deltas.pop(request.request_id, None)

    # ------------------------------------------------------------------ requests
    def generate(self, request_id: str, prompts: list[list[int]], params: dict, expected_version: int,
                 timeout: float = 600.0, rows: list[tuple[int, list[int]]] | None = None,
                 stream_tokens: bool = False):
        """Yields the request's messages (see `messages.py`). If this replica serves an older
        version than `expected_version` (Ray restarted it on the base weights), it yields only
        Stale and generates nothing. Bad input raises ValueError; a full queue LoadError; a
        request_id already in use ValueError (the request using it goes on untouched).
        After `timeout` seconds (the caller's deadline) the request is aborted: TimeoutError.
        `rows`: the caller's (prompt index, sample indices) per prompt (Engine.add_request).
        `stream_tokens`: also Tokens messages, as the steps commit tokens."""
        if self.engine.weight_version < expected_version:
            yield Stale(self.engine.weight_version)
            return
        sampling = SamplingParams(**params)
        stream: queue.Queue = queue.Queue()
        deltas = TokenDeltas(stream)

        def add() -> None:
            # Checked before anything is registered: the stream under this id is another caller's.
            if request_id in self._streams or request_id in self.engine.requests:
                raise ValueError(f"request_id {request_id!r} is already running on replica {self.name}")
            self.engine.check_capacity(len(prompts), sampling.n)
            self.engine.add_request(prompts, sampling, request_id, rows)
            self._streams[request_id] = stream
            if stream_tokens:
                self._token_deltas[request_id] = deltas

        deadline = time.monotonic() + timeout
        self._call(add, f"request {request_id}", undo=lambda: self._drop_request(request_id, stream))
        while True:
            try:
                message = stream.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                # The caller's deadline passed (it has given up too): end the request, and pass on
                # its partial trajectories (finish reason abort) in case anyone still reads.
                self.abort(request_id)
                deadline = time.monotonic() + self.lock_timeout
                timeout = self.lock_timeout
                continue
            if isinstance(message, Failed):
                raise RuntimeError(f"replica {self.name}: {message.error}")
            if message is TOKENS_READY:
                message = deltas.take()
            yield message
            if isinstance(message, RequestDone):
                return

    def _drop_request(self, request_id: str, stream: queue.Queue) -> None:
        """On the loop: ends a request whose caller gave up before it was added (nobody reads it)."""
        if self._streams.get(request_id) is stream:
            self._streams.pop(request_id)
            self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ends the request at the next step boundary (its trajectories come back as abort)."""
        self._commands.put((lambda: self._abort_and_stream(request_id), Future()))
        self.metrics.aborts.inc()

    def _abort_and_stream(self, request_id: str) -> None:
        """On the loop: ends a request's unfinished trajectories and streams them (finish reason abort)."""
        ended = self.engine.abort(request_id)
        if ended:
            self._send_finished(ended[0].request, ended, time.perf_counter())

    def _publish_status(self) -> None:
        """On the loop (and once before it starts): the parts of `status` that walk the engine's
        live queues and dicts, as a snapshot. status() runs on other threads; walking them there
        raced the loop ("deque mutated during iteration")."""
        e = self.engine
        self._status = dict(running_requests=len(e.scheduler.active), running_sequences=len(e.scheduler.running),
                            waiting_sequences=e.scheduler.num_waiting_sequences, free_slots=e.scheduler.slots.num_free,
                            generated_tokens=e.totals.generated_tokens,
                            row_forward_passes=e.totals.row_forward_passes,
                            draft_attempts=list(e.totals.draft_attempts), draft_accepts=list(e.totals.draft_accepts),
                            calibration=dict(e.calibration), **e.drafting.status(),
                            **(e.history.status() if e.history is not None else {}))
        self._status_at = time.monotonic()

    def status(self) -> dict:
        """The loop's latest snapshot (at most STATUS_INTERVAL old while it steps, taken after
        every step that finishes a request and after every command when idle) plus what other
        threads may read directly: version, pause."""
        node = ""
        try:
            import ray
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        except ImportError:
            pass
        e, until = self.engine, self._paused_until
        return dict(self._status, name=self.name, node_id=node, ready=True, weight_version=e.weight_version,
                    **dataclasses.asdict(e.limits),
                    paused=until is not None and time.monotonic() < until, restarts=self.restarts,
                    metrics_address=self.metrics.address, device=self.device, host_id=host_id(), pid=os.getpid(),
                    threads=self.threads,
                    block_size=e.tidar.block_size, levels=list(e.tidar.level_set))

    # ------------------------------------------------------------------ weights
    def stage_weights(self, version: int, tensors: dict[str, torch.Tensor], partial: bool = False,
                      dtype_policy: str | None = None, finite: bool = False) -> int:
        """Verifies a state dict (HF names; with `partial` a subset, the rest keeping its served
        values; tensors or `wire.pack_tensors` values; `finite`: the front end checked the values)
        and keeps it ready for commit. Returns its bytes."""
        self._staged, self._reset_version = None, None  # an older staged version is replaced, never mixed in
        # Object-store values (wire.pack_tensors) are read-only views: nothing can change them.
        owned = all(not isinstance(v, torch.Tensor) for v in tensors.values())
        self._staged = stage_weights(self.engine.model, version, unpack_tensors(tensors), self.device, partial,
                                     dtype_policy or self.weight_dtype_policy, owned=owned and bool(tensors),
                                     finite=finite)
        return self._staged.nbytes

    def stage_from_disk(self, version: int, path: str | None = None, timeout: float = 600.0) -> int:
        """Reads a whole state dict from safetensors at `path` (None: the model directory this
        replica started from, i.e. the base weights), checked header first, and stages it.
        Regular files only; the reads run on their own thread (the engine loop keeps stepping)
        and end with TimeoutError after `timeout` seconds (the update's deadline)."""
        self._staged = None
        tensors = read_weights_from_disk(path if path is not None else self.model_dir, self.engine.model, timeout)
        # The base weights are cast as loading them was; another checkpoint follows the policy.
        nbytes = self.stage_weights(version, tensors, dtype_policy="cast" if path is None else None)
        self._reset_version = version if path is None else None
        return nbytes

    def commit_weights(self, version: int, mode: str = "wait", timeout: float = 600.0) -> int:
        """Swaps the staged weights in between engine steps; every later token carries the new
        version. Modes: see the module docstring. Returns the version once it is served."""
        check_swap_mode(mode)
        if self._staged is None or self._staged.version != version:
            raise RuntimeError(f"no staged weights for version {version} on replica {self.name}")
        started = time.perf_counter()
        done: Future = Future()

        def schedule() -> None:
            pending = self._swap
            if pending is not None and pending.done.set_running_or_notify_cancel():
                # Its staged weights were replaced by this version's: it can never be applied.
                pending.done.set_exception(RuntimeError(f"version {pending.version} was superseded by version "
                                                        f"{version} before it was applied"))
            self._swap = _Swap(version, mode, done)
            if mode == "abort":
                for rid in list(self.engine.scheduler.active):
                    self._abort_and_stream(rid)
            elif mode == "wait":
                self.engine.scheduler.admit_new = False

        self._call(schedule, f"commit of version {version}", undo=lambda: done.cancel())
        try:
            done.result(timeout=timeout)
        except FutureTimeout:
            done.cancel()
            raise TimeoutError(f"replica {self.name}: the running requests did not finish within {timeout} s") from None
        self.metrics.weight_swap_seconds.observe(time.perf_counter() - started)
        return version

    def _apply_swap_if_due(self) -> None:
        """On the loop: applies a pending commit once its mode allows (wait: no started request left)."""
        swap = self._swap
        if swap is None or (swap.mode == "wait" and self.engine.scheduler.active and not self.paused):
            return
        self._swap = None
        self.engine.scheduler.admit_new = True
        if not swap.done.set_running_or_notify_cancel():
            return  # the committer gave up waiting: nothing changes
        staged = self._staged
        if staged is None or staged.version != swap.version:
            swap.done.set_exception(RuntimeError(f"staged weights for version {swap.version} were discarded"))
            return
        if not self._receiving.acquire(blocking=False):  # a newer push is arriving in the kept buffer
            swap.done.set_exception(RuntimeError(f"version {swap.version} was superseded by a push being received"))
            return
        try:
            # A reset (the base weights again) also drops the history store's completions.
            self.engine.load_weights(staged.tensors, staged.version, reset=staged.version == self._reset_version)
        except BaseException as e:  # noqa: BLE001
            swap.done.set_exception(e)
            return
        finally:
            self._receiving.release()
        self._staged, version = None, staged.version
        del staged  # before the committer wakes: the staged memory (a mapped segment, say) is gone by then
        self.metrics.weight_version.set(version)
        log.info("replica %s now serves weight version %d", self.name, version)
        swap.done.set_result(version)

    # ------------------------------------------------------------------ pause / resume
    @property
    def paused(self) -> bool:
        """Paused, and the pause has not timed out (an expired pause is lifted here, logged)."""
        if self._paused_until is None:
            return False
        if time.monotonic() < self._paused_until:
            return True
        self._paused_until = None
        log.warning("replica %s: the pause timed out without a resume; generating again", self.name)
        return False

    def pause(self, mode: str = "keep", timeout: float = 300.0) -> int:
        """Stops taking engine steps from the next step boundary until `resume`, or until
        `timeout` seconds have passed. "abort" also ends the started requests now (their
        trajectories stream back with finish reason abort). Returns the requests ended."""
        check_pause(mode, timeout)

        def apply() -> int:
            self._paused_until = time.monotonic() + timeout
            if mode != "abort":
                return 0
            started = list(self.engine.scheduler.active)
            for rid in started:
                self._abort_and_stream(rid)
            return len(started)

        # A caller told "timed out" believes nothing paused: an apply that ran anyway is lifted.
        ended = self._call(apply, "pause", undo=lambda: setattr(self, "_paused_until", None))
        log.info("replica %s paused (%s, at most %.0f s; %d requests ended)", self.name, mode, timeout, ended)
        return ended

    def resume(self) -> None:
        """Generation goes on from where it stopped (a no-op when not paused)."""
        self._call(lambda: setattr(self, "_paused_until", None), "resume")

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The served weights on the CPU (to bring a restarted replica up to date)."""
        return self._call(lambda: {k: v.detach().cpu().clone() for k, v in self.engine.model.state_dict().items()},
                          "export_weights")

    def weight_fingerprint(self) -> tuple[int, str, str]:
        """(version, `wire.weights_fingerprint` of the served weights, their dtype), computed on the
        loop between steps the first time it is asked for each version."""
        def compute() -> tuple[int, str, str]:
            version = self.engine.weight_version
            if self._fingerprint is None or self._fingerprint[0] != version:
                state = self.engine.model.state_dict()
                self._fingerprint = (version, weights_fingerprint(state.items()),
                                     dtype_name(next(iter(state.values())).dtype))
            return self._fingerprint
        return self._call(compute, "weight_fingerprint")

    def discard_weights(self) -> None:
        self._staged = None
        self._segment_map.drop()  # the push failed: its segment is abandoned, never written again

    # ------------------------------------------------------------------ broadcast transport
    def join_weight_group(self, address: str, port: int, world_size: int, rank: int, backend: str,
                          timeout: float) -> str:
        """Joins the trainer's weight group (see weight_group.py); blocks until all have joined."""
        self._group = make_weight_group(address, port, world_size, rank, backend, timeout)
        self._group_backend, self._group_timeout = backend, timeout
        return backend

    def receive_broadcast(self, version: int, manifest: list, checksum_kind: str = "wsum",
                          bucket_bytes: int = 0) -> int:
        """Receives the tensors of `manifest` ([name, dtype, shape, checksum] in order) broadcast
        from rank 0 in buckets straight into one flat staging buffer (`weight_group.receive_buckets`;
        on the CPU kept from push to push), checking each bucket while the next one travels:
        "xxh3" with the finite check in the same read, "wsum" on the device they landed on (no
        host copy). Then stages them like a gRPC push."""
        if self._group is None:
            raise RuntimeError(f"replica {self.name} is not in a weight group: call InitWeightGroup first")
        device = self.device if self._group_backend == "nccl" else "cpu"
        layout = [(parse_dtype(dtype, name), list(shape)) for name, dtype, shape, _ in manifest]
        buckets = bucket_layout([math.prod(shape) * dtype.itemsize for dtype, shape in layout], bucket_bytes)
        self._staged = None
        bad, nonfinite = [], []
        with self._receiving:  # a swap still copying from the kept buffer finishes first
            staging = self._receive_buffer(bucket_bases(buckets)[1], device)
            tensors = staged_views(buckets, staging, layout)

            def check(k: int) -> None:
                for i, _, _ in buckets[k].items:
                    if checksum_kind == "xxh3" and device == "cpu":
                        digest, finite = digest_and_finite(tensors[i])
                        nonfinite.extend([manifest[i][0]] if not finite else [])
                    else:
                        try:
                            digest = checksum(checksum_kind, tensors[i])
                        except ValueError:
                            digest = None
                    if digest != manifest[i][3]:
                        bad.append(manifest[i][0])
            # Receive every bucket, even after a bad checksum: a replica that left the collective
            # early would leave the trainer and the other replicas blocked until the timeout.
            receive_buckets(self._group, buckets, staging, self._group_timeout, after=check)
        if bad:
            raise WeightMismatchError(f"checksum mismatch after broadcast: {', '.join(bad[:5])}")
        if nonfinite:
            raise WeightMismatchError(f"{nonfinite[0]}: contains NaN or Inf")
        self._staged = stage_weights(self.engine.model, version, {m[0]: t for m, t in zip(manifest, tensors)},
                                     self.device, dtype_policy=self.weight_dtype_policy, owned=True,
                                     finite=checksum_kind == "xxh3" and device == "cpu")  # received here
        return self._staged.nbytes

    def _receive_buffer(self, nbytes: int, device) -> torch.Tensor:
        """The broadcast's staging buffer: on the CPU the same one push after push (its pages stay
        touched); on a GPU a new one each push (device memory the KV cache could use)."""
        if device != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        if self._kept_receive is None or self._kept_receive.numel() != nbytes:
            self._kept_receive = None
            self._kept_receive = torch.empty(nbytes, dtype=torch.uint8)
        return self._kept_receive

    # ------------------------------------------------------------------ same-host transport
    def stage_shared(self, version: int, pid: int, fd: int, size: int, entries: list[SharedEntry],
                     trainer_host: str, checked: bool = False, finite: bool = False) -> int:
        """Maps the trainer's shared-memory segment (see shared_weights.py), checks every tensor's
        XXH3-64 and finite values in one read, and stages views of it: the commit copies them into
        the model. The mapping is kept for the next push from the same file (`KeptMapping`: dropped
        when a push is refused or discarded, or once the file's owner closed it or died). The
        trainer does not write the segment until the push's RPC has returned.
        `checked`: the segment is the gRPC front end's, which checked every checksum as the chunks
        arrived (and every value, with `finite`), so only what it did not check is checked here."""
        self._staged = None
        try:
            self._staged = self._stage_segment(version, pid, fd, size, entries, trainer_host, checked, finite)
        except Exception as e:  # noqa: BLE001 - re-raised as it is
            # Without the frames, whose locals map the segment: a refused push must not keep the
            # trainer's memory mapped until the garbage collector finds the traceback (nor the
            # kept mapping: the trainer abandons a segment whose push failed).
            self._segment_map.drop()
            raise e.with_traceback(None) from None
        return self._staged.nbytes

    def _stage_segment(self, version: int, pid: int, fd: int, size: int, entries: list[SharedEntry],
                       trainer_host: str, checked: bool, finite: bool) -> StagedWeights:
        data = self._segment_map.map(pid, fd, size, trainer_host)
        if not checked:
            check_segment(data, entries)
        # owned: nothing writes the segment before the commit has copied it (the ownership rule)
        return stage_weights(self.engine.model, version, segment_tensors(data, entries), self.device,
                             dtype_policy=self.weight_dtype_policy, owned=True, finite=finite or not checked)

    def load_shared(self, version: int, pid: int, fd: int, size: int, entries: list[SharedEntry],
                    trainer_host: str, finite: bool) -> int:
        """Stage + commit from the gRPC front end's segment (a restarted replica catching up)."""
        self.stage_shared(version, pid, fd, size, entries, trainer_host, checked=True, finite=finite)
        return self.commit_weights(version, "wait")

    def load_weights(self, version: int, tensors: dict[str, torch.Tensor]) -> int:
        """Stage + commit in one call (a restarted replica catching up to the current version)."""
        self.stage_weights(version, tensors)
        return self.commit_weights(version, "wait")


TOKENS_READY = object()  # on a request's queue: TokenDeltas holds tokens to take


class TokenDeltas:
    """The tokens one request's unfinished trajectories committed and its stream has not sent
    yet. The engine loop adds after each step (`add`) and puts one TOKENS_READY on the request's
    queue if none is waiting; the request's thread `take`s everything pending at once. Pending
    is kept as token ranges of the sequences; the lists they index are only ever appended to,
    and a range ends where a finished step left them, so the request's thread reads a complete
    slice while the loop goes on appending."""

    def __init__(self, stream: queue.Queue):
        self.stream = stream
        self.sent: dict[tuple[int, int], int] = {}  # (prompt, sample) -> tokens handed on
        self.pending: dict[tuple[int, int], tuple[Completion, int, int]] = {}
        self.lock = threading.Lock()

    def add(self, seqs: list[Sequence]) -> None:
        with self.lock:
            flagged = bool(self.pending)
            for seq in seqs:
                c = seq.out
                key = (c.prompt_index, c.sample_index)
                if seq.finished or len(c.token_ids) <= self.sent.get(key, 0):
                    continue
                start = self.pending[key][1] if key in self.pending else self.sent.get(key, 0)
                self.pending[key] = (c, start, len(c.token_ids))
                self.sent[key] = len(c.token_ids)
            if self.pending and not flagged:
                self.stream.put(TOKENS_READY)

    def take(self) -> Tokens:
        with self.lock:
            pending, self.pending = self.pending, {}
        records = []
        for c, start, end in pending.values():
            part = Completion(c.prompt_index, c.sample_index, token_ids=c.token_ids[start:end],
                              logprobs=c.logprobs[start:end], behavior_logprobs=c.behavior_logprobs[start:end],
                              from_draft=c.from_draft[start:end], policy_versions=c.policy_versions[start:end],
                              num_forward_passes=c.num_forward_passes, top_token_ids=c.top_token_ids[start:end],
                              top_logprobs=c.top_logprobs[start:end])
            records.append(dict(completion_to_record(part), start=start, finish_reason=""))
        return Tokens(records)


def _actor_restarts() -> int:
    """Ray's restart count of this actor (0 outside Ray or on its first start), from the GCS
    actor table: the constructor runs again on every restart, so it reads the count of this one."""
    try:
        import ray
        if not ray.is_initialized():
            return 0
        context = ray.get_runtime_context()
        actor_id = context.get_actor_id()
        if actor_id is None:
            return 0
        from ray._private.state import actors  # the GCS table; ray.util.state needs the dashboard
        return int(actors(actor_id=actor_id).get("NumRestarts", 0))
    except Exception:  # noqa: BLE001 - a private API: fall back to "restarted or not"
        log.warning("Ray's restart count is unreadable; reporting 1 if this actor was restarted", exc_info=True)
        try:
            with warnings.catch_warnings():  # Ray's own implementation trips its deprecation warning
                warnings.simplefilter("ignore")
                return int(bool(ray.get_runtime_context().was_current_actor_reconstructed))
        except Exception:  # noqa: BLE001
            return 0


def replica_actor_class(num_gpus: float, num_cpus: int = 1, max_concurrency: int = 256):
    """GeneratorReplica as a Ray actor class: restarted by Ray when its process dies. Each
    streaming request holds one of its `max_concurrency` threads while it waits for messages.
    `num_cpus`: the Ray CPUs it holds (RolloutService also passes them as its `threads`)."""
    import ray
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=-1, max_task_retries=0,
                      max_concurrency=max_concurrency)(GeneratorReplica)
