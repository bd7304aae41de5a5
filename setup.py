"""The one compiled part: the ingest's kernels (``astromer.kernels``), used when they are built.

It is optional: without a C compiler the install goes on and the ingest runs their numpy and pyarrow
twins (the same values, about 1.6 times as long; see benchmarks/ingest.py). Everything else is in pyproject.toml.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("astromer._kernels", ["platform/astromer/_kernels.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off"], optional=True)])
