"""Astromer: light-curve embeddings at survey scale."""
__version__ = "0.1.0"
