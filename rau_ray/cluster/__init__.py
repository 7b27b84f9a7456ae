"""Cluster operations: job submission to a running Ray cluster (``submit``); the cluster itself is described by
``cluster.yaml`` (Ray cluster launcher) and ``deploy/kuberay/`` (KubeRay RayJob / RayService)."""
