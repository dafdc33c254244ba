"""The tensor-core CUDA kernels seen without a GPU (issue 12's offline acceptance).

* SASS: csrc/cuda/line_conv_tc.cu compiled by nvcc for sm_90a and sm_80 (as the build does),
  read back with cuobjdump: the forward / input-gradient main loop of the sm_90a kernel issues
  HGMMA (wgmma), every tensor-core kernel stages its operands with 16-byte LDGSTS (cp.async) and
  feeds the tensor cores from shared memory with LDSM (ldmatrix), none loads 2-byte scalars from
  global memory, none spills, and the register counts leave room for the designed 8 warps per SM.
* Launch plans (msff::_lk_conv_cuda_plan, the functions the launchers call) at the paper's shapes
  on H100/H200 and A100: the weights of a CTA's channels stay resident in shared memory, one CTA
  per SM, the persistent grid covers every SM, the weight-gradient split fills the GPU.

Skips (saying why) without nvcc / cuobjdump or without the compiled extension.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SRC = os.path.join(ROOT, "csrc", "cuda", "line_conv_tc.cu")
THREADS = 256
REGS_PER_SM = 65536

# paper shapes: E1 N=32, 64 channels, 512²; E2 N=32, 128 channels, 256²; k = 15
E1 = (32, 64, 64, 512, 512, 15)
E2 = (32, 128, 128, 256, 256, 15)
H100 = dict(smem_optin=232448, num_sms=132)
A100 = dict(smem_optin=166912, num_sms=108)


def _tool(name):
    import triton

    cands = [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name),
             os.path.join("/usr/local/cuda/bin", name), shutil.which(name) or ""]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _nvcc():
    for c in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc",
              shutil.which("nvcc") or ""):
        if c and os.path.isfile(c):
            return c
    return None


SERIALIZED: dict[str, list[str]] = {}  # ptxas notes "wgmma ... serialized" per arch


def _compile(arch, out_dir):
    """(kernel name -> {regs, spill}) from ptxas -v, (kernel name -> opcode Counter) from SASS."""
    nvcc, cuobjdump = _nvcc(), _tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump (CUDA toolkit or the triton wheel's bin/)")
    cubin = os.path.join(out_dir, f"line_conv_tc.{arch}.cubin")
    r = subprocess.run([nvcc, f"-arch={arch}", "-O3", "-std=c++17", "-I" + os.path.join(ROOT, "csrc"),
                        "-Xptxas", "-v", "-cubin", SRC, "-o", cubin], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    SERIALIZED[arch] = [ln for ln in r.stderr.splitlines() if "serialized" in ln]
    info, cur = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
            info[cur] = {}
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            info[cur]["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            info[cur]["regs"] = int(m.group(1))
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    ops = {}
    for chunk in re.split(r"\n\s+Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ops[name] = collections.Counter(
            re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", chunk))
    assert set(info) == set(ops), (sorted(info), sorted(ops))
    return info, ops


@pytest.fixture(scope="module")
def sm90a(tmp_path_factory):
    return _compile("sm_90a", str(tmp_path_factory.mktemp("sm90a")))


@pytest.fixture(scope="module")
def sm80(tmp_path_factory):
    return _compile("sm_80", str(tmp_path_factory.mktemp("sm80")))


def _count(ops, prefix):
    return sum(n for op, n in ops.items() if op.startswith(prefix))


def _kernels(info, part):
    names = [k for k in info if part in k]
    assert names, f"no kernel named *{part}* in {sorted(info)}"
    return names


def _check_tc_kernel(name, info, ops, mma):
    o = ops[name]
    assert info[name]["spill"] == 0, f"{name} spills {info[name]['spill']} bytes"
    # 8 warps of this register count fit one SM: the designed occupancy (1 CTA of 256 threads)
    assert info[name]["regs"] * THREADS <= REGS_PER_SM, f"{name}: {info[name]['regs']} registers"
    assert _count(o, mma) > 0, f"{name}: no {mma} in {dict(o)}"
    assert _count(o, "LDGSTS.E.BYPASS.128") > 0, f"{name}: operands not staged by 16-byte cp.async"
    assert _count(o, "LDSM") > 0, f"{name}: tensor-core operands not loaded by ldmatrix"
    scalar = {op: n for op, n in o.items() if re.match(r"LDG\.E\.(U|S)(8|16)$", op)}
    assert not scalar, f"{name}: 2-byte/1-byte scalar global loads {scalar}"
    assert _count(o, "ATOM") + _count(o, "RED") == 0, f"{name}: atomics (statistics must be deterministic)"


@pytest.mark.parametrize("part", ["line_conv_sm90a_kernel", "line_conv_wgrad_sm90a_kernel"])
def test_sm90a_kernels_issue_wgmma_fed_by_cp_async(sm90a, part):
    info, ops = sm90a
    for name in _kernels(info, part):
        _check_tc_kernel(name, info, ops, "HGMMA")
        assert _count(ops[name], "WARPGROUP.ARRIVE") > 0, name


def test_ptxas_keeps_the_wgmma_pipelines_asynchronous(sm90a):
    # e.g. C7520 "wgmma.mma_async instructions are serialized due to ... divergent path"
    assert not SERIALIZED["sm_90a"], "\n".join(SERIALIZED["sm_90a"])


def test_sm80_kernels_issue_mma_sync_fed_by_cp_async(sm90a, sm80):
    for info, ops in (sm90a, sm80):
        for part in ("line_conv_sm80_kernel", "line_conv_wgrad_tc_kernel"):
            for name in _kernels(info, part):
                _check_tc_kernel(name, info, ops, "HMMA")


def test_sm90a_kernels_are_only_a_trap_outside_sm90a(sm80):
    info, ops = sm80
    for name in _kernels(info, "sm90a_kernel"):
        assert _count(ops[name], "HGMMA") == 0 and _count(ops[name], "BPT.TRAP") > 0, dict(ops[name])


def test_reductions_walk_partials_in_a_fixed_order(sm90a):
    info, ops = sm90a
    for part in ("reduce_partials_kernel", "reduce_wgrad_kernel"):
        for name in _kernels(info, part):
            assert _count(ops[name], "ATOM") + _count(ops[name], "RED") == 0, name


# ---- launch plans --------------------------------------------------------------------------------
def _plan(shape, dev):
    pytest.importorskip("msff._C", reason="the compiled extension msff._C is not built")
    from msff.ops._cuda import conv_plan

    return conv_plan(*shape, **dev)


@pytest.mark.parametrize("dev", [H100, A100], ids=["h100", "a100"])
@pytest.mark.parametrize("shape", [E1, E2], ids=["E1", "E2"])
def test_forward_plan_keeps_weights_resident_and_fills_every_sm(shape, dev):
    n, cin, cout, h, w, k = shape
    p = _plan(shape, dev)
    bn = p["fwd_bn"]
    assert bn in (16, 32, 64)
    weights = k * cin * bn * 2
    halo = (p["fwd_bm"] + k - 1) * (cin + 8) * 2
    assert p["fwd_smem_bytes"] >= weights + 2 * halo  # all taps resident + two halo stages
    assert p["fwd_smem_bytes"] <= dev["smem_optin"]
    assert 2 * p["fwd_smem_bytes"] > dev["smem_optin"]  # one CTA per SM, by design
    ctas = p["fwd_grid_x"] * p["fwd_grid_y"]
    assert dev["num_sms"] * 3 // 4 <= ctas <= dev["num_sms"]
    assert p["fwd_grid_y"] == -(-cout // bn)
    if shape == E1:
        assert bn == 64  # C=64, k=15: 123 KB of bf16 weights resident, on both GPUs


@pytest.mark.parametrize("dev", [H100, A100], ids=["h100", "a100"])
@pytest.mark.parametrize("shape", [E1, E2], ids=["E1", "E2"])
def test_weight_gradient_plan_splits_pixels_over_the_gpu(shape, dev):
    n, cin, cout, h, w, k = shape
    p = _plan(shape, dev)
    assert k <= p["wgrad_kmax"]
    ctas = p["wgrad_grid_x"] * p["wgrad_grid_y"] * p["wgrad_splits"]
    assert dev["num_sms"] // 2 <= ctas <= dev["num_sms"]
    assert p["wgrad_smem_bytes"] <= dev["smem_optin"]
    assert p["wgrad_grid_x"] == -(-cout // p["wgrad_bm"]) and p["wgrad_grid_y"] == -(-cin // p["wgrad_bn"])


def test_plan_says_no_tile_fits_when_weights_cannot_be_resident():
    p = _plan((1, 1024, 64, 8, 8, 31), H100)  # 31 taps x 1024 channels x 16 x 2 B > 227 KB
    assert p["fwd_bn"] == 0


def test_built_extension_carries_sm80_sm90a_and_ptx():
    C = pytest.importorskip("msff._C", reason="the compiled extension msff._C is not built")
    if not getattr(C, "WITH_CUDA", 0):
        pytest.skip("msff._C was built without CUDA kernels")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        pytest.skip(f"TORCH_CUDA_ARCH_LIST={arch_list!r} overrides the default targets")
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("needs cuobjdump")
    (so,) = [p for p in glob.glob(os.path.join(os.path.dirname(C.__file__), "_C*.so"))] or [C.__file__]
    out = subprocess.run([cuobjdump, "-lelf", "-lptx", so], capture_output=True, text=True).stdout
    for want in ("line_conv_tc.sm_80.cubin", "line_conv_tc.sm_90a.cubin", "line_conv_tc.sm_80.ptx"):
        assert want in out, out
