"""The cluster configs under cluster/ say what docs/SCALING.md says: one GPU per replica, a
CPU-only head that serves gRPC on 50051, the auth token mounted from a Secret, and start
scripts that run `ray start` with the detected GPU count. Static checks plus the scripts run
against stub `ray`/`python3`/`nvidia-smi` commands: no Ray, no GPU, well under a second."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
KUBERAY = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
SCRIPTS = ["start-head.sh", "start-worker.sh", "detect-gpus.sh"]
WAIT_FOR_GPUS = CLUSTER / "wait-for-gpus.py"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


def load_docs(name: str) -> list[dict]:
    with open(CLUSTER / name) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def raycluster(vendor: str) -> dict:
    (rc,) = [d for d in load_docs(f"kuberay-raycluster-{vendor}.yaml") if d["kind"] == "RayCluster"]
    return rc


def head_container(rc: dict) -> dict:
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def gpu_worker_groups(rc: dict, gpu_key: str) -> list[dict]:
    return [g for g in rc["spec"].get("workerGroupSpecs", [])
            if gpu_key in g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})]


# --- every YAML file -------------------------------------------------------------------------

def test_every_cluster_yaml_parses_into_mappings():
    files = sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))
    assert {f.name for f in files} >= {"ray-cluster-aws.yaml", "kuberay-raycluster-nvidia.yaml",
                                       "kuberay-raycluster-amd.yaml"}
    for f in files:
        docs = load_docs(f.name)
        assert docs, f"{f.name} has no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{f.name} has a non-mapping document"


# --- KubeRay manifests -----------------------------------------------------------------------

@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_manifest_is_a_raycluster_pinned_to_ray_2_60(vendor):
    rc = raycluster(vendor)
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_worker_group_asks_for_one_gpu_per_pod(vendor):
    gpu_key = KUBERAY[vendor]
    groups = gpu_worker_groups(raycluster(vendor), gpu_key)
    assert groups, f"no worker group asks for {gpu_key}"
    for g in groups:
        resources = g["template"]["spec"]["containers"][0]["resources"]
        assert int(resources["limits"][gpu_key]) == 1
        assert int(resources["requests"][gpu_key]) == 1
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_amd_worker_group_passes_num_gpus_to_ray_start():
    (group,) = gpu_worker_groups(raycluster("amd"), "amd.com/gpu")
    assert group["rayStartParams"]["num-gpus"] == "1"
    assert "rocm" in group["template"]["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_head_hosts_no_replica_and_exposes_the_service_ports(vendor):
    rc = raycluster(vendor)
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    head = head_container(rc)
    assert KUBERAY[vendor] not in head.get("resources", {}).get("limits", {})
    ports = {p["containerPort"]: p["name"] for p in head["ports"]}
    assert {50051, 8265, 10001, 9400} <= set(ports)
    assert ports[50051] == "grpc"


@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_port_names_are_valid_and_leave_metrics_to_ray(vendor):
    """KubeRay reads a port named `metrics` as Ray's own metrics-export port (default 8080)."""
    rc = raycluster(vendor)
    containers = [head_container(rc)] + [g["template"]["spec"]["containers"][0]
                                         for g in rc["spec"]["workerGroupSpecs"]]
    for c in containers:
        for p in c.get("ports", []):
            assert p["name"] != "metrics"
            assert len(p["name"]) <= 15 and p["name"] == p["name"].lower()


@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_head_readiness_is_the_grpc_health_service(vendor):
    probe = head_container(raycluster(vendor))["readinessProbe"]
    assert probe["grpc"]["port"] == 50051


@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_head_runs_the_front_end_after_ray_start(vendor):
    rc = raycluster(vendor)
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    script = "\n".join(head_container(rc)["args"])
    assert "$KUBERAY_GEN_RAY_START_CMD" in script
    assert "python -m rollout serve --address auto" in script
    for flag in ("--model", "--replicas", "--port 50051", "--metrics-port 9400", "--auth-token-file"):
        assert flag in script
    for group in rc["spec"]["workerGroupSpecs"]:
        assert "$KUBERAY_GEN_RAY_START_CMD" in "\n".join(group["template"]["spec"]["containers"][0]["args"])


@needs_bash
@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_head_script_is_valid_bash_and_python(vendor):
    script = "\n".join(head_container(raycluster(vendor))["args"])
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    waiter = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    assert "request_resources" in waiter
    compile(waiter, f"{vendor} head: wait for GPUs", "exec")


@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_auth_token_is_a_secret_mounted_as_the_token_file(vendor):
    rc = raycluster(vendor)
    head = head_container(rc)
    volumes = {v["name"]: v for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    token_file = {e["name"]: e.get("value") for e in head["env"]}["ROLLOUT_AUTH_TOKEN_FILE"]
    mounts = [m for m in head["volumeMounts"] if token_file.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    secret = volumes[mounts[0]["name"]]["secret"]
    assert secret["secretName"]
    assert [i["path"] for i in secret["items"]] == [token_file.rsplit("/", 1)[1]]


@pytest.mark.parametrize("vendor", KUBERAY)
def test_kuberay_service_routes_trainers_to_the_head_on_50051(vendor):
    rc = raycluster(vendor)
    (svc,) = [d for d in load_docs(f"kuberay-raycluster-{vendor}.yaml") if d["kind"] == "Service"]
    assert svc["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    assert [p["port"] for p in svc["spec"]["ports"]] == [50051]


# --- Ray cluster launcher --------------------------------------------------------------------

def launcher() -> dict:
    (cfg,) = load_docs("ray-cluster-aws.yaml")
    return cfg


def test_launcher_has_a_cpu_head_and_gpu_worker_types():
    cfg = launcher()
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws"
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "no worker node type offers GPUs"
    for t in gpu_workers.values():
        assert t["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= cfg["max_workers"]


def test_launcher_installs_the_repo_and_pinned_ray_on_every_node():
    cfg = launcher()
    setup = "\n".join(cfg["setup_commands"])
    assert '"ray[default]==2.60.0"' in setup and "grpcio" in setup
    assert "pip install -e" in setup
    repo_dir = setup.split("pip install -e", 1)[1].split()[0]
    assert cfg["file_mounts"][repo_dir] == "."


def test_launcher_start_commands_keep_replicas_on_gpu_workers():
    cfg = launcher()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert "--ray-client-server-port=10001" in head and "--dashboard-host=0.0.0.0" in head
    assert "--num-gpus=0" in head
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "--num-gpus=$(nvidia-smi -L" in worker


def test_launcher_opens_the_grpc_port_to_trainers():
    rules = launcher()["provider"]["security_group"]["IpPermissions"]
    assert any(r["FromPort"] <= 50051 <= r["ToPort"] for r in rules)


def test_launcher_config_passes_rays_own_validation():
    pytest.importorskip("jsonschema")
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(launcher()))


# --- shell scripts ---------------------------------------------------------------------------

@needs_bash
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable_bash_that_parses(script):
    path = CLUSTER / script
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in path.read_text()
    assert path.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(path)], check=True)


@needs_bash
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_prints_usage_on_h(script):
    out = subprocess.run(["bash", str(CLUSTER / script), "-h"], capture_output=True, text=True, check=True)
    assert "Usage:" in out.stdout


@pytest.mark.parametrize("script", ["start-head.sh", "start-worker.sh"])
def test_start_script_runs_ray_start(script):
    assert "ray start" in (CLUSTER / script).read_text()


@pytest.fixture
def stubs(tmp_path):
    """A PATH whose ray / python3 / nvidia-smi / rocm-smi append their argv to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"

    def stub(name: str, stdout: str = "", rc: int = 0) -> None:
        body = f'#!/bin/sh\necho "{name} $*" >> "{log}"\nprintf "%s" "{stdout}"\nexit {rc}\n'
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)

    for name in ("ray", "python3"):
        stub(name)
    stub("nvidia-smi", "GPU 0: NVIDIA H100 (UUID: GPU-a)\nGPU 1: NVIDIA H100 (UUID: GPU-b)\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ROLLOUT_") and k not in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"

    def calls(prog: str) -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [line for line in lines if line.startswith(prog + " ")]

    return type("Stubs", (), {"env": env, "stub": staticmethod(stub), "calls": staticmethod(calls),
                              "tmp": tmp_path})


def run_script(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER / script), *args], env=env,
                          capture_output=True, text=True, timeout=30)


@needs_bash
def test_detect_gpus_counts_nvidia_smi_lines(stubs):
    assert run_script("detect-gpus.sh", stubs.env).stdout.strip() == "2"
    env = dict(stubs.env, CUDA_VISIBLE_DEVICES="1")
    assert run_script("detect-gpus.sh", env).stdout.strip() == "1"


@needs_bash
def test_detect_gpus_falls_back_to_rocm_smi(stubs):
    stubs.stub("nvidia-smi", rc=9)
    stubs.stub("rocm-smi", "device,Device ID\ncard0,0x74a1\ncard1,0x74a1\ncard2,0x74a1\n")
    assert run_script("detect-gpus.sh", stubs.env).stdout.strip() == "3"


@needs_bash
def test_start_head_starts_ray_then_execs_serve(stubs):
    model = stubs.tmp / "model"
    model.mkdir()
    token = stubs.tmp / "token"
    token.write_text("secret\n")
    env = dict(stubs.env, ROLLOUT_MODEL=str(model), ROLLOUT_REPLICAS="4",
               ROLLOUT_AUTH_TOKEN_FILE=str(token), ROLLOUT_NUM_GPUS="0")
    out = run_script("start-head.sh", env)
    assert out.returncode == 0, out.stderr
    assert stubs.calls("ray") == ["ray start --head --port=6379 --dashboard-host=0.0.0.0 "
                                  "--ray-client-server-port=10001 --num-gpus=0"]
    assert stubs.calls("python3") == [f"python3 {WAIT_FOR_GPUS} 4",
                                      f"python3 -m rollout serve --address auto --model {model} "
                                      f"--replicas 4 --port 50051 --metrics-port 9400 "
                                      f"--auth-token-file {token}"]


@needs_bash
def test_start_head_passes_tls_and_extra_flags_and_can_skip_the_gpu_wait(stubs):
    cert, key = stubs.tmp / "cert.pem", stubs.tmp / "key.pem"
    cert.write_text("c")
    key.write_text("k")
    env = dict(stubs.env, ROLLOUT_MODEL=str(stubs.tmp), ROLLOUT_REPLICAS="2", ROLLOUT_WAIT_FOR_GPUS="0",
               ROLLOUT_TLS_CERT=str(cert), ROLLOUT_TLS_KEY=str(key), ROLLOUT_PORT="50052")
    out = run_script("start-head.sh", env, "--grace", "5")
    assert out.returncode == 0, out.stderr
    assert stubs.calls("ray")[0].endswith("--num-gpus=2")  # detected from the nvidia-smi stub
    wait, serve = stubs.calls("python3")
    assert wait == f"python3 {WAIT_FOR_GPUS} 0"
    assert serve.endswith(f"--port 50052 --metrics-port 9400 --tls-cert {cert} --tls-key {key} --grace 5")


@needs_bash
def test_start_head_refuses_missing_replicas_before_starting_ray(stubs):
    out = run_script("start-head.sh", dict(stubs.env, ROLLOUT_MODEL=str(stubs.tmp)))
    assert out.returncode == 2 and "ROLLOUT_REPLICAS" in out.stderr
    assert stubs.calls("ray") == []


@needs_bash
def test_start_head_refuses_half_a_tls_pair(stubs):
    env = dict(stubs.env, ROLLOUT_MODEL=str(stubs.tmp), ROLLOUT_REPLICAS="1", ROLLOUT_TLS_CERT=str(stubs.tmp))
    out = run_script("start-head.sh", env)
    assert out.returncode == 2 and "ROLLOUT_TLS_KEY" in out.stderr
    assert stubs.calls("ray") == []


@needs_bash
def test_start_worker_joins_the_head_with_detected_gpus(stubs):
    out = run_script("start-worker.sh", stubs.env, "10.0.0.5", "--block")
    assert out.returncode == 0, out.stderr
    assert stubs.calls("ray") == ["ray start --address=10.0.0.5:6379 --num-gpus=2 --block"]


def test_wait_for_gpus_returns_at_once_for_zero_gpus():
    out = subprocess.run([sys.executable, str(WAIT_FOR_GPUS), "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_wait_for_gpus_refuses_a_negative_count():
    out = subprocess.run([sys.executable, str(WAIT_FOR_GPUS), "-1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "gpus must be >= 0" in out.stderr
