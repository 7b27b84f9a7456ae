"""Ray Tune sweeps over the training jobs (``sweep.py``) and what they leave behind (``results.py``).

Use: ``rau tune --config jobs/configs/tune-seg-tiny.yaml`` (``--resume`` continues an interrupted sweep).
"""
