"""Pretrain Astromer on a lake with Ray Data + Ray Train, tracked and registered in MLflow.

    python jobs/pretrain.py --lake LAKE --surveys ogle asas --preset astromer2 --max-steps 300
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pretrain.py --lake LAKE ...
    python jobs/pretrain.py --config pretrain.yaml --run-name my-run      # flags override the file

Starts a local Ray unless RAY_ADDRESS is set. Re-running with the same --run-name (and storage path)
continues from the run's latest checkpoint. The final model is registered as astromer2-<corpus> with alias
`candidate`; `production` moves only when its validation RMSE beats the current production version.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(__doc__.splitlines()[0], "pretrain"))
