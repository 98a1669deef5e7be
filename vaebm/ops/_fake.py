"""Fake (meta) implementations of the ``vaebm_cpu`` Langevin ops, for ``torch.compile``.

A fake implementation says what an op returns (shapes, dtypes, devices) without touching data,
so that Dynamo / AOTAutograd / Inductor can trace through the op (and ``torch.library.opcheck``
can check it). The three ops of ``csrc/cpu/langevin_cpu.cpp``:

* ``langevin_update_`` writes ``outs`` in place and returns nothing;
* ``langevin_step_`` writes ``states``, ``step`` and the statistics in place, returns nothing;
* ``langevin_reduce`` returns a new (B, 4) float32 tensor on the CPU.

The ops exist only once the extension is loaded (``vaebm.ops._cpp.load``), so registration is a
function, :func:`register_fakes`, run at import for whatever is loaded then and safe to call
again (a later registration replaces an earlier one).
"""

from __future__ import annotations

import torch

__all__ = ["register_fakes", "registered"]

_NS = "vaebm_cpu"
_done: set[str] = set()


def _check_lists(states, grads, what="grads"):
    torch._check(len(states) > 0, lambda: "state is empty")
    torch._check(len(grads) == len(states),
                 lambda: f"{what} has {len(grads)} tensors but the state has {len(states)}")
    for x, g in zip(states, grads):
        torch._check(x.shape == g.shape and x.dtype == g.dtype,
                     lambda: f"{what} must match the state: {tuple(g.shape)} {g.dtype} vs "
                             f"{tuple(x.shape)} {x.dtype}")


# (parameter names are the schema's: callers such as auto_functionalize pass them by name)
def _update_fake(states, grads, outs, step, seed_lo, seed_hi, sample_offset, a, b, lam,
                 clip_value, lo, hi, gscale, chain_mode, chain_ids=None):
    _check_lists(states, grads)
    _check_lists(states, outs, "outs")
    return None


def _reduce_fake(states, grads, others, a, lam, clip_value, gscale):
    _check_lists(states, grads)
    if others is not None:
        _check_lists(states, others, "others")
    return states[0].new_empty((states[0].shape[0], 4), dtype=torch.float32)


def _step_fake(states, grads, energy, step, seed_lo, seed_hi, sample_offset, chain_ids, a, b,
               lam, clip_value, clip_norm, lo, hi, guard, rec, n_guarded):
    _check_lists(states, grads)
    return None


_FAKES = {
    "langevin_update_": _update_fake,
    "langevin_reduce": _reduce_fake,
    "langevin_step_": _step_fake,
}


def register_fakes() -> set[str]:
    """Register the fake implementation of every ``vaebm_cpu`` Langevin op that is loaded now;
    returns the names registered so far. Idempotent."""
    ns = getattr(torch.ops, _NS)
    for name, fn in _FAKES.items():
        if name in _done:
            continue
        try:
            getattr(ns, name)
        except (AttributeError, RuntimeError):  # the extension is not loaded (yet)
            continue
        torch.library.register_fake(f"{_NS}::{name}", fn)
        _done.add(name)
    return set(_done)


def registered() -> set[str]:
    """The ops whose fake implementation this module registered."""
    return set(_done)


register_fakes()
