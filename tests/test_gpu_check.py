"""``make gpu-check`` (msff/gpu_check.py) without a GPU: the --dry-run pipeline end to end, the
record it writes, and the record/table logic on synthetic results."""
from __future__ import annotations

import json

import pytest
import torch

from msff import backend as B
from msff import gpu_check as gc
from msff.ops import dispatch as D  # the policy state the test mocks


def test_dry_run_end_to_end(tmp_path, capsys):
    assert gc.main(["--dry-run", "--out", str(tmp_path), "--record-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "gpu-check-cpu-dry-run.json").read_text())
    assert doc["dry_run"] and doc["parity"] and doc["bench"]
    assert all(r["parity"] for r in doc["parity"]), [r for r in doc["parity"] if not r["parity"]]
    assert {r["kind"] for r in doc["parity"]} == {"block", "op"}
    assert {r["mode"] for r in doc["parity"] if r["kind"] == "block"} == {"train", "eval"}
    # train parity covered the input gradient, every parameter gradient and the BN buffers
    train = next(r for r in doc["parity"] if r["kind"] == "block" and r["mode"] == "train")
    assert train["checked"] > 20
    timed = [r for r in doc["bench"] if "median_s" in r]
    assert {(r["kind"], r["mode"]) for r in timed} == {(k, m) for k in ("block", "op")
                                                      for m in ("train", "eval")}
    for r in timed:
        assert r["median_s"] > 0 and r["tflops"] > 0 and r["parity_vs_reference"]
        assert r["ratio_vs_eager"] > 0
    rec = json.loads((tmp_path / "cpu-dry-run-sm00.json").read_text())
    assert B.validate_record(rec) is None and rec["dry_run"] is True
    assert {(e["dtype"], e["mode"]) for e in rec["entries"]} == {("bfloat16", "train"),
                                                                ("bfloat16", "eval")}
    assert "validation record" in out and out.rstrip().splitlines()[-1].startswith("record:")
    # the plan of the GPU sweep it stands in for: every CUDA conv variant is a unit
    assert "the GPU sweep this dry run stands in for" in out
    assert all(f"cuda:{v}" in out for v in gc.CONV_VARIANTS)
    # the stand-in units ran in real worker subprocesses, one verdict each
    assert {u: d["status"] for u, d in rec["units"].items()} == {"cuda:tc": "passed",
                                                                 "triton": "passed"}
    assert {e.get("variant") for e in rec["entries"]} == {"tc", None}


def test_no_gpu_without_dry_run_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gc.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bad_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit):
        gc.main(["--dry-run", "--dtypes", "int8"])
    assert "--dtypes" in capsys.readouterr().err


def _doc(capability="9.0"):
    par = lambda b, d, m, ok, kind="block": dict(kind=kind, case="E1", backend=b, dtype=d,  # noqa: E731
                                                 mode=m, parity=ok)
    bench = lambda b, m, ratio, case="E1": dict(kind="block", case=case, mode=m,  # noqa: E731
                                                dtype="bfloat16", provider=b, median_s=1.0,
                                                ratio_vs_eager=ratio)
    return {
        "environment": {"gpu": "NVIDIA H200", "capability": capability, "sm_count": 132,
                        "msff": "0.1.0", "torch": torch.__version__, "torch_cuda": "13.0",
                        "triton": __import__("triton").__version__,
                        "sources": {b: B.kernel_sources_hash(b) for b in ("triton", "cuda")}},
        "parity": [par("triton", "bfloat16", "train", True), par("triton", "bfloat16", "eval", True),
                   par("triton", "bfloat16", "train", True, kind="op"),
                   par("cuda", "bfloat16", "train", True), par("cuda", "bfloat16", "eval", False)],
        "bench": [bench("reference", "train", 1.0), bench("triton", "train", 1.4),
                  bench("triton", "train", 1.2, case="E2"), bench("triton", "eval", 0.9),
                  bench("cuda", "train", 2.0), bench("cuda", "eval", 3.0)],
        "sanitizer": [], "elapsed_s": 1.0,
    }


def test_make_record_takes_all_parity_and_the_smallest_speedup():
    rec = gc.make_record(_doc())
    assert B.validate_record(rec) is None
    e = {(x["backend"], x["dtype"], x["mode"]): x for x in rec["entries"]}
    assert e[("triton", "bfloat16", "train")]["speedup"] == 1.2  # min over E1, E2
    assert e[("triton", "bfloat16", "train")]["parity"] and e[("triton", "bfloat16", "train")]["parity_cases"] == 2
    assert e[("cuda", "bfloat16", "eval")]["parity"] is False
    assert e[("cuda", "bfloat16", "eval")]["speedup"] == 3.0
    table = gc.format_table(_doc(), rec)
    assert "FAIL" in table and "parity NO" in table


def test_a_written_record_drives_auto(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_PACKAGE_RECORDS", tmp_path)
    monkeypatch.delenv("MSFF_VALIDATION_DIR", raising=False)
    monkeypatch.delenv("MSFF_BACKEND", raising=False)
    monkeypatch.setattr(D, "_gpu_info", lambda index: ("NVIDIA H200", "9.0"))
    monkeypatch.setitem(B._PROBES, "triton", lambda x: None)
    monkeypatch.setitem(B._PROBES, "cuda", lambda x: None)
    (tmp_path / "h200.json").write_text(json.dumps(gc.make_record(_doc())))
    B.reload_validation_records()
    try:
        d = lambda mode: B.auto_decision("bfloat16", mode, gpu=("NVIDIA H200", "9.0"))  # noqa: E731
        assert d("train")["ranked"] == ["cuda", "triton"]  # 2.0x beats 1.2x
        assert d("eval")["ranked"] == []  # triton slower, cuda failed parity
        # a dry-run record never counts
        rec = gc.make_record(_doc())
        rec["dry_run"] = True
        (tmp_path / "h200.json").write_text(json.dumps(rec))
        B.reload_validation_records()
        assert d("train")["ranked"] == [] and "dry-run" in d("train")["why"]
    finally:
        B.reload_validation_records()


def test_block_flops():
    # E1 forward: 4 convs of 2*M*k*C*C
    M = 32 * 512 * 512
    assert gc.block_flops(64, 64, 512, 512, 32, 15, False) == 4 * 2 * M * 15 * 64 * 64
    assert gc.block_flops(64, 64, 512, 512, 32, 15, True) == 3 * 4 * 2 * M * 15 * 64 * 64
