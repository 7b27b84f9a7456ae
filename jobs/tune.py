"""Ray job: a Ray Tune sweep over a training job (rau_ray.tune.sweep) from a YAML config in jobs/configs/.

Run locally: ``python jobs/tune.py --config jobs/configs/tune-seg-tiny.yaml [--resume]``; on a cluster:
``ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune-seg-paper.yaml``.
"""

from rau_ray.tune.sweep import main

if __name__ == "__main__":
    main()
