"""msff run from a source tree with nothing installed, as ``make gpu-check-device`` runs it on the lent
GPU machine (benchmarks/gpu_check_device.sh: ``PYTHONPATH=<repo>``, that machine's own python3,
which holds torch, triton, numpy, tqdm and tabulate but none of msff's other dependencies, and can
install nothing).

* ``kernels/`` must import as ``msff.kernels`` without setup.py's ``package_dir`` mapping (an
  editable install's finder hides a break here: the subprocess drops it);
* the gpu-check path (imports, backend probes, the whole ``--dry-run`` with its worker
  subprocesses) must not need a package that machine lacks: a ``sitecustomize`` on PYTHONPATH makes
  every such import fail, in the workers too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: msff's declared dependencies (pyproject.toml) and extras that are not torch, triton, numpy, tqdm,
#: tabulate or build tools: none of them may be needed to check a GPU.
NOT_ON_THE_DEVICE = (
    "rasterio", "pyproj", "h5py", "jsonargparse", "docstring_parser", "yaml", "matplotlib",
    "onnx", "onnxruntime", "onnxscript", "pyogrio", "torchvision", "segmentation_models_pytorch",
    "pytest_benchmark",
)

_SITECUSTOMIZE = """
import sys

BLOCKED = set({blocked!r})
# an editable install's finder maps msff.kernels; the device has no install
def _module_of(finder):
    return (finder if isinstance(finder, type) else type(finder)).__module__


sys.meta_path[:] = [f for f in sys.meta_path if not _module_of(f).startswith("__editable__")]


class _Blocker:
    # find_spec answers (torch probes modules with importlib.util.find_spec, which must not raise);
    # the import itself fails as a missing module does
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            import importlib.machinery

            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (blocked: not on the GPU machine)",
                                  name=spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Blocker())
"""


def _device_like_env(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=list(NOT_ON_THE_DEVICE)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MSFF_CUDA_CONV")}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{ROOT}"
    return env


def _run(code: str, env: dict, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_kernels_and_the_gpu_check_path_import_from_a_bare_source_tree(tmp_path):
    env = _device_like_env(tmp_path)
    env["TRITON_INTERPRET"] = "1"  # the kernels' import-time choices; no launch happens here
    r = _run(f"""
        import json, sys
        assert not any((f if isinstance(f, type) else type(f)).__module__.startswith("__editable__")
                       for f in sys.meta_path)
        import msff, msff.ops, msff.ops._cuda, msff.gpu_check, msff.models, msff.env
        import msff.kernels.lk_conv, msff.kernels.lkam_se
        from msff.ops import _import_triton_kernels
        from msff.ops.dispatch import kernel_sources_hash
        try:
            import rasterio  # noqa: F401
            blocked = False
        except ModuleNotFoundError:
            blocked = True
        print(json.dumps({{"kernels_path": list(msff.kernels.__path__),
                          "triton_import_error": _import_triton_kernels(),
                          "hash": kernel_sources_hash("triton"), "blocked": blocked,
                          "env_rasterio": msff.env.collect()["rasterio"],
                          "loaded": sorted(m for m in {list(NOT_ON_THE_DEVICE)!r} if m in sys.modules)}}))
        """, env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["blocked"], "the sitecustomize blocker is not active: this test would prove nothing"
    assert [os.path.realpath(p) for p in out["kernels_path"]] == [os.path.realpath(ROOT / "kernels")]
    assert out["triton_import_error"] is None
    from msff.ops.dispatch import kernel_sources_hash

    assert out["hash"] == kernel_sources_hash("triton")  # the record's identity is the same either way
    assert out["env_rasterio"].startswith("not available")
    assert out["loaded"] == []


def test_gpu_check_dry_run_needs_no_package_the_device_lacks(tmp_path):
    env = _device_like_env(tmp_path)
    env.pop("TRITON_INTERPRET", None)  # as the device script does (the dry run stands in for triton)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "msff.gpu_check", "--dry-run", "--out", str(out),
                        "--record-dir", str(out)], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "blocked: not on the GPU machine" not in r.stdout + r.stderr
    doc = json.loads((out / "gpu-check-cpu-dry-run.json").read_text())
    assert doc["dry_run"] and doc["parity"] and doc["bench"]
    assert (out / "cpu-dry-run-sm00.json").is_file()
