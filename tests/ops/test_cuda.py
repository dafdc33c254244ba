"""The CUDA backend without a GPU: the compiled library loads, defines the ``msff::*_cuda`` op
schemas (argument for argument the public ops of SPEC.md minus ``backend``), registers a CUDA
kernel for every op, plugs into the op registry, has working fake (meta) implementations, and the
``cuda`` backend refuses CPU inputs / a GPU-less machine with a clear reason. The build script's
decisions are checked through ``python setup.py --version``.

Parity of the kernels with the reference needs a GPU: tests/ops/test_cuda_gpu.py (marked ``gpu``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import msff
import msff.ops  # noqa: F401 - registers the backends
from msff.backend import BackendUnavailableError, resolve_backend
from msff.ops import OPS
from msff.ops.registry import registered

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CUDA_OPS = {op: f"{op}_cuda" for op in OPS}


def _expect_cuda_build():
    """Skip (saying why) where the build was told, or bound, to leave the CUDA kernels out."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU build: the CUDA kernels are not built")
    for var, off in (("MSFF_BUILD_EXT", "0"), ("MSFF_BUILD_CUDA", "0")):
        if os.environ.get(var) == off:
            pytest.skip(f"{var}={off}: the CUDA kernels were left out on purpose")


def _ext():
    _expect_cuda_build()
    import msff._C as C

    return C


def _build_decision() -> str:
    try:
        with open(os.path.join(ROOT, "build", "msff-build-decision.txt")) as f:
            return f.read().strip()
    except OSError:
        return "not recorded (no build/msff-build-decision.txt)"


def _kernels():
    """msff._C with its CUDA kernels. Where the build left them out on its own (``auto`` on a
    machine without nvcc), skip saying why, unless ``MSFF_BUILD_CUDA=1`` says they were required
    (CI sets it where nvcc exists): then the tests run and fail."""
    C = _ext()
    if getattr(C, "WITH_CUDA", 0) != 1 and os.environ.get("MSFF_BUILD_CUDA", "").strip() != "1":
        pytest.skip(
            f"msff._C was built without CUDA kernels (build decision: {_build_decision()}); "
            "MSFF_BUILD_CUDA=1 at install and test time requires them"
        )
    return C


def test_extension_built_with_cuda_kernels_for_every_op():
    C = _kernels()
    assert C.WITH_CUDA == 1, (
        "msff._C was built without CUDA kernels although MSFF_BUILD_CUDA=1 requires them (build "
        f"decision: {_build_decision()}); install the CUDA toolkit and rebuild, or drop "
        "MSFF_BUILD_CUDA=1"
    )
    assert C.CUDA_VERSION // 1000 == int(torch.version.cuda.split(".")[0])
    for name in CUDA_OPS.values():
        qual = f"msff::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"), f"{qual}: no CUDA kernel"
        # the kernels are CUDA-only: a CPU tensor must not silently find a kernel
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"), qual
    import msff.ops._cuda as cb

    assert cb.kernels_built()


# SPEC.md: the inference-only features of issue 11 are trailing, defaulted arguments that a backend
# implements only when registered for them (``epilogue_pool`` / ``accepts_pool_sum``); the CUDA
# kernels keep the signature without them (the op computes the pooled sum itself), so these
# arguments, and the output they add, are not part of the CUDA schema.
OPTIONAL_FEATURES = {"lk_conv": ({"pool"}, 1), "lkam_se": ({"pool_sum"}, 0)}  # op: (arguments, extra outputs)


def test_cuda_op_schemas_match_the_public_ops():
    _ext()
    for op, name in CUDA_OPS.items():
        public = getattr(torch.ops.msff, op).default._schema
        mine = getattr(torch.ops.msff, name).default._schema
        optional, extra_out = OPTIONAL_FEATURES.get(op, (set(), 0))
        assert all(a.has_default_value() for a in public.arguments if a.name in optional), \
            f"msff::{op}: optional features need defaults"
        want = [(a.name, str(a.type)) for a in public.arguments if a.name != "backend" and a.name not in optional]
        got = [(a.name, str(a.type)) for a in mine.arguments]
        assert got == want, f"msff::{name} arguments differ from msff::{op} (minus backend and {sorted(optional)})"
        public_returns = [str(r.type) for r in public.returns]
        assert [str(r.type) for r in mine.returns] == public_returns[:len(public_returns) - extra_out], name


def test_registry_and_probe_name_the_cuda_backend():
    _kernels()
    reg = registered()
    for op in OPS:
        assert "cuda" in reg[op], f"{op}: no cuda implementation registered ({reg[op]})"
    import msff.ops._cuda as cb

    x = torch.randn(1, 2, 3, 3)
    assert "CUDA tensors" in cb.unavailable_reason(x)
    # the dtype refusal is reached only by a CUDA tensor: a fake one needs no GPU
    with FakeTensorMode():
        xc = torch.empty(1, 2, 3, 3, device="cuda")
        assert "float64" in (cb.unavailable_reason(xc.double()) or "")
        assert "int32" in (cb.unavailable_reason(xc.int()) or "")
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            assert cb.unavailable_reason(xc.to(dt)) is None, dt
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in cb.unavailable_reason(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less behaviour")
def test_msffnet_cuda_backend_raises_clearly_without_gpu():
    model = msff.MSFFNet(width_multiplier=0.125, lkam_blocks=1, kernel_size=7, backend="cuda").eval()
    assert model.backend == "cuda"
    x = torch.randn(2, 3, 32, 32)
    import msff.ops._cuda as cb

    # the first reason that applies: no kernels in this build (a machine without nvcc), else the
    # CPU input
    why = "CUDA tensors" if cb.kernels_built() else "built without CUDA kernels"
    with pytest.raises(BackendUnavailableError, match=f"backend 'cuda' cannot run: .*{why}"):
        model(x)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        resolve_backend("cuda", None)
    with msff.use_backend("cuda"), pytest.raises(BackendUnavailableError):
        msff.MSFFNet(width_multiplier=0.125, lkam_blocks=1, kernel_size=7).eval()(x)
    # auto never fails: it falls back to the reference on CPU tensors
    assert resolve_backend("auto", x) == "reference"
    auto = msff.MSFFNet(width_multiplier=0.125, lkam_blocks=1, kernel_size=7).eval()
    assert auto(x).shape == (2, 1, 32, 32)


def test_cuda_ops_reject_cpu_tensors():
    _ext()
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 1, 3)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.msff.lk_conv_cuda(x, w, None, None, None, None, False, False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fake_impls_follow_the_layout_rule(layout):
    _ext()
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    with FakeTensorMode():
        x = torch.empty(2, 4, 6, 7, device="cuda").contiguous(memory_format=mf)
        w = torch.empty(5, 4, 7, 1, device="cuda")
        s = torch.empty(4, device="cuda")
        y, cs, cq = torch.ops.msff.lk_conv_cuda(x, w, None, s, s, None, True, True)
        assert y.shape == (2, 5, 6, 7) and cs.shape == (5,) and cq.dtype == torch.float32
        assert y.is_contiguous(memory_format=mf)
        outs = torch.ops.msff._lk_conv_backward_cuda(
            y, cs, cq, x, w, y, None, s, s, None, True, [True, True, False, True, True, False]
        )
        assert outs[0].shape == x.shape and outs[0].is_contiguous(memory_format=mf)
        assert outs[1].shape == w.shape and outs[2].shape == (0,) and outs[3].shape == (4,)
        f = torch.empty(2, 8, 6, 7, device="cuda").contiguous(memory_format=mf)
        w1, b1 = torch.empty(2, 8, device="cuda"), torch.empty(2, device="cuda")
        w2, b2 = torch.empty(8, 2, device="cuda"), torch.empty(8, device="cuda")
        out, pooled = torch.ops.msff.lkam_se_cuda(f, None, None, None, None, None, w1, b1, w2, b2, f,
                                                  None, None)
        assert out.shape == f.shape and pooled.shape == (2, 8) and out.is_contiguous(memory_format=mf)
        g = torch.ops.msff._lkam_se_backward_cuda(out, pooled, pooled, f, f, None, None, None, None,
                                                  w1, b1, w2, b2, f, None, None)
        assert len(g) == 13 and g[1].shape == f.shape and g[2].shape == (0,) and g[6].shape == w1.shape


def _setup_decision(**env):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    r = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() + r.stdout.splitlines() if ln.startswith("msff:")]
    return r.returncode, lines


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "setup.py")), reason="needs the source tree")
def test_build_script_decisions():
    rc, lines = _setup_decision(MSFF_BUILD_EXT="0")
    assert rc == 0 and any("pure Python" in ln for ln in lines), lines
    rc, lines = _setup_decision(MSFF_BUILD_CUDA="0")
    assert rc == 0 and any("without CUDA kernels" in ln and "MSFF_BUILD_CUDA=0" in ln for ln in lines), lines
    # forcing CUDA with no toolkit fails and says why; auto would fall back instead
    rc, lines = _setup_decision(MSFF_BUILD_CUDA="1", CUDA_HOME="/nonexistent-cuda")
    assert rc != 0 and any("cannot be built" in ln and "/nonexistent-cuda" in ln for ln in lines), lines
    rc, lines = _setup_decision(MSFF_BUILD_CUDA="auto", CUDA_HOME="/nonexistent-cuda")
    assert rc == 0 and any("without CUDA kernels" in ln for ln in lines), lines
    rc, lines = _setup_decision(MSFF_BUILD_CUDA="maybe")
    assert rc != 0 and any("MSFF_BUILD_CUDA" in ln for ln in lines), lines


@pytest.mark.parametrize("value,want", [(None, ["generic", "tc", "tc-cpasync", "sm80"]),
                                        ("tc", ["tc"]), ("tc-cpasync", ["tc-cpasync"])])
def test_gpu_check_records_which_cuda_conv_kernels_ran(tmp_path, monkeypatch, value, want):
    # issue 12: gpu-check sweeps every MSFF_CUDA_CONV variant (one unit each, tests/
    # test_gpu_check_sweep.py); a variable set by the caller restricts the sweep to it
    from msff.gpu_check import GpuCheck

    if value is None:
        monkeypatch.delenv("MSFF_CUDA_CONV", raising=False)
    else:
        monkeypatch.setenv("MSFF_CUDA_CONV", value)
    chk = GpuCheck(tmp_path, dry_run=True, budget_s=1.0, reps=1, record_dir=None,
                   dtypes=("float32",), autotune=False)
    assert chk.doc["environment"]["cuda_conv"] == want


def test_conv_kernel_default_and_environment(monkeypatch):
    """The process default (what a validation record sets) is used when MSFF_CUDA_CONV is unset;
    the variable wins when set; unknown names are refused in one line."""
    _ext()
    import msff.ops._cuda as cb

    monkeypatch.delenv(cb.CONV_KERNEL_ENV, raising=False)
    assert cb.conv_kernel() == "generic"  # nothing validated: the generic kernels
    prev = cb.set_conv_kernel_default("tc-cpasync")
    try:
        assert prev == "generic"
        assert cb.conv_kernel() == "tc-cpasync"
        assert str(torch.ops.msff._cuda_conv_default("")) == "tc-cpasync"
        monkeypatch.setenv(cb.CONV_KERNEL_ENV, "sm80")
        assert cb.conv_kernel() == "sm80"
        with pytest.raises(ValueError, match="one of generic, tc, tc-cpasync, sm80, got 'fast'"):
            cb.set_conv_kernel_default("fast")
        with pytest.raises(RuntimeError, match="got 'fast'"):
            torch.ops.msff._cuda_conv_default("fast")
        assert cb.conv_kernel() == "sm80"
    finally:
        assert cb.set_conv_kernel_default(prev) == "tc-cpasync"
    monkeypatch.delenv(cb.CONV_KERNEL_ENV)
    assert cb.conv_kernel() == "generic"
