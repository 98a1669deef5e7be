"""Size limits for models rebuilt from the constructor arguments stored in untrusted files.

A checkpoint names the architecture it holds (an NVAE config, NVIDIA's ``args``, an energy
net's preset and width); building that model allocates whatever the arguments say. A few bytes
of arguments can describe terabytes of weights, so the loaders (:func:`vaebm.loading.load_vae`,
:func:`vaebm.loading.load_ebm`, :func:`~vaebm.models.nvae.official.load_nvae_checkpoint`) check,
before anything real is allocated:

1. the arguments' types and ranges (:data:`NVAE_INT_RANGES`, known preset / recipe names);
2. the model's structure: at most :data:`MAX_CELLS` NVAE cells, and the autoregressive flows'
   CPU masks (the one part built for real even on the meta device) within the byte limit;
3. the bytes of every parameter and buffer, counted on a model built on the ``meta`` device
   (no storage): at most :func:`model_bytes_limit` = the smaller of

   - ``FILE_SIZE_FACTOR`` x the file's size + ``FILE_SIZE_SLACK`` (a checkpoint must hold its
     weights: float32 weights stored at half precision take half the room, nothing legitimate
     takes less than a quarter; the slack covers tiny models), and
   - an absolute cap, :data:`DEFAULT_MAX_MODEL_BYTES` (8 GiB, ~5x the largest VAEBM backbone)
     unless ``$VAEBM_MAX_MODEL_BYTES`` sets another number of bytes;
4. the shape of every stored tensor against the meta model's (:func:`shape_problems`).

Only then is the real model built and loaded. Every refusal names the file and the sizes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["DEFAULT_MAX_MODEL_BYTES", "FILE_SIZE_FACTOR", "FILE_SIZE_SLACK", "MAX_CELLS",
           "MAX_MODEL_BYTES_ENV", "NVAE_INT_RANGES", "check_model_bytes", "check_nvae_config",
           "fmt_bytes", "max_model_bytes", "meta_nvae", "model_bytes", "model_bytes_limit",
           "shape_problems"]

MAX_MODEL_BYTES_ENV = "VAEBM_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL_BYTES = 8 << 30
FILE_SIZE_FACTOR = 4
FILE_SIZE_SLACK = 64 << 20
MAX_CELLS = 4096  # the cifar10 backbone has ~270; building one cell on meta takes ~1 ms

# (low, high) of the integer NVAEConfig fields when they come from a file
NVAE_INT_RANGES = {
    "image_size": (1, 4096), "in_channels": (1, 64),
    "num_channels_enc": (1, 16384), "num_channels_dec": (1, 16384),
    "num_preprocess_blocks": (1, 8), "num_preprocess_cells": (1, 64),
    "num_postprocess_blocks": (1, 8), "num_postprocess_cells": (1, 64),
    "num_latent_scales": (1, 12), "num_groups_per_scale": (1, 1024),
    "num_latent_per_group": (1, 4096), "num_cell_per_cond_enc": (1, 64),
    "num_cell_per_cond_dec": (0, 64), "num_nf": (0, 16), "min_groups_per_scale": (1, 1024),
}
NVAE_BOOL_FIELDS = ("use_se", "res_dist", "ada_groups")


def fmt_bytes(n: int) -> str:
    for unit, k in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.3g} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def max_model_bytes() -> int:
    """The absolute cap: ``$VAEBM_MAX_MODEL_BYTES`` (bytes; ``8e9`` and ``8589934592`` both
    work) or :data:`DEFAULT_MAX_MODEL_BYTES`."""
    raw = os.environ.get(MAX_MODEL_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_MODEL_BYTES
    try:
        v = float(raw) if any(c in raw for c in ".eE") else int(raw)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or v <= 0:
        raise ValueError(f"${MAX_MODEL_BYTES_ENV}={raw!r}: expected a positive number of bytes")
    return int(v)


def model_bytes_limit(file_bytes: int | None) -> tuple[int, str]:
    """(limit, why) for a model rebuilt from a file of ``file_bytes`` bytes (None: cap only)."""
    cap = max_model_bytes()
    env = os.environ.get(MAX_MODEL_BYTES_ENV, "").strip()
    cap_why = (f"${MAX_MODEL_BYTES_ENV}" if env else
               f"the default cap; set ${MAX_MODEL_BYTES_ENV} to allow more")
    if file_bytes is None:
        return cap, cap_why
    rel = FILE_SIZE_FACTOR * int(file_bytes) + FILE_SIZE_SLACK
    if rel < cap:
        return rel, (f"{FILE_SIZE_FACTOR}x the file's {int(file_bytes):,} bytes + "
                     f"{FILE_SIZE_SLACK >> 20} MiB: a checkpoint must hold the weights it "
                     "describes, so its arguments and its size disagree")
    return cap, cap_why


def model_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``module`` (meta tensors count their size)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def check_model_bytes(n_bytes: int, *, path, what: str, file_bytes: int | None,
                      error=ValueError) -> None:
    """Raise ``error("<path>: ...")`` when ``n_bytes`` exceed :func:`model_bytes_limit`."""
    limit, why = model_bytes_limit(file_bytes)
    if n_bytes > limit:
        raise error(f"{path}: refusing to build {what}: the stored arguments imply "
                    f"{fmt_bytes(n_bytes)} of parameters and buffers, over the limit of "
                    f"{fmt_bytes(limit)} ({why})")


def shape_problems(expected: Mapping, stored: Mapping) -> tuple[dict, list, list]:
    """(mismatches {name: (stored shape, model shape)}, missing names, unexpected names) of a
    stored state dict against the model's (e.g. a meta model's ``state_dict()``)."""
    mismatch = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in stored.items()
                if k in expected and tuple(v.shape) != tuple(expected[k].shape)}
    missing = sorted(k for k in expected if k not in stored)
    unexpected = sorted(k for k in stored if k not in expected)
    return mismatch, missing, unexpected


def describe_shape_problems(mismatch: dict, missing: list, unexpected: list, n: int = 6) -> str:
    parts = []
    if mismatch:
        items = list(mismatch.items())
        parts.append(f"{len(items)} shape mismatch(es): " + ", ".join(
            f"{k} stored {a} vs model {b}" for k, (a, b) in items[:n])
            + (" ..." if len(items) > n else ""))
    if missing:
        parts.append(f"{len(missing)} missing: {missing[:n]}" + (" ..." if len(missing) > n
                                                                  else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {unexpected[:n]}"
                     + (" ..." if len(unexpected) > n else ""))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------ NVAE


def check_nvae_config_values(values: Mapping, *, path, error=ValueError) -> None:
    """Types and ranges of NVAEConfig fields read from a file (only the fields present)."""
    from .cells import ARCH_INSTANCES
    for k, (lo, hi) in NVAE_INT_RANGES.items():
        if k not in values:
            continue
        v = values[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise error(f"{path}: stored NVAE argument {k}={v!r} is not an int")
        if not lo <= v <= hi:
            raise error(f"{path}: stored NVAE argument {k}={v} is outside [{lo}, {hi}]")
    for k in NVAE_BOOL_FIELDS:
        if k in values and not isinstance(values[k], bool):
            raise error(f"{path}: stored NVAE argument {k}={values[k]!r} is not a bool")
    name = values.get("arch_instance", "res_mbconv")
    if not isinstance(name, str) or name not in ARCH_INSTANCES:
        raise error(f"{path}: stored NVAE argument arch_instance={name!r} is not a known cell "
                    f"recipe ({sorted(ARCH_INSTANCES)})")


def nvae_cell_count(config) -> int:
    """Cells (and cell-sized modules) an NVAE of ``config`` has: the cost of building it."""
    c = config
    groups = sum(c.groups_per_scale)
    per_group = c.num_cell_per_cond_enc + c.num_cell_per_cond_dec + 4 + c.num_nf
    return (c.num_preprocess_blocks * c.num_preprocess_cells
            + c.num_postprocess_blocks * c.num_postprocess_cells
            + groups * per_group + 2 * c.num_latent_scales + 4)


def nvae_flow_mask_bytes(config) -> int:
    """CPU bytes of the IAF cells' masks (built for real even on the meta device): per paired
    cell 2 x (3x3 Z->6Z + depthwise 5x5 6Z + 1x1 6Z->Z) float32."""
    z = config.num_latent_per_group
    return sum(config.groups_per_scale) * config.num_nf * 2 * (60 * z * z + 150 * z) * 4


def meta_nvae(config):
    """The NVAE of ``config`` on the meta device (shapes only)."""
    from .model import NVAE
    with torch.device("meta"):
        return NVAE(config)


def check_nvae_config(config, *, path, file_bytes: int | None, error=ValueError):
    """Check an :class:`NVAEConfig` read from ``path`` (``file_bytes`` long) against the limits
    of the module docstring; returns the meta-device model (for shape checks)."""
    import dataclasses
    check_nvae_config_values({f.name: getattr(config, f.name)
                              for f in dataclasses.fields(config)}, path=path, error=error)
    cells = nvae_cell_count(config)
    if cells > MAX_CELLS:
        raise error(f"{path}: refusing to build the stored NVAE: its arguments describe {cells:,} "
                    f"cells ({sum(config.groups_per_scale):,} latent groups), over the limit of "
                    f"{MAX_CELLS:,}")
    check_model_bytes(nvae_flow_mask_bytes(config), path=path, file_bytes=file_bytes,
                      what="the stored NVAE's flow cells", error=error)
    model = meta_nvae(config)
    check_model_bytes(model_bytes(model), path=path, file_bytes=file_bytes,
                      what="the stored NVAE", error=error)
    return model
