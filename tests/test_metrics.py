"""Prometheus endpoints listen where they are told (the serve host by default), not everywhere."""

import socket

from rollout.service.metrics import FrontendMetrics, ReplicaMetrics


def listening_address(address: str) -> str:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        return s.getpeername()[0]


def test_metrics_bind_the_given_host_only():
    for metrics in (FrontendMetrics(0, "127.0.0.1"), ReplicaMetrics("r", 0, "127.0.0.1")):
        assert metrics.address.startswith("127.0.0.1:")
        assert listening_address(metrics.address) == "127.0.0.1"
        port = int(metrics.address.rsplit(":", 1)[1])
        outside = [a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
                   if not a[4][0].startswith("127.")]
        for ip in outside[:1]:  # the machine's own non-loopback address must not answer
            try:
                socket.create_connection((ip, port), timeout=2).close()
                raise AssertionError(f"metrics answered on {ip}:{port}")
            except OSError:
                pass
        metrics.close()  # the server thread stops and the port is free again
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            raise AssertionError(f"metrics still answer on 127.0.0.1:{port} after close()")
        except ConnectionRefusedError:
            pass
