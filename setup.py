"""setuptools entry point. Metadata lives in pyproject.toml; this file exists for the optional ahead-of-time
build of the C++/CUDA extension (PTV2_FAST_BUILD_EXT=1), which later releases add."""

from setuptools import setup

setup()
