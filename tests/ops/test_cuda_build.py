"""The fallback install paths of the build (marked ``slow``: each builds a wheel from a clean copy
of the committed tree, ~10-40 s on 2 cores):

* ``MSFF_BUILD_EXT=0``: a pure-Python wheel (no ``msff._C``); the package imports, ``auto`` runs
  the reference, and ``backend="cuda"`` says the extension is missing.
* ``MSFF_BUILD_CUDA=0``: ``msff._C`` with the op schemas only (a CppExtension, no nvcc); the
  ``cuda`` backend says the extension was built without CUDA kernels.

Each wheel is unpacked and imported in a subprocess with the unpacked folder first on
``PYTHONPATH`` and the editable install's import hook removed, which the subprocess checks.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
        reason="needs the git checkout (builds from `git archive HEAD`)",
    ),
]


def _wheel(tmp_path, **env):
    src = tmp_path / "src"
    src.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    e = {**os.environ, "MAX_JOBS": "2", **env}
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", "-w",
         str(tmp_path / "dist"), str(src)],
        env=e, capture_output=True, text=True, timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    decisions = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip().startswith("msff:")]
    (whl,) = (tmp_path / "dist").glob("msff-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    return site, decisions


# An editable install of msff in this environment would still resolve msff._C to the checkout
# (its import hook runs after the path search fails): drop that hook in the subprocess.
ISOLATE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
"""


def _run_in(site, code):
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    code = ISOLATE + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(site),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


CHECK = """
    import os, sys, torch
    import msff, msff.ops, msff.ops._cuda as cb
    assert msff.__file__.startswith({site!r}), msff.__file__
    reason = cb.unavailable_reason(torch.randn(1, 3, 8, 8))
    assert {expect!r} in reason, reason
    m = msff.MSFFNet(width_multiplier=0.125, lkam_blocks=1, kernel_size=7, backend="cuda").eval()
    try:
        m(torch.randn(1, 3, 32, 32))
        raise SystemExit("backend='cuda' ran without its kernels")
    except msff.BackendUnavailableError as e:
        assert {expect!r} in str(e), e
    y = m.set_backend("auto")(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 1, 32, 32)
    print("ok", cb.kernels_built())
"""


def test_pure_python_wheel(tmp_path):
    site, decisions = _wheel(tmp_path, MSFF_BUILD_EXT="0")
    assert any("pure Python" in d for d in decisions), decisions
    assert not list(site.glob("msff/_C*.so"))
    out = _run_in(site, CHECK.format(site=str(site), expect="msff._C is not importable"))
    assert "ok False" in out


def test_extension_without_cuda_kernels(tmp_path):
    site, decisions = _wheel(tmp_path, MSFF_BUILD_CUDA="0")
    assert any("without CUDA kernels" in d for d in decisions), decisions
    assert list(site.glob("msff/_C*.so"))
    out = _run_in(site, CHECK.format(site=str(site), expect="built without CUDA kernels"))
    assert "ok False" in out
    _run_in(site, """
        import torch, msff._C as C
        assert C.WITH_CUDA == 0
        for n in ("lk_conv_cuda", "_lk_conv_backward_cuda", "lkam_se_cuda", "_lkam_se_backward_cuda"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key("msff::" + n, "CUDA") is False
            getattr(torch.ops.msff, n).default._schema  # the schema exists
    """)
