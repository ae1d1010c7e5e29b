"""Build script.  Metadata lives in pyproject.toml; this file exists for the C++ CPU kernels
in csrc/, which torch.utils.cpp_extension builds (added with the fused-kernel backends)."""

from setuptools import setup

setup()
