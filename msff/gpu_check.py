"""``make gpu-check`` / ``python -m msff.gpu_check``: the one-shot validation for a machine with an
H100/H200 (any CUDA GPU works; the paper shapes need ~40 GB). Ends within ``--budget`` seconds
(default 450) plus ~15 s for the record; ``--plan`` prints each section's estimated time.

The fused backends are checked as **units**: ``triton`` and one unit per CUDA conv kernel variant
(``cuda:generic``, ``cuda:tc``, ``cuda:tc-cpasync``, ``cuda:sm80``: the ``MSFF_CUDA_CONV`` values of
csrc/cuda_ops.cpp; before Hopper ``tc``, ``tc-cpasync`` and ``sm80`` are the same mma.sync kernel,
so only ``tc`` runs there). ``--variants`` or an ``MSFF_CUDA_CONV`` set in the environment restricts
the sweep. Every GPU section runs in a **subprocess with a hard timeout** (a process group killed on
expiry): a kernel that hangs (an mbarrier phase bug), crashes the process or poisons the CUDA
context (an illegal address) fails its own unit with the reason, and the check goes on with the
others. A worker writes each result as one JSON line the moment it has it, after a ``begin`` line
naming the case, so the parent knows which case hung or crashed.

Sections, in order (most informative for ``auto`` first; what does not fit the budget is skipped and
listed as ``skipped: budget``):

1. environment and build state (``make gpu-check`` runs ``make install`` first, which builds the
   CUDA extension);
2. parity of every unit against the reference, one subprocess each, cheapest cases first: small
   awkward shapes (odd sizes, H/W < k, channel counts that are not block multiples, C_out > 64 so
   every ``num_warps=8`` config of the launchers runs, projection shortcut) in bf16, then fp32, then
   fp16, train (output, input gradient, every parameter gradient, BN running buffers) and eval;
   then the LKAM block at the paper's shapes (E1 N=32×64ch×512², E2 N=32×128ch×256², k=15; bf16
   autocast, channels_last; train and eval); then op-level parity of ``lk_conv`` and ``lkam_se``
   (forward and backward) at the paper's shapes;
3. block benchmarks of every unit that passed parity against eager cuDNN (``cudnn.benchmark``),
   side by side in one subprocess (CUDA events, warm-up, median of ``--reps``; TFLOP/s, % of the
   bf16 peak, peak and saved-activation memory); a crashing provider is blamed, excluded and the
   rest resumed in a fresh process;
4. ``compute-sanitizer`` memcheck + racecheck (small block, train + eval) of the CUDA variants that
   passed, fastest first, until one is clean on both (the kernel ``auto`` would choose);
5. ``torch.compile`` (default mode) baselines of the same block groups;
6. sanitizer runs of the other units (the remaining CUDA variants, Triton, then variants that
   failed parity without hanging, whose memcheck says why);
7. op-level benchmarks (``lk_conv`` train/eval) with every provider;
8. ``torch.compile`` max-autotune (and freezing for eval; ``--no-autotune`` skips them);
9. the validation record ``msff/validation/<gpu>-sm<cc>.json`` (what ``auto`` reads: per unit its
   status, reason and sanitizer results, per backend/variant, dtype and mode its parity and speedup)
   and a short table.

The results JSON (``benchmarks/results/gpu-check-<gpu>.json``) is rewritten after every row, so a
run stopped from outside keeps what finished.

Rule for parity (tests/ops/ops_testing.py's): a fused result's error against an fp32 run of the
reference (TF32 off) is at most 2× the reference's own error in the same precision plus
``max(1e-3, 2·eps)`` of the result's scale; Frobenius norms for gradients and max-abs for
outputs and BN buffers.

``--dry-run`` runs the whole pipeline on CPU with tiny shapes, the ops' reference implementations
standing in for the units ``triton`` and ``cuda:tc`` and real worker subprocesses, writing to a
temporary folder: it proves the script and its process handling work (tests/test_gpu_check.py)
and nothing more. It prints the plan of the GPU sweep first.

Example:
    $ make gpu-check                      # or: python -m msff.gpu_check
    $ python -m msff.gpu_check --plan     # the sections and their estimated seconds on an H200
    $ python -m msff.gpu_check --dry-run --out /tmp/gc
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16 = 989e12
FUSED = ("triton", "cuda")
#: the CUDA conv kernel variants (``MSFF_CUDA_CONV``; msff.ops._cuda.CONV_KERNELS), in sweep order:
#: ``generic`` first because every tensor-core variant falls back to it (fp32, NCHW, C % 8 != 0),
#: so its failures explain theirs; then ``tc``, the pipeline the work is for (on Hopper wgmma fed
#: by TMA); ``tc-cpasync`` tells TMA faults from wgmma faults when ``tc`` fails; ``sm80`` last.
CONV_VARIANTS = ("generic", "tc", "tc-cpasync", "sm80")
#: before Hopper these run the same mma.sync kernel as ``tc`` (line_conv_choose in line_conv_tc.cu)
SAME_AS_TC_BEFORE_HOPPER = ("tc-cpasync", "sm80")
#: the units the dry run sweeps with the reference standing in (one Triton, one CUDA variant)
DRY_UNITS = ("cuda:tc", "triton")

# (name, N, C_in, C_out, H, W, k)
PAPER_BLOCKS = (("E1", 32, 64, 64, 512, 512, 15), ("E2", 32, 128, 128, 256, 256, 15))
SMALL_BLOCKS = (
    ("odd-37x53-proj", 2, 3, 130, 37, 53, 15),      # C_out > 64: the num_warps=8 configs
    ("hw<k", 1, 96, 96, 13, 7, 15),                 # H, W smaller than k; 8 warps
    ("c65-batch1", 1, 65, 65, 33, 31, 15),          # one past a block multiple
    ("c16-k7", 3, 16, 16, 24, 40, 7),
    ("c128-proj", 2, 64, 128, 19, 23, 15),
)
DRY_BLOCKS = (("dry", 2, 8, 8, 16, 16, 7), ("dry-proj", 1, 3, 12, 9, 11, 5))

# ---- time budget --------------------------------------------------------------------------------
#: Estimated seconds per section on an H200 host (16 cores). Nothing here has run on a GPU yet:
#: every number is derived (FLOPs at an assumed rate, process start-up, compile times reported for
#: torch.compile / compute-sanitizer) in msff/validation/README.md, "Time budget", and printed by
#: ``--plan``. The run decides with them whether a section can still start; hard timeouts (below)
#: bound what a section can cost when an estimate is wrong.
EST_S = {
    "environment": 10,        # parent imports (torch, triton, msff) + backend probes
    "worker_start": 6,        # python + torch + msff import (2.7 s on the 2-core CPU) + CUDA context
    "parity_triton": 90,      # cold Triton JIT of ~60 specialisations + autotune at paper shapes
    "parity_cuda": 20,        # 30 small cases ~5 s, 4 paper block cases ~6 s, 2 op cases ~3 s
    "bench_reference": 4,     # per block group: cudnn.benchmark search + 22 steps of ~80 ms (E1 train)
    "bench_fused": 2,         # per block group and unit: 22 steps + the check + the memory pass
    "bench_compile": 30,      # per block group: inductor compile of forward (+ backward), cold
    "bench_autotune": 120,    # per block group and max-autotune provider
    "bench_op": 1,            # per op group and provider
    "bench_op_compile": 15,   # per op group: inductor compile of one conv (+ BN)
    "sanitizer": 35,          # per unit and tool: the tool's start-up dominates (tiny shapes)
}
#: seconds kept free at the end for the record and the table
RESERVE_S = 15
#: a section needing a subprocess starts only with at least this much left (beyond RESERVE_S)
MIN_START_S = {"bench": 20, "sanitizer": 45}
#: hard timeouts per subprocess (also bounded by what is left of the budget)
CAP_S = {"parity_triton": 240, "parity_cuda": 120, "sanitizer": 120, "bench": 400}
#: a worker that writes nothing for this long is killed as hung (start-up, then per case)
STARTUP_LIMIT_S = 90
CASE_LIMIT_S = {("cuda", False): 30, ("cuda", True): 90, ("triton", False): 120,
                ("triton", True): 180, ("reference", False): 60, ("reference", True): 120}
BENCH_LIMIT_S = {"compile": 300, "compile-max-autotune": 600, "compile-freezing": 600}
BENCH_LIMIT_DEFAULT_S = 120


# ---- units ----------------------------------------------------------------------------------------
def unit_backend(unit: str) -> str:
    """``cuda:tc`` -> ``cuda``; ``triton`` -> ``triton``."""
    return unit.split(":", 1)[0]


def unit_variant(unit: str) -> Optional[str]:
    """``cuda:tc`` -> ``tc``; ``triton`` (or a pre-sweep ``cuda``) -> None."""
    return unit.split(":", 1)[1] if ":" in unit else None


def unit_labels(unit: str) -> dict:
    """The fields every parity row carries: unit, backend and (CUDA) conv variant."""
    return {"unit": unit, "backend": unit_backend(unit), "variant": unit_variant(unit)}


def sweep_units(backends, variants, capability: str) -> tuple[list[str], list[dict]]:
    """(units to check in order, [{"unit", "status": "skipped", "reason"}]) for the fused
    ``backends`` that can run, the CUDA conv ``variants`` asked for and the GPU's capability.
    Cheapest first: the CUDA variants (~26 s each), then Triton (~96 s, mostly cold JIT)."""
    units, skipped = [], []
    if "cuda" in backends:
        hopper = capability.split(".")[0] == "9"
        for v in CONV_VARIANTS:
            if v not in variants:
                continue
            if not hopper and v in SAME_AS_TC_BEFORE_HOPPER and "tc" in variants:
                skipped.append({"unit": f"cuda:{v}", "status": "skipped", "reason": (
                    f"on sm_{capability.replace('.', '')} {v} runs the same mma.sync kernel as tc "
                    "(line_conv_choose); checked once as cuda:tc")})
                continue
            units.append(f"cuda:{v}")
    if "triton" in backends:  # last: the costliest unit (cold JIT) and the least uncertain estimate
        units.append("triton")
    return units, skipped


def block_groups(paper, dtypes) -> list[tuple]:
    """The timed LKAM-block groups (kind, case, mode, dtype): what the record's speedups come from."""
    return [("block", s[0], m, str(d)[6:]) for d in dtypes for m in ("train", "eval") for s in paper]


def op_groups(paper) -> list[tuple]:
    return [("op", s[0], m, "bfloat16") for m in ("train", "eval") for s in paper]


def plan(units, *, dry: bool = False, autotune: bool = True, sanitizer: bool = True,
         dtypes=("bfloat16",), budget_s: Optional[float] = None) -> list[dict]:
    """The sections of a run, in order, with their estimated seconds (:data:`EST_S`), assuming every
    unit passes parity: ``[{"section", "what", "est_s", "cum_s", "fits"}]``. ``fits`` is False
    where the cumulative estimate passes ``budget_s - RESERVE_S`` (those sections would be skipped
    or cut short). The run follows the same order (tests check it)."""
    e = EST_S
    cuda = [u for u in units if unit_backend(u) == "cuda"]
    n_block = len(block_groups(PAPER_BLOCKS, dtypes))
    n_op = len(op_groups(PAPER_BLOCKS))
    rows = [("environment", "versions, GPU, backend probes", e["environment"])]
    for u in units:
        rows.append(("parity", u, e["worker_start"]
                     + (e["parity_triton"] if unit_backend(u) == "triton" else e["parity_cuda"])))
    rows.append(("bench", "block: reference + " + ", ".join(units),
                 e["worker_start"] + n_block * (e["bench_reference"] + e["bench_fused"] * len(units))))
    if sanitizer and not dry and cuda:
        rows.append(("sanitizer", "memcheck + racecheck of the fastest passing CUDA variant",
                     2 * e["sanitizer"]))
    if not dry:
        rows.append(("bench", "block: torch.compile", e["worker_start"]
                     + n_block * (e["bench_reference"] + e["bench_compile"])))
    rest = len(units) - (1 if cuda else 0)
    if sanitizer and not dry and rest:
        rows.append(("sanitizer", f"memcheck + racecheck of the other {rest} units",
                     2 * e["sanitizer"] * rest))
    rows.append(("bench", "op: lk_conv, every provider", e["worker_start"] + n_op * (
        e["bench_op"] * (1 + len(units)) + (0 if dry else e["bench_op_compile"]))))
    if autotune and not dry:
        rows.append(("bench", "block: torch.compile max-autotune (+ freezing for eval)",
                     e["worker_start"] + n_block * 1.5 * e["bench_autotune"]))
    out, cum = [], 0.0
    for section, what, est in rows:
        cum += est
        out.append({"section": section, "what": what, "est_s": round(est), "cum_s": round(cum),
                    "fits": budget_s is None or cum <= budget_s - RESERVE_S})
    return out


def format_plan(rows, budget_s: float, title: str) -> str:
    lines = [f"{title} (estimated seconds, H200-class host; --budget {budget_s:.0f} s, "
             f"{RESERVE_S} s kept for the record)"]
    for r in rows:
        flag = "" if r["fits"] else "   <- past the budget: skipped or cut short"
        lines.append(f"  {r['section']:10s} {r['est_s']:4d} s  (by {r['cum_s']:5d} s)  {r['what']}{flag}")
    return "\n".join(lines)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _atomic_json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def block_flops(cin, cout, H, W, N, k, train: bool) -> float:
    """Convolution FLOPs of one LKAM block (4 separable 1-D convs + 1×1 projection); training
    counts forward + input gradient + weight gradient (3×). SE and pointwise work excluded."""
    M = N * H * W
    f = 2 * M * k * (cin * cout + cout * cout) * 2
    if cin != cout:
        f += 2 * M * cin * cout
    return f * (3 if train else 1)


def time_fn(fn: Callable, warmup: int, reps: int, cuda: bool) -> list[float]:
    """Seconds per call of ``fn``: CUDA events on GPU (synchronised), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def lowp_ok(out, truth, torch_lp, norm: str, dtype) -> tuple[bool, dict]:
    """The parity rule (module docstring): (passed, numbers)."""
    d = out.double() - truth.double()
    b = torch_lp.double() - truth.double()
    if norm == "max":
        err, base, scale = d.abs().max().item(), b.abs().max().item(), truth.double().abs().max().item()
    else:
        err, base, scale = d.norm().item(), b.norm().item(), truth.double().norm().item()
    rel = max(1e-3, 2 * torch.finfo(dtype).eps)
    bound = 2 * base + rel * scale
    return bool(err <= bound), {"err": err, "torch_err": base, "bound": bound}


# ---- the cases (run inside a worker subprocess) ------------------------------------------------
class Cases:
    """Parity cases and benchmark providers, run in a worker; each result goes to ``emit`` as one
    event the moment it exists, after a ``begin`` event naming the case and its time limit."""

    def __init__(self, dry_run: bool, reps: int, emit: Callable[[dict], None]):
        self.dry = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.dev = "cuda" if self.cuda else "cpu"
        self.reps = reps
        self.emit = emit
        self._group_key = None
        self._group_ref = None

    def run_backend(self, unit: str) -> str:
        """The backend a unit's rows run on: its own, or the reference standing in (dry run)."""
        return "reference" if self.dry else unit_backend(unit)

    def begin(self, row: dict, paper: bool = False, limit_s: Optional[float] = None) -> None:
        if limit_s is None:
            limit_s = CASE_LIMIT_S[(self.run_backend(row.get("unit", "reference")), paper)]
        what = " ".join(str(row.get(k)) for k in ("kind", "case", "mode", "dtype") if row.get(k))
        self.emit({"event": "begin", "what": f"{what} {row.get('unit') or row.get('provider')}",
                   "row": row, "limit_s": limit_s})

    def add(self, section: str, row: dict) -> None:
        self.emit({"event": "row", "section": section, "row": row})

    def abort_if_context_lost(self, err: BaseException) -> None:
        """After ``err`` in a case: when the CUDA context no longer works (an illegal address, a
        trap: sticky errors), every later case would fail for that reason alone, so the worker
        exits now, its case still pending; the parent fails the case (and the unit, or the
        provider) with this message."""
        if not self.cuda:
            return
        try:
            torch.cuda.synchronize()
            torch.ones(1, device="cuda").add_(1).item()
        except RuntimeError as lost:
            print(f"CUDA context lost: {type(err).__name__}: {str(err)[:300]} "
                  f"(then {type(lost).__name__}: {str(lost)[:200]})", file=sys.stderr, flush=True)
            os._exit(70)

    def parity_unit(self, unit: str) -> None:
        """Every parity case of ``unit``, cheapest first: small shapes (bf16, which runs the
        tensor-core kernels, then fp32 and fp16), the paper's block shapes, the paper's ops."""
        small = DRY_BLOCKS[1:] if self.dry else SMALL_BLOCKS
        paper = DRY_BLOCKS[:1] if self.dry else PAPER_BLOCKS
        dtypes = (torch.bfloat16,) if self.dry else (torch.bfloat16, torch.float32, torch.float16)
        for dt in dtypes:
            for shape in small:
                for train in (True, False):
                    self.parity_block(shape[0], shape, unit, dt, train)
        for shape in paper:
            for train in (True, False):
                self.parity_block(shape[0], shape, unit, torch.bfloat16, train)
        for shape in paper:
            self.parity_ops(shape, unit, torch.bfloat16)

    def make_block(self, cin, cout, k, dtype_for_params=torch.float32, seed=0):
        from msff.models import LKAMBlock

        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the same conv weights for every provider of a case
        blk = LKAMBlock(cin, cout, kernel_size=k, reduction=8)
        with torch.no_grad():
            for m in blk.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
        blk = blk.to(self.dev, dtype_for_params)
        if self.cuda:
            blk = blk.to(memory_format=torch.channels_last)
        return blk

    def _input(self, N, cin, H, W, seed=1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, cin, H, W, generator=g).to(self.dev)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    def _run_block(self, blk, x, backend, dtype, train: bool):
        """(out, x.grad, {param: grad}, {buffer: value}) of one step; autocast for 16-bit."""
        blk = copy.deepcopy(blk)
        blk.backend = backend if backend != "reference-eager" else "reference"
        blk.train(train)
        xr = x.detach().clone().requires_grad_(train)
        lowp = dtype != torch.float32
        ctx = torch.autocast(self.dev, dtype=dtype) if lowp else torch.autocast(self.dev, enabled=False)
        if backend == "reference-eager":
            fwd = blk.forward_reference
        elif backend == "reference" and self.dry:
            from msff.ops.lkam import lkam_block

            fwd = lambda t: lkam_block(blk, t, backend="reference")  # noqa: E731
        else:
            fwd = blk
        if train:
            with ctx:
                y = fwd(xr)
            g = torch.Generator().manual_seed(7)
            gy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
            y.backward(gy)
            grads = {n: p.grad.detach().clone() for n, p in blk.named_parameters()}
            bufs = {n: b.detach().clone() for n, b in blk.named_buffers()
                    if b.is_floating_point()}
            return y.detach(), xr.grad.detach(), grads, bufs
        with torch.no_grad(), ctx:
            y = fwd(xr)
        return y.detach(), None, {}, {}


    def parity_block(self, name, shape, unit, dtype, train: bool) -> None:
        _, N, cin, cout, H, W, k = shape
        backend = self.run_backend(unit)
        row = dict(kind="block", case=name, **unit_labels(unit), dtype=str(dtype)[6:],
                   mode="train" if train else "eval", dims=[N, cin, cout, H, W, k])
        self.begin(row, paper=H * W >= 256 * 256)
        try:
            blk = self.make_block(cin, cout, k)
            x = self._input(N, cin, H, W)
            tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            try:
                truth = self._run_block(blk, x, "reference-eager", torch.float32, train)
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            lp = self._run_block(blk, x, "reference-eager", dtype, train)
            out = self._run_block(blk, x, backend, dtype, train)
            checks = {"out": lowp_ok(out[0], truth[0], lp[0], "max", dtype)}
            if train:
                checks["grad_x"] = lowp_ok(out[1], truth[1], lp[1], "l2", dtype)
                for n in truth[2]:
                    checks[f"grad.{n}"] = lowp_ok(out[2][n], truth[2][n], lp[2][n], "l2", dtype)
                for n in truth[3]:
                    checks[f"buf.{n}"] = lowp_ok(out[3][n], truth[3][n], lp[3][n], "max", dtype)
            failed = {k: v[1] for k, v in checks.items() if not v[0]}
            row.update(parity=not failed, checked=len(checks), failed=sorted(failed),
                       detail=failed or {k: v[1] for k, v in list(checks.items())[:3]})
        except Exception as e:  # an error is a parity failure, recorded with its message
            self.abort_if_context_lost(e)
            row.update(parity=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        self.add("parity", row)

    def parity_ops(self, shape, unit, dtype) -> None:
        """lk_conv (train flags: prologue + stats, backward) and lkam_se at a paper shape."""
        from msff.ops import lk_conv, lkam_se

        name, N, cin, cout, H, W, k = shape
        backend = self.run_backend(unit)
        row = dict(kind="op", case=name, **unit_labels(unit), dtype=str(dtype)[6:], mode="train",
                   dims=[N, cout, cout, H, W, k])
        self.begin(row, paper=True)
        try:
            g = torch.Generator().manual_seed(3)
            C = cout
            x = (torch.randn(N, C, H, W, generator=g)).to(self.dev)
            x = x.contiguous(memory_format=torch.channels_last) if self.cuda else x
            w = (torch.randn(C, C, 1, k, generator=g) / (C * k) ** 0.5).to(self.dev)
            s = (torch.rand(C, generator=g) + 0.5).to(self.dev)
            t = (torch.randn(C, generator=g) * 0.3).to(self.dev)

            def conv(bk, dt):
                xr = x.to(dt).detach().requires_grad_()
                wr = w.to(dt).detach().requires_grad_()
                y, ss, qq = lk_conv(xr, wr, None, s, t, None, False, True, backend=bk)
                gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y)
                (y * gy).float().sum().add_(ss.sum() * 1e-3).backward()
                return y.detach(), xr.grad, wr.grad

            tf32 = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                truth = conv("reference", torch.float32)
            finally:
                torch.backends.cudnn.allow_tf32 = tf32
            lp = conv("reference", dtype)
            out = conv(backend, dtype)
            checks = {"lk_conv.out": lowp_ok(out[0], truth[0], lp[0], "max", dtype),
                      "lk_conv.grad_x": lowp_ok(out[1], truth[1], lp[1], "l2", dtype),
                      "lk_conv.grad_w": lowp_ok(out[2], truth[2], lp[2], "l2", dtype)}
            hid = max(1, C // 8)
            se_w = [(torch.randn(hid, C, generator=g) * 0.1).to(self.dev),
                    torch.zeros(hid, device=self.dev),
                    (torch.randn(C, hid, generator=g) * 0.1).to(self.dev),
                    torch.zeros(C, device=self.dev)]

            def se(bk, dt):
                fa = x.to(dt).detach().requires_grad_()
                r = x.flip(3).to(dt).contiguous(
                    memory_format=torch.channels_last if self.cuda else torch.contiguous_format)
                o, _ = lkam_se(fa, None, s, t, None, None, *se_w, r, backend=bk)
                o.float().sum().backward()
                return o.detach(), fa.grad

            truth = se("reference", torch.float32)
            lp = se("reference", dtype)
            out = se(backend, dtype)
            checks["lkam_se.out"] = lowp_ok(out[0], truth[0], lp[0], "max", dtype)
            checks["lkam_se.grad"] = lowp_ok(out[1], truth[1], lp[1], "l2", dtype)
            failed = {k: v[1] for k, v in checks.items() if not v[0]}
            row.update(parity=not failed, checked=len(checks), failed=sorted(failed),
                       detail=failed or {k: v[1] for k, v in checks.items()})
        except Exception as e:  # an error (our kernel or the driver) is a recorded parity failure
            self.abort_if_context_lost(e)
            row.update(parity=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        self.add("parity", row)


    # -- benchmarks
    def bench_provider(self, kind, shape, mode, dtype, prov) -> None:
        """Time one provider of one (kind, shape, mode, dtype) group; the first provider of a group
        (the reference) gives the output the others are compared with. Ratios between providers
        are computed by the parent from the medians (:func:`bench_ratios`)."""
        name, N, cin, cout, H, W, k = shape
        train = mode == "train"
        key = (kind, name, mode, dtype)
        if key != self._group_key:
            self._group_key, self._group_ref = key, None
        row = dict(kind=kind, case=name, mode=mode, dtype=str(dtype)[6:],
                   dims=[N, cin, cout, H, W, k], provider=prov)
        self.begin(row, limit_s=BENCH_LIMIT_S.get(prov, BENCH_LIMIT_DEFAULT_S))
        flops = (block_flops(cin, cout, H, W, N, k, train) if kind == "block"
                 else 2 * N * H * W * cout * cout * k * (3 if train else 1))
        variant = unit_variant(prov)
        if variant:  # read by the C++ glue at every call
            os.environ["MSFF_CUDA_CONV"] = variant
        else:
            os.environ.pop("MSFF_CUDA_CONV", None)
        try:
            step, check, fwd_keep = self._bench_fn(kind, shape, mode, dtype, prov)
            y = check()
            if self._group_ref is None:
                self._group_ref = y
                row["parity_vs_reference"] = True
            else:
                row["parity_vs_reference"] = _close(y, self._group_ref, dtype)
            del y
            times = time_fn(step, warmup=2 if not self.dry else 1, reps=self.reps, cuda=self.cuda)
            med = statistics.median(times)
            row.update(median_s=med, tflops=flops / med / 1e12,
                       pct_bf16_peak=100 * flops / med / PEAK_BF16, reps=len(times))
            row.update(self._memory(step, fwd_keep if train else None))
        except Exception as e:  # a failing provider is recorded in its row; the others still run
            self.abort_if_context_lost(e)
            row.update(error=f"{type(e).__name__}: {str(e)[:400]}")
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        self.add("bench", row)

    def _bench_fn(self, kind, shape, mode, dtype, prov):
        """(step, check): ``step()`` runs one timed iteration; ``check()`` returns the output."""
        import torch._inductor.config as icfg

        name, N, cin, cout, H, W, k = shape
        train = mode == "train"
        lowp = dtype != torch.float32
        ctx = (lambda: torch.autocast(self.dev, dtype=dtype)) if lowp else (
            lambda: torch.autocast(self.dev, enabled=False))
        baseline = prov.startswith(("reference", "compile"))
        backend = "reference" if baseline else self.run_backend(prov)
        if kind == "block":
            blk = self.make_block(cin, cout, k)
            blk.backend = backend
            blk.train(train)
            fn = blk
            if self.dry and not baseline:  # the stand-in: the fused op path, reference kernels
                from msff.ops.lkam import lkam_block

                fn = lambda t: lkam_block(blk, t, backend="reference")  # noqa: E731
            x = self._input(N, cin, H, W)
        else:
            # op level: one 1×k conv as the model runs it — bf16 conv, no extra dtype copies;
            # train: + BN batch statistics (the fused op's epilogue), eval: + bias + ReLU
            from msff.ops import lk_conv

            g = torch.Generator().manual_seed(5)
            x = self._input(N, cout, H, W)
            wt = (torch.randn(cout, cout, 1, k, generator=g) / (cout * k) ** 0.5).to(self.dev)
            bias = torch.zeros(cout, device=self.dev)
            ones = torch.ones(cout, device=self.dev)
            cdt = dtype

            def fn(t):
                w = wt.to(cdt)
                if backend == "reference":
                    y = torch.nn.functional.conv2d(t.to(cdt), w, padding=(0, k // 2))
                    if train:
                        return torch.nn.functional.batch_norm(y, None, None, ones, bias,
                                                              training=True)
                    return torch.relu(y + bias.to(y.dtype).view(1, -1, 1, 1))
                y, s, q = lk_conv(t.to(cdt), w, None if train else bias, None, None, None,
                                  not train, train, backend=backend)
                return y
        if prov.startswith("compile"):
            if prov == "compile-freezing":
                icfg.freezing = True
            mode_ = "max-autotune" if prov in ("compile-max-autotune", "compile-freezing") else None
            fn = torch.compile(fn, mode=mode_) if mode_ else torch.compile(fn)

        def once():
            if train:
                xr = x.detach().requires_grad_()
                with ctx():
                    y = fn(xr)
                y.float().sum().backward()
                return y
            with torch.no_grad(), ctx():
                return fn(x)

        def check():
            try:
                return once().detach()
            finally:
                icfg.freezing = False if prov == "compile-freezing" else icfg.freezing

        def fwd_keep():
            xr = x.detach().requires_grad_()
            with ctx():
                return fn(xr)

        return once, check, fwd_keep

    def _memory(self, step, fwd_keep) -> dict:
        """Peak memory of one step above what was allocated before it; for training also what a
        forward keeps alive for the backward (saved activations + output)."""
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        out = {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
        if fwd_keep is not None:
            before = torch.cuda.memory_allocated()
            y = fwd_keep()
            torch.cuda.synchronize()
            out["saved_activation_mib"] = (torch.cuda.memory_allocated() - before) / 2**20
            del y
        return out



# ---- subprocesses ------------------------------------------------------------------------------
@dataclass
class Job:
    """One subprocess of the check: ``parity`` of a unit, ``bench`` of groups × providers, or
    ``sanitize`` (a compute-sanitizer ``tool`` over a unit's small block)."""
    task: str
    unit: Optional[str] = None
    groups: list = field(default_factory=list)  # bench: [(kind, case, mode, dtype, [providers])]
    tool: Optional[str] = None
    timeout_s: float = 60.0


@dataclass
class Outcome:
    """How a subprocess ended: ``ok`` (ran to its end), ``timeout`` (hit ``timeout_s``), ``hung``
    (no event within the current case's limit), ``crashed`` (non-zero exit, a signal, or no end
    event) or, for the sanitizer, ``errors`` (exit 99: the tool found errors)."""
    status: str
    rows: list = field(default_factory=list)  # [(section, row)] in the order written
    reason: Optional[str] = None
    in_progress: Optional[dict] = None        # the row of the case that was running when it ended
    returncode: Optional[int] = None
    output: str = ""
    extra: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


#: a worker (or sanitizer target) exits when the gpu-check process with this pid is gone, so a
#: hung kernel never outlives the check (the workers run in their own process groups)
PARENT_ENV = "MSFF_GPU_CHECK_PARENT"


def _exit_with_parent() -> None:
    import threading

    pid = int(os.environ.get(PARENT_ENV, "0") or 0)
    if pid <= 0:
        return

    def watch():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:  # the pid was reused by another user's process: gone
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="msff-gpu-check-parent").start()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started (nvcc, ptxas)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"error|Error|illegal|misaligned|Aborted|fault", ln):
            return ln[:300]
    return lines[-1][:300] if lines else ""


def run_process(cmd: list, env: dict, timeout_s: float, events: Optional[Path] = None) -> Outcome:
    """Run ``cmd`` in its own process group and wait at most ``timeout_s``. With ``events`` (a
    worker's JSON-lines file) also kill it when the running case exceeds its ``limit_s`` (hung),
    and collect its rows as they appear."""
    t0 = time.monotonic()
    out = Outcome(status="ok")
    pending = ""
    begin, last, limit, ended = None, t0, STARTUP_LIMIT_S, False
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        env = dict(env, **{PARENT_ENV: str(os.getpid())})
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        f = open(events, encoding="utf-8") if events is not None else None
        try:
            while True:
                rc = proc.poll()
                if f is not None:
                    pending += f.read()
                    *lines, pending = pending.split("\n")
                    for ln in lines:
                        ev = json.loads(ln)
                        last = time.monotonic()
                        if ev["event"] == "begin":
                            begin, limit = ev, float(ev.get("limit_s", STARTUP_LIMIT_S))
                        elif ev["event"] == "row":
                            out.rows.append((ev["section"], ev["row"]))
                            begin = None
                        elif ev["event"] == "extra":
                            out.extra.update(ev["extra"])
                        elif ev["event"] == "end":
                            ended = True
                if rc is not None:
                    break
                now = time.monotonic()
                if now - t0 > timeout_s:
                    _kill_group(proc)
                    out.status = "timeout"
                    out.reason = f"killed at its {timeout_s:.0f} s timeout" + (
                        f" during {begin['what']}" if begin else "")
                    break
                if f is not None and now - last > limit:
                    _kill_group(proc)
                    out.status = "hung"
                    out.reason = (f"no result for {limit:.0f} s in "
                                  f"{begin['what'] if begin else 'start-up'}: killed (a hang?)")
                    break
                time.sleep(0.2)
        finally:
            if f is not None:
                f.close()
            if proc.poll() is None:  # the parent is being stopped (an exception, SIGTERM)
                _kill_group(proc)
        log.seek(0)
        out.output = log.read()[-3000:]
    out.returncode = proc.returncode
    out.elapsed_s = time.monotonic() - t0
    out.in_progress = begin["row"] if begin else None
    if out.status == "ok" and (proc.returncode != 0 or (events is not None and not ended)):
        rc = proc.returncode
        how = f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit {rc}"
        out.status = "errors" if rc == 99 and events is None else "crashed"
        out.reason = f"{how}" + (f" during {begin['what']}" if begin else "") + (
            f": {_last_error_line(out.output)}" if out.output else "")
    return out


class SubprocessRunner:
    """Runs a :class:`Job` as ``python -m msff.gpu_check --worker SPEC`` (or under
    compute-sanitizer) with the unit's ``MSFF_CUDA_CONV``; tests pass a fake runner instead."""

    def __init__(self, dry_run: bool, reps: int, sanitizer_tool: Optional[str]):
        self.dry = dry_run
        self.reps = reps
        self.tool = sanitizer_tool

    def sanitizer_command(self, job: Job) -> tuple[list, dict]:
        """(argv, environment) of a ``sanitize`` job: the unit's conv variant, and PyTorch's caching
        allocator off so that memcheck sees every tensor as its own allocation (an overrun into a
        neighbouring tensor of the same cached block is invisible otherwise)."""
        env = self.environment(job)
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        return [self.tool, "--tool", job.tool, "--error-exitcode", "99", sys.executable, "-m",
                "msff.gpu_check", "--sanitize-target", unit_backend(job.unit)], env

    @staticmethod
    def environment(job: Job) -> dict:
        env = dict(os.environ)
        variant = unit_variant(job.unit) if job.unit else None
        if variant:
            env["MSFF_CUDA_CONV"] = variant
        else:
            env.pop("MSFF_CUDA_CONV", None)
        return env

    def __call__(self, job: Job) -> Outcome:
        if job.task == "sanitize":
            return run_process(*self.sanitizer_command(job), job.timeout_s)
        env = self.environment(job)
        with tempfile.TemporaryDirectory(prefix="msff-gpu-check-worker-") as tmp:
            spec = Path(tmp) / "spec.json"
            events = Path(tmp) / "events.jsonl"
            events.touch()
            spec.write_text(json.dumps({"task": job.task, "unit": job.unit, "groups": job.groups,
                                        "dry": self.dry, "reps": self.reps,
                                        "events": str(events)}))
            return run_process([sys.executable, "-m", "msff.gpu_check", "--worker", str(spec)],
                               env, job.timeout_s, events)


def worker_main(spec_path: str) -> int:
    """The worker side of a :class:`Job` (``--worker SPEC``): run it, one JSON line per event."""
    spec = json.loads(Path(spec_path).read_text())
    with open(spec["events"], "a", encoding="utf-8") as f:
        def emit(ev: dict) -> None:
            f.write(json.dumps(ev, default=str) + "\n")
            f.flush()

        cases = Cases(spec["dry"], spec["reps"], emit)
        if cases.cuda:  # the search pays off for timing only; parity runs the heuristics' choice
            torch.backends.cudnn.benchmark = spec["task"] == "bench"
        if spec["task"] == "parity":
            cases.parity_unit(spec["unit"])
        elif spec["task"] == "bench":
            shapes = {s[0]: s for s in PAPER_BLOCKS + DRY_BLOCKS}
            for kind, case, mode, dtype, providers in spec["groups"]:
                for prov in providers:
                    cases.bench_provider(kind, shapes[case], mode, getattr(torch, dtype), prov)
            if not cases.dry and any("triton" in g[4] for g in spec["groups"]):
                from msff.kernels import lk_conv as klc

                emit({"event": "extra", "extra": {"triton_tuned": [
                    dict(key=[str(v) for v in k], config=v) for k, v in klc._TUNED.items()]}})
        else:
            raise ValueError(f"{spec_path}: task must be parity or bench, got {spec['task']!r}")
        emit({"event": "end"})
    return 0


def _sanitizer_tool() -> Optional[str]:
    return shutil.which("compute-sanitizer") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin"
                          / "compute-sanitizer",) if p.exists()), None)


def _geomean(xs) -> Optional[float]:
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def bench_ratios(rows: list) -> None:
    """Fill ``ratio_vs_eager`` (against the reference timed by the same worker, side by side) and
    ``ratio_vs_<compile mode>`` (against that provider in the same group, any worker) in place."""
    groups: dict = {}
    for r in rows:
        if r.get("median_s"):
            groups.setdefault((r["kind"], r["case"], r["mode"], r["dtype"]), []).append(r)
    for members in groups.values():
        refs = {r.get("worker"): r["median_s"] for r in members if r["provider"] == "reference"}
        comp = {r["provider"]: r["median_s"] for r in members if r["provider"].startswith("compile")}
        for r in members:
            ref = refs.get(r.get("worker")) or next(iter(refs.values()), None)
            if ref:
                r["ratio_vs_eager"] = ref / r["median_s"]
            for c, t in comp.items():
                r[f"ratio_vs_{c}"] = t / r["median_s"]


# ---- the check (parent) ------------------------------------------------------------------------
class GpuCheck:
    """One run: the units, the budget, the results document (written after each row) and the
    subprocess runner (``runner(Job) -> Outcome``; tests pass a fake)."""

    def __init__(self, out_dir: Path, dry_run: bool, budget_s: float, reps: int,
                 record_dir: Optional[Path], dtypes, autotune: bool,
                 variants: Optional[tuple] = None, runner: Optional[Callable] = None,
                 units: Optional[list] = None, environment: Optional[dict] = None,
                 sanitizer_tool: Optional[str] = None, clock: Callable[[], float] = time.monotonic):
        self.dry = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.out_dir = Path(out_dir)
        self.clock = clock
        self.t0 = clock()
        self.budget = budget_s
        self.reps = reps
        self.dtypes = dtypes
        self.autotune = autotune
        self.record_dir = record_dir
        env_variant = os.environ.get("MSFF_CUDA_CONV", "").strip()
        self.variants = tuple(variants or ((env_variant,) if env_variant else CONV_VARIANTS))
        self.tool = None if dry_run else (sanitizer_tool or _sanitizer_tool())
        self.runner = runner or SubprocessRunner(dry_run, reps, self.tool)
        gpu = torch.cuda.get_device_name(0) if self.cuda else "cpu-dry-run"
        if environment is not None:
            gpu = environment.get("gpu") or gpu
        self.slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
        self.results_path = self.out_dir / f"gpu-check-{self.slug}.json"
        self.doc = {"schema": "msff-gpu-check/2", "started": _now(), "dry_run": dry_run,
                    "environment": environment or self.environment(), "units": {},
                    "parity": [], "sanitizer": [], "bench": [], "skipped": []}
        self.units = units if units is not None else self._units()
        for u in self.units:
            self.doc["units"][u] = dict(unit_labels(u), status="pending", reason=None, sanitizer={})
        self.write()

    # -- bookkeeping
    def left(self) -> float:
        return self.budget - (self.clock() - self.t0)

    def write(self) -> None:
        self.doc["updated"] = _now()
        self.doc["elapsed_s"] = round(self.clock() - self.t0, 1)
        _atomic_json(self.results_path, self.doc)

    def add(self, section: str, row: dict) -> None:
        self.doc[section].append(row)
        if section == "bench":
            bench_ratios(self.doc["bench"])
        self.write()
        print(f"[{self.clock() - self.t0:6.1f}s] {section}: " + ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("detail", "dims")), flush=True)

    def skip(self, what: str, why: str) -> None:
        self.doc["skipped"].append({"what": what, "why": why})
        self.write()
        print(f"[{self.clock() - self.t0:6.1f}s] skipped: {what} ({why})", flush=True)

    def environment(self) -> dict:
        from msff.backend import kernel_sources_hash
        from msff.env import collect

        info = collect()
        info.pop("auto", None)
        env = {k: info.get(k) for k in ("msff", "torch", "torch_cuda", "cudnn", "triton", "gpu",
                                        "extension", "extension_cuda", "backends")}
        if self.cuda:
            major, minor = torch.cuda.get_device_capability(0)
            props = torch.cuda.get_device_properties(0)
            env.update(capability=f"{major}.{minor}", sm_count=props.multi_processor_count,
                       memory_gib=round(props.total_memory / 2**30, 1))
        else:
            env.update(capability="0.0", sm_count=0)
        env["sources"] = {b: kernel_sources_hash(b) for b in FUSED}
        # the CUDA conv kernel variants this run sweeps (each unit's worker sets MSFF_CUDA_CONV);
        # an MSFF_CUDA_CONV set by the caller restricts the sweep to that variant
        env["cuda_conv"] = list(self.variants)
        # Triton tile configs: pinned (MSFF_TRITON_CONFIG), autotuned per shape, or the defaults;
        # the autotuner's choices are added to the results at the end (doc["triton_tuned"])
        env["triton_config"] = os.environ.get("MSFF_TRITON_CONFIG") or (
            "autotune" if os.environ.get("MSFF_TRITON_AUTOTUNE", "1").strip()
            not in ("0", "false", "no", "off") else "default")
        return env

    def _units(self) -> list[str]:
        """The units to check: the fused backends that can run here, CUDA once per conv variant
        (dry run: :data:`DRY_UNITS`, the reference standing in)."""
        if self.dry:
            units = [u for u in DRY_UNITS if unit_variant(u) in (None, *self.variants)]
        else:
            from msff.backend import backend_status

            st = backend_status("cuda")
            for b in FUSED:
                if st[b] is not None:
                    self.doc["skipped"].append({"what": f"backend {b}", "why": st[b]})
            units, skipped = sweep_units([b for b in FUSED if st[b] is None], self.variants,
                                         self.doc["environment"]["capability"])
            for s in skipped:
                self.doc["units"][s["unit"]] = dict(unit_labels(s["unit"]), status="skipped",
                                                    reason=s["reason"], sanitizer={})
        return units

    def _fits(self, what: str, need_s: float) -> bool:
        if self.left() - RESERVE_S >= need_s:
            return True
        self.skip(what, "budget")
        return False

    # -- sections
    def parity_unit(self, unit: str) -> None:
        """Section 2 for one unit: its parity worker, and the unit's status from how it ended."""
        u = self.doc["units"][unit]
        kind = "parity_triton" if unit_backend(unit) == "triton" else "parity_cuda"
        est = EST_S["worker_start"] + EST_S[kind]
        if not self._fits(f"parity {unit}", est):
            u.update(status="skipped", reason="budget")
            return
        timeout = min(CAP_S[kind], self.left() - RESERVE_S)
        res = self.runner(Job("parity", unit=unit, timeout_s=timeout))
        for section, row in res.rows:
            self.add(section, dict(row, **unit_labels(unit)))
        rows = [r for r in self.doc["parity"] if r.get("unit") == unit]
        failed = [r for r in rows if not r["parity"]]
        if res.status != "ok":
            if res.in_progress is not None:  # the case it died in is a failed case
                self.add("parity", dict(res.in_progress, **unit_labels(unit), parity=False,
                                        error=f"{res.status}: {res.reason}"))
            u.update(status={"timeout": "timeout", "hung": "timeout"}.get(res.status, "crashed"),
                     reason=res.reason, output_tail=res.output[-1500:])
        elif failed:
            first = failed[0]
            u.update(status="failed", reason=(
                f"parity failed in {len(failed)} of {len(rows)} cases; first: {first['kind']} "
                f"{first['case']} {first['dtype']} {first['mode']}: "
                f"{first.get('error') or ', '.join(first.get('failed', []))}"))
        elif not rows:
            u.update(status="crashed", reason="the worker ran no case")
        else:
            u.update(status="passed", reason=None)
        u.update(parity_cases=len([r for r in self.doc["parity"] if r.get("unit") == unit]),
                 parity_failed=len([r for r in self.doc["parity"]
                                    if r.get("unit") == unit and not r["parity"]]),
                 elapsed_s=round(res.elapsed_s, 1))
        self.write()
        print(f"[{self.clock() - self.t0:6.1f}s] unit {unit}: {u['status']}"
              + (f" ({u['reason']})" if u["reason"] else ""), flush=True)

    def passed(self) -> list[str]:
        return [u for u in self.units if self.doc["units"][u]["status"] == "passed"]

    def bench_task(self, title: str, groups: list, providers) -> None:
        """Time ``providers`` (a list, or a function of the group) over ``groups`` in one worker;
        when it dies, blame the provider that was running (an error row; excluded from the rest)
        and resume the rest in a new worker."""
        done, excluded, n = set(), {}, 0
        of = providers if callable(providers) else (lambda g: providers)
        while True:
            todo = [(*g, [p for p in of(g) if (g, p) not in done and p not in excluded])
                    for g in groups]
            todo = [t for t in todo if t[4]]
            if not todo:
                return
            if not self._fits(f"bench {title}" + (" (resumed)" if n else ""), MIN_START_S["bench"]):
                return
            n += 1
            res = self.runner(Job("bench", groups=[list(t) for t in todo],
                                  timeout_s=min(CAP_S["bench"], self.left() - RESERVE_S)))
            for section, row in res.rows:
                self.add(section, dict(row, worker=f"{title} #{n}"))
                done.add(((row["kind"], row["case"], row["mode"], row["dtype"]), row["provider"]))
            self.doc.setdefault("triton_tuned", []).extend(res.extra.get("triton_tuned", []))
            if res.status == "ok":
                return
            blamed = res.in_progress
            if blamed is None or res.status == "timeout":
                self.skip(f"bench {title}: {len(todo)} groups not finished", res.reason or res.status)
                return
            self.add("bench", dict(blamed, worker=f"{title} #{n}", error=f"{res.status}: {res.reason}"))
            excluded[blamed["provider"]] = res.reason

    def sanitize(self, unit: str) -> bool:
        """memcheck then racecheck of ``unit``'s small block; True when both are clean."""
        u = self.doc["units"][unit]
        for tool in ("memcheck", "racecheck"):
            if self.dry or self.tool is None:
                status = "skipped: dry run" if self.dry else "skipped: compute-sanitizer not found"
                res = None
            elif self.left() - RESERVE_S < MIN_START_S["sanitizer"]:
                status, res = "skipped: budget", None
            else:
                res = self.runner(Job("sanitize", unit=unit, tool=tool, timeout_s=min(
                    CAP_S["sanitizer"], self.left() - RESERVE_S)))
                status = {"ok": "clean", "timeout": "timeout", "hung": "timeout"}.get(
                    res.status, res.status)
                if res.status in ("errors", "crashed"):
                    m = re.search(r"(ERROR|RACECHECK) SUMMARY: (\d+)", res.output)
                    status = f"{res.status} ({m.group(2) if m else '?'} reported)"
            u["sanitizer"][tool] = status
            self.add("sanitizer", {"unit": unit, **unit_labels(unit), "tool": tool, "status": status,
                                   "elapsed_s": round(res.elapsed_s, 1) if res else 0.0,
                                   "detail": res.output[-1500:] if res else ""})
        return all(u["sanitizer"].get(t) == "clean" for t in ("memcheck", "racecheck"))

    def speed(self, unit: str) -> Optional[float]:
        """Geometric mean of ``unit``'s recorded block speedups over eager (None: untimed): the
        measure ``auto`` ranks CUDA conv variants by (msff.ops.dispatch.conv_kernel_verdicts)."""
        return _geomean([e["speedup"] for e in make_record(self.doc)["entries"]
                         if e["backend"] == unit_backend(unit) and e.get("variant") == unit_variant(unit)])

    def sweep(self) -> None:
        """Sections 2-8 in the order of :func:`plan`."""
        paper = DRY_BLOCKS[:1] if self.dry else PAPER_BLOCKS
        for unit in self.units:
            self.parity_unit(unit)
        passed = self.passed()
        blocks = block_groups(paper, self.dtypes)
        self.bench_task("block: reference + fused", blocks, ["reference"] + passed)
        by_speed = sorted((u for u in passed if unit_backend(u) == "cuda"),
                          key=lambda u: -(self.speed(u) or 0.0))
        sanitized = []
        if not self.dry and self.tool is not None:
            for unit in by_speed:  # until one is clean on both tools: the variant auto would pick
                sanitized.append(unit)
                if self.sanitize(unit):
                    break
        if not self.dry:
            # inference first: the compile target of issue 12 is stated for block inference
            self.bench_task("block: torch.compile", sorted(blocks, key=lambda g: g[2] != "eval"),
                            ["reference", "compile"])
        diagnose = [u for u in self.units if u not in passed
                    and self.doc["units"][u]["status"] in ("failed", "crashed")]
        for unit in by_speed + [u for u in passed if u not in by_speed] + diagnose:
            if unit not in sanitized:
                self.sanitize(unit)
        self.bench_task("op", op_groups(paper), ["reference"] + passed + ([] if self.dry else ["compile"]))
        if self.autotune and not self.dry:
            self.bench_task("block: torch.compile max-autotune", blocks, lambda g: [
                "reference", "compile-max-autotune"] + (["compile-freezing"] if g[2] == "eval" else []))

    # -- record
    def make_record(self) -> dict:
        return make_record(self.doc)


def _close(y, ref, dtype) -> bool:
    y, ref = y.double(), ref.double()
    tol = max(1e-3, 8 * torch.finfo(dtype).eps) * ref.abs().max().item() + 1e-6
    return bool((y - ref).abs().max().item() <= tol * 4)




def _row_unit(r: dict) -> str:
    """A parity row's unit (rows of results written before the sweep carry only ``backend``)."""
    return r.get("unit") or r["backend"]


def _unit_order(u: str) -> tuple:
    v = unit_variant(u)
    return (FUSED.index(unit_backend(u)), CONV_VARIANTS.index(v) if v in CONV_VARIANTS else -1, u)


def make_record(doc: dict) -> dict:
    """The validation record (msff/validation schema 2) of a gpu-check results document.

    ``units``: per unit (``triton``, ``cuda:<variant>``) its status (passed / failed / timeout /
    crashed / skipped), the reason, parity case counts and sanitizer results. ``entries``: per unit,
    dtype and mode (``variant`` set for CUDA units), parity = every parity case of that unit and
    dtype passed (block in that mode, op-level cases) and the unit neither hung nor crashed;
    speedup = the smallest reference/unit time ratio over the timed LKAM-block shapes (None when
    not timed)."""
    from msff.backend import RECORD_SCHEMA

    env = doc["environment"]
    units_doc = doc.get("units") or {}
    units = {u for u in units_doc} | {_row_unit(r) for r in doc["parity"]} | {
        r["provider"] for r in doc["bench"] if unit_backend(r["provider"]) in FUSED}
    entries = []
    for u in sorted((u for u in units if unit_backend(u) in FUSED), key=_unit_order):
        b, v = unit_backend(u), unit_variant(u)
        died = units_doc.get(u, {}).get("status") in ("timeout", "crashed")
        for dtype in ("bfloat16", "float16", "float32"):
            for mode in ("train", "eval"):
                par = [r for r in doc["parity"] if _row_unit(r) == u and r["dtype"] == dtype
                       and (r["mode"] == mode or r["kind"] == "op")]
                bench = [r for r in doc["bench"] if r["kind"] == "block" and r["dtype"] == dtype
                         and r["mode"] == mode and r["provider"] == u and r.get("median_s")]
                if not par and not bench:
                    continue
                ratios = [r.get("ratio_vs_eager") for r in bench]
                speedup = min(ratios) if ratios and all(ratios) else None
                e = {"backend": b, "dtype": dtype, "mode": mode,
                     "parity": bool(par) and all(r["parity"] for r in par) and not died,
                     "parity_cases": len(par), "speedup": speedup,
                     "timed": sorted({r["case"] for r in bench})}
                if v is not None:
                    e["variant"] = v
                entries.append(e)
    keep = ("backend", "variant", "status", "reason", "parity_cases", "parity_failed", "sanitizer",
            "elapsed_s")
    return {
        "schema": RECORD_SCHEMA,
        "created": _now(),
        "gpu": {"name": env.get("gpu") or "cpu-dry-run", "capability": env["capability"],
                "sm_count": env.get("sm_count")},
        "versions": {"msff": env.get("msff"), "torch": env.get("torch"),
                     "cuda": env.get("torch_cuda"), "cudnn": env.get("cudnn"),
                     "triton": env.get("triton")},
        "sources": env["sources"],
        "dry_run": bool(doc.get("dry_run")),
        "units": {u: {k: d.get(k) for k in keep if k in d}
                  for u, d in sorted(units_doc.items(), key=lambda kv: _unit_order(kv[0]))
                  if unit_backend(u) in FUSED},
        "entries": entries,
    }


def format_table(doc: dict, record: Optional[dict] = None) -> str:
    """The short table printed last: each unit's verdict, parity per unit, sanitizer, the block
    timings with ratios, and what the record makes ``auto`` do."""
    lines = [f"gpu-check on {doc['environment'].get('gpu') or 'CPU (dry run)'} "
             f"({doc.get('elapsed_s', 0):.0f} s)"]
    units = doc.get("units") or {}
    if units:
        lines.append("units (status, parity cases failed/run, memcheck, racecheck)")
        for u, d in sorted(units.items(), key=lambda kv: _unit_order(kv[0])):
            san = d.get("sanitizer") or {}
            lines.append(f"  {u:16s} {d['status'].upper():8s} {d.get('parity_failed', 0)}/"
                         f"{d.get('parity_cases', 0):<3} {san.get('memcheck', '-'):14s} "
                         f"{san.get('racecheck', '-')}")
            if d.get("reason"):
                lines.append(f"    {d['reason'][:160]}")
    par: dict = {}
    for r in doc["parity"]:
        key = (_row_unit(r), r["dtype"], r["mode"])
        ok, n = par.get(key, (True, 0))
        par[key] = (ok and r["parity"], n + 1)
    lines.append("parity (unit dtype mode: cases, result)")
    for (b, d, m), (ok, n) in sorted(par.items()):
        lines.append(f"  {b:16s} {d:9s} {m:5s} {n:3d}  {'PASS' if ok else 'FAIL'}")
    fails = [r for r in doc["parity"] if not r["parity"]]
    for r in fails[:10]:
        lines.append(f"    failed: {r['kind']} {r['case']} {_row_unit(r)} {r['dtype']} "
                     f"{r['mode']}: {r.get('error') or ', '.join(r.get('failed', []))}")
    for r in doc["sanitizer"]:
        lines.append(f"  sanitizer {r.get('unit') or r.get('backend', '')} {r.get('tool', '')}: "
                     f"{r['status']}")
    nan = float("nan")
    lines.append("benchmarks (median ms, TFLOP/s, % bf16 peak, x eager, x compile)")
    for r in doc["bench"]:
        if "median_s" not in r:
            lines.append(f"  {r['kind']:5s} {r['case']:5s} {r['mode']:5s} {r['dtype']:8s} "
                         f"{r['provider']:22s} error: {r.get('error', '')[:60]}")
            continue
        lines.append(
            f"  {r['kind']:5s} {r['case']:5s} {r['mode']:5s} {r['dtype']:8s} {r['provider']:22s}"
            f" {r['median_s'] * 1e3:9.3f} {r.get('tflops', nan):7.1f} {r.get('pct_bf16_peak', nan):5.1f}%"
            f" {r.get('ratio_vs_eager', nan):6.2f}x"
            f" {r.get('ratio_vs_compile', nan):6.2f}x")
    if record is not None:
        lines.append("validation record (what auto will do on this GPU family)")
        for e in record["entries"]:
            sp = f"{e['speedup']:.2f}x" if e["speedup"] else "not timed"
            name = e["backend"] + (f":{e['variant']}" if e.get("variant") else "")
            lines.append(f"  {name:16s} {e['dtype']:9s} {e['mode']:5s} parity "
                         f"{'yes' if e['parity'] else 'NO':3s} speedup {sp}")
        from msff.ops.dispatch import conv_kernel_verdicts

        verdicts = conv_kernel_verdicts([(Path("this-record.json"), record)],
                                        (record["gpu"]["name"], record["gpu"]["capability"]))
        if verdicts["kernel"]:
            lines.append(f"  cuda conv kernel auto sets: {verdicts['kernel']} ({verdicts['why']})")
        elif verdicts["variants"]:
            lines.append(f"  cuda conv kernel: none qualifies ({verdicts['why']})")
    return "\n".join(lines)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # runs the finally blocks that kill the worker process groups


def run(args) -> int:
    """The command: ``--plan``, or a run (GPU or ``--dry-run``); SIGTERM stops it cleanly (the
    worker process groups are killed, the results so far stay written)."""
    if not threading_main():
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    dry = args.dry_run
    variants = tuple(args.variants.split(",")) if args.variants else None
    if args.plan:
        units, _ = sweep_units(FUSED, variants or CONV_VARIANTS, args.capability)
        print(format_plan(plan(units, autotune=not args.no_autotune, dtypes=args.dtypes.split(","),
                               budget_s=args.budget),
                          args.budget, f"gpu-check plan on sm_{args.capability.replace('.', '')}"))
        return 0
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (use --dry-run to exercise the script on CPU, --plan "
              "to see the sections and their time)", file=sys.stderr)
        return 2
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="msff-gpu-check-")) if dry
                           else ROOT / "benchmarks" / "results")
    record_dir = args.record_dir or (out_dir if dry else ROOT / "msff" / "validation")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    gc = GpuCheck(Path(out_dir), dry, args.budget, args.reps if not dry else 2, Path(record_dir),
                  dtypes, autotune=not args.no_autotune, variants=variants)
    if dry:  # the plan of the GPU sweep it stands in for
        units, _ = sweep_units(FUSED, gc.variants, "9.0")
        title = "the GPU sweep this dry run stands in for, on sm_90"
    else:
        units, title = gc.units, f"this run, sm_{gc.doc['environment']['capability'].replace('.', '')}"
    print(format_plan(plan(units, autotune=gc.autotune, sanitizer=dry or gc.tool is not None,
                           dtypes=args.dtypes.split(","), budget_s=args.budget), args.budget, title),
          flush=True)
    gc.sweep()
    record = gc.make_record()
    gc.doc["record"] = record
    gc.write()
    path = Path(record_dir) / f"{gc.slug}-sm{record['gpu']['capability'].replace('.', '')}.json"
    _atomic_json(path, record)
    print()
    print(format_table(gc.doc, record))
    print(f"\nresults: {gc.results_path}\nrecord:  {path}"
          + ("" if dry else "\ncommit the record (and the results) so `auto` can use them"))
    return 0


def sanitize_target(backend: str) -> int:
    """Run under compute-sanitizer: one small training step and one eval step of a block."""
    from msff.models import LKAMBlock

    for cin, cout in ((3, 130), (64, 64)):
        blk = LKAMBlock(cin, cout, kernel_size=15, reduction=8, backend=backend).cuda()
        blk = blk.to(memory_format=torch.channels_last)
        x = torch.randn(1, cin, 19, 23, device="cuda").contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = blk(x)
        y.float().sum().backward()
        blk.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            blk(x)
    torch.cuda.synchronize()
    return 0




def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m msff.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, stand-in units")
    p.add_argument("--plan", action="store_true",
                   help="print the sections of a GPU run and their estimated seconds; run nothing")
    p.add_argument("--capability", default="9.0",
                   help="--plan: the GPU's compute capability (default 9.0, H100/H200)")
    p.add_argument("--out", type=Path, default=None, help="results folder "
                   "(default benchmarks/results; dry run: a temporary folder)")
    p.add_argument("--record-dir", type=Path, default=None,
                   help="where the validation record goes (default msff/validation)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds; later sections are skipped (and listed) past it (default 450)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per provider")
    p.add_argument("--dtypes", default="bfloat16",
                   help="dtypes to benchmark (comma list; bfloat16,float16,float32)")
    p.add_argument("--variants", default=None,
                   help=f"CUDA conv kernel variants to sweep (comma list of {','.join(CONV_VARIANTS)}; "
                   "default all, or MSFF_CUDA_CONV when set)")
    p.add_argument("--no-autotune", action="store_true",
                   help="skip torch.compile max-autotune / freezing (they take minutes)")
    p.add_argument("--sanitize-target", choices=FUSED, help=argparse.SUPPRESS)
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker or args.sanitize_target:
        _exit_with_parent()
        return worker_main(args.worker) if args.worker else sanitize_target(args.sanitize_target)
    bad = [d for d in args.dtypes.split(",") if d not in ("bfloat16", "float16", "float32")]
    if bad:
        p.error(f"--dtypes: {bad} not in bfloat16, float16, float32")
    env_variant = os.environ.get("MSFF_CUDA_CONV", "").strip()
    bad = [v for v in (args.variants.split(",") if args.variants else [env_variant] if env_variant
                       else []) if v not in CONV_VARIANTS]
    if bad:
        p.error(f"--variants / MSFF_CUDA_CONV: {bad} not in {', '.join(CONV_VARIANTS)}")
    if not re.fullmatch(r"\d+\.\d+", args.capability):
        p.error(f"--capability must be major.minor (e.g. 9.0), got {args.capability!r}")
    if args.budget <= RESERVE_S:
        p.error(f"--budget must be more than the {RESERVE_S} s kept for the record")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
