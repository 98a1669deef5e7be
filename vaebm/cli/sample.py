"""``vaebm sample``: VAEBM (or plain VAE) samples as PNG grids and an .npz."""

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

def cmd_sample(args) -> int:
    """Draw VAEBM samples (PNG grids, .npz); without --ebm, plain VAE samples."""
    import json
    import os

    import numpy as np
    import torch

    from ..imageio import save_grid
    from ..sampling.generate import vaebm_sample

    device, vae, energy, steps, step_size, mode = _models_for_sampling(args)
    if args.start == "low_temp" and args.readjust_bn and hasattr(vae, "readjust_bn"):
        vae.readjust_bn(num_batches=args.readjust_bn, batch_size=min(args.batch, 64),
                        t=args.temperature)
        vae.eval()
    res = vaebm_sample(vae, energy or _zero_energy, args.n, steps=steps, step_size=step_size,
                       batch=args.batch, mode=mode, negative=args._negative, start=args.start,
                       start_t=args.temperature,
                       seed=args.seed, every=args.every, device=device, backend=args.backend,
                       progress=True)
    os.makedirs(args.out, exist_ok=True)
    out = {"samples": res["samples"], "initial": res["initial"]}
    save_grid(res["samples"], os.path.join(args.out, "samples.png"))
    save_grid(res["initial"], os.path.join(args.out, "vae_samples.png"))
    k = min(args.n, 32)  # before/after pairs as Fig. 12: odd columns before, even after
    pairs = torch.stack([res["initial"][:k], res["samples"][:k]], 1).flatten(0, 1)
    save_grid(pairs, os.path.join(args.out, "pairs.png"), nrow=8)
    if "chain" in res:
        ch = res["chain"][:, : min(args.n, 10)].transpose(0, 1).flatten(0, 1)
        save_grid(ch, os.path.join(args.out, "chain.png"), nrow=res["chain"].shape[0])
        out["chain"] = res["chain"]
    np.savez_compressed(os.path.join(args.out, "samples.npz"),
                        **{k_: v.numpy() for k_, v in out.items()}, energy=res["energy"].numpy(),
                        settings=json.dumps(res["settings"]))
    print(f"{args.n} samples ({steps} Langevin steps, step size {step_size:g}, {mode} energy) "
          f"-> {args.out}/samples.png, vae_samples.png, pairs.png, samples.npz")
    return 0
