"""The deployment files agree with each other and with the server: compose services, their
healthchecks and start order, the GPU reservation, Prometheus's target, Grafana's datasource
and dashboard, the Dockerfile's contract. (The image itself is built and run by
docker/check-image.sh; Prometheus really scrapes in tests/e2e/test_prometheus_scrape.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose and provisioning files")

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(REPO / "docker-compose.yml")


def test_compose_services_health_and_order(compose):
    services = compose["services"]
    assert set(services) == {"marble", "marble-gpu", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    assert services["marble"]["profiles"] == ["cpu"]
    assert services["marble-gpu"]["profiles"] == ["gpu"]
    assert "COMPOSE_PROFILES=cpu" in (REPO / ".env").read_text()
    prom_deps = services["prometheus"]["depends_on"]
    assert {d["condition"] for d in prom_deps.values()} == {"service_healthy"}
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_gpu_profile_reserves_devices_and_answers_as_marble(compose):
    gpu = compose["services"]["marble-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "marble" in gpu["networks"]["default"]["aliases"]
    assert "cuda" in gpu["build"]["args"]["BASE_IMAGE"]


def test_checkpoints_are_a_read_only_volume(compose):
    for name in ("marble", "marble-gpu"):
        service = compose["services"][name]
        assert any(v.endswith(":/models:ro") for v in service["volumes"]), name
        assert "MARBLE_MODEL" in service["environment"]


def test_prometheus_scrapes_the_compose_server(compose):
    config = load(DOCKER / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "marble"]
    assert job["static_configs"][0]["targets"] == ["marble:8000"]
    assert "8000" in compose["services"]["marble"]["command"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisioning_matches_the_dashboard(compose):
    (source,) = load(DOCKER / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = load(DOCKER / "grafana/provisioning/dashboards/marble.yml")["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{provider['options']['path']}:ro" in mounts

    dashboard = json.loads((DOCKER / "grafana/dashboards/marble.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "requests",
        "queue",
        "batch size",
        "step latency",
        "tokens / s",
        "per forward",
        "latency",
        "stream health",
    ):
        assert topic in titles, topic
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in (
        "marble_client_disconnects_total",
        "marble_dropped_step_events_total",
        "marble_e2e_request_latency_seconds_bucket",
        "marble_batch_size",
    ):
        assert metric in exprs, metric


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^USER marble$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*--start-period=", text, re.M)
    assert re.search(r'^ENTRYPOINT \["marble", "serve"\]$', text, re.M)
    assert re.search(r'^CMD \["--host", "0\.0\.0\.0", "--port", "8000"\]$', text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    for arg in ("TORCH_INDEX_URL", "PIP_CERT", "PIP_INDEX", "TORCH_SPEC"):
        assert re.search(rf"^ARG {arg}\b", text, re.M), arg
    ignore = (REPO / ".dockerignore").read_text().split()
    for needed in ("!model/", "!server/", "!docker/wheels/", "!docker/healthcheck.py"):
        assert needed in ignore, needed
