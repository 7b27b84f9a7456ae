"""Ray job: sft training (rau_ray.train.sft) from a YAML config in jobs/configs/.

Run locally: ``python jobs/sft.py --config jobs/configs/sft-tiny.yaml``; on a cluster:
``ray job submit --working-dir . -- python jobs/sft.py --config jobs/configs/sft-paper.yaml``.
"""

from rau_ray.train.jobs import main

if __name__ == "__main__":
    main("sft")
