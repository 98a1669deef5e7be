"""C++ CPU kernels of scaled Swish, weight norm and the depthwise conv (sources:
csrc/cpu/swish_cpu.cpp, csrc/cpu/weight_norm_cpu.cpp, csrc/cpu/dwconv_cpu.cpp), served through the cpp backend (``vaebm.ops._cpp``).

Their own extension, ``vaebm_cpu_nn``, is built on the first call of one of these functions,
never at import. Swish takes AVX2 or AVX-512 kernels chosen at run time (no -march flag, so the
library runs on any x86-64) and is elementwise, so FMA contraction is allowed; OpenMP must be in
the compile and the link flags or at::parallel_for runs on one thread.
"""

from __future__ import annotations

import torch

from ._build import build_extension

_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
# float64 lets gradcheck run on the kernels themselves
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ops = None


def _load():
    global _ops
    if _ops is None:
        build_extension("vaebm_cpu_nn", ["cpu/swish_cpu.cpp", "cpu/weight_norm_cpu.cpp",
                                         "cpu/dwconv_cpu.cpp"],
                        cflags=_CFLAGS, ldflags=["-fopenmp"])
        _ops = torch.ops.vaebm_cpu_nn
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


def dwconv2d(x, w, bias, pad):
    """Depthwise conv, stride 1: x (B, C, H, W) float32 contiguous, w (C, 1, K, K), bias or None."""
    return _load().dwconv2d(x, w, bias, int(pad))


def dwconv2d_wgrad(x, g, k, pad):
    """Weight gradient (C, 1, k, k) of :func:`dwconv2d` for the output gradient g."""
    return _load().dwconv2d_wgrad(x, g, int(k), int(pad))
