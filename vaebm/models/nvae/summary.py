"""Parameter counts and latent layout of the NVAE presets (``vaebm info --nvae``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .model import NVAE
from .presets import NVAEConfig


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(preset: str | NVAEConfig | None = None) -> str:
    """Parameter counts and latent layout of one preset (or all), built on the meta device."""
    from .presets import PRESETS

    names = list(PRESETS) if preset is None else [preset]
    lines = ["| preset | image | params | groups | latent dims | eps dims |",
             "|---|---|---|---|---|---|"]
    for name in names:
        with torch.device("meta"):
            m = NVAE(name)
        c = m.config
        lat = sum(math.prod(s) for s in m.latent_shapes)
        label = name if isinstance(name, str) else "custom"
        lines.append(f"| {label} | {c.in_channels}x{c.image_size}x{c.image_size} | "
                     f"{count_parameters(m):,} | {m.num_groups} | {lat:,} | "
                     f"{lat + math.prod(m.image_shape):,} |")
    return "\n".join(lines)
