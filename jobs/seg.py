"""Ray job: seg training (rau_ray.train.seg) from a YAML config in jobs/configs/.

Run locally: ``python jobs/seg.py --config jobs/configs/seg-tiny.yaml``; on a cluster:
``ray job submit --working-dir . -- python jobs/seg.py --config jobs/configs/seg-paper.yaml``.
"""

from rau_ray.train.jobs import main

if __name__ == "__main__":
    main("seg")
