"""Test-session set-up: the Triton interpreter on CPU, the ``gpu`` skip, and fixed test seeds.

TRITON_INTERPRET must be set before the first ``@triton.jit`` module is imported: without a GPU we
interpret the Triton kernels on CPU, which is how CI verifies them.

Seeds (a CI must not flake, and a failure must be reproducible):

* Every test starts from ``torch`` / ``numpy`` / ``random`` seeded with a value derived from a base
  seed and the test's node id, so a test draws the same inputs whatever else runs before it.
* The base seed is ``MSFF_TEST_SEED`` (default 0, fixed). ``MSFF_TEST_SEED=random`` draws a fresh
  base per session (an opt-in randomized stress run). The header of the run and every failure
  report print the base and the exact command that reproduces the failure.
* ``MSFF_TEST_SEEDS=N`` (or ``A:B``) repeats every collected test over the bases
  ``base .. base+N-1`` (or ``A .. B-1``) in one process; the repeats are named
  ``...[MSFF_TEST_SEED=k]``. That is how the seed-sensitive parity tests are looped over many seeds
  (see tests/stress/). ``pytest -m stress`` runs that loop as a test.
"""
import os
import random
import re
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Exported ONNX graphs are cached per checkpoint; tests keep that cache out of the user's home
# (one folder per test session, shared by its tests so repeated exports of one model are reused).
if "MSFF_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MSFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="msff-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MSFF_CACHE_DIR"], ignore_errors=True)

DATA_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

DEFAULT_TEST_SEED = 0


class _SeedSettingError(ValueError):
    pass


def _base_seed() -> tuple[int, bool]:
    """(base seed, drawn at random?) from MSFF_TEST_SEED."""
    raw = os.environ.get("MSFF_TEST_SEED", "").strip()
    if raw == "":
        return DEFAULT_TEST_SEED, False
    if raw.lower() == "random":
        return int.from_bytes(os.urandom(4), "little") % 2**31, True
    try:
        return int(raw), False
    except ValueError:
        raise _SeedSettingError(f"MSFF_TEST_SEED={raw!r} is neither an integer nor 'random'") from None


def _seed_range(base: int) -> list[int] | None:
    """The bases MSFF_TEST_SEEDS asks for (``N`` or ``A:B``), or None to run each test once."""
    raw = os.environ.get("MSFF_TEST_SEEDS", "").strip()
    if not raw:
        return None
    try:
        if ":" in raw:
            a, b = (int(v) for v in raw.split(":"))
        else:
            a, b = base, base + int(raw)
    except ValueError:
        raise _SeedSettingError(f"MSFF_TEST_SEEDS={raw!r} is neither N nor A:B") from None
    if b <= a:
        raise _SeedSettingError(f"MSFF_TEST_SEEDS={raw!r} is an empty range")
    return list(range(a, b))


# Read once at import (the fixture's params need them); a malformed value is reported as a usage
# error by pytest_configure, before anything runs.
_SETTING_ERROR = None
try:
    BASE_SEED, BASE_SEED_IS_RANDOM = _base_seed()
    SEEDS = _seed_range(BASE_SEED)
except _SeedSettingError as e:
    BASE_SEED, BASE_SEED_IS_RANDOM, SEEDS, _SETTING_ERROR = DEFAULT_TEST_SEED, False, None, str(e)
_SEED_ID = re.compile(r"MSFF_TEST_SEED=\d+")
_SEED_KEY = pytest.StashKey[int]()


def _strip_seed_id(nodeid: str) -> str:
    """The node id without the ``MSFF_TEST_SEED=k`` repeat id (as if run once)."""
    if "MSFF_TEST_SEED=" not in nodeid:
        return nodeid
    s = _SEED_ID.sub("", nodeid)
    return s.replace("[-", "[").replace("-]", "]").replace("--", "-").replace("[]", "")


def test_seed(base: int, nodeid: str) -> int:
    """The seed a test starts from: a mix of the base and the test's node id (without the
    ``MSFF_TEST_SEED=k`` repeat id), so it does not depend on which tests ran before."""
    return (base * 1_000_003 + zlib.crc32(_strip_seed_id(nodeid).encode())) % 2**31


test_seed.__test__ = False  # a helper, not a test


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def pytest_configure(config):
    if _SETTING_ERROR:
        raise pytest.UsageError(_SETTING_ERROR)
    config.addinivalue_line(
        "markers", "stress: opt-in randomized-seed stress runs (`-m stress`; excluded otherwise)"
    )


def pytest_report_header(config):
    how = "drawn at random (MSFF_TEST_SEED=random)" if BASE_SEED_IS_RANDOM else (
        "fixed" if "MSFF_TEST_SEED" not in os.environ else "from MSFF_TEST_SEED")
    line = f"msff test seed: MSFF_TEST_SEED={BASE_SEED} ({how})"
    if SEEDS is not None:
        line += f"; each test repeated over bases {SEEDS[0]}..{SEEDS[-1]} (MSFF_TEST_SEEDS)"
    return line


@pytest.fixture(scope="session")
def shared_data():
    """Path of ../shared/data (real datasets), or skip with the reason."""
    if not os.path.isdir(DATA_ROOT):
        pytest.skip(f"real data not present at {DATA_ROOT} (../shared/data beside the repo)")
    return DATA_ROOT


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("markexpr", "") or ""
    skip_stress = pytest.mark.skip(reason="randomized-seed stress run: opt in with `-m stress`")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "stress" in item.keywords and "stress" not in markexpr.replace("not stress", ""):
            item.add_marker(skip_stress)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, params=SEEDS, ids=lambda b: f"MSFF_TEST_SEED={b}")
def _seed(request):
    base = getattr(request, "param", BASE_SEED)
    seed = test_seed(base, request.node.nodeid)
    request.node.stash[_SEED_KEY] = base
    _seed_everything(seed)
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        base = item.stash.get(_SEED_KEY, BASE_SEED)
        node = _strip_seed_id(item.nodeid)
        report.sections.append((
            "msff test seed",
            f"base MSFF_TEST_SEED={base}, torch/numpy/random seed {test_seed(base, item.nodeid)}; "
            f"reproduce with: MSFF_TEST_SEED={base} python -m pytest '{node}'",
        ))
    return report
