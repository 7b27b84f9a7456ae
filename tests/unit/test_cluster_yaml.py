"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema) that installs this project."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and "GPU" not in types[cfg["head_node_type"]]["resources"]
    assert any(t["resources"].get("GPU", 0) >= 8 for t in types.values())  # a node type sized for GRPO
    assert any("constraints.txt" in cmd for cmd in cfg["setup_commands"])  # installs the pinned stack
