"""CUDA backend of the fused Langevin ops (sources: csrc/cuda/langevin_cuda*.{cu,cpp,h}).

Built on first use (never at import) for the compute capabilities of the visible GPUs, with
explicit ``-gencode`` flags, accurate ``logf``/``sinf``/``cosf`` (no fast math: the normals must
match the reference within 1e-6) and no FMA contraction (``-fmad=false``), so the element update
rounds op by op like the PyTorch reference and the C++ CPU backend.
"""

from __future__ import annotations

import threading

import torch

from ._build import build_extension

_SOURCES = ["cuda/langevin_cuda_binding.cpp", "cuda/langevin_cuda.cu"]
_MASK = 0xFFFFFFFF
_lock = threading.Lock()
_ready = False


def _capabilities() -> list[tuple[int, int]]:
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def load() -> None:
    """Build (or reuse from the cache) and load the extension; raise with the reason if not."""
    global _ready
    if _ready:
        return
    if torch.version.cuda is None:
        raise RuntimeError(f"this torch build ({torch.__version__}) has no CUDA support")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available (torch.cuda.is_available() is False)")
    with _lock:
        if _ready:
            return
        caps = _capabilities()
        gencode = [f"-gencode=arch=compute_{ma}{mi},code=sm_{ma}{mi}" for ma, mi in caps]
        target = "cuda{}-{}".format(torch.version.cuda,
                                    "-".join(f"sm{ma}{mi}" for ma, mi in caps))
        build_extension("vaebm_cuda", _SOURCES, cflags=["-O3"],
                        cuda_cflags=["-O3", "-fmad=false", *gencode], target=target)
        _ready = True


def update_(states, grads, outs, *, step, seed, sample_offset, a, b, lam, clip_value, lo, hi,
            gscale=None, mode=None):
    load()
    seed = int(seed)
    # the 64-bit seed travels as two 32-bit halves (an int64 schema argument cannot hold 2**63+);
    # only sample_offset mod 2**32 enters the Philox counter
    torch.ops.vaebm_cuda.update(states, grads, outs, step, seed & _MASK, seed >> 32,
                                int(sample_offset) & _MASK, float(a), float(b), float(lam),
                                float(clip_value), float(lo), float(hi), gscale, mode)


def reduce(states, grads, others, *, a, lam, clip_value, gscale=None):
    load()
    return torch.ops.vaebm_cuda.reduce(states, grads, others, float(a), float(lam),
                                       float(clip_value), gscale)

from ._cuda_nn import (swish_bwd, swish_bwd2, swish_fwd, weight_norm_bwd,  # noqa: E402,F401
                       weight_norm_fwd)
