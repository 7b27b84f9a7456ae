"""Ray job: generate a phantom dataset from a YAML config (fields of rau_ray.data.make.MakeConfig).

Run locally: ``python jobs/make_data.py --config jobs/configs/data-tiny.yaml``; on a cluster:
``ray job submit --working-dir . -- python jobs/make_data.py --config jobs/configs/data-tiny.yaml``.
"""

import argparse
import json
import sys

from rau_ray.config import load_config
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.errors import RauError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", help="override the config's output folder")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, MakeConfig, {"out": args.out} if args.out else None)
        print(json.dumps(make_dataset(cfg), indent=2))
    except RauError as e:
        sys.exit(f"error: {e}")
