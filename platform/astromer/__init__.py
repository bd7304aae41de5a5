"""Astromer: light-curve embeddings at survey scale."""
from __future__ import annotations

import os

# Large CPU tensors (a batch of windows' activations is ~50-150 MB) are otherwise mmapped afresh and
# page-faulted on every forward; with transparent huge pages PyTorch's allocator avoids most of that
# kernel time (measured: 28% of a CPU encode spent in page faults without it). It must be set before
# torch allocates anything; set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
