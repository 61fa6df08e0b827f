"""deploy/docker-compose.yml describes a working cluster: each pdserve service's command and
environment from the file run here as local processes (service names mapped to 127.0.0.1,
container ports to free ones, the models volume to a directory), Redis is the embedded
Redis-protocol server and the OpenTelemetry collector an OTLP receiver in this process; then a
request goes through the router and through the OpenAI API. The Prometheus and collector
configs are checked against the compose file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers.observability_testing import generate_all, request_for, scrape, serve_env_names
from helpers.paths import REPO_ROOT
from pdserve.state.embedded_redis import EmbeddedRedis, free_port
from pdserve.telemetry.otlp_sink import OTLPTraceSink

ROOT = REPO_ROOT
DEPLOY = ROOT / "deploy"
PORT_KEYS = ("PDSERVE_PORT", "PDSERVE_KV_PORT", "PDSERVE_METRICS_PORT")
HOST_PORT = re.compile(r"(?<![\w.-])([a-z][a-z0-9-]*):(\d+)\b")


def load_compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def pdserve_services(compose: dict) -> list[str]:
    """Services built from deploy/Dockerfile, in an order that respects depends_on."""
    ours = {name for name, svc in compose["services"].items()
            if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name not in ours:
            return
        for dep in compose["services"][name].get("depends_on", []):
            visit(dep)
        order.append(name)

    for name in sorted(ours):
        visit(name)
    return order


class ComposeHere:
    """Runs the compose file's pdserve services as processes on this machine."""

    def __init__(self, compose: dict, workdir: Path, redis_port: int, otlp_port: int):
        self.compose = compose
        self.workdir = workdir
        self.ports = {("redis", 6379): redis_port, ("otel-collector", 4317): otlp_port}
        for name in pdserve_services(compose):
            env = compose["services"][name].get("environment", {})
            for key in PORT_KEYS:
                if key in env:
                    self.ports[(name, int(env[key]))] = free_port()
        self.volumes = {"models": workdir / "models"}
        self.processes: dict[str, subprocess.Popen] = {}

    def localize(self, service: str, key: str | None, value: str) -> str:
        """A value from the compose file as it applies to a process on this machine."""
        value = str(value)
        if key in PORT_KEYS:
            return str(self.ports[(service, int(value))])
        if key == "PDSERVE_HOST":
            return "127.0.0.1"

        def host_port(match: re.Match) -> str:
            host, port = match.group(1), int(match.group(2))
            if host not in self.compose["services"]:
                return match.group(0)
            assert (host, port) in self.ports, f"{service}: {match.group(0)} names no port that {host} serves"
            return f"127.0.0.1:{self.ports[(host, port)]}"

        value = HOST_PORT.sub(host_port, value)
        for spec in self.compose["services"][service].get("volumes", []):
            volume, mount = spec.split(":")[:2]
            if value.startswith(mount) and volume in self.volumes:
                value = str(self.volumes[volume]) + value[len(mount):]
        return value

    def command_and_env(self, service: str) -> tuple[list[str], dict[str, str]]:
        svc = self.compose["services"][service]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PDSERVE_", "OTEL_"))}
        env.update({k: self.localize(service, k, v) for k, v in svc.get("environment", {}).items()})
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-m", "pdserve.cli", *(self.localize(service, None, a) for a in svc["command"])]
        return command, env

    def start(self, timeout_s: float = 120.0) -> None:
        """One-shot services run to completion first (the others wait for them with
        service_completed_successfully); the servers then start together, as compose starts
        services whose dependencies only need to have started."""
        deadline = time.monotonic() + timeout_s
        for name in pdserve_services(self.compose):
            command, env = self.command_and_env(name)
            if self.compose["services"][name].get("restart") == "no":  # one-shot (the model maker)
                done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
                assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
                continue
            with (self.workdir / f"{name}.log").open("wb") as out:
                self.processes[name] = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out,
                                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for name in self.processes:
            self._wait_ready(name, self.workdir / f"{name}.log", deadline)

    def _wait_ready(self, name: str, log: Path, deadline: float) -> None:
        while "\nREADY " not in "\n" + log.read_text(errors="replace"):
            process = self.processes[name]
            assert process.poll() is None, f"{name} exited {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{name} not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)

    def stop(self) -> dict[str, int]:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        return codes


@pytest.fixture(scope="module")
def compose_here(tmp_path_factory):
    compose = load_compose()
    redis, sink = EmbeddedRedis().start(), OTLPTraceSink.start()
    here = ComposeHere(compose, tmp_path_factory.mktemp("compose"), int(redis.url.rsplit(":", 1)[1].split("/")[0]),
                       int(sink.endpoint.rsplit(":", 1)[1]))
    try:
        here.start()
        yield here, sink
    finally:
        here.stop()
        sink.stop()
        redis.stop()


def test_the_compose_file_runs_a_cluster_that_generates(compose_here):
    here, sink = compose_here
    assert set(here.processes) == {"prefill", "decode", "router", "openai"}
    router = f"127.0.0.1:{here.ports[('router', 50051)]}"
    results = generate_all(router, [request_for([5, 6, 7, 8, 9], 6, "compose-1", temperature=0.0)])
    assert results[0].error is None and len(results[0].token_ids) == 6
    openai = f"http://127.0.0.1:{here.ports[('openai', 8000)]}/v1"
    model = json.loads(urllib.request.urlopen(f"{openai}/models", timeout=30).read())["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}).encode()
    reply = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{openai}/completions", body, {"Content-Type": "application/json"}), timeout=60).read())
    assert reply["choices"][0]["finish_reason"] in ("length", "stop") and reply["usage"]["completion_tokens"] >= 1
    # Traces reached the "collector" the compose file names, from every server.
    sink.wait_for(lambda spans: {"pdserve-router", "pdserve-prefill", "pdserve-decode"}
                  <= {s.service for s in spans if s.attributes.get("gen_ai.request.id") == "compose-1"}, 30)
    for name in ("router", "prefill", "decode"):
        metrics = scrape(f"127.0.0.1:{here.ports[(name, 9464)]}")
        assert metrics.get("pdserve:engine_requests_finished_total", metrics.get(
            "pdserve:e2e_request_latency_seconds_count", 0)) >= 1, name


def test_prometheus_and_collector_configs_match_the_compose_file():
    compose = load_compose()
    known = serve_env_names()
    for name in pdserve_services(compose):
        env = compose["services"][name].get("environment", {})
        assert {k for k in env if not k.startswith("OTEL_")} <= known, name
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scraped = {(name, sd["port"]) for job in prometheus["scrape_configs"] for sd in job.get("dns_sd_configs", [])
               for name in sd["names"]}
    served = {(name, int(compose["services"][name]["environment"]["PDSERVE_METRICS_PORT"]))
              for name in ("router", "prefill", "decode")}
    assert served <= scraped
    mounts = {m for svc in compose["services"].values() for m in svc.get("volumes", []) if m.startswith("./")}
    for mount in mounts:
        assert (DEPLOY / mount.split(":")[0]).is_file(), mount
    collector = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())
    grpc_port = int(collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1])
    assert compose["x-pdserve-env"]["PDSERVE_OTLP_ENDPOINT"] == f"http://otel-collector:{grpc_port}"
    jaeger_host = collector["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0]
    assert jaeger_host in compose["services"]
    assert collector["service"]["pipelines"]["traces"]["exporters"][0] == "otlp/jaeger"


def test_every_server_stops_cleanly_on_sigterm(compose_here):
    here, _ = compose_here
    assert here.stop() == {name: 0 for name in here.processes}
