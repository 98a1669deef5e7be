"""Rebuild trained models from files: a stage-1 checkpoint written by :mod:`vaebm.training`, a
published NVAE checkpoint (NVIDIA's format), or a stage-2 checkpoint's energy net.

``load_vae(path)`` accepts a file or a run folder (``<dir>/vae.pt``), tells the two VAE formats
apart by their header, and returns the model in eval mode with a small info dict.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .training.checkpoint import MAGIC, CheckpointError, load_latest


def _resolve(path, name: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.exists() and not Path(str(p) + ".prev").exists():
        raise FileNotFoundError(f"{p}: no such checkpoint")
    return p


def _is_vaebm_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except FileNotFoundError:  # only <name>.prev is there: a vaebm checkpoint by construction
        return True


def load_vae(path, *, map_location="cpu"):
    """(vae, info): the NVAE of a vaebm stage-1 checkpoint (or run folder), or of a published
    NVAE checkpoint. ``info["format"]`` is "vaebm" or "official"."""
    from .models.nvae import NVAE, NVAEConfig

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
    vae = NVAE(NVAEConfig(**conf))
    vae.load_state_dict(ck["vae"])
    vae.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return vae.eval(), {"format": "vaebm", "file": str(used), "iteration": ck.get("iteration"),
                        "config": ck.get("config")}


def load_ebm(path, *, map_location="cpu"):
    """(energy net, checkpoint) of a stage-2 checkpoint or run folder (``<dir>/ebm.pt``)."""
    from .training.ebm import load_energy
    return load_energy(_resolve(path, "ebm.pt"), map_location=map_location)
