"""The Kubernetes manifests (deploy/k8s/) pass the Kubernetes API schemas offline
(kubernetes-validate, strict: an unknown field fails), as files and as kustomize renders them,
and agree with each other and with the server: probes on routes that exist, a grace period
longer than the drain, the replica tag from the pod's ordinal, the nginx configuration naming
these services, the autoscaler's metric served by the adapter and exported by the server."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from marble.server.metrics import Metrics
from marble.server.routes.health import router as health_router
from marble.server.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests")
kv = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate checks the manifests (the test extra)"
)

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes with the pod-index label the replica tag comes from, and the newest the
# validator knows.
VERSIONS = ("1.28.0", kv.latest_version())


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def manifest_files() -> list[Path]:
    """Every YAML file of Kubernetes objects, less kustomize's own files and its patches
    (partial objects, validated once applied: test_kustomize_output_validates)."""
    patches = {
        (k / patch["path"]).resolve()
        for k in kustomizations()
        for patch in docs(k / "kustomization.yaml")[0].get("patches", [])
    }
    files = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in patches:
            continue
        assert all("apiVersion" in d and "kind" in d for d in docs(path)), path
        files.append(path)
    return files


def validate(objects: list[dict[str, Any]], where: str) -> list[str]:
    passed = []
    for version in VERSIONS:
        for obj in objects:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']} {path}: {exc}")
            passed.append(f"{obj['kind']}/{obj['metadata']['name']}@{version}")
    return passed


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates(path: Path):
    assert validate(docs(path), str(path.relative_to(REPO)))


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomize output not rendered")
    done = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: p.name)
def test_kustomize_output_validates(folder: Path):
    objects = kustomize(folder)
    passed = validate(objects, folder.name)
    kinds = ", ".join(sorted({o["kind"] for o in objects}))
    print(
        f"\n{folder.relative_to(REPO)}: {len(passed)} checks passed, Kubernetes {VERSIONS}: {kinds}"
    )
    assert {o["kind"] for o in objects} >= {
        "StatefulSet",
        "Service",
        "Deployment",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }


def base() -> dict[tuple[str, str], dict[str, Any]]:
    """The base's objects by (kind, name)."""
    objects = [d for path in sorted((K8S / "base").glob("*.yaml")) for d in docs(path)]
    return {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] != "Kustomization"}


def container(pod_owner: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod_owner["spec"]["template"]["spec"]["containers"]
    return c


def test_replicas_probe_drain_and_tag():
    objects = base()
    sts = objects["StatefulSet", "marble"]
    pod = sts["spec"]["template"]["spec"]
    marble = container(sts)
    routes = {r.path for r in health_router.routes}
    assert marble["readinessProbe"]["httpGet"]["path"] == "/health" in routes
    assert marble["livenessProbe"]["httpGet"]["path"] == "/live" in routes
    env = {e["name"]: e for e in marble["env"]}
    tag = env["MARBLE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert tag == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert Settings(replica_id="7").replica_id == "7"  # an ordinal is a valid tag
    drain = float(env["MARBLE_DRAIN_TIMEOUT_S"]["value"])
    assert drain == Settings.model_fields["drain_timeout_s"].default
    (sleep,) = [int(a) for a in marble["lifecycle"]["preStop"]["exec"]["command"][1:]]
    assert pod["terminationGracePeriodSeconds"] > sleep + drain
    assert pod["enableServiceLinks"] is False  # no MARBLE_PORT=tcp://... from the Service
    assert "replicas" not in sts["spec"]  # the autoscaler owns the count
    for owner in (sts, objects["Deployment", "marble-nginx"]):
        resources = container(owner)["resources"]
        assert resources["requests"] and resources["limits"], owner["metadata"]["name"]


def test_checkpoints_are_mounted_read_only():
    objects = base()
    sts = objects["StatefulSet", "marble"]
    (volume,) = sts["spec"]["template"]["spec"]["volumes"]
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert objects["PersistentVolumeClaim", claim["claimName"]]["spec"]["accessModes"] == [
        "ReadOnlyMany"
    ]
    (mount,) = container(sts)["volumeMounts"]
    assert mount == {"name": volume["name"], "mountPath": "/models", "readOnly": True}


def test_services_and_the_nginx_config_agree():
    objects = base()
    namespace = docs(K8S / "base" / "kustomization.yaml")[0]["namespace"]
    sts = objects["StatefulSet", "marble"]
    headless = objects["Service", sts["spec"]["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    pool = objects["Service", "marble-pool"]["spec"]
    assert pool["clusterIP"] == "None" and not pool.get("publishNotReadyAddresses")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for spec in (headless, pool):
        assert spec["selector"].items() <= labels.items()
    conf = (K8S / "base" / "nginx.conf").read_text()
    domain = f"{namespace}.svc.cluster.local:8000"
    assert f"server marble-pool.{domain} " in conf
    owner = f"{sts['metadata']['name']}-$marble_tag.{sts['spec']['serviceName']}.{domain};"
    assert owner in conf
    nginx = objects["Deployment", "marble-nginx"]
    entry = objects["Service", "marble"]["spec"]
    assert entry["selector"].items() <= nginx["spec"]["template"]["metadata"]["labels"].items()
    (generated,) = docs(K8S / "base" / "kustomization.yaml")[0]["configMapGenerator"]
    assert generated["files"] == ["marble.conf=nginx.conf"]
    (volume,) = nginx["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == generated["name"]
    assert re.search(r"^\s*listen 8080;", conf, re.M)
    assert container(nginx)["ports"][0]["containerPort"] == 8080


def test_autoscaler_metric_comes_from_the_server_through_the_adapter():
    hpa = base()["HorizontalPodAutoscaler", "marble"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "marble",
    }
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == Metrics().waiting._name  # the waiting queue gauge the server exports

    (adapter,) = docs(K8S / "monitoring" / "prometheus-adapter.yaml")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(f"{name}{{") and rule["name"]["as"] == name
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    # Prometheus gives the series the labels the rule maps (and the dashboard's `replica`).
    (job,) = yaml.safe_load((K8S / "monitoring" / "prometheus-scrape.yml").read_text())[
        "scrape_configs"
    ]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "replica"} <= targets


def test_gpu_overlay_reserves_one_gpu_per_replica():
    objects = kustomize(K8S / "gpu")
    (sts,) = [o for o in objects if o["kind"] == "StatefulSet"]
    marble = container(sts)
    assert marble["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert marble["image"].endswith(":cuda")
    env = {e["name"]: e for e in marble["env"]}
    assert env["MARBLE_MODEL"]["value"].startswith("/models/")
    assert "MARBLE_REPLICA_ID" in env  # the patch adds to the base's environment
