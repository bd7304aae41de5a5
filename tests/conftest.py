"""Shared fixtures. Real Ray, MLflow, DuckDB, Dask and Zarr run here on small data; nothing is mocked."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ASTROMER_SHARED", ROOT.parent / "shared"))


def tar_bytes(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    """An uncompressed tar in memory of ``(name, data)`` regular files, then a folder entry."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("a-folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return buffer.getvalue()


def shared_path(*parts: str) -> Path:
    """A path under ../shared. Missing data fails the test in CI (CI=true) and skips it elsewhere."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing: CI must run beside ../shared")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def shared():
    return shared_path()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own ASTROMER_HOME unless it sets one, so nothing leaks between tests."""
    if "ASTROMER_HOME" not in os.environ:
        monkeypatch.setenv("ASTROMER_HOME", str(tmp_path_factory.mktemp("astromer_home")))
    yield


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (2 CPUs, like the CI machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_sqlite(tmp_path, monkeypatch):
    """A real MLflow tracking store on SQLite in a temporary folder."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)   # the registry URI is global too: never let an earlier test's store answer
    yield uri
