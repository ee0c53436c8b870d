"""Multi-node: a Ray cluster of several nodes on this machine; replicas land on different nodes."""

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from service_helpers import CALL_TIMEOUT, ServiceRunner, request, wait_until  # noqa: E402

from rollout.service.serve import RolloutService  # noqa: E402
from rollout.train.tiny import make_tiny_model  # noqa: E402
from rollout.v1 import rollout_pb2 as pb  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
    c.add_node(num_cpus=2)
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="test-cluster", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_replicas_land_on_different_nodes_and_both_serve(cluster, tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "qwen2", vocab_size=16, block_size=4)
    runner = ServiceRunner(RolloutService(model_dir, replicas=2, port=0, placement_strategy="STRICT_SPREAD"))
    runner.wait_started()
    try:
        stub = runner.stub()
        st = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
        nodes = {r.node_id for r in st.replicas}
        assert len(nodes) == 2 and "" not in nodes
        assert nodes <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        served_by = set()
        for prompt in ([2, p] for p in range(3, 15)):  # prompts have a home replica: these reach both
            resp = stub.Generate(request([prompt, [4]], max_tokens=8, n=2, seed=1), timeout=CALL_TIMEOUT)
            assert len(resp.trajectories) == 4
            served_by |= {t.replica for t in resp.trajectories}
            if len(served_by) == 2:
                break
        assert served_by == {r.name for r in st.replicas}
    finally:
        runner.stop()


def test_a_replica_whose_node_dies_after_a_push_comes_back_at_the_pushed_version_unasked(cluster, tmp_path):
    """Issue 23's two-node case: one push (version 1), then a worker node dies; Ray restarts its
    replica on another node on the base weights. It used to stay `ready False` at version 0 for
    as long as it was watched; the router's supervisor now loads version 1 onto it with no
    request arriving."""
    import torch

    from rollout import Engine
    from rollout.wire import weight_chunks
    model_dir = make_tiny_model(tmp_path / "m", "qwen2", vocab_size=16, block_size=4)
    runner = ServiceRunner(RolloutService(model_dir, replicas=2, port=0, auth_token="t", name="nodes",
                                          placement_strategy="STRICT_SPREAD"))
    runner.wait_started()
    try:
        stub = runner.stub()
        state = {k: v + 0.05 * torch.ones_like(v) for k, v in Engine.from_pretrained(model_dir).model.state_dict().items()}
        resp = stub.UpdateWeights(weight_chunks(state.items(), version=1, num_tensors=len(state)),
                                  timeout=CALL_TIMEOUT, metadata=(("authorization", "Bearer t"),))
        assert resp.version == 1
        st = stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
        victim = next(r for r in st.replicas if r.node_id != cluster.head_node.node_id)
        node = next(n for n in cluster.list_all_nodes() if n.node_id == victim.node_id)
        cluster.remove_node(node, allow_graceful=False)

        def back() -> bool:
            r = {r.name: r for r in stub.GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT).replicas}[victim.name]
            return r.node_id != victim.node_id and r.ready and r.weight_version == 1 and r.restarts >= 1
        wait_until(back, timeout=180, what="the replica restarted on another node and back at version 1")
    finally:
        runner.stop()
