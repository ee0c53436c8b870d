"""Prometheus metrics of the front end and of each replica (prometheus_client).

Each object owns its own registry and, when given a port (0 = any free port), serves it over
HTTP at /metrics; `address` says where.
"""

from __future__ import annotations

import socket

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from ..engine.drafting import source_summary
from ..engine.sequence import GenerationStats
from ..params import Completion


def _serve(registry: CollectorRegistry, port: int | None, host: str):
    """Serves /metrics on host:port (port 0: any free one); returns (address to scrape, server)."""
    if port is None:
        return "", None
    server, _ = start_http_server(port, addr=host, registry=registry)
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    return f"{shown}:{server.server_port}", server


class _Served:
    """Owns the /metrics HTTP server (if any); close() stops its thread and frees the port."""

    _server = None

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class ReplicaMetrics(_Served):
    def __init__(self, replica: str, port: int | None = None, host: str = "0.0.0.0"):
        self.registry = r = CollectorRegistry()
        self.tokens = Counter("rollout_replica_generated_tokens", "Tokens generated", registry=r)
        self.forwards = Counter("rollout_replica_row_forward_passes", "Forward passes per row, summed", registry=r)
        self.tokens_per_forward = Gauge("rollout_replica_tokens_per_forward", "Tokens per forward, last request",
                                        registry=r)
        self.acceptance = Gauge("rollout_replica_draft_acceptance", "Acceptance rate by draft position, last request",
                                ["position"], registry=r)
        self.level_set = Gauge("rollout_replica_level_set_size",
                               "Pre-draft levels of the last decode step (0: an AR or lookup step)", registry=r)
        self.draft_length = Gauge("rollout_replica_draft_length",
                                  "Draft length of the last decode step (0: an AR step)", registry=r)
        self.source_share = Gauge("rollout_replica_draft_source_share",
                                  "Share of decode row-steps by draft source (model, history, lookup, none), last request",
                                  ["source"], registry=r)
        self.source_acceptance = Gauge("rollout_replica_draft_source_acceptance",
                                       "Share of offered drafts accepted, by draft source, last request", ["source"],
                                       registry=r)
        self.weight_version = Gauge("rollout_replica_weight_version", "Weight version served", registry=r)
        self.weight_swap_seconds = Histogram("rollout_replica_weight_swap_seconds", "Time to swap weights",
                                             registry=r)
        self.aborts = Counter("rollout_replica_aborts", "Abort requests received", registry=r)
        self.restarts = Gauge("rollout_replica_restarted", "Ray's restart count of this replica's actor", registry=r)
        self.finished = Counter("rollout_replica_trajectories", "Finished trajectories", ["finish_reason"],
                                registry=r)
        self.address, self._server = _serve(r, port, host)
        self.replica = replica

    def observe_completion(self, c: Completion) -> None:
        self.finished.labels(c.finish_reason).inc()
        self.tokens.inc(len(c.token_ids))
        self.forwards.inc(c.num_forward_passes)

    def observe_stats(self, s: GenerationStats) -> None:
        self.tokens_per_forward.set(s.tokens_per_forward)
        for i, a in enumerate(s.acceptance_by_position):
            self.acceptance.labels(str(i + 1)).set(a)
        for source, summary in source_summary(s.draft_sources).items():
            self.source_share.labels(source).set(summary["share"])
            self.source_acceptance.labels(source).set(summary["acceptance"])


class FrontendMetrics(_Served):
    def __init__(self, port: int | None = None, host: str = "0.0.0.0"):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("rollout_queue_depth", "Requests admitted and waiting for a replica", registry=r)
        self.running = Gauge("rollout_running_requests", "Requests running on replicas", registry=r)
        self.requests = Counter("rollout_requests", "Requests by gRPC status", ["method", "code"], registry=r)
        self.tokens = Counter("rollout_generated_tokens", "Tokens returned to callers", registry=r)
        self.tokens_per_forward = Gauge("rollout_tokens_per_forward", "Tokens per forward, last request", registry=r)
        self.acceptance = Gauge("rollout_draft_acceptance", "Acceptance rate by draft position, last request",
                                ["position"], registry=r)
        self.weight_version = Gauge("rollout_weight_version", "Current policy version", registry=r)
        self.weight_push_seconds = Histogram("rollout_weight_push_seconds", "UpdateWeights duration", registry=r)
        self.weight_push_bytes = Counter("rollout_weight_push_bytes", "Bytes received by UpdateWeights", registry=r)
        self.retries = Counter("rollout_redispatches", "Requests re-dispatched after a replica failure", registry=r)
        self.replica_restarts = Counter("rollout_replica_failures", "Replica actor deaths seen", registry=r)
        self.catch_ups = Counter("rollout_replica_catch_ups", "Weight loads bringing a restarted (or behind) "
                                 "replica to the current version", registry=r)
        self.ready_replicas = Gauge("rollout_ready_replicas", "Replicas serving the current weight version, "
                                    "at the router's last check", registry=r)
        self.aborts = Counter("rollout_aborts", "Requests aborted (cancel, deadline, shutdown)", registry=r)
        self.address, self._server = _serve(r, port, host)
