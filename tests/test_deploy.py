"""deploy/ stays deployable and true to the code: checked offline, without a cluster or a container.

- Kubernetes: every manifest is validated against the Kubernetes JSON schemas (kubernetes-validate,
  strict: unknown fields fail) for the oldest version the manifests target (native sidecars are on
  by default from 1.29) and the newest the package knows; the kustomizations are rendered with
  `kubectl kustomize` where kubectl is installed, and the rendered output is validated too. The
  Prometheus Operator objects (CRDs, in no Kubernetes schema) are checked against the subset of
  their schema used here, and their rules with promtool.
- The pod holds together: a native sidecar, /dev/shm shared and sized from the arena, probes on the
  sidecar's real routes, a grace period that covers preStop and `server.shutdown_timeout_s`, and a
  memory limit equal to `server.memory_limit` and above the config's worst-case memory.
- Prometheus: `promtool check rules`, `promtool check config` and `promtool test rules` (promtool
  comes from Debian's prometheus package, which .ci/run installs: missing, these tests fail).
- Every metric name the alert rules and the Grafana dashboard use is exported by a real sidecar.
- docker compose and the Dockerfile: structure, and that they agree with the configs they carry.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.vllm_offload import PLUGIN_NAME, SUPPORTED_VLLM
from mm_sidecar.cli import build_parser
from mm_sidecar.vllm_engine import EngineCommandError, build_command, check_vllm_args
from preprocess.processors import PRESETS_DIR
from preprocess.protocol import segment_size_for
from sidecar.ceiling import check_limit, memory_ceiling
from sidecar.config import Config, from_mapping, to_mapping

from .conftest import StackFactory, chat_body

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "mm-sidecar.json"
PROMETHEUS_RULE = K8S / "components" / "monitoring" / "prometheusrule.yaml"

# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# The kustomizations a user applies (components are rendered through the overlays that use them).
KUSTOMIZE_ROOTS = ("base", "overlays/passthrough-vllm", "overlays/offload-vllm")
SIDECAR_CONTAINER = "mm-sidecar"
SIDECAR_CONFIG_PATH = "/etc/mm-sidecar/sidecar.yaml"
# What a deployment config may change from config/sidecar.yaml (everything else must not drift).
DEPLOYMENT_KEYS = {("server", "host"), ("server", "memory_limit"), ("upstream", "url")}
# Offload configs that differ from config/sidecar.yaml on purpose beyond DEPLOYMENT_KEYS: the file
# (relative to deploy/) -> each key it may change, and why. Each listed key must actually differ.
OFFLOAD_DRIFT_ALLOWED: dict[str, dict[tuple[str, str], str]] = {
    "k8s/overlays/offload-vllm/sidecar.yaml": {
        ("upstream", "engine"): "vLLM is the engine: answers re-assembled from upgraded streams take its shape",
        ("gate", "max_bytes"): "a real model on a GPU: the arena holds 2 requests of 16 1080p images (2 GiB)",
        (
            "preprocess",
            "transport_dtype",
        ): "uint8 pixels, which vLLM normalises on the device (bench: >= 1.0x from gate 2)",
    },
}


# -- helpers -----------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def quantity_bytes(value: str | int) -> int:
    """A Kubernetes memory quantity (`4608Mi`, `1Gi`, `512M`, plain bytes) in bytes."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i?|k)?", text)
    assert match, f"not a memory quantity: {value!r}"
    return int(match[1]) * units.get(match[2] or "", 1)


def docker_bytes(value: str | int) -> int:
    """A docker size (`1152m`, `4g`: binary units) in bytes."""
    match = re.fullmatch(r"(\d+)([bkmg]?)", str(value).lower())
    assert match, f"not a docker size: {value!r}"
    return int(match[1]) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2]]


def docker_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match, f"not a duration: {value!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


def sidecar_configs() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("sidecar.yaml"))


def load_config(path: Path) -> Config:
    return from_mapping(yaml.safe_load(path.read_text(encoding="utf-8")))


def flat(mapping: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(section, key): value for section, values in mapping.items() for key, value in values.items()}


# -- Kubernetes: files and schemas -------------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def kustomize_inputs() -> dict[str, set[Path]]:
    """Every file the kustomizations name, by role: resources, patches, generator inputs."""
    roles: dict[str, set[Path]] = {"resources": set(), "patches": set(), "generated": set()}
    for kfile in kustomizations():
        spec = yaml.safe_load(kfile.read_text(encoding="utf-8"))
        here = kfile.parent
        for entry in spec.get("resources", []):
            path = (here / entry).resolve()
            if path.is_file():
                roles["resources"].add(path)
            else:
                assert (path / "kustomization.yaml").is_file(), f"{kfile}: resource {entry} is missing"
        for entry in spec.get("components", []):
            assert (here / entry / "kustomization.yaml").is_file(), f"{kfile}: component {entry} is missing"
        for patch in spec.get("patches", []):
            if "path" in patch:
                roles["patches"].add((here / patch["path"]).resolve())
        for generator in spec.get("configMapGenerator", []):
            for entry in generator.get("files", []):
                roles["generated"].add((here / entry.split("=")[-1]).resolve())
    for paths in roles.values():
        for path in paths:
            assert path.is_file(), f"a kustomization names {path}, which does not exist"
    return roles


def test_every_kubernetes_file_is_used_by_a_kustomization() -> None:
    used = set().union(*kustomize_inputs().values(), {p.resolve() for p in kustomizations()})
    present = {p.resolve() for p in K8S.rglob("*") if p.is_file()}
    assert present - used == set(), "files under deploy/k8s that no kustomization uses"
    components = [p for p in kustomizations() if "components" in p.parts]
    assert components, "deploy/k8s/components/monitoring is missing"
    for kfile in components:
        spec = yaml.safe_load(kfile.read_text(encoding="utf-8"))
        assert (spec["apiVersion"], spec["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")


_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "additionalProperties": False,
}
# The parts of the Prometheus Operator CRDs (monitoring.coreos.com/v1) that deploy/ uses, closed
# (additionalProperties: false) so that a misspelt field fails here instead of being ignored by the
# API server. Extend them from the operator's CRDs when a manifest needs another field.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "namespaceSelector": {"type": "object"},
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": _LABELS},
                        "additionalProperties": False,
                    },
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port", "path"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def validate_object(doc: dict[str, Any], where: str) -> None:
    """One Kubernetes object: the Kubernetes schemas, or for a Prometheus Operator CRD, CRD_SCHEMAS."""
    kind = doc.get("kind")
    if str(doc.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
        assert kind in CRD_SCHEMAS, f"{where}: no schema here for {kind}"
        errors = sorted(jsonschema.Draft202012Validator(CRD_SCHEMAS[kind]).iter_errors(doc), key=str)
        assert not errors, f"{where}: {kind}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
        )
        return
    for version in K8S_VERSIONS:
        problem = None
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problem = f"{kind} {doc['metadata']['name']} (Kubernetes {version}): {path}: {exc.message}"
        except kubernetes_validate.SchemaNotFoundError as exc:
            problem = exc.message
        # Outside the except: the validator's exception carries the whole schema, too long to show.
        if problem is not None:
            pytest.fail(f"{where}: {problem}", pytrace=False)


@pytest.mark.parametrize("path", sorted(kustomize_inputs()["resources"]), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_the_schemas(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        validate_object(doc, str(path.relative_to(ROOT)))


@cache
def kubectl() -> str | None:
    exe = shutil.which("kubectl")
    if exe is None:
        return None
    probe = subprocess.run([exe, "kustomize", "--help"], capture_output=True, text=True, check=False)
    return exe if probe.returncode == 0 else None


@cache
def render(root: str) -> tuple[dict[str, Any], ...]:
    exe = kubectl()
    if exe is None:
        pytest.skip("kubectl (with kustomize) is not installed: rendered kustomizations not checked")
    out = subprocess.run([exe, "kustomize", str(K8S / root)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"kubectl kustomize deploy/k8s/{root}:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@pytest.mark.parametrize("root", KUSTOMIZE_ROOTS)
def test_rendered_kustomization_validates(root: str) -> None:
    docs = render(root)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap"}
    for doc in docs:
        validate_object(doc, f"kubectl kustomize deploy/k8s/{root}")


# -- Kubernetes: the pod holds together --------------------------------------------------------


def base_objects() -> list[dict[str, Any]]:
    """deploy/k8s/base + the monitoring component as kustomize would render them, without kubectl:
    the ConfigMap built from its generator's file, under its unhashed name."""
    kfile = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    docs = [doc for entry in kfile["resources"] for doc in load_yaml_docs(K8S / "base" / entry)]
    for generator in kfile["configMapGenerator"]:
        data = {}
        for entry in generator["files"]:
            key, _, name = entry.rpartition("=")
            data[key or Path(name).name] = (K8S / "base" / name).read_text(encoding="utf-8")
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    monitoring = K8S / "components" / "monitoring"
    kcomp = yaml.safe_load((monitoring / "kustomization.yaml").read_text(encoding="utf-8"))
    docs += [doc for entry in kcomp["resources"] for doc in load_yaml_docs(monitoring / entry)]
    return docs


def one(docs: list[dict[str, Any]] | tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def prestop_seconds(container: dict[str, Any]) -> int:
    pre = container.get("lifecycle", {}).get("preStop")
    if pre is None:
        return 0
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    if len(command) == 2 and Path(command[0]).name == "sleep":
        return int(command[1])
    pytest.fail(f"container {container['name']}: preStop must be a sleep to be accounted for, got {pre}")


def check_pod(docs: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> None:
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    # The sidecar is a native sidecar: an init container that keeps running (restartPolicy Always).
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert [c["name"] for c in sidecars] == [SIDECAR_CONTAINER], "mm-sidecar must be the one native sidecar"
    assert all(c["name"] != SIDECAR_CONTAINER for c in pod["containers"])
    sidecar = sidecars[0]
    engines = pod["containers"]
    assert len(engines) == 1, "one engine container beside the sidecar"
    engine = engines[0]

    # Its config: the ConfigMap mounted at /etc/mm-sidecar, as a Config (the real loader).
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert sidecar["args"] == ["serve", "--config", SIDECAR_CONFIG_PATH]
    config_volume = volumes[mounts[str(Path(SIDECAR_CONFIG_PATH).parent)]]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    config_map = configmaps[config_volume["configMap"]["name"]]
    config = from_mapping(yaml.safe_load(config_map["data"][Path(SIDECAR_CONFIG_PATH).name]))

    # Listening where the probes and the Service look for it.
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert config.server.host == "0.0.0.0", "probes and the Service reach the pod's IP, not 127.0.0.1"
    assert ports["http"] == config.server.port
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, f"{probe} must ask {path}"
        assert ports.get(get["port"], get["port"]) == config.server.port, f"{probe} must probe the sidecar's port"

    # The engine is where upstream.url says, on loopback (reachable through the sidecar only).
    host, _, port = config.upstream.url.removeprefix("http://").partition(":")
    assert host == "127.0.0.1", "the engine shares the pod's network namespace: upstream.url is loopback"
    args = engine.get("args", [])
    assert args[args.index("--port") + 1] == port, "the engine's --port must match upstream.url"
    assert args[args.index("--host") + 1] == "127.0.0.1", "the engine must not be reachable around the sidecar"
    assert not engine.get("ports"), "the engine exposes no port: clients go through the sidecar"

    # Memory: the container limit is server.memory_limit, at or above the config's worst case.
    limit = quantity_bytes(sidecar["resources"]["limits"]["memory"])
    ceiling = memory_ceiling(config).total
    assert config.server.memory_limit == limit, "server.memory_limit must equal the container's memory limit"
    assert limit >= ceiling, f"memory limit {limit} is below the config's worst case {ceiling}"
    assert check_limit(config) is None
    assert quantity_bytes(sidecar["resources"]["requests"]["memory"]) == limit

    # Offload: /dev/shm is one memory-backed emptyDir mounted in both containers, sized from the arena.
    if config.upstream.mode == "offload":
        assert config.shm.dir == "/dev/shm"
        shm_volume = mounts["/dev/shm"]
        engine_mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}
        assert engine_mounts.get("/dev/shm") == shm_volume, "the engine must see the sidecar's /dev/shm"
        empty_dir = volumes[shm_volume]["emptyDir"]
        assert empty_dir["medium"] == "Memory"
        size = quantity_bytes(empty_dir["sizeLimit"])
        assert size >= config.gate.max_bytes, "/dev/shm must hold the arena (gate.max_bytes)"
        # A restarted sidecar allocates its new arena while the engine may still map the old one.
        assert size >= 2 * config.gate.max_bytes, "/dev/shm must hold two arenas (see deployment.yaml)"

    # Shutdown: preStop sleeps, then the sidecar drains for up to server.shutdown_timeout_s.
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    sleeps = sum(prestop_seconds(c) for c in containers)
    grace = pod["terminationGracePeriodSeconds"]
    shutdown = config.server.shutdown_timeout_s
    assert grace > shutdown + sleeps, f"terminationGracePeriodSeconds {grace} <= preStop {sleeps} + shutdown {shutdown}"
    assert grace >= shutdown + sleeps + 10, "leave at least 10 s of margin"
    # The engine outlives the requests the sidecar took before the pod left the endpoints.
    assert prestop_seconds(engine) >= shutdown

    # Non-root everywhere; the sidecar's root filesystem is read-only.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for c in containers:
        ctx = c.get("securityContext", {})
        assert ctx.get("allowPrivilegeEscalation") is False, c["name"]
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True

    # The Service exposes the sidecar's port, and only it.
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    targets = {p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
    assert targets <= {config.server.port, "http"}, f"the Service must target the sidecar only, got {targets}"

    # The PodMonitor, where present, scrapes the sidecar's metrics path.
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports
            assert endpoint["path"] == config.metrics.path


def test_base_pod_holds_together() -> None:
    check_pod(base_objects())


@pytest.mark.parametrize("root", KUSTOMIZE_ROOTS)
def test_rendered_pod_holds_together(root: str) -> None:
    check_pod(render(root))


def test_passthrough_overlay_runs_vllm_unmodified() -> None:
    docs = render("overlays/passthrough-vllm")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    assert engine["image"].startswith("vllm/vllm-openai:")
    assert "--port" in engine["args"] and engine["args"][engine["args"].index("--port") + 1] == "8001"
    assert [c["name"] for c in pod["initContainers"]] == [SIDECAR_CONTAINER], "no tiny model in front of vLLM"
    config_map = one(docs, "ConfigMap")
    assert from_mapping(yaml.safe_load(config_map["data"]["sidecar.yaml"])).upstream.mode == "passthrough"
    assert {d["kind"] for d in docs} >= {"PodMonitor", "PrometheusRule"}


def test_offload_overlay_runs_vllm_engine() -> None:
    """vLLM as the offload engine: `mm-sidecar vllm-engine` from deploy/Dockerfile.vllm's image, where
    upstream.url says, sharing the sidecar's /dev/shm (check_pod checks the mounts), with vLLM
    arguments vllm-engine accepts."""
    root = "overlays/offload-vllm"
    docs = render(root)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    assert [c["name"] for c in pod["initContainers"]] == [SIDECAR_CONTAINER], "no tiny model in front of vLLM"
    assert "models" not in {v["name"] for v in pod["volumes"]}
    config = from_mapping(yaml.safe_load(one(docs, "ConfigMap")["data"]["sidecar.yaml"]))
    assert (config.upstream.mode, config.upstream.engine) == ("offload", "vllm")
    assert config.upstream.stream_upgrade, "vLLM acks offloaded requests at a stream's first byte only"

    # The command: vllm-engine (which turns the plugin on), not `vllm serve`; its options parsed by
    # the real CLI parser, so a misspelt or unknown option fails here.
    assert engine["command"] == ["mm-sidecar", "vllm-engine"]
    try:
        options = build_parser().parse_args(["vllm-engine", *engine["args"]])
    except SystemExit:
        pytest.fail(f"mm-sidecar vllm-engine refuses its args {engine['args']} (its message above)", pytrace=False)
    assert f"http://{options.host}:{options.port}" == config.upstream.url
    assert options.shm_dir == config.shm.dir
    assert options.tp == int(engine["resources"]["limits"]["nvidia.com/gpu"]), "one tensor-parallel rank per GPU"
    env = {e["name"]: e["value"] for e in engine.get("env", [])}
    try:
        check_vllm_args(options.vllm_args)
        built = build_command(
            model=options.model,
            port=options.port,
            host=options.host,
            tp=options.tp,
            shm_dir=options.shm_dir,
            vllm_args=options.vllm_args,
            environ=env,
            python="python3",
            pixels=options.pixels,
        )
    except EngineCommandError as exc:
        pytest.fail(f"mm-sidecar vllm-engine would refuse to start: {exc}", pytrace=False)
    assert built.env["MM_SIDECAR_VLLM_OFFLOAD"] == "1"
    # vLLM takes the pixels the sidecar sends (else the sidecar refuses to start: /health's shm.pixels).
    assert options.pixels == config.preprocess.transport_dtype
    # vLLM's per-prompt image limit is the sidecar's.
    (limit,) = [a.partition("=")[2] for a in options.vllm_args if a.startswith("--limit-mm-per-prompt=")]
    assert json.loads(limit) == {"image": config.limits.max_images_per_request}

    # /dev/shm: two arenas (segments: data pages, header and page table) and room for vLLM's own use.
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    room = quantity_bytes(dshm["emptyDir"]["sizeLimit"]) - 2 * segment_size_for(config.gate.max_bytes)
    assert room >= 1 << 30, "leave vLLM at least 1 GiB of /dev/shm beside two arenas (NCCL, multiprocessing)"

    # The image is the one deploy/Dockerfile.vllm builds, named in the overlay's images: entry.
    kfile = yaml.safe_load((K8S / root / "kustomization.yaml").read_text(encoding="utf-8"))
    (image,) = [i for i in kfile["images"] if i["name"] == "mm-sidecar-vllm"]
    assert engine["image"] == f"{image['newName']}:{image['newTag']}"
    assert f"-t mm-sidecar-vllm:{image['newTag']} " in (DEPLOY / "Dockerfile.vllm").read_text()
    assert {d["kind"] for d in docs} >= {"PodMonitor", "PrometheusRule"}


# -- the configs deploy/ carries ---------------------------------------------------------------


@pytest.mark.parametrize("path", sidecar_configs(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_sidecar_config_loads_and_fits_its_limit(path: Path) -> None:
    config = load_config(path)
    assert check_limit(config) is None
    assert config.server.host == "0.0.0.0", "in a container the sidecar must listen on all interfaces"
    if config.upstream.mode == "offload":
        # Same gate, limits and processor as the default config: only where it runs may differ, and
        # what OFFLOAD_DRIFT_ALLOWED names for this file.
        default = flat(to_mapping(from_mapping(yaml.safe_load((ROOT / "config" / "sidecar.yaml").read_text()))))
        mine = flat(to_mapping(config))
        extra = set(OFFLOAD_DRIFT_ALLOWED.get(str(path.relative_to(DEPLOY)), {}))
        allowed = DEPLOYMENT_KEYS | extra
        drift = {k for k in default if k not in allowed and default[k] != mine[k]}
        assert not drift, f"{path.relative_to(ROOT)} drifted from config/sidecar.yaml: {sorted(drift)}"
        stale = {k for k in extra if default[k] == mine[k]}
        assert not stale, (
            f"{path.relative_to(ROOT)} no longer differs in {sorted(stale)}: drop them from OFFLOAD_DRIFT_ALLOWED"
        )


def test_offload_drift_allowances_name_real_configs() -> None:
    for name in OFFLOAD_DRIFT_ALLOWED:
        assert (DEPLOY / name).is_file(), f"OFFLOAD_DRIFT_ALLOWED names {name}, which does not exist"
        assert load_config(DEPLOY / name).upstream.mode == "offload", f"{name}: the drift check covers offload only"


# -- Prometheus ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool is missing: apt-get install prometheus (Debian's package; `make test` installs it)", pytrace=False
        )
    return exe


def run_promtool(promtool: str, *args: str | Path) -> str:
    out = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"promtool {shlex.join(map(str, args))}:\n{out.stdout}{out.stderr}"
    return out.stdout + out.stderr


def test_alert_rules_pass_promtool(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", ALERTS)


def test_prometheus_config_passes_promtool(promtool: str) -> None:
    run_promtool(promtool, "check", "config", PROMETHEUS / "prometheus.yml")


def test_alert_rules_unit_tests_pass(promtool: str) -> None:
    out = run_promtool(promtool, "test", "rules", PROMETHEUS / "alerts.test.yml")
    assert "SUCCESS" in out


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    assert {r["alert"] for r in alert_rules()} <= fired


def test_prometheusrule_carries_the_same_rules(promtool: str, tmp_path: Path) -> None:
    (rule,) = load_yaml_docs(PROMETHEUS_RULE)
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        "deploy/k8s/components/monitoring/prometheusrule.yaml must carry deploy/prometheus/alerts.yml's groups"
    )
    extracted = tmp_path / "prometheusrule-groups.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run_promtool(promtool, "check", "rules", extracted)


def test_alert_rules_name_their_severity() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]


# -- Grafana -------------------------------------------------------------------------------------


def dashboard_panels() -> Iterator[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_is_well_formed() -> None:
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule for promtool to parse."""
    filled = {"$__rate_interval": "5m", "$instance": ".*"}
    rules = []
    for i, query in enumerate(e for e in dashboard_exprs() if not e.startswith("label_values(")):
        expr = query
        for name, value in filled.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", path)


def test_dashboard_shows_what_operators_need() -> None:
    used = referenced_metrics(dashboard_exprs())
    for name in (
        "mm_sidecar_slots_in_use",
        "mm_sidecar_slots_capacity",
        "mm_sidecar_reserved_bytes",
        "mm_sidecar_capacity_bytes",
        "mm_sidecar_queue_depth",
        "mm_sidecar_requests_total",
        "mm_sidecar_rejections_total",
        "mm_sidecar_queue_wait_seconds_bucket",
        "mm_sidecar_upstream_ack_seconds_bucket",
        "mm_sidecar_request_duration_seconds_bucket",
        "mm_sidecar_decode_seconds_bucket",
        "mm_sidecar_preprocess_seconds_bucket",
        "mm_sidecar_upstream_responses_total",
        "mm_sidecar_worker_restarts_total",
        "mm_sidecar_arena_largest_free_bytes",
    ):
        assert name in used, f"the dashboard has no panel for {name}"


# -- metric names: what the rules and the dashboard use is what the sidecar exports ----------------


def referenced_metrics(texts: list[str]) -> set[str]:
    return {name for text in texts for name in re.findall(r"\bmm_sidecar_[A-Za-z0-9_]*[A-Za-z0-9]", text)}


def series_names(exposition: str) -> set[str]:
    """Every series name the exposition can hold: a family's samples, whether or not it has any yet
    (a labelled family shows only its HELP and TYPE until first used)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


@pytest.fixture
async def exported(stack: StackFactory) -> set[str]:
    s = await stack()
    for body in (chat_body(image=False), chat_body(image=True)):
        resp = await s.client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        await resp.read()
    resp = await s.client.get("/metrics")
    assert resp.status == 200
    names = series_names(await resp.text())
    # The exposition was read, with labelled families too (they appear once used).
    assert {"mm_sidecar_requests_total", "mm_sidecar_upstream_ack_seconds_bucket"} <= names
    return names


async def test_alert_rules_use_only_exported_metrics(exported: set[str]) -> None:
    texts = [rule["expr"] for rule in alert_rules()]
    texts += [text for rule in alert_rules() for text in rule["annotations"].values()]
    (prometheus_rule,) = load_yaml_docs(PROMETHEUS_RULE)
    texts += [r["expr"] for g in prometheus_rule["spec"]["groups"] for r in g["rules"]]
    used = referenced_metrics(texts)
    assert len(used) >= 5
    assert used - exported == set(), "alert rules use metrics the sidecar does not export"


async def test_dashboard_uses_only_exported_metrics(exported: set[str]) -> None:
    used = referenced_metrics(dashboard_exprs())
    assert len(used) >= 10
    assert used - exported == set(), "the dashboard uses metrics the sidecar does not export"


def test_metric_name_matching_is_strict() -> None:
    """The check above would catch a bare histogram or counter name, or a misspelt one."""
    exposition = (
        "# HELP mm_sidecar_x_seconds x\n# TYPE mm_sidecar_x_seconds histogram\n"
        "# HELP mm_sidecar_y y\n# TYPE mm_sidecar_y counter\n"
    )
    names = series_names(exposition)
    assert {"mm_sidecar_x_seconds_bucket", "mm_sidecar_y_total"} <= names
    assert not {"mm_sidecar_x_seconds", "mm_sidecar_y", "mm_sidecar_y_count"} & names
    assert referenced_metrics(["histogram_quantile(0.9, rate(mm_sidecar_x_seconds_bucket[5m])) > 1"]) == {
        "mm_sidecar_x_seconds_bucket"
    }


# -- docker compose ----------------------------------------------------------------------------


def test_compose_stack_shares_dev_shm_and_fits_its_config() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    services = compose["services"]
    model, engine, sidecar = services["model"], services["engine"], services["sidecar"]

    # The one-shot model builder writes the volume the engine reads; the engine waits for it.
    assert "make-tiny-model /models/tiny" in " ".join(model["entrypoint"])
    volume = next(v.split(":")[0] for v in model["volumes"] if v.split(":")[1] == "/models")
    assert f"{volume}:/models:ro" in engine["volumes"]
    assert engine["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert engine["command"][:5] == ["engine", "--model", "/models/tiny", "--tp", "2"]
    assert engine["command"][engine["command"].index("--host") + 1] == "0.0.0.0"

    # The sidecar's config is the one mounted at the image's default path.
    (mount,) = [v for v in sidecar["volumes"] if v.split(":")[1] == SIDECAR_CONFIG_PATH]
    config = load_config(DEPLOY / mount.split(":")[0])
    assert "command" not in sidecar, "the image's CMD serves /etc/mm-sidecar/sidecar.yaml"
    assert config.upstream.url == f"http://engine:{engine['command'][engine['command'].index('--port') + 1]}"

    # One /dev/shm: the engine's IPC namespace, joined by the sidecar; sized like the k8s emptyDir.
    assert engine["ipc"] == "shareable"
    assert sidecar["ipc"] == "service:engine"
    assert docker_bytes(engine["shm_size"]) >= 2 * config.gate.max_bytes

    # Memory and shutdown as in Kubernetes; only the sidecar is published.
    assert docker_bytes(sidecar["mem_limit"]) == config.server.memory_limit
    assert config.server.memory_limit is not None
    assert config.server.memory_limit >= memory_ceiling(config).total
    assert docker_seconds(sidecar["stop_grace_period"]) > config.server.shutdown_timeout_s
    assert sidecar["ports"] == [f"{config.server.port}:{config.server.port}"]
    assert "ports" not in engine

    # The monitoring profile mounts the folder prometheus.yml and alerts.yml live in.
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == [f"sidecar:{config.server.port}"]
    assert scrape[0]["metrics_path"] == config.metrics.path


# -- the Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions(name: str = "Dockerfile") -> list[tuple[str, str]]:
    text = (DEPLOY / name).read_text()
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)  # line continuations (and comments inside them)
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_runs_the_sidecar_as_non_root_under_tini() -> None:
    steps = dockerfile_instructions()
    last = {keyword: rest for keyword, rest in steps}
    assert json.loads(last["ENTRYPOINT"]) == ["tini", "--", "mm-sidecar"]
    assert json.loads(last["CMD"]) == ["serve", "--config", SIDECAR_CONFIG_PATH]
    user = last["USER"].split(":")[0]
    assert user not in {"root", "0"}
    # CPU torch by default, another build (CUDA) by --build-arg TORCH_INDEX_URL=..., before the project.
    args = dict(r.split("=", 1) for k, r in steps if k == "ARG" and "=" in r)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [r for k, r in steps if k == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if '--index-url "${TORCH_INDEX_URL}"' in r)
    assert "torch==${TORCH_VERSION}" in runs[torch_step] and args["TORCH_VERSION"] == "2.13.0"
    assert torch_step < next(i for i, r in enumerate(runs) if "pip install -e " in r)
    assert any(k == "RUN" and "tini" in r and "apt-get install" in r for k, r in steps)


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments of every `pip install` (or `python3 -m pip install`) in the RUN steps."""
    out = []
    for keyword, rest in steps:
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, "&&"]:
            if token not in {"&&", "||", ";", "|"}:
                command.append(token)
                continue
            for i in range(len(command) - 1):
                if Path(command[i]).name == "pip" and command[i + 1] == "install":
                    out.append(command[i + 2 :])
            command = []
    return out


def project_install(installs: list[list[str]]) -> list[str]:
    """The one `pip install -e .` (or `-e ".[extra]"`) of the project."""
    found = [a for a in installs if any(x == "-e" and y.split("[")[0] == "." for x, y in itertools.pairwise(a))]
    assert len(found) == 1, f"expected one editable install of the project, found {found}"
    return found[0]


def check_repository_layout(steps: list[tuple[str, str]]) -> None:
    """The source tree under WORKDIR with the repository's layout, installed editable."""
    copies = [r.split() for k, r in steps if k == "COPY"]
    for *sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    workdir = Path(next(r for k, r in steps if k == "WORKDIR"))
    copied = {(workdir / dest).resolve() for *_, dest in copies}
    # The presets are found next to the packages (preprocess/processors.py): the image must keep
    # config/ beside them and install in place (editable), not into site-packages.
    presets = PRESETS_DIR.relative_to(ROOT)
    assert (workdir / presets.parts[0]).resolve() in copied
    for package in ("sidecar", "preprocess", "engine", "mm_sidecar"):
        assert (workdir / package).resolve() in copied
    project_install(pip_installs(steps))
    assert ["pyproject.toml", "setup.py", "README.md", "./"] in copies, (
        "pip install needs pyproject.toml, its readme and setup.py (the compiled modules)"
    )


def dockerignore_patterns(name: str) -> list[str]:
    lines = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_keeps_the_layout_the_code_looks_for() -> None:
    steps = dockerfile_instructions()
    check_repository_layout(steps)
    default_config = next(r.split() for k, r in steps if k == "COPY" and r.endswith(SIDECAR_CONFIG_PATH))
    assert load_config(ROOT / default_config[0]).upstream.url == "http://127.0.0.1:8001"
    ignored = dockerignore_patterns("Dockerfile")
    assert ".venv" in ignored and ".git" in ignored


def test_dockerfile_vllm_adds_the_project_to_vllm_without_touching_torch() -> None:
    """deploy/Dockerfile.vllm: vLLM 0.32's image plus this project, installed so that pip cannot
    replace vLLM's torch (or anything else vLLM pinned), running as the sidecar's uid."""
    steps = dockerfile_instructions("Dockerfile.vllm")
    last = {keyword: rest for keyword, rest in steps}
    args = dict(r.split("=", 1) for k, r in steps if k == "ARG" and "=" in r)
    # A vLLM the plugin accepts, changeable with --build-arg VLLM_IMAGE=...
    assert next(r for k, r in steps if k == "FROM") == "${VLLM_IMAGE}"
    repository, _, tag = args["VLLM_IMAGE"].rpartition(":")
    assert repository == "vllm/vllm-openai" and tag.startswith(f"v{SUPPORTED_VLLM}"), args["VLLM_IMAGE"]

    # The project's install carries --no-deps (or a constraints file), and so does every other pip
    # install here: nothing may resolve a torch, and no torch is named.
    check_repository_layout(steps)
    installs = pip_installs(steps)
    assert installs
    for install in installs:
        constrained = any(a in {"-c", "--constraint"} or a.startswith("--constraint=") for a in install)
        assert "--no-deps" in install or constrained, (
            f"pip install {shlex.join(install)}: --no-deps or a constraints file, or pip may replace vLLM's torch"
        )
        assert not any(re.match(r"torch\b", a) for a in install), f"pip install {shlex.join(install)} names torch"
        assert not any("[" in a for a in install), "no extras: the engine extra pins a torch of its own"
    # Beside the project, only its own declared (pure-Python) dependencies that vLLM does not bring.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in pyproject["project"]["dependencies"]}
    project = project_install(installs)
    takes_value = {"-e", "-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url"}
    extra = [
        a for i, a in enumerate(project) if not a.startswith("-") and (i == 0 or project[i - 1] not in takes_value)
    ]
    assert {re.split(r"[<>=!~;\[ ]", a, maxsplit=1)[0].lower() for a in extra} <= declared, extra

    # The build fails, not vLLM's start-up, if the plugin or the command is not there.
    (install_run,) = [r for k, r in steps if k == "RUN" and project in pip_installs([(k, r)])]
    assert "import engine.vllm_offload" in install_run
    assert PLUGIN_NAME in install_run and "vllm.general_plugins" in install_run
    assert "mm-sidecar vllm-engine --help" in install_run

    # The sidecar's uid (the arena is 0600), the one the pods run as.
    base_user = {k: r for k, r in dockerfile_instructions()}["USER"]
    assert last["USER"] == base_user, f"USER {last['USER']}: the sidecar image's user, {base_user}"
    (deployment,) = [d for d in load_yaml_docs(K8S / "base" / "deployment.yaml") if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(base_user.split(":")[0])
    assert json.loads(last["ENTRYPOINT"]) == ["mm-sidecar", "vllm-engine"]
    assert dockerignore_patterns("Dockerfile.vllm") == dockerignore_patterns("Dockerfile")
