"""Every GPU launch configuration, exercised in the interpreter.

Under TRITON_INTERPRET the launchers pick few, large programs (the interpreter's cost grows with
the program count), so the configurations a GPU would run — the paper-shape conv tiles (the
8-warp ones included: inductor's flattened-tap conv template is known to miscompile at
num_warps >= 8, pytorch#173068), several pixel / channel blocks, the split-K weight gradient and
the split SE reductions with their second-stage reduction kernels — would go unverified without a
GPU. These tests force those configurations on small problems with the same channel counts and
compare with the reference (tolerance rule of ``ops_testing.py``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from ops_testing import DEVICE, assert_close, disable_tf32, make_layout, randomize_bn

import msff.kernels.lk_conv as klc
import msff.kernels.lkam_se as kse
from msff.models import LKAMBlock
from msff.ops.lk_conv import lk_conv
from msff.ops.lkam import lkam_block

#: the paper's problems (N, C, H, W); every config the launchers choose for them is tested below
PAPER = {"E1": (32, 64, 512, 512), "E2": (32, 128, 256, 256)}


_FWD_CONFIG, _WGRAD_CONFIG = klc.fwd_config, klc.wgrad_config  # before any monkeypatching


def _gpu_fwd(M, cin, cout, pro_bwd=False):
    return _FWD_CONFIG(M, cin, cout, pro_bwd=pro_bwd, interpret=False)


def _gpu_wgrad(M, cin, cout, K, split):
    cfg = _WGRAD_CONFIG(M, cin, cout, K, 132, interpret=False)
    return dict(cfg, SPLIT=split)


def paper_conv_configs():
    """{(kind, C): config} of every conv launch at the paper's shapes (k = 15)."""
    out = {}
    for n, c, h, w in PAPER.values():
        M = n * h * w
        out[("fwd", c)] = _gpu_fwd(M, c, c)
        out[("dgrad", c)] = _gpu_fwd(M, c, c, pro_bwd=True)
        cfg = _WGRAD_CONFIG(M, c, c, 15, 132, interpret=False)
        out[("wgrad", c)] = {k: v for k, v in cfg.items() if k != "SPLIT"}
    return out


@pytest.fixture(autouse=True)
def _ieee_fp32():
    disable_tf32()


def test_paper_configs_include_8_warps_and_wide_k():
    cfgs = paper_conv_configs()
    assert any(c["num_warps"] == 8 for c in cfgs.values())
    for (kind, _), c in cfgs.items():
        if kind != "wgrad":
            assert c["BLOCK_K"] >= 64


@pytest.fixture
def force_gpu_configs(monkeypatch):
    """The launchers choose the GPU configs (with a 3-way weight-gradient split and small
    reduction chunks, so the two-level deterministic reduction runs too)."""
    monkeypatch.setattr(klc, "fwd_config", lambda M, cin, cout, pro_bwd=False, interpret=None,
                        name=None: _gpu_fwd(M, cin, cout, pro_bwd))
    monkeypatch.setattr(klc, "wgrad_config", lambda M, cin, cout, K, sms=132, interpret=None,
                        name=None: _gpu_wgrad(M, cin, cout, K, 3))
    monkeypatch.setattr(klc, "_reduce_cfg", lambda R: (16, 16))


@pytest.mark.parametrize("C", sorted({c for _, c, _, _ in PAPER.values()}))
@pytest.mark.parametrize("along", ["w", "h"])
@pytest.mark.parametrize("features", ["pro_stats", "bias_relu_add"])
def test_lk_conv_paper_configs(force_gpu_configs, C, along, features):
    # paper channel counts (so BLOCK_K / BLOCK_N / TAPS are the paper's), few pixels; H, W odd;
    # at least two M tiles (BLOCK_M = 256), the last one partial
    N, H, W, k = 2, 5, 27, 15
    assert N * H * W > _gpu_fwd(N * H * W, C, C)["BLOCK_M"]
    g = dict(device=DEVICE, dtype=torch.float32)
    x = make_layout(torch.randn(N, C, H, W, **g), "channels_last").requires_grad_()
    wshape = (C, C, 1, k) if along == "w" else (C, C, k, 1)
    w = (torch.randn(wshape, **g) / (C * k) ** 0.5).requires_grad_()
    kw = {}
    if features == "pro_stats":
        kw = dict(in_scale=(torch.rand(C, **g) + 0.5).requires_grad_(),
                  in_shift=torch.randn(C, **g).requires_grad_(), stats=True)
    else:
        kw = dict(bias=torch.randn(C, **g).requires_grad_(), relu=True,
                  add=make_layout(torch.randn(N, C, H, W, **g), "channels_last").requires_grad_())
    inputs = [x, w] + [v for v in kw.values() if torch.is_tensor(v)]
    res = {}
    for backend in ("triton", "reference"):
        y, s, q = lk_conv(x, w, backend=backend, **kw)
        gen = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=gen).to(y)).sum()
        if kw.get("stats"):
            loss = loss + (s * torch.randn(s.shape, generator=gen)).sum() + 0.1 * q.sum()
        res[backend] = (y, s, q, torch.autograd.grad(loss, inputs))
    (y, s, q, gr), (yr, sr, qr, grr) = res["triton"], res["reference"]
    assert_close(y, yr, "y")
    assert_close(s, sr, "ch_sum")
    assert_close(q, qr, "ch_sumsq")
    for i, (a, b) in enumerate(zip(gr, grr, strict=True)):
        assert_close(a, b, f"grad {i}")


SE_CONFIGS = {
    # many small programs; SE reductions split in 16-pixel chunks
    "split": dict(se=(16, 16, 4), se_split=16, shape=(18, 20, 3, 2, 5, 7)),
    # the GPU defaults
    "gpu-default": dict(se=(64, 64, 4), se_split=64, shape=(20, 36, 7, 2, 11, 13)),
}


@pytest.mark.parametrize("cfg", list(SE_CONFIGS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_with_forced_launch_config(monkeypatch, force_gpu_configs, cfg, train):
    c = SE_CONFIGS[cfg]
    monkeypatch.setattr(kse, "_blocks", lambda HW, C: c["se"])
    monkeypatch.setattr(kse, "_split", lambda *a: c["se_split"])
    monkeypatch.setattr(kse, "_apply_warps", lambda w: 8)  # se_apply's GPU warps
    cin, cout, k, N, H, W = c["shape"]
    blk = randomize_bn(LKAMBlock(cin, cout, kernel_size=k, reduction=8)).to(DEVICE).train(train)
    fused, ref = copy.deepcopy(blk), copy.deepcopy(blk)
    x = make_layout(torch.randn(N, cin, H, W, device=DEVICE), "channels_last")
    xf, xr = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y = lkam_block(fused, xf, backend="triton")
    yr = ref.forward_reference(xr)
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    assert_close(y, yr, "out")
    assert_close(xf.grad, xr.grad, "grad x")
    for (n, p), (_, pr) in zip(fused.named_parameters(), ref.named_parameters(), strict=True):
        assert_close(p.grad, pr.grad, f"grad {n}")
    for (n, b), (_, br) in zip(fused.named_buffers(), ref.named_buffers(), strict=True):
        assert_close(b.double(), br.double(), f"buffer {n}")


# every autotuning candidate (the 8-warp ones included), pinned through MSFF_TRITON_CONFIG as a
# user would pin them; C = 128 so the 128-wide N tile is a real tile
CANDIDATE_CASES = list(zip(klc.FWD_CANDIDATES, list(klc.WGRAD_CANDIDATES) * 2, strict=False))


@pytest.mark.parametrize("fwd,wgrad", CANDIDATE_CASES)
def test_every_autotune_candidate(monkeypatch, fwd, wgrad):
    assert {f for f, _ in CANDIDATE_CASES} == set(klc.FWD_CANDIDATES)
    assert {w for _, w in CANDIDATE_CASES} == set(klc.WGRAD_CANDIDATES)
    monkeypatch.setenv(klc.CONFIG_ENV, f"fwd={fwd},wgrad={wgrad}")
    monkeypatch.setattr(klc, "_reduce_cfg", lambda R: (16, 16))  # two-level reductions too
    assert klc.fwd_config(1000, 128, 128)["name"] == fwd
    assert klc.wgrad_config(1000, 128, 128, 15)["name"] == wgrad
    N, C, H, W, k = 2, 128, 3, 29, 15
    g = dict(device=DEVICE, dtype=torch.float32)
    x = make_layout(torch.randn(N, C, H, W, **g), "channels_last").requires_grad_()
    w = (torch.randn(C, C, 1, k, **g) / (C * k) ** 0.5).requires_grad_()
    kw = dict(in_scale=(torch.rand(C, **g) + 0.5).requires_grad_(),
              in_shift=torch.randn(C, **g).requires_grad_(), stats=True)
    inputs = [x, w, kw["in_scale"], kw["in_shift"]]
    res = {}
    for backend in ("triton", "reference"):
        y, s, q = lk_conv(x, w, backend=backend, **kw)
        gen = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=gen).to(y)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=gen)).sum() + 0.1 * q.sum()
        res[backend] = (y, s, q, torch.autograd.grad(loss, inputs))
    (y, s, q, gr), (yr, sr, qr, grr) = res["triton"], res["reference"]
    assert_close(y, yr, "y")
    assert_close(s, sr, "ch_sum")
    assert_close(q, qr, "ch_m2")
    for i, (a, b) in enumerate(zip(gr, grr, strict=True)):
        assert_close(a, b, f"grad {i}")
    # eval: bias + relu + add + the pooled epilogue
    with torch.no_grad():
        b, add = torch.randn(C, **g), torch.randn(N, C, H, W, **g)
        yt, _, _, pt = lk_conv(x, w, b, add=add, relu=True, pool=True, backend="triton")
        yr, _, _, pr = lk_conv(x, w, b, add=add, relu=True, pool=True, backend="reference")
    assert_close(yt, yr, "eval y")
    assert_close(pt, pr, "pooled")


def test_config_pin_and_autotune_choice(monkeypatch):
    import triton.testing

    monkeypatch.setenv(klc.CONFIG_ENV, "fwd=nope")
    with pytest.raises(ValueError, match="MSFF_TRITON_CONFIG: unknown fwd config 'nope'"):
        klc.fwd_config(100, 64, 64)
    monkeypatch.setenv(klc.CONFIG_ENV, "fwd")
    with pytest.raises(ValueError, match="expected 'fwd=NAME'"):
        klc.config_override("fwd")
    monkeypatch.delenv(klc.CONFIG_ENV)
    # the autotuner (GPU only) times each candidate once per key and keeps the fastest
    monkeypatch.setattr(klc, "triton_interpret", lambda: False)
    monkeypatch.setattr(klc, "_TUNED", {})
    cost = {"m256n64k64w8s3": 3.0, "m128n64k64w4s4": 1.0, "m128n128k64w8s3": 2.0}
    calls = []

    def fake_bench(fn, warmup=0, rep=0):
        return fn()

    def run(name):
        calls.append(name)
        return cost[name]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    key = ("fwd", 0, torch.bfloat16, 10)
    assert klc.choose_config("fwd", key, run, klc.FWD_CANDIDATES) == "m128n64k64w4s4"
    assert klc.choose_config("fwd", key, run, klc.FWD_CANDIDATES) == "m128n64k64w4s4"
    assert len(calls) == 3  # timed once
    monkeypatch.setenv(klc.AUTOTUNE_ENV, "0")
    assert klc.choose_config("fwd", ("other",), run, klc.FWD_CANDIDATES) == "m256n64k64w8s3"
    monkeypatch.setenv(klc.CONFIG_ENV, "fwd=m128n128k64w8s3")
    assert klc.choose_config("fwd", key, run, klc.FWD_CANDIDATES) == "m128n128k64w8s3"
    assert len(calls) == 3


def test_autotune_skips_candidates_that_do_not_fit_in_shared_memory(monkeypatch):
    # fp32 tiles on H100/H200 (227 KB per block): m256n64k64w8s3 needs 240 KB; the launch raises
    # Triton's OutOfResources before the kernel runs, and the autotuner times the others
    import triton.testing
    from triton.runtime.errors import OutOfResources

    monkeypatch.delenv(klc.CONFIG_ENV, raising=False)
    monkeypatch.delenv(klc.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(klc, "triton_interpret", lambda: False)
    monkeypatch.setattr(klc, "_TUNED", {})
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup=0, rep=0: fn())
    too_big = {"m256n64k64w8s3", "m128n128k64w8s3"}

    def run(name):
        if name in too_big:
            raise OutOfResources(245760, 232448, "shared memory")
        return {"m128n64k64w4s4": 1.0}[name]

    assert klc.choose_config("fwd", ("fwd", 0, torch.float32, 1), run,
                             klc.FWD_CANDIDATES) == "m128n64k64w4s4"
    too_big |= set(klc.FWD_CANDIDATES)  # none fits: the first refusal is the error
    with pytest.raises(OutOfResources, match="shared memory"):
        klc.choose_config("fwd", ("fwd", 0, torch.float32, 2), run, klc.FWD_CANDIDATES)


def test_dtype_defaults():
    # fp32 weight gradients default to the 256-wide N tile (the 512-wide one spilled 36 B on
    # sm_80); everything else to the first candidate; a pin overrides both
    assert klc.default_config_name("wgrad", torch.float32) == "n256k64w8"
    assert klc.default_config_name("wgrad", torch.bfloat16) == next(iter(klc.WGRAD_CANDIDATES))
    assert klc.default_config_name("fwd", torch.float32) == next(iter(klc.FWD_CANDIDATES))
    assert klc._ordered("wgrad", torch.float32, klc.WGRAD_CANDIDATES)[0] == "n256k64w8"
