"""Package-level contracts: layout, the env report, the public import."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch


def test_public_import_and_default_model_shape_contract():
    import msff
    from msff import MSFFNet

    assert msff.__version__
    m = MSFFNet(width_multiplier=0.0625, lkam_blocks=1)
    assert m(torch.randn(1, 3, 50, 40)).shape == (1, 1, 50, 40)


def test_kernels_is_a_subpackage_not_top_level():
    spec = importlib.util.find_spec("msff.kernels")
    assert spec is not None, "kernels/ must be installed as msff.kernels"
    # a bare top-level `kernels` module must not be importable from an installed msff
    # (the repository root is not on sys.path in a subprocess started elsewhere)
    code = "import importlib.util, sys; print(importlib.util.find_spec('kernels') is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "True"


def test_env_report_runs_and_lists_backends():
    out = subprocess.run(
        [sys.executable, "-m", "msff.env", "--json"], capture_output=True, text=True, cwd="/", check=True
    )
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == {"reference", "triton", "cuda"}
    assert info["backends"]["reference"] == "available"
    if not torch.cuda.is_available():
        assert info["backends"]["cuda"].startswith("unavailable: ")
    text = subprocess.run([sys.executable, "-m", "msff.env"], capture_output=True, text=True, cwd="/", check=True)
    assert "backends:" in text.stdout and "torch" in text.stdout
