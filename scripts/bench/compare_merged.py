#!/usr/bin/env python3
"""Compares two merged models tensor by tensor: names, dtypes, shapes, and the share of
bit-identical elements with the largest difference in units in the last place.
Usage: compare_merged.py A B (directories with model.safetensors or shards + index)"""
import glob
import sys

import torch
from safetensors.torch import load_file


def load(d):
    out = {}
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        out.update(load_file(f))
    return out


a, b = load(sys.argv[1]), load(sys.argv[2])
assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
n = diff = worst = 0
for k in a:
    x, y = a[k], b[k]
    assert x.dtype == y.dtype and x.shape == y.shape, k
    iv = {2: torch.int16, 4: torch.int32}[x.element_size()]
    d = (x.view(iv).long() - y.view(iv).long()).abs()
    n += d.numel()
    diff += int((d != 0).sum())
    worst = max(worst, int(d.max()) if d.numel() else 0)
print(f"{100 * (n - diff) / n:.4f}% of {n} elements bit-identical, max {worst} ulp")
