"""The offline kernel report (msff/kernel_report.py, issue 10) and the rules the kernel rewrites
(issues 11, 12) must meet on sm_90a: no spills, tensor-core instructions, and no 2-byte scalar
operand loads in a conv main loop.

Helpers E (Triton) and F (CUDA): when your kernel meets the rules, delete its entry below; a
strict xfail turns a newly passing case into a failure so the table stays true.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# ---- today's kernels that do not meet the rules (sm_90a, bf16, paper shapes) -----------------
#: Triton kernel name -> what fails today (kernel_report table, 2026-11-30)
TRITON_RULES_XFAIL: dict[str, str] = {
    # empty since the v2 kernels (issue 11): every planned Triton launch meets the rules
}
#: "file.cu:kernel" -> what fails today
CUDA_RULES_XFAIL: dict[str, str] = {
    # empty since the generic kernels' 16-byte path (issue 12, part G)
}
#: CUDA kernels held to the conv main-loop rules (the rest: no spills only)
CUDA_CONV = re.compile(r"^line_conv_(?!.*reduce)")
#: The generic conv kernels of csrc/cuda/line_conv.cu: template <T, V>; V = 16 / sizeof(T) is the
#: 16-byte path (cp.async 16-byte staging, held to every conv rule), V = 1 the scalar fallback for
#: strided views / NCHW / channel counts that are not a multiple of V (exempt from the 2-byte load
#: rule, which such layouts need; still no spills and tensor cores)
CUDA_GENERIC_CONV = ("line_conv.cu:line_conv_fwd_kernel", "line_conv.cu:line_conv_wgrad_kernel")
GENERIC_VECTOR = {"__nv_bfloat16": 8, "__half": 8, "float": 4}
#: CUDA pointwise kernels (csrc/cuda/pointwise.cu, issue 12) held to the vector rules: their
#: 16-byte-vector instantiations (template argument V > 1) load with LDG.E.128, never load 2-byte
#: scalars in a loop, spill nothing; no kernel of pointwise.cu uses atomics (deterministic sums)
CUDA_POINTWISE = re.compile(r"^(se_pool|se_apply|se_bwd_reduce|se_bwd_apply|lk_conv_bwd_prep)_kernel$")

TRITON_KERNELS = sorted({
    m.group(1)
    for f in sorted((ROOT / "kernels").glob("*.py"))
    for m in re.finditer(r"@triton\.jit[^\n]*\n\s*def (_\w+_kernel)\(", f.read_text())
})
CUDA_KERNELS = sorted({
    f"{f.name}:{m.group(1)}"
    for f in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(",
                         f.read_text())
})


def _clean_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_report(tmp, *args, timeout=900):
    out = tmp / "kernel-report.json"
    r = subprocess.run([sys.executable, "-m", "msff.kernel_report", "--out", str(out), *args],
                       env=_clean_env(), capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """bf16, sm_90a, train + eval: every launch of the LKAM blocks at the paper's shapes."""
    rep, table = _run_report(tmp_path_factory.mktemp("kr"), "--dtypes", "bfloat16",
                             "--arch", "sm_90a")
    rep["_table"] = table
    return rep


def test_report_covers_every_planned_launch_and_kernel(report):
    assert report["schema"] == "msff-kernel-report/1"
    assert not report["errors"], report["errors"]
    bad = [(r["name"], r["status"][:300]) for r in report["triton"] if r["status"] != "ok"]
    assert not bad, bad
    # every kernel defined in kernels/*.py is planned (a new kernel needs a compile_specs entry)
    assert {r["kernel"] for r in report["triton"]} == set(TRITON_KERNELS)
    # every launch the launchers' config functions plan (listed by a separate process) is in it
    r = subprocess.run([sys.executable, "-m", "msff.kernel_report", "--list", "--dtypes",
                        "bfloat16"], env=_clean_env(), capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    planned = json.loads(r.stdout)
    key = lambda d: (d["name"], d["stage"], d["mode"], json.dumps(d["config"], sort_keys=True))
    have = {key(r) for r in report["triton"] if r["arch"] == "sm_90a"}
    assert planned and {key(p) for p in planned} <= have
    # both modes, all four LKAM stages, and the backward passes appear
    assert {r["mode"] for r in report["triton"]} == {"train", "eval"}
    assert {r["stage"] for r in report["triton"]} == {"E1.0", "E1", "E2.0", "E2"}
    assert {"forward", "input-grad", "weight-grad", "se", "se-backward"} <= {
        r["pass"] for r in report["triton"]}
    for r in report["triton"]:
        assert r["registers"] > 0 and r["occupancy"]["occupancy"] > 0, r["name"]
        assert r["roofline"]["floor_s"] > 0 and r["roofline"]["hbm_bytes"] > 0


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="nvcc not found: the CUDA half of the report needs it")
def test_report_covers_every_cuda_kernel(report):
    rows = [r for r in report["cuda"] if r.get("arch") == "sm_90a"]
    bad = [(r["file"], r["status"][:500]) for r in rows if r["status"] != "ok"]
    assert not bad, bad
    have = {f"{r['file']}:{r['short'].split('<')[0]}" for r in rows}
    assert set(CUDA_KERNELS) <= have, set(CUDA_KERNELS) - have


def test_table_lists_every_kernel(report):
    table = report["_table"]
    assert "Triton kernels, sm_90a, bfloat16" in table
    for r in report["triton"]:
        assert r["name"].split(" ", 1)[0] in table


def _rule_failures(rows, conv: bool, scalar_fallback_ok: bool = False) -> list[str]:
    """Rule breaches of compiled kernels. ``scalar_fallback_ok``: rows whose last template
    argument is 1 (the scalar instantiation of a kernel templated on its vector width) may load
    2-byte scalars; they must still spill nothing and use the tensor cores."""
    fails = []
    for r in rows:
        t, loop = r["sass"]["total"], r["sass"]["in_loop"]
        label = r.get("name") or f"{r['file']}:{r['short']}"
        if r["spill_stores"] or r["spill_loads"]:
            fails.append(f"{label}: {r['spill_stores']} B spill stores")
        if conv and not (t.get("hgmma", 0) or t.get("hmma", 0)):
            fails.append(f"{label}: no HGMMA/HMMA")
        scalar = scalar_fallback_ok and _vector_width(r.get("short", "")) == 1
        if conv and loop.get("ldg_16", 0) and not scalar:
            fails.append(f"{label}: {loop['ldg_16']} LDG.E.U16 in the main loop")
    return fails


def _xfail_params(names, table):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=table[n]))
            if n in table else n for n in names]


@pytest.mark.parametrize("kernel", _xfail_params(TRITON_KERNELS, TRITON_RULES_XFAIL))
def test_triton_kernel_rules_sm90a(report, kernel):
    rows = [r for r in report["triton"] if r["kernel"] == kernel and r["arch"] == "sm_90a"
            and r["status"] == "ok"]
    assert rows, f"{kernel}: no compiled launch in the report"
    conv = any(r["role"] in ("conv_fwd", "conv_dgrad", "conv_wgrad") for r in rows)
    fails = _rule_failures(rows, conv)
    assert not fails, "\n".join(sorted(set(fails))[:20])


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="nvcc not found")
@pytest.mark.parametrize("kernel", _xfail_params(CUDA_KERNELS, CUDA_RULES_XFAIL))
def test_cuda_kernel_rules_sm90a(report, kernel):
    file, name = kernel.split(":")
    rows = [r for r in report["cuda"] if r.get("arch") == "sm_90a" and r.get("status") == "ok"
            and r["file"] == file and r["short"].split("<")[0] == name]
    assert rows, f"{kernel}: not in the report"
    fails = _rule_failures(rows, bool(CUDA_CONV.match(name)), kernel in CUDA_GENERIC_CONV)
    assert not fails, "\n".join(sorted(set(fails))[:20])


def _generic_conv_failures(rows) -> list[str]:
    """The generic conv kernels: per dtype one 16-byte instantiation <T, 16/sizeof(T)> that
    stages its operands with 16-byte cp.async (LDGSTS.128), loads no 2-byte / 1-byte scalars in a
    loop, uses the tensor cores and spills nothing; and one scalar fallback <T, 1> (no spills,
    tensor cores). The weight gradient uses no atomics (deterministic split-K)."""
    fails = []
    have = {(r["short"].split("<", 1)[1].split(",")[0].strip(), _vector_width(r["short"])) for r in rows}
    want = {(t, v) for t, v in GENERIC_VECTOR.items()} | {(t, 1) for t in GENERIC_VECTOR}
    if have != want:
        fails.append(f"instantiations {sorted(have)}, expected {sorted(want)}")
    fails += _rule_failures(rows, True, scalar_fallback_ok=True)
    for r in rows:
        if _vector_width(r["short"]) <= 1:
            continue
        t, loop = r["sass"]["total"], r["sass"]["in_loop"]
        if not loop.get("ldgsts_128", 0):
            fails.append(f"{r['short']}: operands not staged by 16-byte cp.async (LDGSTS.128) in the loop")
        if loop.get("ldg_16", 0) or loop.get("ldg_8", 0) or t.get("ldgsts_narrow", 0):
            fails.append(f"{r['short']}: narrow loads {loop.get('ldg_16', 0)} LDG.E.U16, "
                         f"{t.get('ldgsts_narrow', 0)} narrow LDGSTS")
    for r in rows:  # the weight gradient: per-split partials summed in order, deterministic
        if r["short"].startswith("line_conv_wgrad_kernel") and r["sass"]["total"].get("atomics", 0):
            fails.append(f"{r['short']}: {r['sass']['total']['atomics']} atomics")
    return fails


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="nvcc not found")
@pytest.mark.parametrize("kernel", CUDA_GENERIC_CONV)
def test_cuda_generic_conv_vector_rules_sm90a(report, kernel):
    file, name = kernel.split(":")
    rows = [r for r in report["cuda"] if r.get("arch") == "sm_90a" and r.get("status") == "ok"
            and r["file"] == file and r["short"].split("<")[0] == name]
    fails = _generic_conv_failures(rows)
    assert not fails, "\n".join(fails)


def _vector_width(short: str) -> int:
    """``se_pool_kernel<__nv_bfloat16, 8>`` -> 8 (the last template argument), 0 without one."""
    m = re.search(r",\s*(\d+)>$", short)
    return int(m.group(1)) if m else 0


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="nvcc not found")
@pytest.mark.parametrize("kernel", [k for k in CUDA_KERNELS
                                    if CUDA_POINTWISE.match(k.split(":")[1])])
def test_cuda_pointwise_vector_rules_sm90a(report, kernel):
    file, name = kernel.split(":")
    rows = [r for r in report["cuda"] if r.get("arch") == "sm_90a" and r.get("status") == "ok"
            and r["file"] == file and r["short"].split("<")[0] == name]
    vec = [r for r in rows if _vector_width(r["short"]) > 1]
    assert {_vector_width(r["short"]) for r in vec} == {4, 8}, [r["short"] for r in rows]
    fails = []
    for r in vec:
        t, loop = r["sass"]["total"], r["sass"]["in_loop"]
        if r["spill_stores"] or r["spill_loads"]:
            fails.append(f"{r['short']}: {r['spill_stores']} B spill stores")
        if not t.get("ldg_128", 0):
            fails.append(f"{r['short']}: no LDG.E.128")
        if loop.get("ldg_16", 0) or loop.get("ldg_8", 0):
            fails.append(f"{r['short']}: {loop.get('ldg_16', 0)} LDG.E.U16 in a loop")
    assert not fails, "\n".join(fails)


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="nvcc not found")
def test_cuda_pointwise_kernels_use_no_atomics(report):
    rows = [r for r in report["cuda"] if r.get("arch") == "sm_90a" and r.get("status") == "ok"
            and r["file"] == "pointwise.cu"]
    assert len(rows) >= 30, len(rows)
    bad = [(r["short"], r["sass"]["total"]["atomics"]) for r in rows
           if r["sass"]["total"].get("atomics", 0)]
    assert not bad, bad


@pytest.mark.skipif(not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="nvcc not found")
def test_cuda_tma_kernel_rules_sm90a(report):
    # issue 12: the sm_90a forward stages its halo by TMA (UTMALDG) in an mbarrier pipeline
    # (SYNCS) feeding wgmma (HGMMA), without spills
    rows = [r for r in report["cuda"] if r.get("arch") == "sm_90a" and r.get("status") == "ok"
            and r["short"].startswith("line_conv_tma_kernel")]
    assert len(rows) == 6, [r["short"] for r in rows]
    for r in rows:
        t = r["sass"]["total"]
        assert t.get("tma_load", 0) and t.get("syncs", 0) and t.get("hgmma", 0), (r["short"], t)
        assert not (r["spill_stores"] or r["spill_loads"]), r["short"]
        assert not r["sass"]["in_loop"].get("ldg_16", 0), r["short"]


# ---- the parsing and arithmetic, on synthetic input (no compiler) ---------------------------
def test_sass_counts_finds_loops_and_load_widths():
    from msff.kernel_report import sass_counts

    sass = """
        /*0000*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*0030*/              @!P0 LDG.E.U16 R5, desc[UR4][R6.64] ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0050*/               @P1 BRA 0x20 ;
        /*0060*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R7 ;
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R7 ;
        /*0080*/                   LDG.E R9, desc[UR4][R2.64] ;
        /*0090*/                   EXIT ;
    """
    c = sass_counts(sass)
    assert c["loops"] == 1
    assert c["total"] == {"ldg_16": 2, "ldg_128": 1, "ldgsts": 1, "ldgsts_128": 1, "hgmma": 1,
                          "atomics": 1, "stg_16": 1, "ldg_32": 1}
    assert c["in_loop"] == {"ldgsts": 1, "ldgsts_128": 1, "ldg_16": 1, "hgmma": 1}


def test_sass_counts_finds_tma_and_mbarriers():
    from msff.kernel_report import sass_counts

    sass = """
        /*0000*/                   UTMALDG.4D [UR8], [UR4] ;
        /*0010*/                   SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR6], RZ ;
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR6], R3 ;
        /*0030*/              @!P0 BRA 0x20 ;
        /*0040*/                   EXIT ;
    """
    c = sass_counts(sass)
    assert c["total"] == {"tma_load": 1, "syncs": 2}
    assert c["in_loop"] == {"syncs": 1}  # the try-wait spin loop


def test_occupancy_limits():
    from msff.kernel_report import occupancy

    # 255 regs x 128 threads: 8 warps x 256-reg granularity -> 2 blocks of 4 warps by registers
    o = occupancy("sm_90a", 255, 29184, 4)
    assert o["blocks_per_sm"] == 2 and o["limiter"] == "registers" and o["occupancy"] == 0.125
    o = occupancy("sm_90a", 32, 200 * 1024, 4)
    assert o["blocks_per_sm"] == 1 and o["limiter"] == "shared memory"
    assert occupancy("sm_80", 24, 0, 8)["limiter"] == "warps"


def test_roofline_of_a_conv_launch():
    from msff.kernel_report import HBM_BW, PEAK_FLOPS, roofline

    N, C, H, W, K = 32, 64, 512, 512, 15
    M = N * H * W
    spec = dict(kernel_name="_lk_conv_fwd_kernel", role="conv_fwd", dtype="bfloat16",
                problem=dict(N=N, cin=C, cout=C, H=H, W=W, K=K),
                constexprs=dict(BLOCK_M=128, BLOCK_N=64, HAS_ADD=False, PRO_BWD=False),
                grid=(M // 128, 1))
    r = roofline(spec)
    assert r["flops"] == 2 * M * C * C * K
    assert r["hbm_bytes"] == 2 * M * C * 2 + C * C * K * 2
    assert r["floor_s"] == pytest.approx(max(r["flops"] / PEAK_FLOPS["bfloat16"],
                                             r["hbm_bytes"] / HBM_BW))
    assert r["tile_a_bytes"] == K * M * C * 2  # x streamed once per tap (one n-tile)


@pytest.mark.slow
def test_full_report_all_dtypes_and_archs(tmp_path):
    rep, table = _run_report(tmp_path, timeout=1800)
    assert not rep["errors"]
    bad = [(r["name"], r["arch"], r["dtype"], r["status"][:200])
           for r in rep["triton"] if r["status"] != "ok"]
    assert not bad, bad
    assert {(r["arch"], r["dtype"]) for r in rep["triton"]} == {
        (a, d) for a in ("sm_90a", "sm_80") for d in ("bfloat16", "float16", "float32")}
    assert "Triton kernels, sm_80" in table
