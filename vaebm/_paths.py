"""Where the kernel sources live: inside the installed package, or in the source checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _checkout_dir(name: str) -> Path | None:
    root = _PKG.parent
    if (root / "setup.py").is_file() and (root / name).is_dir():
        return root / name
    return None


def csrc_dir() -> Path:
    """C++/CUDA sources: ``vaebm/_csrc`` when installed, ``csrc/`` in a checkout."""
    installed = _PKG / "_csrc"
    if installed.is_dir():
        return installed
    src = _checkout_dir("csrc")
    if src is None:
        raise FileNotFoundError(f"vaebm's C++ sources are missing: neither {installed} nor a "
                                "checkout's csrc/ exists; reinstall vaebm")
    return src


def triton_dir() -> Path | None:
    """Triton kernel sources of a source checkout (None when installed: they are copied in)."""
    return _checkout_dir("kernels")
