"""Mode coverage on StackedMNIST (Sec. 5.3, Table 5).

Each generated (3, H, W) image is read as three digits, one per channel (R, G, B), by a digit
classifier; its mode is ``100 * d_R + 10 * d_G + d_B`` (the labels of
:class:`vaebm.data.StackedMNIST`). Reported: how many of the 1000 modes appear at least once, and
KL(p_gen || p_data) with p_gen the generated mode frequencies and p_data uniform (1/1000) -- the
direction of Lin et al. (2018) / VEEGAN's evaluation code: sum_m p_gen(m) log(1000 p_gen(m)),
0 for a perfectly even coverage, log 1000 = 6.91 when one mode takes everything. The published
protocol draws 26,000 samples (26 per mode, :data:`DEFAULT_MODE_SAMPLES`); others use 25,600 or
50,000, so the sample count is part of every result.

The classifier is trained here (:func:`train_digit_classifier`) on any 10-class grey set (MNIST,
or Fashion-MNIST where MNIST is not at hand); its test accuracy is reported beside the modes
because a classifier's mistakes spread samples over modes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .fid import iter_batches

NUM_MODES = 1000
DEFAULT_MODE_SAMPLES = 26_000

__all__ = ["DEFAULT_MODE_SAMPLES", "DigitClassifier", "NUM_MODES", "classify_stacked",
           "evaluate_modes", "kl_to_reference", "load_classifier", "mode_statistics",
           "save_classifier", "train_digit_classifier"]


class DigitClassifier(nn.Module):
    """A small CNN: (B, 1, H, W) in [0, 1] (H, W >= 16: 28, or StackedMNIST's padded 32) ->
    (B, 10) logits. Two conv + max-pool stages, then a 7 x 7 grid (exact for 28 x 28 inputs)
    into two linear layers."""

    def __init__(self, width: int = 32, num_classes: int = 10,
                 input_size: tuple[int, int] | None = None):
        super().__init__()
        w = width
        # the (H, W) it was trained on; classify_stacked crops/pads images to it
        self.input_size = tuple(input_size) if input_size is not None else None
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 49, 128), nn.ReLU(),
                                  nn.Linear(128, num_classes))
        self.width, self.num_classes = width, num_classes

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"DigitClassifier takes (B, 1, H, W); got {tuple(x.shape)}")
        return self.head(self.features(x))


def _tensors(data, n=None):
    """(images float (N, 1, H, W) in [0, 1], labels int64 (N,)) from a dataset with
    ``as_tensors``, an (images, labels) pair, or any dataset of (x, y)."""
    if hasattr(data, "as_tensors"):
        x, y = data.as_tensors()
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        m = len(data) if n is None else min(n, len(data))
        items = [data[i] for i in range(m)]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.as_tensor([int(b) for _, b in items])
    else:
        raise TypeError(f"expected a dataset or (images, labels); got {type(data).__name__}")
    if n is not None:
        x, y = x[:n], y[:n]
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"digit images must be grey (N, 1, H, W); got {tuple(x.shape)}")
    y = y.long().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
    if y.numel() and (y.min() < 0 or y.max() > 9):
        raise ValueError("labels must be digits 0..9")
    return x.float(), y


@torch.no_grad()
def accuracy(model: nn.Module, data, *, batch_size: int = 500, device=None) -> float:
    """Fraction of ``data`` (see :func:`_tensors`) that ``model`` classifies correctly."""
    x, y = _tensors(data)
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device) if device is not None else x[i:i + batch_size]
        correct += (model(xb).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def train_digit_classifier(train, test=None, *, epochs: int = 3, batch_size: int = 128,
                           lr: float = 1e-3, width: int = 32, n_train: int | None = None,
                           shift: int = 0, seed: int = 0, device=None, log=None):
    """Train a :class:`DigitClassifier` on ``train`` (a dataset or (images, labels); labels 0..9)
    with Adam; ``shift`` > 0 adds random translations of up to that many pixels (for samples
    that are not centred like the data). Returns (model in eval mode, info dict with
    ``test_accuracy`` (None without ``test``), ``n_train``, ``n_test``, ``epochs``, ``seconds``)."""
    x, y = _tensors(train, n_train)
    if len(x) == 0:
        raise ValueError("no training images")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(width, input_size=tuple(x.shape[-2:])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            if shift:
                dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if log is not None:
            log(f"digit classifier epoch {ep + 1}/{epochs}: loss {loss.item():.4f}")
    model.eval()
    info = {"n_train": int(len(x)), "epochs": epochs, "seconds": time.time() - t0, "shift": shift,
            "test_accuracy": None, "n_test": 0}
    if test is not None:
        info["test_accuracy"] = accuracy(model, test, device=device)
        info["n_test"] = int(len(_tensors(test)[0]))
    return model, info


def save_classifier(model: DigitClassifier, path, info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str, type(None)))}
    torch.save({"state_dict": model.state_dict(), "width": model.width,
                "input_size": list(model.input_size or []), "info": meta}, path)
    return path


def load_classifier(path, device=None) -> tuple[DigitClassifier, dict]:
    """(model in eval mode, info) from :func:`save_classifier`'s file."""
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
        size = ck.get("input_size") or None
        model = DigitClassifier(int(ck["width"]), input_size=size)
        model.load_state_dict(ck["state_dict"])
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a digit classifier checkpoint ({e})") from e
    return model.to(device).eval(), dict(ck.get("info", {}))


@torch.no_grad()
def classify_stacked(images, classifier: nn.Module, *, n: int | None = None,
                     batch_size: int = 500, device=None,
                     progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Digits (N, 3) and modes (N,) = 100 d_R + 10 d_G + d_B of (N, 3, H, W) images in [0, 1]
    (any form :func:`vaebm.eval.fid.iter_batches` takes: tensors, datasets, sampler callables).

    Images are centre-cropped or zero-padded to the classifier's ``input_size`` when it has one
    (e.g. 32 x 32 padded StackedMNIST samples for a classifier trained on 28 x 28 digits:
    padding a 28-trained model's inputs costs it ~3 points of accuracy). progress: on stderr,
    sampling included (None: unless vaebm is quiet)."""
    classifier.eval()
    size = getattr(classifier, "input_size", None)
    digits = []
    desc = "sampling + classifying digits" if callable(images) and not hasattr(images, "__len__") \
        else "classifying digits"
    for x in iter_batches(images, batch_size, n, progress=progress, desc=desc):
        if x.shape[1] != 3:
            raise ValueError(f"StackedMNIST images have 3 channels; got {x.shape[1]}")
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = _fit(x, size)
        B, _, H, W = x.shape
        if device is not None:
            x = x.to(device)
        d = classifier(x.reshape(B * 3, 1, H, W)).argmax(1).reshape(B, 3)
        digits.append(d.cpu().numpy())
    if not digits:
        raise ValueError("no images to classify")
    d = np.concatenate(digits).astype(np.int64)
    return d, d[:, 0] * 100 + d[:, 1] * 10 + d[:, 2]


def _fit(x: torch.Tensor, size) -> torch.Tensor:
    """Centre-crop or zero-pad (B, C, H, W) to (H', W') = size."""
    for dim, want in ((2, size[0]), (3, size[1])):
        have = x.shape[dim]
        if have > want:
            x = x.narrow(dim, (have - want) // 2, want)
        elif have < want:
            lo = (want - have) // 2
            pad = [0, 0, 0, 0]
            pad[(3 - dim) * 2:(3 - dim) * 2 + 2] = [lo, want - have - lo]
            x = F.pad(x, pad)
    return x


def kl_to_reference(counts, reference=None) -> float:
    """KL(p || q) in nats with p = counts / sum(counts), q = ``reference`` (default uniform);
    0 log 0 = 0. Infinite when p puts mass where q has none."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if c.size == 0 or (c < 0).any() or c.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive total")
    p = c / c.sum()
    q = np.full(c.size, 1.0 / c.size) if reference is None else np.asarray(reference, np.float64)
    if q.shape != p.shape or (q < 0).any() or not math.isclose(q.sum(), 1.0, rel_tol=1e-6):
        raise ValueError(f"reference must be a probability vector of length {p.size}")
    m = p > 0
    if (q[m] == 0).any():
        return math.inf
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def mode_statistics(modes, num_modes: int = NUM_MODES, reference=None) -> dict:
    """``{"modes": covered count, "kl": KL(p_gen || reference), "n_samples", "counts"
    (num_modes,)}`` from integer mode labels (N,)."""
    m = np.asarray(modes).reshape(-1)
    if m.size == 0:
        raise ValueError("no modes given")
    if not np.issubdtype(m.dtype, np.integer) or m.min() < 0 or m.max() >= num_modes:
        raise ValueError(f"modes must be integers in 0..{num_modes - 1}")
    counts = np.bincount(m, minlength=num_modes)
    return {"modes": int((counts > 0).sum()), "kl": kl_to_reference(counts, reference),
            "n_samples": int(m.size), "counts": counts}


def evaluate_modes(samples, classifier: nn.Module, *, n: int | None = DEFAULT_MODE_SAMPLES,
                   batch_size: int = 500, device=None, reference=None,
                   classifier_info: dict | None = None) -> dict:
    """Table 5 for ``samples`` (tensors (N, 3, H, W) in [0, 1], a dataset, or a sampler callable
    ``f(b)``; ``n`` images, default 26,000): modes covered out of 1000 and KL to uniform (or to
    ``reference``, e.g. ``StackedMNIST.mode_probabilities()``), with the sample count and the
    classifier's test accuracy when ``classifier_info`` has it."""
    if n is not None and isinstance(samples, (torch.Tensor, np.ndarray)):
        n = min(n, len(samples))
    _, modes = classify_stacked(samples, classifier, n=n, batch_size=batch_size, device=device)
    res = mode_statistics(modes, reference=reference)
    if classifier_info:
        res["classifier_test_accuracy"] = classifier_info.get("test_accuracy")
    return res
