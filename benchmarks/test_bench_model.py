"""Model-level benchmarks: MSFFNet forward and forward+backward, providers side by side.

Providers: ``reference`` (eager; cuDNN with ``cudnn.benchmark=True`` on GPU), ``reference+compile``
(torch.compile of the reference model), and the fused ``triton`` / ``cuda`` backends where they can
run (GPU). Shapes: on CPU the ``cpu`` preset (width ×0.25) at 1×3×256×256 (forward) and
2×3×128×128 (forward+backward); on GPU the paper's width at 8×3×512×512, bf16 autocast,
channels_last. Every GPU measurement synchronizes; the reported statistic is the median.

Run: ``pytest benchmarks --benchmark-only`` (ratios: compare the medians of one group).
"""
from __future__ import annotations

import pytest
import torch

from msff import MSFFNet
from msff.backend import resolve_backend

GPU = torch.cuda.is_available()
PROVIDERS = ["reference", "reference+compile", "triton", "cuda"]


def _setup(provider: str, train: bool):
    if GPU:
        torch.backends.cudnn.benchmark = True
        model = MSFFNet().cuda().to(memory_format=torch.channels_last)
        x = torch.randn(8, 3, 512, 512, device="cuda").to(memory_format=torch.channels_last)
        dtype, layout = "bf16-autocast", "channels_last"
    else:
        model = MSFFNet(width_multiplier=0.25)
        x = torch.randn(2 if train else 1, 3, 128 if train else 256, 128 if train else 256)
        dtype, layout = "fp32", "NCHW"
    backend = "reference" if provider.startswith("reference") else provider
    try:
        resolve_backend(backend, x)
    except Exception as e:  # noqa: BLE001 - a provider that cannot run here is skipped, with why
        pytest.skip(f"{provider}: {e}")
    model.set_backend(backend).train(train)
    fn = model
    if provider == "reference+compile":
        fn = torch.compile(model)
    return model, fn, x, dict(provider=provider, dtype=dtype, layout=layout, shape=list(x.shape),
                              tf32=torch.backends.cudnn.allow_tf32, device=str(x.device))


def _step(fn, model, x, train: bool):
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if GPU else torch.autocast("cpu", enabled=False)
    if train:
        model.zero_grad(set_to_none=True)
        with ctx:
            y = fn(x)
        y.float().mean().backward()
    else:
        with torch.no_grad(), ctx:
            fn(x)
    if GPU:
        torch.cuda.synchronize()


def _run(benchmark, provider: str, train: bool):
    model, fn, x, info = _setup(provider, train)
    for _ in range(2):  # warm-up (compile, cudnn autotune)
        _step(fn, model, x, train)
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    benchmark.extra_info.update(info, mode="forward+backward" if train else "forward")
    benchmark.pedantic(_step, args=(fn, model, x, train), rounds=5 if GPU else 3, iterations=1, warmup_rounds=1)
    if GPU:
        benchmark.extra_info["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20


@pytest.mark.benchmark(group="model-forward")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_model_forward(benchmark, provider):
    _run(benchmark, provider, train=False)


@pytest.mark.benchmark(group="model-forward+backward")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_model_forward_backward(benchmark, provider):
    _run(benchmark, provider, train=True)
