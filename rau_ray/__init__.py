"""RAU-Ray: train, tune and serve reference-based anatomical understanding models on Ray.

Layers, lowest first (a lower layer never imports a higher one):
``data`` (phantoms, formats, manifest) -> ``models`` -> ``train`` / ``eval`` -> ``tune`` -> ``serve``.
Only ``rau_ray.cli``, ``rau_ray.demo`` and ``jobs/*.py`` wire layers together.
"""

__version__ = "0.1.0"
