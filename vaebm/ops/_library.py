"""Every kernel op of vaebm, declared once: its schema and its fake (shape) implementation.

The ops live in one namespace, ``torch.ops.vaebm``, whatever runs them: the C++ CPU extension
registers CPU implementations (``TORCH_LIBRARY_IMPL(vaebm, CPU, m)`` in ``csrc/cpu/*.cpp``),
the CUDA extension CUDA implementations of the same ops (``csrc/cuda/*_binding.cpp``), and the
Triton launchers are ops of their own (``vaebm::triton_*``, :mod:`._triton_ops`) with the same
schemas. Declaring the schemas here, at import and before any extension is built, means:

* one schema per op, not one per backend (the extensions only implement);
* ``torch.compile`` and ``torch.library.opcheck`` know every op's shapes (the fakes below)
  whether or not a kernel was built;
* an op without a kernel for a device says so by name instead of not existing.

Argument conventions (the references in :mod:`.langevin_ref`, :mod:`.swish`, :mod:`.weight_norm`,
:mod:`.conv` are the specification): the 64-bit Philox seed travels as two 32-bit halves
(``seed_lo``, ``seed_hi``; an int64 schema argument cannot hold 2**63 and above); ``a`` is
step_size / 2 and ``b`` is sigma * sqrt(step_size); per-sample ``chain_mode`` selects update
(0) / keep (1) / reset (2) (not ``mode``, which collides with the compiler's own keyword).
"""

from __future__ import annotations

import torch

__all__ = ["LIB", "SCHEMAS", "op"]

NS = "vaebm"

SCHEMAS: dict[str, str] = {
    # fused Langevin (csrc/cpu/langevin_cpu.cpp, csrc/cuda/langevin_cuda*.cu|cpp)
    "langevin_update_": (
        "langevin_update_(Tensor[] states, Tensor[] grads, Tensor(a!)[] outs, Tensor step, "
        "int seed_lo, int seed_hi, int sample_offset, float a, float b, float lam, "
        "float clip_value, float lo, float hi, Tensor? gscale, Tensor? chain_mode, "
        "Tensor? chain_ids=None) -> ()"),
    "langevin_reduce": (
        "langevin_reduce(Tensor[] states, Tensor[] grads, Tensor[]? others, float a, float lam, "
        "float clip_value, Tensor? gscale) -> Tensor"),
    "langevin_step_": (
        "langevin_step_(Tensor(a!)[] states, Tensor[] grads, Tensor? energy, Tensor(b!) step, "
        "int seed_lo, int seed_hi, int sample_offset, Tensor? chain_ids, float a, float b, "
        "float lam, float clip_value, float clip_norm, float lo, float hi, int guard, "
        "Tensor(c!)? rec, Tensor(d!)? n_guarded) -> ()"),
    "philox_uniform": (
        "philox_uniform(Tensor samples, Tensor step, int seed_lo, int seed_hi, int stream) "
        "-> Tensor"),
    # network kernels (csrc/cpu/{swish,weight_norm,dwconv}_cpu.cpp, csrc/cuda/nn_cuda*.cu|cpp)
    "swish_fwd": "swish_fwd(Tensor x, Tensor? bias) -> Tensor",
    "swish_bwd": "swish_bwd(Tensor grad, Tensor x, Tensor? bias) -> Tensor",
    "swish_bwd2": "swish_bwd2(Tensor gg, Tensor grad, Tensor x, Tensor? bias) -> Tensor",
    "weight_norm_fwd": "weight_norm_fwd(Tensor v, Tensor log_g) -> Tensor",
    "weight_norm_bwd": "weight_norm_bwd(Tensor grad_w, Tensor v, Tensor log_g) -> (Tensor, Tensor)",
    "dwconv2d": "dwconv2d(Tensor x, Tensor w, Tensor? bias, int pad) -> Tensor",
    "dwconv2d_wgrad": "dwconv2d_wgrad(Tensor x, Tensor g, int K, int pad) -> Tensor",
}

# ------------------------------------------------------------------------------ fakes
# (parameter names are the schema's: callers such as auto_functionalize pass them by name)


def _check_lists(states, grads, what="grads"):
    torch._check(len(states) > 0, lambda: "state is empty")
    torch._check(len(grads) == len(states),
                 lambda: f"{what} has {len(grads)} tensors but the state has {len(states)}")
    for x, g in zip(states, grads):
        torch._check(x.shape == g.shape and x.dtype == g.dtype,
                     lambda: f"{what} must match the state: {tuple(g.shape)} {g.dtype} vs "
                             f"{tuple(x.shape)} {x.dtype}")


def _update_fake(states, grads, outs, step, seed_lo, seed_hi, sample_offset, a, b, lam,
                 clip_value, lo, hi, gscale, chain_mode, chain_ids=None):
    _check_lists(states, grads)
    _check_lists(states, outs, "outs")


def _reduce_fake(states, grads, others, a, lam, clip_value, gscale):
    _check_lists(states, grads)
    if others is not None:
        _check_lists(states, others, "others")
    return states[0].new_empty((states[0].shape[0], 4), dtype=torch.float32)


def _step_fake(states, grads, energy, step, seed_lo, seed_hi, sample_offset, chain_ids, a, b,
               lam, clip_value, clip_norm, lo, hi, guard, rec, n_guarded):
    _check_lists(states, grads)


def _uniform_fake(samples, step, seed_lo, seed_hi, stream):
    return samples.new_empty(samples.shape, dtype=torch.float32)


def _swish_fwd_fake(x, bias):  # every Swish output has x's shape, dtype and strides
    return torch.empty_like(x)


def _swish_bwd_fake(grad, x, bias):
    return torch.empty_like(x)


def _swish_bwd2_fake(gg, grad, x, bias):
    return torch.empty_like(x)


def _wn_fwd_fake(v, log_g):
    return torch.empty_like(v)


def _wn_bwd_fake(grad_w, v, log_g):
    return torch.empty_like(v), torch.empty_like(log_g)


def _dw_fake(x, w, bias, pad):
    k = w.shape[-1]
    return x.new_empty((x.shape[0], x.shape[1], x.shape[2] + 2 * pad - k + 1,
                        x.shape[3] + 2 * pad - k + 1))


def _dw_wgrad_fake(x, g, K, pad):
    return x.new_empty((x.shape[1], 1, K, K))


FAKES = {
    "langevin_update_": _update_fake, "langevin_reduce": _reduce_fake,
    "langevin_step_": _step_fake, "philox_uniform": _uniform_fake, "swish_fwd": _swish_fwd_fake,
    "swish_bwd": _swish_bwd_fake, "swish_bwd2": _swish_bwd2_fake, "weight_norm_fwd": _wn_fwd_fake, "weight_norm_bwd": _wn_bwd_fake,
    "dwconv2d": _dw_fake, "dwconv2d_wgrad": _dw_wgrad_fake,
}

# the Triton Langevin launchers: the same schemas under a triton_ prefix (their kernels read a
# table of raw data pointers, so they stay opaque to the compiler: see _triton_ops)
TRITON = ("langevin_update_", "langevin_reduce")

LIB = torch.library.Library(NS, "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    for _prefix in ("", "triton_") if _name in TRITON else ("",):
        LIB.define(_prefix + _schema)
        torch.library.register_fake(f"{NS}::{_prefix}{_name}", FAKES[_name], lib=LIB)


def op(name: str):
    """The overload packet ``torch.ops.vaebm.<name>`` of a declared op."""
    return getattr(torch.ops.vaebm, name)
