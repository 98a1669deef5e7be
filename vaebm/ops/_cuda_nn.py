"""CUDA kernels of scaled Swish and weight norm (sources: csrc/cuda/nn_cuda*.{cu,cpp,h}), served
through the cuda backend (``vaebm.ops._cuda``).

Their own extension, ``vaebm_cuda_nn``, is built on the first call of one of these functions
(never at import) for the compute capabilities of the visible GPUs, with explicit ``-gencode``
flags and accurate ``expf``/division (no fast math).
"""

from __future__ import annotations

import threading

import torch

from ._build import build_extension

_SOURCES = ["cuda/nn_cuda_binding.cpp", "cuda/nn_cuda.cu"]
_lock = threading.Lock()
_ops = None


def _load():
    global _ops
    if _ops is not None:
        return _ops
    if torch.version.cuda is None:
        raise RuntimeError(f"this torch build ({torch.__version__}) has no CUDA support")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available (torch.cuda.is_available() is False)")
    with _lock:
        if _ops is None:
            caps = sorted({torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            gencode = [f"-gencode=arch=compute_{ma}{mi},code=sm_{ma}{mi}" for ma, mi in caps]
            target = "cuda{}-{}".format(torch.version.cuda,
                                        "-".join(f"sm{ma}{mi}" for ma, mi in caps))
            build_extension("vaebm_cuda_nn", _SOURCES, cflags=["-O3"],
                            cuda_cflags=["-O3", *gencode], target=target)
            _ops = torch.ops.vaebm_cuda_nn
    return _ops


def swish_fwd(x, bias):
    """silu(x + bias[c]) / 1.1; x contiguous or channels_last, bias (C,) or None."""
    return _load().swish_fwd(x, bias)


def swish_bwd(grad, x, bias):
    return _load().swish_bwd(grad, x, bias)


def swish_bwd2(gg, grad, x, bias):
    return _load().swish_bwd2(gg, grad, x, bias)


def weight_norm_fwd(v, log_g):
    return _load().weight_norm_fwd(v, log_g)


def weight_norm_bwd(grad_w, v, log_g):
    return tuple(_load().weight_norm_bwd(grad_w, v, log_g))
