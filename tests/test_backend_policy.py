"""The backend policy of msff.backend: ``auto`` on a (mocked) CUDA device runs the reference unless
a GPU validation record says a fused backend passed parity and was faster on this GPU family,
dtype and mode; corrupt records are ignored with a warning; explicit choices keep working."""
from __future__ import annotations

import inspect
import json
import types

import pytest
import torch

import msff.ops  # noqa: F401 - registers the probes the tests replace
from msff import backend as B
from msff.backend import resolve_backend
from msff.ops import dispatch as D  # the policy's module: tests patch its private state here

H200 = ("NVIDIA H200", "9.0")


@pytest.fixture()
def records(tmp_path, monkeypatch):
    """An empty package record folder plus MSFF_VALIDATION_DIR=tmp_path; a mocked sm_90 GPU on
    which both fused backends can run. Returns a function writing a record file."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    extra = tmp_path / "extra"
    extra.mkdir()
    monkeypatch.setattr(D, "_PACKAGE_RECORDS", pkg)
    monkeypatch.setenv("MSFF_VALIDATION_DIR", str(extra))
    monkeypatch.delenv("MSFF_BACKEND", raising=False)
    monkeypatch.setattr(D, "_gpu_info", lambda index: H200)
    monkeypatch.setitem(D._PROBES, "triton", lambda x: None)
    monkeypatch.setitem(D._PROBES, "cuda", lambda x: None)
    B.reload_validation_records()

    def write(entries, name="h200.json", capability="9.0", sources=None, **over):
        import triton

        rec = {
            "schema": B.RECORD_SCHEMA,
            "created": "2026-11-30T00:00:00Z",
            "gpu": {"name": "NVIDIA H200", "capability": capability},
            "versions": {"msff": msff.__version__, "torch": torch.__version__,
                         "triton": triton.__version__},
            "sources": sources or {b: B.kernel_sources_hash(b) for b in ("triton", "cuda")},
            "entries": entries,
        }
        rec.update(over)
        (extra / name).write_text(json.dumps(rec))
        B.reload_validation_records()
        return extra / name

    yield write
    B.reload_validation_records()


import msff  # noqa: E402


def cuda_x(dtype=torch.bfloat16):
    """A stand-in for a CUDA tensor: what resolve_backend reads of its input."""
    return types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=dtype)


def entry(backend, speedup, dtype="bfloat16", mode="train", parity=True):
    return {"backend": backend, "dtype": dtype, "mode": mode, "parity": parity, "speedup": speedup}


def test_no_record_auto_on_cuda_is_reference(records):
    assert resolve_backend("auto", cuda_x()) == "reference"
    assert resolve_backend(None, cuda_x(torch.float32), mode="eval") == "reference"
    d = B.auto_decision("bfloat16", "train", gpu=H200)
    assert d["ranked"] == [] and "no validation record for sm_90" in d["why"]


def test_record_picks_the_recorded_fastest(records):
    records([entry("triton", 1.3), entry("cuda", 1.6), entry("triton", 2.0, mode="eval")])
    assert resolve_backend("auto", cuda_x()) == "cuda"
    assert resolve_backend("auto", cuda_x(), mode="eval") == "triton"
    with torch.no_grad():  # the mode follows grad mode by default
        assert resolve_backend("auto", cuda_x()) == "triton"
    # not recorded for fp16: reference
    assert resolve_backend("auto", cuda_x(torch.float16)) == "reference"
    # the fastest cannot run here: the next validated one
    D._PROBES["cuda"] = lambda x: "extension built without CUDA"
    assert resolve_backend("auto", cuda_x()) == "triton"
    d = B.auto_decision("bfloat16", "train", gpu=H200)
    assert d["ranked"] == ["cuda", "triton"] and "1.60x" in d["why"]


def test_autocast_dtype_selects_the_entry(records, monkeypatch):
    records([entry("triton", 1.5, dtype="float16")])
    x = cuda_x(torch.float32)
    assert resolve_backend("auto", x) == "reference"
    # CUDA autocast cannot be entered without a GPU: mock what resolve_backend asks of it
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda dev="cuda": dev == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda dev: torch.float16)
    assert resolve_backend("auto", x) == "triton"


@pytest.mark.parametrize("case, why", [
    (dict(entries=[entry("triton", 1.5, parity=False)]), "failed parity"),
    (dict(entries=[entry("triton", 1.01)]), "speedup 1.01"),
    (dict(entries=[entry("triton", None)]), "speedup None"),
    (dict(entries=[entry("triton", 1.5)], capability="8.0"), "recorded on sm_80"),
    (dict(entries=[entry("triton", 1.5)], sources={"triton": "0" * 16, "cuda": "0" * 16}),
     "kernels changed"),
])
def test_record_that_does_not_validate_keeps_reference(records, case, why):
    records(**case)
    assert resolve_backend("auto", cuda_x()) == "reference"
    assert why in B.auto_decision("bfloat16", "train", gpu=H200)["why"]


def test_triton_record_of_another_triton_version_is_not_trusted(records):
    path = records([entry("triton", 1.5)])
    rec = json.loads(path.read_text())
    rec["versions"]["triton"] = "2.1.0"
    path.write_text(json.dumps(rec))
    B.reload_validation_records()
    assert resolve_backend("auto", cuda_x()) == "reference"
    assert "triton 2.1.0" in B.auto_decision("bfloat16", "train", gpu=H200)["why"]


@pytest.mark.parametrize("text, why", [
    ("{not json", "JSONDecodeError"),
    ('{"schema": "other/9"}', "schema"),
    ("[]", "top level"),
])
def test_corrupt_record_is_ignored_with_a_warning(records, tmp_path, text, why):
    good = records([entry("triton", 1.5)], name="good.json")
    bad = good.parent / "bad.json"
    bad.write_text(text)
    B.reload_validation_records()
    with pytest.warns(RuntimeWarning, match=f"bad.json.*{why}"):
        assert resolve_backend("auto", cuda_x()) == "triton"  # the good record still applies
    bad.unlink()
    good.unlink()
    bad.write_text(text)
    B.reload_validation_records()
    with pytest.warns(RuntimeWarning, match="bad.json"):
        assert resolve_backend("auto", cuda_x()) == "reference"


def test_bad_entry_fields_make_the_record_corrupt():
    base = {"schema": B.RECORD_SCHEMA, "gpu": {"name": "x", "capability": "9.0"}, "versions": {},
            "sources": {}, "entries": [entry("triton", 1.5)]}
    assert B.validate_record(base) is None
    for field, value in (("backend", "rocm"), ("dtype", "int8"), ("mode", "both"),
                         ("parity", "yes"), ("speedup", -1), ("speedup", float("nan"))):
        bad = json.loads(json.dumps(base))
        bad["entries"][0][field] = value
        assert field in B.validate_record(bad)


def test_explicit_backend_and_cpu_inputs_unchanged(records):
    records([entry("triton", 1.5)])
    assert resolve_backend("reference", cuda_x()) == "reference"
    assert resolve_backend("cuda", cuda_x()) == "cuda"  # explicit choice needs no record
    with msff.use_backend("reference"):
        assert resolve_backend("auto", cuda_x()) == "reference"
    # CPU tensors: auto is the reference whatever the records say
    assert resolve_backend("auto", torch.randn(1, 3, 4, 4, dtype=torch.bfloat16)) == "reference"


def test_public_functions_default_to_auto():
    from msff.ops import lk_conv, lk_conv_ref, lkam_block, lkam_se

    for fn in (lk_conv, lkam_se, lkam_block):
        assert inspect.signature(fn).parameters["backend"].default == "auto", fn.__name__
    x, w = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 1, 5)
    y, _, _ = lk_conv(x, w)  # CPU: auto runs the reference
    torch.testing.assert_close(y, lk_conv_ref(x, w)[0])


def test_shipped_records_are_valid():
    for path in sorted(D._PACKAGE_RECORDS.glob("*.json")):
        assert B.validate_record(json.loads(path.read_text())) is None, path


def test_env_says_which_record_applies(records, monkeypatch):
    from msff.env import collect

    records([entry("triton", 1.5)], name="h200.json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = collect()["auto"]
    assert any("h200.json" in r for r in info["records"])
    assert info["decisions"]["bfloat16/train"].startswith("reference (no CUDA GPU")
    on = info["decisions"]["on NVIDIA H200 bfloat16/train"]
    assert on.startswith("triton > reference") and "h200.json" in on
    assert "no validation record" in info["decisions"]["on NVIDIA H200 float32/eval"]
