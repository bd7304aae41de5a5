"""One reader per raw format, and the light-curve simulator.

``get_reader(name)`` returns a reader object with ``plan(source, options)`` and
``read(item, context)`` (see :mod:`astromer.surveys.base`).
"""
from __future__ import annotations

import importlib

# survey name -> (module, class)
READERS: dict[str, tuple[str, str]] = {
    "macho": ("astromer.surveys.macho", "MachoReader"),
    "ogle": ("astromer.surveys.ogle", "OgleReader"),
    "asas": ("astromer.surveys.asas", "AsasReader"),
    "sdss-stripe82": ("astromer.surveys.stripe82", "Stripe82Reader"),
    "synthetic": ("astromer.surveys.synthetic", "SyntheticReader"),
    "csv": ("astromer.surveys.generic", "CsvReader"),
    "parquet": ("astromer.surveys.generic", "ParquetReader"),
}


def get_reader(name: str):
    if name not in READERS:
        raise ValueError(f"unknown survey {name!r}; known: {', '.join(READERS)}")
    module, cls = READERS[name]
    return getattr(importlib.import_module(module), cls)()
