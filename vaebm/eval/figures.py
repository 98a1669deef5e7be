"""Overfitting checks as figures: likelihood histograms (Fig. 6, Appendix D) and nearest
training neighbours of samples (Figs. 16-19, Appendix I).

- :func:`nearest_neighbors`: exact k nearest rows by Euclidean (L2) distance, chunked so that a
  50,000-image training set never has to sit in memory as one distance matrix. Works on pixels
  (optionally a centre crop, as Figs. 18-19 use 160 x 160 of CelebA HQ 256) or on features
  (:func:`feature_neighbors` with the FID Inception's pool3 features, Fig. 17).
- :func:`save_neighbor_grid`: one row per sample, the sample first then its k neighbours (PNG,
  no dependency beyond numpy).
- :func:`plot_likelihood_histograms`: overlaid histograms of log h(x) for e.g. 10k train and 10k
  test images; matplotlib is imported on first use (pip extra ``eval``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .fid import compute_features, iter_batches

__all__ = ["center_crop", "feature_neighbors", "nearest_neighbors", "plot_likelihood_histograms",
           "save_neighbor_grid"]


def center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The central ``size`` x ``size`` window of (..., H, W)."""
    sh, sw = (size, size) if isinstance(size, int) else size
    H, W = x.shape[-2:]
    if sh > H or sw > W:
        raise ValueError(f"crop {sh}x{sw} is larger than the {H}x{W} images")
    t, l = (H - sh) // 2, (W - sw) // 2
    return x[..., t:t + sh, l:l + sw]


def _rows(x, crop) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if crop is not None:
        x = center_crop(x, crop)
    return x.reshape(x.shape[0], -1).double()


def _reference_chunks(reference, batch_size, crop):
    """Chunks (b, D) float64 of the reference rows: from a tensor/array, or images in any form
    :func:`vaebm.eval.fid.iter_batches` takes (a dataset)."""
    if isinstance(reference, (torch.Tensor, np.ndarray)):
        for i in range(0, len(reference), batch_size):
            yield _rows(reference[i:i + batch_size], crop)
    else:
        for x in iter_batches(reference, batch_size):
            yield _rows(x, crop)


@torch.no_grad()
def nearest_neighbors(queries, reference, k: int = 10, *, batch_size: int = 2048,
                      crop: int | tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest reference rows of every query by L2 distance.

    queries: (N, ...) tensor/array (images (N, C, H, W) or features (N, D)); reference: (M, ...)
    of the same trailing shape, or an image dataset. ``crop`` compares only the centre crop of
    images. Returns (distances (N, k) float64 ascending, indices (N, k) int64 into reference)."""
    q = _rows(queries, crop)
    if q.shape[0] == 0:
        raise ValueError("no queries")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    qn = (q * q).sum(1, keepdim=True)
    best_d = torch.full((q.shape[0], 0), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    seen = 0
    for r in _reference_chunks(reference, batch_size, crop):
        if r.shape[1] != q.shape[1]:
            raise ValueError(f"queries have {q.shape[1]} values per row, reference {r.shape[1]}")
        # ||q - r||^2 = |q|^2 + |r|^2 - 2 q.r, in float64 so that near-duplicates still rank right
        d2 = (qn + (r * r).sum(1)[None, :] - 2.0 * q @ r.T).clamp_min_(0.0)
        idx = torch.arange(seen, seen + r.shape[0]).expand(q.shape[0], -1)
        cand_d = torch.cat([best_d, d2], 1)
        cand_i = torch.cat([best_i, idx], 1)
        kk = min(k, cand_d.shape[1])
        best_d, pos = torch.topk(cand_d, kk, dim=1, largest=False, sorted=True)
        best_i = torch.gather(cand_i, 1, pos)
        seen += r.shape[0]
    if seen < k:
        raise ValueError(f"k={k} neighbours asked but the reference has only {seen} rows")
    return best_d.sqrt().numpy(), best_i.numpy()


def feature_neighbors(samples, reference_images, k: int = 10, *, extractor=None, weights=None,
                      batch_size: int = 100, device=None, crop=None):
    """Nearest neighbours in feature space (Fig. 17): features of ``samples`` and of the
    reference images by ``extractor`` (default: the FID Inception's pool3), then
    :func:`nearest_neighbors`. Returns (distances, indices, sample features, reference features)."""
    if crop is not None:
        samples = center_crop(torch.as_tensor(samples), crop)
        if not isinstance(reference_images, (torch.Tensor, np.ndarray)):
            reference_images = torch.cat(list(iter_batches(reference_images, batch_size)))
        reference_images = center_crop(torch.as_tensor(reference_images), crop)
    fs = compute_features(samples, extractor, batch_size=batch_size, device=device,
                          weights=weights)
    fr = compute_features(reference_images, extractor, batch_size=batch_size, device=device,
                          weights=weights)
    d, i = nearest_neighbors(fs, fr, k)
    return d, i, fs, fr


def save_neighbor_grid(samples, reference_images, indices, path, *, padding: int = 2) -> Path:
    """PNG with one row per sample: the sample, then ``reference_images[indices[row]]``.
    samples (N, C, H, W), reference images indexable by an int (tensor or dataset of (x, y))."""
    from ..imageio import save_grid

    s = torch.as_tensor(samples)
    s = s.float() / 255.0 if s.dtype == torch.uint8 else s.float()
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[0] != s.shape[0]:
        raise ValueError(f"indices must be (N, k) with N = {s.shape[0]} samples; got {idx.shape}")

    def ref(j):
        r = reference_images[int(j)]
        r = r[0] if isinstance(r, (tuple, list)) else r
        r = torch.as_tensor(r)
        return r.float() / 255.0 if r.dtype == torch.uint8 else r.float()

    tiles = []
    for row in range(s.shape[0]):
        tiles.append(s[row])
        tiles.extend(ref(j) for j in idx[row])
    grid = torch.stack(tiles).clamp(0, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, path, nrow=idx.shape[1] + 1, padding=padding)
    return path


def plot_likelihood_histograms(scores: Mapping[str, np.ndarray], path, *, bins: int = 60,
                               title: str | None = None,
                               xlabel: str = "unnormalised log-likelihood log h(x)") -> dict:
    """Overlaid density histograms of each named score set (Fig. 6: train vs test), saved to
    ``path`` (format from its suffix). Returns {name: {"n", "mean", "std"}} and the path."""
    try:  # a Figure with its own Agg canvas: no pyplot, so no global backend state is touched
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover
        raise ImportError("histograms need matplotlib: pip install 'vaebm[eval]'") from e
    if not scores:
        raise ValueError("no score sets to plot")
    arrays = {}
    for name, s in scores.items():
        a = np.asarray(s, dtype=np.float64).reshape(-1)
        a = a[np.isfinite(a)]
        if a.size == 0:
            raise ValueError(f"score set {name!r} has no finite values")
        arrays[name] = a
    lo = min(a.min() for a in arrays.values())
    hi = max(a.max() for a in arrays.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    summary = {}
    for name, a in arrays.items():
        ax.hist(a, bins=edges, density=True, alpha=0.5, label=f"{name} (n={a.size})")
        summary[name] = {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std())}
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    summary["path"] = str(path)
    return summary
