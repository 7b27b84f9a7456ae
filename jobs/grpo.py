"""Ray job: grpo training (rau_ray.train.grpo) from a YAML config in jobs/configs/.

Run locally: ``python jobs/grpo.py --config jobs/configs/grpo-tiny.yaml``; on a cluster:
``ray job submit --working-dir . -- python jobs/grpo.py --config jobs/configs/grpo-paper.yaml``.
"""

from rau_ray.train.jobs import main

if __name__ == "__main__":
    main("grpo")
