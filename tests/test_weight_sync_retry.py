"""WeightSync against a stub service (no Ray): a push refused because a replica is restarting
(UNAVAILABLE, nothing changed) is sent again by itself within its deadline, and the result
says so; other refusals, and one past the deadline, are raised."""

import grpc
import pytest
import torch

from rollout.v1 import rollout_pb2 as pb
from trainer_bridge.weight_sync import WeightSync

RESTARTING = ("replica rollout-replica-1 is restarting and could not stage version 3; nothing changed, "
              "retry the update")


class Refusal(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class Stub:
    """UpdateWeights / UpdateWeightsFromDisk fail with `refusals` in turn, then succeed."""

    def __init__(self, refusals):
        self.refusals, self.calls = list(refusals), 0

    def _answer(self, request, **kwargs):
        if not isinstance(request, pb.UpdateWeightsFromDiskRequest):
            list(request)  # a real stub consumes the chunk stream
        self.calls += 1
        if self.refusals:
            raise self.refusals.pop(0)
        return pb.UpdateWeightsResponse(version=3, num_tensors=1, num_bytes=16)

    UpdateWeights = UpdateWeightsFromDisk = _answer


class Channel:
    """WeightSync sends gRPC pushes as serialised frames on the channel: they reach the stub too."""

    def __init__(self, stub):
        self.stub = stub

    def stream_unary(self, method, **kwargs):
        return lambda request, **kw: getattr(self.stub, method.rsplit("/", 1)[1])(request, **kw)


class Client:
    token, auth_metadata = "t", (("authorization", "Bearer t"),)

    def __init__(self, stub):
        self.stub, self.channel = stub, Channel(stub)


WEIGHTS = {"w": torch.ones(4)}


def test_a_push_refused_while_a_replica_restarts_is_sent_again_and_the_result_says_so():
    stub = Stub([Refusal(grpc.StatusCode.UNAVAILABLE, RESTARTING)] * 2)
    result = WeightSync(Client(stub), "grpc", restart_retry_seconds=30).push(WEIGHTS)
    assert stub.calls == 3 and result.version == 3
    assert result.retries == 2 and "is restarting" in result.retried_because


def test_updates_from_disk_are_retried_the_same_way():
    stub = Stub([Refusal(grpc.StatusCode.UNAVAILABLE, RESTARTING)])
    result = WeightSync(Client(stub), "grpc", restart_retry_seconds=30).update_from_disk("/ckpt")
    assert stub.calls == 2 and result.retries == 1


def test_other_refusals_are_raised_at_once():
    stub = Stub([Refusal(grpc.StatusCode.INVALID_ARGUMENT, "tensor 'x' is not a weight")])
    with pytest.raises(grpc.RpcError):
        WeightSync(Client(stub), "grpc", restart_retry_seconds=30).push(WEIGHTS)
    assert stub.calls == 1


def test_retrying_stops_at_its_deadline_with_the_refusal():
    stub = Stub([Refusal(grpc.StatusCode.UNAVAILABLE, RESTARTING)] * 100)
    with pytest.raises(grpc.RpcError) as info:
        WeightSync(Client(stub), "grpc", restart_retry_seconds=1.0).push(WEIGHTS)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and 2 <= stub.calls <= 4


def test_auto_falls_back_to_grpc_when_a_replica_cannot_map_the_shared_segment():
    """"auto" picks shared memory when every replica reports this host; a replica that cannot map
    the segment refuses with FAILED_PRECONDITION (nothing changed), and the push goes over gRPC."""
    from rollout.service.shared_weights import host_id

    class SameHost(Stub):
        def GetStatus(self, request, **kwargs):
            return pb.StatusResponse(replicas=[pb.ReplicaStatus(name="r0", host_id=host_id())])

        def UpdateWeightsShared(self, request, **kwargs):
            self.shared = request
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "cannot open the trainer's segment")

    stub = SameHost([])
    sync = WeightSync(Client(stub), restart_retry_seconds=30)
    result = sync.push(WEIGHTS)
    assert stub.shared.tensors[0].name == "w" and stub.calls == 1  # tried shared, then sent by gRPC
    assert result.transport == sync.chosen_transport == "grpc" and result.version == 3
    sync.push(WEIGHTS)
    assert stub.calls == 2  # straight to gRPC
