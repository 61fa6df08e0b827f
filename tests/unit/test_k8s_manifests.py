"""deploy/k8s passes offline schema validation (kubernetes-validate's bundled schemas) and hangs
together: Services select their Deployments' pods, gRPC servers are probed on the gRPC health
check, every PDSERVE_* variable is a real flag, and every command line parses."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from helpers.observability_testing import serve_env_names
from helpers.paths import REPO_ROOT
from pdserve.cli import build_parser

K8S = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"
GRPC_ROLES = ("router", "prefill", "decode")


def documents() -> list[tuple[str, dict]]:
    """(file name, document) for every manifest but the kustomization."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


@pytest.mark.parametrize("name,doc", documents(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_manifest_passes_schema_validation(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_services_select_their_deployments_and_ports():
    deployments = of_kind("Deployment")
    services = of_kind("Service")
    assert {d.removeprefix("pdserve-") for d in deployments} == {*GRPC_ROLES, "openai", "redis"}
    assert set(services) == set(deployments)
    for name, service in services.items():
        pod = deployments[name]["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names, name


def test_grpc_servers_are_probed_on_grpc_health_and_drain_within_their_grace():
    config = of_kind("ConfigMap")["pdserve-config"]["data"]
    for role in GRPC_ROLES:
        pod = of_kind("Deployment")[f"pdserve-{role}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        port = int(env["PDSERVE_PORT"])
        assert port in {p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (role, probe)
        assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == ["pdserve-config"]
        assert pod["terminationGracePeriodSeconds"] > float(config["PDSERVE_DRAIN_TIMEOUT_S"])


def test_every_variable_is_a_flag_and_every_command_line_parses():
    known = serve_env_names()
    assert set(of_kind("ConfigMap")["pdserve-config"]["data"]) <= known
    parser = build_parser()
    for name, deployment in of_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            if container["image"].startswith("pdserve:"):
                assert {e["name"] for e in container.get("env", [])} <= known, name
                parser.parse_args(container["args"])  # exits on an unknown flag or role
