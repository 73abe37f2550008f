"""Specs for the deployment: rendered Kubernetes overlays, monitoring objects and the Dockerfile.

What runs where:
- every overlay is rendered (kustomize when installed, else the fallback in ``manifests.py``, checked
  against kustomize by ``test_lite_renderer_matches_kustomize``) and validated with
  ``kubernetes-validate --strict`` against the oldest Kubernetes we support (1.30) and the newest the
  tool ships schemas for;
- ``checkov`` scans the sources in k8s/, each rendered overlay (what is actually applied, GPU patches
  included) and the Dockerfile; ``hadolint`` lints the Dockerfile;
- the rest are plain assertions on the rendered objects: the properties that matter for safety and
  that no linter knows about (probe paths, the admin port's isolation, the shutdown budget, ...).
A tool test is skipped only when its binary is missing.
"""

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

from service.config import Settings

from .manifests import (
    CONTRACT_METRICS,
    DOCKERFILE,
    K8S,
    OVERLAYS,
    REPO,
    Manifest,
    container,
    dockerfile_args,
    dockerfile_env,
    dockerfile_instructions,
    dockerfile_stages,
    find,
    identity,
    kustomize_command,
    pod_specs,
    quantity_bytes,
    render,
    render_kustomize,
    render_lite,
)

# Oldest Kubernetes minor we support; None = the newest schemas the installed kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", None)
# The only checkov checks the manifests skip, each justified next to its `checkov.io/skip` annotation.
ALLOWED_K8S_SKIPS = {"CKV_K8S_43"}
PUBLIC_PORT, ADMIN_PORT = 8000, 8001


def _tool(name: str) -> str:
    """Path of a command-line tool from the venv or PATH; skips the test when it is missing."""
    local = Path(sys.executable).parent / name
    path = str(local) if local.exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return path


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture
def docs(rendered: dict[str, list[Manifest]], overlay: str) -> list[Manifest]:
    return rendered[overlay]


@pytest.fixture(scope="module")
def rendered_files(rendered: dict[str, list[Manifest]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each rendered overlay as one multi-document YAML file, <tmp>/<overlay>/all.yaml."""
    root = tmp_path_factory.mktemp("rendered")
    for name, objects in rendered.items():
        (root / name).mkdir()
        (root / name / "all.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return root


def _server(docs: list[Manifest]) -> dict[str, Any]:
    return container(docs, "onepass", "onepass")


def _config(docs: list[Manifest]) -> dict[str, str]:
    return dict(find(docs, "ConfigMap", "onepass-config")["data"])


# ----------------------------------------------------------------------------------------------------
# Rendering and schema validation


def test_lite_renderer_matches_kustomize(overlay: str) -> None:
    path = K8S / "overlays" / overlay
    if kustomize_command(path) is None:
        pytest.skip("neither kustomize nor kubectl is installed: nothing to compare the fallback renderer with")
    real = {identity(d): d for d in render_kustomize(path)}
    lite = {identity(d): d for d in render_lite(path)}
    assert lite.keys() == real.keys()
    for key, doc in real.items():
        assert lite[key] == doc, f"render_lite differs from kustomize for {key}"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS, ids=lambda v: v or "newest")
def test_rendered_overlay_passes_strict_schema_validation(
    rendered_files: Path, overlay: str, k8s_version: str | None
) -> None:
    tool = _tool("kubernetes-validate")
    cmd = [tool, "--strict", "--quiet"]
    if k8s_version:
        cmd += ["--kubernetes-version", k8s_version]
    proc = subprocess.run(
        [*cmd, str(rendered_files / overlay / "all.yaml")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # --quiet prints warnings too; the overlays hold only built-in kinds, so there must be none.
    assert "WARN" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_monitoring_objects_validate_with_only_crd_warnings(tmp_path: Path) -> None:
    tool = _tool("kubernetes-validate")
    if kustomize_command(K8S / "monitoring") is None:
        pytest.skip("k8s/monitoring uses configMapGenerator, which only the real kustomize renders")
    objects = render_kustomize(K8S / "monitoring")
    assert {d["kind"] for d in objects} == {"ServiceMonitor", "PrometheusRule", "ConfigMap"}
    out = tmp_path / "monitoring.yaml"
    out.write_text(yaml.safe_dump_all(objects))
    proc = subprocess.run([tool, "--strict", "--quiet", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # kubernetes-validate has no schemas for CRDs; it may only warn about exactly those two kinds.
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("WARN"):
            assert re.search(r"kind (ServiceMonitor|PrometheusRule) with api version monitoring\.coreos\.com", line)


# ----------------------------------------------------------------------------------------------------
# Linters


def _checkov(*args: str) -> dict[str, Any]:
    """Run checkov; fail on any failed check or parse error; return the skipped check ids and pass count."""
    tool = _tool("checkov")
    # --skip-download: no calls to the Prisma Cloud API (the checks ship with the package). No --quiet:
    # with JSON output it drops the skipped checks, and the test asserts exactly which ones are skipped.
    proc = subprocess.run(
        [tool, *args, "--compact", "--skip-download", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['resource']} {c.get('file_path', '')}"
        for r in reports
        for c in r["results"].get("failed_checks", [])
    ]
    assert not failed, "checkov failures:\n" + "\n".join(failed)
    assert proc.returncode == 0, proc.stderr
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)
    assert sum(r["summary"]["resource_count"] for r in reports) > 0
    return {
        "skipped": {c["check_id"] for r in reports for c in r["results"].get("skipped_checks", [])},
        "passed": sum(r["summary"]["passed"] for r in reports),
    }


@pytest.mark.slow
def test_checkov_passes_on_k8s_sources() -> None:
    result = _checkov("--directory", str(K8S), "--framework", "kubernetes")
    assert result["passed"] > 100
    assert result["skipped"] == ALLOWED_K8S_SKIPS


@pytest.mark.slow
def test_checkov_passes_on_rendered_overlays(rendered_files: Path) -> None:
    result = _checkov("--directory", str(rendered_files), "--framework", "kubernetes")
    assert result["passed"] > 100
    assert result["skipped"] == ALLOWED_K8S_SKIPS


@pytest.mark.slow
def test_checkov_passes_on_dockerfile() -> None:
    # No skips: every dockerfile check passes as written.
    result = _checkov("--file", str(DOCKERFILE), "--framework", "dockerfile")
    assert result["skipped"] == set()


def test_hadolint_passes_on_dockerfile() -> None:
    tool = _tool("hadolint")
    proc = subprocess.run([tool, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------
# Probes and lifecycle


def test_probes_use_readyz_for_startup_and_readiness_and_healthz_for_liveness(docs: list[Manifest]) -> None:
    c = _server(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PUBLIC_PORT, "admin": ADMIN_PORT}
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == PUBLIC_PORT, f"{probe} must not use the admin port"


def test_startup_probe_allows_minutes_for_model_load_and_warm_up(docs: list[Manifest], overlay: str) -> None:
    probe = _server(docs)["startupProbe"]
    budget_s = probe["periodSeconds"] * probe["failureThreshold"]
    assert budget_s >= (600 if overlay == "gpu" else 300)
    # Liveness must not be able to kill a pod that is slow but alive before its probes settle.
    assert "initialDelaySeconds" not in _server(docs)["livenessProbe"]


def test_grace_period_covers_prestop_sleep_and_graceful_shutdown(docs: list[Manifest]) -> None:
    c = _server(docs)
    spec = find(docs, "Deployment", "onepass")["spec"]["template"]["spec"]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    graceful_s = int(_config(docs)["ONEPASS_GRACEFUL_SHUTDOWN_S"])
    # Kubernetes counts the preStop hook against the grace period, then SIGTERM starts the drain.
    assert spec["terminationGracePeriodSeconds"] > pre_stop_s + graceful_s
    assert 1 <= pre_stop_s <= 15


def test_graceful_shutdown_matches_dockerfile_and_settings_default(docs: list[Manifest]) -> None:
    runtime = list(dockerfile_stages(DOCKERFILE.read_text()).values())[-1]
    configured = _config(docs)["ONEPASS_GRACEFUL_SHUTDOWN_S"]
    assert dockerfile_env(runtime)["ONEPASS_GRACEFUL_SHUTDOWN_S"] == configured
    assert str(Settings.model_fields["graceful_shutdown_s"].default) == configured


# ----------------------------------------------------------------------------------------------------
# Security


def test_every_pod_runs_restricted(docs: list[Manifest]) -> None:
    workloads = list(pod_specs(docs))
    assert {w["metadata"]["name"] for w, _ in workloads} == {"onepass", "onepass-redis"}
    for workload, spec in workloads:
        name = workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec.get("serviceAccountName", "default") != "default", name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] >= 10000, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert "hostNetwork" not in spec and "hostPID" not in spec, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert "add" not in sc["capabilities"], c["name"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", c["name"]
            assert "limits" in c["resources"] and "requests" in c["resources"], c["name"]
            assert c["resources"]["limits"]["memory"], c["name"]


def test_service_accounts_do_not_mount_tokens(docs: list[Manifest]) -> None:
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert accounts
    for sa in accounts:
        assert sa["automountServiceAccountToken"] is False, sa["metadata"]["name"]
    assert not [d for d in docs if d["kind"] in {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}]


def test_server_writes_only_to_tmp_emptydir(docs: list[Manifest]) -> None:
    spec = find(docs, "Deployment", "onepass")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = [m for m in _server(docs)["volumeMounts"] if not m.get("readOnly")]
    assert [m["mountPath"] for m in writable] == ["/tmp"]
    assert "sizeLimit" in volumes[writable[0]["name"]]["emptyDir"]


def test_uid_matches_dockerfile_user(docs: list[Manifest]) -> None:
    runtime = list(dockerfile_stages(DOCKERFILE.read_text()).values())[-1]
    (user,) = [args for instr, args in runtime if instr == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000, "USER must be numeric so runAsNonRoot can verify it"
    spec = find(docs, "Deployment", "onepass")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == int(uid)
    assert spec["securityContext"]["runAsGroup"] == int(gid or uid)


def test_namespace_enforces_restricted_pod_security(docs: list[Manifest]) -> None:
    ns = find(docs, "Namespace", "onepass")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"onepass"}


# ----------------------------------------------------------------------------------------------------
# Admin listener isolation


def test_public_service_excludes_admin_port(docs: list[Manifest]) -> None:
    svc = find(docs, "Service", "onepass")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(PUBLIC_PORT, "http")]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    for other in (d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] != "onepass-admin"):
        for port in other["spec"]["ports"]:
            assert port["port"] != ADMIN_PORT and port["targetPort"] not in ("admin", ADMIN_PORT)


def test_admin_service_is_cluster_internal(docs: list[Manifest]) -> None:
    svc = find(docs, "Service", "onepass-admin")
    assert svc["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(ADMIN_PORT, "admin")]


def test_network_policy_admits_admin_port_only_from_operators_namespace(docs: list[Manifest]) -> None:
    policy = find(docs, "NetworkPolicy", "onepass")["spec"]
    pod_labels = find(docs, "Deployment", "onepass")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["ingress"]:
        # A rule without ports would open every port, the admin port included.
        assert rule.get("ports"), "every ingress rule must name its ports"
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    assert set(by_port) == {PUBLIC_PORT, ADMIN_PORT}
    (admin_peer,) = by_port[ADMIN_PORT]
    assert set(admin_peer) == {"namespaceSelector"}, "admin peers: one namespace, no pod or IP blocks"
    assert admin_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "onepass-operators"}
    assert by_port[PUBLIC_PORT] == [{"namespaceSelector": {}}]


def test_redis_admits_only_server_pods(docs: list[Manifest]) -> None:
    policy = find(docs, "NetworkPolicy", "onepass-redis")["spec"]
    server_labels = find(docs, "Deployment", "onepass")["spec"]["template"]["metadata"]["labels"]
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}
    assert peer["podSelector"]["matchLabels"].items() <= server_labels.items()
    assert [p["port"] for p in rule["ports"]] == [6379]


def test_admin_token_comes_from_a_secret_file(docs: list[Manifest]) -> None:
    c = _server(docs)
    config = _config(docs)
    assert "ONEPASS_ADMIN_TOKEN" not in config
    assert all(e["name"] != "ONEPASS_ADMIN_TOKEN" for e in c.get("env", []))
    token_file = Path(config["ONEPASS_ADMIN_TOKEN_FILE"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
    assert mount["readOnly"] is True
    spec = find(docs, "Deployment", "onepass")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "onepass-admin-token"
    assert volume["secret"]["items"] == [{"key": "token", "path": token_file.name}]


def test_admin_token_placeholder_is_refused_by_the_server(docs: list[Manifest], tmp_path: Path) -> None:
    placeholder = find(docs, "Secret", "onepass-admin-token")["stringData"]["token"]
    token_file = tmp_path / "token"
    token_file.write_text(placeholder)
    # Fail closed: a forgotten placeholder stops the server instead of guarding the admin API.
    with pytest.raises(ValueError, match="shorter than 16"):
        Settings(admin_token_file=token_file).resolved_admin_token()


# ----------------------------------------------------------------------------------------------------
# Settings, images and wiring


def test_configmap_keys_are_settings_fields(docs: list[Manifest]) -> None:
    # Settings ignores unknown ONEPASS_* variables, so a typo here would silently do nothing.
    fields = set(Settings.model_fields)
    for key in _config(docs):
        if key.startswith("ONEPASS_"):
            assert key.removeprefix("ONEPASS_").lower() in fields, key


def test_configmap_values_pass_settings_validation(docs: list[Manifest]) -> None:
    values = {k.removeprefix("ONEPASS_").lower(): v for k, v in _config(docs).items() if k.startswith("ONEPASS_")}
    settings = Settings(**values)
    assert (settings.port, settings.admin_port) == (PUBLIC_PORT, ADMIN_PORT)
    assert settings.redis_url and settings.redis_url.startswith("redis://onepass-redis.")


def test_overlay_selects_its_device_and_image(docs: list[Manifest], overlay: str) -> None:
    c = _server(docs)
    spec = find(docs, "Deployment", "onepass")["spec"]["template"]["spec"]
    config = _config(docs)
    repo, _, tag = c["image"].rpartition(":")
    assert repo == "registry.example.com/onepass"
    assert tag and tag != "latest"
    if overlay == "gpu":
        assert tag.endswith("-cu128")
        assert config["ONEPASS_DEVICE"] == "cuda"
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    else:
        assert tag.endswith("-cpu")
        assert config["ONEPASS_DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert "tolerations" not in spec and "nodeSelector" not in spec


def test_selectors_match_pod_labels(docs: list[Manifest]) -> None:
    deployment = find(docs, "Deployment", "onepass")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind, name in (("Service", "onepass"), ("Service", "onepass-admin")):
        assert find(docs, kind, name)["spec"]["selector"].items() <= labels.items()
    assert find(docs, "PodDisruptionBudget", "onepass")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    redis = find(docs, "Deployment", "onepass-redis")
    assert (
        find(docs, "Service", "onepass-redis")["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )


def test_hpa_owns_replicas(docs: list[Manifest], overlay: str) -> None:
    hpa = find(docs, "HorizontalPodAutoscaler", "onepass")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "onepass"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] == (4 if overlay == "gpu" else 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # With `replicas` in the Deployment, every `kubectl apply` would reset what the HPA chose.
    assert "replicas" not in find(docs, "Deployment", "onepass")["spec"]
    assert "cpu" in _server(docs)["resources"]["requests"], "utilisation needs a CPU request"


def test_rollout_keeps_capacity(docs: list[Manifest], overlay: str) -> None:
    strategy = find(docs, "Deployment", "onepass")["spec"]["strategy"]
    pdb = find(docs, "PodDisruptionBudget", "onepass")["spec"]
    assert strategy["type"] == "RollingUpdate"
    expected = {"maxSurge": 0, "maxUnavailable": 1} if overlay == "gpu" else {"maxSurge": 1, "maxUnavailable": 0}
    assert strategy["rollingUpdate"] == expected
    assert pdb["maxUnavailable"] == 1


def test_model_store_is_a_read_only_many_volume(docs: list[Manifest]) -> None:
    pvc = find(docs, "PersistentVolumeClaim", "onepass-model-store")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    spec = find(docs, "Deployment", "onepass")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": "onepass-model-store", "readOnly": True}
    (mount,) = [m for m in _server(docs)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    assert mount["mountPath"] == _config(docs)["ONEPASS_MODEL_STORE"]


def test_redis_is_a_bounded_lru_cache(docs: list[Manifest]) -> None:
    c = container(docs, "onepass-redis", "redis")
    args = c["args"]
    flags = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i].startswith("--")}
    assert flags["--maxmemory-policy"] == "allkeys-lru"
    assert flags["--save"] == "" and flags["--appendonly"] == "no"
    maxmemory = quantity_bytes(flags["--maxmemory"])
    limit = quantity_bytes(c["resources"]["limits"]["memory"])
    # Redis needs headroom above maxmemory (fragmentation, client buffers) or the kernel kills it first.
    assert limit >= 1.25 * maxmemory
    assert c["readinessProbe"] and c["livenessProbe"]
    assert find(docs, "Deployment", "onepass-redis")["spec"]["replicas"] == 1


def test_pods_carry_prometheus_scrape_annotations(docs: list[Manifest]) -> None:
    annotations = find(docs, "Deployment", "onepass")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PUBLIC_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


# ----------------------------------------------------------------------------------------------------
# Monitoring


def _monitoring(kind: str) -> Manifest:
    docs = [d for p in sorted((K8S / "monitoring").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    (found,) = [d for d in docs if d.get("kind") == kind]
    return found


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:onepass|process)_[a-z0-9_]+)\b", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_service_monitor_scrapes_public_service(rendered: dict[str, list[Manifest]]) -> None:
    monitor = _monitoring("ServiceMonitor")
    svc = find(rendered["cpu"], "Service", "onepass")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    admin = find(rendered["cpu"], "Service", "onepass-admin")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")


def test_alert_rules_cover_errors_latency_cache_and_breaker() -> None:
    groups = _monitoring("PrometheusRule")["spec"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert {"OnepassHighErrorRate", "OnepassHighLatencyP99", "OnepassCacheHitRateLow", "OnepassRedisBreakerOpen"} <= (
        alerts.keys()
    )
    for rule in rules:
        names = _metric_names(rule["expr"]) - {n.replace(":", "_") for n in recorded}
        assert names <= CONTRACT_METRICS, f"{rule.get('alert') or rule.get('record')}: {names - CONTRACT_METRICS}"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in {"page", "ticket"}
        assert alert["annotations"]["summary"]
    assert "onepass_redis_breaker_state" in alerts["OnepassRedisBreakerOpen"]["expr"]
    assert "== 2" in alerts["OnepassRedisBreakerOpen"]["expr"]


def test_grafana_dashboard_has_the_operational_panels() -> None:
    dashboard = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used <= CONTRACT_METRICS, used - CONTRACT_METRICS
    for needed in (
        "onepass_http_requests_total",
        "onepass_http_request_duration_seconds",
        "onepass_cache_lookups_total",
        "onepass_encoder_batch_size",
        "onepass_encoder_duration_seconds",
        "onepass_redis_breaker_state",
        "process_resident_memory_bytes",
    ):
        assert needed in used, needed
    assert any('status=~\\"5..\\"' in json.dumps(e) for e in exprs), "error-rate panel"
    assert any("histogram_quantile(0.5," in e for e in exprs) and any("histogram_quantile(0.99," in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["templating"]["list"][0]["type"] == "datasource"


# ----------------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_is_multi_stage_slim_non_root() -> None:
    text = DOCKERFILE.read_text()
    stages = dockerfile_stages(text)
    assert list(stages) == ["builder", "runtime"]
    runtime = stages["runtime"]
    assert runtime[0] == ("FROM", "python:3.11-slim AS runtime")
    users = [args for instr, args in runtime if instr == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]), "last USER must be numeric"
    # Nothing after USER may switch back to root.
    after_user = runtime[[i for i, (instr, _) in enumerate(runtime) if instr == "USER"][-1] :]
    assert all(instr != "RUN" for instr, _ in after_user)
    # The runtime stage installs nothing with pip: it only copies the builder's venv.
    assert not [args for instr, args in runtime if instr == "RUN" and "pip" in args]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in runtime


def test_dockerfile_selects_torch_build_by_variant() -> None:
    builder = dockerfile_stages(DOCKERFILE.read_text())["builder"]
    args = dockerfile_args(builder)
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"


def test_dockerfile_healthcheck_probes_healthz_without_curl() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    (healthcheck,) = [args for instr, args in instructions if instr == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "urllib.request" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck
    cmd = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "<healthcheck>", "exec")


def test_dockerfile_entrypoint_is_onepass_serve_in_exec_form() -> None:
    instructions = dict(dockerfile_instructions(DOCKERFILE.read_text()))
    # Exec form: the server is PID 1 and gets SIGTERM directly (a shell would swallow it).
    assert json.loads(instructions["ENTRYPOINT"]) + json.loads(instructions["CMD"]) == ["onepass", "serve"]
    assert set(instructions["EXPOSE"].split()) == {str(PUBLIC_PORT), str(ADMIN_PORT)}


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    # An allow-list: everything is excluded first, then only what the image needs is let back in.
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "docker/install.sh", "service", "model_store/README.md"} | {
        "model_store/demo"
    }
    for instr, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if instr == "COPY" and not args.startswith("--from"):
            *sources, _ = [w for w in args.split() if not w.startswith("--")]
            for src in sources:
                assert src.rstrip("/") in allowed or src == "model_store", f"COPY {src} is not in the build context"
