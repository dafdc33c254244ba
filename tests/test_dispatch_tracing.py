"""The backend policy under tracers: torch.export forces the reference implementation (no custom
kernels in an exported graph), a plain torch.compile does not (the fused backends are what it should
compile). torch 2.11's Dynamo folds ``torch.compiler.is_exporting()`` to True under any
torch.compile, so msff reads the flag behind it (msff.ops.dispatch._is_exporting)."""
from __future__ import annotations

import torch

from msff.ops.dispatch import _forced_reference


class _Probe(torch.nn.Module):
    def forward(self, x):
        return x + (2.0 if _forced_reference() else 1.0)


def test_torch_compile_is_not_export():
    compiled = torch.compile(_Probe(), fullgraph=True, backend="eager")
    assert compiled(torch.zeros(1)).item() == 1.0
    assert _forced_reference() is None


def test_torch_export_forces_the_reference():
    ep = torch.export.export(_Probe(), (torch.zeros(1),))
    assert ep.module()(torch.zeros(1)).item() == 2.0

