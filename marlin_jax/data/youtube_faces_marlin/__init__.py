"""TFDS builder ``youtube_faces_marlin``: the MARLIN YouTube-Faces layout as ArrayRecord shards.

Importing this package registers the builder with tensorflow-datasets (TensorFlow not needed).
"""

from marlin_jax.data.youtube_faces_marlin.youtube_faces_marlin_dataset_builder import Builder

__all__ = ["Builder"]
