"""Repository-wide pytest set-up, for every run from this checkout (tests/, the doctests of msff/,
benchmarks/). tests/conftest.py adds the test suite's own set-up (seeds, caches, the gpu skip).

* ``MSFF_STRICT_BACKEND=1``: an unexpected error while probing a kernel backend (a bug in msff's
  own kernels, say) is raised instead of being logged as the backend's reason to be unavailable.
* ``TRITON_INTERPRET=1`` where there is no CUDA GPU: it must be set before the first
  ``@triton.jit`` module is imported, and a doctest run may import msff before tests/conftest.py.
* Doctests (``--doctest-modules``, see pyproject.toml) whose example needs an optional component
  skip with the reason when it is absent (listed in ``DOCTEST_NEEDS``); every other runnable
  example must run and pass.
"""
from __future__ import annotations

import os

os.environ.setdefault("MSFF_STRICT_BACKEND", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The top-level kernels/ folder is installed as msff.kernels; importing it as a bare `kernels`
# package (what doctest collection of this folder would do) would load the kernels twice.
collect_ignore = ["kernels"]


def _cuda_extension_missing() -> str | None:
    from msff.ops._cuda import extension_error

    return extension_error()


#: doctest name (a module, or module.object) -> check returning why it cannot run, or None
DOCTEST_NEEDS = {
    "msff.ops._cuda.conv_plan": _cuda_extension_missing,
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.DoctestItem):
            continue
        for name, check in DOCTEST_NEEDS.items():
            if item.name == name or item.name.startswith(name + "."):
                why = check()
                if why:
                    item.add_marker(pytest.mark.skip(reason=f"doctest needs: {why}"))
