"""``msff::lkam_se`` (Triton) against its reference: output, pooled means, and the gradients of
every input (branches, BN affines, SE weights, residual and its BN affine).

Tolerance rule: see ``ops_testing.py`` (fp32 ``1e-5·max|ref| + 1e-6``; fp16/bf16 at most 2×
PyTorch's own error against float64 plus ``max(1e-3, 2·eps(dtype))·max|ref|`` (see ops_testing.assert_close_lowp)). Interpreted on CPU without a GPU.
"""
from __future__ import annotations

import pytest
import torch
from ops_testing import DEVICE, assert_close, assert_close_lowp, disable_tf32, make_layout

from msff.ops.lkam_se import _lkam_se_backward_op, _lkam_se_op, lkam_se

NAMES = ["fa", "fb", "scale_a", "shift_a", "scale_b", "shift_b", "w1", "b1", "w2", "b2",
         "residual", "res_scale", "res_shift"]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    disable_tf32()


def _make(N, C, H, W, hid, variant, layout, dtype=torch.float32):
    t = dict(device=DEVICE, dtype=dtype)
    v = dict(device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def act():
        return make_layout(torch.randn(N, C, H, W, **t), layout).requires_grad_()

    def vec(pos=False):
        x = torch.rand(C, **v) + 0.5 if pos else torch.randn(C, **v)
        return x.requires_grad_()

    args = dict(fa=act(), w1=(torch.randn(hid, C, **v) / C ** 0.5).requires_grad_(),
                b1=torch.randn(hid, **v).requires_grad_(),
                w2=(torch.randn(C, hid, **v) / hid ** 0.5).requires_grad_(),
                b2=torch.randn(C, **v).requires_grad_(), residual=act())
    if variant in ("train", "train_proj"):
        args.update(fb=act(), scale_a=vec(True), shift_a=vec(), scale_b=vec(True), shift_b=vec())
    if variant == "train_proj":
        args.update(res_scale=vec(True), res_shift=vec())
    return [args.get(n) for n in NAMES]


def _run(args, backend):
    out, pooled = lkam_se(*args, backend=backend)
    gen = torch.Generator(device="cpu").manual_seed(0)
    go = torch.randn(out.shape, generator=gen).to(out.device, torch.float64)
    gp = torch.randn(pooled.shape, generator=gen).to(out.device, torch.float64)
    loss = (out.double() * go).sum() + (pooled.double() * gp).sum()
    inputs = [a for a in args if a is not None]
    return (out, pooled), torch.autograd.grad(loss, inputs)


CASES = [
    (2, 5, 13, 17, 1, "train", "contiguous"),
    (1, 40, 4, 5, 5, "train_proj", "channels_last"),   # batch 1, C not a block multiple
    (2, 8, 3, 2, 2, "eval", "strided"),
    (3, 130, 6, 5, 16, "train", "contiguous"),         # C > one channel block
    (2, 12, 9, 7, 3, "train_proj", "strided"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_lkam_se_matches_reference(case):
    args = _make(*case)
    (out, pooled), grads = _run(args, "triton")
    (out_r, pooled_r), grads_r = _run(args, "reference")
    assert_close(out, out_r, "out")
    assert_close(pooled, pooled_r, "pooled")
    names = [n for n, a in zip(NAMES, args, strict=True) if a is not None]
    for n, g, gr in zip(names, grads, grads_r, strict=True):
        assert_close(g, gr, f"grad {n}")
    assert out.stride() == out_r.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lkam_se_low_precision(dtype):
    args = _make(2, 16, 7, 9, 2, "train_proj", "channels_last", dtype)
    (out, pooled), grads = _run(args, "triton")
    args64 = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    (out64, pooled64), g64 = _run(args64, "reference")
    (outlp, pooledlp), glp = _run(args, "reference")
    assert out.dtype == dtype
    assert_close_lowp(out, out64, outlp, "out")
    assert_close_lowp(pooled, pooled64, pooledlp, "pooled")
    for i, (g, gr, gl) in enumerate(zip(grads, g64, glp, strict=True)):
        assert_close_lowp(g, gr, gl, f"grad {i}", norm="l2", dtype=dtype)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("variant", ["eval", "train_proj"])
def test_lkam_se_opcheck(backend, variant):
    args = _make(2, 6, 4, 5, 2, variant, "contiguous")
    torch.library.opcheck(_lkam_se_op, (*args, backend))


def test_lkam_se_backward_opcheck():
    args = [a.detach() if a is not None else None for a in _make(2, 6, 4, 5, 2, "train_proj", "channels_last")]
    out, pooled = lkam_se(*args, backend="triton")
    bargs = (torch.randn_like(out), torch.randn_like(pooled), pooled, *args)
    torch.library.opcheck(_lkam_se_backward_op, (*bargs, "triton"))
    for a, b in zip(_lkam_se_backward_op(*bargs, "triton"), _lkam_se_backward_op(*bargs, "reference"),
                    strict=True):
        assert_close(a, b)


def test_lkam_se_gradcheck_float64():
    args = _make(2, 3, 2, 3, 2, "train_proj", "contiguous", torch.float64)
    with torch.no_grad():  # keep the BN+ReLU pre-activations away from the kink
        for i in (3, 5):
            args[i].add_(torch.sign(args[i]) * 1.0)
        args[7].add_(torch.sign(args[7]) * 1.0)
    idx = [i for i, a in enumerate(args) if a is not None]

    def f(*vals):
        full = list(args)
        for i, v in zip(idx, vals, strict=True):
            full[i] = v
        return lkam_se(*full, backend="reference")

    assert torch.autograd.gradcheck(f, [args[i] for i in idx], atol=1e-6)


def test_lkam_se_errors():
    args = _make(1, 4, 3, 3, 1, "eval", "contiguous")
    with pytest.raises(ValueError, match="SE weights"):
        bad = list(args)
        bad[6] = torch.randn(1, 5, device=DEVICE)
        lkam_se(*bad)
    with pytest.raises(ValueError, match="together"):
        bad = list(args)
        bad[11] = torch.ones(4, device=DEVICE)
        lkam_se(*bad)
    with pytest.raises(ValueError, match="residual"):
        bad = list(args)
        bad[10] = torch.randn(1, 4, 3, 2, device=DEVICE)
        lkam_se(*bad)


def test_lkam_se_pool_sum_skips_the_pool_pass(monkeypatch):
    """Inference with the squeeze precomputed (by the last conv's epilogue): the Triton op runs
    no pool kernel and gives the output it gives without ``pool_sum``; bad ``pool_sum`` inputs
    are refused with one clear line."""
    import msff.kernels.lkam_se as kse

    args = [a.detach() if a is not None else None
            for a in _make(2, 12, 7, 9, 3, "eval", "channels_last")]
    with torch.no_grad():
        want, want_pooled = lkam_se(*args, backend="triton")
        ref, _ = lkam_se(*args, backend="reference")
        pool_sum = args[0].double().sum(dim=(2, 3)).float()

        def no_pool(*a, **k):
            raise AssertionError("se_pool ran although pool_sum was given")

        monkeypatch.setattr(kse, "se_pool", no_pool)
        out, pooled = lkam_se(*args, backend="triton", pool_sum=pool_sum)
        assert_close(out, want, "out")
        assert_close(out, ref, "out vs reference")
        assert_close(pooled, want_pooled, "pooled")
        # the reference ignores it (it pools itself); the schema accepts it
        torch.library.opcheck(_lkam_se_op, (*args, "triton", pool_sum))
        with pytest.raises(ValueError, match="pool_sum must be"):
            lkam_se(*args, backend="triton", pool_sum=pool_sum[:1])
        fb = args[0].clone()
        with pytest.raises(ValueError, match="only without fb"):
            lkam_se(args[0], fb, *args[2:], backend="triton", pool_sum=pool_sum)
