"""LKAM block benchmarks: providers side by side (reference eager with cuDNN autotuning,
reference under torch.compile, triton, cuda), modes ``forward`` (inference: eval, no grad),
``backward`` (training backward alone) and ``full`` (training forward + backward); peak memory and
the activation memory a training forward keeps for backward.

Shapes: on GPU the paper's E1 (N=32, 64 ch, 512²) and E2 (N=32, 128 ch, 256²) LKAM blocks
(k = 15, SE r = 8), bf16 autocast, channels_last; on CPU a small fp32 NCHW block so the suite runs
everywhere (the triton/cuda providers skip there: the Triton interpreter is a verification tool,
not a benchmark). Results: pytest-benchmark's table, plus JSON in benchmarks/results/ on a GPU.

Run: ``pytest benchmarks/test_bench_lkam.py --benchmark-only`` (quote ratios of one group).
"""
from __future__ import annotations

import copy

import pytest
import torch
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

from msff.models import LKAMBlock

# name: (N, C_in, C_out, H, W, k)
SHAPES = (
    {"E1": (32, 64, 64, 512, 512, 15), "E2": (32, 128, 128, 256, 256, 15)}
    if GPU else {"cpu-small": (2, 16, 16, 32, 32, 15)}
)
MODES = ["forward", "backward", "full"]
LOG = ResultLog()


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    LOG.write("lkam_block")


def block_flops(N, cin, cout, H, W, k, train):
    """Conv FLOPs of one block (4 separable 1-D convs + projection); train = fwd + 2 backward."""
    M = N * H * W
    f = 2 * M * k * (cin * cout + cout * cout) * 2 + (2 * M * cin * cout if cin != cout else 0)
    return f * (3 if train else 1)


def _setup(shape_name, provider):
    N, cin, cout, H, W, k = SHAPES[shape_name]
    torch.manual_seed(0)
    dev = "cuda" if GPU else "cpu"
    block = LKAMBlock(cin, cout, kernel_size=k, reduction=8).to(dev)
    if GPU:
        torch.backends.cudnn.benchmark = True
        x = torch.randn(N, cin, H, W, device=dev, dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        block = block.to(memory_format=torch.channels_last)
        dtype, layout = "bf16-autocast", "channels_last"
    else:
        x = torch.randn(N, cin, H, W)
        dtype, layout = "fp32", "NCHW"
    skip_unless_runs(provider, x)
    block.backend = backend_of(provider)
    fn = compiled(block, provider)
    info = dict(provider=provider, shape=shape_name, dims=[N, cin, cout, H, W, k], dtype=dtype,
                layout=layout, tf32=torch.backends.cudnn.allow_tf32, device=str(x.device))
    return block, fn, x, info


def _ctx():
    return torch.autocast("cuda", dtype=torch.bfloat16) if GPU else torch.autocast("cpu", enabled=False)


@pytest.mark.benchmark(group="lkam-block")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_lkam_block(benchmark, shape_name, provider, mode):
    if provider == "reference+freezing" and mode != "forward":
        pytest.skip("freezing folds parameters into constants: inference only")
    if provider in ("reference+max-autotune", "reference+freezing") and not GPU:
        pytest.skip(f"{provider}: measured on GPU only (minutes of autotuning for CPU numbers "
                    "nobody quotes)")
    block, fn, x, info = _setup(shape_name, provider)
    info["flops"] = block_flops(*SHAPES[shape_name], train=mode != "forward")
    block.train(mode != "forward")
    state = copy.deepcopy(block.state_dict())  # BN running stats: restore after measuring
    g = None

    def forward_train():
        xr = x.detach().requires_grad_()
        with _ctx():
            return fn(xr)

    def infer():
        with torch.no_grad(), _ctx():
            y = fn(x)
        sync()
        return y

    def full():
        y = forward_train()
        y.backward(torch.ones_like(y) if g is None else g)
        sync()

    def backward_setup():
        y = forward_train()
        sync()
        return (y,), {}

    def backward(y):
        y.backward(torch.ones_like(y))
        sync()

    if mode == "forward":
        target, kwargs = infer, {}
    elif mode == "full":
        target, kwargs = full, {}
    else:
        target, kwargs = backward, {"setup": backward_setup}
    for _ in range(2):  # warm-up: compile, cuDNN autotuning, Triton JIT
        if mode == "backward":
            backward(*backward_setup()[0])
        else:
            target()
    uncompile(provider)
    if GPU and provider != "reference" and mode == "forward":
        # parity once before timing: the same block and input through the eager reference
        # (training-mode parity, gradients and BN buffers included, is make gpu-check's job)
        with torch.no_grad(), _ctx():
            ref = block.forward_reference(x)
            got = fn(x)
        err = (got.float() - ref.float()).abs().max().item()
        info["parity_max_abs"] = err
        assert err <= 0.05 * ref.float().abs().max().item() + 1e-2, f"{provider}: max err {err}"
    rounds = 10 if GPU else 3
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0, **kwargs)
    mem = {}
    if GPU:
        mem = measure_memory(infer if mode == "forward" else full)
        if mode != "forward":
            held = measure_memory(forward_train)  # saved activations + output of a training forward
            mem["activation_mib"] = held["held_after_mib"]
    block.load_state_dict(state)
    LOG.add(benchmark, mode=mode, **info, **mem)
