"""Build script for msff.

Python packages: ``msff`` and ``msff.kernels`` (the top-level ``kernels/`` folder is installed as
a subpackage of msff, never as a bare ``kernels`` module).

The compiled extension ``msff._C`` (csrc/) is built with torch.utils.cpp_extension. Switches
(environment variables):

* ``MSFF_BUILD_CUDA``: ``auto`` (default: build CUDA kernels when torch is a CUDA build and nvcc
  is found), ``1`` (force; fail if impossible), ``0`` (skip CUDA kernels).
* ``MSFF_BUILD_EXT``: ``1`` (default) builds ``msff._C``; ``0`` installs pure Python only.
* ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"), ``MAX_JOBS``.
"""
from __future__ import annotations

import os

from setuptools import setup

PACKAGES = [
    "msff",
    "msff.ops",
    "msff.models",
    "msff.data",
    "msff.engine",
    "msff.inference",
    "msff.kernels",
    "msff.configs",
]
PACKAGE_DIR = {"msff.kernels": "kernels"}


def _ext_modules():
    """The compiled extension; filled in by the CUDA/C++ work (csrc/)."""
    if os.environ.get("MSFF_BUILD_EXT", "1") == "0":
        print("msff: MSFF_BUILD_EXT=0, installing pure Python (no msff._C)")
    return [], {}


ext_modules, cmdclass = _ext_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"msff.configs": ["*.json", "*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
