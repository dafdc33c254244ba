"""Build script for msff.

Python packages: ``msff`` and ``msff.kernels`` (the top-level ``kernels/`` folder is installed as
a subpackage of msff, never as a bare ``kernels`` module).

The compiled extension ``msff._C`` (csrc/) is built with torch.utils.cpp_extension. Install with
``pip install --no-build-isolation .`` (or ``-e .``) so the build uses the torch already
installed. Switches (environment variables):

* ``MSFF_BUILD_CUDA``: ``auto`` (default: build CUDA kernels when torch is a CUDA build and nvcc
  is found), ``1`` (force; fail if impossible), ``0`` (skip CUDA kernels).
* ``MSFF_BUILD_EXT``: ``1`` (default) builds ``msff._C``; ``0`` installs pure Python only.
* ``TORCH_CUDA_ARCH_LIST`` (default "8.0+PTX;9.0a": Ampere SASS + PTX that newer GPUs JIT, and
  Hopper's arch-specific SASS so the wgmma/TMA kernels exist; a list with ``9.0a`` defines
  ``MSFF_HAVE_SM90A`` and the launchers pick the sm_90a kernels on a 9.0 device at run time),
  ``MAX_JOBS``.
* ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit root. When unset, the root is the first of: the
  folder above ``nvcc`` on PATH, ``/usr/local/cuda``, ``/usr/local/cuda-*``, that holds both
  ``bin/nvcc`` and ``include/cuda_runtime.h`` (so a wrapper ``/usr/local/bin/nvcc`` does not
  make ``/usr/local`` the root, as torch's own guess would).

Layout of csrc/: ``ops.cpp`` (op schemas, ``TORCH_LIBRARY(msff, ...)``, always built),
``cuda_ops.cpp`` (torch glue: input checks, launches on the current stream; CUDA builds only) and
``cuda/*.cu`` (bare kernels that include only CUDA runtime headers, so each compiles in seconds).
The build prints one ``msff: ...`` line saying what it decided and why.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

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
ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"


_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _say(msg: str) -> None:
    # pip shows a successful build's output only with -v; the decision of a real build is also
    # written to build/msff-build-decision.txt for the record (not for queries like --version).
    print(f"msff: {msg}", file=sys.stderr, flush=True)
    if not _BUILD_COMMANDS.intersection(sys.argv[1:]):
        return
    try:
        os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
        with open(os.path.join(ROOT, "build", "msff-build-decision.txt"), "w") as f:
            f.write(msg + "\n")
    except OSError:
        pass


def _switch(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise SystemExit(f"msff: {name}={value!r} is not one of {', '.join(allowed)}")
    return value


def _is_toolkit_root(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> tuple[str | None, str]:
    """The CUDA toolkit root and how it was found (see the module docstring)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit_root(value):
                return value, f"${var}"
            return None, f"${var}={value} has no bin/nvcc + include/cuda_runtime.h"
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append((os.path.dirname(os.path.dirname(nvcc)), f"nvcc on PATH ({nvcc})"))
        real = os.path.realpath(nvcc)
        candidates.append((os.path.dirname(os.path.dirname(real)), f"nvcc on PATH -> {real}"))
    candidates.append(("/usr/local/cuda", "default /usr/local/cuda"))
    candidates += [(p, "glob /usr/local/cuda-*") for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for path, how in candidates:
        if _is_toolkit_root(path):
            return path, how
    return None, "no nvcc on PATH and no toolkit under /usr/local/cuda*"


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _nvidia_wheel_includes() -> list[str]:
    """Include folders of the nvidia-* pip wheels (cublas, cusparse, ... headers that ATen's CUDA
    headers want and a minimal toolkit lacks)."""
    found = []
    for base in sys.path:
        nv = os.path.join(base, "nvidia")
        if os.path.isdir(nv):
            found += sorted(glob.glob(os.path.join(nv, "*", "include")))
            found += sorted(glob.glob(os.path.join(nv, "*", "*", "include")))
    seen, out = set(), []
    for d in found:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _ext_modules():
    """Decide what to build; returns (ext_modules, cmdclass)."""
    if _switch("MSFF_BUILD_EXT", "1", ("0", "1")) == "0":
        _say("MSFF_BUILD_EXT=0, installing pure Python (no msff._C)")
        return [], {}
    build_cuda = _switch("MSFF_BUILD_CUDA", "auto", ("auto", "0", "1"))
    try:
        import torch
    except ImportError as e:
        if build_cuda == "1":
            raise SystemExit(f"msff: MSFF_BUILD_CUDA=1 but torch is not importable ({e})") from None
        _say(
            f"torch is not importable at build time ({e}); installing pure Python (no msff._C). "
            "Install torch first and use `pip install --no-build-isolation .`"
        )
        return [], {}

    want_cuda, why = False, ""
    cuda_home, how, nvcc_ver = None, "", None
    if build_cuda == "0":
        why = "MSFF_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    else:
        cuda_home, how = find_cuda_home()
        if cuda_home is None:
            why = f"nvcc not found ({how})"
        else:
            nvcc_ver = _nvcc_version(cuda_home)
            if nvcc_ver is None:
                why = f"{cuda_home}/bin/nvcc --version failed"
            elif nvcc_ver.split(".")[0] != torch.version.cuda.split(".")[0]:
                why = f"nvcc {nvcc_ver} and torch's CUDA {torch.version.cuda} differ in major version"
            else:
                want_cuda = True
                how = f"{cuda_home} ({how}), nvcc {nvcc_ver}, torch CUDA {torch.version.cuda}"
    if not want_cuda and build_cuda == "1":
        raise SystemExit(f"msff: MSFF_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")

    if want_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when imported; set it first.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils import cpp_extension as ce

    if want_cuda:
        ce.CUDA_HOME = cuda_home  # in case the module was imported before (e.g. by a plugin)

    sources = ["csrc/ops.cpp"]
    define_macros = []
    cxx = ["-O3"]  # the C++ standard comes from torch (C++17 up to 2.11, C++20 in 2.14)
    ext_kwargs = {}
    if want_cuda:
        sources += ["csrc/cuda_ops.cpp"] + sorted(
            os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
        )
        major, minor = (int(v) for v in nvcc_ver.split(".")[:2])
        define_macros += [("MSFF_WITH_CUDA", "1"), ("MSFF_CUDA_VERSION", str(1000 * major + 10 * minor))]
        arches = [a.strip() for a in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a.strip()]
        if any(a.split("+")[0] == "9.0a" for a in arches):
            # the host launchers may choose the sm_90a (wgmma) kernels on a compute-capability 9.0 GPU
            define_macros.append(("MSFF_HAVE_SM90A", "1"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext_kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext_kwargs["include_dirs"] = [os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes()
        ext = ce.CUDAExtension("msff._C", sources, define_macros=define_macros, **ext_kwargs)
        _say(
            f"building msff._C with CUDA kernels for TORCH_CUDA_ARCH_LIST="
            f"{os.environ['TORCH_CUDA_ARCH_LIST']!r}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}; "
            f"toolkit {how}"
        )
    else:
        ext = ce.CppExtension(
            "msff._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
        )
        _say(f"building msff._C without CUDA kernels (op schemas only): {why}")
    cmdclass = {"build_ext": ce.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
    return [ext], cmdclass


ext_modules, cmdclass = _ext_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"msff.configs": ["*.json", "*.yaml"], "msff": ["validation/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
