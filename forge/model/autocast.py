"""Autocast switches that also hold on the meta device, which has no autocast: the memory estimate runs the
model there (forge.train.memory_estimate)."""
from __future__ import annotations

import contextlib

import torch


def autocast_off(device_type: str):
    """A block computed in the tensors' own dtypes whatever the surrounding autocast."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul of `dtype` tensors computes in: the autocast dtype where autocast is on."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype
