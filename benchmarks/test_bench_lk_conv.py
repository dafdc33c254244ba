"""Op-level benchmark of ``msff::lk_conv``: one 1×k "same" convolution (k = 15), providers side
by side: ``reference`` (``F.conv2d``, cuDNN autotuned), ``reference+compile`` (torch.compile of
the same reference op), ``triton``, ``cuda``; modes ``forward`` and ``full`` (forward + backward,
with the BN statistics epilogue as in training). GPU: the E1/E2 LKAM shapes in bf16 channels_last;
CPU: a small fp32 shape (triton/cuda skip there). JSON results under benchmarks/results/ on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from _util import GPU, PROVIDERS, ResultLog, backend_of, measure_memory, skip_unless_runs, sync

from msff.ops.lk_conv import lk_conv, lk_conv_ref

SHAPES = (
    {"E1": (32, 64, 64, 512, 512, 15), "E2": (32, 128, 128, 256, 256, 15)}
    if GPU else {"cpu-small": (2, 16, 16, 32, 32, 15)}
)
LOG = ResultLog()


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    LOG.write("lk_conv")


@pytest.mark.benchmark(group="lk_conv")
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_lk_conv(benchmark, shape_name, provider, mode):
    N, cin, cout, H, W, k = SHAPES[shape_name]
    dev = "cuda" if GPU else "cpu"
    dt = torch.bfloat16 if GPU else torch.float32
    torch.manual_seed(0)
    x = torch.randn(N, cin, H, W, device=dev, dtype=dt)
    if GPU:
        torch.backends.cudnn.benchmark = True
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 1, k, device=dev, dtype=dt) / (cin * k) ** 0.5)
    skip_unless_runs(provider, x)
    backend = backend_of(provider)
    stats = mode == "full"
    if provider == "reference":
        op = lambda x, w: lk_conv_ref(x, w, stats=stats)
    elif provider == "reference+compile":
        op = torch.compile(lambda x, w: lk_conv_ref(x, w, stats=stats))
    else:
        op = lambda x, w: lk_conv(x, w, stats=stats, backend=backend)

    def run():
        if mode == "forward":
            with torch.no_grad():
                y = op(x, w)
        else:
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
            y, s, q = op(xr, wr)
            (y.float().sum() + s.sum() + q.sum()).backward()
        sync()
        return y

    for _ in range(2):
        run()
    benchmark.pedantic(run, rounds=10 if GPU else 3, iterations=1, warmup_rounds=0)
    LOG.add(benchmark, provider=provider, mode=mode, shape=shape_name, dims=[N, cin, cout, H, W, k],
            dtype=str(dt).replace("torch.", ""), layout="channels_last" if GPU else "NCHW",
            tf32=torch.backends.cudnn.allow_tf32, device=dev, **measure_memory(run))
