"""``vaebm sample``: VAEBM (or plain VAE) samples as PNG grids and an .npz.

Outputs in ``--out``: ``samples.png``, ``vae_samples.png`` (the chains' starts), ``pairs.png``
(before/after), ``chain.png`` (with ``--every``) and ``samples.npz``. They are written all or
nothing: each goes to a temporary file in ``--out`` first, and only once every write has
succeeded are they all renamed into place; a failed write (a full disk, ...) leaves the files of
an earlier run in that folder as they were and no temporary file behind. Outputs of an earlier
run that this run does not write (``chain.png`` without ``--every``, a grid with no finite image)
are removed at the same time, so the folder never mixes two runs.

Non-finite samples: a chain that diverges gives NaN/Inf pixels. Such images are left out of the
PNG grids (which show the finite ones, in order), their indices are printed and stored as
``nonfinite`` (int64 indices into ``samples``) in ``samples.npz``, which keeps the raw arrays of
all ``--n`` samples (sample i stays sample i of the seeded sequence). The command succeeds (exit
status 0) while at least one sample is finite. If none is, what can be saved still is
(``samples.npz``, and ``vae_samples.png`` if the starts are finite) and a RuntimeError says so
(exit status 1).

Long runs lose nothing: finished batches are written to ``--out/samples.partial/`` at least
once a minute; Ctrl-C (SIGINT) or SIGTERM finishes the batch under way, saves, and exits with
status 128 + the signal's number; the same command continues after the saved batches (with the
same settings and models, checked) and gives the samples an uninterrupted run gives.
"""

from __future__ import annotations

from ._common import _check_sampling_args


def _models_for_sampling(args):
    """(device, vae, energy or None, steps, step_size, mode) for ``sample`` and ``eval``: the
    stage-2 run's own settings unless flags override them; without --ebm, no Langevin steps."""
    import torch

    from ..loading import load_ebm, load_vae

    _check_sampling_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae, _ = load_vae(args.vae, map_location=device)
    energy, conf = None, {}
    if args.ebm:
        energy, ck = load_ebm(args.ebm, map_location=device)
        energy.to(device)
        conf = ck.get("config") or {}
    steps = args.steps if args.steps is not None else (conf.get("test_ld_steps", 16) if energy else 0)
    step_size = args.step_size if args.step_size is not None else conf.get("ld_step_size", 8e-5)
    mode = args.mode or conf.get("energy_mode", "paper")
    # E sees in sampling what it saw in its training chains
    args._negative = conf.get("chain_negative") or "sample"
    return device, vae.to(device), energy, steps, step_size, mode

def _zero_energy(x):
    """E = 0: plain VAE samples through the same sampler (with no steps, never differentiated)."""
    return x.flatten(1).sum(1) * 0.0

OUTPUTS = ("samples.png", "vae_samples.png", "pairs.png", "chain.png", "samples.npz")


def _indices(idx, limit: int = 20) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return shown + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def _write_outputs(res: dict, out: str) -> tuple[list[str], list[int]]:
    """Write the outputs of ``vaebm_sample``'s result ``res`` to ``out`` all or nothing (see
    the module docstring); returns the names written and the indices of non-finite samples."""
    import json
    import os

    import numpy as np
    import torch

    from ..imageio import AtomicFiles, make_grid, png_bytes

    samples, initial = res["samples"], res["initial"]
    finite = lambda x: torch.isfinite(x.flatten(1)).all(1)  # noqa: E731  per sample
    ok, ok_init = finite(samples), finite(initial)
    nonfinite = (~ok).nonzero().flatten()
    grids = {}
    if ok.any():
        grids["samples.png"] = (samples[ok], None)
    if ok_init.any():
        grids["vae_samples.png"] = (initial[ok_init], None)
    both = (ok & ok_init).nonzero().flatten()[:32]  # before/after pairs as Fig. 12: odd
    if len(both):                                   # columns before, even after
        grids["pairs.png"] = (torch.stack([initial[both], samples[both]], 1).flatten(0, 1), 8)
    arrays = {"samples": samples.numpy(), "initial": initial.numpy(),
              "energy": res["energy"].numpy(), "nonfinite": nonfinite.numpy().astype(np.int64)}
    if "chain" in res:
        ch = res["chain"]  # (frames, n, C, H, W): samples whose every frame is finite
        good = torch.isfinite(ch.flatten(2)).all(2).all(0).nonzero().flatten()[:10]
        if len(good):
            grids["chain.png"] = (ch[:, good].transpose(0, 1).flatten(0, 1), ch.shape[0])
        arrays["chain"] = ch.numpy()
    pngs = {name: png_bytes(make_grid(x, nrow=nrow)) for name, (x, nrow) in grids.items()}
    with AtomicFiles() as files:
        for name, data in pngs.items():
            files.write_bytes(os.path.join(out, name), data)
        files.write(os.path.join(out, "samples.npz"),
                    lambda f: np.savez_compressed(f, **arrays,
                                                  settings=json.dumps(res["settings"])))
        for name in OUTPUTS:
            if name not in pngs and name != "samples.npz":
                files.remove(os.path.join(out, name))  # an earlier run's, now stale
    return [*pngs, "samples.npz"], nonfinite.tolist()


PARTS = "samples.partial"  # folder of finished batches while a run is under way
SAVE_EVERY_S = 60.0  # finished batches are written at least this often (and on a signal)


def _models_digest(vae, energy) -> str:
    """sha256 of the models' parameters and buffers: the batches saved by a run are only
    continued with the same models."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for m in (vae, energy):
        if isinstance(m, torch.nn.Module):
            for k, v in m.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _load_parts(folder, key: dict) -> list[dict]:
    """The saved batches of an earlier run of the same command (same key), in order; a folder
    left by other settings or models is moved aside (nothing is deleted) and not used."""
    import time
    from pathlib import Path

    from ..training.checkpoint import CheckpointError, load_checkpoint

    folder = Path(folder)
    if not folder.is_dir():
        return []
    parts, nxt = [], 0
    for f in sorted(folder.glob("part-*.pt")):
        try:
            p = load_checkpoint(f, kind="samples-part")
        except CheckpointError as e:  # a part cut short by a crash: the batches after it rerun
            print(f"warning: {e}; its batches are drawn again", flush=True)
            break
        if p["key"] != key:
            stale = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(stale)
            print(f"warning: {folder} holds samples of other settings or models: moved to "
                  f"{stale}; starting over", flush=True)
            return []
        if p["first"] != nxt:
            break
        parts.append(p)
        nxt += p["count"]
    return parts


def _remove_parts(out) -> None:
    import shutil
    from pathlib import Path

    folder = Path(out) / PARTS
    if folder.is_dir():
        shutil.rmtree(folder)


def _sample_resumable(vae, energy, n: int, batch: int, out, kw: dict) -> dict:
    """``vaebm_sample`` batch by batch (each batch depends only on its global sample indices,
    so the result is the same as one call). Finished batches go to ``<out>/samples.partial/`` at
    least every SAVE_EVERY_S seconds; SIGINT / SIGTERM finish the batch under way, save, and
    raise RunInterrupted; the same command then continues after the saved batches."""
    import time
    from pathlib import Path

    import torch

    from .._progress import progress_iter
    from ..sampling.generate import vaebm_sample
    from ..training.checkpoint import save_checkpoint
    from ..training.interrupt import RunInterrupted, StopOnSignal

    folder = Path(out) / PARTS
    key = {"n": int(n), "batch": int(batch), "models": _models_digest(vae, energy),
           **{k: (str(v) if k == "device" else v) for k, v in kw.items() if k != "backend"}}
    parts = _load_parts(folder, key)
    done = sum(p["count"] for p in parts)
    if done:
        print(f"continuing: {done} of {n} samples were drawn by an earlier run of this command",
              flush=True)
    pending, last_save = [], time.monotonic()

    def save():
        nonlocal pending, last_save
        if pending:
            folder.mkdir(parents=True, exist_ok=True)
            cat = lambda k: torch.cat([r[k] for r in pending], dim=1 if k == "chain" else 0)  # noqa: E731
            part = {"kind": "samples-part", "key": key, "first": pending[0]["first"],
                    "count": sum(r["count"] for r in pending),
                    "settings": pending[0]["settings"],
                    **{k: cat(k) for k in ("samples", "initial", "energy", "chain")
                       if k in pending[0]}}
            save_checkpoint(part, folder / f"part-{part['first']:09d}.pt", keep_prev=False)
            parts.append(part)
        pending, last_save = [], time.monotonic()

    starts = list(range(done, int(n), int(batch)))
    with StopOnSignal() as sig:
        for b0 in progress_iter(starts, total=len(starts), desc="sampling", unit="batch"):
            bs = min(int(batch), int(n) - b0)
            r = vaebm_sample(vae, energy, bs, batch=bs, first_index=b0, **kw)
            r.update(first=b0, count=bs)
            pending.append(r)
            last = b0 + bs >= n
            if not last and (sig.signum is not None
                             or time.monotonic() - last_save >= SAVE_EVERY_S):
                save()
            if sig.signum is not None and not last:
                raise RunInterrupted(sig.name, f"stopped by {sig.name} after {b0 + bs} of {n} "
                                               f"samples; they are saved in {folder}; run the "
                                               "same command to continue")
    rows = parts + pending
    res = {k: torch.cat([r[k] for r in rows], dim=1 if k == "chain" else 0)
           for k in ("samples", "initial", "energy", "chain") if k in rows[0]}
    res["settings"] = {**rows[-1]["settings"], "n": int(n), "batch": int(batch),
                       "first_index": 0}
    return res


def cmd_sample(args) -> int:
    """Draw VAEBM samples (PNG grids, .npz); without --ebm, plain VAE samples."""
    device, vae, energy, steps, step_size, mode = _models_for_sampling(args)
    if args.start == "low_temp" and args.readjust_bn and hasattr(vae, "readjust_bn"):
        vae.readjust_bn(num_batches=args.readjust_bn, batch_size=min(args.batch, 64),
                        t=args.temperature)
        vae.eval()
    kw = dict(steps=steps, step_size=step_size, mode=mode, negative=args._negative,
              start=args.start, start_t=args.temperature, seed=args.seed, every=args.every,
              device=device, backend=args.backend)
    res = _sample_resumable(vae, energy or _zero_energy, args.n, args.batch, args.out, kw)
    written, nonfinite = _write_outputs(res, args.out)
    _remove_parts(args.out)
    n = len(res["samples"])
    if len(nonfinite) == n:
        raise RuntimeError(f"all {n} samples are non-finite (NaN/Inf; lower --step-size or "
                           f"check the models): no sample image written; the raw arrays are in "
                           f"{args.out}/samples.npz (wrote {', '.join(written)})")
    print(f"{n - len(nonfinite)} samples ({steps} Langevin steps, step size {step_size:g}, "
          f"{mode} energy) -> {args.out}/{', '.join(written)}")
    if nonfinite:
        print(f"warning: {len(nonfinite)} of {n} samples are non-finite (NaN/Inf), left out of "
              f"the PNGs and listed in samples.npz['nonfinite'] (raw arrays kept): indices "
              f"{_indices(nonfinite)}", flush=True)
    return 0
