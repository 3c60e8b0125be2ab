"""`kunjax serve` as a child process for the end-to-end tests: start it, wait for SERVING, hand back its ports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def start_serve(args: list[str], timeout_s: float = 400.0, *, printed: list[str] | None = None
                ) -> tuple[subprocess.Popen, str, str]:
    """Run `kunjax serve --port 0 --metrics-port 0 *args` on CPU; returns (process, gRPC target, metrics URL) once
    health reports SERVING (after warm-up compiled everything). `printed` receives the start-up lines it read."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "kunjax", "serve", "--port", "0", "--metrics-port", "0", *args],
                            stderr=subprocess.PIPE, text=True, env=env)
    port = metrics = None
    deadline = time.monotonic() + timeout_s
    lines = []
    while (port is None or metrics is None) and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if printed is not None:
            printed.append(line)
        if m := re.search(r"listening on [\d.]+:(\d+)", line):
            port = int(m.group(1))
        if m := re.search(r"metrics on (http://\S+)", line):
            metrics = m.group(1)
    if not (port and metrics):
        proc.kill()
        raise AssertionError(f"server did not start: {''.join(lines)}")
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != \
                health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("the server never became ready")
            time.sleep(0.2)
    # Health is SERVING: the server says so too, once (a user's only sign that it is ready).
    while not (line := proc.stderr.readline()).startswith(f"kunjax: ready on 127.0.0.1:{port} "):
        if not line:
            raise AssertionError(f"the server never said it was ready: {''.join(lines)}")
        lines.append(line)
        if printed is not None:
            printed.append(line)
    return proc, target, metrics


def start_serve_http(args: list[str], timeout_s: float = 400.0) -> tuple[subprocess.Popen, str, str, str]:
    """`start_serve` with `--http-port 0`: also returns the OpenAI API's base URL (`http://127.0.0.1:PORT/v1`)."""
    printed: list[str] = []
    proc, target, metrics = start_serve(["--http-port", "0", *args], timeout_s, printed=printed)
    urls = [m.group(1) for line in printed if (m := re.search(r"OpenAI HTTP API on (\S+)", line))]
    if not urls:
        proc.kill()
        raise AssertionError(f"the server did not announce its HTTP API: {''.join(printed)}")
    return proc, target, metrics, urls[0]
