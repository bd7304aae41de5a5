"""Astromer: light-curve embeddings at survey scale."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(uri_or_path, device="cpu"):
    """An Astromer from a model folder (model.safetensors + config.json) or a registry URI
    ("models:/NAME@ALIAS" or "models:/NAME/VERSION")."""
    from astromer.weights import load_model_dir

    target = str(uri_or_path)
    if target.startswith("models:/"):
        from astromer.registry import resolve_model_dir

        return load_model_dir(resolve_model_dir(target), device=device)
    return load_model_dir(target, device=device)


__all__ = ["__version__", "load_model"]
