"""``msff::lk_conv`` (Triton) against its reference: forward, Σy / M2 = Σ(y - ȳ)², and the gradients of every
input, over kernel sizes, both directions, awkward shapes and memory layouts.

Tolerances follow the rule written in ``ops_testing.py``: fp32 ``max|out-ref| <= 1e-5·max|ref| +
1e-6``; fp16/bf16 at most 2× PyTorch's own error against float64 plus ``max(1e-3, 2·eps(dtype))·max|ref|`` (see ops_testing.assert_close_lowp).
Without a GPU these run in the Triton interpreter (TRITON_INTERPRET=1, tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch
from ops_testing import DEVICE, assert_close, assert_close_lowp, disable_tf32, make_layout

from msff.ops.lk_conv import _lk_conv_backward_op, _lk_conv_op, lk_conv, lk_conv_ref


@pytest.fixture(autouse=True)
def _ieee_fp32():
    disable_tf32()


# (N, Cin, Cout, H, W, k, along, features, layout)
CASES = [
    (2, 5, 7, 13, 17, 7, "w", "plain", "contiguous"),
    (2, 5, 7, 13, 17, 7, "h", "pro_stats", "channels_last"),
    (1, 3, 6, 4, 5, 15, "w", "pro_stats", "contiguous"),      # H, W < k, batch 1
    (1, 3, 6, 4, 5, 15, "h", "bias_relu_add", "strided"),
    (2, 6, 9, 3, 11, 3, "w", "all", "contiguous"),
    (2, 70, 20, 5, 6, 3, "h", "pro_stats", "contiguous"),      # Cin > one channel block
    (1, 9, 70, 6, 7, 7, "w", "bias_relu_add", "channels_last"),  # Cout > one channel block
    (3, 4, 5, 9, 2, 15, "h", "all", "strided"),
    (2, 8, 8, 7, 7, 1, "w", "pro_stats", "contiguous"),        # 1×1 (projection shortcut)
]


def _make(N, cin, cout, H, W, k, along, features, layout, dtype=torch.float32):
    g = dict(device=DEVICE, dtype=dtype)
    x = make_layout(torch.randn(N, cin, H, W, **g), layout).requires_grad_()
    wshape = (cout, cin, 1, k) if along == "w" else (cout, cin, k, 1)
    w = (torch.randn(wshape, **g) / (cin * k) ** 0.5).requires_grad_()
    kw = {}
    vec = dict(device=DEVICE, dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    if features in ("pro_stats", "all"):
        kw["in_scale"] = (torch.rand(cin, **vec) + 0.5).requires_grad_()
        kw["in_shift"] = torch.randn(cin, **vec).requires_grad_()
        kw["stats"] = True
    if features in ("bias_relu_add", "all"):
        kw["bias"] = torch.randn(cout, **vec).requires_grad_()
        kw["relu"] = True
        kw["add"] = make_layout(torch.randn(N, cout, H, W, **g), layout).requires_grad_()
    return x, w, kw


def _run(x, w, kw, backend):
    y, s, q = lk_conv(x, w, backend=backend, **kw)
    gen = torch.Generator(device="cpu").manual_seed(0)
    gy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    loss = (y.double() * gy.double()).sum()
    if kw.get("stats"):
        cs = torch.randn(s.shape, generator=gen).to(s.device, s.dtype)
        loss = loss + (s * cs).sum() + 0.1 * (q * cs.abs()).sum()
    inputs = [x, w] + [kw[k] for k in ("bias", "in_scale", "in_shift", "add") if k in kw]
    grads = torch.autograd.grad(loss, inputs)
    return (y, s, q), grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_lk_conv_matches_reference(case):
    x, w, kw = _make(*case)
    (y, s, q), grads = _run(x, w, kw, "triton")
    (yr, sr, qr), grads_r = _run(x, w, kw, "reference")
    assert_close(y, yr, "y")
    assert_close(s, sr, "ch_sum")
    assert_close(q, qr, "ch_sumsq")
    names = ["x", "weight"] + [k for k in ("bias", "in_scale", "in_shift", "add") if k in kw]
    for n, g, gr in zip(names, grads, grads_r, strict=True):
        assert_close(g, gr, f"grad {n}")
    # output layout rule (SPEC.md): channels_last in -> channels_last out
    assert y.stride() == yr.stride()
    if case[-1] == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def _backward64(y, x, w, kw):
    """float64 value of ``_lk_conv_backward`` (SPEC.md) for the upstream gradients of ``_run``,
    given the forward output ``y`` that run saved: the ground truth of that run's backward."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    gy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype).double()
    gs = gq = None
    if kw.get("stats"):
        cs = torch.randn(y.shape[1], generator=gen).to(y.device, torch.float32).double()
        gs, gq = cs, 0.1 * cs.abs()
    d = {k: (v.detach().double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    out = _lk_conv_backward_op(gy, gs, gq, x.detach().double(), w.detach().double(), y.double(),
                               d.get("bias"), d.get("in_scale"), d.get("in_shift"), d.get("add"),
                               d.get("relu", False), [True] * 6, "reference")
    present = [True, True] + [k in kw for k in ("bias", "in_scale", "in_shift", "add")]
    return [o for o, p in zip(out, present, strict=True) if p]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lk_conv_low_precision(dtype):
    x, w, kw = _make(2, 6, 10, 9, 13, 7, "w", "all", "channels_last", dtype)
    (y, s, q), grads = _run(x, w, kw, "triton")
    # float64 ground truth of the forward from the same low-precision inputs
    x64, w64 = x.detach().double(), w.detach().double()
    kw64 = {k: (v.detach().double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    with torch.no_grad():
        y64, s64, q64 = lk_conv(x64, w64, backend="reference", **kw64)
    (ylp, slp, qlp), glp = _run(x, w, kw, "reference")
    assert y.dtype == dtype
    assert_close_lowp(y, y64, ylp, "y")
    assert_close_lowp(s, s64, slp, "ch_sum")
    # The backward's ground truth is the contract's backward in float64 given the y each run
    # saved: with relu + add the ReLU mask is (y - add > 0) on the stored y (SPEC.md), so a
    # relu output below half an ulp of add counts as inactive, and the two runs' convs round
    # differently, so they may drop different elements (a flipped receptive field, seeds 65 bf16 /
    # 67 fp16: notes/flakes.md). The exact-y mask would charge that to the kernel's arithmetic.
    g64, g64lp = _backward64(y, x, w, kw), _backward64(ylp, x, w, kw)
    for i, (g, gr, gl, grl) in enumerate(zip(grads, g64, glp, g64lp, strict=True)):
        assert_close_lowp(g, gr, gl.double() + (gr - grl), f"grad {i}", norm="l2", dtype=dtype)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("features", ["plain", "all"])
def test_lk_conv_opcheck(backend, features):
    x, w, kw = _make(2, 3, 4, 5, 6, 3, "w", features, "contiguous")
    args = (x, w, kw.get("bias"), kw.get("in_scale"), kw.get("in_shift"), kw.get("add"),
            kw.get("relu", False), kw.get("stats", False), backend)
    torch.library.opcheck(_lk_conv_op, args)
    torch.library.opcheck(_lk_conv_op, (*args, True))  # with the pooled epilogue


def test_lk_conv_backward_opcheck():
    x, w, kw = _make(2, 3, 4, 5, 6, 3, "h", "all", "channels_last")
    with torch.no_grad():
        y, _, _ = lk_conv(x, w, backend="triton", **kw)
    gy = torch.randn_like(y)
    gs, gq = torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE)
    args = (gy, gs, gq, x.detach(), w.detach(), y, kw["bias"].detach(), kw["in_scale"].detach(),
            kw["in_shift"].detach(), kw["add"].detach(), True, [True] * 6, "triton")
    torch.library.opcheck(_lk_conv_backward_op, args)
    triton_out = _lk_conv_backward_op(*args)
    ref_out = _lk_conv_backward_op(*args[:-1], "reference")
    for a, b in zip(triton_out, ref_out, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("features", ["all", "pro_stats"])
def test_lk_conv_gradcheck_float64(features):
    # float64 runs through the reference backend: this checks the autograd formula and the
    # backward op (SPEC.md) numerically; the Triton backward is then checked against it above.
    x, w, kw = _make(1, 2, 3, 3, 4, 3, "w", features, "contiguous", torch.float64)
    keys = [k for k in ("bias", "in_scale", "in_shift", "add") if k in kw]

    def f(x, w, *vals):
        d = dict(zip(keys, vals, strict=True))
        y, s, q = lk_conv(x, w, relu=kw.get("relu", False), stats=kw.get("stats", False),
                          backend="reference", **d)
        return (y, s, q) if kw.get("stats") else y

    # keep ReLU inputs away from the kink for finite differences
    with torch.no_grad():
        if "in_shift" in kw:
            kw["in_shift"].add_(torch.sign(kw["in_shift"]) * 0.5)
    assert torch.autograd.gradcheck(f, (x, w, *[kw[k] for k in keys]), atol=1e-6)


def test_lk_conv_errors():
    x = torch.randn(1, 3, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match="4-D"):
        lk_conv(x[0], torch.randn(4, 3, 1, 3, device=DEVICE))
    with pytest.raises(ValueError, match="Cin"):
        lk_conv(x, torch.randn(4, 2, 1, 3, device=DEVICE))
    with pytest.raises(ValueError, match="odd"):
        lk_conv(x, torch.randn(4, 3, 1, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(Cout, Cin, 1, k\)"):
        lk_conv(x, torch.randn(4, 3, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="together"):
        lk_conv(x, torch.randn(4, 3, 1, 3, device=DEVICE), in_scale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        lk_conv(x, torch.randn(4, 3, 1, 3, device=DEVICE, dtype=torch.float16))


def test_lk_conv_torch_compile():
    x, w, kw = _make(2, 4, 5, 6, 7, 7, "h", "all", "contiguous")

    def f(x, w, b, s, t, a):
        y, cs, cq = lk_conv(x, w, b, s, t, a, relu=True, stats=True, backend="triton")
        return (y * 2).sum() + cs.sum() + cq.mean()

    args = (x, w, kw["bias"], kw["in_scale"], kw["in_shift"], kw["add"])
    compiled = torch.compile(f, fullgraph=True)
    # no on-disk caches: AOTAutograd's cache key does not cover the op's Python autograd
    # formula, so a graph compiled before a change of that formula would be reused (seen when
    # the stats became (Σy, M2))
    with torch._inductor.config.patch(force_disable_caches=True):
        loss_c = compiled(*args)
        grads_c = torch.autograd.grad(loss_c, args)
    loss_e = f(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e, strict=True):
        assert_close(a, b)


def test_lk_conv_reference_is_conv2d():
    # the reference itself against plain nn.functional.conv2d + batch-norm style epilogue
    x = torch.randn(2, 3, 6, 5)
    w = torch.randn(4, 3, 7, 1)
    y, s, q, _ = lk_conv_ref(x, w, stats=True)
    want = torch.nn.functional.conv2d(x, w, padding=(3, 0))
    assert_close(y, want)
    assert_close(s, want.sum(dim=(0, 2, 3)))
    assert_close(q, (want - want.mean(dim=(0, 2, 3), keepdim=True)).square().sum(dim=(0, 2, 3)))


def _old_formula_var(y):
    """The variance the kernels computed before (issue 11): per-tile fp32 Σy, Σy² (256-pixel
    tiles), summed in fp64, rounded to fp32, then E[y²] - E[y]²."""
    t = y.reshape(-1, 256)
    s = t.sum(1).double().sum().float().double()
    q = (t * t).sum(1).double().sum().float().double()
    n = y.numel()
    return (q / n - (s / n) ** 2).item()


def _tile_partials(y, tile):
    """What the forward kernel's STATS epilogue writes for one channel, per tile of ``tile``
    pixels (the last one partial), in fp32: K = the tile's rough mean, D = Σ(y - K), M2 =
    Σ(y - K)² - D²/n."""
    n = y.numel()
    rows = -(-n // tile)
    pad = torch.zeros(rows * tile, dtype=y.dtype)
    pad[:n] = y
    ok = (torch.arange(rows * tile) < n).view(rows, tile)
    t = pad.view(rows, tile)
    cnt = ok.sum(1).float()
    k = t.sum(1) / cnt
    dev = torch.where(ok, t - k[:, None], 0.0)
    d = dev.sum(1)
    m2 = dev.square().sum(1) - d * d / cnt
    return torch.stack([k, d, m2])[:, :, None]  # (3, R, 1)


@pytest.mark.parametrize("plan", ["one-level", "two-level"])
def test_bn_variance_large_mean_small_std(monkeypatch, plan):
    """E1-sized channel (32×256×256 pixels) with mean 1e3 and std 1e-2: E[y²] - E[y]² from fp32
    sums loses every digit of the variance; the per-tile (Σy, M2) partials combined with Chan's
    formula (the Triton kernels' path) keep it to 1e-4 relative."""
    import msff.kernels.lk_conv as klc

    if plan == "two-level":
        monkeypatch.setattr(klc, "_reduce_cfg", lambda R: (256, 1024))
    gen = torch.Generator().manual_seed(3)
    n = 32 * 256 * 256 + 77  # + a partial last tile
    y = (1e3 + 1e-2 * torch.randn(n, generator=gen, dtype=torch.float64)).float()
    true_var = y.double().var(unbiased=False).item()
    old = _old_formula_var(y[: n - 77])
    assert abs(old - y[: n - 77].double().var(unbiased=False).item()) > 0.5 * true_var
    part = _tile_partials(y, 256)
    sums = klc.combine_stats(part, n, 256)
    assert sums.shape == (2, 1) and sums.dtype == torch.float32
    assert abs(sums[0, 0].item() - y.double().sum().item()) <= 1e-6 * abs(y.double().sum().item())
    assert abs(sums[1, 0].item() / n - true_var) <= 1e-4 * true_var


def test_lk_conv_stats_large_mean_channel():
    """End to end through the Triton forward (several M tiles): a channel whose outputs sit at
    1e3 ± 5e-3 gets its variance from (ch_sum, ch_m2) to 1e-4 of the float64 variance of y."""
    N, C, H, W, k = 2, 4, 24, 40, 7
    x = torch.randn(N, C, H, W, device=DEVICE)
    w = torch.randn(3, C, 1, k, device=DEVICE) * 1e-3
    bias = torch.tensor([1e3, -5e2, 0.0], device=DEVICE)
    y, s, m2 = lk_conv(x, w, bias, stats=True, backend="triton")
    # statistics of the values the epilogue produced (fp32 y), computed in float64
    y64 = y.double()
    var64 = y64.var(dim=(0, 2, 3), unbiased=False)
    count = N * H * W
    assert torch.allclose((m2.double() / count), var64, rtol=1e-4, atol=0)
    assert torch.allclose(s.double(), y64.sum(dim=(0, 2, 3)), rtol=1e-6, atol=1e-3)
    # the formula it replaced, from correctly rounded fp32 Σy, Σy², is off by far more
    q32 = (y64 * y64).sum(dim=(0, 2, 3)).float().double()
    s32 = y64.sum(dim=(0, 2, 3)).float().double()
    old = q32 / count - (s32 / count) ** 2
    assert (old[0] - var64[0]).abs() > 0.5 * var64[0]


def test_lk_conv_expanded_output_grads():
    # .sum() hands the backward stride-0 expansions for grad_y, grad_sum and grad_sumsq
    x, w, kw = _make(2, 5, 6, 7, 9, 7, "h", "all", "contiguous")
    res = {}
    for backend in ("triton", "reference"):
        y, s, q = lk_conv(x, w, backend=backend, **kw)
        loss = y.sum() + s.sum() + q.sum()
        res[backend] = torch.autograd.grad(loss, [x, w, kw["bias"], kw["in_scale"], kw["in_shift"], kw["add"]])
    for a, b in zip(res["triton"], res["reference"], strict=True):
        assert_close(a, b)


# (N, H, W, k, along): images smaller than, equal to and larger than an M tile, both row orders
POOL_CASES = [(3, 5, 7, 7, "w"), (2, 16, 16, 5, "h"), (2, 13, 29, 15, "w"), (1, 1, 1, 3, "h")]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("block_m", [None, 16, 256])
def test_lk_conv_pool_epilogue(monkeypatch, case, block_m):
    """``pool=True``: the per-image Σ_hw y from the epilogue's (tile, image) partials equals the
    sum of the stored y, for tiles that hold several images, straddle two, or sit inside one."""
    import msff.kernels.lk_conv as klc

    if block_m is not None:
        orig = klc.fwd_config
        monkeypatch.setattr(klc, "fwd_config", lambda *a, **k: dict(orig(*a, **k), BLOCK_M=block_m))
    N, H, W, k, along = case
    x = torch.randn(N, 6, H, W, device=DEVICE).to(memory_format=torch.channels_last)
    w = torch.randn((5, 6, 1, k) if along == "w" else (5, 6, k, 1), device=DEVICE) / (6 * k) ** 0.5
    b = torch.randn(5, device=DEVICE)
    add = torch.randn(N, 5, H, W, device=DEVICE)
    y, _, _, pooled = lk_conv(x, w, b, add=add, relu=True, pool=True, backend="triton")
    assert pooled.shape == (N, 5) and pooled.dtype == torch.float32
    assert_close(pooled, y.double().sum(dim=(2, 3)).float(), "pooled")
    _, _, _, pr = lk_conv(x, w, b, add=add, relu=True, pool=True, backend="reference")
    assert_close(pooled, pr, "pooled vs reference")


def test_lk_conv_pool_gradient():
    # pooled = Σ_hw y, so its gradient is broadcast back onto y (not used by the model, but the
    # op's autograd must be right for every output)
    x, w, kw = _make(1, 2, 3, 3, 4, 3, "w", "plain", "contiguous", torch.float64)

    def f(x, w):
        y, _, _, p = lk_conv(x, w, pool=True, backend="reference")
        return y, p

    assert torch.autograd.gradcheck(f, (x, w), atol=1e-6)
