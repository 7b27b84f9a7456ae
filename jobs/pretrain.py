"""Ray job: pretrain a tiny backbone (rau_ray.train.pretrain_<backbone>) from a YAML config in jobs/configs/.

Run locally: ``python jobs/pretrain.py sam2 --config jobs/configs/pretrain-sam2-tiny.yaml``; on a cluster:
``ray job submit --working-dir . -- python jobs/pretrain.py dino --config jobs/configs/pretrain-dino-tiny.yaml``.
The same name again resumes an interrupted run from its last checkpoint.
"""

import sys

from rau_ray.train.jobs import main

if __name__ == "__main__":
    backbone = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    if backbone not in ("sam2", "dino", "policy"):
        sys.exit("usage: python jobs/pretrain.py sam2|dino|policy --config FILE [--name N] [--max-steps N]")
    main(f"pretrain-{backbone}")
