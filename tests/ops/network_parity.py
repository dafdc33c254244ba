"""Network-level parity of a fused backend against the reference, with the kinks pinned.

A network's gradient is discontinuous at ReLU kinks and max-pool ties. Two correct fp32
implementations differ by rounding (~1e-7 relative) in every activation, so a pre-activation
that lies within rounding distance of 0 can fall on one side of the kink in the fused run and on
the other in the reference run; the two gradients then differ by O(1) at that element, and in
training mode BN's batch statistics spread that over the whole channel (seen: MSFFNet, one ReLU
input of 1.4e-6 in encoder.e3, fused 0 vs reference 2.3e-6, moved grad x by 1.2e-3 of its norm).
That is not an error of either implementation: the gradient is simply not defined to fp32
precision at such a point.

So the comparison is made on one branch: every ``nn.ReLU`` / ``nn.MaxPool2d`` module that the
fused run executes records its decisions (ReLU mask, max-pool argmax); the fp32 and float64
reference runs are then evaluated with those modules replaced by the same decisions. A decision
may differ between the fused and the unpinned fp32 reference run only where the reference's own
value is within ``KINK_RTOL`` of the kink (else it is reported as an error of the fused backend,
not pinned away). On one branch the fused error must be at most ``1e-4`` of each tensor's norm
plus twice the fp32 reference's own error against float64 (Frobenius norms, as for low
precision in STYLE.md).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from ops_testing import assert_close
from torch import nn

#: a fused/reference decision may differ only where the reference value is this close to the kink
#: (relative to the tensor's max-abs): far beyond fp32 rounding, far below a real error
KINK_RTOL = 1e-4


class PinnedReLU(nn.Module):
    """``relu`` with a given mask: ``z * mask`` (equal to ``relu(z)`` where the mask agrees with
    ``z > 0``; within ``|z|`` elsewhere)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, z):
        return z * self.mask.to(z.dtype)


class PinnedMaxPool2d(nn.Module):
    """``max_pool2d`` with given argmax indices (as ``return_indices=True`` gives them)."""

    def __init__(self, indices: torch.Tensor):
        super().__init__()
        self.indices = indices

    def forward(self, z):
        idx = self.indices
        return z.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


def _decision(module, z):
    if isinstance(module, nn.ReLU):
        return z > 0
    m = module
    return F.max_pool2d(z, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)[1]


def _run(model, backend, train, x, g, pins=None):
    """Forward + backward; returns ([y, grad x, every parameter grad], module, {name: (module,
    input)} of every ReLU / MaxPool2d executed)."""
    m = copy.deepcopy(model).set_backend(backend).train(train)
    if pins:
        for name, decision in pins.items():
            old = m.get_submodule(name)
            new = PinnedReLU(decision) if isinstance(old, nn.ReLU) else PinnedMaxPool2d(decision)
            m.set_submodule(name, new)
    seen, hooks = {}, []
    for name, mod in m.named_modules():
        if isinstance(mod, (nn.ReLU, nn.MaxPool2d)):
            def pre(mod, args, name=name):
                assert name not in seen, f"{name} runs twice in one forward: cannot pin it"
                seen[name] = (mod, args[0].detach().clone())
            hooks.append(mod.register_forward_pre_hook(pre))
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(g)
    for h in hooks:
        h.remove()
    return [y, x.grad] + [p.grad for p in m.parameters()], m, seen


def assert_network_parity(model, backend, train, x, g, rtol=1e-4, other="reference"):
    """``model`` run with ``backend`` against ``other`` (fp32) and a float64 ``other`` run, on the
    branch the fused run took (see the module docstring). Returns the number of decisions that
    had to be pinned (rounding-level flips)."""
    fused, fm, seen_f = _run(model, backend, train, x, g)
    _, _, seen_r = _run(model, other, train, x, g)
    pins, flips = {}, 0
    for name, (mod, z_f) in seen_f.items():
        d_f = _decision(mod, z_f)
        _, z_r = seen_r[name]
        d_r = _decision(mod, z_r)
        differ = d_f != d_r
        if differ.any():
            scale = z_r.abs().max().item()
            if isinstance(mod, nn.ReLU):
                gap = z_r[differ].abs().max().item()
            else:  # the reference's values at the two argmaxes
                zr = z_r.flatten(2)
                gap = (zr.gather(2, d_f.flatten(2)) - zr.gather(2, d_r.flatten(2))).abs().max().item()
            assert gap <= KINK_RTOL * scale, (
                f"{name}: {int(differ.sum())} {type(mod).__name__} decisions differ from the "
                f"reference's up to {gap:.3e} from the kink ({gap / scale:.1e} of the tensor's "
                f"scale {scale:.3e}): not a rounding-level flip"
            )
            flips += int(differ.sum())
        pins[name] = d_f
    ref, rm, _ = _run(model, other, train, x, g, pins)
    # float64 runs on the reference backend only (the fused kernels are fp32/fp16/bf16)
    exact, _, _ = _run(copy.deepcopy(model).double(), "reference", train, x.double(), g.double(), pins)
    names = ["logits", "grad x"] + [f"grad {n}" for n, _ in rm.named_parameters()]
    for name, a, b, e in zip(names, fused, ref, exact, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        b64 = b.double()
        own = (e - b64).norm().item()
        err = (a.double() - b64).norm().item()
        assert err <= rtol * b64.norm().item() + 2 * own + 1e-6, (
            f"{name}: l2 err {err:.3e} > {rtol:g} x {b64.norm().item():.3e} + 2 x own {own:.3e} + 1e-6 "
            f"({flips} rounding-level kink decisions pinned)"
        )
    for (n, b), (_, br) in zip(fm.named_buffers(), rm.named_buffers(), strict=True):
        assert_close(b.double(), br.double(), f"buffer {n}", rtol=rtol)
    return flips
