"""deploy/kubernetes and deploy/kserve: no cluster here, so every standard resource is validated against
Kubernetes' own schemas (kubernetes-validate, strict), every YAML file under deploy/ is linted (yamllint),
the custom resources are checked for their documented fields, and the objects are checked against each
other and against kiln itself: its CLI parser, the Dockerfile, the metrics it exports."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from yamllint import linter
from yamllint.config import YamlLintConfig

from conftest import REPO_ROOT
from server.cli import build_parser
from server.health import LIVENESS_SERVICE
from server.metrics import FAMILIES
from server.runtime import BACKENDS
from test_dockerfile import exec_form, values

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
KUBERNETES_VERSION = "1.30"  # the oldest release these manifests target (gRPC probes are GA since 1.27)
CUSTOM_KINDS = {"ServiceMonitor", "ServingRuntime", "InferenceService"}
# KServe model format -> the config.pbtxt platform kiln serves it with
KSERVE_FORMATS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests(folder: Path) -> list[tuple[str, dict]]:
    return [(p.relative_to(REPO_ROOT).as_posix(), doc) for p in sorted(folder.rglob("*.yaml")) for doc in documents(p)]


ALL = manifests(KUBERNETES) + manifests(KSERVE)


def one(kind: str, name: str | None = None, path: str | None = None) -> dict:
    found = [doc for p, doc in ALL if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
             and (path is None or p == path)]
    assert len(found) == 1, f"expected one {kind} {name or ''} {path or ''}, found {len(found)}"
    return found[0]


def deployments() -> dict[str, dict]:
    """path -> Deployment: the CPU one and its GPU variant."""
    return {p: doc for p, doc in ALL if doc["kind"] == "Deployment"}


def container(pod_spec: dict) -> dict:
    (only,) = pod_spec["containers"]
    return only


def serve_args(image: str, args: list[str]):
    """What `kiln serve` makes of the image's entrypoint followed by the manifest's args (as Kubernetes runs it)."""
    stage = image.rsplit(":", 1)[1]
    return build_parser().parse_args(exec_form(stage, "ENTRYPOINT")[1:] + args)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def port_number(ports: list[dict], name: str) -> int:
    (port,) = [p["containerPort"] for p in ports if p["name"] == name]
    return port


# ---- schemas and lint


@pytest.mark.parametrize("path,doc", [(p, d) for p, d in ALL if d["kind"] not in CUSTOM_KINDS],
                         ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}")
def test_standard_resources_are_valid_kubernetes(path, doc):
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{path}: {doc['apiVersion']} {doc['kind']} is not a Kubernetes {KUBERNETES_VERSION} resource")


def test_every_piece_of_the_deployment_is_there():
    kinds = {doc["kind"] for path, doc in ALL if path.startswith("deploy/kubernetes/")}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
                     "PersistentVolumeClaim", "ServiceMonitor"}
    assert set(deployments()) == {"deploy/kubernetes/deployment.yaml", "deploy/kubernetes/gpu/deployment.yaml"}
    assert {doc["kind"] for path, doc in ALL if path.startswith("deploy/kserve/")} == {"ServingRuntime", "InferenceService"}


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), REPO_ROOT / ".yamllint", REPO_ROOT / ".hadolint.yaml"])


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_yamllint_passes(path):
    config = YamlLintConfig(file=str(REPO_ROOT / ".yamllint"))
    problems = list(linter.run(path.read_text(), config, str(path.relative_to(REPO_ROOT))))
    assert not problems, "\n".join(f"{path.name}:{p.line}:{p.column} {p.level} {p.desc} ({p.rule})" for p in problems)


def test_yamllint_config_catches_problems():
    config = YamlLintConfig(file=str(REPO_ROOT / ".yamllint"))
    bad = "a: 1\na: 2\nb: " + "x" * 130 + "\nc:   [1,2]\n"
    rules = {p.rule for p in linter.run(bad, config)}
    assert {"key-duplicates", "line-length", "colons"} <= rules


# ---- the Deployment and kiln


@pytest.mark.parametrize("path", sorted(deployments()))
def test_deployment_args_parse_with_kiln_and_match_ports_probes_and_volume(path):
    pod = deployments()[path]["spec"]["template"]["spec"]
    kiln = container(pod)
    args = serve_args(kiln["image"], kiln["args"])  # every flag exists (argparse exits otherwise)
    assert args.host == "0.0.0.0"
    assert port_number(kiln["ports"], "grpc") == args.grpc_port
    assert port_number(kiln["ports"], "metrics") == args.metrics_port
    assert kiln["readinessProbe"]["grpc"] == {"port": args.grpc_port, "service": ""}  # ServerReady
    # health "" is NOT_SERVING while models load: a liveness probe on it would restart loading pods
    assert kiln["livenessProbe"]["grpc"] == {"port": args.grpc_port, "service": LIVENESS_SERVICE}  # ServerLive
    mounts = {m["mountPath"]: m for m in kiln["volumeMounts"]}
    assert mounts[str(args.model_repository)]["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(args.model_repository)]["name"])
    one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    if kiln["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts  # tempfile's directory must stay writable


@pytest.mark.parametrize("path", sorted(deployments()))
def test_pod_outlives_prestop_and_the_drain(path):
    pod = deployments()[path]["spec"]["template"]["spec"]
    kiln = container(pod)
    grace = serve_args(kiln["image"], kiln["args"]).grace_period
    command = kiln["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] in ("/bin/sleep", "sleep") and len(command) == 2  # python:3.11-slim and Ubuntu have it
    pre_stop = float(command[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


@pytest.mark.parametrize("path", sorted(deployments()))
def test_runs_as_the_images_non_root_user(path):
    pod = deployments()[path]["spec"]["template"]["spec"]
    kiln = container(pod)
    stage = kiln["image"].rsplit(":", 1)[1]
    (user,) = values(stage, "USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert kiln["securityContext"]["allowPrivilegeEscalation"] is False
    assert kiln["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_gpu_variant_is_the_same_deployment_on_a_gpu():
    cpu = deployments()["deploy/kubernetes/deployment.yaml"]
    gpu = deployments()["deploy/kubernetes/gpu/deployment.yaml"]
    # same name and labels: the Services, HPA, PDB and ServiceMonitor cover whichever is applied
    assert gpu["metadata"] == cpu["metadata"] and gpu["spec"]["selector"] == cpu["spec"]["selector"]
    assert gpu["spec"]["template"]["metadata"] == cpu["spec"]["template"]["metadata"]
    cpu_kiln, gpu_kiln = container(cpu["spec"]["template"]["spec"]), container(gpu["spec"]["template"]["spec"])
    for key in ("args", "ports", "readinessProbe", "livenessProbe", "lifecycle", "volumeMounts", "securityContext"):
        assert gpu_kiln[key] == cpu_kiln[key], key
    assert cpu_kiln["image"].endswith(":cpu") and gpu_kiln["image"].endswith(":gpu")
    assert int(gpu_kiln["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "nvidia.com/gpu" not in cpu_kiln["resources"].get("limits", {})
    assert "[gpu,tensorrt" in values("gpu-builder", "RUN")[0]  # the gpu image has onnxruntime-gpu and TensorRT


@pytest.mark.parametrize("path", sorted(deployments()))
def test_resources_are_requested_and_limited(path):
    kiln = container(deployments()[path]["spec"]["template"]["spec"])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(kiln["resources"][kind]), kind
    assert kiln["resources"]["limits"]["memory"] == kiln["resources"]["requests"]["memory"]


# ---- Services, PDB, ServiceMonitor select the pods


def pod_labels() -> dict[str, str]:
    deployment = one("Deployment", "kiln", "deploy/kubernetes/deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    return labels


def test_services_select_the_pods_and_target_named_container_ports():
    kiln = container(one("Deployment", "kiln", "deploy/kubernetes/deployment.yaml")["spec"]["template"]["spec"])
    container_ports = {p["name"]: p["containerPort"] for p in kiln["ports"]}
    services = {doc["metadata"]["name"]: doc for _, doc in ALL if doc["kind"] == "Service"}
    assert set(services) == {"kiln", "kiln-headless"}
    for service in services.values():
        assert matches(service["spec"]["selector"], pod_labels())
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
            assert port["port"] == container_ports[port["targetPort"]]  # same numbers inside and outside
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["appProtocol"] == "grpc"
    assert services["kiln"]["spec"]["type"] == "ClusterIP"
    assert services["kiln-headless"]["spec"]["clusterIP"] == "None"


def test_pdb_selects_the_pods():
    pdb = one("PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels())
    assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])


def test_servicemonitor_scrapes_the_metrics_port_of_exactly_one_service():
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [doc for _, doc in ALL if doc["kind"] == "Service"
                and matches(monitor["spec"]["selector"]["matchLabels"], doc["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["kiln"]  # each pod scraped once
    (endpoint,) = monitor["spec"]["endpoints"]
    service_port = next(p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"])
    assert service_port["targetPort"] == "metrics"
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    assert re.fullmatch(r"\d+s", endpoint["interval"])


# ---- autoscaling on kiln's own metric


def adapter_rules() -> list[dict]:
    config = one("ConfigMap", "kiln-prometheus-adapter-rules")
    return yaml.safe_load(config["data"]["config.yaml"])["rules"]


def adapter_series(rule: dict) -> str:
    match = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"])
    assert match, rule["seriesQuery"]
    return match.group(1)


def test_hpa_scales_the_deployment_on_the_adapters_metric():
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kiln"}
    assert hpa["spec"]["minReplicas"] >= 2  # the PDB can then always let one pod go
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    published = {rule["name"]["as"]: rule for rule in adapter_rules()}
    assert metric["pods"]["metric"]["name"] in published


def test_adapter_rule_maps_a_metric_kiln_exports_to_pods():
    for rule in adapter_rules():
        series = adapter_series(rule)
        assert FAMILIES.get(series) == "gauge", f"{series} is not a gauge kiln exports"
        assert re.fullmatch(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]


def test_adapter_series_is_on_a_live_servers_metrics_page(start_server, bundled_repo):
    server = start_server(bundled_repo)
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    for rule in adapter_rules():
        family = families[adapter_series(rule)]
        assert family.type == "gauge" and {s.labels["model"] for s in family.samples} == {"mlp", "digits"}


# ---- KServe


def runtimes() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in ALL if doc["kind"] == "ServingRuntime"}


def image_extras(image: str) -> set[str]:
    """The pyproject extras the Dockerfile stage named by the image tag installs."""
    stage = image.rsplit(":", 1)[1]
    (mount,) = re.findall(r"--mount=type=bind,from=([\w-]+)", "\n".join(values(stage, "RUN")))
    (wheel,) = values(mount, "RUN")
    found = re.search(r"/src\[([\w,]+)", wheel)
    return set(found.group(1).split(",")) if found else set()


@pytest.mark.parametrize("name", ["kiln", "kiln-gpu"])
def test_serving_runtime(name):
    runtime = runtimes()[name]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    assert any(f.get("autoSelect") for f in spec["supportedModelFormats"])
    (kserve_container,) = spec["containers"]
    assert kserve_container["name"] == "kserve-container"
    # the container is a valid core/v1 Container
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [kserve_container]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    args = serve_args(kserve_container["image"], kserve_container["args"])
    assert str(args.model_repository) == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert args.host == "0.0.0.0"
    assert port_number(kserve_container["ports"], "h2c") == args.grpc_port
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)
    extras = image_extras(kserve_container["image"])
    for model_format in spec["supportedModelFormats"]:
        assert set(model_format) <= {"name", "version", "autoSelect", "priority"}
        platform = KSERVE_FORMATS[model_format["name"]]
        needed = re.findall(r"\[(\w+)\]", BACKENDS[platform].package)
        assert set(needed) <= extras, f"{name}: {model_format['name']} needs {needed}, image has {extras}"
        if "priority" in model_format:
            assert model_format["priority"] >= 1 and model_format.get("autoSelect")


def test_gpu_runtime_has_a_gpu():
    (kserve_container,) = runtimes()["kiln-gpu"]["spec"]["containers"]
    assert int(kserve_container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "tensorrt" in {f["name"] for f in runtimes()["kiln-gpu"]["spec"]["supportedModelFormats"]}


def test_one_runtime_is_picked_automatically_per_format():
    for model_format in KSERVE_FORMATS:
        automatic = [name for name, rt in runtimes().items() for f in rt["spec"]["supportedModelFormats"]
                     if f["name"] == model_format and f.get("autoSelect")]
        assert len(automatic) == 1, (model_format, automatic)


def test_inference_service_uses_the_kiln_runtime_over_grpc_v2():
    service = one("InferenceService")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    runtime = runtimes()[model["runtime"]]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["ports"] == runtime["spec"]["containers"][0]["ports"]
    scheme, _, rest = model["storageUri"].partition("://")
    assert scheme in {"pvc", "gs", "s3", "https", "hdfs", "webhdfs"} and rest
    if scheme == "pvc":
        one("PersistentVolumeClaim", rest.split("/")[0])  # the claim deploy/kubernetes creates
