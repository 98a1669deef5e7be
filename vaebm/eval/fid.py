"""FID (Heusel et al., 2017) and Inception Score (Salimans et al., 2016), Sec. 5.1 / Appendix E.

FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}) between Gaussians fitted to the
2048-d pool3 Inception features of two image sets. The paper's protocol: 50,000 samples against
the training set (CelebA HQ 256: its 30,000 images); IS over 50,000 samples in 10 splits.

- :func:`frechet_distance`: the formula, in float64, with pytorch-fid's fallback (add eps * I to
  both covariances when the product's square root is singular).
- :func:`feature_statistics`, :func:`save_stats`, :func:`load_stats`: (mu, sigma) as ``.npz``
  files with pytorch-fid's keys ``mu`` and ``sigma`` (TTUR's precomputed statistics load too).
- :func:`compute_features`: images (tensor, array, dataset, iterable of batches, or a sampler
  callable) -> (N, 2048) features through any extractor (default: :func:`load_inception`).
- :func:`compute_fid` -> :class:`FIDResult`, whose text always states the sample count and the
  reference statistics' source.
- :func:`inception_score_from_probs`, :func:`compute_inception_score`: IS needs the logits head,
  which only pytorch-fid's weight file has (see :mod:`vaebm.eval.inception`).

scipy is imported on first use (pip extra ``eval``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .inception import InceptionWeightsError, load_inception

__all__ = ["FIDResult", "InceptionScoreResult", "compute_features", "compute_fid",
           "compute_inception_score", "feature_statistics", "fid_from_features",
           "frechet_distance", "inception_score_from_probs", "load_stats", "save_stats",
           "InceptionWeightsError"]


def _scipy_linalg():
    try:
        import scipy.linalg
    except ImportError as e:  # pragma: no cover
        raise ImportError("FID needs scipy: pip install 'vaebm[eval]' (or pip install "
                          "scipy)") from e
    return scipy.linalg


def _check_stats(mu, sigma, name):
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu must be (D,) and sigma (D, D); got {mu.shape} and "
                         f"{sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu/sigma contain NaN or inf")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D).

    sqrtm(sigma1 @ sigma2) is computed with scipy; if it is not finite (singular product, e.g.
    fewer samples than dimensions) eps * I is added to both covariances, as pytorch-fid does.
    A square root whose imaginary part is not negligible (> 1e-3) is an error."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    linalg = _scipy_linalg()
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are expected (N < D); handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # numerical error can leave a tiny imaginary part; a large one means a broken input
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has imaginary component {m}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mu (D,), sigma (D, D) in float64 (unbiased covariance, as pytorch-fid)."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2; got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf (are the images finite?)")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def save_stats(path, mu, sigma, *, n: int | None = None, source: str | None = None) -> Path:
    """Write ``mu``, ``sigma`` (float64) to an ``.npz`` pytorch-fid and TTUR can read; ``n`` (the
    image count) and ``source`` are stored as extra keys that they ignore."""
    mu, sigma = _check_stats(mu, sigma, str(path))
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if n is not None:
        extra["n"] = np.int64(n)
    if source is not None:
        extra["source"] = np.array(str(source))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, **extra)
    tmp.replace(path)
    return path


def load_stats(path) -> dict:
    """Read ``{"mu", "sigma", "n" (or None), "source"}`` from an ``.npz`` with keys mu, sigma."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such FID statistics file")
    try:
        f = np.load(path, allow_pickle=False)
        keys = set(f.files)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz of FID statistics ({e})") from e
    with f:
        if not {"mu", "sigma"} <= keys:
            raise ValueError(f"{path}: FID statistics need keys 'mu' and 'sigma'; found "
                             f"{sorted(keys)}")
        try:
            mu, sigma = f["mu"], f["sigma"]
            n = int(f["n"]) if "n" in keys else None
            source = str(f["source"]) if "source" in keys else str(path)
        except Exception as e:
            raise ValueError(f"{path}: corrupt FID statistics ({e})") from e
    mu, sigma = _check_stats(mu, sigma, str(path))
    return {"mu": mu, "sigma": sigma, "n": n, "source": source}


# --- images -> features ----------------------------------------------------------------------

def _as_image_batch(x) -> torch.Tensor:
    """A batch in any of the accepted forms -> float (B, C, H, W) in [0, 1]."""
    if isinstance(x, (tuple, list)) and len(x) > 0 and not isinstance(x[0], (int, float)):
        x = x[0]  # (images, labels) from a data loader
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected image tensors or arrays, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W); got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf (a diverged sampler?)")
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"float images must be in [0, 1]; got range [{x.min().item():.3g}, "
                         f"{x.max().item():.3g}] (convert [-1, 1] data with (x + 1) / 2)")
    return x.clamp(0, 1)


def _image_count(images, n: int | None) -> int | None:
    """How many images :func:`iter_batches` will yield, when known in advance."""
    total = None  # unknown for an iterable of batches (a DataLoader's len counts batches)
    if hasattr(images, "__getitem__") and hasattr(images, "__len__") \
            and not isinstance(images, (list, tuple)):
        try:
            total = len(images)
        except TypeError:
            pass
    if n is None:
        return total
    return n if total is None else min(n, total)


def iter_batches(images, batch_size: int, n: int | None = None, *,
                 progress: bool | None = False, desc: str = "images") -> Iterable[torch.Tensor]:
    """Batches (B, C, H, W) in [0, 1] from: a tensor/array (N, C, H, W); a map-style dataset of
    (x, y) or x; an iterable of batches (a DataLoader); or a sampler callable ``f(b) -> (b, C, H,
    W)`` (needs ``n``). Stops after ``n`` images when ``n`` is given.

    progress: show progress (images done, rate, ETA) as ``desc``; None: unless vaebm is quiet
    (see :mod:`vaebm._progress`). The time to use each batch counts, so a caller's loop over
    the batches is what is measured."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    it = _iter_batches(images, batch_size, n)
    if progress is False:
        return it
    from .._progress import progress_iter

    return progress_iter(it, _image_count(images, n), desc, "images",
                         enabled=None if progress is None else True, count=len)


def _is_sampler(images) -> bool:
    return callable(images) and not hasattr(images, "__len__") and not hasattr(images, "__iter__")


def _iter_batches(images, batch_size: int, n: int | None = None) -> Iterable[torch.Tensor]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(images, (torch.Tensor, np.ndarray)):
        total = len(images) if n is None else min(n, len(images))
        for i in range(0, total, batch_size):
            yield _as_image_batch(images[i:min(i + batch_size, total)])
        return
    if _is_sampler(images):
        if n is None:
            raise ValueError("a sampler callable needs n (how many images to draw)")
        done = 0
        while done < n:
            b = min(batch_size, n - done)
            x = _as_image_batch(images(b))
            if x.shape[0] != b:
                raise ValueError(f"sampler returned {x.shape[0]} images, asked for {b}")
            done += b
            yield x
        return
    if hasattr(images, "__getitem__") and hasattr(images, "__len__") and not isinstance(
            images, (list, tuple)):
        total = len(images) if n is None else min(n, len(images))
        for i in range(0, total, batch_size):
            items = [images[j] for j in range(i, min(i + batch_size, total))]
            xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
            yield _as_image_batch(torch.stack([torch.as_tensor(v) for v in xs]))
        return
    done = 0
    for batch in images:  # an iterable of batches
        x = _as_image_batch(batch)
        if n is not None and done + x.shape[0] > n:
            x = x[:n - done]
        done += x.shape[0]
        yield x
        if n is not None and done >= n:
            return


@torch.no_grad()
def compute_features(images, extractor: Callable | None = None, *, n: int | None = None,
                     batch_size: int = 100, device=None, quantize: bool = True,
                     weights=None, progress: bool | None = None,
                     desc: str | None = None) -> np.ndarray:
    """(N, D) float64 features of ``images`` (see :func:`iter_batches` for the accepted forms).

    extractor: (B, C, H, W) in [0, 1] -> (B, D); default the FID Inception (pool3, D = 2048).
    quantize: round to 8-bit levels first, as when the images are saved as PNG (the usual
    protocol, and what the reference statistics of a real data set see).
    progress: images done, rate and ETA on stderr (sampling included when ``images`` is a
    sampler); None: unless vaebm is quiet. desc: what the progress calls the images."""
    if extractor is None:
        extractor = load_inception(weights, device=device)
    if desc is None:
        desc = "sampling + Inception features" if _is_sampler(images) else "Inception features"
    out = []
    for x in iter_batches(images, batch_size, n, progress=progress, desc=desc):
        if quantize:
            x = torch.round(x * 255.0) / 255.0
        if device is not None:
            x = x.to(device)
        f = extractor(x)
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"extractor must return (B, D); got {tuple(f.shape)} for "
                             f"B={x.shape[0]}")
        out.append(f.detach().double().cpu().numpy())
    if not out:
        raise ValueError("no images to compute features of")
    feats = np.concatenate(out)
    if n is not None and feats.shape[0] < n:
        raise ValueError(f"asked for {n} images but only {feats.shape[0]} were available")
    return feats


@dataclass
class FIDResult:
    """value: the FID; n_samples / n_reference: image counts; reference: where the reference
    statistics came from (file or data set name); weights: the Inception weights' file."""
    value: float
    n_samples: int
    n_reference: int | None
    reference: str
    weights: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"fid": self.value, "n_samples": self.n_samples, "n_reference": self.n_reference,
                "reference": self.reference, "weights": self.weights, **self.extra}

    def __str__(self) -> str:
        ref_n = f"{self.n_reference} images" if self.n_reference else "image count unknown"
        return (f"FID {self.value:.3f} ({self.n_samples} samples vs reference statistics of "
                f"{self.reference} ({ref_n}))")


def fid_from_features(f1, f2) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


def _reference_stats(reference, extractor, batch_size, device, reference_n, quantize, name):
    """dict(mu, sigma, n, source) from a stats file, a dict, or images."""
    if isinstance(reference, (str, Path)) and str(reference).endswith(".npz"):
        return load_stats(reference)
    if isinstance(reference, dict) and {"mu", "sigma"} <= set(reference):
        mu, sigma = _check_stats(reference["mu"], reference["sigma"], "reference statistics")
        return {"mu": mu, "sigma": sigma, "n": reference.get("n"),
                "source": reference.get("source") or name or "given statistics"}
    f = compute_features(reference, extractor, n=reference_n, batch_size=batch_size,
                         device=device, quantize=quantize, desc="reference Inception features")
    mu, sigma = feature_statistics(f)
    if name is None:
        name = (f"{type(reference).__name__} of {f.shape[0]} images"
                if isinstance(reference, (torch.Tensor, np.ndarray)) else repr(reference))
    return {"mu": mu, "sigma": sigma, "n": f.shape[0], "source": name}


def compute_fid(samples, reference, *, n: int | None = None, reference_n: int | None = None,
                extractor: Callable | None = None, weights=None, batch_size: int = 100,
                device=None, quantize: bool = True, reference_name: str | None = None,
                save_reference: str | Path | None = None,
                sample_features: np.ndarray | None = None) -> FIDResult:
    """FID of ``samples`` against ``reference``.

    samples: images in any form :func:`iter_batches` takes (a sampler callable needs ``n``).
    reference: an ``.npz`` of (mu, sigma) (pytorch-fid / TTUR / :func:`save_stats`), a dict with
        mu and sigma, or images (e.g. the training set; ``reference_n`` caps their number).
    save_reference: write the reference statistics computed from images to this ``.npz``.
    sample_features: the samples' (N, D) features when already computed (``samples`` unused).
    extractor: feature network (default: FID Inception from ``weights``, see
        :func:`vaebm.eval.inception.load_inception`)."""
    if extractor is None:
        extractor = load_inception(weights, device=device)
    source = getattr(extractor, "source", None)
    ref = _reference_stats(reference, extractor, batch_size, device, reference_n, quantize,
                           reference_name)
    if save_reference is not None:
        save_stats(save_reference, ref["mu"], ref["sigma"], n=ref["n"], source=ref["source"])
    f = sample_features if sample_features is not None else compute_features(
        samples, extractor, n=n, batch_size=batch_size, device=device, quantize=quantize)
    mu, sigma = feature_statistics(f)
    if mu.shape != ref["mu"].shape:
        raise ValueError(f"sample features are {mu.shape[0]}-d but the reference statistics are "
                         f"{ref['mu'].shape[0]}-d (different feature extractor?)")
    value = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    return FIDResult(value, f.shape[0], ref["n"], ref["source"], source)


# --- Inception Score -----------------------------------------------------------------------

def inception_score_from_probs(probs, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` equal parts; probs (N, K)
    rows summing to 1. Splits as in the published scripts (contiguous, N // splits each)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"probs must be (N, K) with N >= splits >= 1; got {p.shape}, "
                         f"splits={splits}")
    if not np.allclose(p.sum(1), 1.0, atol=1e-4) or (p < 0).any():
        raise ValueError("probs rows must be probability vectors (non-negative, summing to 1)")
    n = p.shape[0]
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        # 0 * log 0 = 0; the terms with p(y|x) = 0 contribute nothing
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass
class InceptionScoreResult:
    mean: float
    std: float
    n_samples: int
    splits: int
    weights: str | None = None

    def as_dict(self) -> dict:
        return {"is_mean": self.mean, "is_std": self.std, "n_samples": self.n_samples,
                "splits": self.splits, "weights": self.weights}

    def __str__(self) -> str:
        return (f"IS {self.mean:.3f} +- {self.std:.3f} ({self.n_samples} samples, "
                f"{self.splits} splits)")


@torch.no_grad()
def compute_inception_score(samples, *, n: int | None = None, weights=None, network=None,
                            splits: int = 10, num_classes: int = 1000, batch_size: int = 100,
                            device=None, quantize: bool = True, download: bool = False,
                            features: np.ndarray | None = None) -> InceptionScoreResult:
    """Inception Score of ``samples`` (any form :func:`iter_batches` takes).

    Needs Inception weights with the logits head (pytorch-fid's .pth); raises
    :class:`InceptionWeightsError` saying so otherwise. The softmax is over the first
    ``num_classes`` = 1000 of the 1008 logits, as VAEBM's published IS script (tsc2017) does.
    ``features``: the samples' (N, 2048) pool3 features when already computed (for FID)."""
    net = network if network is not None else load_inception(weights, device=device,
                                                              download=download)
    if not getattr(net, "has_logits", False):
        net.logits(torch.zeros(1, 2048))  # raises the explanatory InceptionWeightsError
    if not 1 < num_classes <= 1008:
        raise ValueError(f"num_classes must be in 2..1008, got {num_classes}")
    if features is None:
        features = compute_features(samples, net, n=n, batch_size=batch_size, device=device,
                                    quantize=quantize)
    probs = []
    for i in range(0, len(features), 4096):
        f = torch.as_tensor(features[i:i + 4096]).float()
        head = getattr(net, "fc", None)
        if isinstance(head, torch.nn.Module):
            p_ = next(head.parameters())
            f = f.to(device=p_.device, dtype=p_.dtype)
        logits = net.logits(f)[:, :num_classes].double()
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
    p = np.concatenate(probs)
    mean, std = inception_score_from_probs(p, splits)
    return InceptionScoreResult(mean, std, p.shape[0], splits, getattr(net, "source", None))
