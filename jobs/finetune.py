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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402
from astromer import registry  # noqa: E402
from astromer.train import TrainConfig  # noqa: E402

# finetuning runs on catalogued variable stars: keep observation-level cleaning only (the noise criteria
# would reject most of them), a shorter warm-up and run, and its own MLflow experiment
DEFAULTS = {"drop_noisy": False, "lr": 1e-4, "warmup_steps": 20, "epochs": 20, "patience": 3,
            "experiment": registry.FINETUNE_EXPERIMENT}


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
        tags.update(parent_model=name, parent_version=str(version))
        parent = name
    else:
        parent = Path(config.init_from).resolve().name
        tags.update(parent_model=parent, parent_version="folder")
    parent_config = registry.resolve_model_dir(config.init_from) / "config.json"
    preset = json.loads(parent_config.read_text()).get("name")
    if preset in ("astromer1", "astromer2", "tiny"):
        config.preset = preset
    if not config.register_as:
        config.register_as = f"{parent}-ft-{'-'.join(sorted(config.surveys or ['all']))}"
    config.tags.update(tags)
    config.corpus = config.corpus or "-".join(sorted(config.surveys or ["all"]))
    return tags


if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], "finetune", defaults=DEFAULTS, prepare=lineage))
