"""deploy/kuberay: RayJob manifests for training / tuning and a RayService for serving, checked for structure:
KubeRay's ray.io/v1 fields, entrypoints and configs that exist, GPUs that the job configs need, volumes that are
declared, the image of the job's role (deploy/Dockerfile's train target for RayJobs, serve for the RayService:
no DeepSpeed / trl there) and the pinned Ray version everywhere, and a Serve config that Ray Serve's own schema
accepts that has the shape of serve_configs/local.yaml and is serve_configs/gpu.yaml itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
KUBERAY = REPO / "deploy" / "kuberay"
PINS = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
CLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy"}
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "submissionMode", "backoffLimit",
               "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "jobId", "metadata",
               "clusterSelector", "submitterPodTemplate", "submitterConfig", "entrypointNumCpus",
               "entrypointNumGpus", "entrypointResources", "suspend", "deletionStrategy", "managedBy", "schedule"}
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService",
                   "excludeHeadPodFromServeSvc"}


def manifests(kind: str) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == kind]
    return found


def pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in
                                                            cluster["workerGroupSpecs"]]


def gpus(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def check_cluster(cluster: dict, where: str, image: str) -> None:
    assert set(cluster) <= CLUSTER_SPEC, f"{where}: unknown RayClusterSpec fields {set(cluster) - CLUSTER_SPEC}"
    assert cluster["rayVersion"] == PINS["ray"], where  # the image's Ray is the one constraints.txt pins
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the submitter / rau submit reach the Jobs API
    assert {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} >= {6379, 8265}
    assert gpus({"template": head["template"]}) == 0, f"{where}: the head has no GPU"
    for spec in pods(cluster):
        (container,) = spec["containers"]
        assert container["image"] == image, f"{where}: every pod runs the project's image of its role"
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, f"{where}: Guaranteed QoS (requests == limits) so Ray's resources are real"
        declared = {v["name"] for v in spec.get("volumes", [])}
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounted <= declared, f"{where}: mounts {mounted - declared} without a volume"
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in CLAIMS, f"{where}: unknown PVC"
        if int(limits.get("nvidia.com/gpu", 0)):
            assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", [])), where
            assert "dshm" in mounted, f"{where}: GPU pods get a memory-backed /dev/shm for NCCL"
        assert spec["serviceAccountName"] in ACCOUNTS, f"{where}: storage access via the service account"
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


STORAGE = list(yaml.safe_load_all((KUBERAY / "storage.yaml").read_text()))
CLAIMS = {d["metadata"]["name"] for d in STORAGE if d["kind"] == "PersistentVolumeClaim"}
ACCOUNTS = {d["metadata"]["name"] for d in STORAGE if d["kind"] == "ServiceAccount"}


def test_every_manifest_is_ray_io_v1_with_known_fields():
    docs = [doc for path in KUBERAY.glob("*.yaml") for doc in yaml.safe_load_all(path.read_text()) if doc]
    kinds = {d["kind"] for d in docs}
    assert {"RayJob", "RayService", "PersistentVolumeClaim"} <= kinds
    for doc in docs:
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"} or doc["kind"] == "ServiceAccount"
        assert doc["apiVersion"] == ("ray.io/v1" if doc["kind"].startswith("Ray") else "v1")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # a DNS-1123 name


@pytest.mark.parametrize("path,job", manifests("RayJob"), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_rayjob_runs_a_jobs_entrypoint_that_fits_its_cluster(path, job):
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"{path.name}: unknown RayJob fields {set(spec) - RAYJOB_SPEC}"
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode") and spec["shutdownAfterJobFinishes"] is True
    check_cluster(spec["rayClusterSpec"], path.name, "rau-ray:0.1.0-train")
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]) and (REPO / argv[1]).is_file()
    config_path = REPO / argv[argv.index("--config") + 1]
    assert config_path.is_file(), f"{path.name}: {config_path} missing"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/rau-ray"  # deploy/Dockerfile's WORKDIR
    assert {".git", ".venv", "runs"} <= set(runtime_env["excludes"])
    config = yaml.safe_load(config_path.read_text())
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    if "scale" in config:  # a training job: all its GPU workers at once
        scale = config["scale"]
        assert scale["use_gpu"]
        assert scale["num_workers"] * scale["gpus_per_worker"] <= sum(gpus(g) * g["maxReplicas"] for g in groups)
        assert str(scale["storage_path"]).startswith(("s3://", "gs://", "/mnt/shared"))  # every pod reaches it
    else:  # a sweep: max_concurrent_trials trials of `resources` each
        need = config["max_concurrent_trials"] * config["resources"]["num_workers"] * config["resources"].get(
            "gpus_per_worker", 1)
        assert need <= sum(gpus(g) * g["maxReplicas"] for g in groups)
        assert config["storage_path"].startswith(("s3://", "gs://", "/mnt/shared"))  # every pod reaches it


def serve_config(service: dict) -> dict:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema for a multi-application config
    return config


def test_rayservice_mirrors_the_serve_configs():
    ((path, service),) = manifests("RayService")
    spec = service["spec"]
    assert set(spec) <= RAYSERVICE_SPEC, f"unknown RayService fields {set(spec) - RAYSERVICE_SPEC}"
    check_cluster(spec["rayClusterConfig"], path.name, "rau-ray:0.1.0-serve")
    config = serve_config(service)
    assert config["http_options"]["host"] == "0.0.0.0" and config["proxy_location"] == "EveryNode"
    local = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    (app,), (local_app,) = config["applications"], local["applications"]
    assert app["import_path"] == local_app["import_path"] and app["route_prefix"] == local_app["route_prefix"]
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in local_app["deployments"]]
    assert set(app["args"]) <= set(local_app["args"]) - {"auth_off_on_loopback"} | {
        "policy_checkpoint", "segmenter_checkpoint", "max_new_tokens", "embedding_cache", "api_keys_file",
        "max_sessions_per_key", "requests_per_minute_per_key"}
    assert app["args"]["profile"] == "paper" and app["args"]["device"] == "cuda"
    need = sum(d["ray_actor_options"].get("num_gpus", 0) * d["autoscaling_config"]["min_replicas"]
               for d in app["deployments"])
    groups = spec["rayClusterConfig"]["workerGroupSpecs"]
    assert need <= sum(gpus(g) * g["minReplicas"] for g in groups)  # the minimum replicas fit the minimum pods
    # one config for VMs and Kubernetes: serveConfigV2 is serve_configs/gpu.yaml
    assert config == yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text())
    mounts = {m["mountPath"] for spec in pods(spec["rayClusterConfig"]) for m in spec["containers"][0]["volumeMounts"]}
    for key in ("bank_dir", "policy_checkpoint", "segmenter_checkpoint", "api_keys_file"):  # each on a volume
        assert app["args"][key].startswith(("s3://", "gs://")) or any(app["args"][key].startswith(m + "/")
                                                                      for m in mounts), key


def test_dockerfile_builds_the_pinned_stack():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{PINS['ray']}-py311-gpu AS base" in text
    assert f"torch=={PINS['torch']}" in text and "-c constraints.txt" in text
    assert "WORKDIR /home/ray/rau-ray" in text
    # one target per role: each stage's install of the project, with faiss-gpu and its role's extra only
    stages = dict(re.findall(r"^FROM base AS (\w+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    assert set(stages) == {"serve", "train"}
    installs = {name: re.findall(r"-e '\.\[([a-z,]+)\]'", body) for name, body in stages.items()}
    assert installs == {"serve": ["gpu,serve"], "train": ["gpu,train"]}
    assert "vllm" in stages["train"] and "vllm" not in stages["serve"]  # GRPO's use_vllm (grpo-paper.yaml)
    assert {".git", ".venv", "runs"} <= set((REPO / ".dockerignore").read_text().split())


def test_serving_clusters_run_serve_in_the_mode_embedded_clusters_use():
    """Every RayService container and cluster.yaml's Docker run options set exactly ray_session.SERVE_ENV."""
    from rau_ray.ray_session import SERVE_ENV

    for path, service in manifests("RayService"):
        cluster = service["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for pod in pods:
            for container in pod["template"]["spec"]["containers"]:
                env = {e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith("RAY_SERVE_")}
                assert env == SERVE_ENV, (path.name, container["name"], env)
    options = yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["run_options"]
    env = dict(o.split(None, 1)[1].split("=", 1) for o in options if o.startswith("-e RAY_SERVE_"))
    assert env == SERVE_ENV, env
