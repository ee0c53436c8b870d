"""RolloutClient: what a trainer imports to get rollouts (sync and asyncio variants).

Trajectories come back as numpy arrays, grouped by prompt (GRPO groups), with everything the
service returns: tokens, target log-probs (the old log-probs of a PPO/GRPO loss), behaviour
log-probs, per-token policy versions, draft flags, finish reason, timings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from rollout.params import SamplingParams
from rollout.v1 import rollout_pb2 as pb
from rollout.v1 import rollout_pb2_grpc as pb_grpc
from rollout.wire import FINISH_NAMES, params_to_proto, trajectory_arrays

DEFAULT_TIMEOUT = 600.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass
class Trajectory:
    prompt_index: int
    sample_index: int
    token_ids: np.ndarray          # int32 [T]
    logprobs: np.ndarray           # float32 [T], log p_target
    behavior_logprobs: np.ndarray  # float32 [T]
    policy_versions: np.ndarray    # int64 [T]
    from_draft: np.ndarray         # bool [T]
    finish_reason: str
    tokens_per_forward: float
    num_forward_passes: int
    timings: dict
    replica: str
    group_id: str
    top_token_ids: np.ndarray      # int32 [T, N]: SamplingParams.logprobs = N most likely ids ([0, 0] if none)
    top_logprobs: np.ndarray       # float32 [T, N], their log-probs under the same policy as `logprobs`

    @classmethod
    def from_proto(cls, t: pb.Trajectory) -> Trajectory:
        return cls(prompt_index=t.prompt_index, sample_index=t.sample_index, **trajectory_arrays(t),
                   finish_reason=FINISH_NAMES.get(t.finish_reason, "error"), tokens_per_forward=t.tokens_per_forward,
                   num_forward_passes=t.num_forward_passes,
                   timings=dict(queue=t.timings.queue_seconds, first_token=t.timings.first_token_seconds,
                                total=t.timings.total_seconds), replica=t.replica, group_id=t.group_id)


@dataclass
class TrajectoryGroup:
    """The n samples of one prompt."""
    prompt_index: int
    prompt: list[int]
    trajectories: list[Trajectory] = field(default_factory=list)


def _request(prompts: Sequence[Sequence[int]], params: SamplingParams, group_id: str, min_policy_version: int,
             wait_for_version: bool, timeout_seconds: float = 0.0) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompts=[pb.Prompt(token_ids=list(p)) for p in prompts], params=params_to_proto(params),
                              group_id=group_id, min_policy_version=min_policy_version,
                              wait_for_version=wait_for_version, timeout_seconds=timeout_seconds)


def _min_version(policy_version: int | None, max_staleness: int | None) -> int:
    """The oldest served version the caller accepts: policy_version - max_staleness."""
    if max_staleness is None or policy_version is None:
        return 0
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    return max(policy_version - max_staleness, 0)


def _group(prompts, trajectories: list[Trajectory]) -> list[TrajectoryGroup]:
    groups = [TrajectoryGroup(i, list(p)) for i, p in enumerate(prompts)]
    for t in sorted(trajectories, key=lambda t: (t.prompt_index, t.sample_index)):
        groups[t.prompt_index].trajectories.append(t)
    return groups


def _channel_args(address: str, tls_root_cert: bytes | None):
    if tls_root_cert is None:
        return dict(target=address, options=CHANNEL_OPTIONS)
    return dict(target=address, credentials=grpc.ssl_channel_credentials(root_certificates=tls_root_cert),
                options=CHANNEL_OPTIONS)


class RolloutClient:
    """Blocking client. `token` authorises weight pushes; `tls_root_cert` enables TLS."""

    def __init__(self, address: str, token: str | None = None, tls_root_cert: bytes | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        args = _channel_args(address, tls_root_cert)
        self.channel = grpc.secure_channel(**args) if tls_root_cert else grpc.insecure_channel(**args)
        self.stub = pb_grpc.RolloutServiceStub(self.channel)
        self.token, self.timeout = token, timeout

    @property
    def auth_metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, group_id: str = "",
                 policy_version: int | None = None, max_staleness: int | None = None, wait: bool = True,
                 timeout: float | None = None) -> list[TrajectoryGroup]:
        """Samples params.n completions per prompt. With `policy_version` and `max_staleness`,
        the service must serve a version >= policy_version - max_staleness: it waits for one
        (`wait`, up to the timeout) or refuses with FAILED_PRECONDITION."""
        req = _request(prompts, params, group_id, _min_version(policy_version, max_staleness), wait)
        resp = self.stub.Generate(req, timeout=timeout or self.timeout)
        return _group(prompts, [Trajectory.from_proto(t) for t in resp.trajectories])

    def generate_stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, group_id: str = "",
                        timeout: float | None = None) -> Iterator[Trajectory]:
        """Each trajectory as soon as it finishes."""
        for t in self.stub.GenerateStream(_request(prompts, params, group_id, 0, False), timeout=timeout or self.timeout):
            yield Trajectory.from_proto(t)

    def status(self, timeout: float | None = None) -> pb.StatusResponse:
        return self.stub.GetStatus(pb.StatusRequest(), timeout=timeout or self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRolloutClient:
    """asyncio variant of RolloutClient (grpc.aio)."""

    def __init__(self, address: str, token: str | None = None, tls_root_cert: bytes | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        args = _channel_args(address, tls_root_cert)
        self.channel = grpc.aio.secure_channel(**args) if tls_root_cert else grpc.aio.insecure_channel(**args)
        self.stub = pb_grpc.RolloutServiceStub(self.channel)
        self.token, self.timeout = token, timeout

    async def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, group_id: str = "",
                       policy_version: int | None = None, max_staleness: int | None = None, wait: bool = True,
                       timeout: float | None = None) -> list[TrajectoryGroup]:
        req = _request(prompts, params, group_id, _min_version(policy_version, max_staleness), wait)
        resp = await self.stub.Generate(req, timeout=timeout or self.timeout)
        return _group(prompts, [Trajectory.from_proto(t) for t in resp.trajectories])

    async def generate_stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                              group_id: str = "", timeout: float | None = None) -> AsyncIterator[Trajectory]:
        async for t in self.stub.GenerateStream(_request(prompts, params, group_id, 0, False),
                                                timeout=timeout or self.timeout):
            yield Trajectory.from_proto(t)

    async def status(self, timeout: float | None = None) -> pb.StatusResponse:
        return await self.stub.GetStatus(pb.StatusRequest(), timeout=timeout or self.timeout)

    async def close(self) -> None:
        await self.channel.close()
