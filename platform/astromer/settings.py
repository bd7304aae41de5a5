"""Where the embedded defaults live: one folder, ``ASTROMER_HOME`` (default ``./.astromer``).

Everything local (the lake, MLflow's SQLite database and artifacts, Ray results) sits under it, so a
newcomer's machine needs no service. Point ``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS`` or ``--lake`` elsewhere
and the same commands run on a cluster.
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The platform's home folder (created on first use)."""
    path = Path(os.environ.get("ASTROMER_HOME", ".astromer")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_lake() -> str:
    """The lake used when ``--lake`` is not given: ``$ASTROMER_LAKE`` or ``ASTROMER_HOME/lake``."""
    return os.environ.get("ASTROMER_LAKE") or str(home() / "lake")


def tracking_uri() -> str:
    """MLflow tracking URI: ``$MLFLOW_TRACKING_URI`` or SQLite under ``ASTROMER_HOME``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> str:
    """Where a local MLflow keeps artifacts (used when the tracking store is the local SQLite file)."""
    return (home() / "mlartifacts").as_uri()


def ray_results_dir() -> Path:
    path = home() / "ray_results"
    path.mkdir(parents=True, exist_ok=True)
    return path
