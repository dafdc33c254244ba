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
PW_SRC = os.path.join(ROOT, "csrc", "cuda", "pointwise.cu")
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


def _compile(arch, out_dir, src=SRC, defines=()):
    """(kernel name -> {regs, spill}) from ptxas -v, (kernel name -> opcode Counter) from SASS."""
    nvcc, cuobjdump = _nvcc(), _tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump (CUDA toolkit or the triton wheel's bin/)")
    cubin = os.path.join(out_dir, f"{os.path.basename(src)}.{arch}.cubin")
    r = subprocess.run([nvcc, f"-arch={arch}", "-O3", "-std=c++17", "-I" + os.path.join(ROOT, "csrc"),
                        *defines, "-Xptxas", "-v", "-cubin", src, "-o", cubin],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if src == SRC:
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
    for name in _kernels(info, "sm90a_kernel") + _kernels(info, "line_conv_tma_kernel"):
        assert _count(ops[name], "HGMMA") == 0 and _count(ops[name], "BPT.TRAP") > 0, dict(ops[name])
        assert _count(ops[name], "UTMALDG") == 0, name


TMA_THREADS = 288  # two consumer warpgroups + one producer warp


def test_sm90a_tma_kernel_is_a_warp_specialised_mbarrier_pipeline(sm90a):
    info, ops = sm90a
    names = _kernels(info, "line_conv_tma_kernel")
    assert len(names) == 6  # bf16, fp16 x BN 16, 32, 64
    for name in names:
        o = ops[name]
        assert info[name]["spill"] == 0, f"{name} spills {info[name]['spill']} bytes"
        assert info[name]["regs"] * TMA_THREADS <= REGS_PER_SM, (name, info[name]["regs"])
        assert _count(o, "UTMALDG.4D") > 0, f"{name}: the halo is not loaded by TMA: {dict(o)}"
        # mbarriers: expect-tx arrive (producer), plain arrive (consumers), phase-parity wait (both)
        assert _count(o, "SYNCS.ARRIVE.TRANS64.A1T0") > 0 and _count(o, "SYNCS.ARRIVE.TRANS64") > 0, dict(o)
        assert _count(o, "SYNCS.PHASECHK") > 0, dict(o)
        assert _count(o, "HGMMA") > 0 and _count(o, "WARPGROUP.ARRIVE") > 0, dict(o)
        assert _count(o, "LDSM") > 0, f"{name}: A fragments not loaded by ldmatrix"
        scalar = {op: n for op, n in o.items() if re.match(r"LDG\.E\.(U|S)(8|16)$", op)}
        assert not scalar, f"{name}: 2-byte/1-byte scalar global loads {scalar}"
        assert _count(o, "ATOM") + _count(o, "RED") == 0, name
        # the consumers synchronise among themselves (named barrier 1), the producer never joins
        assert _count(o, "BAR.SYNC") > 0, dict(o)


def test_reductions_walk_partials_in_a_fixed_order(sm90a):
    info, ops = sm90a
    for part in ("reduce_partials_kernel", "reduce_wgrad_kernel"):
        for name in _kernels(info, part):
            assert _count(ops[name], "ATOM") + _count(ops[name], "RED") == 0, name


# ---- pointwise / SE kernels (csrc/cuda/pointwise.cu) ---------------------------------------------
PW_KERNELS = ("se_pool_kernel", "se_apply_kernel", "se_bwd_reduce_kernel", "se_bwd_apply_kernel",
              "lk_conv_bwd_prep_kernel")
PW_MIN_BLOCKS = 3  # __launch_bounds__(256, 3): three CTAs of 8 warps per SM


@pytest.fixture(scope="module", params=["sm_90a", "sm_80"])
def pointwise(request, tmp_path_factory):
    return _compile(request.param, str(tmp_path_factory.mktemp("pw")), src=PW_SRC)


def test_pointwise_vector_kernels_move_16_bytes_without_spills_or_atomics(pointwise):
    info, ops = pointwise
    vec_seen = collections.Counter()
    for name in info:
        o = ops[name]
        assert info[name]["spill"] == 0, f"{name} spills {info[name]['spill']} bytes"
        assert _count(o, "ATOM") + _count(o, "RED") == 0, f"{name}: atomics (sums must be deterministic)"
        kern = next((k for k in PW_KERNELS if k in name), None)
        if kern is None:
            continue
        assert info[name]["regs"] * THREADS * PW_MIN_BLOCKS <= REGS_PER_SM, (name, info[name]["regs"])
        # the vector instantiations: <bf16|fp16, 8> and <float, 4> (mangled Li8E / Li4E)
        if re.search(r"Li[48]E", name):
            vec_seen[kern] += 1
            assert _count(o, "LDG.E.128") > 0, f"{name}: no 16-byte loads in {dict(o)}"
            scalar = {op: n for op, n in o.items() if re.match(r"LDG\.E\.(U|S)(8|16)", op)}
            assert not scalar, f"{name}: 2-byte/1-byte scalar global loads {scalar}"
            if "se_pool" not in name:  # every other kernel writes an activation
                assert _count(o, "STG.E.128") > 0, f"{name}: no 16-byte stores in {dict(o)}"
            narrow = {op: n for op, n in o.items() if op in ("STG.E", "STG.E.U16")}
            assert not narrow, f"{name}: activation stores split into narrow stores {narrow}"
    assert vec_seen == {k: 3 for k in PW_KERNELS}, vec_seen  # bf16, fp16, fp32


def test_pointwise_bf16_math_packs_pairs(pointwise):
    # bf16x2 / half2 conversions: one F2FP...PACK_AB per pair of outputs, no per-element F2F
    info, ops = pointwise
    for name in info:
        if "se_apply_kernel" in name and "Li8E" in name:
            assert _count(ops[name], "F2FP") > 0, dict(ops[name])


def _pw_plan(*shape):
    pytest.importorskip("msff._C", reason="the compiled extension msff._C is not built")
    from msff.ops._cuda import pointwise_plan

    return pointwise_plan(*shape)


@pytest.mark.parametrize("shape", [(32, 64, 512, 512), (32, 128, 256, 256), (1, 3, 5, 7), (2, 40, 37, 53),
                                   (4, 256, 64, 64), (1, 64, 1, 1)])
def test_pointwise_plan_tiles_cover_each_image_once(shape):
    n, c, h, w = shape
    p = _pw_plan(*shape)
    assert (p["channels_per_cta"], p["pixels_per_subtile"], p["threads"]) == (64, 256, 256)
    assert (p["vector_elems_bf16"], p["vector_elems_fp32"]) == (8, 4)  # 16-byte vectors
    assert p["grid_y"] == -(-c // 64) and p["grid_z"] == n
    assert p["span"] % 256 == 0
    assert (p["grid_x"] - 1) * p["span"] < h * w <= p["grid_x"] * p["span"]  # no empty CTA, no gap
    assert p["partial_elems"] == n * p["grid_x"] * c
    ctas = p["grid_x"] * p["grid_y"] * p["grid_z"]
    assert ctas >= 2048 or p["span"] == 256  # the grid fills the GPU unless the images are tiny


def test_pointwise_plan_at_the_paper_shapes():
    p = _pw_plan(32, 64, 512, 512)  # E1
    assert (p["span"], p["grid_x"]) == (4096, 64)  # 16 sub-tiles per CTA, 2048 CTAs
    assert p["partial_elems"] * 8 < 32 * 64 * 512 * 512 * 2 / 100  # partials < 1 % of the activation


# ---- TMA descriptor and pipeline plan (msff::_lk_conv_cuda_tma_plan) ------------------------------
def _tma(n, c, h, w, k, axis=1, layout="channels_last", bn=64, smem_optin=H100["smem_optin"]):
    pytest.importorskip("msff._C", reason="the compiled extension msff._C is not built")
    from msff.ops._cuda import tma_plan

    if isinstance(layout, tuple):
        strides = layout
    else:
        strides = {"channels_last": (h * w * c, 1, w * c, c), "contiguous": (c * h * w, h * w, w, 1)}[layout]
    return tma_plan(n, c, h, w, strides, k, axis, bn, smem_optin)


@pytest.mark.parametrize("axis", [1, 0])
def test_tma_descriptor_of_a_channels_last_activation(axis):
    n, c, h, w, k = 32, 64, 300, 512, 15
    p = _tma(n, c, h, w, k, axis)
    assert p["ok"]
    length, lines = (w, h) if axis == 1 else (h, w)
    s_len, s_line = (c, w * c) if axis == 1 else (w * c, c)
    assert p["dims"] == [c, length, lines, n]  # innermost first
    assert p["strides_bytes"] == [2 * s_len, 2 * s_line, 2 * h * w * c]
    assert p["box"] == [64, 128 + k - 1, 1, 1]  # 64 channels x the halo'd 128-pixel tile
    assert p["chunks"] == 1 and p["box_bytes"] == 64 * 142 * 2  # the expect-tx byte count
    assert p["chunk_bytes"] % 1024 == 0 and p["chunk_bytes"] >= p["box_bytes"]  # 128-B swizzle atoms


@pytest.mark.parametrize("shape,bn,stages", [(E1, 64, 4), (E2, 32, 2), ((2, 24, 24, 40, 40, 31), 32, 4)],
                         ids=["E1", "E2", "odd"])
def test_tma_pipeline_plan_fits_hopper_shared_memory(shape, bn, stages):
    n, cin, cout, h, w, k = shape
    p = _tma(n, cin, h, w, k, 1, bn=bn)
    assert p["ok"] and p["threads"] == TMA_THREADS
    assert p["stages"] == stages
    assert p["chunks"] == -(-cin // 64) and p["stage_bytes"] == p["chunks"] * p["chunk_bytes"]
    weights = k * (-(-cin // 16) * 16) * bn * 2
    assert p["smem_bytes"] >= weights + p["stages"] * p["stage_bytes"]
    assert p["smem_bytes"] <= H100["smem_optin"]
    # the same BN the forward plan picks on H100 (weights resident)
    assert _plan(shape, H100)["fwd_bn"] == bn


def test_tma_refuses_what_a_tensor_map_cannot_describe():
    assert not _tma(2, 64, 32, 32, 15, layout="contiguous")["ok"]  # channels not contiguous
    # a pixel stride of 12 bf16 = 24 bytes is not a multiple of 16
    assert not _tma(2, 12, 32, 32, 15, layout=(32 * 32 * 12, 1, 32 * 12, 12))["ok"]
    assert _tma(2, 16, 32, 32, 15)["ok"]  # 16 channels: the box's 48 tail channels are zero-filled
    assert _tma(1, 1024, 8, 8, 31, bn=16, smem_optin=H100["smem_optin"])["stages"] == 0  # no room


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


# ---- the generic kernels (csrc/cuda/line_conv.cu): a 16-byte path and a scalar fallback -------
# Each kernel is template <T, V>: V = 8 (bf16/fp16) or 4 (fp32) stages every operand with 16-byte
# cp.async (zero-filled padding / tails) and moves the epilogue's activations as 16-byte vectors;
# V = 1 is the fallback for NCHW, strided views and channel counts that are not a multiple of V.
LC_SRC = os.path.join(ROOT, "csrc", "cuda", "line_conv.cu")
LC_KERNELS = ("line_conv_fwd_kernel", "line_conv_wgrad_kernel")
LC_THREADS = 128


@pytest.fixture(scope="module", params=["sm_90a", "sm_80"])
def generic(request, tmp_path_factory):
    defines = ("-DMSFF_WITH_CUDA=1",) + (("-DMSFF_HAVE_SM90A=1",) if request.param == "sm_90a" else ())
    return _compile(request.param, str(tmp_path_factory.mktemp("lc")), src=LC_SRC, defines=defines)


def test_generic_conv_vector_path_stages_16_byte_cp_async(generic):
    info, ops = generic
    seen = collections.Counter()
    for name in info:
        o = ops[name]
        assert info[name]["spill"] == 0, f"{name} spills {info[name]['spill']} bytes"
        # the weight gradient writes per-split partials summed in split order: no atomics
        # (the split slices are summed by reduce_wgrad_kernel of line_conv_tc.cu, also atomic-free)
        if "line_conv_wgrad_kernel" in name:
            assert _count(o, "ATOM") + _count(o, "RED") == 0, f"{name}: atomics in {dict(o)}"
        kern = next((k for k in LC_KERNELS if k in name), None)
        assert kern is not None, f"unexpected kernel {name} in line_conv.cu"
        assert info[name]["regs"] * LC_THREADS * 2 <= REGS_PER_SM, (name, info[name]["regs"])  # >= 2 CTAs/SM
        assert _count(o, "HMMA") > 0, f"{name}: no tensor-core HMMA in {dict(o)}"
        m = re.search(r"(13__nv_bfloat16|6__half|f)Li(\d+)E", name)
        assert m, name
        seen[(kern, m.group(1), int(m.group(2)))] += 1
        if m.group(2) == "1":
            continue  # the scalar fallback: element loads are what a strided view needs
        assert _count(o, "LDGSTS.E.BYPASS.128") > 0, f"{name}: operands not staged by 16-byte cp.async"
        narrow = {op: n for op, n in o.items()
                  if re.match(r"LDG\.E\.(U|S)(8|16)", op) or (op.startswith("LDGSTS") and not op.endswith(".128"))}
        assert not narrow, f"{name}: narrow global loads {narrow}"
        if kern == "line_conv_fwd_kernel":
            # the epilogue writes y as 16-byte vectors, never element by element
            assert _count(o, "STG.E.128") > 0, f"{name}: no 16-byte stores in {dict(o)}"
            assert not {op for op in o if op in ("STG.E", "STG.E.U16")}, f"{name}: narrow stores {dict(o)}"
    want = {(k, t, v): 1 for k in LC_KERNELS
            for t, v in (("13__nv_bfloat16", 8), ("6__half", 8), ("f", 4),
                         ("13__nv_bfloat16", 1), ("6__half", 1), ("f", 1))}
    assert dict(seen) == want, sorted(seen)


def test_mma_sync_plan_takes_the_64_pixel_tile_where_128_leaves_16_channels():
    # A100 at E2 (Cin = Cout = 128, k = 15): 32 channels of resident weights (123 KB) + two
    # 128-pixel halo stages do not fit 163 KB, so the wgmma-style plan drops to 16 channels (8
    # n-tiles, each staging every halo); the mma.sync kernel takes 64 x 32 instead.
    wgmma = _plan(E2, dict(A100, cc=90))
    mma = _plan(E2, dict(A100, cc=80))
    assert (wgmma["fwd_bm"], wgmma["fwd_bn"]) == (128, 16)
    assert (mma["fwd_bm"], mma["fwd_bn"]) == (64, 32)
    assert mma["fwd_smem_bytes"] <= A100["smem_optin"] and mma["fwd_grid_y"] == 4
    # halo bytes staged per output pixel: (bm + k - 1) / bm x n-tiles
    assert (64 + 14) / 64 * 4 < 0.6 * ((128 + 14) / 128 * 8)
    # where 128 pixels fit, both plans are the same (E1 on an A100; E1 and E2 on an H100)
    for shape, dev in ((E1, A100), (E1, H100), (E2, H100)):
        a, b = _plan(shape, dict(dev, cc=90)), _plan(shape, dict(dev, cc=80))
        assert a == b and a["fwd_bm"] == 128, (shape, dev)
