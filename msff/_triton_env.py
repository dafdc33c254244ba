"""Whether Triton kernels run in Triton's CPU interpreter. A leaf module (standard library only):
the Triton kernels (``msff.kernels``) and the ops import it without importing the backend policy."""
from __future__ import annotations

import os

__all__ = ["triton_interpret"]


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET`` is set to anything but ``""`` or ``"0"``.

    Triton reads the variable when a ``@triton.jit`` module is first imported, so it must be set
    before that (tests set it in ``conftest.py`` on machines without a GPU).

    Example:
        >>> import os
        >>> triton_interpret() == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
        True
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
