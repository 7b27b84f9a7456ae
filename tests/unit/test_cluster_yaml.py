"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and config preparation) sized for the
paper profile, and it installs this project on every node with the extras of the node's role."""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def setup_commands(cfg, node_type: str) -> list[str]:
    """What `ray up` runs on a node of this type: the head's, or the type's own worker commands (else the global)."""
    if node_type == cfg["head_node_type"]:
        return cfg["setup_commands"] + cfg["head_setup_commands"]
    own = cfg["available_node_types"][node_type].get("worker_setup_commands")
    return cfg["setup_commands"] + (own if own is not None else cfg["worker_setup_commands"])


def extras(commands: list[str]) -> set[str]:
    """The extras of the project's `pip install ... -e '.[a,b]'` in these commands (one install of it)."""
    (found,) = [m.group(1) or "" for c in commands for m in [re.search(r"-e '?\.(?:\[([a-z,]+)\])?'?(?:\s|$)", c)]
                if m]
    return set(filter(None, found.split(",")))


def test_cluster_yaml_matches_rays_schema(cfg):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and "GPU" not in types[cfg["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) >= 8 for t in types.values())  # a node type sized for GRPO
    for node_type in types:  # every node installs the pinned stack
        assert any("-c constraints.txt" in cmd for cmd in setup_commands(cfg, node_type)), node_type


def test_ray_up_would_accept_it(cfg):
    """What `ray up` does before launching: merge the provider's defaults, then validate (schema + node types)."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws" and prepared["head_node_type"] == "head-cpu"
    # our setup commands replace the defaults' (which would pip install a nightly Ray)
    assert all("ray-wheels" not in c for c in prepared["head_setup_commands"] + prepared["worker_setup_commands"])


def test_node_types_fit_the_paper_jobs(cfg):
    types = cfg["available_node_types"]
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert all(0 <= t["min_workers"] <= t["max_workers"] for t in workers.values())
    gpus_per_node = max(t["resources"].get("GPU", 0) for t in workers.values())
    for job in ("sft", "grpo", "seg"):  # a paper job's workers fit on one training node, one GPU each
        scale = yaml.safe_load((REPO / f"jobs/configs/{job}-paper.yaml").read_text())["scale"]
        assert scale["use_gpu"] and scale["num_workers"] * scale["gpus_per_worker"] <= gpus_per_node
        assert scale["cpus_per_worker"] * scale["num_workers"] <= max(
            t["resources"]["CPU"] for t in workers.values() if t["resources"].get("GPU", 0) >= 8)
    serve = [t for t in workers.values() if t["resources"].get("GPU") == 1]
    assert serve and serve[0]["max_workers"] >= 2  # smaller GPUs for Serve replicas, scaled out


def test_image_and_install_match_the_pinned_stack(cfg):
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    for image in (cfg["docker"]["head_image"], cfg["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{pins['ray']}-py311")  # the driver's Ray == the cluster's
    for node_type in cfg["available_node_types"]:
        setup = " ".join(setup_commands(cfg, node_type))
        assert f"torch=={pins['torch']}" in setup and f"torchvision=={pins['torchvision']}" in setup, node_type
    # the repository is uploaded to every node, without the venv and outputs
    assert list(cfg["file_mounts"].values()) == ["."] and "~/rau-ray" in cfg["file_mounts"]
    assert {".git", ".venv", "runs"} <= set(cfg["rsync_exclude"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "$RAY_HEAD_IP" in " ".join(cfg["worker_start_ray_commands"])


def test_each_node_type_installs_its_role(cfg):
    """Serving nodes get [serve] without DeepSpeed / trl ([train]); GPU nodes faiss-gpu ([gpu]), CPU nodes
    faiss-cpu ([cpu]), never both (they install the same module); training nodes and the head (where job drivers
    load GRPO's config) get vLLM for use_vllm."""
    types = cfg["available_node_types"]
    roles = {name: extras(setup_commands(cfg, name)) for name in types}
    assert roles["head-cpu"] == {"cpu", "serve", "train"}  # job drivers, the Tune controller, the Serve proxy
    assert roles["gpu-train-8x"] == {"gpu", "train"}
    assert roles["gpu-serve"] == {"gpu", "serve"}
    assert roles["cpu-data"] == {"cpu"}
    for name, role in roles.items():
        assert len(role & {"cpu", "gpu"}) == 1, name  # one faiss build
        assert ("gpu" in role) == ("GPU" in types[name]["resources"]), name
    with_vllm = {name for name in types if any("vllm" in c for c in setup_commands(cfg, name))}
    assert with_vllm == {"head-cpu", "gpu-train-8x"}
