"""Errors surface: a bug in msff's own modules is never turned into a silent fallback.

* Importing :mod:`msff.ops` is not guarded: an error there propagates to ``import msff``.
* The triton probe treats only a missing triton (ImportError naming triton) as "unavailable";
  any other error importing the kernels is raised under ``MSFF_STRICT_BACKEND=1`` (set for every
  pytest run by the repository's conftest.py), else logged with its traceback, warned, and
  reported as the reason.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import msff.ops
from msff import backend as B
from msff.ops import dispatch as D

KERNEL = "msff.kernels.lkam_se"


class _Raising(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import <name>`` raise ``exc`` (as a module whose code raises would)."""

    def __init__(self, name: str, exc: BaseException):
        self.name, self.exc = name, exc

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.exc


@pytest.fixture()
def fresh_probe(monkeypatch):
    """The triton probe with its import cache emptied and the interpreter on (CPU inputs)."""
    monkeypatch.setattr(msff.ops, "_KERNELS_IMPORT", [])
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def fail_import(name, exc):
        monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(sys, "meta_path", [_Raising(name, exc)] + sys.meta_path)

    return fail_import


def test_the_test_run_is_strict():
    assert os.environ.get(D.STRICT_ENV) == "1" and D.strict_probes()


def test_a_bug_in_the_kernels_surfaces_in_strict_mode(fresh_probe, monkeypatch):
    monkeypatch.setenv(D.STRICT_ENV, "1")
    fresh_probe(KERNEL, RuntimeError("boom in msff.kernels"))
    with pytest.raises(RuntimeError, match="boom in msff.kernels"):
        B.resolve_backend("triton", torch.randn(1, 2, 4, 4))
    assert msff.ops._KERNELS_IMPORT == []  # not cached as "unavailable": it raises every time


def test_a_bug_in_the_kernels_is_loud_outside_strict_mode(fresh_probe, monkeypatch, caplog):
    monkeypatch.setenv(D.STRICT_ENV, "0")
    fresh_probe(KERNEL, RuntimeError("boom in msff.kernels"))
    with caplog.at_level(logging.WARNING, logger="msff.backend"), \
            pytest.warns(RuntimeWarning, match="boom in msff.kernels"), \
            pytest.raises(B.BackendUnavailableError, match="RuntimeError: boom in msff.kernels"):
        B.resolve_backend("triton", torch.randn(1, 2, 4, 4))
    rec = [r for r in caplog.records if "boom in msff.kernels" in r.getMessage()]
    assert rec and rec[0].levelno == logging.WARNING and rec[0].exc_info is not None


def test_an_import_error_of_our_own_module_is_a_bug_not_a_missing_dependency(fresh_probe,
                                                                              monkeypatch):
    monkeypatch.setenv(D.STRICT_ENV, "1")
    fresh_probe(KERNEL, ImportError("cannot import name 'fix_bf17' from 'msff.kernels._common'",
                                    name="msff.kernels._common"))
    with pytest.raises(ImportError, match="fix_bf17"):
        msff.ops._triton_kernels_error()


@pytest.mark.parametrize("strict", ["1", "0"])
def test_a_missing_triton_is_the_expected_failure(fresh_probe, monkeypatch, strict):
    monkeypatch.setenv(D.STRICT_ENV, strict)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` -> ModuleNotFoundError
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an expected failure warns nothing
        why = msff.ops._triton_kernels_error()
        assert why is not None and why.startswith("triton is not importable")
        with pytest.raises(B.BackendUnavailableError, match="triton is not importable"):
            B.resolve_backend("triton", torch.randn(1, 2, 4, 4))
        # auto never needs triton on CPU tensors: the reference runs, no error
        assert B.resolve_backend("auto", torch.randn(1, 2, 4, 4)) == "reference"


def test_a_triton_without_a_name_the_kernels_use_is_expected(fresh_probe, monkeypatch):
    monkeypatch.setenv(D.STRICT_ENV, "1")
    fresh_probe(KERNEL, ImportError("cannot import name 'libdevice' from 'triton.language.extra'",
                                    name="triton.language.extra"))
    why = msff.ops._triton_kernels_error()
    assert "need a triton with 'triton.language.extra'" in why


def test_is_missing_module_matches_the_package_and_its_submodules_only():
    def err(name):
        return ImportError("x", name=name)

    assert D.is_missing_module(err("triton"), "triton")
    assert D.is_missing_module(err("triton.language"), "triton")
    assert not D.is_missing_module(err("triton_helpers"), "triton")
    assert not D.is_missing_module(err("msff.kernels.lk_conv"), "triton")
    assert not D.is_missing_module(ImportError("no name"), "triton")


def test_an_error_raised_inside_msff_ops_surfaces_from_import_msff():
    """Not strict mode-dependent: the ops import is not guarded at all (was: `except Exception`
    in backend._load_ops, turning any bug into a quiet reference fallback)."""
    code = textwrap.dedent("""
        import importlib.machinery, sys

        class Raising:
            def find_spec(self, fullname, path=None, target=None):
                if fullname == "msff.ops._cuda":
                    return importlib.machinery.ModuleSpec(fullname, self)
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise RuntimeError("boom in msff.ops._cuda")

        sys.meta_path.insert(0, Raising())
        import msff
    """)
    env = dict(os.environ, MSFF_STRICT_BACKEND="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0
    assert "RuntimeError: boom in msff.ops._cuda" in r.stderr


def test_the_facade_re_exports_the_policy():
    """msff.backend keeps the names its importers use; they are the dispatch module's objects."""
    from msff import backend_request as R

    for name in ("resolve_backend", "backend_status", "auto_decision", "register_backend_probe",
                 "kernel_sources_hash", "validate_record", "load_validation_records",
                 "reload_validation_records", "validation_dirs", "RECORD_SCHEMA", "MODES",
                 "MIN_SPEEDUP", "_PROBES"):
        assert getattr(B, name) is getattr(D, name), name
    for name in ("use_backend", "current_backend", "BackendUnavailableError", "BACKENDS",
                 "CHOICES"):
        assert getattr(B, name) is getattr(R, name), name
    assert B._check_name(" CUDA ") == "cuda"
    assert B.triton_interpret() == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    # private policy state lives in msff.ops.dispatch only: patching msff.backend for it would
    # silently do nothing, so the facade does not offer the names at all
    for name in ("_gpu_info", "_PACKAGE_RECORDS", "_records"):
        assert not hasattr(B, name)
