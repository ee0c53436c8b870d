"""Runs a RolloutService on a background event loop so tests can use plain blocking gRPC stubs."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout.service.serve import BackgroundService
from rollout.v1 import rollout_pb2 as pb
from rollout.v1 import rollout_pb2_grpc as pb_grpc

CALL_TIMEOUT = 60


class ServiceRunner(BackgroundService):
    """BackgroundService plus blocking stubs for tests; stop() closes the channels it made
    (a gRPC channel left to the garbage collector at interpreter exit can crash the process)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._open: list = []  # channels and clients handed out, closed by stop()

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address)
        self._open.append(channel)
        return channel

    def client(self, token: str | None = None, **kwargs):
        """A trainer_bridge RolloutClient on this service, closed by stop()."""
        from trainer_bridge.client import RolloutClient

        client = RolloutClient(self.address, token=token, **kwargs)
        self._open.append(client)
        return client

    def stop(self, grace: float = 1.0, timeout: float = 120.0) -> None:
        while self._open:
            self._open.pop().close()
        super().stop(grace, timeout)

    def stub(self) -> pb_grpc.RolloutServiceStub:
        return pb_grpc.RolloutServiceStub(self.channel())

    def health(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT).status


def request(prompts, group_id="", timeout_seconds=0.0, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompts=[pb.Prompt(token_ids=p) for p in prompts],
                              params=pb.SamplingParams(**params), group_id=group_id,
                              timeout_seconds=timeout_seconds)


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    """Polls `condition` (a state check, not a sleep-for-ordering) until true or the timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} did not hold within {timeout} s")

