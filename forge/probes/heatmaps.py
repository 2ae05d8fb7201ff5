"""Attention heatmaps (B2 attention instability, E2 attention sinks) of one fixed held-out sequence.

One forward at full depth with every attention module capturing its probabilities (the same computation
that gives attn/entropy and attn/sink_count during training: forge.model.attention.attention_stats). The
backbone blocks run once; the TRM refiner's blocks run t_max * (micro_steps + 1) times, and the map kept
is their last application (the final answer update). Each (layer, head) map is written as a T x T pixel
PNG (sqrt of the probability, so that weak attention stays visible; key on x, query on y).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from forge.model.attention import attention_modules


@dataclass
class LayerMaps:
    name: str                    # backbone{i} or refiner{i}
    probs: torch.Tensor          # (H, T, T)
    entropy: float
    sink_heads: float
    rope_norm: float


@torch.no_grad()
def capture_attention(model, idx: torch.Tensor) -> list[LayerMaps]:
    """Per attention module, the maps of idx (1, T) (its last call). The model is left as it was."""
    modules = attention_modules(model)
    backbone = {id(b.attn) for b in model.blocks}
    for m in modules:
        m.capture, m.captured = True, []
    try:
        model(idx, return_logits=True)
        layers, counts = [], {"backbone": 0, "refiner": 0}
        for m in modules:
            kind = "backbone" if id(m) in backbone else "refiner"
            stats = m.captured[-1]
            layers.append(LayerMaps(f"{kind}{counts[kind]}", stats["probs"].float().cpu(), float(stats["entropy"]),
                                    float(stats["sink_heads"]), float(stats["rope_norm"])))
            counts[kind] += 1
    finally:
        for m in modules:
            m.capture, m.captured = False, []
    return layers


def heatmap_metrics(layers: list[LayerMaps]) -> dict[str, float]:
    """eval/attn/entropy (mean), eval/attn/sink_count (heads with a sink, summed), eval/attn/rope_norm (mean)."""
    n = len(layers)
    return {"eval/attn/entropy": sum(l.entropy for l in layers) / n,
            "eval/attn/sink_count": sum(l.sink_heads for l in layers),
            "eval/attn/rope_norm": sum(l.rope_norm for l in layers) / n}


def write_heatmaps(layers: list[LayerMaps], directory: Path) -> list[Path]:
    """<directory>/<layer>_head<h>.png, each exactly T x T pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for layer in layers:
        for h, probs in enumerate(layer.probs):
            path = directory / f"{layer.name}_head{h}.png"
            plt.imsave(path, probs.sqrt().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            written.append(path)
    return written
