"""Fused ops (torch.library) with their pure-PyTorch references; see msff.backend for dispatch."""


def fuse_for_inference(model):
    raise NotImplementedError("BN folding arrives with the fused LKAM ops (msff.ops.lkam)")
