"""Op-level benchmark of ``msff::lk_conv``: one 1×k "same" convolution (k = 15), providers side
by side: ``reference`` (what the model runs without fused ops, in the model's dtype and no extra
dtype copies: ``F.conv2d`` + bias + ReLU for ``forward``, ``F.conv2d`` + training
``batch_norm`` for ``full``; cuDNN autotuned), the same under torch.compile (default,
max-autotune, freezing for forward), ``triton``, ``cuda`` (``forward``: bias + ReLU epilogue,
``full``: forward + backward with the BN statistics epilogue, as in training). GPU: the E1/E2 LKAM
shapes in bf16 channels_last; CPU: a small fp32 shape (triton/cuda/compiled skip there). JSON
results under benchmarks/results/ on a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _util import (
    GPU,
    PROVIDERS,
    ResultLog,
    backend_of,
    compiled,
    measure_memory,
    skip_unless_runs,
    sync,
    uncompile,
)

from msff.ops.lk_conv import lk_conv

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
    if provider == "reference+freezing" and mode != "forward":
        pytest.skip("freezing: inference only")
    if provider in ("reference+max-autotune", "reference+freezing") and not GPU:
        pytest.skip(f"{provider}: measured on GPU only (minutes of autotuning on CPU)")
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
    bias = torch.zeros(cout, device=dev)
    ones = torch.ones(cout, device=dev)

    def model_ref(x, w):
        y = F.conv2d(x, w, padding=(0, k // 2))
        if stats:  # training: the BN that consumes the statistics the fused op computes
            return F.batch_norm(y, None, None, ones.to(y.dtype), bias.to(y.dtype), training=True), None, None
        return torch.relu(y + bias.to(y.dtype).view(1, -1, 1, 1)), None, None

    if backend == "reference":
        op = compiled(model_ref, provider)
    else:
        op = lambda x, w: lk_conv(x, w, None if stats else bias, relu=not stats, stats=stats,  # noqa: E731
                                  backend=backend)

    def run():
        if mode == "forward":
            with torch.no_grad():
                y = op(x, w)
        else:
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
            y, s, q = op(xr, wr)
            loss = y.float().sum() + (s.sum() + q.sum() if s is not None else 0.0)
            loss.backward()
        sync()
        return y

    for _ in range(2):
        run()
    uncompile(provider)
    if GPU and not stats:  # parity once before timing (forward: same math on both sides)
        with torch.no_grad():
            ref = model_ref(x, w)[0].float()
            err = (op(x, w)[0].float() - ref).abs().max().item()
        assert err <= 0.02 * ref.abs().max().item() + 1e-2, f"{provider}: max err {err}"
    benchmark.pedantic(run, rounds=10 if GPU else 3, iterations=1, warmup_rounds=0)
    LOG.add(benchmark, provider=provider, mode=mode, shape=shape_name, dims=[N, cin, cout, H, W, k],
            flops=2 * N * H * W * cin * cout * k * (3 if stats else 1),
            dtype=str(dt).replace("torch.", ""), layout="channels_last" if GPU else "NCHW",
            tf32=torch.backends.cudnn.allow_tf32, device=dev, **measure_memory(run))
