"""Data layer: anatomy phantoms, medical file formats, the manifest of 2D samples, importers.

Knows nothing of models, training or serving. Everything above it reads datasets only through
``rau_ray.data.manifest`` (one JSON object per 2D sample, paths relative to the manifest).
"""
