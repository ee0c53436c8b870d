"""GeneratorReplica: one engine on one device, hosted as a Ray actor.

Design decisions:
- The class is plain Python (testable without Ray); `replica_actor_class` wraps it with
  `ray.remote` as a threaded actor: one thread runs a request while others can abort it,
  report status or stage weights. A lock makes requests and weight swaps take turns, so a
  request runs on one weight version from start to end (never a mix).
- `generate` is a generator: Ray streams each finished trajectory to the caller as it is
  yielded. Aborting sets a flag the engine polls between steps; the running trajectories come
  back with finish reason "abort" and the tokens they had.
- Weight updates are two-phase: `stage_weights` verifies names, shapes, dtypes and finiteness
  and prepares the tensors; `commit_weights` swaps them in between requests and bumps the
  version. `discard_weights` drops a stage. Nothing changes until commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings

import torch

from ..engine.engine import Engine
from ..params import SamplingParams
from ..wire import completion_to_record, tensor_crc32
from .metrics import ReplicaMetrics
from .weight_group import broadcast, make_weight_group

log = logging.getLogger(__name__)


WEIGHT_SWAP_MODES = ("wait", "abort", "keep")


class WeightMismatchError(ValueError):
    """A pushed state dict does not fit the served model."""


class GeneratorReplica:
    def __init__(self, model_dir: str, name: str, device: str | None = None, dtype: str | None = None,
                 metrics_port: int | None = None, lock_timeout: float = 600.0):
        on_gpu = torch.cuda.is_available()  # true on ROCm builds too (HIP devices)
        self.device = device or ("cuda" if on_gpu else "cpu")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device != "cpu" else torch.float32)
        self.name, self.model_dir = name, model_dir
        self.engine = Engine.from_pretrained(model_dir, device=self.device, dtype=torch_dtype)
        self._lock = threading.Lock()
        self.lock_timeout = lock_timeout
        self._abort: dict[str, threading.Event] = {}
        self._running: set[str] = set()
        self._staged: tuple[int, dict[str, torch.Tensor]] | None = None
        self._pending_swap: int | None = None
        self._group, self._group_backend, self._group_timeout = None, "", 300.0
        self.restarts = _actor_restarts()
        port = metrics_port if metrics_port is not None else int(os.environ.get("ROLLOUT_REPLICA_METRICS_PORT", "0"))
        self.metrics = ReplicaMetrics(name, port)
        self.metrics.weight_version.set(0)
        self.metrics.restarts.set(self.restarts)
        log.info("replica %s ready on %s (%s), restarts=%d", name, self.device, torch_dtype, self.restarts)

    @contextlib.contextmanager
    def _hold(self, what: str):
        """The engine lock, waited for at most `lock_timeout` seconds."""
        if not self._lock.acquire(timeout=self.lock_timeout):
            raise TimeoutError(f"replica {self.name}: {what} waited {self.lock_timeout:.0f} s for the engine")
        try:
            yield
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ requests
    def generate(self, request_id: str, prompts: list[list[int]], params: dict, expected_version: int):
        """Yields, per engine step that finished trajectories, {"records": [...]}; then a final
        {"stats": ...} record.
        If this replica does not serve `expected_version` (e.g. Ray restarted it on the base
        weights), it yields only {"stale": its version} and generates nothing."""
        sampling = SamplingParams(**params)
        abort = self._abort.setdefault(request_id, threading.Event())
        try:
            with self._hold(f"request {request_id}"):
                if abort.is_set():
                    return
                if self.engine.weight_version != expected_version:
                    yield {"stale": self.engine.weight_version}
                    return
                self._running.add(request_id)
                yield {"started": time.time(), "weight_version": self.engine.weight_version}
                first_token_at = []
                for finished in self.engine.generate_steps(
                        prompts, sampling, should_abort=abort.is_set,
                        on_first_token=lambda: first_token_at.append(time.time()),
                        between_steps=self._swap_if_pending):
                    now = time.time()
                    records = []
                    for c in finished:
                        self.metrics.observe_completion(c)
                        records.append(dict(completion_to_record(c), finished_at=now,
                                            first_token_at=first_token_at[0] if first_token_at else now))
                    yield {"records": records}
                stats = self.engine.last_stats
                self.metrics.observe_stats(stats)
                yield {"stats": dict(tokens_per_forward=stats.tokens_per_forward,
                                     acceptance_by_position=stats.acceptance_by_position,
                                     generated_tokens=stats.generated_tokens)}
        finally:
            self._running.discard(request_id)
            self._abort.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._abort.setdefault(request_id, threading.Event()).set()
        self.metrics.aborts.inc()

    def status(self) -> dict:
        node = ""
        try:
            import ray
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        except ImportError:
            pass
        return dict(name=self.name, node_id=node, ready=True, weight_version=self.engine.weight_version,
                    running_requests=len(self._running), restarts=self.restarts,
                    metrics_address=self.metrics.address, device=self.device,
                    block_size=self.engine.tidar.block_size, levels=list(self.engine.tidar.level_set))

    # ------------------------------------------------------------------ weights
    def stage_weights(self, version: int, tensors: dict[str, torch.Tensor]) -> int:
        """Verifies a full state dict (HF names) and keeps it ready for commit. Returns its bytes."""
        model = self.engine.model
        expected = model.weight_names_and_shapes()
        if model.config.tie_word_embeddings:  # a trainer may send the tied head too: it is the embedding
            tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise WeightMismatchError(f"weight names differ from the model: missing {missing[:5]}, "
                                      f"unexpected {extra[:5]}")
        staged, nbytes, params = {}, 0, model.state_dict()
        for name, t in tensors.items():
            if t.shape != expected[name]:
                raise WeightMismatchError(f"{name}: shape {list(t.shape)}, the model has {list(expected[name])}")
            if not t.is_floating_point():
                raise WeightMismatchError(f"{name}: dtype {t.dtype} is not a floating-point type")
            # amax/amin propagate NaN and expose +-inf: two reductions, no boolean copy of t.
            if t.numel() and not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
                raise WeightMismatchError(f"{name}: contains NaN or Inf")
            staged[name] = t.to(device=self.device, dtype=params[name].dtype)
            nbytes += t.numel() * t.element_size()
        self._staged = (version, staged)
        return nbytes

    def commit_weights(self, version: int, mode: str = "wait", timeout: float = 600.0) -> int:
        """Swaps the staged weights in; every later token carries the new version.

        mode "wait": after the running request finishes (it ends on the old weights);
        "abort": the running request stops at its next step and returns its partial
            trajectories (finish reason abort), then the swap;
        "keep": at the running request's next step boundary; it continues on the new weights
            (its K/V recomputed), each token tagged with the version that sampled it.
        """
        if mode not in WEIGHT_SWAP_MODES:
            raise ValueError(f"mode must be one of {', '.join(WEIGHT_SWAP_MODES)}, got {mode!r}")
        if self._staged is None or self._staged[0] != version:
            raise RuntimeError(f"no staged weights for version {version} on replica {self.name}")
        started = time.perf_counter()
        if mode == "abort":
            for request_id in list(self._running):
                self._abort.setdefault(request_id, threading.Event()).set()
        if mode == "keep":
            self._pending_swap = version
        deadline = time.monotonic() + timeout
        while not self._lock.acquire(timeout=0.05):
            if mode == "keep" and self.engine.weight_version == version:
                break  # the running request swapped at a step boundary
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.name}: the running request did not yield within {timeout} s")
        else:
            try:
                if self._staged is not None and self._staged[0] == version:
                    self._swap()
            finally:
                self._lock.release()
        self.metrics.weight_swap_seconds.observe(time.perf_counter() - started)
        return version

    def _swap(self) -> bool:
        """Copies the staged tensors into the model (caller holds the lock or runs the request)."""
        if self._staged is None:
            return False
        version, staged = self._staged
        params = self.engine.model.state_dict()
        with torch.no_grad():
            for name, t in staged.items():
                params[name].copy_(t)
        self.engine.weight_version = version
        self._staged, self._pending_swap = None, None
        self.metrics.weight_version.set(version)
        log.info("replica %s now serves weight version %d", self.name, version)
        return True

    def _swap_if_pending(self) -> bool:
        """Between-steps hook of a running request: applies a "keep"-mode commit."""
        return self._pending_swap is not None and self._swap()

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The served weights on the CPU (to bring a restarted replica up to date)."""
        with self._hold("export_weights"):
            return {k: v.detach().cpu().clone() for k, v in self.engine.model.state_dict().items()}

    def discard_weights(self) -> None:
        self._staged = None

    # ------------------------------------------------------------------ broadcast transport
    def join_weight_group(self, address: str, port: int, world_size: int, rank: int, backend: str,
                          timeout: float) -> str:
        """Joins the trainer's weight group (see weight_group.py); blocks until all have joined."""
        self._group = make_weight_group(address, port, world_size, rank, backend, timeout)
        self._group_backend, self._group_timeout = backend, timeout
        return backend

    def receive_broadcast(self, version: int, manifest: list) -> int:
        """Receives the tensors of `manifest` ([name, dtype, shape, crc32] in order) broadcast
        from rank 0, checks each crc32, then stages them like a gRPC push."""
        if self._group is None:
            raise RuntimeError(f"replica {self.name} is not in a weight group: call InitWeightGroup first")
        device = self.device if self._group_backend == "nccl" else "cpu"
        tensors = {}
        for name, dtype, shape, crc in manifest:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            broadcast(self._group, t, self._group_timeout)
            t = t.cpu()
            if tensor_crc32(t) != crc:
                raise WeightMismatchError(f"{name}: checksum mismatch after broadcast")
            tensors[name] = t
        return self.stage_weights(version, tensors)

    def load_weights(self, version: int, tensors: dict[str, torch.Tensor]) -> int:
        """Stage + commit in one call (a restarted replica catching up to the current version)."""
        self.stage_weights(version, tensors)
        return self.commit_weights(version, "wait")


def _actor_restarts() -> int:
    """1 if Ray restarted this actor's process (its constructor runs again), else 0."""
    try:
        import ray
        with warnings.catch_warnings():  # Ray's own implementation trips its deprecation warning
            warnings.simplefilter("ignore")
            if ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed:
                return 1
    except (ImportError, AttributeError, RuntimeError):
        pass
    return 0


def replica_actor_class(num_gpus: float):
    """GeneratorReplica as a Ray actor class: restarted by Ray when its process dies."""
    import ray
    return ray.remote(num_gpus=num_gpus, num_cpus=1, max_restarts=-1, max_task_retries=0,
                      max_concurrency=16)(GeneratorReplica)
