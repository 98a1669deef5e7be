"""Controlled stage-2 runs on one frozen VAE: why the energy drifts, and which recipe helps.

    python examples/stage2_study.py --vae RUN/vae --out RUN/study [--variants a,b] [--iters 150]
        [--n 1000] [--ref-n 2000] [--seed 0]

Every variant trains a fresh energy net (same seed, same data order, same VAE) for ``--iters``
iterations with the overrides of its row in :data:`VARIANTS`, then draws ``--n`` samples twice
from the same starting noise (Philox, keyed by seed and sample index): the VAE's own (no
Langevin step) and VAEBM's (the variant's test-time chain). It records the energy trajectory
(E of data and of negatives per iteration, their gap, the largest |E|), rollbacks from
``events.log``, wall times, pixel statistics and, when FID Inception weights are installed,
FID of both sample sets against ``--ref-n`` training images. Results go to
``OUT/study.json`` (one entry per variant, merged with earlier runs of other variants) and
a markdown table on stdout; runs resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_lib import read_csv  # noqa: E402

# The rows: EBMConfig overrides on top of the `fashion_mnist` stage-2 preset.
VARIANTS: dict[str, dict] = {
    # the preset as it was (CIFAR-10's published recipe): x-samples, 10 steps of 8e-5
    "published": dict(),
    # the documented Fashion-MNIST run's larger step
    "sample_3e-3": dict(ld_step_size=3e-3, ld_steps=10),
    # decoder means in the chain and in the loss (published CelebA/LSUN choice for the loss)
    "mean_3e-3": dict(negative="mean", chain_negative="mean", ld_step_size=3e-3, ld_steps=10),
    # + IGEBM's energy L2: bounded energies
    "mean_3e-3_l2": dict(negative="mean", chain_negative="mean", ld_step_size=3e-3, ld_steps=10,
                         energy_l2=1.0),
    "mean_1e-2_l2": dict(negative="mean", chain_negative="mean", ld_step_size=1e-2, ld_steps=10,
                         energy_l2=1.0),
    "sample_3e-3_l2": dict(ld_step_size=3e-3, ld_steps=10, energy_l2=1.0),
    "mean_3e-3_l2_lr1e-4": dict(negative="mean", chain_negative="mean", ld_step_size=3e-3,
                                ld_steps=10, energy_l2=1.0, lr=1e-4),
    "small_mean_3e-3_l2": dict(energy_preset="mnist_small", negative="mean",
                               chain_negative="mean", ld_step_size=3e-3, ld_steps=10,
                               energy_l2=1.0),
    "small_mean_3e-3_l2p1": dict(energy_preset="mnist_small", negative="mean",
                                 chain_negative="mean", ld_step_size=3e-3, ld_steps=10,
                                 energy_l2=0.1),
    "small_mean_1e-2_l2p1": dict(energy_preset="mnist_small", negative="mean",
                                 chain_negative="mean", ld_step_size=1e-2, ld_steps=10,
                                 energy_l2=0.1),
    "small_sample_3e-3": dict(energy_preset="mnist_small", ld_step_size=3e-3, ld_steps=10),
    "small_published": dict(energy_preset="mnist_small"),
    "mean_3e-3_l2_buf": dict(negative="mean", chain_negative="mean", ld_step_size=3e-3,
                             ld_steps=10, energy_l2=1.0, buffer_size=2000, buffer_ramp=50),
}


def _stats(x: torch.Tensor) -> dict:
    x = x.float()
    return {"pixel_mean": float(x.mean()), "pixel_std": float(x.std()),
            "frac_gt_0.5": float((x > 0.5).float().mean()),
            "edge": float((x[..., 1:] - x[..., :-1]).abs().mean())}


def _trajectory(hist: dict) -> dict:
    ep, en = np.asarray(hist.get("e_pos", [])), np.asarray(hist.get("e_neg", []))
    if ep.size == 0:
        return {}
    tail = slice(max(0, len(ep) - max(1, len(ep) // 10)), None)
    return {"iters": int(ep.size), "e_pos_last10pct": float(ep[tail].mean()),
            "e_neg_last10pct": float(en[tail].mean()),
            "gap_last10pct": float((ep[tail] - en[tail]).mean()),
            "max_abs_e": float(np.abs(np.concatenate([ep, en])).max()),
            "e_pos_every10": ep[::10].round(3).tolist(), "e_neg_every10": en[::10].round(3).tolist()}


def _csv_history(path: Path) -> dict:
    """The iterations a run logged before it stopped (ebm.csv)."""
    if not path.exists():
        return {}
    rows = read_csv(path)
    return {k: [float(r[k]) for r in rows] for k in ("e_pos", "e_neg")}


def run_variant(name, over, a, vae, data, ref_feats, extractor, log):
    from vaebm.models.energy import EnergyNet
    from vaebm.sampling.generate import vaebm_sample
    from vaebm.training import TrainingDiverged, ebm_config, train_ebm

    out = Path(a.out) / name
    # max_failures=0: the first divergence ends the variant (recorded), no rollback retries
    cfg = ebm_config("fashion_mnist", **{"steps": a.iters, "batch_size": a.batch,
                                         "seed": a.seed, "out_dir": str(out), "ckpt_every": 50,
                                         "tensorboard": False, "max_failures": 0, **over})
    torch.manual_seed(a.seed)
    energy = EnergyNet(cfg.energy_preset)
    t0 = time.perf_counter()
    try:
        hist, diverged = train_ebm(vae, energy, data, cfg), None
    except TrainingDiverged as e:
        hist, diverged = _csv_history(out / "ebm.csv"), str(e)
    t_train = time.perf_counter() - t0
    energy.eval()
    events = (out / "events.log").read_text() if (out / "events.log").exists() else ""
    rollbacks = sum("divergence" in line.lower() for line in events.splitlines())
    if diverged is not None:
        row = {"variant": name, "overrides": over, "train_s": round(t_train, 1),
               "rollbacks": rollbacks, "events": events, "diverged": diverged,
               **_trajectory(hist)}
        log(f"[study] {name}: diverged ({diverged})")
        return row
    neg = cfg.chain_negative or "sample"
    t0 = time.perf_counter()
    zero = lambda x: x.flatten(1).sum(1) * 0.0  # noqa: E731
    vae_s = vaebm_sample(vae, zero, a.n, steps=0, batch=a.sample_batch, seed=a.seed + 1000)
    ebm_s = vaebm_sample(vae, energy, a.n, steps=cfg.test_ld_steps, step_size=cfg.ld_step_size,
                         batch=a.sample_batch, mode=cfg.energy_mode, negative=neg,
                         seed=a.seed + 1000)
    t_sample = time.perf_counter() - t0
    assert torch.equal(vae_s["samples"], ebm_s["initial"])  # the same starting noise
    row = {"variant": name, "overrides": over, "train_s": round(t_train, 1),
           "sample_s": round(t_sample, 1), "rollbacks": rollbacks, "events": events,
           "vae": _stats(vae_s["samples"]), "vaebm": _stats(ebm_s["samples"]),
           "moved_rms": float((ebm_s["samples"] - vae_s["samples"]).pow(2).mean().sqrt()),
           **_trajectory(hist)}
    if extractor is not None:
        from vaebm.eval.fid import compute_features, fid_from_features
        t0 = time.perf_counter()
        for key, s in (("vae", vae_s["samples"]), ("vaebm", ebm_s["samples"])):
            f = compute_features(s, extractor, batch_size=100)
            row[f"fid_{key}"] = float(fid_from_features(f, ref_feats))
        row["fid_ratio"] = row["fid_vaebm"] / row["fid_vae"]
        row["fid_s"] = round(time.perf_counter() - t0, 1)
    np.savez_compressed(out / "samples.npz", vae=vae_s["samples"].numpy(),
                        vaebm=ebm_s["samples"].numpy())
    log(f"[study] {name}: " + ", ".join(f"{k} {row[k]:.4g}" for k in
                                        ("gap_last10pct", "max_abs_e", "fid_vae", "fid_vaebm",
                                         "moved_rms") if isinstance(row.get(k), float)))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ref-n", type=int, default=2000)
    p.add_argument("--sample-batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-fid", action="store_true")
    a = p.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    for k in ("iters", "batch", "n", "ref_n", "sample_batch"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")

    from vaebm.data import get_dataset
    from vaebm.loading import load_vae

    vae, _ = load_vae(a.vae)
    vae.eval()
    data = get_dataset("fashion_mnist", root=a.data_root, split="train")
    extractor = ref_feats = None
    if not a.no_fid:
        try:
            from vaebm.eval.fid import compute_features
            from vaebm.eval.inception import load_inception
            extractor = load_inception()
        except Exception as e:  # no weights installed: the study runs without FID
            print(f"[study] no FID ({e})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if extractor is not None:
        cache = out / f"ref_feats_{a.ref_n}.npy"
        if cache.exists():
            ref_feats = np.load(cache)
        else:
            g = torch.Generator().manual_seed(12345)
            idx = torch.randperm(len(data), generator=g)[: a.ref_n]
            ref = torch.stack([data[int(i)][0] for i in idx])
            ref_feats = compute_features(ref, extractor, batch_size=100)
            np.save(cache, ref_feats)
    path = out / "study.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        results[name] = run_variant(name, VARIANTS[name], a, vae, data, ref_feats, extractor,
                                    print)
        path.write_text(json.dumps(results, indent=1))
    cols = ["variant", "iters", "rollbacks", "diverged", "gap_last10pct", "max_abs_e", "fid_vae",
            "fid_vaebm", "fid_ratio", "moved_rms", "train_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results.values():
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                for c in cols) + " |")


if __name__ == "__main__":
    main()
