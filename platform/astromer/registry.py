"""MLflow names, model logging, registration, aliases and loading by URI.

A model is always a folder with ``model.safetensors`` + ``config.json`` (see ``astromer.weights``). In MLflow it
is logged as a pyfunc model whose artifact ``model_dir`` is that folder; the pyfunc's ``predict`` embeds light
curves. Nothing here pickles weights: the pyfunc class is stored by reference and loads safetensors.

Registry rules: every new version gets the alias ``candidate``; ``production`` moves to a
version only when its validation RMSE (a version tag) beats the current production version's.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from astromer import settings

log = logging.getLogger(__name__)

ASTROMER1_MACHO = "astromer1-macho"
CANDIDATE = "candidate"
PRODUCTION = "production"
VAL_RMSE_TAG = "val_rmse"
#: version tag: the digest of the validation windows its val_rmse was scored on (astromer.data.validation_digest)
VAL_SET_TAG = "val_set"

# experiment names
PRETRAIN_EXPERIMENT = "astromer-pretrain"
FINETUNE_EXPERIMENT = "astromer-finetune"
IMPORT_EXPERIMENT = "astromer-imports"

MODEL_DIR_ARTIFACT = "model_dir"   # key of the pyfunc artifact holding model.safetensors + config.json
MODEL_FILES = ("model.safetensors", "config.json")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")   # a registered name, or a corpus inside one
_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


def validate_model_name(name: str) -> str:
    """``name`` when it can be a registered model's name (letters, digits, '.', '_' or '-'; it goes into
    models:/ URIs and registry filter strings), else a ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    return name


def pretrained_name(corpus: str) -> str:
    """Registered name of an Astromer 2 pretrained on ``corpus`` (a lake or survey mix name)."""
    if not _NAME.fullmatch(corpus or ""):
        raise ValueError(f"corpus name {corpus!r} must be letters, digits, '.', '_' or '-'")
    return f"astromer2-{corpus}"


# --------------------------------------------------------------------------- tracking

def setup_tracking(uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (default: ``settings.tracking_uri()``: $MLFLOW_TRACKING_URI or SQLite under
    ASTROMER_HOME) for tracking and the registry. Returns the URI."""
    uri = uri or settings.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # a model is two files of a few MB: MLflow's per-transfer progress bars were all that jobs printed of it
    # (MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true brings them back)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if missing. With a local store its artifacts go under
    ASTROMER_HOME/mlartifacts (not ./mlruns in whatever folder the job was started from)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if _is_local_store(mlflow.get_tracking_uri()):
        location = f"{settings.artifact_root()}/{name}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:   # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def find_run(experiment: str, run_name: str) -> str | None:
    """The id of the newest run called ``run_name`` in ``experiment`` (how a resumed job finds its run)."""
    runs = MlflowClient().search_runs(
        [experiment_id(experiment)], filter_string=f"tags.`mlflow.runName` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


# --------------------------------------------------------------------------- pyfunc flavour

# MLflow asks every PythonModel for type hints on predict (they switch on its own input validation) with a
# warning that its own "once" filter lets through on every import: two lines on every command's stderr. This
# model validates its input itself (curves_from_frame), so the warning is recorded here and dropped.
with warnings.catch_warnings(record=True):
    class AstromerEmbedder(mlflow.pyfunc.PythonModel):
        """pyfunc flavour: ``predict`` turns light curves into embeddings.

        Input: a DataFrame with list-valued columns ``mjd``, ``mag`` and optionally ``err`` (one row per curve), or
        a list of ``(mjd, mag[, err])`` tuples. Output: float32 array ``[N, D]``. The weights come from the
        ``model_dir`` artifact (safetensors + config.json); no weights are ever pickled.
        """

        def load_context(self, context):
            from astromer.weights import load_model_dir

            self.model = load_model_dir(context.artifacts[MODEL_DIR_ARTIFACT]).eval()

        def predict(self, context, model_input, params=None):
            curves = curves_from_frame(model_input)
            batch_size = int((params or {}).get("batch_size", 256))
            return np.asarray(self.model.embed(curves, batch_size=batch_size), dtype=np.float32)


def curves_from_frame(model_input: Any) -> list[tuple[np.ndarray, ...]]:
    """DataFrame rows (mjd, mag[, err]) or a list of tuples -> list of numpy tuples, with a clear error."""
    if hasattr(model_input, "columns"):
        missing = {"mjd", "mag"} - set(model_input.columns)
        if missing:
            raise ValueError(f"embedding input needs columns mjd and mag; missing {sorted(missing)}")
        has_err = "err" in model_input.columns
        curves = []
        for i, row in enumerate(model_input.itertuples(index=False)):
            mjd = np.asarray(row.mjd, dtype=np.float64)
            mag = np.asarray(row.mag, dtype=np.float32)
            if mjd.shape != mag.shape or mjd.ndim != 1:
                raise ValueError(f"row {i}: mjd and mag must be 1-D lists of equal length")
            curves.append((mjd, mag, np.asarray(row.err, dtype=np.float32)) if has_err else (mjd, mag))
        return curves
    return [tuple(np.asarray(a) for a in curve) for curve in model_input]


def _check_model_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a model folder: missing {', '.join(missing)}")
    return model_dir


def log_model_dir(model_dir: str | Path, artifact_path: str = "model"):
    """Log a model folder (safetensors + config.json) into the active run as a pyfunc model that embeds curves.
    Returns MLflow's ModelInfo (``.model_uri`` can be registered)."""
    model_dir = _check_model_dir(model_dir)
    return mlflow.pyfunc.log_model(
        name=artifact_path,
        # models from code: MLflow stores this file, not a pickle of the wrapper (see pyfunc_model.py)
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
        # the platform itself is the requirement; inferring pip requirements would import and probe the model
        pip_requirements=["astromer-platform", "torch", "safetensors", "numpy", "pandas"],
    )


# --------------------------------------------------------------------------- registering and promoting

def register_model_dir(model_dir: str | Path, name: str, tags: dict[str, Any] | None = None,
                       metrics: dict[str, float] | None = None, *, artifact_path: str = "model",
                       experiment: str = IMPORT_EXPERIMENT, log_metrics: bool = True) -> int:
    """Log ``model_dir`` (into the active run, or a new run in ``experiment``) and register it as a new version
    of ``name``. ``tags`` become version tags; ``metrics`` are logged to the run and, when they include
    ``val_rmse``, decide promotion. The new version always gets alias ``candidate``; ``production`` follows
    ``promote``'s rule (``log_metrics=False`` when the run already has them per step). Returns the version.
    The weights are read first: an unreadable safetensors file or NaN/infinite weights raise a ValueError
    naming the file and the tensor, and nothing is registered."""
    from astromer.weights import MODEL_FILE, check_finite, read_model_tensors

    check_finite(read_model_tensors(Path(model_dir) / MODEL_FILE), Path(model_dir) / MODEL_FILE)
    setup_tracking()
    own_run = mlflow.active_run() is None
    if own_run:
        mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"register-{name}")
    try:
        if metrics and log_metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        if tags:
            mlflow.set_tags({f"astromer.{k}": str(v) for k, v in tags.items()})
        info = log_model_dir(model_dir, artifact_path=artifact_path)
        run_id = mlflow.active_run().info.run_id
    finally:
        if own_run:
            mlflow.end_run()
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass   # already there
    # model_id: a tracking server accepts a models:/m-... source only together with the logged model's id
    mv = client.create_model_version(name, info.model_uri, run_id=run_id,
                                     tags={k: str(v) for k, v in (tags or {}).items()},
                                     model_id=getattr(info, "model_id", None))
    version = int(mv.version)
    _wait_ready(client, name, version)
    val = (metrics or {}).get(VAL_RMSE_TAG)
    promote(name, version, val)
    return version


def version_with_tags(name: str, tags: dict[str, Any]) -> int | None:
    """The newest version of registered model ``name`` that carries all of ``tags`` (None: none, or no such
    model). Jobs use it to find what they registered before: a run name at a step, a checkpoint's digest."""
    setup_tracking()
    validate_model_name(name)   # it goes into a filter string
    wanted = {k: str(v) for k, v in tags.items()}
    found = [int(mv.version) for mv in MlflowClient().search_model_versions(f"name = '{name}'")
             if all(mv.tags.get(k) == v for k, v in wanted.items())]
    return max(found) if found else None


def _wait_ready(client: MlflowClient, name: str, version: int, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while client.get_model_version(name, str(version)).status == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {name} version {version} still pending after {timeout_s:.0f} s")
        time.sleep(0.2)


def _version_rmse(client: MlflowClient, name: str, version: int | str) -> float | None:
    tag = client.get_model_version(name, str(version)).tags.get(VAL_RMSE_TAG)
    try:
        value = float(tag) if tag is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def production_version(name: str) -> int | None:
    """The version behind alias ``production`` (None when the name or alias does not exist)."""
    try:
        return int(MlflowClient().get_model_version_by_alias(name, PRODUCTION).version)
    except MlflowException:
        return None


def promote(name: str, version: int | str, val_rmse: float | None) -> bool:
    """Alias ``candidate`` -> ``version`` always; ``production`` -> ``version`` only when there is no production
    version yet, or ``val_rmse`` is lower than production's (a production version without a score is replaced
    by a scored one). Two versions whose ``val_set`` tags differ were scored on different validation windows
    (another lake content, selection, split or seed): their figures do not compare, and production stays.
    Stores ``val_rmse`` as a version tag. Returns whether ``production`` moved."""
    client = MlflowClient()
    version = str(int(version))
    if val_rmse is not None:
        val_rmse = float(val_rmse)
        if not math.isfinite(val_rmse):
            raise ValueError(f"validation RMSE of {name} version {version} is {val_rmse}: cannot rank it")
        client.set_model_version_tag(name, version, VAL_RMSE_TAG, repr(val_rmse))
    client.set_registered_model_alias(name, CANDIDATE, version)
    current = production_version(name)
    if current is None:
        better = True
    elif str(current) == version:
        better = False
    else:
        current_set = client.get_model_version(name, str(current)).tags.get(VAL_SET_TAG)
        new_set = client.get_model_version(name, version).tags.get(VAL_SET_TAG)
        if current_set and new_set and current_set != new_set:
            log.warning("%s version %s is candidate; production stays at version %s: the two were validated on "
                        "different windows (%s %s vs %s: another lake content, selection, split or seed), so "
                        "their val RMSE do not compare. To move it by hand: astromer models alias %s %s %s",
                        name, version, current, VAL_SET_TAG, new_set, current_set, name, PRODUCTION, version)
            return False
        current_rmse = _version_rmse(client, name, current)
        better = val_rmse is not None and (current_rmse is None or val_rmse < current_rmse)
    if better:
        client.set_registered_model_alias(name, PRODUCTION, version)
        log.info("%s version %s is now production (val RMSE %s)", name, version, val_rmse)
    else:
        log.info("%s version %s is candidate; production stays at version %s", name, version, current)
    return better


def set_alias(name: str, alias: str, version: int | str) -> None:
    """Point ``alias`` of ``name`` at ``version`` by hand (LookupError naming what is missing)."""
    setup_tracking()
    client = MlflowClient()
    try:
        client.get_model_version(name, str(int(version)))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LookupError(f"no version {version} of registered model {name!r}") from exc
    try:
        client.set_registered_model_alias(name, alias, str(int(version)))
    except MlflowException as exc:
        if exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise ValueError(f"alias {alias!r}: {exc.message}") from exc   # a reserved or malformed name


# --------------------------------------------------------------------------- resolving URIs

def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    match = _URI.match(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a model URI: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    version = match.group("version")
    return match.group("name"), match.group("alias"), int(version) if version else None


def resolve_version(uri: str, tracking_uri: str | None = None) -> tuple[str, int]:
    """(name, version) behind a models:/ URI (registry at ``tracking_uri``, default settings.tracking_uri())."""
    setup_tracking(tracking_uri)
    name, alias, version = parse_model_uri(uri)
    client = MlflowClient()
    try:
        if alias is not None:
            version = int(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise LookupError(f"{uri}: no such registered model version ({exc.message})") from exc
    return name, version


def resolve_model_dir(uri: str | Path, tracking_uri: str | None = None, *, check: bool = False) -> Path:
    """A local folder with model.safetensors + config.json for ``uri``: a folder path is returned as is; a
    ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI is resolved to a version and its files are
    downloaded once into ASTROMER_HOME/models/NAME/VERSION (written to a temporary folder, then renamed).
    ``check``: the folder is loaded too (the checks of ``astromer.weights.load_model_dir``), so that a damaged
    model is refused where a job starts, in one ValueError naming the file (and the URI)."""
    folder = _resolve_model_dir(str(uri), tracking_uri)
    if check:
        from astromer.weights import load_model_dir

        try:
            load_model_dir(folder)
        except ValueError as exc:
            if str(uri).startswith("models:/"):
                raise ValueError(f"{uri}: {exc}") from None
            raise
    return folder


def _resolve_model_dir(text: str, tracking_uri: str | None) -> Path:
    if not text.startswith("models:/"):
        return _check_model_dir(text)
    name, version = resolve_version(text, tracking_uri)
    target = settings.home(persistent=False) / "models" / name / str(version)   # a cache of the registry
    if all((target / f).is_file() for f in MODEL_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{version}-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        source = _check_model_dir(local / _pyfunc_artifact_path(local / "MLmodel", MODEL_DIR_ARTIFACT))
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for f in MODEL_FILES:
            shutil.copy2(source / f, staged / f)
        try:
            staged.rename(target)
        except OSError:   # another process won the race
            if not all((target / f).is_file() for f in MODEL_FILES):
                raise
    return target


def _pyfunc_artifact_path(mlmodel: Path, key: str) -> str:
    """Relative path of pyfunc artifact ``key`` as recorded in an MLmodel file (plain YAML, no unpickling)."""
    import yaml

    spec = yaml.safe_load(mlmodel.read_text())
    try:
        return spec["flavors"]["python_function"]["artifacts"][key]["path"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{mlmodel}: not an Astromer pyfunc model (no artifact {key!r})") from exc


def list_models() -> list[dict[str, Any]]:
    """Registered models with their aliases and latest version (for ``astromer models list``)."""
    setup_tracking()
    client = MlflowClient()
    rows = []
    for rm in client.search_registered_models(max_results=1000):
        versions = client.search_model_versions(f"name = '{rm.name}'", max_results=1000)
        rows.append({
            "name": rm.name,
            "latest_version": max((int(v.version) for v in versions), default=None),
            "aliases": dict(sorted((a, int(v)) for a, v in (rm.aliases or {}).items())),
            "versions": len(versions),
        })
    return sorted(rows, key=lambda r: r["name"])


def show_model(name: str) -> dict[str, Any]:
    """Versions of ``name`` with tags, aliases and source run (for ``astromer models show``)."""
    setup_tracking()
    client = MlflowClient()
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        raise LookupError(f"no registered model named {name!r}") from exc
    by_version: dict[int, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():
        by_version.setdefault(int(v), []).append(alias)
    versions = []
    for v in client.search_model_versions(f"name = '{name}'", max_results=1000):
        versions.append({"version": int(v.version), "aliases": sorted(by_version.get(int(v.version), [])),
                         "run_id": v.run_id, "status": v.status, "tags": dict(v.tags or {}),
                         "created": v.creation_timestamp})
    return {"name": name, "aliases": {a: int(v) for a, v in (rm.aliases or {}).items()},
            "versions": sorted(versions, key=lambda r: r["version"])}
