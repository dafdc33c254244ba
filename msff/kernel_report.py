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
                        "l2_bytes_per_s": L2_BW, "sms": SMS, "sm_limits": SM_LIMITS},
        "dtypes": list(dtypes), "archs": list(archs), "modes": list(modes),
        "triton": rows,
        "cuda": compile_cuda(archs) if cuda else [],
        "unique_triton_compiles": len(done),
        "errors": errors,
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
    lines += ["", "mma: G = HGMMA (wgmma), H = HMMA (mma.sync) instruction count; ldg16/ldg32 = "
              "2-/4-byte scalar global loads; loop16 = 2-byte loads inside loops (main loop); "
              "floor = max(FLOPs/peak, fewest HBM bytes/3.35 TB/s); tileL2 = L2->SM traffic of "
              f"the tiling at {L2_BW / 1e12:.0f} TB/s (assumed)"]
    return "\n".join(lines)


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
    for e in report["errors"]:
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
