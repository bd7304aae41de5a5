"""Finetune a registered (or imported) Astromer on a labelled survey with the pretraining task.

    python jobs/finetune.py --init-from models:/astromer2-mylake@production --lake LAKE \\
        --surveys asas --label-set class [--labels Mira RR_Lyrae_FM --batch-size 8] [--register-as NAME]
    python jobs/finetune.py --init-from path/to/model_dir --lake LAKE --surveys ogle --label-set mode

The same Ray loop as pretraining (jobs/pretrain.py), started from the parent's weights and run on the curves
that carry a label of the chosen label set. The result is registered (default name
``<parent>-ft-<surveys>``) with lineage tags: parent model name, version and URI, and the data selection.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402
from astromer import registry  # noqa: E402
from astromer.config import ModelConfig  # noqa: E402
from astromer.train import TrainConfig  # noqa: E402

log = logging.getLogger("astromer.jobs.finetune")

# finetuning runs on catalogued variable stars: keep observation-level cleaning only (the noise criteria
# would reject most of them), a shorter warm-up and run, and its own MLflow experiment
DEFAULTS = {"drop_noisy": False, "lr": 1e-4, "warmup_steps": 20, "epochs": 20, "patience": 3,
            "experiment": registry.FINETUNE_EXPERIMENT}


def _first_parent_version(config: TrainConfig, name: str) -> str | None:
    """The parent version an earlier attempt of this run (same name) recorded, when it was of ``name``."""
    if not config.run_name:
        return None
    registry.setup_tracking(config.tracking_uri)
    run_id = registry.find_run(config.experiment, config.run_name)
    if run_id is None:
        return None
    from mlflow.tracking import MlflowClient

    tags = MlflowClient().get_run(run_id).data.tags
    if tags.get("astromer.parent_model") != name:
        return None
    return tags.get("astromer.parent_version")


def lineage(config: TrainConfig) -> dict[str, str]:
    """Validate the finetuning settings, fill the preset and the registered name, and return lineage tags."""
    if not config.init_from:
        raise ValueError("finetune: --init-from models:/NAME@ALIAS (or a model folder) is required")
    if not config.label_set:
        raise ValueError("finetune: --label-set is required (e.g. asas 'class', ogle 'mode')")
    tags = {"parent_uri": config.init_from, "task": "finetune",
            "data_selection": json.dumps({"lake": str(config.lake), "surveys": config.surveys,
                                          "bands": config.bands, "label_set": config.label_set,
                                          "labels": config.labels}, sort_keys=True)}
    if str(config.init_from).startswith("models:/"):
        name, version = registry.resolve_version(config.init_from)
        first = _first_parent_version(config, name)
        if first is not None and first != str(version):
            log.warning("run %s began from %s version %s; %s is version %s now: it continues from its checkpoints "
                        "and keeps version %s as its parent", config.run_name, name, first, config.init_from,
                        version, first)
            version = first
        # pinned: the workers, a later resume and the lineage tags all name the version this run starts from
        config.init_from = f"models:/{name}/{version}"
        tags.update(parent_model=name, parent_version=str(version))
        parent = name
    else:
        parent = Path(config.init_from).resolve().name
        tags.update(parent_model=parent, parent_version="folder")
    # the parent's settings as a checked config (a damaged file is named); its weights are checked in main
    preset = ModelConfig.from_json(registry.resolve_model_dir(config.init_from) / "config.json").name
    if preset in ("astromer1", "astromer2", "tiny"):
        config.preset = preset
    if not config.register_as:
        config.register_as = f"{parent}-ft-{'-'.join(sorted(config.surveys or ['all']))}"
    config.tags.update(tags)
    config.corpus = config.corpus or "-".join(sorted(config.surveys or ["all"]))
    return tags


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], "finetune", defaults=DEFAULTS, prepare=lineage))
