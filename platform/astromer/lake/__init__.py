"""The lake: Parquet light curves and labels, Zarr windows, DuckDB views (tables and queries: docs/lake.md).

- :mod:`astromer.lake.paths`: ``LakePaths`` (the one place building lake paths) and name validation
- :mod:`astromer.lake.schema`: Arrow schemas and the quality bit flags
- :mod:`astromer.lake.writers`: atomic Parquet/JSON writes
- :mod:`astromer.lake.cleaning`: the paper's cleaning as a reader-side filter
- :func:`connect`: DuckDB with views over every table; :func:`iter_curves`: cleaned curves for small jobs
"""
from astromer.lake.catalog import connect, iter_curves
from astromer.lake.cleaning import CleaningStats, CleanResult, clean_curve
from astromer.lake.paths import InvalidName, LakePaths
from astromer.lake.schema import LIGHTCURVES, Quality

__all__ = ["connect", "iter_curves", "clean_curve", "CleanResult", "CleaningStats", "LakePaths", "InvalidName",
           "LIGHTCURVES", "Quality"]
