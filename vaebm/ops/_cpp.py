"""C++ CPU backend of the fused Langevin ops (sources: csrc/cpu/langevin_cpu.cpp).

Built on first use with explicit AVX2 / AVX-512 kernels chosen at run time (no -march=native:
the library runs on any x86-64), OpenMP for at::parallel_for, and no FP contraction so the
element update rounds op by op like the PyTorch reference.
"""

from __future__ import annotations

import torch

from ._build import build_extension

_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi"]
_MASK = 0xFFFFFFFF


def load() -> None:
    build_extension("vaebm_cpu", ["cpu/langevin_cpu.cpp"], cflags=_CFLAGS, ldflags=["-fopenmp"])
    from . import _fake  # shape functions for torch.compile, once the ops exist
    _fake.register_fakes()


def update_(states, grads, outs, *, step, seed, sample_offset, a, b, lam, clip_value, lo, hi,
            gscale=None, mode=None, chain_ids=None):
    # the 64-bit seed travels as two 32-bit halves (an int64 schema argument cannot hold 2**63+)
    torch.ops.vaebm_cpu.langevin_update_(states, grads, outs, step, seed & _MASK, seed >> 32,
                                         sample_offset, a, b, lam, clip_value, lo, hi, gscale,
                                         mode, chain_ids)

CHAIN_IDS = True  # update_ takes chain_ids (the other backends fall back to the reference)


def reduce(states, grads, others, *, a, lam, clip_value, gscale=None):
    return torch.ops.vaebm_cpu.langevin_reduce(states, grads, others, a, lam, clip_value, gscale)

from ._cpp_nn import (KERNEL_DTYPES, swish_bwd, swish_bwd2, swish_fwd,  # noqa: E402,F401
                      weight_norm_bwd, weight_norm_fwd)
