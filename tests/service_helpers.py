"""Runs a RolloutService on a background event loop so tests can use plain blocking gRPC stubs."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout.serve import RolloutService
from rollout.v1 import rollout_pb2 as pb
from rollout.v1 import rollout_pb2_grpc as pb_grpc
from rollout.wire import trajectory_arrays

CALL_TIMEOUT = 60


class ServiceRunner:
    def __init__(self, service: RolloutService):
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.start_future = asyncio.run_coroutine_threadsafe(service.start(), self.loop)

    def wait_started(self, timeout: float = 180) -> int:
        return self.start_future.result(timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"localhost:{self.service.port}")

    def stub(self) -> pb_grpc.RolloutServiceStub:
        return pb_grpc.RolloutServiceStub(self.channel())

    def health(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status

    def stop(self, grace: float = 1.0) -> None:
        if not self.start_future.done():
            self.start_future.cancel()
        asyncio.run_coroutine_threadsafe(self.service.stop(grace), self.loop).result(CALL_TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT)


def request(prompts, group_id="", timeout_seconds=0.0, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompts=[pb.Prompt(token_ids=p) for p in prompts],
                              params=pb.SamplingParams(**params), group_id=group_id,
                              timeout_seconds=timeout_seconds)


def arrays(t: pb.Trajectory) -> dict:
    return trajectory_arrays(t)


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    """Polls `condition` (a state check, not a sleep-for-ordering) until true or the timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} did not hold within {timeout} s")


def as_numpy(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)
