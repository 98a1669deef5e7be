"""Backend selection, decided per call from the tensors' device.

Order: the explicit ``backend=`` argument, then the innermost :func:`use_backend` context, then
the ``VAEBM_BACKEND`` environment variable, then ``"auto"``. ``"auto"`` tries the fastest
backend for the device and falls back (one logged warning per backend) if it cannot be built;
a backend asked for by name must run or raise :class:`BackendUnavailable` saying why.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading

import torch

log = logging.getLogger("vaebm")

BACKENDS = ("torch", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "triton", "torch")}
_MODULES = {"cpp": "vaebm.ops._cpp", "cuda": "vaebm.ops._cuda", "triton": "vaebm.ops._triton_backend"}

_local = threading.local()
_failed: dict[str, str] = {}


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


def load(name: str):
    """Import and build backend module ``name``; raises BackendUnavailable with the cause."""
    if name == "torch":
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
        mod.load()
        return mod
    except BackendUnavailable:
        raise
    except Exception as e:  # a build failure carries the compiler log in its message
        raise BackendUnavailable(f"backend {name!r} failed to load: {e}") from e


def resolve(device: torch.device, backend: str | None = None):
    """(name, module) of the backend that will run an op on ``device``."""
    name = requested_backend(backend)
    if name != "auto":
        reason = why_not(name, device)
        if reason:
            raise BackendUnavailable(reason)
        return name, load(name)
    for cand in _AUTO_ORDER.get(device.type, ("torch",)):
        if cand in _failed or why_not(cand, device):
            continue
        try:
            return cand, load(cand)
        except BackendUnavailable as e:
            _failed[cand] = str(e)
            log.warning("vaebm: %s backend unavailable, falling back: %s", cand, e)
    return "torch", None


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Map each backend to None (usable on ``device``) or the reason it is not."""
    device = torch.device(device)
    out = {}
    for name in BACKENDS:
        reason = why_not(name, device)
        if reason is None and name != "torch":
            try:
                load(name)
            except BackendUnavailable as e:
                reason = str(e)
        out[name] = reason
    return out
