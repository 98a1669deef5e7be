"""Shared pieces of the ``vaebm`` commands: the usage error, number checks, preset defaults,
config assembly, run-folder preparation and seeding."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad command-line input: reported as one ``vaebm: error:`` line, exit status 2."""


# dataset name -> (NVAE preset, stage-1 preset, stage-2 preset); the energy net comes from the
# stage-2 preset's ``energy_preset``
DATASET_DEFAULTS = {
    "cifar10": ("cifar10", "cifar10", "cifar10"),
    "celeba64": ("celeba64", "celeba64", "celeba64"),
    "lsun_church64": ("lsun_church64", "lsun_church64", "lsun_church64"),
    "celebahq256": ("celebahq256", "celebahq256", "celebahq256"),
    "fashion_mnist": ("mnist", "fashion_mnist", "fashion_mnist"),
    "mnist": ("mnist", "fashion_mnist", "fashion_mnist"),
    "stacked_mnist": ("stacked_mnist", "fashion_mnist", "fashion_mnist"),
}

def _defaults(dataset: str) -> tuple[str, str, str]:
    key = dataset.lower().replace("-", "_")
    if key not in DATASET_DEFAULTS:
        raise UsageError(f"no default presets for dataset {dataset!r}; pass --model and "
                         f"--preset (datasets with defaults: {', '.join(DATASET_DEFAULTS)})")
    return DATASET_DEFAULTS[key]

def _config(kind: str, args, preset: str):
    from ..training.config import load_config, make_config, parse_overrides

    overrides = parse_overrides(args.set or [])
    for flag, field in (("steps", "steps"), ("batch_size", "batch_size"), ("device", "device")):
        if getattr(args, flag, None) is not None:
            overrides[field] = getattr(args, flag)
    overrides["out_dir"] = args.out
    # progress: the config's default (on unless --quiet); --progress is a no-op kept for old scripts
    try:
        if args.config:
            return load_config(args.config, kind, overrides)
        return make_config(kind, args.preset or preset, **overrides)
    except KeyError as e:  # an unknown field name (--set, --config): bad input, not a bug
        raise UsageError(e.args[0] if e.args else str(e)) from None

def _check_number(args, dest: str, *, minimum: float = 0, strict: bool = False) -> None:
    """``--flag`` (attribute ``dest``) must be finite and >= minimum (> with ``strict``);
    None (not given) passes."""
    import math

    v = getattr(args, dest, None)
    if v is None:
        return
    flag = "--" + dest.replace("_", "-")
    ok = math.isfinite(v) and (v > minimum if strict else v >= minimum)
    if not ok:
        what = {(0, True): "positive", (0, False): "non-negative",
                (1, False): "at least 1"}.get((minimum, strict), f"> {minimum}")
        raise UsageError(f"{flag} must be {what}, got {v!r}")

def _check_train_args(args) -> None:
    _check_number(args, "steps")
    _check_number(args, "batch_size", strict=True)

def _check_sampling_args(args) -> None:
    """The numbers ``sample`` and ``eval`` take, checked before anything is loaded."""
    _check_number(args, "n", strict=True)
    _check_number(args, "batch", strict=True)
    _check_number(args, "steps")
    _check_number(args, "step_size", strict=True)  # 0 would be no Langevin move at all
    _check_number(args, "temperature")
    _check_number(args, "every")  # 0: no chain frames
    _check_number(args, "readjust_bn")
    _check_number(args, "n_ood", strict=True)
    _check_number(args, "iwae_k", minimum=1)

def _prepare_out(args, kind: str) -> None:
    """``--no-resume`` on a folder that holds a run of this stage (checkpoint or CSV) would
    overwrite it: refuse, or with ``--force`` first move the folder's files (all but the other
    stage's checkpoint and CSV) to ``<out>.bak-<timestamp>``; nothing is deleted."""
    import os
    import shutil
    import time
    from pathlib import Path

    from ..training.loop import LOCK_NAME, RunLock

    out = Path(args.out)
    mine = [f"{kind}.pt", f"{kind}.pt.prev", f"{kind}.csv"]
    found = [n for n in mine if (out / n).exists()]
    if not args.no_resume or not found:
        return
    if not args.force:
        raise UsageError(f"--out {out} holds a previous run ({', '.join(found)}) that --no-resume "
                         "would overwrite; add --force to move its files to a backup folder "
                         "first, drop --no-resume to continue it, or choose another --out")
    if int(os.environ.get("RANK", "0")) != 0:
        return
    other = "ebm" if kind == "vae" else "vae"
    keep = {LOCK_NAME, f"{other}.pt", f"{other}.pt.prev", f"{other}.csv"}
    with RunLock(out):  # never from under a trainer that is using the folder
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup, i = Path(f"{out}.bak-{stamp}"), 1
        while backup.exists():
            i += 1
            backup = Path(f"{out}.bak-{stamp}-{i}")
        backup.mkdir(parents=True)
        moved = []
        for entry in sorted(out.iterdir()):
            if entry.name not in keep:
                shutil.move(str(entry), str(backup / entry.name))
                moved.append(entry.name)
    print(f"vaebm train-{kind}: --no-resume --force: moved the previous run's files "
          f"({', '.join(moved)}) from {out} to {backup}", flush=True)

def _seed_all(seed: int) -> None:
    """Seed every generator model construction may draw from, so two identical commands start
    from the same weights (the trainer seeds again for training itself)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # and every CUDA device

def _dist():
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..training.distributed import init_distributed
        return init_distributed()
    return None
