"""Ingest a survey into the lake: ``python ingest/run.py --survey S --source URL --lake LAKE``.

The same as ``astromer ingest ...`` (see ``astromer.commands.ingest`` and ``astromer.ingest``).
"""
import sys

from astromer.commands.ingest import main

if __name__ == "__main__":
    sys.exit(main())
