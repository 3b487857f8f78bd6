"""The deployment files agree with each other and with the server: compose services, their
healthchecks and start order, the GPU reservation, the `scale` profile (replicas, their tags,
nginx and the configuration deploy/nginx/render.py writes for them), Prometheus's targets,
Grafana's datasource and dashboard, the Dockerfile's contract. (The image itself is built and
run by docker/check-image.sh; Prometheus really scrapes in tests/e2e/test_prometheus_scrape.py;
nginx really balances in tests/e2e/test_scale_out.py; the Kubernetes manifests are validated in
tests/test_k8s_manifests.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from marble.server.middleware import new_request_id
from marble.server.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose and provisioning files")

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
NGINX_DIR = REPO / "deploy" / "nginx"
REPLICAS = {"marble-1": "r1", "marble-2": "r2", "marble-3": "r3"}  # service -> replica id


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(REPO / "docker-compose.yml")


def test_compose_services_health_and_order(compose):
    services = compose["services"]
    assert set(services) == {"marble", "marble-gpu", "prometheus", "grafana", "nginx", *REPLICAS}
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
    for name in ("marble", "marble-gpu", *REPLICAS):
        service = compose["services"][name]
        assert any(v.endswith(":/models:ro") for v in service["volumes"]), name
        assert "MARBLE_MODEL" in service["environment"]


def test_settings_pass_through_only_when_set(compose):
    """A variable unset in the shell is not passed (an empty MARBLE_API_KEY would be refused at
    start-up), and the key's companion `MARBLE_PUBLIC_OPS` travels with it, to every server."""
    for name in ("marble", "marble-gpu", *REPLICAS):
        env = compose["services"][name]["environment"]
        assert {"MARBLE_API_KEY", "MARBLE_PUBLIC_OPS"} <= set(env), name
        shell = {k: v for k, v in env.items() if k != "MARBLE_REPLICA_ID"}
        assert all(v is None for v in shell.values()), (name, shell)
        assert set(shell) <= {f"MARBLE_{f.upper()}" for f in Settings.model_fields}, name


def test_prometheus_scrapes_the_compose_server(compose):
    config = load(DOCKER / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "marble"]
    assert job["static_configs"][0]["targets"] == ["marble:8000"]
    assert "8000" in compose["services"]["marble"]["command"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_prometheus_scrapes_every_replica_by_its_id(compose):
    config = load(DOCKER / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "marble-replicas"]
    scraped = {c["targets"][0]: c["labels"]["replica"] for c in job["static_configs"]}
    env = {name: compose["services"][name]["environment"] for name in REPLICAS}
    assert scraped == {f"{name}:8000": env[name]["MARBLE_REPLICA_ID"] for name in REPLICAS}


def test_scale_profile_replicas_behind_nginx(compose):
    services = compose["services"]
    tags = []
    for name, tag in REPLICAS.items():
        replica = services[name]
        assert replica["profiles"] == ["scale"], name
        assert replica["environment"]["MARBLE_REPLICA_ID"] == tag
        assert Settings(replica_id=tag).replica_id == tag  # a tag the server accepts
        assert replica["healthcheck"] == services["marble"]["healthcheck"]
        assert replica["stop_grace_period"] == services["marble"]["stop_grace_period"]
        assert all(p.startswith("127.0.0.1:") for p in replica["ports"])  # loopback only
        tags.append(tag)
    assert len(set(tags)) == len(tags)
    nginx = services["nginx"]
    assert nginx["profiles"] == ["scale"]
    assert {d["condition"] for d in nginx["depends_on"].values()} == {"service_healthy"}
    assert set(nginx["depends_on"]) == set(REPLICAS)
    assert "./deploy/nginx/compose.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert nginx["ports"] == ["${MARBLE_PUBLISH_PORT:-8000}:8080"]
    # The rendered file balances over exactly these replicas, each owner group by its tag.
    text = (NGINX_DIR / "compose.conf").read_text()
    pool = re.search(r"upstream marble \{(.*?)\}", text, re.S).group(1)
    assert re.findall(r"server (\S+) max_fails", pool) == [f"{n}:8000" for n in REPLICAS]
    for name, tag in REPLICAS.items():
        assert re.search(rf"upstream marble_{tag} \{{\s*server {name}:8000;", text), tag
    assert re.search(r"^\s*listen 8080;", text, re.M)


def rendered_files() -> list[Path]:
    return [NGINX_DIR / "compose.conf", REPO / "deploy" / "k8s" / "base" / "nginx.conf"]


@pytest.mark.parametrize("path", rendered_files(), ids=["compose", "kubernetes"])
def test_rendered_nginx_configs_are_up_to_date(path: Path):
    """Each checked-in configuration is what its own first line's command renders now."""
    text = path.read_text()
    command = re.match(r"# Marble behind nginx\. Rendered by: python (.*)\n", text).group(1)
    args = shlex.split(command)
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == text, f"re-render {path.relative_to(REPO)}: python {command}"


@pytest.mark.parametrize("path", rendered_files(), ids=["compose", "kubernetes"])
def test_nginx_config_suits_marble(path: Path):
    text = path.read_text()
    directives = {line.strip() for line in text.splitlines()}
    default_limit = Settings.model_fields["max_body_bytes"].default
    for needed in (
        "least_conn;",
        f"client_max_body_size {default_limit};",
        "proxy_buffering off;",
        "proxy_cache off;",
        "proxy_read_timeout 1h;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";  # keep-alive to the replicas',
        "proxy_next_upstream error timeout http_503 non_idempotent;",
    ):
        assert needed in directives, needed
    # The replica's X-Request-Id reaches the client as it is: no directive sets or hides it.
    for line in text.lower().splitlines():
        if not line.lstrip().startswith("#"):
            assert "x-request-id" not in line, line
    for body in re.findall(r"return \d+ '(.*)';", text):
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def attach_routes(text: str) -> list[tuple[re.Pattern, str]]:
    """The `map $uri` entries: (the regex, as Python writes named groups; the upstream)."""
    block = re.search(r"map \$uri \$marble_upstream \{\n(.*?)\n\}", text, re.S).group(1)
    entries = re.findall(r'"~(.*)" (\S+);', block)
    assert re.search(r"^\s*default marble;", block, re.M)
    return [(re.compile(regex.replace("(?<", "(?P<")), target) for regex, target in entries]


def test_attach_routes_reach_the_owner_only():
    routes = attach_routes((NGINX_DIR / "compose.conf").read_text())
    for tag in REPLICAS.values():
        request_id = new_request_id(tag)
        for prefix in ("", "cmpl-", "chatcmpl-", "gen-"):
            path = f"/v1/diffusion/requests/{prefix}{request_id}/events"
            assert [t for regex, t in routes if regex.match(path)] == [f"marble_{tag}"]
    # Untagged ids, other routes and look-alike tags go to the pool (the `default`).
    for path in (
        f"/v1/diffusion/requests/{new_request_id(None)}/events",
        f"/v1/diffusion/requests/{new_request_id('r11')}/events",
        f"/v1/diffusion/requests/{new_request_id('r1')}/events/more",
        "/v1/diffusion/generate",
        "/v1/diffusion/events",
    ):
        assert not any(regex.match(path) for regex, _ in routes), path


def test_kubernetes_attach_route_names_the_pod_by_its_ordinal():
    (route,) = attach_routes((REPO / "deploy/k8s/base/nginx.conf").read_text())
    regex, target = route
    match = regex.match(f"/v1/diffusion/requests/cmpl-{new_request_id('12')}/events")
    assert match and match["marble_tag"] == "12"
    assert target == "marble-$marble_tag.marble-headless.marble.svc.cluster.local:8000"


def test_nginx_accepts_a_loopback_rendering(tmp_path):
    """`nginx -t` on the renderer's static output (the compose file names hosts only compose
    resolves; the Kubernetes one needs nginx >= 1.27.3, newer than Debian's)."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    render = [sys.executable, str(NGINX_DIR / "render.py"), "static"]
    render += ["--listen", "127.0.0.1:1", "--access-log", str(tmp_path / "access.log")]
    conf = subprocess.run(
        [*render, "r1=127.0.0.1:2", "r2=127.0.0.1:3"], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "marble.conf").write_text(conf)
    temp = "".join(f"{k}_temp_path {tmp_path / k};" for k in ("client_body", "proxy"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'pid'}; events {{}} http {{ {temp} include {tmp_path / 'marble.conf'}; }}"
    )
    args = [nginx, "-t", "-q", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path)]
    done = subprocess.run([*args, "-c", str(tmp_path / "nginx.conf")], capture_output=True)
    assert done.returncode == 0, done.stderr.decode() + (tmp_path / "error.log").read_text()


def test_compose_implementation_accepts_the_scale_profile():
    """podman's `docker compose config` (podman-compose, which needs podman) resolves it."""
    tool = shutil.which("podman-compose")
    if tool is None or shutil.which("podman") is None:
        pytest.skip("podman-compose and podman are not both installed")
    env = {**os.environ, "COMPOSE_PROFILES": "scale"}
    done = subprocess.run(
        [tool, "-f", str(REPO / "docker-compose.yml"), "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    services = set(yaml.safe_load(done.stdout)["services"])
    assert services == {"nginx", "prometheus", "grafana", *REPLICAS}
    assert '"MARBLE_REPLICA_ID": "r2"' in json.dumps(yaml.safe_load(done.stdout))


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
    # With several replicas each series comes once per replica: every panel aggregates them.
    for panel in panels:
        for target in panel.get("targets", []):
            assert re.match(r"(sum|max|histogram_quantile)\b", target["expr"]), target["expr"]
    for topic in ("queue and running by replica", "requests / s by replica"):
        assert topic in titles, topic
    assert "sum by (replica)" in exprs
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
