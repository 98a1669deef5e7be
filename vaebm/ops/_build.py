"""Just-in-time build of the C++/CUDA extensions, cached by a hash of everything that matters.

The cache key covers the sources (every file under ``csrc/``), the compiler flags, the torch and
Python versions and the device target, so an edit or an upgrade rebuilds and nothing stale is
ever loaded. A build happens in a private temporary folder that is renamed into place, so
concurrent processes (``torchrun`` ranks) and interrupted builds never leave a half-written
library behind. On failure the full compiler log is raised, never swallowed.

A build (a minute or two for a cold C++ build) says on stderr what it compiles and why before it
starts, and how long it took; ``VAEBM_QUIET=1`` or ``vaebm --quiet`` silences it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._paths import csrc_dir

_loaded: dict[str, str] = {}


@dataclass(frozen=True)
class Extension:
    """One compiled library: sources (relative to csrc/), flags, and what it is (for the message
    before a build). Every op it implements is declared in :mod:`._library`."""
    name: str
    sources: tuple
    what: str
    cflags: tuple = ()
    ldflags: tuple = ()
    cuda_cflags: tuple = ()  # non-empty: built with nvcc for the visible GPUs

    @property
    def cuda(self) -> bool:
        return bool(self.cuda_cflags)


_CPU = ("-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi")
EXTENSIONS: dict[str, Extension] = {
    # explicit AVX2 / AVX-512 kernels chosen at run time (no -march: any x86-64 runs them);
    # OpenMP in compile and link flags (else at::parallel_for runs on one thread); the Langevin
    # update without FP contraction, so it rounds op by op like the PyTorch reference
    "cpu": Extension("vaebm_cpu", ("cpu/langevin_cpu.cpp",),
                     "the C++ CPU kernels of the fused Langevin step",
                     cflags=(*_CPU, "-ffp-contract=off"), ldflags=("-fopenmp",)),
    "cpu_nn": Extension("vaebm_cpu_nn", ("cpu/swish_cpu.cpp", "cpu/weight_norm_cpu.cpp",
                                         "cpu/dwconv_cpu.cpp"),
                        "the C++ CPU kernels of the networks (Swish, weight norm, depthwise conv)",
                        cflags=_CPU, ldflags=("-fopenmp",)),
    # explicit -gencode for the visible GPUs; accurate logf/sinf/cosf and no FMA contraction
    # (-fmad=false) in the Langevin kernels, so the normals and the update match the reference
    "cuda": Extension("vaebm_cuda", ("cuda/langevin_cuda_binding.cpp", "cuda/langevin_cuda.cu"),
                      "the CUDA kernels of the fused Langevin step", cflags=("-O3",),
                      cuda_cflags=("-O3", "-fmad=false")),
    "cuda_nn": Extension("vaebm_cuda_nn", ("cuda/nn_cuda_binding.cpp", "cuda/nn_cuda.cu"),
                         "the CUDA kernels of the networks (Swish, weight norm)",
                         cflags=("-O3",), cuda_cflags=("-O3",)),
}
_lock = threading.Lock()


def load_extension(key: str) -> None:
    """Build (or reuse from the cache) and load extension ``key`` of :data:`EXTENSIONS` into
    ``torch.ops.vaebm``; raises with the reason (no CUDA, a compiler log) if it cannot."""
    ext = EXTENSIONS[key]
    if ext.name in _loaded:
        return
    from . import _library  # noqa: F401  (the schemas the extension implements)
    if not ext.cuda:
        build_extension(ext.name, list(ext.sources), cflags=list(ext.cflags),
                        ldflags=list(ext.ldflags))
        return
    if torch.version.cuda is None:
        raise RuntimeError(f"this torch build ({torch.__version__}) has no CUDA support")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available (torch.cuda.is_available() is False)")
    with _lock:
        if ext.name in _loaded:
            return
        caps = sorted({torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        gencode = [f"-gencode=arch=compute_{ma}{mi},code=sm_{ma}{mi}" for ma, mi in caps]
        target = "cuda{}-{}".format(torch.version.cuda, "-".join(f"sm{ma}{mi}" for ma, mi in caps))
        build_extension(ext.name, list(ext.sources), cflags=list(ext.cflags),
                        ldflags=list(ext.ldflags), cuda_cflags=[*ext.cuda_cflags, *gencode],
                        target=target)


class BuildError(RuntimeError):
    """A kernel extension failed to compile; the message holds the compiler output."""


def cache_root() -> Path:
    root = os.environ.get("VAEBM_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vaebm" / "kernels"


def _source_digest(flags: list[str], target: str) -> str:
    h = hashlib.sha256()
    root = csrc_dir()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".h", ".cpp", ".cu", ".cuh"):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    for part in (*flags, torch.__version__, sys.version, platform.machine(), target):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build_extension(name: str, sources: list[str], *, cflags=(), ldflags=(), cuda_cflags=(),
                    target: str = "cpu", verbose: bool = False) -> str:
    """Build (or reuse) extension ``name`` from ``sources`` (paths relative to csrc/) and load it
    into ``torch.ops``. Returns the path of the shared library."""
    if name in _loaded:
        return _loaded[name]
    from torch.utils import cpp_extension

    flags = [*cflags, "|", *ldflags, "|", *cuda_cflags]
    key = _source_digest(flags, target)
    final = cache_root() / f"{name}-{key}"
    lib = final / f"{name}.so"
    if lib.is_file():
        torch.ops.load_library(str(lib))
    else:  # cpp_extension.load builds and loads the library from the temporary folder
        final.parent.mkdir(parents=True, exist_ok=True)
        t0 = _announce(name, final, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{key}-", dir=final.parent))
        srcs = [str(csrc_dir() / s) for s in sources]
        try:
            cpp_extension.load(
                name=name, sources=srcs, build_directory=str(tmp), is_python_module=False,
                extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                extra_cuda_cflags=list(cuda_cflags) or None,
                extra_include_paths=[str(csrc_dir())], verbose=verbose)
        except Exception as e:
            (tmp / "build.log").write_text(str(e))
            raise BuildError(
                f"building the {name} kernels failed (sources in {csrc_dir()}, log kept in "
                f"{tmp / 'build.log'}):\n{e}") from e
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        from .._progress import say
        say(f"vaebm: compiled {name} in {time.monotonic() - t0:.0f} s")
    _loaded[name] = str(lib)
    return str(lib)


def _announce(name: str, final: Path, target: str) -> float:
    """Say (stderr, unless quiet) what is about to be compiled and why; returns the start time."""
    from .._progress import say

    what = next((e.what for e in EXTENSIONS.values() if e.name == name),
                "the C++ CPU kernels" if target == "cpu" else "the GPU kernels")
    older = sorted((p for p in final.parent.glob(f"{name}-*")
                    if p.is_dir() and p.name != final.name), key=lambda p: p.stat().st_mtime)
    why = (f"its sources, flags, torch or Python changed since the cached build {older[-1].name}"
           if older else "first use")
    home = os.path.expanduser("~")
    where = str(final)
    if where.startswith(home + os.sep):
        where = "~" + where[len(home):]
    say(f"vaebm: compiling {what} ({name}, {why}; cached in {where} for later runs; a minute "
        f"or two, once) ...")
    return time.monotonic()
