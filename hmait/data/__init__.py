"""Deterministic synthetic data sets in the real on-disk formats, for demos and tests."""
from .imagenet_synthetic import generate_imagenet

__all__ = ['generate_imagenet']
