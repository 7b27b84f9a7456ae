"""Ray job: the evaluation report (rau_ray.eval.evaluate) from a YAML config in jobs/configs/ and/or flags.

Run locally: ``python jobs/eval.py --config jobs/configs/eval-tiny.yaml --checkpoint runs/train/sft-tiny ...``; on a
cluster: ``ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/eval-paper.yaml``.
Bad input ends with ``error: ...`` and exit status 2.
"""

from rau_ray.eval.evaluate import main

if __name__ == "__main__":
    main()
