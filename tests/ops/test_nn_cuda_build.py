"""CUDA Swish and weight-norm kernels without a GPU: nvcc compiles csrc/cuda/nn_cuda.cu for sm_80
and sm_90 with no register spills, the torch binding passes a host compiler's syntax check, and
the kernel bodies, run on the host (-DVAEBM_CUDA_EMULATE), match the PyTorch reference: every
op and dtype, contiguous / channels_last / misaligned memory, a grid-stride loop that wraps."""

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from vaebm._paths import csrc_dir
from vaebm.ops import swish as sw
from vaebm.ops import weight_norm as wn

CU = csrc_dir() / "cuda" / "nn_cuda.cu"
BINDING = csrc_dir() / "cuda" / "nn_cuda_binding.cpp"
# what nvcc gets in the real build: torch.utils.cpp_extension's flags (vaebm.ops._build.EXTENSIONS["cuda_nn"] adds
# only -O3 and the -gencode of the visible GPUs)
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr", "-std=c++17"]


def _find_nvcc():
    dirs = [os.path.join(os.environ["CUDA_HOME"], "bin")] if os.environ.get("CUDA_HOME") else []
    return shutil.which("nvcc") or shutil.which("nvcc", path=os.pathsep.join(
        dirs + ["/usr/local/cuda/bin"]))


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found in PATH, $CUDA_HOME/bin or /usr/local/cuda/bin")


def _run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernels_compile_for_arch(arch, tmp_path):
    obj = tmp_path / f"nn_sm{arch}.o"
    log = _run([NVCC, "-c", "-O3", *TORCH_NVCC_FLAGS, "-I", str(csrc_dir()),
                f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", str(CU),
                "-o", str(obj)], tmp_path)
    assert obj.stat().st_size > 0
    spills = [ln for ln in log.splitlines() if "spill" in ln]
    # 18 Swish kernels (3 ops x 3 dtypes x 32/64-bit index) and 6 weight-norm kernels
    assert len(spills) == 24, log
    assert all(" 0 bytes spill stores, 0 bytes spill loads" in ln for ln in spills), log


@pytest.mark.parametrize("binding", [BINDING, csrc_dir() / "cuda" / "langevin_cuda_binding.cpp"],
                         ids=lambda p: p.name)
def test_binding_compiles_against_torch_headers(tmp_path, binding):
    """Host syntax check of the CUDA bindings (implementations of the vaebm:: ops) against this
    torch's headers (a CPU wheel lacks only the generated c10/cuda/impl/cuda_cmake_macros.h,
    stubbed here)."""
    gxx = shutil.which("g++") or shutil.which("c++")
    cuda_inc = next((d for d in [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"),
                                              "include"), "/usr/local/cuda/include"]
                     if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))), None)
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if gxx is None or cuda_inc is None:
        pytest.skip("needs g++ and the CUDA runtime headers")
    if not os.path.isfile(os.path.join(torch_inc, "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("this torch ships no c10/cuda headers")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not os.path.isfile(os.path.join(torch_inc, "c10/cuda/impl/cuda_cmake_macros.h")):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    _run([gxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(csrc_dir()),
          "-isystem", torch_inc, "-isystem", os.path.join(torch_inc, "torch/csrc/api/include"),
          "-isystem", str(tmp_path / "stub"), "-isystem", cuda_inc, str(binding)], tmp_path)


# ----------------------------------------------------------------------------------------------
# host emulation of the kernels

_WRAPPER = r"""
#include "cuda/nn_cuda.cu"
using namespace vaebm::cuda_nn;
extern "C" {
long long emu_launches() { return g_emulated_launches; }
int emu_swish(int op, int dtype, const void* x, const void* g, const void* h, void* out,
              const float* bias, long long n, long long channels, long long inner) {
  const SwishArgs a{x, g, h, out, bias, n, channels, inner};
  return int(launch_swish(SwishOp(op), DType(dtype), a, nullptr));
}
int emu_weight_norm(int bwd, int dtype, const void* v, const void* gw, const float* log_g,
                    void* out, float* grad_log_g, long long rows, long long k) {
  const WeightNormArgs a{v, gw, log_g, out, grad_log_g, rows, k};
  return int(bwd ? launch_weight_norm_bwd(DType(dtype), a, nullptr)
                 : launch_weight_norm_fwd(DType(dtype), a, nullptr));
}
}
"""
MAX_BLOCKS = 3  # so any Swish input over 3 * 256 * 4 elements takes the grid-stride loop
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = list(_DTYPE_CODE)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 1e-2)}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found in PATH, $CUDA_HOME/bin or /usr/local/cuda/bin")
    d = tmp_path_factory.mktemp("nn_cuda_emu")
    (d / "emu.cu").write_text(_WRAPPER)
    so = d / "emu.so"
    _run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-O2", *TORCH_NVCC_FLAGS, "-DVAEBM_CUDA_EMULATE",
          f"-DVAEBM_CUDA_NN_MAX_BLOCKS={MAX_BLOCKS}LL", "-I", str(csrc_dir()), "emu.cu", "-o",
          str(so)], d)
    lib = ctypes.CDLL(str(so))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    lib.emu_launches.restype = i64
    lib.emu_swish.argtypes = [i32, i32, p, p, p, p, p, i64, i64, i64]
    lib.emu_weight_norm.argtypes = [i32, i32, p, p, p, p, p, i64, i64]
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


def _emu_swish(lib, op, x, g, h, bias):
    """What nn_cuda_binding.cpp does: the output like x, (channels, inner) from the layout."""
    out = torch.empty_like(x)
    channels = inner = 1
    b = None
    if bias is not None:
        channels = x.shape[1]
        inner = x.numel() // (x.shape[0] * channels) if x.is_contiguous() else 1
        b = bias.float().contiguous()
    before = lib.emu_launches()
    rc = lib.emu_swish(op, _DTYPE_CODE[x.dtype], _ptr(x), _ptr(g), _ptr(h), _ptr(out), _ptr(b),
                       x.numel(), channels, inner)
    assert rc == 0, f"launch_swish returned cudaError {rc}"
    assert lib.emu_launches() - before == 1
    return out


def _misaligned(t):
    """A copy of t whose storage starts one element past an aligned address (the scalar path)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    flat.copy_(t.reshape(-1))
    return flat.view(t.shape)


# (shape, layout, bias): long and short rows, channels_last, 2-D, no bias with a ragged tail,
# and inputs over MAX_BLOCKS * 256 * 4 elements (the grid-stride loop wraps)
SWISH_CASES = {
    "contiguous": ((3, 5, 7, 11), "contiguous", True),
    "channels_last": ((3, 5, 7, 11), "channels_last", True),
    "2d": ((4, 13), "contiguous", True),
    "nobias_tail": ((1031,), "contiguous", False),
    "misaligned": ((2, 3, 5, 5), "misaligned", True),
    "stride_loop_cl": ((2, 6, 17, 19), "channels_last", True),
    "stride_loop": ((2, 6, 17, 19), "contiguous", True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SWISH_CASES))
def test_emulated_swish_matches_reference(emu, case, dtype):
    shape, layout, with_bias = SWISH_CASES[case]
    gen = torch.Generator().manual_seed(len(case) * 31 + DTYPES.index(dtype))
    x, g, h = [(3 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(3)]
    if layout == "channels_last":
        x, g, h = [t.contiguous(memory_format=torch.channels_last) for t in (x, g, h)]
    elif layout == "misaligned":
        x, g, h = [_misaligned(t) for t in (x, g, h)]
    bias = torch.randn(shape[1], generator=gen).to(dtype) if with_bias else None
    rtol, atol = TOL[dtype]
    for op, got, want in [
            (0, lambda: _emu_swish(emu, 0, x, None, None, bias), lambda: sw._torch_fwd(x, bias)),
            (1, lambda: _emu_swish(emu, 1, x, g, None, bias), lambda: sw._torch_bwd(g, x, bias)),
            (2, lambda: _emu_swish(emu, 2, x, g, h, bias),
             lambda: sw._torch_bwd2(h, g, x, bias))]:
        out, ref = got(), want()
        assert out.dtype == dtype and out.stride() == x.stride()
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, msg=lambda m: f"op {op}: {m}")


def test_emulated_swish_extremes(emu):
    """Saturated inputs stay finite and exact in the limit; NaN propagates."""
    x = torch.tensor([-200.0, -88.0, -30.0, 0.0, 30.0, 88.0, 200.0, float("nan")])
    g = torch.ones_like(x)
    out = _emu_swish(emu, 0, x, None, None, None)
    torch.testing.assert_close(out[:-1], sw._torch_fwd(x, None)[:-1], rtol=1e-6, atol=1e-30)
    d = _emu_swish(emu, 1, x, g, None, None)
    torch.testing.assert_close(d[:-1], sw._torch_bwd(g, x, None)[:-1], rtol=1e-6, atol=1e-30)
    assert out[-1].isnan() and d[-1].isnan()


WN_SHAPES = [(7, 5, 3, 3), (13, 2), (3, 600), (1, 1), (20, 257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_weight_norm_matches_reference(emu, dtype):
    gen = torch.Generator().manual_seed(11 + DTYPES.index(dtype))
    rtol, atol = TOL[dtype]
    for shape in WN_SHAPES:
        v = torch.randn(shape, generator=gen).to(dtype)
        gw = torch.randn(shape, generator=gen).to(dtype)
        log_g = (0.5 * torch.randn(shape[0], generator=gen)).to(dtype)
        rows, k = shape[0], v.numel() // shape[0]
        lg = log_g.float()
        w = torch.empty_like(v)
        before = emu.emu_launches()
        assert emu.emu_weight_norm(0, _DTYPE_CODE[dtype], _ptr(v), None, _ptr(lg), _ptr(w), None,
                                   rows, k) == 0
        gv, gl = torch.empty_like(v), torch.full((rows,), float("nan"))
        assert emu.emu_weight_norm(1, _DTYPE_CODE[dtype], _ptr(v), _ptr(gw), _ptr(lg), _ptr(gv),
                                   _ptr(gl), rows, k) == 0
        assert emu.emu_launches() - before == 2  # all output channels in one launch each
        torch.testing.assert_close(w, wn._torch_fwd(v, log_g), rtol=rtol, atol=atol)
        want_gv, want_gl = wn._torch_bwd(gw, v, log_g)
        torch.testing.assert_close(gv, want_gv, rtol=rtol, atol=atol)
        torch.testing.assert_close(gl, want_gl.float(), rtol=rtol, atol=atol)


def test_emulated_launch_rejects_bad_arguments(emu):
    x = torch.zeros(8)
    out = torch.empty_like(x)
    assert emu.emu_swish(0, 0, _ptr(x), None, None, _ptr(out), None, 8, 0, 1) != 0  # channels 0
    assert emu.emu_swish(1, 0, _ptr(x), None, None, _ptr(out), None, 8, 1, 1) != 0  # bwd, no g
    assert emu.emu_weight_norm(1, 0, _ptr(x), None, _ptr(x), _ptr(out), None, 2, 4) != 0
