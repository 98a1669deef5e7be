"""Rebuild trained models from files: a stage-1 checkpoint written by :mod:`vaebm.training`, a
published NVAE checkpoint (NVIDIA's format), or a stage-2 checkpoint's energy net.

``load_vae(path)`` accepts a file or a run folder (``<dir>/vae.pt``), tells the two VAE formats
apart by their header, and returns the model in eval mode with a small info dict.

The files are untrusted: only regular files are opened, and the model a file's stored
constructor arguments describe is checked before it is built (argument types and ranges, known
preset names, its parameter and buffer bytes counted on the ``meta`` device against the limits of
:mod:`vaebm.models.nvae.limits`: at most 4x the file's size + 64 MiB, and at most
``$VAEBM_MAX_MODEL_BYTES``, default 8 GiB), and every stored tensor's shape is compared with the
model's. Refusals raise :class:`~vaebm.training.checkpoint.CheckpointError` (or
:class:`~vaebm.models.nvae.NVAECheckpointError` for published NVAE files) naming the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .training.checkpoint import MAGIC, CheckpointError, load_latest, open_regular


def _resolve(path, name: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.exists() and not Path(str(p) + ".prev").exists():
        raise FileNotFoundError(f"{p}: no such checkpoint")
    return p


def _is_vaebm_file(p: Path) -> bool:
    try:
        f, _ = open_regular(p)  # a FIFO or device is refused here, before any read can block
    except FileNotFoundError:  # only <name>.prev is there: a vaebm checkpoint by construction
        return True
    with f:
        return f.read(len(MAGIC)) == MAGIC


def _file_bytes(path) -> int:
    return os.stat(path).st_size


def _check_state(expected: Mapping, stored, *, path, what: str) -> None:
    """Every stored tensor has the model's shape, and the names match (before any real build)."""
    from .models.nvae.limits import describe_shape_problems, shape_problems
    if not isinstance(stored, Mapping) or not all(isinstance(v, torch.Tensor)
                                                  for v in stored.values()):
        raise CheckpointError(f"{path}: the stored {what} weights are not a mapping of tensors")
    problems = describe_shape_problems(*shape_problems(expected, stored))
    if problems:
        raise CheckpointError(f"{path}: the stored {what} weights do not fit the architecture "
                              f"its stored config describes: {problems}")


def build_nvae(conf, state, *, path, file_bytes: int | None):
    """The NVAE of a stored ``vae_config`` dict with the stored ``state`` loaded, after the
    checks of the module docstring (raises :class:`CheckpointError` naming ``path``)."""
    import dataclasses

    from .models.nvae import NVAE, NVAEConfig
    from .models.nvae.limits import check_nvae_config, check_nvae_config_values
    fields = {f.name for f in dataclasses.fields(NVAEConfig)}
    unknown = sorted(str(k) for k in conf if k not in fields)
    if unknown:
        raise CheckpointError(f"{path}: stored vae_config has unknown fields {unknown}")
    check_nvae_config_values(conf, path=path, error=CheckpointError)
    try:
        config = NVAEConfig(**conf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: stored vae_config does not describe a buildable NVAE "
                              f"({e})") from None
    meta = check_nvae_config(config, path=path, file_bytes=file_bytes, error=CheckpointError)
    _check_state(meta.state_dict(), state, path=path, what="VAE")
    del meta
    vae = NVAE(config)
    vae.load_state_dict(state)
    return vae


ENERGY_CONFIG_KEYS = ("preset", "width", "in_channels", "resolution")
MAX_ENERGY_WIDTH = 64.0


def build_energy_net(conf, state, *, path, file_bytes: int | None):
    """The :class:`~vaebm.models.EnergyNet` of a stored ``energy_config`` (preset, width,
    in_channels, resolution) with the stored ``state`` loaded, after the checks of the module
    docstring: a known preset, 0 < width <= 64, in_channels in [1, 64], resolution in
    [1, 4096], the bytes on the meta device within the limits, the stored shapes (raises
    :class:`CheckpointError` naming ``path``)."""
    from .models.energy import PRESETS, EnergyNet
    from .models.nvae.limits import check_model_bytes, model_bytes
    if not isinstance(conf, Mapping):
        raise CheckpointError(f"{path}: stored energy_config is a {type(conf).__name__}, "
                              "expected a dict")
    unknown = sorted(str(k) for k in conf if k not in ENERGY_CONFIG_KEYS)
    missing = [k for k in ENERGY_CONFIG_KEYS if k not in conf]
    if unknown or missing:
        raise CheckpointError(f"{path}: stored energy_config has unknown fields {unknown} / "
                              f"lacks {missing}")
    preset, width = conf["preset"], conf["width"]
    if not isinstance(preset, str) or preset not in PRESETS:
        raise CheckpointError(f"{path}: stored energy_config preset={preset!r} is not a known "
                              f"preset ({', '.join(PRESETS)})")
    if (isinstance(width, bool) or not isinstance(width, (int, float))
            or not math.isfinite(width) or not 0 < width <= MAX_ENERGY_WIDTH):
        raise CheckpointError(f"{path}: stored energy_config width={width!r} is not a number "
                              f"in (0, {MAX_ENERGY_WIDTH:g}]")
    for k, hi in (("in_channels", 64), ("resolution", 4096)):
        v = conf[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise CheckpointError(f"{path}: stored energy_config {k}={v!r} is not an int in "
                                  f"[1, {hi}]")
    kw = dict(width=width, in_channels=conf["in_channels"], resolution=conf["resolution"])
    try:
        with torch.device("meta"):
            meta = EnergyNet(preset, **kw)
    except ValueError as e:
        raise CheckpointError(f"{path}: stored energy_config does not describe a buildable "
                              f"energy net ({e})") from None
    check_model_bytes(model_bytes(meta), path=path, what="the stored energy net",
                      file_bytes=file_bytes, error=CheckpointError)
    _check_state(meta.state_dict(), state, path=path, what="energy net")
    del meta
    net = EnergyNet(preset, **kw)
    net.load_state_dict(state)
    return net


def load_vae(path, *, map_location="cpu"):
    """(vae, info): the NVAE of a vaebm stage-1 checkpoint (or run folder), or of a published
    NVAE checkpoint. ``info["format"]`` is "vaebm" or "official"."""
    p = _resolve(path, "vae.pt")
    if not _is_vaebm_file(p):
        from .models.nvae.official import load_nvae_checkpoint
        vae, info = load_nvae_checkpoint(p, map_location=map_location)
        info = dict(info) if isinstance(info, dict) else {"details": info}
        info["format"] = "official"
        return vae.eval(), info
    ck, used = load_latest(p, kind="vae", map_location=map_location)
    conf = ck.get("vae_config")
    if not isinstance(conf, dict) or ck.get("vae_class", "NVAE") != "NVAE":
        raise CheckpointError(f"{used}: holds a {ck.get('vae_class', 'custom')} VAE without a "
                              "stored NVAE config; build the model yourself and load ck['vae']")
    vae = build_nvae(conf, ck.get("vae"), path=used, file_bytes=_file_bytes(used))
    vae.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return vae.eval(), {"format": "vaebm", "file": str(used), "iteration": ck.get("iteration"),
                        "config": ck.get("config")}


def load_ebm(path, *, map_location="cpu"):
    """(energy net, checkpoint) of a stage-2 checkpoint or run folder (``<dir>/ebm.pt``), the
    net rebuilt from the stored ``energy_config`` (checked: :func:`build_energy_net`) in eval
    mode."""
    ck, used = load_latest(_resolve(path, "ebm.pt"), kind="ebm", map_location=map_location)
    conf = ck.get("energy_config")
    if not conf:
        raise CheckpointError(f"{used}: no energy_config stored (energy net was not an "
                              "EnergyNet); build the network yourself and load ck['energy']")
    net = build_energy_net(conf, ck.get("energy"), path=used, file_bytes=_file_bytes(used))
    return net.eval(), ck
