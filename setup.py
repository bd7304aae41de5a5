"""The one compiled part: a strict numeric-row parser used by the survey readers when it is built.

It is optional: without a C compiler the install goes on and the readers use pyarrow's parser (the
same values, about three times slower; see benchmarks/ingest.py). Everything else is in pyproject.toml.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("astromer.surveys._textrows", ["platform/astromer/surveys/_textrows.c"],
                             extra_compile_args=["-O3"], optional=True)])
