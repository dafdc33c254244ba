"""The gpu-check sweep over the CUDA conv kernel variants (msff/gpu_check.py) without a GPU: a fake
runner stands in for the worker subprocesses (a variant that hangs, one that crashes, one that fails
parity, variants that pass at different speeds, a sanitizer that finds races), a fake clock for the
budget; the real process handling (hang and crash of a worker) runs on tiny Python scripts."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import msff.ops  # noqa: F401 - registers the probes the tests replace
from msff import backend as B
from msff import gpu_check as gc
from msff.ops import dispatch as D

H200 = ("NVIDIA H200", "9.0")
#: the kernel sources hashes the records carry and the policy sees (fixed: other sessions edit csrc/
#: while these tests run, and a changed hash rightly invalidates a record)
SOURCES = {"triton": "7" * 16, "cuda": "c" * 16}
CASES = [("block", "odd", "bfloat16", "train"), ("block", "odd", "float32", "eval"),
         ("block", "E1", "bfloat16", "train"), ("block", "E1", "bfloat16", "eval"),
         ("op", "E1", "bfloat16", "train")]


def environment():
    import triton

    return {"gpu": "NVIDIA H200", "capability": "9.0", "sm_count": 132, "msff": msff.__version__,
            "torch": torch.__version__, "torch_cuda": "13.0", "triton": triton.__version__,
            "sources": dict(SOURCES), "cuda_conv": []}


import msff  # noqa: E402


@pytest.fixture(autouse=True)
def fixed_sources(monkeypatch):
    monkeypatch.setattr(D, "kernel_sources_hash", SOURCES.get)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeRunner:
    """Answers Jobs as the workers would. ``units``: unit -> behaviour: ("pass", speedup),
    ("fail",), ("hang",), ("crash",); ``races``: units whose racecheck finds hazards. Each job
    advances the clock by ``cost`` seconds (or what the job's timeout allows)."""

    def __init__(self, clock, units, races=(), cost=None):
        self.clock, self.units, self.races = clock, units, set(races)
        self.cost = {"parity": 20, "bench": 30, "sanitize": 30, **(cost or {})}
        self.jobs = []

    def __call__(self, job):
        self.jobs.append(job)
        spent = min(self.cost[job.task], job.timeout_s)
        self.clock.t += spent
        if job.task == "parity":
            return self.parity(job.unit)
        if job.task == "sanitize":
            if job.unit in self.races and job.tool == "racecheck":
                return gc.Outcome("errors", output="RACECHECK SUMMARY: 3 hazards displayed",
                                  returncode=99, elapsed_s=spent)
            return gc.Outcome("ok", output="ERROR SUMMARY: 0 errors", elapsed_s=spent)
        rows = []
        for kind, case, mode, dtype, providers in job.groups:
            for p in providers:
                speed = 1.0 if p in ("reference", "compile") else self.units[p][1]
                rows.append(("bench", dict(kind=kind, case=case, mode=mode, dtype=dtype, provider=p,
                                           median_s=0.1 / speed, parity_vs_reference=True)))
        return gc.Outcome("ok", rows=rows, elapsed_s=spent)

    def parity(self, unit):
        how = self.units[unit][0]
        rows = [("parity", dict(kind=k, case=c, dtype=d, mode=m, parity=not (how == "fail" and i == 2),
                                failed=["grad_x"] if how == "fail" and i == 2 else []))
                for i, (k, c, d, m) in enumerate(CASES)]
        if how == "hang":
            return gc.Outcome("hung", rows=rows[:2], in_progress=dict(
                kind="block", case="E1", dtype="bfloat16", mode="train"),
                reason="no result for 90 s in block E1 train bfloat16 cuda:tc: killed (a hang?)")
        if how == "crash":
            return gc.Outcome("crashed", rows=rows[:1], in_progress=dict(
                kind="block", case="odd", dtype="float32", mode="eval"), returncode=-6,
                reason="signal SIGABRT during block odd eval float32 cuda:tc-cpasync: "
                       "CUDA error: an illegal memory access was encountered")
        return gc.Outcome("ok", rows=rows)


def make_check(tmp_path, runner, clock, units, budget=2000.0, autotune=False):
    return gc.GpuCheck(tmp_path, dry_run=False, budget_s=budget, reps=3, record_dir=tmp_path,
                       dtypes=[torch.bfloat16], autotune=autotune, runner=runner, units=units,
                       environment=environment(), sanitizer_tool="compute-sanitizer", clock=clock)


ALL = ["cuda:generic", "cuda:tc", "cuda:tc-cpasync", "cuda:sm80", "triton"]
BEHAVIOUR = {"triton": ("fail",), "cuda:generic": ("pass", 1.3), "cuda:tc": ("hang",),
             "cuda:tc-cpasync": ("crash",), "cuda:sm80": ("pass", 1.8)}


@pytest.fixture()
def swept(tmp_path):
    clock = Clock()
    runner = FakeRunner(clock, BEHAVIOUR, races={"cuda:sm80"})
    chk = make_check(tmp_path, runner, clock, ALL)
    chk.sweep()
    return chk, runner, chk.make_record()


def test_each_unit_gets_its_verdict_and_reason(swept):
    chk, runner, rec = swept
    assert B.validate_record(rec) is None and rec["schema"] == "msff-validation/2"
    u = rec["units"]
    assert u["cuda:generic"]["status"] == "passed" and u["cuda:sm80"]["status"] == "passed"
    assert u["cuda:tc"]["status"] == "timeout" and "a hang" in u["cuda:tc"]["reason"]
    assert u["cuda:tc-cpasync"]["status"] == "crashed"
    assert "illegal memory access" in u["cuda:tc-cpasync"]["reason"]
    assert u["triton"]["status"] == "failed" and "grad_x" in u["triton"]["reason"]
    # the case a unit died in is a failed parity row; its entries do not pass parity
    died = [r for r in chk.doc["parity"] if r["unit"] == "cuda:tc" and not r["parity"]]
    assert [(r["case"], r["mode"]) for r in died] == [("E1", "train")]
    e = {(x["backend"], x.get("variant"), x["dtype"], x["mode"]): x for x in rec["entries"]}
    assert e[("cuda", "tc", "bfloat16", "train")]["parity"] is False
    assert e[("cuda", "tc", "float32", "eval")]["parity"] is False  # hung later: never trusted
    assert e[("cuda", "sm80", "bfloat16", "train")]["speedup"] == pytest.approx(1.8)
    assert e[("cuda", "generic", "bfloat16", "eval")]["speedup"] == pytest.approx(1.3)
    # only units that passed parity were timed
    timed = {r["provider"] for r in chk.doc["bench"]}
    assert timed == {"reference", "compile", "cuda:generic", "cuda:sm80"}
    # sanitizer: the faster sm80 first (racecheck finds hazards), then generic (clean)
    assert u["cuda:sm80"]["sanitizer"] == {"memcheck": "clean", "racecheck": "errors (3 reported)"}
    assert u["cuda:generic"]["sanitizer"] == {"memcheck": "clean", "racecheck": "clean"}
    # the hung variant is not run under a sanitizer (it would hang again); the crashed one is
    assert u["cuda:tc"]["sanitizer"] == {}
    assert u["cuda:tc-cpasync"]["sanitizer"]["memcheck"] == "clean"
    table = gc.format_table(chk.doc, rec)
    assert "TIMEOUT" in table and "CRASHED" in table
    assert "cuda conv kernel auto sets: generic" in table


def test_sections_run_in_the_planned_order(swept):
    chk, runner, rec = swept
    seq = []
    for j in runner.jobs:
        s = {"parity": "parity", "bench": "bench", "sanitize": "sanitizer"}[j.task]
        if not seq or seq[-1] != s:
            seq.append(s)
    planned = []
    for r in gc.plan(ALL, autotune=False):
        if r["section"] != "environment" and (not planned or planned[-1] != r["section"]):
            planned.append(r["section"])
    assert seq == planned
    assert [j.unit for j in runner.jobs if j.task == "parity"] == ALL
    first_sanitized = [j.unit for j in runner.jobs if j.task == "sanitize"][:4]
    assert first_sanitized == ["cuda:sm80"] * 2 + ["cuda:generic"] * 2  # fastest first


def records_dir(tmp_path, monkeypatch, setter_calls):
    pkg = tmp_path / "records"
    pkg.mkdir(exist_ok=True)
    monkeypatch.setattr(D, "_PACKAGE_RECORDS", pkg)
    monkeypatch.delenv("MSFF_VALIDATION_DIR", raising=False)
    monkeypatch.delenv("MSFF_BACKEND", raising=False)
    monkeypatch.delenv("MSFF_CUDA_CONV", raising=False)
    monkeypatch.setattr(D, "_gpu_info", lambda index: H200)
    monkeypatch.setitem(D._PROBES, "triton", lambda x: None)
    monkeypatch.setitem(D._PROBES, "cuda", lambda x: None)
    monkeypatch.setattr(D, "_CONV_API", {})
    D.register_conv_kernel_setter(gc.CONV_VARIANTS, lambda name: setter_calls.append(name) or "generic")
    B.reload_validation_records()
    return pkg


def cuda_x():
    import types

    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16)


def test_auto_picks_the_fastest_variant_that_passed_parity_and_sanitizer(swept, tmp_path, monkeypatch):
    chk, runner, rec = swept
    calls = []
    pkg = records_dir(tmp_path, monkeypatch, calls)
    (pkg / "h200.json").write_text(json.dumps(rec))
    B.reload_validation_records()
    try:
        d = B.auto_decision("bfloat16", "train", gpu=H200)
        # sm80 is faster but racecheck found hazards: generic (1.3x) is the conv kernel, and the
        # cuda backend is ranked by generic's speedup; triton failed parity
        assert d["cuda_conv"]["kernel"] == "generic"
        assert d["cuda_conv"]["why"].startswith("generic: parity passed, memcheck and racecheck clean")
        assert d["ranked"] == ["cuda"] and "conv kernel generic" in d["why"] and "1.30x" in d["why"]
        assert B.resolve_backend("auto", cuda_x()) == "cuda"
        assert calls == ["generic"]  # set once as the process default
        assert B.resolve_backend("auto", cuda_x()) == "cuda" and calls == ["generic"]
        verdicts = D.conv_kernel_verdicts(D._records(), H200)["variants"]
        assert "racecheck errors" in verdicts["sm80"]["why"]
        assert "parity timeout" in verdicts["tc"]["why"] and "parity crashed" in verdicts["tc-cpasync"]["why"]
    finally:
        B.reload_validation_records()


def test_the_environment_wins_over_the_record(swept, tmp_path, monkeypatch):
    chk, runner, rec = swept
    calls = []
    pkg = records_dir(tmp_path, monkeypatch, calls)
    (pkg / "h200.json").write_text(json.dumps(rec))
    try:
        # a validated variant: the cuda backend is ranked by that variant's entries; no default set
        monkeypatch.setenv("MSFF_CUDA_CONV", "generic")
        B.reload_validation_records()
        assert B.resolve_backend("auto", cuda_x()) == "cuda" and calls == []
        assert B.auto_decision("bfloat16", "train", gpu=H200)["cuda_conv"]["why"].startswith(
            "MSFF_CUDA_CONV=generic is set")
        # a variant the record does not validate: auto does not pick the cuda backend for it
        monkeypatch.setenv("MSFF_CUDA_CONV", "sm80")
        B.reload_validation_records()
        assert B.resolve_backend("auto", cuda_x()) == "reference"
        d = B.auto_decision("bfloat16", "train", gpu=H200)
        assert "cuda conv kernel sm80" in d["why"] and "racecheck" in d["why"]
        # explicitly requested, it still runs (the environment's kernel), and sets nothing
        assert B.resolve_backend("cuda", cuda_x()) == "cuda" and calls == []
    finally:
        B.reload_validation_records()


def test_no_record_changes_nothing(tmp_path, monkeypatch):
    calls = []
    records_dir(tmp_path, monkeypatch, calls)
    try:
        assert B.resolve_backend("auto", cuda_x()) == "reference"
        assert B.resolve_backend("cuda", cuda_x()) == "cuda"  # explicit: the C++ default kernel
        assert calls == []
        assert B.auto_decision("bfloat16", "train", gpu=H200)["cuda_conv"]["kernel"] is None
    finally:
        B.reload_validation_records()


def test_explicit_cuda_backend_gets_the_recorded_kernel(swept, tmp_path, monkeypatch):
    chk, runner, rec = swept
    calls = []
    pkg = records_dir(tmp_path, monkeypatch, calls)
    (pkg / "h200.json").write_text(json.dumps(rec))
    B.reload_validation_records()
    try:
        assert B.resolve_backend("cuda", cuda_x()) == "cuda" and calls == ["generic"]
        # a CPU tensor never touches the CUDA kernel default
        B.reload_validation_records()
        assert B.resolve_backend("auto", torch.randn(1, 2, 3, 3)) == "reference" and calls == ["generic"]
    finally:
        B.reload_validation_records()


def test_schema_1_records_still_load_and_rank_cuda_as_before(tmp_path, monkeypatch):
    import triton

    calls = []
    pkg = records_dir(tmp_path, monkeypatch, calls)
    old = {"schema": "msff-validation/1", "created": "2026-11-30T00:00:00Z",
           "gpu": {"name": "NVIDIA H200", "capability": "9.0"},
           "versions": {"msff": msff.__version__, "torch": torch.__version__,
                        "triton": triton.__version__},
           "sources": dict(SOURCES),
           "entries": [{"backend": "cuda", "dtype": "bfloat16", "mode": "train", "parity": True,
                        "speedup": 1.4}]}
    assert B.validate_record(old) is None
    (pkg / "old.json").write_text(json.dumps(old))
    B.reload_validation_records()
    try:
        assert B.resolve_backend("auto", cuda_x()) == "cuda"
        assert calls == []  # no variants in the record: the C++ default kernel
    finally:
        B.reload_validation_records()


@pytest.mark.parametrize("field, value, why", [
    ("variant", 3, "variant"), ("units", [], "units must be"),
    ("units", {"cuda:tc": {"status": "great"}}, "status"),
    ("units", {"cuda:tc": {"status": "passed", "sanitizer": {"memcheck": 0}}}, "sanitizer"),
])
def test_bad_schema_2_fields_are_named(field, value, why):
    rec = {"schema": B.RECORD_SCHEMA, "gpu": {"name": "x", "capability": "9.0"}, "versions": {},
           "sources": {}, "entries": [{"backend": "cuda", "dtype": "bfloat16", "mode": "train",
                                       "parity": True, "speedup": 1.5, "variant": "tc"}]}
    assert B.validate_record(rec) is None
    if field == "variant":
        rec["entries"][0]["variant"] = value
    else:
        rec[field] = value
    assert why in B.validate_record(rec)


def test_budget_skips_what_does_not_fit(tmp_path):
    clock = Clock()
    runner = FakeRunner(clock, {u: ("pass", 1.0 + i / 10) for i, u in enumerate(ALL)},
                        cost={"parity": 60})
    chk = make_check(tmp_path, runner, clock, ALL, budget=150.0)
    chk.sweep()
    units = chk.doc["units"]
    # 150 s, 60 s per parity worker: generic and tc start (each needs 26 + 15 s), then 30 s are
    # left: tc-cpasync, sm80 and triton (96 + 15 s) are skipped, and every later section
    assert units["cuda:generic"]["status"] == "passed" and units["cuda:tc"]["status"] == "passed"
    assert all(units[u]["status"] == "skipped" and units[u]["reason"] == "budget"
               for u in ("cuda:tc-cpasync", "cuda:sm80", "triton"))
    assert units["cuda:tc"]["sanitizer"] == {"memcheck": "skipped: budget",
                                             "racecheck": "skipped: budget"}
    skipped = [s["what"] for s in chk.doc["skipped"] if s["why"] == "budget"]
    assert "parity cuda:sm80" in skipped and any(s.startswith("bench") for s in skipped)
    assert clock.t <= 150.0 - gc.RESERVE_S  # never started what would end past the reserve
    assert all(j.timeout_s <= 150.0 for j in runner.jobs)
    rec = chk.make_record()
    assert rec["units"]["cuda:sm80"]["status"] == "skipped"
    assert [j.task for j in runner.jobs] == ["parity", "parity"]


def test_a_crashing_bench_provider_is_blamed_and_the_rest_resumed(tmp_path):
    clock = Clock()

    class CrashingBench(FakeRunner):
        def __call__(self, job):
            if job.task == "bench" and any("cuda:tc" in g[4] for g in job.groups):
                out = super().__call__(job)
                rows = [r for r in out.rows if r[1]["provider"] != "cuda:tc"][:1]
                g = job.groups[0]
                return gc.Outcome("crashed", rows=rows, reason="signal SIGSEGV", in_progress=dict(
                    kind=g[0], case=g[1], mode=g[2], dtype=g[3], provider="cuda:tc"))
            return super().__call__(job)

    runner = CrashingBench(clock, {"cuda:generic": ("pass", 1.2), "cuda:tc": ("pass", 2.0)})
    chk = make_check(tmp_path, runner, clock, ["cuda:generic", "cuda:tc"])
    chk.bench_task("block", gc.block_groups(gc.PAPER_BLOCKS, [torch.bfloat16]),
                   ["reference", "cuda:generic", "cuda:tc"])
    rows = chk.doc["bench"]
    assert [r for r in rows if r["provider"] == "cuda:tc"] == [
        r for r in rows if r.get("error")] and len([r for r in rows if r.get("error")]) == 1
    timed = {(r["case"], r["mode"], r["provider"]) for r in rows if r.get("median_s")}
    assert len(timed) == 4 * 2  # every group: reference + generic, cuda:tc excluded after its crash
    assert all(r["ratio_vs_eager"] == pytest.approx(1.2) for r in rows
               if r["provider"] == "cuda:generic")


def test_sweep_units_before_hopper_runs_tc_once():
    units, skipped = gc.sweep_units(("triton", "cuda"), gc.CONV_VARIANTS, "8.0")
    assert units == ["cuda:generic", "cuda:tc", "triton"]
    assert {s["unit"] for s in skipped} == {"cuda:tc-cpasync", "cuda:sm80"}
    units, _ = gc.sweep_units(("cuda",), gc.CONV_VARIANTS, "9.0")
    assert units == [f"cuda:{v}" for v in gc.CONV_VARIANTS]


def test_conv_variants_are_the_cuda_backends():
    from msff.ops import _cuda

    assert set(gc.CONV_VARIANTS) == set(_cuda.CONV_KERNELS)


def test_plan_prints_the_sweep_and_its_estimates(capsys):
    assert gc.main(["--plan"]) == 0
    out = capsys.readouterr().out
    for u in ("cuda:generic", "cuda:tc", "cuda:tc-cpasync", "cuda:sm80", "triton"):
        assert u in out
    assert "sanitizer" in out and "past the budget" in out
    rows = gc.plan([f"cuda:{v}" for v in gc.CONV_VARIANTS] + ["triton"], budget_s=450)
    assert rows[-1]["cum_s"] == sum(r["est_s"] for r in rows) or abs(
        rows[-1]["cum_s"] - sum(r["est_s"] for r in rows)) <= len(rows)
    # the essentials (parity of every unit, block timings, one sanitizer pass) fit 450 s
    essential = [r for r in rows if r["section"] in ("environment", "parity")] + rows[6:8]
    assert all(r["fits"] for r in essential)
    assert gc.main(["--plan", "--capability", "8.0"]) == 0
    assert "cuda:sm80" not in capsys.readouterr().out


def test_bad_variants_are_one_line(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        gc.main(["--plan", "--variants", "tc,fast"])
    assert "fast" in capsys.readouterr().err
    monkeypatch.setenv("MSFF_CUDA_CONV", "fast")
    with pytest.raises(SystemExit):
        gc.main(["--plan"])
    assert "MSFF_CUDA_CONV" in capsys.readouterr().err


# ---- the real process handling, on tiny scripts ---------------------------------------------------
def _script(tmp_path, body):
    events = tmp_path / "events.jsonl"
    events.touch()
    code = textwrap.dedent(f"""
        import json, os, sys, time
        f = open({str(events)!r}, "a")
        def emit(ev):
            f.write(json.dumps(ev) + "\\n"); f.flush()
    """) + textwrap.dedent(body)
    return [sys.executable, "-c", code], events


def test_a_hung_worker_is_killed_and_its_case_named(tmp_path):
    cmd, events = _script(tmp_path, """
        emit({"event": "row", "section": "parity", "row": {"case": "a", "parity": True}})
        emit({"event": "begin", "what": "block E1 train", "row": {"case": "E1"}, "limit_s": 1})
        time.sleep(60)
    """)
    out = gc.run_process(cmd, {}, timeout_s=30, events=events)
    assert out.status == "hung" and "block E1 train" in out.reason and out.elapsed_s < 20
    assert out.rows == [("parity", {"case": "a", "parity": True})]
    assert out.in_progress == {"case": "E1"}


def test_a_crashed_worker_says_how(tmp_path):
    cmd, events = _script(tmp_path, """
        emit({"event": "begin", "what": "op E2 train", "row": {"case": "E2"}, "limit_s": 30})
        print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
        os.abort()
    """)
    out = gc.run_process(cmd, {}, timeout_s=30, events=events)
    assert out.status == "crashed" and "SIGABRT" in out.reason and "illegal memory" in out.reason
    assert out.in_progress == {"case": "E2"}


def test_a_worker_past_its_timeout_is_killed(tmp_path):
    cmd, events = _script(tmp_path, """
        for i in range(100):
            emit({"event": "begin", "what": f"case {i}", "row": {"case": i}, "limit_s": 30})
            time.sleep(0.3)
            emit({"event": "row", "section": "parity", "row": {"case": i, "parity": True}})
    """)
    out = gc.run_process(cmd, {}, timeout_s=1.5, events=events)
    assert out.status == "timeout" and 1 <= len(out.rows) < 100
    cmd, events = _script(tmp_path, 'emit({"event": "end"})')
    assert gc.run_process(cmd, {}, timeout_s=30, events=events).status == "ok"


def test_msff_ops_wires_the_cuda_backends_setter():
    from msff.ops import _cuda

    assert D._CONV_API["set"] is _cuda.set_conv_kernel_default
    assert D._CONV_API["kernels"] == _cuda.CONV_KERNELS


def test_the_record_sets_the_real_process_default(tmp_path, monkeypatch):
    """Through msff.ops._cuda.set_conv_kernel_default (the C++ default, no GPU needed)."""
    from msff.ops import _cuda

    if _cuda.extension_error() is not None:
        pytest.skip(_cuda.extension_error())
    clock = Clock()
    runner = FakeRunner(clock, {"cuda:generic": ("pass", 1.2), "cuda:sm80": ("pass", 1.6)})
    chk = make_check(tmp_path, runner, clock, ["cuda:generic", "cuda:sm80"])
    chk.sweep()
    api = dict(D._CONV_API)
    pkg = records_dir(tmp_path, monkeypatch, [])
    monkeypatch.setattr(D, "_CONV_API", api)  # the real setter
    (pkg / "h200.json").write_text(json.dumps(chk.make_record()))
    B.reload_validation_records()
    before = _cuda.set_conv_kernel_default("generic")
    try:
        assert B.resolve_backend("auto", cuda_x()) == "cuda"
        assert _cuda.conv_kernel() == "sm80"
        monkeypatch.setenv("MSFF_CUDA_CONV", "tc")
        assert _cuda.conv_kernel() == "tc"  # the environment wins
    finally:
        _cuda.set_conv_kernel_default(before)
        B.reload_validation_records()


def test_workers_exit_when_the_check_is_gone(tmp_path):
    import subprocess

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = ("import time, msff.gpu_check as g; g._exit_with_parent(); time.sleep(60)")
    p = subprocess.run([sys.executable, "-c", code], timeout=50,
                       env={**__import__("os").environ, gc.PARENT_ENV: str(gone.pid)})
    assert p.returncode == 3


def test_sanitizer_jobs_run_the_units_variant_without_the_caching_allocator(monkeypatch):
    monkeypatch.setenv("MSFF_CUDA_CONV", "generic")
    r = gc.SubprocessRunner(False, 3, "/opt/cuda/bin/compute-sanitizer")
    cmd, env = r.sanitizer_command(gc.Job("sanitize", unit="cuda:tc", tool="racecheck"))
    assert cmd[:5] == ["/opt/cuda/bin/compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "99"]
    assert cmd[-2:] == ["--sanitize-target", "cuda"]
    assert env["MSFF_CUDA_CONV"] == "tc" and env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    _, env = r.sanitizer_command(gc.Job("sanitize", unit="triton", tool="memcheck"))
    assert "MSFF_CUDA_CONV" not in env


def test_a_worker_that_lost_its_cuda_context_leaves_its_case_pending(tmp_path):
    # what Cases.abort_if_context_lost does after a sticky CUDA error (an illegal address)
    cmd, events = _script(tmp_path, """
        emit({"event": "begin", "what": "block E1 train bfloat16 cuda:tc", "row": {"case": "E1"},
              "limit_s": 30})
        print("CUDA context lost: AcceleratorError: CUDA error: an illegal memory access was "
              "encountered", file=sys.stderr, flush=True)
        os._exit(70)
    """)
    out = gc.run_process(cmd, {}, timeout_s=30, events=events)
    assert out.status == "crashed" and out.in_progress == {"case": "E1"}
    assert out.reason.startswith("exit 70 during block E1 train bfloat16 cuda:tc: CUDA context lost")


def test_the_recorded_kernel_is_set_once_and_traces_as_a_constant(monkeypatch):
    calls = []
    monkeypatch.setattr(D, "_gpu_info", lambda index: H200)
    monkeypatch.setattr(D, "_CONV_API", {"kernels": gc.CONV_VARIANTS,
                                         "set": lambda name: calls.append(name) or "generic"})
    monkeypatch.setattr(D, "_conv_choice", lambda gpu: {"kernel": "tc"})
    monkeypatch.setattr(D, "_CONV_APPLIED", {})
    monkeypatch.delenv("MSFF_CUDA_CONV", raising=False)

    def f(x):
        return x + len(D._recorded_conv_kernel(0))

    g = torch.compile(f, fullgraph=True, backend="eager")
    assert g(torch.zeros(2)).tolist() == [2.0, 2.0] and g(torch.ones(2)).tolist() == [3.0, 3.0]
    assert calls == ["tc"]
