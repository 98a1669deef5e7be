"""Triton kernels of scaled Swish and weight norm (kernels/swish.py, kernels/weight_norm.py),
served through the triton backend (``vaebm.ops._triton_backend``).

Triton and the kernel modules are imported on the first call, never when vaebm is imported. On
CPU tensors they run only under ``TRITON_INTERPRET=1``, set before that first call.
"""

from __future__ import annotations

_mods = None


def _load():
    global _mods
    if _mods is None:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"triton is not installed ({e}); pip install triton") from e
        try:
            from vaebm._triton import swish, weight_norm
        except ImportError as e:
            raise RuntimeError(f"vaebm's Triton kernels (kernels/swish.py, kernels/weight_norm.py"
                               f", installed under vaebm/_triton) cannot be imported: {e}") from e
        _mods = swish, weight_norm
    return _mods


def swish_fwd(x, bias):
    return _load()[0].swish_fwd(x, bias)


def swish_bwd(grad, x, bias):
    return _load()[0].swish_bwd(grad, x, bias)


def swish_bwd2(gg, grad, x, bias):
    return _load()[0].swish_bwd2(gg, grad, x, bias)


def weight_norm_fwd(v, log_g):
    return _load()[1].weight_norm_fwd(v, log_g)


def weight_norm_bwd(grad_w, v, log_g):
    return _load()[1].weight_norm_bwd(grad_w, v, log_g)
