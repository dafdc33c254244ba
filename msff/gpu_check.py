"""``make gpu-check`` / ``python -m msff.gpu_check``: the one-shot validation for a machine with an
H100/H200 (any CUDA GPU works; the paper shapes need ~40 GB). Aims to finish in < 8 minutes.

Steps, in order (results JSON rewritten after every case, so a timeout keeps what finished):

1. environment and build state (``make gpu-check`` runs ``make install`` first, which builds the
   CUDA extension);
2. parity of every fused backend (``triton``, ``cuda``) against the reference: the LKAM block at
   the paper's shapes (E1 N=32×64ch×512², E2 N=32×128ch×256², k=15; bf16 autocast,
   channels_last; train: output, input gradient, every parameter gradient and the BN running
   buffers after the step; eval: output) and at small awkward shapes (odd sizes, H/W < k,
   channel counts that are not block multiples, C_out > 64 so every ``num_warps=8`` config of
   the launchers runs, projection shortcut) in bf16, fp16 and fp32; op-level parity of
   ``lk_conv`` and ``lkam_se`` at the paper's shapes;
3. ``compute-sanitizer`` memcheck and racecheck of both fused backends on a small block (when the
   tool is on PATH or under $CUDA_HOME/bin);
4. benchmarks (CUDA events, warm-up, median of ``--reps``): block and op, train and eval, per
   provider — reference eager (cuDNN, ``cudnn.benchmark``), ``torch.compile`` default,
   max-autotune, and for eval max-autotune with freezing (conv–BN folded) — with TFLOP/s, % of
   the bf16 peak, ratios to eager and to compile, peak and saved-activation memory;
5. the validation record ``msff/validation/<gpu>-sm<cc>.json`` (what ``auto`` reads) and a
   short table.

Rule for parity (tests/ops/ops_testing.py's): a fused result's error against an fp32 run of the
reference (TF32 off) is at most 2× the reference's own error in the same precision plus
``max(1e-3, 2·eps)`` of the result's scale; Frobenius norms for gradients and max-abs for
outputs and BN buffers.

``--dry-run`` runs the whole pipeline on CPU with tiny shapes and the ops' reference
implementations standing in for the fused backends, writing to a temporary folder: it proves the
script itself works (tests/test_gpu_check.py) and nothing more.

Example:
    $ make gpu-check                      # or: python -m msff.gpu_check
    $ python -m msff.gpu_check --dry-run --out /tmp/gc
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16 = 989e12
FUSED = ("triton", "cuda")

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


# ---- small utilities --------------------------------------------------------------------------
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


# ---- the check ---------------------------------------------------------------------------------
class GpuCheck:
    """State of one run: results rows, written after each case."""

    def __init__(self, out_dir: Path, dry_run: bool, budget_s: float, reps: int,
                 record_dir: Optional[Path], dtypes, autotune: bool):
        self.dry = dry_run
        self.cuda = torch.cuda.is_available() and not dry_run
        self.dev = "cuda" if self.cuda else "cpu"
        self.out_dir = out_dir
        self.t0 = time.monotonic()
        self.budget = budget_s
        self.reps = reps
        self.dtypes = dtypes
        self.autotune = autotune
        self.record_dir = record_dir
        gpu = torch.cuda.get_device_name(0) if self.cuda else "cpu-dry-run"
        self.slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
        self.results_path = out_dir / f"gpu-check-{self.slug}.json"
        self.doc = {"schema": "msff-gpu-check/1", "started": _now(), "dry_run": dry_run,
                    "environment": self.environment(), "parity": [], "sanitizer": [],
                    "bench": [], "skipped": []}
        self.write()

    # -- bookkeeping
    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def write(self) -> None:
        self.doc["updated"] = _now()
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        _atomic_json(self.results_path, self.doc)

    def add(self, section: str, row: dict) -> None:
        self.doc[section].append(row)
        self.write()
        print(f"[{time.monotonic() - self.t0:6.1f}s] {section}: " + ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("detail",)), flush=True)

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
        # which CUDA conv kernels the "cuda" rows measured (csrc/cuda_ops.cpp: generic, tc,
        # tc-cpasync, sm80): a record of `generic` says nothing about the tensor-core kernels
        env["cuda_conv"] = os.environ.get("MSFF_CUDA_CONV") or "generic"
        # Triton tile configs: pinned (MSFF_TRITON_CONFIG), autotuned per shape, or the defaults;
        # the autotuner's choices are added to the results at the end (doc["triton_tuned"])
        env["triton_config"] = os.environ.get("MSFF_TRITON_CONFIG") or (
            "autotune" if os.environ.get("MSFF_TRITON_AUTOTUNE", "1").strip()
            not in ("0", "false", "no", "off") else "default")
        return env

    def backends(self) -> list[str]:
        """The fused backends to check: those that can run here (dry run: the ops' reference
        implementations, as a stand-in)."""
        if self.dry:
            return ["reference"]
        from msff.backend import backend_status

        st = backend_status("cuda")
        out = [b for b in FUSED if st[b] is None]
        for b in FUSED:
            if st[b] is not None:
                self.doc["skipped"].append({"what": f"backend {b}", "why": st[b]})
        return out

    # -- building blocks
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

    def parity_block(self, name, shape, backend, dtype, train: bool) -> None:
        _, N, cin, cout, H, W, k = shape
        row = dict(kind="block", case=name, backend=backend, dtype=str(dtype)[6:],
                   mode="train" if train else "eval", dims=[N, cin, cout, H, W, k])
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
        except Exception as e:  # a crash is a parity failure, recorded with its message
            row.update(parity=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        self.add("parity", row)

    def parity_ops(self, shape, backend, dtype) -> None:
        """lk_conv (train flags: prologue + stats, backward) and lkam_se at a paper shape."""
        from msff.ops import lk_conv, lkam_se

        name, N, cin, cout, H, W, k = shape
        row = dict(kind="op", case=name, backend=backend, dtype=str(dtype)[6:], mode="train",
                   dims=[N, cout, cout, H, W, k])
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
        except Exception as e:  # a crash (our kernel or the driver) is a recorded parity failure
            row.update(parity=False, error=f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        self.add("parity", row)

    def sanitizer(self, backends) -> None:
        tool = shutil.which("compute-sanitizer") or next(
            (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin"
                              / "compute-sanitizer",) if p.exists()), None)
        if self.dry or tool is None:
            self.add("sanitizer", {"tool": "compute-sanitizer", "status":
                                   "skipped: dry run" if self.dry else "skipped: not found"})
            return
        for b in backends:
            for t in ("memcheck", "racecheck"):
                if self.left() < 60:
                    self.add("sanitizer", {"backend": b, "tool": t, "status": "skipped: budget"})
                    continue
                cmd = [tool, "--tool", t, "--error-exitcode", "99", sys.executable, "-m",
                       "msff.gpu_check", "--sanitize-target", b]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True,
                                       timeout=min(240, self.left()))
                    status = "clean" if r.returncode == 0 else f"errors (exit {r.returncode})"
                    tail = (r.stdout + r.stderr)[-1500:]
                except subprocess.TimeoutExpired:
                    status, tail = "timeout", ""
                self.add("sanitizer", {"backend": b, "tool": t, "status": status,
                                       "detail": tail})

    # -- benchmarks
    def bench_case(self, kind, shape, mode, dtype, providers) -> None:
        """Time every provider of one (kind, shape, mode, dtype) group; parity first."""
        name, N, cin, cout, H, W, k = shape
        train = mode == "train"
        group = dict(kind=kind, case=name, mode=mode, dtype=str(dtype)[6:],
                     dims=[N, cin, cout, H, W, k])
        flops = (block_flops(cin, cout, H, W, N, k, train) if kind == "block"
                 else 2 * N * H * W * cout * cout * k * (3 if train else 1))
        rows = []
        ref_out = None
        for prov in providers:
            if self.left() < 20:
                self.doc["skipped"].append({"what": f"bench {name} {mode} {prov}", "why": "budget"})
                continue
            row = dict(group, provider=prov)
            try:
                step, check, fwd_keep = self._bench_fn(kind, shape, mode, dtype, prov)
                y = check()
                if ref_out is None:
                    ref_out = y
                    row["parity_vs_reference"] = True
                else:
                    row["parity_vs_reference"] = _close(y, ref_out, dtype)
                times = time_fn(step, warmup=2 if not self.dry else 1, reps=self.reps,
                                cuda=self.cuda)
                med = statistics.median(times)
                row.update(median_s=med, tflops=flops / med / 1e12,
                           pct_bf16_peak=100 * flops / med / PEAK_BF16, reps=len(times))
                row.update(self._memory(step, fwd_keep if train else None))
            except Exception as e:  # a crashing provider is recorded in its row; the others still run
                row.update(error=f"{type(e).__name__}: {str(e)[:400]}")
            finally:
                if self.cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
        base = {r["provider"]: r.get("median_s") for r in rows}
        for r in rows:
            if r.get("median_s"):
                if base.get("reference"):
                    r["ratio_vs_eager"] = base["reference"] / r["median_s"]
                for c in ("compile", "compile-max-autotune", "compile-freezing"):
                    if base.get(c):
                        r[f"ratio_vs_{c}"] = base[c] / r["median_s"]
            self.add("bench", r)

    def _bench_fn(self, kind, shape, mode, dtype, prov):
        """(step, check): ``step()`` runs one timed iteration; ``check()`` returns the output."""
        import torch._inductor.config as icfg

        name, N, cin, cout, H, W, k = shape
        train = mode == "train"
        lowp = dtype != torch.float32
        ctx = (lambda: torch.autocast(self.dev, dtype=dtype)) if lowp else (
            lambda: torch.autocast(self.dev, enabled=False))
        backend = "reference" if prov.startswith(("reference", "compile")) else prov
        if self.dry and prov == "fused-standin":
            backend = "reference"
        if kind == "block":
            blk = self.make_block(cin, cout, k)
            blk.backend = backend
            blk.train(train)
            fn = blk
            if self.dry and prov == "fused-standin":
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

    def providers(self, mode, backends) -> list[str]:
        if self.dry:
            return ["reference", "fused-standin"]
        p = ["reference"] + list(backends) + ["compile"]
        if self.autotune:
            p += ["compile-max-autotune"] + (["compile-freezing"] if mode == "eval" else [])
        return p

    # -- record
    def make_record(self) -> dict:
        return make_record(self.doc)


def _close(y, ref, dtype) -> bool:
    y, ref = y.double(), ref.double()
    tol = max(1e-3, 8 * torch.finfo(dtype).eps) * ref.abs().max().item() + 1e-6
    return bool((y - ref).abs().max().item() <= tol * 4)


def make_record(doc: dict) -> dict:
    """The validation record (msff/validation schema) of a gpu-check results document: per
    fused backend, dtype and mode, parity = every parity case of that backend and dtype passed
    (block at paper and small shapes in that mode, op-level cases) and speedup = the smallest
    reference/backend time ratio over the timed LKAM-block shapes (None when not timed)."""
    from msff.backend import RECORD_SCHEMA

    env = doc["environment"]
    entries = []
    backends = sorted({r["backend"] for r in doc["parity"]} | {
        r["provider"] for r in doc["bench"] if r["provider"] in FUSED})
    for b in backends:
        if b not in FUSED:
            continue
        for dtype in ("bfloat16", "float16", "float32"):
            for mode in ("train", "eval"):
                par = [r for r in doc["parity"] if r["backend"] == b and r["dtype"] == dtype
                       and (r["mode"] == mode or r["kind"] == "op")]
                bench = [r for r in doc["bench"] if r["kind"] == "block" and r["dtype"] == dtype
                         and r["mode"] == mode and r["provider"] == b]
                if not par and not bench:
                    continue
                ratios = [r.get("ratio_vs_eager") for r in bench]
                speedup = min(ratios) if ratios and all(ratios) else None
                entries.append({
                    "backend": b, "dtype": dtype, "mode": mode,
                    "parity": bool(par) and all(r["parity"] for r in par),
                    "parity_cases": len(par),
                    "speedup": speedup,
                    "timed": sorted({r["case"] for r in bench}),
                })
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
        "entries": entries,
    }


def format_table(doc: dict, record: Optional[dict] = None) -> str:
    """The short table printed last: parity per backend, the block timings with ratios, and
    what the record makes ``auto`` do."""
    lines = [f"gpu-check on {doc['environment'].get('gpu') or 'CPU (dry run)'} "
             f"({doc.get('elapsed_s', 0):.0f} s)"]
    par: dict = {}
    for r in doc["parity"]:
        key = (r["backend"], r["dtype"], r["mode"])
        ok, n = par.get(key, (True, 0))
        par[key] = (ok and r["parity"], n + 1)
    lines.append("parity (backend dtype mode: cases, result)")
    for (b, d, m), (ok, n) in sorted(par.items()):
        lines.append(f"  {b:9s} {d:9s} {m:5s} {n:3d}  {'PASS' if ok else 'FAIL'}")
    fails = [r for r in doc["parity"] if not r["parity"]]
    for r in fails[:10]:
        lines.append(f"    failed: {r['kind']} {r['case']} {r['backend']} {r['dtype']} "
                     f"{r['mode']}: {r.get('error') or ', '.join(r.get('failed', []))}")
    for r in doc["sanitizer"]:
        lines.append(f"  sanitizer {r.get('backend', '')} {r.get('tool', '')}: {r['status']}")
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
            f" {r.get('ratio_vs_eager', float('nan')):6.2f}x"
            f" {r.get('ratio_vs_compile', float('nan')):6.2f}x")
    if record is not None:
        lines.append("validation record (what auto will do on this GPU family)")
        for e in record["entries"]:
            sp = f"{e['speedup']:.2f}x" if e["speedup"] else "not timed"
            lines.append(f"  {e['backend']:9s} {e['dtype']:9s} {e['mode']:5s} parity "
                         f"{'yes' if e['parity'] else 'NO':3s} speedup {sp}")
    return "\n".join(lines)


def run(args) -> int:
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (use --dry-run to exercise the script on CPU)",
              file=sys.stderr)
        return 2
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="msff-gpu-check-")) if dry
                           else ROOT / "benchmarks" / "results")
    record_dir = args.record_dir or (out_dir if dry else ROOT / "msff" / "validation")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    gc = GpuCheck(Path(out_dir), dry, args.budget, args.reps if not dry else 2, Path(record_dir),
                  dtypes, autotune=not args.no_autotune)
    if gc.cuda:
        torch.backends.cudnn.benchmark = True
    backends = gc.backends()
    paper = DRY_BLOCKS[:1] if dry else PAPER_BLOCKS
    small = DRY_BLOCKS[1:] if dry else SMALL_BLOCKS
    # 2. parity: paper shapes (bf16), then small awkward shapes in every dtype, then ops
    for b in backends:
        for shape in paper:
            for train in (True, False):
                gc.parity_block(shape[0], shape, b, torch.bfloat16, train)
        for shape in small:
            for dt in ((torch.bfloat16,) if dry else (torch.bfloat16, torch.float16, torch.float32)):
                for train in (True, False):
                    gc.parity_block(shape[0], shape, b, dt, train)
        for shape in paper:
            gc.parity_ops(shape, b, torch.bfloat16)
    # 3. sanitizer
    gc.sanitizer(backends)
    # 4. benchmarks: block first (they make the record), then ops
    for dtype in dtypes:
        for mode in ("train", "eval"):
            for shape in paper:
                gc.bench_case("block", shape, mode, dtype, gc.providers(mode, backends))
    for mode in ("train", "eval"):
        for shape in paper:
            gc.bench_case("op", shape, mode, torch.bfloat16, gc.providers(mode, backends))
    # 5. record + table
    record = gc.make_record()
    if "triton" in backends:
        from msff.kernels import lk_conv as klc

        gc.doc["triton_tuned"] = [dict(key=[str(v) for v in k], config=v)
                                  for k, v in klc._TUNED.items()]
    if dry:
        # the stand-in is the ops' reference: label the record so nothing mistakes it for a GPU's
        record["entries"] = [dict(e, backend="triton") for e in _standin_entries(gc.doc)]
    gc.doc["record"] = record
    gc.write()
    path = Path(record_dir) / f"{gc.slug}-sm{record['gpu']['capability'].replace('.', '')}.json"
    _atomic_json(path, record)
    print()
    print(format_table(gc.doc, record))
    print(f"\nresults: {gc.results_path}\nrecord:  {path}"
          + ("" if dry else "\ncommit the record (and the results) so `auto` can use them"))
    return 0


def _standin_entries(doc) -> list[dict]:
    """Dry run: the record entries of the stand-in backend (parity 'reference', bench
    'fused-standin'), so the record writer and the backend policy see a realistic record."""
    d = copy.deepcopy(doc)
    for r in d["parity"]:
        r["backend"] = "triton"
    for r in d["bench"]:
        if r["provider"] == "fused-standin":
            r["provider"] = "triton"
    return make_record(d)["entries"]


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
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, stand-in backend")
    p.add_argument("--out", type=Path, default=None, help="results folder "
                   "(default benchmarks/results; dry run: a temporary folder)")
    p.add_argument("--record-dir", type=Path, default=None,
                   help="where the validation record goes (default msff/validation)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds; later cases are skipped (and listed) past it (default 450)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per provider")
    p.add_argument("--dtypes", default="bfloat16",
                   help="dtypes to benchmark (comma list; bfloat16,float16,float32)")
    p.add_argument("--no-autotune", action="store_true",
                   help="skip torch.compile max-autotune / freezing (they take minutes)")
    p.add_argument("--sanitize-target", choices=FUSED, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sanitize_target:
        return sanitize_target(args.sanitize_target)
    bad = [d for d in args.dtypes.split(",") if d not in ("bfloat16", "float16", "float32")]
    if bad:
        p.error(f"--dtypes: {bad} not in bfloat16, float16, float32")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
