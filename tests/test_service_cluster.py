"""Multi-node: a Ray cluster of several nodes on this machine; replicas land on different nodes."""

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from service_helpers import CALL_TIMEOUT, ServiceRunner, request  # noqa: E402

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
        for _ in range(2):  # idle replicas take turns
            resp = stub.Generate(request([[2, 3], [4]], max_tokens=8, n=2, seed=1), timeout=CALL_TIMEOUT)
            assert len(resp.trajectories) == 4
            served_by |= {t.replica for t in resp.trajectories}
        assert served_by == {r.name for r in st.replicas}
    finally:
        runner.stop()
