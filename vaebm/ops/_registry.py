"""Backend selection, decided per call from the tensors' device.

Order: the explicit ``backend=`` argument, then the innermost :func:`use_backend` context, then
the ``VAEBM_BACKEND`` environment variable, then ``"auto"``. ``"auto"`` tries the fastest
backend for the device and falls back (one logged warning per backend) if it cannot be built;
a backend asked for by name must run or raise :class:`BackendUnavailable` saying why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch

log = logging.getLogger("vaebm")

BACKENDS = ("torch", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
# what loading a backend as a whole means (``vaebm backends``): its extensions
_BACKEND_EXTS = {"cpp": ("cpu", "cpu_nn"), "cuda": ("cuda", "cuda_nn"), "triton": ("triton",)}

_local = threading.local()
_failed: dict[str, str] = {}  # extension key -> why it failed (auto skips it from then on)


class Kernel:
    """One backend's implementation of an op: the extension that holds it (a key of
    ``_build.EXTENSIONS``, or ``"triton"``), the op's name there and the dtypes it serves.
    ``get()`` returns the callable (an op overload), built on first use."""

    __slots__ = ("ext", "name", "dtypes", "features")

    def __init__(self, ext: str, name: str, dtypes: tuple, features: tuple = ()):
        self.ext, self.name, self.dtypes, self.features = ext, name, tuple(dtypes), features

    def get(self):
        load_extension(self.ext)
        return getattr(torch.ops.vaebm, self.name).default


def load_extension(key: str) -> None:
    """Build/load one extension (``"cpu"``, ``"cpu_nn"``, ``"cuda"``, ``"cuda_nn"``) or the
    Triton launchers (``"triton"``); raises BackendUnavailable with the cause."""
    try:
        if key == "triton":
            from . import _triton_ops
            _triton_ops.load()
        else:
            from . import _build
            _build.load_extension(key)
    except BackendUnavailable:
        raise
    except Exception as e:  # a build failure carries the compiler log in its message
        raise BackendUnavailable(f"{_EXT_BACKEND.get(key, key)} backend ({key} kernels) "
                                 f"failed to load: {e}") from e


_EXT_BACKEND = {e: b for b, exts in _BACKEND_EXTS.items() for e in exts}


def resolve_op(table: dict, device: torch.device, dtype: torch.dtype,
               backend: str | None = None, *, need: tuple = ()):
    """(backend name, callable) that will run an op on ``device`` / ``dtype``; the callable is
    None for the PyTorch implementation. ``table`` maps backend names to :class:`Kernel`s (each
    op file holds its own). Order: the explicit ``backend``, then :func:`use_backend`, then
    ``VAEBM_BACKEND``, then ``"auto"``. A backend named explicitly must serve the op, the dtype
    and the ``need``-ed features, or raise :class:`BackendUnavailable` saying why; ``"auto"``
    tries the device's backends fastest first and quietly skips the ones that cannot (a build
    failure is logged once)."""
    name = requested_backend(backend)
    if name == "torch":
        return "torch", None
    if name != "auto":
        reason = why_not(name, device)
        if reason:
            raise BackendUnavailable(reason)
        k = table.get(name)
        if k is None or not set(need) <= set(k.features):
            what = (k or next(iter(table.values()))).name.removeprefix("triton_")
            extra = f" with {', '.join(need)}" if k is not None else ""
            raise BackendUnavailable(f"the {name} backend does not implement {what}{extra}; "
                                     f"use backend='torch' or 'auto'")
        if dtype not in k.dtypes:
            raise BackendUnavailable(f"the {name} backend's {k.name} supports "
                                     f"{', '.join(map(str, k.dtypes))}, got {dtype}")
        return name, k.get()
    for cand in _AUTO_ORDER.get(device.type, ("torch",)):
        k = table.get(cand)
        if k is None or dtype not in k.dtypes or not set(need) <= set(k.features):
            continue
        if k.ext in _failed or why_not(cand, device):
            continue
        try:
            return cand, k.get()
        except BackendUnavailable as e:
            _failed[k.ext] = str(e)
            log.warning("vaebm: %s backend unavailable, falling back: %s", cand, e)
    return "torch", None


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed ops on backend ``name`` (``"auto"``, ``"torch"``, ``"cpp"``, ...)."""
    _check_name(name)
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")


def requested_backend(backend: str | None = None) -> str:
    if backend is None:
        stack = getattr(_local, "stack", None)
        backend = stack[-1] if stack else os.environ.get("VAEBM_BACKEND", "auto") or "auto"
    _check_name(backend)
    return backend


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can serve tensors on ``device``, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "cpp" and device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {device}"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
    if name == "triton":
        if device.type == "cpu" and not interpreting_triton():
            return "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before import"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend does not run on {device}"
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton is not installed ({e}); pip install triton"
    return None


def load(name: str) -> None:
    """Build/load every extension of backend ``name`` (``vaebm backends``); raises
    BackendUnavailable with the cause."""
    for key in _BACKEND_EXTS.get(name, ()):
        load_extension(key)


def resolve(device: torch.device, backend: str | None = None):
    """(name, update op) of the backend that runs the fused Langevin ops on ``device``."""
    from .langevin import UPDATE
    return resolve_op(UPDATE, device, torch.float32, backend)


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Map each backend to None (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    out = {}
    for name in BACKENDS:
        reason = why_not(name, device)
        if reason is None and name != "torch":
            try:  # the backend's first extension: its Langevin kernels
                load_extension(_BACKEND_EXTS[name][0])
            except BackendUnavailable as e:
                reason = str(e)
        out[name] = reason
    return out
