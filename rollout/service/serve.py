"""`rollout serve`: the rollout service on a Ray cluster.

    python -m rollout serve [--model DIR] --replicas N --port P [--http-port H] [--address auto|ray://HOST:10001]

Joins a running Ray cluster (`--address auto` or a ray:// address) or starts a local one,
places one GeneratorReplica per GPU (one per CPU slot when the cluster has no GPUs) with a
placement group that spreads them over nodes, and serves gRPC (and, with --http-port, vLLM's
HTTP routes on the same router). Without --model it serves the embedded model. SIGTERM / SIGINT: health goes
NOT_SERVING, no new RPCs are admitted, in-flight ones get `--grace` seconds to finish (then they
are cancelled and their replica work aborted), and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import threading
import time
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config import ATTENTION_PATHS, EngineConfig, load_tidar_config
from ..model.loader import read_model_config
from .metrics import FrontendMetrics
from .replica import replica_actor_class
from .router import Router
from .http import HttpFrontend, start_http, stop_http
from .servicer import RolloutServicer, set_serving, start_server
from .weights import DTYPE_POLICIES, check_dtype_policy

log = logging.getLogger(__name__)
DEFAULT_MODEL = Path(__file__).parents[1] / "default_model"
RAY_START_ATTEMPTS = 3


def init_ray(attempts: int = RAY_START_ATTEMPTS, **kwargs) -> None:
    """`ray.init(**kwargs)`, tried again after a failed start.

    Ray waits a fixed 30 s for a new raylet to register with the GCS; on a loaded machine (a
    2-core CI box between test modules) that start can miss the window and raise, though a
    second start succeeds. Each failed try is shut down before the next; the last error is raised.
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # ray raises a bare Exception when the node misses its start window
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("ray.init failed (try %d of %d): %s; starting again", attempt, attempts, e)
            time.sleep(1.0)


MALLOC_OPTIONS = {  # glibc mallopt: option number, value
    "M_MMAP_THRESHOLD": (-3, 32 << 20),  # glibc <= 2.34 refuses more than HEAP_MAX_SIZE / 2 (32 MiB)
    "M_TRIM_THRESHOLD": (-1, 1 << 30),
    "M_TOP_PAD": (-2, 32 << 20),
}


def keep_freed_memory() -> list[str]:
    """glibc malloc in the front end's process: blocks up to 32 MiB come from the heap, and up to
    1 GiB freed at its top stays mapped (MALLOC_OPTIONS). A gRPC weight push receives 1 GB as 2
    MiB messages; with glibc's adaptive defaults each was at times a fresh mmap (and the 512
    page faults of writing it), so the same push took this process 0.63-1.4 s of CPU. Returns
    the options the C library refused, each option being set on its own (all of them where the C
    library is not glibc: nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return list(MALLOC_OPTIONS)
    return [name for name, (option, value) in MALLOC_OPTIONS.items() if mallopt(option, value) != 1]


def default_cpus_per_replica(replicas: int, own_cluster: bool, gpus: float | None) -> int:
    """On a CPU-only Ray instance this process started (`rollout serve` without --address: the
    machine is the service's), each replica gets an equal share of its CPUs, so a replica's
    forward and its weight copies use the machine (one CPU each, Ray's default, left a 2-core
    machine's second core idle: a one-token step took 0.18 s on one thread, 0.10 on two).
    Otherwise one: a GPU replica's host work is one thread, and a shared cluster's CPUs are
    not ours to take."""
    if not own_cluster or (gpus if gpus is not None else ray.cluster_resources().get("GPU", 0)) > 0:
        return 1
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, replicas))


class RolloutService:
    """Replicas + router + gRPC server, started and stopped as one unit (tests use it directly)."""

    def __init__(self, model_dir: str | Path, replicas: int = 1, port: int = 50051, host: str = "[::]",
                 auth_token: str | None = None, tls: tuple[bytes, bytes] | None = None,
                 metrics_port: int | None = None, max_queue: int = 256, request_timeout: float = 600.0,
                 ready_timeout: float = 600.0, placement_strategy: str = "SPREAD",
                 gpus_per_replica: float | None = None, replica_metrics_port: int | None = None,
                 name: str = "rollout", dtype: str | None = None, engine_config: EngineConfig | None = None,
                 http_port: int | None = None, metrics_host: str | None = None,
                 require_auth_for_generate: bool = False, weight_dtype_policy: str = "strict",
                 served_model_names: list[str] | None = None, trust_request_chat_template: bool = False,
                 cpus_per_replica: int = 1):
        check_dtype_policy(weight_dtype_policy)
        if not isinstance(cpus_per_replica, int) or cpus_per_replica < 1:
            raise ValueError(f"cpus_per_replica must be a whole number >= 1, got {cpus_per_replica!r}")
        self.model_dir = str(Path(model_dir).resolve())
        _, hf_cfg, self.config = read_model_config(self.model_dir)
        self.tidar = load_tidar_config(Path(self.model_dir), hf_cfg, None, None)
        self.num_replicas, self.port, self.host, self.auth_token, self.tls = replicas, port, host, auth_token, tls
        self.metrics_port, self.max_queue, self.request_timeout = metrics_port, max_queue, request_timeout
        self.ready_timeout, self.placement_strategy = ready_timeout, placement_strategy
        self.gpus_per_replica, self.replica_metrics_port = gpus_per_replica, replica_metrics_port
        # Ray CPUs each replica holds, and its engine loop's torch threads (GeneratorReplica `threads`).
        self.cpus_per_replica = cpus_per_replica
        self.name = name  # prefix of the replica actor names (unique per Ray namespace)
        self.dtype = dtype  # replica weight dtype; None: bfloat16 on GPUs, float32 on CPUs
        self.engine_config = engine_config or EngineConfig()  # each replica's KV pool and scheduling
        self.http_port = http_port  # None: no HTTP front end; 0: any free port (the bound one after start)
        # Metrics listen where the service does unless told otherwise ("[::1]" -> "::1").
        self.metrics_host = metrics_host or ("0.0.0.0" if host in ("[::]", "0.0.0.0", "") else host.strip("[]"))
        self.require_auth_for_generate = require_auth_for_generate  # every RPC and route needs the token
        self.weight_dtype_policy = weight_dtype_policy  # weights.check_dtype: "strict" or "cast"
        self.served_model_names = served_model_names  # HTTP `model` names; None: the model directory's name
        self.trust_request_chat_template = trust_request_chat_template  # HTTP: render a request's chat_template
        self.server = self.health = self.router = self.pg = self.http = self._supervisor = None
        self.actors: list = []

    async def _place_replicas(self) -> None:
        gpus = self.gpus_per_replica
        if gpus is None:  # a cluster with GPUs gets one replica per GPU (placement waits for them)
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        bundle = {"CPU": float(self.cpus_per_replica), **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([bundle] * self.num_replicas, strategy=self.placement_strategy)
        try:
            await asyncio.wait_for(self.pg.ready(), self.ready_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"Ray could not place {self.num_replicas} replicas of {bundle} "
                               f"({self.placement_strategy}) within {self.ready_timeout:.0f} s") from None
        # Every streaming request holds an actor thread while it waits: room for what the router admits.
        cls = replica_actor_class(gpus, self.cpus_per_replica, max_concurrency=self.max_queue + 32)
        for i in range(self.num_replicas):
            name = f"{self.name}-replica-{i}"
            self.actors.append(cls.options(
                name=name, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i)
            ).remote(self.model_dir, name, dtype=self.dtype, metrics_port=self.replica_metrics_port,
                     engine_config=self.engine_config, metrics_host=self.metrics_host,
                     weight_dtype_policy=self.weight_dtype_policy, own_process=True,
                     threads=self.cpus_per_replica))
            self.router.add_replica(self.actors[-1], name)

    async def start(self) -> int:
        """Starts the server (health NOT_SERVING), then the replicas; health turns SERVING once
        every replica has answered. Returns the bound gRPC port."""
        metrics = FrontendMetrics(self.metrics_port, self.metrics_host)
        self.metrics_address = metrics.address
        self.router = Router(metrics, max_queue=self.max_queue, request_timeout=self.request_timeout)
        servicer = RolloutServicer(self.router, self.config, self.tidar, Path(self.model_dir).name,
                                   self.auth_token, metrics, self.require_auth_for_generate)
        self.server, self.health, self.port = await start_server(servicer, self.port, self.host, self.tls)
        if self.http_port is not None:
            self.http = HttpFrontend(self.router, self.config, self.tidar, self.model_dir, metrics,
                                     self.auth_token if self.require_auth_for_generate else None,
                                     updates=servicer.updates, auth_token=self.auth_token,
                                     served_model_names=self.served_model_names,
                                     trust_request_chat_template=self.trust_request_chat_template)
            self._http_server, self._http_task, self.http_port = await start_http(self.http, self.http_port, self.host)
        await self._place_replicas()
        await self.router.wait_ready(self.ready_timeout)
        self._supervisor = asyncio.get_running_loop().create_task(self.router.supervise())
        await set_serving(self.health, True)
        if self.http is not None:
            self.http.ready = True
            log.info("serving vLLM-compatible HTTP on port %d", self.http_port)
        log.info("serving %s on port %d with %d replicas", self.model_dir, self.port, self.num_replicas)
        return self.port

    async def stop(self, grace: float = 30.0) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        if self.health is not None:
            await set_serving(self.health, False)
        stopping = []
        if self.server is not None:
            stopping.append(self.server.stop(grace))
        if self.http is not None:
            self.http.ready = False
            stopping.append(stop_http(self._http_server, self._http_task, grace))
            self.http = None
        await asyncio.gather(*stopping)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.actors, self.pg = [], None
        if self.router is not None:
            self.router.close_segments()
            self.router.metrics.close()


class BackgroundService:
    """Runs a RolloutService on its own event-loop thread, for blocking callers (a trainer
    script that hosts the service in-process, tests)."""

    def __init__(self, service: RolloutService, start_timeout: float = 600.0):
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rollout-service", daemon=True)
        self.thread.start()
        self.start_future = asyncio.run_coroutine_threadsafe(service.start(), self.loop)
        self.start_timeout = start_timeout

    def wait_started(self, timeout: float | None = None) -> int:
        """Blocks until every replica is ready; returns the gRPC port."""
        return self.start_future.result(timeout or self.start_timeout)

    @property
    def address(self) -> str:
        return f"localhost:{self.service.port}"

    def stop(self, grace: float = 1.0, timeout: float = 120.0) -> None:
        if not self.start_future.done():
            self.start_future.cancel()
        asyncio.run_coroutine_threadsafe(self.service.stop(grace), self.loop).result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)


async def _serve_until_signal(service: RolloutService, grace: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    await stop.wait()
    log.info("signal received: draining for up to %.0f s", grace)
    await service.stop(grace)


def main_serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rollout serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="model directory (HF files + tidar_config.json; default: the embedded model)")
    p.add_argument("--replicas", type=int, default=1, help="generator replicas (one per GPU)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve vLLM's HTTP routes (/v1/completions, /v1/chat/completions, ...) on this port")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names an HTTP request's 'model' may give (the first is reported by /v1/models); other "
                        "names are a 404, as vLLM (default: the model directory's name)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="HTTP chat: render a 'chat_template' sent in the request (a template is a program; "
                        "rendering is bounded in time and size either way); default: such requests are a 400")
    p.add_argument("--host", default="[::]", help="address to bind")
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' (running cluster), 'ray://HOST:10001', or omit for a local one")
    p.add_argument("--auth-token-file", type=Path,
                   help="file holding the bearer token for weight updates and pause / resume (gRPC and HTTP)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus port of the front end")
    p.add_argument("--replica-metrics-port", type=int, default=None,
                   help="Prometheus port on each replica (default: any free port, see GetStatus)")
    p.add_argument("--metrics-host", default=None,
                   help="address the Prometheus endpoints bind (default: --host, 0.0.0.0 for [::])")
    p.add_argument("--require-auth-for-generate", action="store_true",
                   help="with --auth-token-file: every RPC and HTTP route (generation and status too, not "
                        "health) needs 'authorization: Bearer <token>'; default: only weight updates do")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests in flight beyond one per replica; more are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="KV slots per replica = sequences decoded at once (default: from memory, at most 256)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + max_tokens per sequence (default: the model's context)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV pool budget per replica (default: 1 GiB on CPUs, --gpu-memory-utilization on GPUs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of free GPU memory the KV pool may take when --kv-cache-gib is not set")
    p.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="prompt tokens per prefill step (longer prompts are prefilled in chunks)")
    p.add_argument("--drafting", default="auto", choices=["auto", "fixed"],
                   help="auto: each decode step takes an AR step or some pre-draft levels, whichever gives more "
                        "tokens/s (exact either way); fixed: always every level (tokens reproducible per seed)")
    p.add_argument("--no-lookup-drafts", dest="lookup_drafts", action="store_false",
                   help="with auto drafting: never take verify-only steps over lookup drafts (tokens that "
                        "followed an earlier occurrence of a row's last few tokens; lossless rows only)")
    p.add_argument("--history-mib", type=float, default=256.0,
                   help="with auto drafting: memory of each replica's history store (per prompt, the completions of "
                        "its recent rollouts, drafts when the prompt is rolled out again; 0: no history drafts)")
    p.add_argument("--cost-model", default="calibrated", choices=["calibrated", "flat"],
                   help="with auto drafting: calibrated prices each step shape by this device's measured costs; "
                        "flat is a what-if pricing every shape like an AR step (a GPU's memory-bound regime), to "
                        "measure draft quality; the output distribution is the same either way")
    p.add_argument("--calibration-seconds", type=float, default=10.0,
                   help="with auto drafting: seconds of timed steps in each replica's start-up step-cost "
                        "calibration, after a warm-up (0: none; the cost model then learns from live steps only)")
    p.add_argument("--calibration-cache", default=str(Path.home() / ".cache" / "tidar-rollout" / "step_costs.json"),
                   help="JSON file of measured step costs per device, model shape and dtype; a hit skips the "
                        "calibration ('' : no cache)")
    p.add_argument("--attention", default="dense", choices=list(ATTENTION_PATHS),
                   help="dense: one masked SDPA (the reference); split: prefix through FlexAttention by lengths, "
                        "merged by log-sum-exp (for long contexts on a GPU); triton: as split, the prefix by a "
                        "split-KV Triton kernel (needs triton on a CUDA / ROCm GPU)")
    p.add_argument("--compile", action="store_true",
                   help="run each replica's model forward and step sampling through torch.compile "
                        "(default: eager); auto drafting then keeps to the calibrated step shapes")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture decode forwards as CUDA / HIP graphs at bucketed static shapes and replay them "
                        "(needs --attention dense or triton; exclusive with --compile)")
    p.add_argument("--max-sequences-per-request", type=int, default=None,
                   help="prompts x n one request may ask for (default: 8 x the KV pool's slots)")
    p.add_argument("--max-waiting-sequences", type=int, default=None,
                   help="sequences queued on a replica before new requests are refused as load "
                        "(default: 32 x the KV pool's slots)")
    p.add_argument("--max-running-requests", type=int, default=None,
                   help="requests a replica runs at once (default: as many as its KV pool holds; 1 = serial)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="deadline of requests that set none (s)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="time allowed for replicas to load (s)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight RPCs get at shutdown")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs each replica asks Ray for (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="replica weight dtype (default: bfloat16 on GPUs, float32 on CPUs)")
    p.add_argument("--weight-dtype-policy", default="strict", choices=list(DTYPE_POLICIES),
                   help="strict: pushed tensors must be in the served dtype or wider (float32 to a bfloat16 replica); "
                        "cast: any floating-point dtype is cast to the served one")
    p.add_argument("--cpus-per-replica", type=int, default=None,
                   help="Ray CPUs each replica holds, and its torch threads (default: 1 on a cluster with GPUs or one "
                        "joined by --address; on this machine without GPUs, its CPUs shared among the replicas)")
    p.add_argument("--placement", default="SPREAD", choices=["SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK"],
                   help="placement-group strategy for the replicas")
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if args.cpus_per_replica is not None and args.cpus_per_replica < 1:
        p.error(f"--cpus-per-replica must be >= 1, got {args.cpus_per_replica}")
    if not os.environ.get("ROLLOUT_NO_MALLOPT") and (refused := keep_freed_memory()):
        log.warning("malloc refused %s: gRPC weight pushes may fault in fresh pages", ", ".join(refused))
    token = args.auth_token_file.read_text().strip() if args.auth_token_file else None
    if token is None:
        log.warning("no --auth-token-file: weight updates and pause / resume will refuse every call")
    tls = (args.tls_cert.read_bytes(), args.tls_key.read_bytes()) if args.tls_cert else None
    if args.address is None:
        # Ray starts its workers at niceness 15; the replicas are this service's whole work
        # (generation, weight pushes), and beside a trainer or anything else busy on the node
        # they got a sliver of the CPU (a push to them ran several times slower than in-process).
        os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(address=args.address, namespace="tidar-rollout")
    cpus = args.cpus_per_replica
    if cpus is None:
        cpus = default_cpus_per_replica(args.replicas, own_cluster=args.address is None,
                                        gpus=args.gpus_per_replica)
    service = RolloutService(args.model, args.replicas, args.port, args.host, token, tls, args.metrics_port,
                             args.max_queue, args.request_timeout, args.ready_timeout, args.placement,
                             gpus_per_replica=args.gpus_per_replica, replica_metrics_port=args.replica_metrics_port,
                             dtype=args.dtype, engine_config=EngineConfig(
                                 max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                 kv_cache_gib=args.kv_cache_gib, gpu_memory_utilization=args.gpu_memory_utilization,
                                 max_prefill_tokens=args.max_prefill_tokens,
                                 max_running_requests=args.max_running_requests, drafting=args.drafting,
                                 lookup_drafts=args.lookup_drafts, cost_model=args.cost_model,
                                 history_mib=args.history_mib,
                                 max_sequences_per_request=args.max_sequences_per_request,
                                 max_waiting_sequences=args.max_waiting_sequences,
                                 attention=args.attention, compile=args.compile,
                                 cuda_graphs=args.cuda_graphs,
                                 calibration_seconds=args.calibration_seconds,
                                 calibration_cache=args.calibration_cache or None), http_port=args.http_port,
                             metrics_host=args.metrics_host, require_auth_for_generate=args.require_auth_for_generate,
                             weight_dtype_policy=args.weight_dtype_policy, served_model_names=args.served_model_name,
                             trust_request_chat_template=args.trust_request_chat_template,
                             cpus_per_replica=cpus)
    log.info("each replica holds %d CPU(s) (--cpus-per-replica)", cpus)
    try:
        asyncio.run(_serve_until_signal(service, args.grace))
    finally:
        ray.shutdown()
    return 0
