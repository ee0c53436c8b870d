"""`python -m rollout serve` as a user runs it: TLS, a real client, then SIGTERM and a clean exit."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("ray")

from service_helpers import CALL_TIMEOUT, request, wait_until  # noqa: E402

from rollout.train.tiny import make_tiny_model  # noqa: E402
from rollout.v1 import rollout_pb2 as pb  # noqa: E402
from rollout.v1 import rollout_pb2_grpc as pb_grpc  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def self_signed_cert(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_serve_with_tls_answers_then_exits_cleanly_on_sigterm(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m", "qwen2", vocab_size=16, block_size=4)
    cert, key = self_signed_cert(tmp_path)
    (tmp_path / "token").write_text("tok\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout", "serve", "--model", str(model_dir), "--replicas", "1", "--port", str(port),
         "--host", "localhost", "--metrics-port", "0", "--auth-token-file", str(tmp_path / "token"),
         "--tls-cert", str(cert), "--tls-key", str(key), "--grace", "5", "--max-sequences-per-request", "3",
         "--weight-dtype-policy", "cast", "--calibration-seconds", "5",
         "--calibration-cache", str(tmp_path / "step_costs.json"), "--cpus-per-replica", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel = grpc.secure_channel(f"localhost:{port}", creds)
        health = health_pb2_grpc.HealthStub(channel)

        def serving():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False
        wait_until(serving, timeout=240, what="the server reporting SERVING")
        resp = pb_grpc.RolloutServiceStub(channel).Generate(request([[2, 3]], max_tokens=6, seed=0),
                                                            timeout=CALL_TIMEOUT)
        assert len(resp.trajectories) == 1
        status = pb_grpc.RolloutServiceStub(channel).GetStatus(pb.StatusRequest(), timeout=CALL_TIMEOUT)
        assert status.replicas[0].threads == 2  # --cpus-per-replica: Ray's CPUs, so torch's threads
        costs = json.loads((tmp_path / "step_costs.json").read_text())  # the replica calibrated its step costs
        assert len(costs) == 1 and len(next(iter(costs.values()))) > 0
        with pytest.raises(grpc.RpcError) as refused:  # --max-sequences-per-request reaches the replicas' limits
            pb_grpc.RolloutServiceStub(channel).Generate(request([[2, 3], [4, 5]], max_tokens=6, n=2),
                                                         timeout=CALL_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "2 prompts x n=2 = 4 sequences exceeds" in refused.value.details()
        with pytest.raises(grpc.RpcError), grpc.insecure_channel(f"localhost:{port}") as plain:
            pb_grpc.RolloutServiceStub(plain).GetStatus(pb.StatusRequest(), timeout=5)  # refused on a TLS port
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_init_ray_starts_again_after_a_missed_start_window_and_gives_up_after_the_last_try(monkeypatch):
    import ray

    from rollout.service import serve

    calls = []

    def flaky_init(**kwargs):
        calls.append(("init", kwargs))
        if sum(c[0] == "init" for c in calls) < 3:
            raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", None)))
    monkeypatch.setattr(serve.time, "sleep", lambda s: None)
    serve.init_ray(attempts=3, namespace="x")
    assert [c[0] for c in calls] == ["init", "shutdown", "init", "shutdown", "init"]
    assert all(c[1] == {"namespace": "x"} for c in calls if c[0] == "init")

    calls.clear()
    with pytest.raises(Exception, match="timed out during startup"):
        serve.init_ray(attempts=2, namespace="x")
    assert [c[0] for c in calls] == ["init", "shutdown", "init", "shutdown"]


def test_default_cpus_per_replica_shares_only_a_cpu_only_machine_that_serve_started(monkeypatch, tmp_path):
    """`rollout serve` on its own CPU-only Ray instance shares the machine's CPUs among the
    replicas; a cluster with GPUs, or one joined by --address, gives each replica one CPU."""
    from rollout.service import serve
    resources = {"CPU": 8.0}
    monkeypatch.setattr(serve.ray, "cluster_resources", lambda: dict(resources))
    assert serve.default_cpus_per_replica(1, own_cluster=True, gpus=None) == 8
    assert serve.default_cpus_per_replica(3, own_cluster=True, gpus=None) == 2
    assert serve.default_cpus_per_replica(16, own_cluster=True, gpus=None) == 1
    assert serve.default_cpus_per_replica(2, own_cluster=False, gpus=None) == 1
    assert serve.default_cpus_per_replica(2, own_cluster=True, gpus=1.0) == 1
    resources["GPU"] = 2.0
    assert serve.default_cpus_per_replica(2, own_cluster=True, gpus=None) == 1
    assert serve.default_cpus_per_replica(2, own_cluster=True, gpus=0.0) == 4  # GPUs on the node, replicas on CPUs
    with pytest.raises(ValueError, match="cpus_per_replica must be a whole number >= 1"):
        serve.RolloutService(tmp_path, cpus_per_replica=0)


def test_a_replica_in_its_own_process_runs_torch_threads_only_on_its_engine_loop(tmp_path):
    """A replica that is its process's work (a Ray actor: OMP_NUM_THREADS = its CPUs) builds and
    serves its engine on the loop thread with that many torch threads; every other thread runs
    torch on one, so no second OpenMP team makes libgomp put the loop's workers to sleep."""
    model_dir = make_tiny_model(tmp_path / "m", "qwen2", vocab_size=16, block_size=4)
    script = f"""
import threading, torch
from rollout.service.replica import GeneratorReplica
from rollout.config import EngineConfig
r = GeneratorReplica({str(model_dir)!r}, "r0", metrics_port=None, own_process=True,
                     engine_config=EngineConfig(drafting="fixed"))
here = torch.get_num_threads()
other = []
t = threading.Thread(target=lambda: other.append(torch.get_num_threads())); t.start(); t.join()
loop = r._call(torch.get_num_threads, "threads")
print(here, other[0], loop, r.status()["threads"], r._loop.name)
r.close()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "1", "2", "2", "engine-loop-r0"]


def test_a_replica_whose_model_cannot_load_raises_and_leaves_no_thread(tmp_path):
    from rollout.service.replica import GeneratorReplica
    before = set(threading.enumerate())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GeneratorReplica(str(tmp_path / "missing"), "gone", metrics_port=0)
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_the_front_end_reuses_freed_message_buffers_instead_of_faulting_in_fresh_pages():
    """`keep_freed_memory` (the serve process's malloc settings, each accepted): 2 MiB messages
    received and freed on a thread that is not the main one (as gRPC's are) come back with their
    pages; with glibc's defaults the freed top of that thread's heap is trimmed, and every
    message faults its 512 pages in again."""
    script = """
import resource, sys, threading
from rollout.service.serve import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() == [], "an option was refused"
src = memoryview(bytearray(2 << 20))
faults = []
def receive():
    for _ in range(3):
        bytes(src)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        a, b, c = bytes(src), bytes(src), bytes(src)  # messages: allocated, written, then freed
        del a, b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=receive)
t.start()
t.join()
print(faults[0])
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       timeout=120, check=True).stdout.split()[-1]) for mode in ("keep", "default")}
    pages = 50 * 3 * 512  # every message's pages faulted in again
    assert faults["default"] > pages // 2 and faults["keep"] < pages // 20, faults
