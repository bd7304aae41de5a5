"""Where the embedded defaults live: one folder, ``ASTROMER_HOME`` (default ``./.astromer``).

Everything local (the lake, MLflow's SQLite database and artifacts, Ray results) sits under it, so a
newcomer's machine needs no service. Point ``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS`` or ``--lake`` elsewhere
and the same commands run on a cluster.
"""
from __future__ import annotations

import os
from pathlib import Path


class EphemeralHome(RuntimeError):
    """The default home would sit in a folder that is deleted when the job ends."""


def home(persistent: bool = True) -> Path:
    """The platform's home folder (created on first use).

    ``ray job submit --working-dir DIR`` runs the job in a temporary copy of DIR that Ray deletes later, so
    there the default ``./.astromer`` would take the lake, the MLflow database and the checkpoints with it.
    Unless ``ASTROMER_HOME`` is set, that is refused for what must persist (``persistent=True``); caches
    (``persistent=False``) may live there.
    """
    configured = os.environ.get("ASTROMER_HOME")
    path = Path(configured or ".astromer").expanduser().resolve()
    if persistent and not configured and in_job_copy(path):
        raise EphemeralHome(
            f"ASTROMER_HOME is not set, and this job runs in the temporary copy of its folder that "
            f"`ray job submit --working-dir` made ({path.parent}): the lake, MLflow's database and the "
            "checkpoints would go when Ray deletes it. Give the job a home that stays, e.g. --runtime-env-json "
            "'{\"env_vars\": {\"ASTROMER_HOME\": \"/abs/path/.astromer\"}}' (or set ASTROMER_LAKE, "
            "MLFLOW_TRACKING_URI and --storage-path each)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def in_job_copy(path: Path) -> bool:
    """Whether ``path`` lies in the copy of a working directory that Ray makes for a submitted job
    (``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*/``)."""
    parts = path.parts
    return any(a == "runtime_resources" and b == "working_dir_files" for a, b in zip(parts, parts[1:]))


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


def ray_address() -> str:
    """Where a job's Ray is: ``$RAY_ADDRESS`` (set by ``ray job submit`` and the local stack's env.sh), else
    ``"local"``, a Ray of its own. Ray's own default would join whatever cluster ``ray start`` last left
    on this machine, even one that is gone: the sweep waited on a killed head's address that way."""
    return os.environ.get("RAY_ADDRESS") or "local"
