"""Out-of-distribution detection with the unnormalised VAEBM density (Sec. 5.3, Table 6).

The score of an image is log h(x) = log p_theta(x) - E_psi(x) (Eq. 5 without log Z, which is the
same for every x and so leaves the AUROC unchanged); log p_theta(x) comes from a bound, the
ELBO or the IWAE bound, of the stage-1 VAE (:class:`vaebm.models.eps_space.StageOneVAE`). The
AUROC treats in-distribution (e.g. CIFAR-10 test) as the positive class: 1 means every
in-distribution image scores above every OOD image, 0.5 is chance (Nalisnick et al., 2019).

OOD sets: any images (SVHN, CIFAR-100, CelebA, ... read with :mod:`vaebm.data`), plus builders
for the synthetic ones: :func:`noise_images`, :func:`interpolate_images` (Table 6's "Interp."),
:func:`grey_to_rgb` (MNIST digits at CIFAR's size and channels).

scikit-learn computes the AUROC (imported on first use; pip extra ``eval``).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .fid import iter_batches

__all__ = ["auroc", "elbo_log_p", "grey_to_rgb", "interpolate_images", "iwae_log_p",
           "log_h_fn", "noise_images", "ood_auroc", "score_images"]


# --- scores ----------------------------------------------------------------------------------

def elbo_log_p(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (B, C, H, W) -> (B,) ELBO = log p(x|z) - sum_l KL_l from ``vae.loss_terms`` (one
    reparameterised draw, so the score is itself random)."""
    def fn(x):
        terms = vae.loss_terms(x)
        kl = terms["kl"]
        kl = sum(kl) if isinstance(kl, (list, tuple)) else kl
        return terms["log_p_x"] - kl
    return fn


def iwae_log_p(vae, k: int = 100) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> (B,) importance-weighted bound with ``k`` samples (``vae.iwae``); tighter than the
    ELBO, and deterministic up to the VAE's sampling."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return lambda x: vae.iwae(x, k)


def log_h_fn(log_p: Callable, energy: Callable | None = None) -> Callable:
    """x -> log p(x) - E(x) (B,); ``energy=None`` scores with the VAE alone (the NVAE row)."""
    def fn(x):
        lp = log_p(x)
        return lp if energy is None else lp - energy(x).reshape(lp.shape)
    return fn


@torch.no_grad()
def score_images(images, score_fn: Callable, *, n: int | None = None, batch_size: int = 100,
                 device=None, progress: bool | None = None) -> np.ndarray:
    """(N,) float64 scores ``score_fn(x)`` over images in any form
    :func:`vaebm.eval.fid.iter_batches` takes. progress: on stderr (None: unless vaebm is
    quiet)."""
    out = []
    for x in iter_batches(images, batch_size, n, progress=progress, desc="scoring images"):
        if device is not None:
            x = x.to(device)
        s = score_fn(x)
        if torch.is_tensor(s):
            s = s.detach().double().reshape(-1).cpu().numpy()
        else:
            s = np.asarray(s, dtype=np.float64).reshape(-1)
        if s.shape[0] != x.shape[0]:
            raise ValueError(f"score_fn returned {s.shape[0]} scores for {x.shape[0]} images")
        out.append(s)
    if not out:
        raise ValueError("no images to score")
    return np.concatenate(out)


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve for telling in-distribution (high score) from OOD (low score).
    Ties count one half. Scores must be finite."""
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError as e:  # pragma: no cover
        raise ImportError("AUROC needs scikit-learn: pip install 'vaebm[eval]' "
                          "(or pip install scikit-learn)") from e
    a = np.asarray(in_scores, dtype=np.float64).reshape(-1)
    b = np.asarray(out_scores, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("both in-distribution and OOD scores are needed")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores contain NaN or inf; check the model (or drop those images)")
    y = np.concatenate([np.ones(a.size), np.zeros(b.size)])
    return float(roc_auc_score(y, np.concatenate([a, b])))


def ood_auroc(score_fn: Callable, in_data, ood_sets: Mapping[str, object], *,
              n: int | None = None, batch_size: int = 100, device=None,
              in_scores: np.ndarray | None = None) -> dict:
    """Table 6: AUROC of ``score_fn`` (e.g. :func:`log_h_fn`) for each OOD set against
    ``in_data``. Returns ``{"in": {"n", "mean_score"}, name: {"auroc", "n", "mean_score"}}``
    plus ``"scores"``: {"in": array, name: array} for histograms. ``n`` caps every set."""
    if not ood_sets:
        raise ValueError("ood_sets is empty")
    clash = {"in", "scores"} & set(ood_sets)
    if clash:
        raise ValueError(f"OOD set names {sorted(clash)} are reserved; rename them")
    s_in = in_scores if in_scores is not None else score_images(
        in_data, score_fn, n=n, batch_size=batch_size, device=device)
    res = {"in": {"n": int(s_in.size), "mean_score": float(np.mean(s_in))},
           "scores": {"in": s_in}}
    for name, data in ood_sets.items():
        s = score_images(data, score_fn, n=n, batch_size=batch_size, device=device)
        res[name] = {"auroc": auroc(s_in, s), "n": int(s.size), "mean_score": float(np.mean(s))}
        res["scores"][name] = s
    return res


# --- OOD set builders ---------------------------------------------------------------------------

def noise_images(n: int, shape=(3, 32, 32), *, kind: str = "uniform",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, *shape) noise images in [0, 1]: ``uniform`` U[0, 1] per pixel, ``gaussian``
    N(0.5, 0.25^2) clipped to [0, 1], or ``constant`` (one random grey level per image)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    shape = (n, *shape)
    if kind == "uniform":
        return torch.rand(shape, generator=generator)
    if kind == "gaussian":
        return (0.5 + 0.25 * torch.randn(shape, generator=generator)).clamp_(0, 1)
    if kind == "constant":
        return torch.rand((n,) + (1,) * (len(shape) - 1), generator=generator).expand(shape).clone()
    raise ValueError(f"kind must be 'uniform', 'gaussian' or 'constant', got {kind!r}")


def interpolate_images(images: torch.Tensor, n: int | None = None, *, alpha: float | None = 0.5,
                       generator: torch.Generator | None = None, return_pairs: bool = False):
    """Linear interpolations (1 - a) x_i + a x_j between random pairs i != j of ``images``
    (N, C, H, W) (Table 6's "Interp." set, from CIFAR-10 test images). ``alpha=None`` draws a
    ~ U[0, 1] per pair. Returns (n, C, H, W) (and (n, 2) pair indices, (n,) alphas)."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"images must be (N >= 2, C, H, W); got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    n = x.shape[0] if n is None else int(n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    N = x.shape[0]
    i = torch.randint(0, N, (n,), generator=generator)
    # j uniform over the other N - 1 images: shift by 1..N-1
    j = (i + torch.randint(1, N, (n,), generator=generator)) % N
    if alpha is None:
        a = torch.rand(n, generator=generator)
    else:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        a = torch.full((n,), float(alpha))
    w = a.to(x.dtype).view(-1, 1, 1, 1)
    out = (1 - w) * x[i] + w * x[j]
    return (out, torch.stack([i, j], 1), a) if return_pairs else out


def grey_to_rgb(images, size: int | tuple[int, int] = 32, *, channels: int = 3,
                mode: str = "pad") -> torch.Tensor:
    """Grey digits (N, 1, H, W) or (N, H, W) (uint8 or [0, 1]), an (images, labels) pair or a
    dataset of (x (1, H, W), y) -> (N, channels, S, S) in [0, 1]:
    ``pad`` centres them with zeros (28 -> 32, as NVAE pads MNIST) or ``resize`` (bilinear)."""
    if hasattr(images, "as_tensors"):  # a vaebm.data dataset (MNIST, FashionMNIST, ...)
        x = images.as_tensors()[0]
    elif (isinstance(images, (tuple, list)) and len(images) == 2
          and isinstance(images[0], (torch.Tensor, np.ndarray)) and np.ndim(images[0]) >= 3):
        x = images[0]  # (images, labels)
    elif isinstance(images, (torch.Tensor, np.ndarray)):
        x = images
    elif hasattr(images, "__getitem__") and hasattr(images, "__len__"):  # any dataset of (x, y)
        x = torch.stack([torch.as_tensor(images[i][0]) for i in range(len(images))])
    else:
        raise TypeError(f"expected grey images or a dataset, got {type(images).__name__}")
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"grey images must be (N, 1, H, W) or (N, H, W); got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    S = (size, size) if isinstance(size, int) else tuple(size)
    H, W = x.shape[-2:]
    if mode == "pad":
        ph, pw = S[0] - H, S[1] - W
        if ph < 0 or pw < 0:
            raise ValueError(f"cannot pad {H}x{W} images to {S[0]}x{S[1]}; use mode='resize'")
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    elif mode == "resize":
        if (H, W) != S:
            x = F.interpolate(x, size=S, mode="bilinear", align_corners=False).clamp_(0, 1)
    else:
        raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")
    return x.expand(-1, channels, -1, -1).contiguous()
