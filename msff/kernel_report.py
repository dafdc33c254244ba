"""``python -m msff.kernel_report``: what the GPU will make of msff's kernels, seen without a GPU.

For every Triton kernel launch the launchers choose at the paper's shapes (from
``msff.kernels.lk_conv.compile_specs`` / ``msff.kernels.lkam_se.compile_specs``, which call the
launchers' own config functions) and every CUDA kernel in ``csrc/cuda/*.cu``, compile offline
for sm_90a (H100/H200) and sm_80 (A100) and report: registers, spill bytes, shared memory,
theoretical occupancy, tensor-core instructions (HGMMA = wgmma, HMMA = mma.sync), the global-load
mix (16-byte ``LDG.E.128``, ``LDGSTS`` cp.async, ``UTMALDG`` TMA vs 2-/4-byte scalar loads), in
the whole kernel and inside its loops (the main loop), and atomics. Beside each launch, a
roofline line: FLOPs, the fewest HBM bytes, the floor at 989 TFLOP/s (bf16/fp16 dense; TF32
494.7) and 3.35 TB/s, and the L2->SM traffic the chosen tiling implies with its time.

CUDA conv roofline (``cuda_roofline``, issue 12): for the tensor-core line convolutions of
csrc/cuda/line_conv_tc.cu at every stage, both axes, forward / input gradient / weight gradient,
sm_90a and sm_80, the launch plan their launchers compute (``msff.ops._cuda.conv_plan`` /
``tma_plan``, needs ``msff._C`` but no GPU), the kernel it selects, FLOPs, the fewest HBM bytes
and the tiling traffic that plan implies (halo staged per tile and n-tile, resident weights per
CTA, epilogue reads/writes, statistics and weight-gradient partials), timed at the L2 and at the
HBM bandwidth against the compute floor at 800 TFLOP/s (the acceptance; ``cuda_roofline_failures``
lists the E1/E2 rows that miss it).

Shapes (issue 10): E1 = N 32 × 64 ch × 512² (the LKAM layer E1 runs at the input resolution;
the paper's Table 1 lists 256² for E1 because it reports the output after the pool), E2 = N 32 ×
128 ch × 256², k = 15; also the first block of each layer (3 -> 64 and 64 -> 128, projection
shortcut), since the model launches those too. channels_last, as the model runs on GPU.

Triton compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` after
applying Triton's own launch-time specialization to the launch values (ints equal to 1 become
constants, 16-divisible ints and pointers get divisibility hints), so the code is the code a
launch would JIT. Needs ``TRITON_INTERPRET`` unset: :func:`main` re-runs itself in a clean
subprocess when it is set. Results are cached per (kernel source, specialization, arch) under
``MSFF_KERNEL_REPORT_CACHE`` (default ``~/.cache/msff/kernel-report``).

Example:
    $ python -m msff.kernel_report                       # full report, prints the table
    $ python -m msff.kernel_report --dtypes bfloat16 --arch sm_90a --out /tmp/r.json
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

SCHEMA = "msff-kernel-report/1"
ANALYSIS_VERSION = "3"  # bump when the SASS/ptxas parsing changes (invalidates the cache)
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "kernel-report.json"
DTYPES = ("bfloat16", "float16", "float32")
ARCHS = ("sm_90a", "sm_80")
CONV_ROLES = ("conv_fwd", "conv_dgrad", "conv_wgrad")

#: H100 SXM / H200 peaks the issue quotes (dense tensor-core math, HBM3/HBM3e bandwidth of H100)
PEAK_FLOPS = {"bfloat16": 989e12, "float16": 989e12, "float32": 494.7e12}  # fp32 runs as TF32
HBM_BW = 3.35e12
#: L2 -> SM bandwidth assumed for the tiling-traffic time (H100: ~5.5-7 TB/s measured by
#: microbenchmarks; an assumption, stated in the JSON)
L2_BW = 6.0e12

#: per-SM limits for theoretical occupancy
SM_LIMITS = {
    "sm_90a": dict(regs=65536, warps=64, blocks=32, smem=233472, smem_block_max=232448),
    "sm_80": dict(regs=65536, warps=64, blocks=32, smem=167936, smem_block_max=166912),
}

#: paper shapes: (stage, N, C_in, C_out, H, W), k = 15
STAGES = (
    ("E1.0", 32, 3, 64, 512, 512),
    ("E1", 32, 64, 64, 512, 512),
    ("E2.0", 32, 64, 128, 256, 256),
    ("E2", 32, 128, 128, 256, 256),
)
KSIZE = 15
SMS = 132  # H100 SXM / H200


# ---- problems: the launches one LKAM block makes (msff/ops/lkam.py) ---------------------------
def block_problems(stage, N, cin, cout, H, W, dtype, mode, channels_last=True):
    """The ``lk_conv`` and ``lkam_se`` op calls of one LKAM block (cin -> cout) in ``mode``, as
    msff.ops.lkam.lkam_block makes them: (lk_conv problems, lkam_se problems)."""
    import torch

    dt = getattr(torch, dtype)
    common = dict(N=N, H=H, W=W, K=KSIZE, dtype=dt, channels_last=channels_last, sms=SMS)
    proj = cin != cout
    tag = f"{stage} {mode} "
    if mode == "train":
        # branch a: 1xk then kx1; branch b: kx1 then 1xk; raw convs with BN statistics, each BN
        # (+ReLU) applied in the next op's prologue; backward of everything
        conv = [
            dict(common, cin=cin, cout=cout, along_w=True, stats=True),
            dict(common, cin=cin, cout=cout, along_w=False, stats=True),
            dict(common, cin=cout, cout=cout, along_w=False, prologue=True, stats=True),
            dict(common, cin=cout, cout=cout, along_w=True, prologue=True, stats=True),
        ]
        if proj:
            conv.append(dict(common, cin=cin, cout=cout, K=1, along_w=True, stats=True))
        for c in conv:
            c.update(backward=True, tag=tag)
        se = [dict(N=N, C=cout, H=H, W=W, dtype=dt, channels_last=channels_last, sms=SMS,
                   has_b=True, aff_a=True, aff_b=True, aff_r=proj, backward=True, tag=tag)]
    else:
        # eval without gradients: BN folded, bias + ReLU epilogue, branch sum and the SE squeeze
        # (per-image Σ_hw) fused into the last conv's epilogue, then one SE op (apply only)
        conv = [
            dict(common, cin=cin, cout=cout, along_w=True, bias=True, relu=True),
            dict(common, cin=cin, cout=cout, along_w=False, bias=True, relu=True),
            dict(common, cin=cout, cout=cout, along_w=False, bias=True, relu=True),
            dict(common, cin=cout, cout=cout, along_w=True, bias=True, relu=True, add=True,
                 pool=True),
        ]
        if proj:
            conv.append(dict(common, cin=cin, cout=cout, K=1, along_w=True, bias=True))
        for c in conv:
            c.update(backward=False, tag=tag)
        se = [dict(N=N, C=cout, H=H, W=W, dtype=dt, channels_last=channels_last, sms=SMS,
                   has_b=False, backward=False, pool_given=True, tag=tag)]
    return conv, se


class MissingSpecs(RuntimeError):
    """A kernel module has no ``compile_specs``: the report cannot plan its launches."""


PASS_OF_ROLE = {"conv_fwd": "forward", "conv_dgrad": "input-grad", "conv_wgrad": "weight-grad"}


def _pass_of(spec) -> str:
    if spec["role"] in PASS_OF_ROLE:
        return PASS_OF_ROLE[spec["role"]]
    if spec["kernel_name"].startswith("_lkam_se"):
        return "se-backward" if "bwd" in spec["kernel_name"] else "se"
    return "input-grad (pointwise)"


def triton_specs(dtypes=DTYPES, modes=("train", "eval"), stages=STAGES):
    """Every Triton launch of the LKAM blocks at ``stages``, from the launchers' compile_specs,
    annotated with stage, mode, dtype and pass."""
    from msff.kernels import lk_conv as klc
    from msff.kernels import lkam_se as kse

    missing = [m.__name__ for m in (klc, kse) if not callable(getattr(m, "compile_specs", None))]
    if missing:
        raise MissingSpecs(f"{', '.join(missing)} define no compile_specs(problems): the kernel "
                           "report cannot know what the launchers launch (see its docstring)")
    out = []
    for dtype in dtypes:
        for mode in modes:
            for stage, N, cin, cout, H, W in stages:
                conv, se = block_problems(stage, N, cin, cout, H, W, dtype, mode)
                specs = klc.compile_specs(conv) + kse.compile_specs(se)
                for s in specs:
                    s.update(stage=stage, mode=mode, dtype=dtype, pass_=_pass_of(s))
                out += specs
    return out


# ---- compiling --------------------------------------------------------------------------------
def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _specialize(spec, target):
    """Triton's launch-time specialization of ``spec``'s argument values for ``target``:
    (signature, constexprs, attrs, options) exactly as JITFunction.run would compute them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    k = spec["kernel"]
    backend = make_backend(target)
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, specialization, opts = binder(*spec["args"], **spec["options"])
    options, signature, constexprs, attrs = k._pack_args(backend, dict(spec["options"]), bound,
                                                         specialization, opts)
    return signature, constexprs, attrs, options


def _cache_dir() -> Path:
    d = os.environ.get("MSFF_KERNEL_REPORT_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "msff" / "kernel-report"


def _cache_get(key: str) -> Optional[dict]:
    p = _cache_dir() / f"{key}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cache_put(key: str, value: dict) -> None:
    d = _cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, d / f"{key}.json")
    except OSError:
        pass  # a cache that cannot be written only costs time


def _ptxas_stats(text: str) -> dict:
    """registers / spills / stack / shared memory / barriers from ``ptxas -v`` output (one kernel)."""
    def num(pat, default=0):
        m = re.search(pat, text)
        return int(m.group(1)) if m else default
    return {
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack": num(r"(\d+) bytes stack frame"),
        "smem_static": num(r"(\d+) bytes smem"),
        "barriers": num(r"used (\d+) barriers"),
    }


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_counts(sass: str) -> dict:
    """Instruction mix of one kernel's SASS (cuobjdump -sass text): whole kernel and inside loops
    (address ranges closed by a backward branch), for tensor-core math, global loads by width,
    async/TMA copies, stores and atomics."""
    instrs = []
    for m in _SASS_LINE.finditer(sass):
        addr = int(m.group(1), 16)
        op = m.group(3)
        instrs.append((addr, op, m.group(4)))
    loops = []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))

    def classify(op: str) -> list[str]:
        keys = []
        if op.startswith("HGMMA"):
            keys.append("hgmma")
        elif op.startswith("HMMA"):
            keys.append("hmma")
        elif op.startswith("LDGSTS"):
            keys.append("ldgsts")
            keys.append("ldgsts_128" if op.endswith(".128") else "ldgsts_narrow")
        elif op.startswith("UTMALDG") or op.startswith("UBLKCP"):
            keys.append("tma_load")
        elif op.startswith("LDG"):
            parts = op.split(".")
            if "128" in parts:
                keys.append("ldg_128")
            elif "64" in parts:
                keys.append("ldg_64")
            elif "U16" in parts or "S16" in parts:
                keys.append("ldg_16")
            elif "U8" in parts or "S8" in parts:
                keys.append("ldg_8")
            else:
                keys.append("ldg_32")
        elif op.startswith("STG"):
            parts = op.split(".")
            keys.append("stg_128" if "128" in parts else "stg_64" if "64" in parts
                        else "stg_16" if ("U16" in parts or "S16" in parts) else "stg_32")
        elif op.startswith(("RED", "ATOM")) and not op.startswith("ATOMS"):
            keys.append("atomics")
        elif op.startswith("LDSM"):
            keys.append("ldsm")
        elif op.startswith("SYNCS"):
            keys.append("syncs")  # mbarrier arrive / expect-tx / phase test (Hopper)
        return keys

    total: dict = {}
    in_loop: dict = {}
    for addr, op, _ in instrs:
        inside = any(lo <= addr <= hi for lo, hi in loops)
        for k in classify(op):
            total[k] = total.get(k, 0) + 1
            if inside:
                in_loop[k] = in_loop.get(k, 0) + 1
    mma = sorted({op for _, op, _ in instrs if op.startswith(("HGMMA", "HMMA"))})
    return {"total": total, "in_loop": in_loop, "loops": len(loops), "instructions": len(instrs),
            "mma_shapes": mma}


def occupancy(arch: str, registers: int, smem: int, warps: int) -> dict:
    """Theoretical occupancy (resident warps / max warps per SM) and what limits it."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // warps if regs_per_warp * warps <= lim["regs"] else 0
    by_smem = lim["smem"] // (smem + 1024) if smem <= lim["smem_block_max"] else 0
    by_warps = lim["warps"] // warps
    blocks = min(by_regs, by_smem, by_warps, lim["blocks"])
    limiter = min((("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps),
                   ("blocks", lim["blocks"])), key=lambda t: t[1])[0]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": round(blocks * warps / lim["warps"], 3), "limiter": limiter}


def compile_triton(spec, arch: str) -> dict:
    """Compile one spec for ``arch`` (sm_90a | sm_80) and analyse it (cached)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cap = {"sm_90a": 90, "sm_80": 80}[arch]
    target = GPUTarget("cuda", cap, 32)
    signature, constexprs, attrs, options = _specialize(spec, target)
    key_src = json.dumps([ANALYSIS_VERSION, triton.__version__, spec["kernel"].cache_key, arch,
                          signature, sorted((str(k), str(v)) for k, v in constexprs.items()),
                          sorted((str(k), str(v)) for k, v in attrs.items()),
                          spec["options"]], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    hit = _cache_get(key)
    if hit is not None:
        return dict(hit, cached=True)
    ck = triton.compile(ASTSource(spec["kernel"], signature, constexprs, attrs), target=target,
                        options=options.__dict__)
    with tempfile.TemporaryDirectory() as td:
        ptx = Path(td) / "k.ptx"
        ptx.write_text(ck.asm["ptx"])
        cubin = Path(td) / "k.cubin"
        # the flags triton's own make_cubin passes (triton 3.8), plus -v
        r = subprocess.run([str(_tool("ptxas")), "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={arch}", str(ptx), "-o", str(cubin)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
        stats = _ptxas_stats(r.stderr + r.stdout)
        sass = subprocess.run([str(_tool("cuobjdump")), "-sass", str(cubin)], capture_output=True,
                              text=True, timeout=300).stdout
    smem = int(ck.metadata.shared)
    res = dict(stats, smem=smem, sass=sass_counts(sass),
               occupancy=occupancy(arch, stats["registers"], smem, spec["options"]["num_warps"]))
    _cache_put(key, res)
    return dict(res, cached=False)


# ---- roofline ---------------------------------------------------------------------------------
def _esize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def roofline(spec) -> dict:
    """FLOPs, fewest HBM bytes, floor time, and the L2->SM traffic the spec's tiling implies."""
    p = spec["problem"]
    cx = spec["constexprs"]
    e = _esize(spec["dtype"])
    name = spec["kernel_name"]
    out: dict = {}
    if name == "_lk_conv_fwd_kernel":
        N, H, W, K = p["N"], p["H"], p["W"], p["K"]
        M = N * H * W
        # dgrad runs this kernel with Cin and Cout swapped
        cin, cout = (p["cout"], p["cin"]) if spec["role"] == "conv_dgrad" else (p["cin"], p["cout"])
        flops = 2 * M * cin * cout * K
        hbm = M * cin * e + cout * cin * K * e + M * cout * e
        if cx.get("HAS_ADD"):
            hbm += M * cout * e
        if cx.get("PRO_BWD"):
            hbm += M * cout * e  # re-reads the producer's input
        if "traffic" in spec:  # the launcher's compile_specs knows its own tiling (issue 11)
            out.update(flops=flops, hbm_bytes=hbm, **spec["traffic"])
            gm = gn = 0
        else:
            gm, gn = spec["grid"]
        BM, BN = cx["BLOCK_M"], cx["BLOCK_N"]
        a_bytes = gm * gn * K * BM * cin * e  # every program streams its rows once per tap
        b_bytes = gm * gn * K * cin * BN * e  # and the weight slice of its n-tile, once per tile
        if "traffic" not in spec:
            out.update(flops=flops, hbm_bytes=hbm, tile_a_bytes=a_bytes, tile_b_bytes=b_bytes,
                       tiling_note=f"x re-read {K}x per tap x {gn} n-tiles; weight "
                                   f"{cout * cin * K * e / 1e3:.0f} kB streamed by each of {gm} "
                                   "m-tiles")
    elif name == "_lk_conv_wgrad_kernel":
        N, H, W, K = p["N"], p["H"], p["W"], p["K"]
        M = N * H * W
        cin, cout = p["cin"], p["cout"]
        flops = 2 * M * cin * cout * K
        hbm = M * cin * e + M * cout * e + cout * cin * K * 4
        if "traffic" in spec:  # the launcher's compile_specs knows its own tiling (issue 11)
            out.update(flops=flops, hbm_bytes=hbm, **spec["traffic"])
    if name == "_lk_conv_fwd_kernel" or (name == "_lk_conv_wgrad_kernel" and "traffic" in spec):
        pass
    elif name == "_lk_conv_wgrad_kernel":
        N, H, W, K = p["N"], p["H"], p["W"], p["K"]
        M = N * H * W
        cin, cout = p["cin"], p["cout"]
        flops = 2 * M * cin * cout * K
        hbm = M * cin * e + M * cout * e + cout * cin * K * 4
        gn, gk, gz = spec["grid"]
        split = gz // K
        BN, BK = cx["BLOCK_N"], cx["BLOCK_K"]
        a_bytes = gn * gk * K * M * BN * e  # g re-read per (cin tile, tap)
        b_bytes = gn * gk * K * M * BK * e  # x re-read per (cout tile, tap)
        out.update(flops=flops, hbm_bytes=hbm, tile_a_bytes=a_bytes, tile_b_bytes=b_bytes,
                   atomic_bytes=split * cout * cin * K * 4,
                   tiling_note=f"g re-read {K * gk}x, x re-read {K * gn}x; dw reduced over "
                               f"{split} splits with fp32 atomics")
    else:
        # pointwise / reduction kernels: the tensors they touch, once
        N, H, W = p["N"], p["H"], p["W"]
        C = p.get("C", p.get("cout"))
        M = N * H * W
        if name == "_lk_conv_grad_out_kernel":
            n_in = 2 + (1 if cx.get("HAS_ADD") else 0)
            n_out = 1 + (1 if cx.get("NEED_GADD") else 0)
        elif name == "_lkam_se_pool_kernel":
            n_in, n_out = 1 + (1 if cx.get("HAS_B") else 0), 0
        elif name == "_lkam_se_fwd_kernel":
            n_in, n_out = 2 + (1 if cx.get("HAS_B") else 0), 1
        elif name == "_lkam_se_bwd_reduce_kernel":
            n_in, n_out = 2 + (1 if cx.get("HAS_B") else 0) + (1 if cx.get("AFF_R") else 0), 0
        elif name == "_lkam_se_bwd_kernel":
            n_in = 2 + (1 if cx.get("HAS_B") else 0)
            n_out = 1 + (1 if cx.get("HAS_B") else 0) + (1 if cx.get("NEED_R") else 0)
        else:
            n_in, n_out = 1, 1
        flops = 0
        hbm = (n_in + n_out) * M * C * e
        out.update(flops=flops, hbm_bytes=hbm, tile_a_bytes=hbm, tile_b_bytes=0,
                   tiling_note=f"{n_in} tensors read, {n_out} written once")
        out.update(spec.get("traffic", {}))  # reductions / passes that state their own bytes
    peak = PEAK_FLOPS[spec["dtype"]]
    t_math = out["flops"] / peak
    t_mem = out["hbm_bytes"] / HBM_BW
    tile = out["tile_a_bytes"] + out["tile_b_bytes"]
    out.update(
        floor_s=max(t_math, t_mem), math_s=t_math, hbm_s=t_mem,
        bound="math" if t_math >= t_mem else "memory",
        tiling_bytes=tile, tiling_l2_s=tile / L2_BW,
        tiling_hbm_s=tile / HBM_BW,
    )
    return out


# ---- CUDA kernels (nvcc) ------------------------------------------------------------------------
def _nvcc() -> Optional[str]:
    for cand in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _demangle(names: list[str]) -> dict:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out, strict=True)) if len(out) == len(names) else {n: n for n in names}


def compile_cuda(archs=ARCHS) -> list[dict]:
    """Compile every ``csrc/cuda/*.cu`` with nvcc for each arch and report per kernel."""
    nvcc = _nvcc()
    files = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not files:
        return []
    if nvcc is None:
        return [{"file": f.name, "status": "skipped: nvcc not found"} for f in files]
    out = []
    for f in files:
        for arch in archs:
            src_key = hashlib.sha256(
                b"".join(p.read_bytes() for p in sorted((ROOT / "csrc").rglob("*"))
                         if p.is_file() and p.suffix in (".cu", ".cuh", ".h"))
                + f.name.encode() + arch.encode() + ANALYSIS_VERSION.encode()).hexdigest()[:32]
            hit = _cache_get("cuda-" + src_key)
            if hit is not None:
                out += hit
                continue
            rows = _compile_cu(nvcc, f, arch)
            if all(r.get("status") == "ok" for r in rows):
                _cache_put("cuda-" + src_key, rows)
            out += rows
    return out


def _compile_cu(nvcc: str, f: Path, arch: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as td:
        cubin = Path(td) / "k.cubin"
        defs = ["-DMSFF_WITH_CUDA=1"] + (["-DMSFF_HAVE_SM90A=1"] if arch == "sm_90a" else [])
        cmd = [nvcc, f"-arch={arch}", "-cubin", "-O3", "-std=c++17", "-lineinfo",
               "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}", *defs, "-Xptxas", "-v",
               str(f), "-o", str(cubin)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return [{"file": f.name, "arch": arch, "status": f"error: {r.stderr.strip()[-1500:]}"}]
        log = r.stderr + r.stdout
        sass = subprocess.run([str(_tool("cuobjdump")), "-sass", str(cubin)], capture_output=True,
                              text=True, timeout=300).stdout
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_90a'" ... "Used N registers ..."
    per: dict = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            cur = m.group(1)
            per.setdefault(cur, "")
        if cur:
            per[cur] += line + "\n"
    funcs = re.split(r"\n\s*Function : ", sass)
    sass_of = {}
    for chunk in funcs[1:]:
        name = chunk.split("\n", 1)[0].strip()
        sass_of[name] = chunk
    names = sorted(set(per) & set(sass_of)) or sorted(sass_of)
    dem = _demangle(names)
    rows = []
    for n in names:
        stats = _ptxas_stats(per.get(n, ""))
        threads = _launch_bounds(per.get(n, ""))
        rows.append(dict(
            file=f.name, arch=arch, status="ok", kernel=n, demangled=dem[n],
            short=_short_name(dem[n]),
            **stats, smem=stats["smem_static"], sass=sass_counts(sass_of.get(n, "")),
            occupancy_note=("static smem only; dynamic smem and block size are chosen by the "
                            "host launcher" + (f"; __launch_bounds__ {threads}" if threads else "")),
        ))
    return rows


def _short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::foo_kernel<__half>(Params)`` -> ``foo_kernel<__half>``."""
    s = re.sub(r"^void\s+", "", demangled.replace("(anonymous namespace)::", ""))
    s = s.split("(", 1)[0]
    head, sep, tail = s.partition("<")
    return head.split("::")[-1] + sep + tail


def _launch_bounds(text: str) -> Optional[int]:
    m = re.search(r"max threads per block (\d+)", text)
    return int(m.group(1)) if m else None


# ---- CUDA tensor-core conv roofline (issue 12) ------------------------------------------------
#: the compute floor of issue 12's acceptance: bf16/fp16 dense math at 800 TFLOP/s (what a tuned
#: kernel reaches of H100/H200's 989 peak); the 989 line is kept beside it (``math_989_s``)
FLOOR_FLOPS = 800e12
#: what the launch plans are made for, per arch: the GPU's opt-in shared memory per block and SM
#: count (the launchers read both from the device), and that GPU's own peaks for context. The
#: acceptance holds every arch to FLOOR_FLOPS and the report's L2_BW / HBM_BW: the sm_80 kernels
#: also run on Hopper (MSFF_CUDA_CONV=sm80), and an A100's floor (312 TFLOP/s) is 2.6x longer.
CUDA_PLAN_DEVICES = {
    "sm_90a": dict(gpu="H100 SXM / H200", smem_optin=232448, sms=132, peak_flops=989e12,
                   hbm_bytes_per_s=3.35e12, clock_hz=1.83e9),  # 989e12 = 132 x 4096 x 1.83e9
    "sm_80": dict(gpu="A100", smem_optin=166912, sms=108, peak_flops=312e12,
                  hbm_bytes_per_s=2.039e12, clock_hz=1.41e9),  # 312e12 = 108 x 2048 x 1.41e9
}
#: shared-memory bandwidth per SM per clock (32 banks x 4 B) on both GPUs: the MMA main loop must
#: find peak / (SMS x 128 B x clock) FLOPs per byte it reads from shared memory (H100: 32, A100: 16)
SMEM_BYTES_PER_CLK = 128
#: dtypes of the tensor-core kernels (fp32 always runs the generic line_conv.cu kernels)
CUDA_CONV_DTYPES = ("bfloat16", "float16")
CUDA_PASSES = ("forward", "input-grad", "weight-grad")
CONV_AXES = ((1, "1xk"), (0, "kx1"))  # 1 x k along W, k x 1 along H
#: line_conv_choose: the forward / input-gradient tensor-core kernels take k odd and <= 31
TC_FWD_KMAX = 31
#: the stages the acceptance names (tiling traffic under the 800 TFLOP/s floor)
ACCEPTANCE_STAGES = ("E1", "E2")
_TC_SOURCE = ROOT / "csrc" / "cuda" / "line_conv_tc.cu"

#: Where each term of the traffic model below comes from in csrc/cuda/line_conv_tc.cu: one line of
#: the code (matched with whitespace collapsed). The report records the line numbers it finds
#: (``cuda_roofline_sources``) and notes any it cannot: the kernel changed, re-derive the model.
CUDA_TRAFFIC_SOURCES = {
    "choose: bf16/fp16, Cin and Cout multiples of 8 (else the generic kernel)":
        "if (p.Cin <= 0 || p.Cout <= 0 || p.Cin % 8 != 0 || p.Cout % 8 != 0) return ConvKernel::kGeneric;",
    "choose: forward / input gradient take k odd <= 31":
        "if (p.K < 1 || p.K % 2 == 0 || p.K > 31) return ConvKernel::kGeneric;",
    "choose: weight gradient takes k odd <= WG_KMAX and its smem must fit":
        "if (f.cc < 80 || tc_wgrad_geometry(p.K).total > f.smem_optin) return ConvKernel::kGeneric;",
    "choose: sm_90a runs TMA where the tensor map describes x and >= 2 stages fit":
        "const bool tma = halo_desc_of(p).ok && tma_geometry(p.Cin, p.K, bn, f.smem_optin).stages >= 2 &&",
    "fwd.weights: stage_weights copies all K taps x Cin of the CTA's BN channels":
        "for (int idx = tid; idx < p.K * BN * c8n; idx += nthreads) {",
    "fwd.weights: once per CTA, before its tile loop (cp.async kernels)":
        "stage_weights<T, BN>(p, g, smem_u32(wsm), co0, tid, TC_THREADS);",
    "fwd.weights: once per CTA in the TMA kernel (its consumers, cp.async)":
        "stage_weights<T, BN>(p, g, smem_u32(wsm), co0, tid, TMA_CONSUMERS);",
    "fwd.halo: BM + K - 1 rows x Cin per tile; rows outside the line are zero-filled (read nothing)":
        "const bool ok = pos >= 0 && pos < L && c8 * 8 < p.Cin;",
    "fwd.halo: TMA, one box of 64 channels x (BM + K - 1) rows per chunk per tile (OOB = zeros)":
        "tma_load_4d(stages + s * tg.stage_bytes + kc * chunk_bytes, tmap, full + 8 * s, kc * TMA_BC,",
    "fwd.prologue: BN scale / shift of Cin channels once per CTA":
        "prm[i] = i < p.Cin ? p.in_scale[i] : 0.0f;",
    "epilogue: residual add read once per output element":
        "const float2 r = load_pair<T>(p.add, e.n, co, h, w);",
    "epilogue: gate_x read once per output element (input gradient)":
        "const float2 xg = load_pair<T>(p.gate_x, e.n, co, h, w);",
    "epilogue: y written once per output element":
        "if (p.y.ptr != nullptr) store_pair<T>(p.y, e.n, co, h, w, v0, v1);",
    "epilogue: one 4-byte channel pair per thread (a warp: 8 pixels x 16 B, half a 32-B sector)":
        "*reinterpret_cast<typename Pair<T>::type*>(base + offset4(v, n, c, h, w)) = Pair<T>::from_float2(a, b);",
    "statistics: 2 x BN fp64 partials per CTA":
        "p.partials[blockIdx.x * static_cast<int64_t>(p.Cout) + co0 + tid] = s0;",
    "statistics: reduce_partials_kernel reads every CTA's partials in order":
        "a += partials[static_cast<int64_t>(i) * C + c];",
    "wgrad.g: 128 pixels x 64 output channels per segment, per (co tile, ci tile) CTA":
        "for (int idx = tid; idx < WG_S * (WG_CO / 8); idx += WG_THREADS) {",
    "wgrad.halo: 128 + K - 1 rows x 32 input channels per segment, zero-fill reads nothing":
        "const bool ok = pos >= 0 && pos < L && ci < p.Cin;",
    "wgrad.prologue: scale / shift of the CTA's 32 input channels":
        "prm[tid] = ci < p.Cin ? p.in_scale[ci] : 0.0f;",
    "wgrad.partials: one fp32 Cout x Cin x K slice per split":
        "float* part = p.partials + static_cast<int64_t>(split) * p.Cout * p.Cin * p.K;",
    "wgrad.partials: 4-byte stores, lanes K x 4 B (or more) apart: one 32-B sector each":
        "part[(static_cast<int64_t>(co) * p.Cin + ci) * p.K + t] = acc[j][q];",
    "smem: sm_90a forward A = ldmatrix.x4 of the shifted halo per warp per (tap, k16) step":
        "ldmatrix_x4(a, swz(cur + (ks >> 2) * chunk_bytes, r, u));",
    "smem: sm_90a forward B = the resident weights, read by each warpgroup's wgmma":
        "wgmma_rs<BN, T>(acc, a, wgmma_desc(w_base + t * g.tap_bytes + ks * 256, 128, g.sbo));",
    "smem: sm_80 forward A = 2 ldmatrix.x4 per warp per step":
        "for (int i = 0; i < MI; ++i) ldmatrix_x4(a[i], a_base + ((i * 16 + t) * g.lda + ks * 16) * 2);",
    "smem: sm_80 forward B = BN/16 ldmatrix.x2 per warp per step":
        "ldmatrix_x2(b, b_base + t * g.tap_bytes + j * g.sbo + ks * 256);",
    "smem: sm_90a weight gradient A = 4 ldmatrix.x4.trans per warp per 16 pixels":
        "for (int j = 0; j < 4; ++j) ldmatrix_x4_trans(a[j], a_lane + (kk + tap[j]) * geo.lda * 2);",
    "smem: sm_90a weight gradient B = the g tile, read by 4 wgmma per warpgroup":
        "for (int j = 0; j < 4; ++j) wgmma_rs_nmajor<WG_CO, T>(acc[j], a[j], desc);",
    "smem: sm_80 weight gradient A = 2 ldmatrix.x4.trans, B = one ldmatrix.x2.trans per tap":
        "ldmatrix_x2_trans(bf, a_base + (kk + t) * geo.lda * 2);",
    "wgrad.reduce: reduce_wgrad_kernel reads every slice, writes dw":
        "for (int s = 0; s < splits; ++s) acc += partials[s * elems + e];",
}


class CudaPlanUnavailable(RuntimeError):
    """msff._C (the launch-plan functions) cannot be imported: no CUDA roofline."""


def cuda_traffic_sources(path: Optional[Path] = None) -> dict:
    """``{term: "line_conv_tc.cu:LINE" | None}`` for :data:`CUDA_TRAFFIC_SOURCES` in the current
    source (None: that line is gone, the traffic model may be stale)."""
    path = Path(path) if path else _TC_SOURCE
    try:
        lines = [" ".join(ln.split()) for ln in path.read_text().splitlines()]
    except OSError:
        return dict.fromkeys(CUDA_TRAFFIC_SOURCES)
    out = {}
    for term, anchor in CUDA_TRAFFIC_SOURCES.items():
        a = " ".join(anchor.split())
        hit = next((i + 1 for i, ln in enumerate(lines) if a in ln), None)
        out[term] = f"{path.name}:{hit}" if hit else None
    return out


def halo_rows(L: int, K: int, seg: int) -> int:
    """Rows one image line's halo loads read from global memory: each ``seg``-pixel segment stages
    rows [s·seg − K//2, s·seg − K//2 + seg + K − 1) of the line; rows outside [0, L) are
    zero-filled and read nothing. E.g. L = 512, K = 15, seg = 128: 135 + 142 + 142 + 135 = 554."""
    pad = K // 2
    total = 0
    for s in range(-(-L // seg)):
        lo = s * seg - pad
        total += max(0, min(L, lo + seg + K - 1) - max(0, lo))
    return total


def conv_tile_traffic(N, cin, cout, H, W, K, axis, *, bm, bn, grid_x, grid_y, esize=2,
                      prologue=False, stats=False, add=False, gate=False,
                      weights="resident") -> dict:
    """L2->SM bytes of a tensor-core line convolution (forward, or input gradient with Cin/Cout
    swapped) under a launch plan: persistent grid ``grid_x`` x ``grid_y`` (n-tiles of ``bn``
    output channels), pixel tiles of ``bm`` along the convolution axis (line_conv_tc.cu,
    line_conv_tc_body / line_conv_tma_body; the lines are in :data:`CUDA_TRAFFIC_SOURCES`).

    Terms: ``halo`` = the valid halo rows x Cin of every tile, once per n-tile (each CTA of a
    column stages its own copy); ``weights`` = all taps x Cin x BN per CTA once (``"resident"``,
    the kernels' staging) or once per tile and n-tile (``"per_tile"``: a plan that re-streams its
    weight slice, for comparison); ``output`` y written once; ``add`` / ``gate`` one read per
    output element; ``prologue`` the BN scale/shift per CTA; ``stats`` 2 x Cout fp64 partials per
    CTA column written, read back by reduce_partials_kernel, and the 2 x Cout sums written. Bias
    and the gate's per-channel scale/shift are re-read per output pair but from L1 (a few hundred
    bytes), not counted. Returns the terms, their ``total`` and the plan's ``tiles``."""
    L, lines = (W, H) if axis == 1 else (H, W)
    M = N * H * W
    tiles = N * lines * -(-L // bm)
    w_all = K * cout * cin * esize  # the grid_y CTAs of a column hold BN-slices summing to Cout
    if weights == "resident":
        w = grid_x * w_all
    elif weights == "per_tile":
        w = tiles * w_all
    else:
        raise ValueError(f"weights must be 'resident' or 'per_tile', got {weights!r}")
    t = dict(
        halo=grid_y * N * lines * halo_rows(L, K, bm) * cin * esize,
        weights=w,
        output=M * cout * esize,
        add=M * cout * esize if add else 0,
        gate=M * cout * esize if gate else 0,
        prologue=grid_x * grid_y * 2 * cin * 4 if prologue else 0,
        stats=(2 * 2 * grid_x * cout * 8 + 2 * cout * 8) if stats else 0,
    )
    t["total"] = sum(t.values())
    # y leaves as 4-byte pairs: a warp instruction writes 16 B of each of 8 pixels, half of a
    # 32-B sector, so L2 sees twice the y bytes in sector writes (halo / weights / add / gate
    # arrive in whole sectors: 16-byte cp.async or TMA, and L1-cached loads)
    t["sector_total"] = t["total"] + t["output"]
    t["tiles"] = tiles
    t["halo_bytes_per_tile"] = (bm + K - 1) * cin * esize
    return t


def wgrad_tile_traffic(N, cin, cout, H, W, K, axis, *, seg, co_tiles, ci_tiles, splits, esize=2,
                       prologue=False) -> dict:
    """L2->SM bytes of the tensor-core weight gradient (line_conv_wgrad_body + reduce_wgrad_kernel)
    under its plan: CTA (co tile, ci tile, split) stages, per ``seg``-pixel segment of its split,
    the g tile (seg pixels x its output channels) and the halo of x (seg + K − 1 rows x its input
    channels). Terms: ``g`` = g once per ci tile; ``halo`` = x's valid halo rows once per co tile;
    ``prologue`` scale/shift per CTA; ``partials`` = splits fp32 Cout x Cin x K slices written and
    read back by the reduce; ``dw`` written once."""
    L, lines = (W, H) if axis == 1 else (H, W)
    M = N * H * W
    dw = cout * cin * K * 4
    t = dict(
        g=ci_tiles * M * cout * esize,
        halo=co_tiles * N * lines * halo_rows(L, K, seg) * cin * esize,
        prologue=co_tiles * splits * 2 * cin * 4 if prologue else 0,
        partials=2 * splits * dw,
        dw=dw,
    )
    t["total"] = sum(t.values())
    # each 4-byte partial store of a warp lands in its own 32-B sector (lanes are K x 4 B or
    # Cin x K x 4 B apart): L2 sees 8x the written half of the partials in sector writes
    t["sector_total"] = t["total"] + 7 * (t["partials"] // 2)
    t["segments"] = N * lines * -(-L // seg)
    return t


def smem_traffic(kind, N, cin, cout, H, W, K, axis, *, bm=128, bn=64, grid_y=1, seg=128,
                 co_tile=64, ci_tile=32, co_tiles=1, ci_tiles=1, esize=2, prologue=False,
                 staged_channels=None) -> dict:
    """Shared-memory bytes of a tensor-core line convolution's main loop and staging
    (line_conv_tc.cu; lines in :data:`CUDA_TRAFFIC_SOURCES`), summed over the grid. ``kind``:
    ``fwd_sm90a`` (line_conv_tma_kernel / line_conv_sm90a_kernel: per (tap, k16) step every
    consumer warp loads 512 B of A by ldmatrix.x4, each of the 2 warpgroups' wgmma reads 16 x BN
    of B), ``fwd_sm80`` (per step each of 8 warps: 2 ldmatrix.x4 of A, BN/(8 WN) ldmatrix.x2
    of B; WN = 2 warps along the channels at bm 128, 4 at bm 64),
    ``wgrad_sm90a`` (per 16 pixels each of 8 warps: 4 ldmatrix.x4.trans of A; each warpgroup's 4
    wgmma read the 16 x 64 g slice), ``wgrad_sm80`` (per 16 pixels each warp: 2 ldmatrix.x4.trans
    of g, K ldmatrix.x2.trans of the halo). ``staging`` = what cp.async / TMA write into the
    stages (+ the prologue's in-place read and write of the valid rows); the fixed per-CTA
    weights and the few-KB statistics scratch are left out. Returns ``mma`` (operand reads),
    ``staging``, ``total``."""
    L, lines = (W, H) if axis == 1 else (H, W)
    if kind in ("fwd_sm90a", "fwd_sm80"):
        cin_pad = -(-cin // 16) * 16
        staged = staged_channels or cin_pad
        n = N * lines * -(-L // bm) * grid_y  # (tile, n-tile) pairs
        steps = K * (cin_pad // 16)
        # sm_80: WM x WN warps (bm 128: 4 x 2, bm 64: 2 x 4), each 32 pixels x bn / WN channels
        wn = 8 // (bm // 32)
        per_step = (8 * 512 + 2 * 16 * bn * 2 if kind == "fwd_sm90a"
                    else 8 * (2 * 512 + (bn // (8 * wn)) * 256))
        mma = n * steps * per_step
        staging = n * (bm + K - 1) * staged * esize
        if prologue:
            staging += 2 * grid_y * N * lines * halo_rows(L, K, bm) * cin * esize
    elif kind in ("wgrad_sm90a", "wgrad_sm80"):
        n = N * lines * -(-L // seg) * co_tiles * ci_tiles  # (segment, CTA tile) pairs
        steps = seg // 16
        per_step = (8 * 4 * 512 + 2 * 4 * 16 * co_tile * 2 if kind == "wgrad_sm90a"
                    else 8 * (2 * 512 + K * 256))
        mma = n * steps * per_step
        staging = n * (seg * co_tile + (seg + K - 1) * ci_tile) * esize
        if prologue:
            staging += 2 * co_tiles * N * lines * halo_rows(L, K, seg) * cin * esize
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return dict(mma=mma, staging=staging, total=mma + staging)


def roofline_times(flops: float, hbm_bytes: float, tiling_bytes: float,
                   dtype: str = "bfloat16") -> dict:
    """The CUDA roofline's verdict: the tiling traffic's time at the L2 bandwidth the report
    assumes and at HBM bandwidth, each against the compute floor at 800 TFLOP/s (``ok`` needs
    both below); plus the 989-peak line (``math_989_s``, ``floor_s`` = max(math, fewest HBM bytes
    at HBM_BW))."""
    floor800 = flops / FLOOR_FLOPS
    math = flops / PEAK_FLOPS[dtype]
    l2, hbm = tiling_bytes / L2_BW, tiling_bytes / HBM_BW
    return dict(floor_800_s=floor800, math_989_s=math, hbm_s=hbm_bytes / HBM_BW,
                floor_s=max(math, hbm_bytes / HBM_BW), tiling_l2_s=l2, tiling_hbm_s=hbm,
                ok_l2=l2 < floor800, ok_hbm=hbm < floor800, ok=l2 < floor800 and hbm < floor800)


def _channels_last_strides(N, C, H, W):
    return (C * H * W, 1, W * C, C)


def _tc_refusal(cin, cout, K, kmax, fits) -> Optional[str]:
    """Why line_conv_choose / line_conv_wgrad_choose give a channels_last bf16/fp16 problem to
    the generic kernel (None: a tensor-core kernel runs)."""
    if cin % 8 or cout % 8:
        return f"Cin {cin} / Cout {cout} not multiples of 8"
    if K % 2 == 0 or K > kmax:
        return f"k {K} even or > {kmax}"
    if not fits:
        return "no tile fits the shared memory (fwd_bn == 0)"
    return None


def _cuda_conv_row(pass_, arch, dtype, stage, N, cin, cout, H, W, K, axis, plan_fn, tma_fn):
    dev = CUDA_PLAN_DEVICES[arch]
    e = _esize(dtype)
    M = N * H * W
    flops = 2 * M * cin * cout * K
    row = dict(stage=stage, axis=dict(CONV_AXES)[axis], pass_=pass_, arch=arch, dtype=dtype,
               N=N, cin=cin, cout=cout, H=H, W=W, k=K, flops=flops,
               plan_device=dict(gpu=dev["gpu"], smem_optin=dev["smem_optin"], sms=dev["sms"]))
    if pass_ == "weight-grad":
        hbm = M * cin * e + M * cout * e + cout * cin * K * 4
        pl = plan_fn(N, cin, cout, H, W, K, axis, dev["smem_optin"], dev["sms"])
        why = _tc_refusal(cin, cout, K, pl["wgrad_kmax"], pl["wgrad_smem_bytes"] <= dev["smem_optin"])
        kernel = ("line_conv_wgrad_sm90a_kernel" if arch == "sm_90a" else "line_conv_wgrad_tc_kernel")
        kernel += " + reduce_wgrad_kernel"
        generic = "line_conv_wgrad_kernel"
        flags = {"prologue": True}
        if why is None:
            plan = dict(co_tile=pl["wgrad_bm"], ci_tile=pl["wgrad_bn"], pixels=pl["wgrad_pixels"],
                        grid=[pl["wgrad_grid_x"], pl["wgrad_grid_y"], pl["wgrad_splits"]],
                        threads=pl["wgrad_threads"], smem_bytes=pl["wgrad_smem_bytes"])
            traffic = wgrad_tile_traffic(N, cin, cout, H, W, K, axis, seg=pl["wgrad_pixels"],
                                         co_tiles=pl["wgrad_grid_x"], ci_tiles=pl["wgrad_grid_y"],
                                         splits=pl["wgrad_splits"], esize=e, prologue=True)
            smem = smem_traffic("wgrad_sm90a" if arch == "sm_90a" else "wgrad_sm80", N, cin,
                                cout, H, W, K, axis, seg=pl["wgrad_pixels"],
                                co_tile=pl["wgrad_bm"], ci_tile=pl["wgrad_bn"],
                                co_tiles=pl["wgrad_grid_x"], ci_tiles=pl["wgrad_grid_y"],
                                esize=e, prologue=True)
    else:
        fwd = pass_ == "forward"
        # the input gradient is the same kernel on g_r with Cin <-> Cout (lk_conv_backward_cuda)
        ci, co = (cin, cout) if fwd else (cout, cin)
        row.update(cin=ci, cout=co)
        hbm = M * ci * e + K * co * ci * e + 2 * M * co * e  # x, w, y, add / gate_x once
        # the mma.sync kernel (sm_80) may take the 64-pixel tile; the wgmma kernels plan 128
        pl = plan_fn(N, ci, co, H, W, K, axis, dev["smem_optin"], dev["sms"],
                     cc=90 if arch == "sm_90a" else 80)
        why = _tc_refusal(ci, co, K, TC_FWD_KMAX, pl["fwd_bn"] > 0)
        generic = "line_conv_fwd_kernel"
        flags = ({"prologue": True, "stats": True, "add": True} if fwd else
                 {"gate": True, "stats": True})
        if why is None:
            plan = dict(bm=pl["fwd_bm"], bn=pl["fwd_bn"], grid=[pl["fwd_grid_x"], pl["fwd_grid_y"]],
                        threads=pl["fwd_threads"], smem_bytes=pl["fwd_smem_bytes"])
            if arch == "sm_90a":
                tma = tma_fn(N, ci, H, W, _channels_last_strides(N, ci, H, W), K, axis, pl["fwd_bn"],
                             dev["smem_optin"])
                if tma["ok"] and tma["stages"] >= 2:
                    kernel = "line_conv_tma_kernel"
                    plan.update(threads=tma["threads"], smem_bytes=tma["smem_bytes"],
                                stages=tma["stages"], box=tma["box"], chunks=tma["chunks"],
                                same_bytes_as="line_conv_sm90a_kernel (MSFF_CUDA_CONV=tc-cpasync:"
                                              " the same tiles, staged by cp.async)")
                else:
                    kernel = "line_conv_sm90a_kernel"
            else:
                kernel = "line_conv_sm80_kernel"
            traffic = conv_tile_traffic(N, ci, co, H, W, K, axis, bm=pl["fwd_bm"], bn=pl["fwd_bn"],
                                        grid_x=pl["fwd_grid_x"], grid_y=pl["fwd_grid_y"], esize=e,
                                        **flags)
            tma_staged = kernel == "line_conv_tma_kernel"  # boxes of 64 channels
            smem = smem_traffic("fwd_sm90a" if arch == "sm_90a" else "fwd_sm80", N, ci, co, H, W,
                                K, axis, bm=pl["fwd_bm"], bn=pl["fwd_bn"], grid_y=pl["fwd_grid_y"],
                                esize=e, prologue=bool(flags.get("prologue")),
                                staged_channels=-(-ci // 64) * 64 if tma_staged else None)
            if flags.get("stats"):
                kernel += " + reduce_partials_kernel"
    row.update(flags=flags, hbm_bytes=hbm)
    if why is not None:
        v = roofline_times(flops, hbm, 0, dtype)
        row.update(kernel=f"{generic} (generic, line_conv.cu)", generic=why, plan=None,
                   traffic=None, tiling_bytes=None, tiling_l2_s=None, tiling_hbm_s=None,
                   floor_800_s=v["floor_800_s"], math_989_s=v["math_989_s"], hbm_s=v["hbm_s"],
                   floor_s=v["floor_s"], ok_l2=None, ok_hbm=None, ok=None,
                   tiling_l2_sector_s=None, ok_l2_sectors=None, smem=None)
    else:
        row.update(kernel=kernel, generic=None, plan=plan, traffic=traffic,
                   tiling_bytes=traffic["total"], **roofline_times(flops, hbm, traffic["total"], dtype))
        # informative: the same traffic counted in the 32-B sectors the stores touch
        row["tiling_l2_sector_s"] = traffic["sector_total"] / L2_BW
        row["ok_l2_sectors"] = row["tiling_l2_sector_s"] < row["floor_800_s"]
        # informative: shared-memory bytes of the main loop, and the FLOP rate they allow on the
        # plan's GPU (its SMs x 128 B/clk at the clock of its peak)
        smem_bw = dev["sms"] * SMEM_BYTES_PER_CLK * dev["clock_hz"]
        row["smem"] = dict(smem, bytes_per_s=smem_bw, s=smem["total"] / smem_bw,
                           flop_per_byte=flops / smem["total"],
                           roof_flops=flops / smem["total"] * smem_bw)
        row["device_math_s"] = flops / dev["peak_flops"]
        row["device_tiling_hbm_s"] = traffic["total"] / dev["hbm_bytes_per_s"]
    row["pass"] = row.pop("pass_")
    return row


def cuda_conv_roofline(archs=ARCHS, dtypes=CUDA_CONV_DTYPES, stages=STAGES, k=KSIZE,
                       plan_fn=None, tma_fn=None) -> list[dict]:
    """One roofline row per (dtype, stage, axis, arch, pass) of the CUDA tensor-core line
    convolutions, from the launch plans their launchers compute (``msff.ops._cuda.conv_plan`` /
    ``tma_plan``: the C++ plan functions of csrc/cuda/line_conv_plan.h, through ``msff._C``; no
    GPU) with each arch's device facts (:data:`CUDA_PLAN_DEVICES`). Flags per pass, the superset of
    the model's launches so the bound is conservative: forward with prologue, statistics and
    residual add; input gradient with the gate epilogue and statistics; weight gradient with the
    prologue. Raises :class:`CudaPlanUnavailable` when msff._C cannot be imported."""
    if plan_fn is None or tma_fn is None:
        try:
            from msff.ops import _cuda
        except ImportError as e:  # pragma: no cover - msff.ops itself is importable everywhere
            raise CudaPlanUnavailable(f"msff.ops._cuda is not importable ({e})") from e
        if getattr(_cuda, "_C", None) is None:
            raise CudaPlanUnavailable(_cuda.extension_error())
        plan_fn = plan_fn or _cuda.conv_plan
        tma_fn = tma_fn or _cuda.tma_plan
    rows = []
    for dtype in [d for d in dtypes if d in CUDA_CONV_DTYPES]:
        for stage, N, cin, cout, H, W in stages:
            for axis, _ in CONV_AXES:
                for arch in archs:
                    for pass_ in CUDA_PASSES:
                        rows.append(_cuda_conv_row(pass_, arch, dtype, stage, N, cin, cout, H, W,
                                                   k, axis, plan_fn, tma_fn))
    return rows


def cuda_roofline_section(archs=ARCHS, dtypes=CUDA_CONV_DTYPES) -> tuple[dict, list[str]]:
    """The report's CUDA roofline keys (``cuda_roofline`` rows, ``cuda_roofline_sources``,
    ``cuda_roofline_failures``) and notes: skipped with a note when msff._C cannot be imported, a
    note when line_conv_tc.cu lost a line the traffic model was derived from."""
    notes = []
    try:  # needs msff._C (the launch-plan functions), not nvcc and not a GPU
        rows = cuda_conv_roofline(archs, dtypes)
    except CudaPlanUnavailable as e:
        rows = []
        notes.append(f"CUDA conv roofline skipped: {e}")
    sources = cuda_traffic_sources()
    stale = [t for t, where in sources.items() if where is None]
    if rows and stale:
        notes.append("CUDA conv roofline: line_conv_tc.cu no longer has the lines its traffic model "
                     f"was derived from ({'; '.join(stale)}): re-derive the model")
    return {"cuda_roofline": rows, "cuda_roofline_sources": sources,
            "cuda_roofline_failures": cuda_roofline_failures(rows)}, notes


def cuda_roofline_failures(rows, stages=ACCEPTANCE_STAGES) -> list[str]:
    """Rows at ``stages`` whose tiling traffic is not under the 800 TFLOP/s floor at both the L2
    and the HBM bandwidth (a generic-kernel row there counts as a failure too)."""
    bad = []
    for r in rows:
        if r["stage"] in stages and r["ok"] is not True:
            why = r["generic"] or ("L2" if not r["ok_l2"] else "") + (" HBM" if not r["ok_hbm"] else "")
            bad.append(f"{r['stage']} {r['axis']} {r['pass']} {r['arch']} {r['dtype']}: {why.strip()}")
    return bad


# ---- the report ---------------------------------------------------------------------------------
def _config_of(spec) -> dict:
    cx = spec["constexprs"]
    cfg = {k: v for k, v in cx.items() if k.startswith("BLOCK_")}
    cfg.update(spec["options"])
    if spec.get("config_name"):  # the autotuner's candidate the report compiled (its default)
        cfg["name"] = spec["config_name"]
    return cfg


def build_report(dtypes=DTYPES, archs=ARCHS, modes=("train", "eval"), cuda=True,
                 progress=None) -> dict:
    """Compile and analyse everything; returns the report dict (see module docstring)."""
    import torch
    import triton

    errors = []
    try:
        specs = triton_specs(dtypes, modes)
    except MissingSpecs as e:
        specs, errors = [], [str(e)]
    rows = []
    done: dict = {}
    for i, spec in enumerate(specs):
        base = dict(name=spec["name"], kernel=spec["kernel_name"], role=spec["role"],
                    pass_=spec["pass_"], stage=spec["stage"], mode=spec["mode"],
                    dtype=spec["dtype"], config=_config_of(spec), grid=list(spec["grid"]),
                    notes=spec.get("notes", ""), roofline=roofline(spec))
        base["pass"] = base.pop("pass_")
        for arch in archs:
            try:
                sig, cx, attrs, _ = _specialize(spec, _target(arch))
                ckey = (spec["kernel_name"], arch, json.dumps(sig, sort_keys=True),
                        str(sorted((str(k), str(v)) for k, v in cx.items())),
                        str(sorted((str(k), str(v)) for k, v in attrs.items())),
                        json.dumps(spec["options"], sort_keys=True))
                if ckey not in done:
                    done[ckey] = compile_triton(spec, arch)
                res = dict(done[ckey], status="ok")
            except Exception as e:  # a kernel that does not compile is a finding, not a crash
                res = {"status": f"error: {type(e).__name__}: {str(e)[:1500]}"}
            rows.append(dict(base, arch=arch, **res))
        if progress:
            progress(i + 1, len(specs))
    roof, notes = cuda_roofline_section(archs, dtypes)
    report = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"triton": triton.__version__, "torch": torch.__version__,
                     "ptxas": _tool_version(_tool("ptxas")), "nvcc": _tool_version(_nvcc())},
        "shapes": {
            "stages": [dict(stage=s, N=n, cin=ci, cout=co, H=h, W=w, k=KSIZE)
                       for s, n, ci, co, h, w in STAGES],
            "layout": "channels_last",
            "note": "E1 = N32 x 64ch x 512^2 and E2 = N32 x 128ch x 256^2 as issue 10 states (the "
                    "E1 LKAM layer runs at the input resolution; Table 1's 256^2 is after the "
                    "pool); E1.0 / E2.0 are the first blocks (3->64, 64->128, projection shortcut)",
        },
        "assumptions": {"peak_flops": PEAK_FLOPS, "hbm_bytes_per_s": HBM_BW,
                        "l2_bytes_per_s": L2_BW, "sms": SMS, "sm_limits": SM_LIMITS,
                        "floor_flops": FLOOR_FLOPS, "cuda_plan_devices": CUDA_PLAN_DEVICES},
        "dtypes": list(dtypes), "archs": list(archs), "modes": list(modes),
        "triton": rows,
        "cuda": compile_cuda(archs) if cuda else [],
        "unique_triton_compiles": len(done),
        **roof,
        "errors": errors,
        "notes": notes,
    }
    return report


def _target(arch):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", {"sm_90a": 90, "sm_80": 80}[arch], 32)


def _tool_version(path) -> Optional[str]:
    if not path:
        return None
    try:
        r = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    m = re.search(r"release (\S+),", r.stdout)
    return m.group(1) if m else None


def summary_rows(report, arch="sm_90a", dtype="bfloat16") -> list[dict]:
    """One row per distinct (kernel, config, flags) at ``arch``/``dtype`` for the printed table."""
    seen = {}
    for r in report["triton"]:
        if r["arch"] != arch or r["dtype"] != dtype:
            continue
        key = (r["name"].split(" ", 1)[0], r["stage"], r["mode"], r["name"])
        seen.setdefault(key, r)
    return list(seen.values())


def format_table(report, arch="sm_90a", dtype="bfloat16") -> str:
    """The printed table: Triton launches at ``arch``/``dtype``, then CUDA kernels at ``arch``."""
    lines = [f"Triton kernels, {arch}, {dtype}, channels_last (stage mode: launch [flags] config)",
             f"{'launch':58s} {'cfg':>16s} {'reg':>4s} {'spill':>6s} {'smem':>6s} {'occ':>5s} "
             f"{'mma':>9s} {'ldg128':>6s} {'ldgsts':>6s} {'ldg16':>5s} {'ldg32':>5s} "
             f"{'loop16':>6s} {'atom':>4s} {'floor_us':>8s} {'tileL2_us':>9s}"]
    for r in summary_rows(report, arch, dtype):
        c = r["config"]
        blocks = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK_"))
        cfg = f"{blocks} w{c['num_warps']}s{c['num_stages']}"
        rf = r["roofline"]
        label = f"{r['stage']} {r['mode'][:2]} {r['name'].split(' ', 1)[0]} {r['name'].split(' ', 3)[-1]}"
        if r["status"] != "ok":
            lines.append(f"{label[:58]:58s} {cfg:>16s} {r['status'][:60]}")
            continue
        t, lp = r["sass"]["total"], r["sass"]["in_loop"]
        mma = (f"G{t.get('hgmma', 0)}" if t.get("hgmma") else
               f"H{t.get('hmma', 0)}" if t.get("hmma") else "-")
        lines.append(
            f"{label[:58]:58s} {cfg:>16s} {r['registers']:4d} {r['spill_stores']:6d} "
            f"{r['smem'] // 1024:5d}K {r['occupancy']['occupancy']:5.2f} {mma:>9s} "
            f"{t.get('ldg_128', 0):6d} {t.get('ldgsts', 0):6d} {t.get('ldg_16', 0):5d} "
            f"{t.get('ldg_32', 0):5d} {lp.get('ldg_16', 0):6d} {t.get('atomics', 0):4d} "
            f"{rf['floor_s'] * 1e6:8.1f} {rf['tiling_l2_s'] * 1e6:9.1f}")
    cu = [r for r in report.get("cuda", []) if r.get("arch") == arch]
    if cu:
        lines += ["", f"CUDA kernels (csrc/cuda, nvcc -arch={arch})",
                  f"{'file:kernel':58s} {'reg':>4s} {'spill':>6s} {'smem':>6s} {'mma':>9s} "
                  f"{'ldg128':>6s} {'ldgsts':>6s} {'tma':>4s} {'ldg16':>5s} {'ldg32':>5s} "
                  f"{'loop16':>6s} {'atom':>4s}"]
        for r in cu:
            if r.get("status") != "ok":
                lines.append(f"{r['file']:58s} {r.get('status', '')[:80]}")
                continue
            t, lp = r["sass"]["total"], r["sass"]["in_loop"]
            mma = (f"G{t.get('hgmma', 0)}" if t.get("hgmma") else
                   f"H{t.get('hmma', 0)}" if t.get("hmma") else "-")
            lines.append(
                f"{(r['file'] + ':' + r['short'])[:58]:58s} {r['registers']:4d} "
                f"{r['spill_stores']:6d} {r['smem'] // 1024:5d}K {mma:>9s} "
                f"{t.get('ldg_128', 0):6d} {t.get('ldgsts', 0):6d} {t.get('tma_load', 0):4d} "
                f"{t.get('ldg_16', 0):5d} {t.get('ldg_32', 0):5d} {lp.get('ldg_16', 0):6d} "
                f"{t.get('atomics', 0):4d}")
    lines += format_cuda_roofline(report, arch, dtype)
    lines += ["", "mma: G = HGMMA (wgmma), H = HMMA (mma.sync) instruction count; ldg16/ldg32 = "
              "2-/4-byte scalar global loads; loop16 = 2-byte loads inside loops (main loop); "
              "floor = max(FLOPs/peak, fewest HBM bytes/3.35 TB/s); tileL2 = L2->SM traffic of "
              f"the tiling at {L2_BW / 1e12:.0f} TB/s (assumed)"]
    return "\n".join(lines)


def format_cuda_roofline(report, arch="sm_90a", dtype="bfloat16") -> list[str]:
    """The "CUDA conv roofline" block of the printed table (rows at ``arch``/``dtype``)."""
    rows = [r for r in report.get("cuda_roofline", [])
            if r["arch"] == arch and r["dtype"] == dtype]
    if not rows:
        return [""] + [n for n in report.get("notes", []) if "roofline" in n]
    dev = CUDA_PLAN_DEVICES[arch]
    lines = ["", f"CUDA conv roofline, {arch} ({dev['gpu']} plan: {dev['smem_optin']} B smem, "
                 f"{dev['sms']} SMs), {dtype}, channels_last, k={KSIZE}: tiling traffic at "
                 f"{L2_BW / 1e12:.0f} TB/s (L2) and {HBM_BW / 1e12:.2f} TB/s (HBM) vs FLOPs at "
                 f"{FLOOR_FLOPS / 1e12:.0f} TFLOP/s",
             f"{'stage':5s} {'axis':4s} {'pass':11s} {'kernel':28s} {'plan':>14s} {'GFLOP':>6s} "
             f"{'tileGB':>6s} {'L2_ms':>6s} {'HBM_ms':>6s} {'L2sec':>6s} {'smemTF':>6s} "
             f"{'fl800':>6s} {'fl989':>6s} ok"]
    for r in rows:
        head = f"{r['stage']:5s} {r['axis']:4s} {r['pass']:11s}"
        if r["plan"] is None:
            lines.append(f"{head} generic kernel: {r['generic']}")
            continue
        pl = r["plan"]
        plan = (f"{pl['bm']}x{pl['bn']} {pl['grid'][0]}x{pl['grid'][1]}" if "bn" in pl else
                f"{pl['co_tile']}x{pl['ci_tile']} " + "x".join(str(g) for g in pl["grid"]))
        ok = "yes" if r["ok"] else ("no (" + ("L2 " if not r["ok_l2"] else "")
                                    + ("HBM" if not r["ok_hbm"] else "")).strip() + ")"
        lines.append(
            f"{head} {r['kernel'].split(' ')[0][:28]:28s} {plan:>14s} {r['flops'] / 1e9:6.0f} "
            f"{r['tiling_bytes'] / 1e9:6.2f} {r['tiling_l2_s'] * 1e3:6.3f} "
            f"{r['tiling_hbm_s'] * 1e3:6.3f} {r['tiling_l2_sector_s'] * 1e3:6.3f} "
            f"{r['smem']['roof_flops'] / 1e12:6.0f} {r['floor_800_s'] * 1e3:6.3f} "
            f"{r['math_989_s'] * 1e3:6.3f} {ok}")
    lines.append("plan: forward / input-grad BM pixels x BN channels, grid x (persistent CTAs) x y "
                 "(n-tiles); weight-grad co x ci channels per CTA, grid co tiles x ci tiles x "
                 "pixel splits. Flags: forward prologue+stats+add, input-grad gate+stats, "
                 "weight-grad prologue. L2sec: the same traffic in the 32-B sectors the stores "
                 "touch (4-byte epilogue pairs: y x2; weight-grad partials x8), informative; "
                 "smemTF: the FLOP rate the main loop's shared-memory reads allow on the plan's "
                 "GPU (128 B/clk/SM), informative; "
                 "ok = L2_ms and HBM_ms below fl800 (FLOPs at 800 TFLOP/s)")
    return lines


def write_report(report, out: Path) -> None:
    from msff.fileio import atomic_write_bytes  # temp file + rename, with the umask's mode

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(report, indent=1, default=str).encode())


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m msff.kernel_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path (default %(default)s)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of %s" % (DTYPES,))
    p.add_argument("--arch", default=",".join(ARCHS), help="comma list of %s" % (ARCHS,))
    p.add_argument("--modes", default="train,eval")
    p.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    p.add_argument("--quiet", action="store_true", help="no table")
    p.add_argument("--list", action="store_true",
                   help="print the planned Triton launches (name, kernel, config) as JSON and exit")
    args = p.parse_args(argv)
    for name, allowed in (("dtypes", DTYPES), ("arch", ARCHS), ("modes", ("train", "eval"))):
        vals = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            p.error(f"--{name}: {bad or 'empty'} not in {allowed}")
        setattr(args, name, vals)
    if args.out.exists() and args.out.is_dir():
        p.error(f"--out {args.out} is a directory")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or _interpreted_triton_loaded():
        # compiling needs the real JIT: re-run in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "msff.kernel_report", *argv], env=env)
    if args.list:
        specs = triton_specs(args.dtypes, args.modes)
        print(json.dumps([dict(name=s["name"], kernel=s["kernel_name"], stage=s["stage"],
                               mode=s["mode"], dtype=s["dtype"], config=_config_of(s))
                          for s in specs]))
        return 0
    report = build_report(args.dtypes, args.arch, args.modes, cuda=not args.no_cuda,
                          progress=None if args.quiet else _progress)
    write_report(report, args.out)
    for e in report["errors"] + report["notes"]:
        print(f"kernel report: {e}", file=sys.stderr)
    if not args.quiet:
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr)
        for arch in args.arch:
            print(format_table(report, arch, args.dtypes[0]))
            print()
        print(f"wrote {args.out}")
    return 0


def _interpreted_triton_loaded() -> bool:
    mod = sys.modules.get("msff.kernels.lk_conv")
    return mod is not None and type(getattr(mod, "_lk_conv_fwd_kernel", None)).__name__ != "JITFunction"


def _progress(i, n):
    print(f"\rkernel report: {i}/{n} launches", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
