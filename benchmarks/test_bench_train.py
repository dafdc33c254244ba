"""Training-pipeline benchmarks: the data path (read-cached sample → random crop + paper
augmentations → batch) and one optimizer step of a CPU-sized MSFFNet, so the share of the data
path in a training step can be read off (compare the medians).

CPU: ``tiny`` preset, batch 8 of 3×128×128 crops, fp32 NCHW. GPU: ``cpu`` preset (width ×0.25),
batch 8 of 3×256×256 crops, bf16 autocast, channels_last, synchronized.

Run: ``pytest benchmarks/test_bench_train.py --benchmark-only``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msff.data import Augment, SegmentationDataset, collate, find_pairs, write_scene_dataset
from msff.engine import TrainConfig, build_model, segmentation_loss

GPU = torch.cuda.is_available()
CROP = 256 if GPU else 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_scene_dataset(tmp_path_factory.mktemp("bench_scenes"), n=16, size=CROP + 64, seed=0)
    ds = SegmentationDataset(find_pairs(root), crop=CROP, augment=Augment())
    ds.normalization = {"mean": [100.0] * 3, "std": [50.0] * 3}
    return ds


def test_bench_data_batch(benchmark, dataset):
    """8 augmented random crops → one collated batch."""
    state = {"k": 0}

    def batch():
        state["k"] += 1
        return collate([dataset[(i % len(dataset), state["k"] * 8 + i)] for i in range(8)])

    out = benchmark(batch)
    assert out["image"].shape == (8, 3, CROP, CROP)
    benchmark.extra_info.update(crop=CROP, batch=8, device="cpu")


def test_bench_train_step(benchmark, dataset):
    """Forward + BCE + backward + Adam step on one batch."""
    device = torch.device("cuda" if GPU else "cpu")
    cfg = TrainConfig(preset="cpu" if GPU else "tiny")
    torch.manual_seed(0)
    model = build_model(cfg, 3).to(device)
    if GPU:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-6)
    b = collate([dataset[(i, i)] for i in range(8)])
    x, y = b["image"].to(device), b["target"].to(device)
    if GPU:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=GPU):
            logits = model(x)
        loss = segmentation_loss(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if GPU:
            torch.cuda.synchronize()
        return float(loss.detach())

    for _ in range(2):  # warm-up
        step()
    loss = benchmark(step)
    assert np.isfinite(loss)
    benchmark.extra_info.update(preset=cfg.preset, crop=CROP, batch=8, device=str(device),
                                dtype="bf16-autocast" if GPU else "fp32", layout="channels_last" if GPU else "NCHW")
