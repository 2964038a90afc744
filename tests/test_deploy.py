"""The deployable configs of cluster/deploy/, checked against what the installed packages
themselves accept, without a cloud account, a Kubernetes cluster or a Docker engine.

- Ray cluster launcher (ray-cluster.yaml): Ray's shipped ``ray/autoscaler/ray-schema.json``
  on the file as written, then the offline half of ``ray up`` (``prepare_config`` merges
  the AWS defaults, ``validate_config`` checks the result). The AWS half (AMI, IAM, subnets,
  instance-type resources) needs an AWS account and is not run.
- KubeRay (kuberay/*.yaml): the KubeRay CRD schemas ship in no PyPI package, so the custom
  resources get structural checks: every ``spec``/group key is a KubeRay ``ray.io/v1``
  field (the lists below, from the KubeRay Go API types) and the required ones are there.
  Each cluster spec also goes through the function Ray's in-tree autoscaler applies to a
  live RayCluster (``_derive_autoscaling_config_from_ray_cr``, private to Ray, which ends in
  ``validate_config``), and every pod template is validated, strictly, as a Kubernetes
  ``PodTemplate`` by ``kubernetes-validate`` (skipped where it is not installed).
  The RayService's ``serveConfigV2`` is validated by Ray Serve's own ``ServeDeploySchema``
  and matched against ``serve.app``; the RayJob's entrypoint is parsed by our CLI's parser.
- MLflow + PostgreSQL (mlflow/*.yaml): strict Kubernetes schema validation, the server's
  arguments parsed by ``mlflow server``'s own click command, Services against pod labels
  and ports, Secret references against the Secret, and the tracking URI every Ray pod uses
  against the server's ``--allowed-hosts`` (by MLflow's own host matcher).
- Dockerfile: the base image's Ray version and the pins it installs (it is never built here).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "cluster" / "deploy"
LAUNCHER = DEPLOY / "ray-cluster.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))
MLFLOW_MANIFESTS = sorted((DEPLOY / "mlflow").glob("*.yaml"))

# Where the Dockerfile puts the project inside the image (its WORKDIR).
IMAGE_PROJECT_DIR = "/home/ray/pyrosweep"
# The one name under which Ray pods reach the tracking server (the Service in mlflow/).
TRACKING_URI = "http://mlflow:5000"
KUBERNETES_VERSION = "1.33"

# KubeRay ray.io/v1 fields (ray-operator/apis/ray/v1/*_types.go, KubeRay 1.1 to 1.5).
RAY_CLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "upgradeStrategy",
    "authOptions",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType", "resources", "labels"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts", "resources", "labels",
}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
AUTOSCALER_OPTIONS_FIELDS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
    "env", "envFrom", "volumeMounts", "version",
}
RAY_JOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "deletionPolicy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAY_SERVICE_SPEC_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService", "excludeHeadPodFromServeSvc",
    "managedBy", "deploymentUnhealthySecondThreshold", "serviceUnhealthySecondThreshold",
    "rayClusterDeletionDelaySeconds",
}


def load_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kuberay_resource(kind: str) -> dict:
    """The one KubeRay resource of ``kind`` in kuberay/."""
    found = [doc for path in KUBERAY for doc in load_documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {DEPLOY / 'kuberay'}, found {len(found)}"
    return found[0]


def mlflow_resources(kind: str) -> list[dict]:
    return [doc for path in MLFLOW_MANIFESTS for doc in load_documents(path) if doc["kind"] == kind]


def ray_cluster_specs() -> dict[str, dict]:
    """The Ray cluster of each KubeRay resource: a RayCluster's spec, a RayJob's
    rayClusterSpec and a RayService's rayClusterConfig."""
    return {
        "RayCluster": kuberay_resource("RayCluster")["spec"],
        "RayJob": kuberay_resource("RayJob")["spec"]["rayClusterSpec"],
        "RayService": kuberay_resource("RayService")["spec"]["rayClusterConfig"],
    }


def groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def requests_gpu(container: dict) -> bool:
    limits = container.get("resources", {}).get("limits", {})
    return any(key.endswith("/gpu") and float(value) > 0 for key, value in limits.items())


def dockerfile_images() -> tuple[str, str]:
    """The CPU base image (the ``BASE_IMAGE`` default) and the GPU one (the
    ``--build-arg BASE_IMAGE=...`` the Dockerfile documents)."""
    text = DOCKERFILE.read_text()
    cpu = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    gpu = re.search(r"--build-arg BASE_IMAGE=(\S+)", text).group(1)
    return cpu, gpu


def pyrosweep_images() -> tuple[str, str]:
    """The CPU and GPU pyrosweep images the launcher config runs (the reference the
    KubeRay and MLflow manifests must agree with)."""
    config = yaml.safe_load(LAUNCHER.read_text())
    return config["docker"]["image"], config["available_node_types"]["ray.worker.gpu"]["docker"]["worker_image"]


# --- the Ray cluster launcher -------------------------------------------------------


def test_launcher_config_passes_rays_schema_and_ray_up_checks():
    """The file as written against ray-schema.json; then what ``ray up`` does before it
    talks to AWS: merge the provider's defaults and validate the result."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_launcher_has_a_cpu_head_and_an_autoscaling_gpu_worker_type():
    config = yaml.safe_load(LAUNCHER.read_text())
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {name: node for name, node in node_types.items() if name != config["head_node_type"]}
    gpu_types = [node for node in workers.values() if node["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no worker type offers a GPU"
    for node in gpu_types:
        assert node["min_workers"] == 0 < node["max_workers"]
        assert re.match(r"(g|p)\d", node["node_config"]["InstanceType"]), "not an AWS GPU instance type"
    assert config["max_workers"] == sum(node["max_workers"] for node in workers.values())


def test_launcher_mounts_the_project_where_the_image_keeps_it():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["file_mounts"] == {IMAGE_PROJECT_DIR: "."}
    assert any(f"-c {IMAGE_PROJECT_DIR}/constraints.txt" in command for command in config["setup_commands"])


# --- the Dockerfile -----------------------------------------------------------------


def test_dockerfile_builds_on_the_installed_ray_and_installs_with_the_pins():
    """The base images are the official Ray ones of the installed version (CPU and GPU
    tags, Python 3.11), torch is the project's pin, and the project is installed with
    constraints.txt into the directory the manifests use."""
    text = DOCKERFILE.read_text()
    cpu, gpu = dockerfile_images()
    assert cpu == f"rayproject/ray:{ray.__version__}-py311"
    assert gpu == f"{cpu}-gpu"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.MULTILINE)
    assert "torch==2.13.0" in text and '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
    assert re.search(r"pip install .*-c constraints\.txt \.", text)
    assert f"WORKDIR {IMAGE_PROJECT_DIR}" in text
    for package in ("trainables", "serve", "cluster", "configs"):
        assert re.search(rf"^COPY .*\b{package}/ {package}/$", text, re.MULTILINE), f"{package}/ is not copied"


def test_the_image_has_the_postgresql_driver_the_tracking_server_needs():
    """The MLflow Deployment runs the pyrosweep image against postgresql://: the
    project's dependencies (and so the image) must carry psycopg (SQLAlchemy's default
    driver for that scheme) with its binary build, pinned."""
    import tomllib

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(dep.startswith("psycopg[binary]") for dep in dependencies)
    constraints = (ROOT / "constraints.txt").read_text()
    for package in ("psycopg", "psycopg-binary"):
        assert re.search(rf"^{package}==", constraints, re.MULTILINE | re.IGNORECASE)


def test_every_config_runs_the_same_pyrosweep_image():
    """One image pair everywhere: the GPU tag exactly where a container asks for a GPU."""
    cpu_image, gpu_image = pyrosweep_images()
    assert gpu_image == f"{cpu_image}-gpu"
    pod_specs = [group["template"]["spec"] for spec in ray_cluster_specs().values() for group in groups(spec)]
    pod_specs += [d["spec"]["template"]["spec"] for d in mlflow_resources("Deployment")]
    for pod in pod_specs:
        for container in pod["containers"]:
            assert container["image"] == (gpu_image if requests_gpu(container) else cpu_image), container["name"]


# --- KubeRay ------------------------------------------------------------------------


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_are_ray_io_v1(path):
    kinds = {"raycluster.yaml": "RayCluster", "rayjob-sweep.yaml": "RayJob", "rayservice.yaml": "RayService"}
    (doc,) = load_documents(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kinds[path.name]
    assert doc["metadata"]["name"]


def test_kuberay_spec_fields_are_known():
    assert set(kuberay_resource("RayJob")["spec"]) <= RAY_JOB_SPEC_FIELDS
    assert set(kuberay_resource("RayService")["spec"]) <= RAY_SERVICE_SPEC_FIELDS


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob", "RayService"])
def test_ray_cluster_spec_is_complete_and_autoscaling(owner):
    """Known fields, the required ones, the installed Ray version, a head with no task
    CPUs, a GPU group that scales from 0, and the tracking URI in every Ray container."""
    spec = ray_cluster_specs()[owner]
    assert set(spec) <= RAY_CLUSTER_SPEC_FIELDS
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS_FIELDS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS and {"template", "rayStartParams"} <= set(head)
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS and WORKER_GROUP_REQUIRED <= set(group), group.get("groupName")
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if requests_gpu(g["template"]["spec"]["containers"][0])]
    assert gpu_groups and all(g["minReplicas"] == 0 for g in gpu_groups)
    for group in groups(spec):
        for container in group["template"]["spec"]["containers"]:
            assert {"name": "MLFLOW_TRACKING_URI", "value": TRACKING_URI} in container["env"]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob", "RayService"])
def test_rays_autoscaler_reads_the_cluster_spec(owner):
    """What Ray's in-tree autoscaler derives from the live RayCluster (it validates the
    result against ray-schema.json): a 0-CPU head and a GPU node type it can scale up."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    resource = {"metadata": {"name": "pyrosweep", "namespace": "default"}, "spec": ray_cluster_specs()[owner]}
    config = _derive_autoscaling_config_from_ray_cr(resource)
    node_types = config["available_node_types"]
    assert node_types["headgroup"]["resources"]["CPU"] == 0
    assert any(n["resources"].get("GPU", 0) >= 1 and n["max_workers"] > 0 for n in node_types.values())


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob", "RayService"])
def test_ray_pod_templates_are_valid_kubernetes(owner):
    """Each group's pod template, strictly, as a core/v1 PodTemplate."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for group in groups(ray_cluster_specs()[owner]):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": group["template"]}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


def parse_pyrosweep(command: str) -> argparse.Namespace:
    """``command`` (``pyrosweep SUBCOMMAND ...``) parsed by our CLI's own parser, flags
    as spelt (argparse would otherwise take a prefix of a renamed flag)."""
    from cluster.cli import build_parser

    program, *argv = shlex.split(command)
    assert program == "pyrosweep", command
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands.choices[argv[0]].allow_abbrev = False
    return parser.parse_args(argv)


def test_readme_pyrosweep_commands_parse():
    """Every ``pyrosweep`` command line in cluster/deploy/README.md is one our CLI takes."""
    text = (DEPLOY / "README.md").read_text().replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines() if line.startswith("pyrosweep ")]
    assert commands
    for command in commands:
        parse_pyrosweep(command)


def test_rayjob_entrypoint_is_a_sweep_our_cli_accepts():
    """The entrypoint goes through ``pyrosweep``'s own parser (a renamed flag fails here),
    names a sweep file the image has, and stores results where every node can reach."""
    spec = kuberay_resource("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    args = parse_pyrosweep(spec["entrypoint"])
    assert args.command == "sweep"
    assert args.config.startswith(f"{IMAGE_PROJECT_DIR}/")
    assert (ROOT / args.config.removeprefix(f"{IMAGE_PROJECT_DIR}/")).is_file()
    assert args.address == "auto"
    assert args.tracking_uri == TRACKING_URI
    assert re.match(r"(s3|gs)://", args.storage), "multi-node Tune storage must be shared"


def serve_config() -> dict:
    return yaml.safe_load(kuberay_resource("RayService")["spec"]["serveConfigV2"])


def test_rayservice_serve_config_passes_ray_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config())
    (application,) = schema.applications
    assert application.name == "pyrosweep"
    assert application.import_path == "serve.app:build_app"
    assert application.route_prefix == "/"
    assert application.args == {"model": "models:/hmm-jsb@champion", "tracking_uri": TRACKING_URI, "max_batch_size": 16}
    (deployment,) = application.deployments
    assert deployment.num_replicas == 2
    assert deployment.ray_actor_options.num_cpus == 1


def test_rayservice_application_matches_the_code():
    """``serve.app:build_app`` exists and takes the args (validated by its pydantic model
    where it has one), and the deployment the config tunes is the one the app defines."""
    import importlib
    import typing

    from ray.serve.deployment import Deployment

    (application,) = serve_config()["applications"]
    module_name, _, attribute = application["import_path"].partition(":")
    module = importlib.import_module(module_name)
    builder = getattr(module, attribute, None)
    assert callable(builder), f"{application['import_path']} is not defined"
    (parameter,) = inspect.signature(builder).parameters.values()
    annotation = typing.get_type_hints(builder).get(parameter.name)
    if hasattr(annotation, "model_validate"):
        annotation.model_validate(application["args"])
    defined = {value.name for value in vars(module).values() if isinstance(value, Deployment)}
    assert {d["name"] for d in application["deployments"]} <= defined


# --- MLflow and PostgreSQL on Kubernetes ------------------------------------------------


@pytest.mark.parametrize("path", MLFLOW_MANIFESTS, ids=lambda p: p.name)
def test_mlflow_manifests_are_valid_kubernetes(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in load_documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def workloads() -> list[dict]:
    return mlflow_resources("Deployment") + mlflow_resources("StatefulSet")


def mlflow_container() -> dict:
    (deployment,) = mlflow_resources("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def parse_mlflow_server(argv: list[str]):
    """``mlflow server``'s own click command parses ``argv`` (unknown flags and bad
    values raise) without starting anything."""
    from mlflow.cli import server

    return server.make_context("server", list(argv))


def test_mlflow_server_command_is_one_mlflow_accepts():
    container = mlflow_container()
    assert container["command"] == ["mlflow", "server"]
    params = parse_mlflow_server(container["args"]).params
    assert params["backend_store_uri"].startswith("postgresql://")
    assert params["artifacts_destination"].startswith("s3://")
    assert params["serve_artifacts"] is True
    assert (params["host"], params["port"]) == ("0.0.0.0", 5000)
    defined = {env["name"] for env in container["env"]}
    for arg in container["args"]:
        assert set(re.findall(r"\$\((\w+)\)", arg)) <= defined, f"{arg}: undefined $(VAR)"


def test_launcher_head_mlflow_server_command_is_one_mlflow_accepts():
    config = yaml.safe_load(LAUNCHER.read_text())
    (command,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    argv = shlex.split(command.split("mlflow server", 1)[1].split(">>")[0])
    params = parse_mlflow_server(argv).params
    assert (params["host"], params["port"], params["workers"]) == ("0.0.0.0", 5000, "1")


def test_tracking_server_admits_the_uri_ray_pods_use():
    """Ray pods send ``Host: mlflow:5000``; MLflow rejects Host headers that are not in
    ``--allowed-hosts`` (default: localhost and private IPs only)."""
    from urllib.parse import urlparse

    from mlflow.server.security_utils import is_allowed_host_header

    allowed = parse_mlflow_server(mlflow_container()["args"]).params["allowed_hosts"].split(",")
    uri = urlparse(TRACKING_URI)
    (service,) = [s for s in mlflow_resources("Service") if s["metadata"]["name"] == uri.hostname]
    assert uri.port in {port["port"] for port in service["spec"]["ports"]}
    for host in (uri.netloc, f"{uri.hostname}.default.svc.cluster.local:{uri.port}", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host


def test_services_select_their_pods_and_ports():
    for service in mlflow_resources("Service"):
        selector = service["spec"]["selector"]
        pods = [w["spec"]["template"] for w in workloads() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"Service {service['metadata']['name']} selects {len(pods)} workloads"
        port_names = {p["name"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    for workload in workloads():
        assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    for statefulset in mlflow_resources("StatefulSet"):
        (governing,) = [s for s in mlflow_resources("Service") if s["metadata"]["name"] == statefulset["spec"]["serviceName"]]
        assert governing["spec"]["clusterIP"] == "None"


def test_secret_references_resolve():
    """Every required Secret (and key) a container names is defined in mlflow/; only
    optional ones (cloud credentials) may be left to the user."""
    secrets = {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in mlflow_resources("Secret")}
    containers = [c for w in workloads() for c in w["spec"]["template"]["spec"]["containers"]]
    containers += [c for spec in ray_cluster_specs().values() for g in groups(spec) for c in g["template"]["spec"]["containers"]]
    for container in containers:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                assert ref["key"] in secrets.get(ref["name"], set()), f"{container['name']}: {ref}"
        for source in container.get("envFrom", []):
            ref = source.get("secretRef")
            if ref and not ref.get("optional"):
                assert ref["name"] in secrets, f"{container['name']}: {ref}"
