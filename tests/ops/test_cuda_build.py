"""The CUDA backend without a GPU: its sources compile with the machine's nvcc for sm_80 and sm_90,
the shared header compiles with g++, and the kernel bodies, run on the host
(``-DVAEBM_CUDA_EMULATE``: every (block, thread) in turn), match the PyTorch reference. The
emulation exercises the launch bookkeeping a GPU run would use: segment lookup, sample-row
boundaries, row tails, vector/scalar paths, splitting over several launches."""

import ctypes
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from vaebm._paths import csrc_dir
from vaebm.ops import MODE_KEEP, MODE_RESET, philox_normal, reduce_ref, update_ref

CU = csrc_dir() / "cuda" / "langevin_cuda.cu"
# what nvcc gets in the real build: torch.utils.cpp_extension's flags, plus vaebm.ops._build.EXTENSIONS["cuda"]'s
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr", "-std=c++17", "-fmad=false"]


def _find_nvcc():
    dirs = [os.path.join(os.environ["CUDA_HOME"], "bin")] if os.environ.get("CUDA_HOME") else []
    found = shutil.which("nvcc") or shutil.which("nvcc", path=os.pathsep.join(
        dirs + ["/usr/local/cuda/bin"]))
    return found


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
    obj = tmp_path / f"langevin_sm{arch}.o"
    log = _run([NVCC, "-c", "-O3", *TORCH_NVCC_FLAGS, "-I", str(csrc_dir()),
                f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", str(CU),
                "-o", str(obj)], tmp_path)
    assert obj.stat().st_size > 0
    spills = [ln for ln in log.splitlines() if "spill" in ln]
    assert spills, log  # ptxas reported on every kernel
    assert all(" 0 bytes spill stores, 0 bytes spill loads" in ln for ln in spills), log


def test_common_header_compiles_with_gxx(tmp_path):
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no host C++ compiler (g++ or c++) found in PATH")
    src = tmp_path / "kat.cpp"
    src.write_text(
        '#include "langevin_common.h"\n#include <cstdio>\n'
        "int main() {\n"
        "  vaebm::U4 r = vaebm::philox4x32_10(vaebm::U4{0, 0, 0, 0}, 0, 0);\n"
        "  float n[4];\n"
        "  vaebm::philox_normal4(7, vaebm::philox_counter(1, 2, 3, 4, vaebm::kStreamNoise), n);\n"
        '  std::printf("%08x %08x %08x %08x %.9g\\n", r.x, r.y, r.z, r.w, n[1]);\n'
        "  return 0;\n}\n")
    exe = tmp_path / "kat"
    _run([gxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(csrc_dir()),
          str(src), "-o", str(exe)], tmp_path)
    words = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    # Random123 known answer for philox4x32_10 at zero counter and key
    assert words[:4] == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]
    want = philox_normal(7, 3, 2, torch.tensor([4 * 1 + 1]), tensor=4)
    assert abs(float(words[4]) - float(want)) < 1e-6


# ----------------------------------------------------------------------------------------------
# host emulation of the kernels

_WRAPPER = r"""
#include <vector>
#include "cuda/langevin_cuda.cu"
using namespace vaebm::cuda;
static std::vector<TensorArgs> args(int count, void** x, void** g, void** o, const int64_t* n) {
  std::vector<TensorArgs> t(count);
  for (int k = 0; k < count; ++k) t[k] = TensorArgs{x[k], g[k], o[k], n[k]};
  return t;
}
extern "C" {
long long emu_launches() { return g_emulated_launches; }
long long emu_fastdiv_mismatches(unsigned d) {
  const FastDiv f = make_fastdiv(d);
  long long bad = 0;
  const unsigned qs[] = {0u, 1u, d - 1u, d, d + 1u, 2u * d - 1u, 0x7fffffffu, 0x7ffffffeu,
                         0x7fffffffu - 0x7fffffffu % d, 0x7fffffffu - 0x7fffffffu % d - 1u};
  for (unsigned q : qs)
    if (q < 0x80000000u && fast_div(q, f) != q / d) ++bad;
  unsigned long long s = 0x9e3779b97f4a7c15ull ^ d;
  for (int i = 0; i < 20000; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const unsigned q = unsigned(s >> 33);  // < 2^31
    if (fast_div(q, f) != q / d) ++bad;
  }
  return bad;
}
int emu_update(int dtype, int count, long long batch, void** x, void** g, void** o,
               const int64_t* n, const int64_t* step, const float* gscale, const int32_t* mode,
               unsigned long long seed, long long sample_offset, float a, float b, float lam,
               float clip, float lo, float hi) {
  auto t = args(count, x, g, o, n);
  const UpdateScalars s{step, gscale, mode, seed, sample_offset, a, b, lam, clip, lo, hi};
  return int(launch_update(DType(dtype), t.data(), count, batch, s, nullptr));
}
long long emu_reduce_columns(int count, const int64_t* n) {
  std::vector<TensorArgs> t(count);
  for (int k = 0; k < count; ++k) t[k].n = n[k];
  return reduce_columns(t.data(), count);
}
int emu_reduce(int dtype, int count, long long batch, void** x, void** g, void** o,
               const int64_t* n, const float* gscale, float a, float lam, float clip,
               float* partial, float* out) {
  auto t = args(count, x, g, o, n);
  const ReduceScalars s{gscale, a, lam, clip};
  return int(launch_reduce(DType(dtype), t.data(), count, batch, s, partial, out, nullptr));
}
}
"""

# default limits, and tiny ones that force segments to split and launches to repeat
_VARIANTS = {"default": [], "tiny": ["-DVAEBM_CUDA_MAX_SEG_GROUPS=300LL",
                                     "-DVAEBM_CUDA_MAX_LAUNCH_BLOCKS=4LL"]}
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class _Emu:
    def __init__(self, path):
        lib = ctypes.CDLL(str(path))
        p, i64, f32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float
        lib.emu_launches.restype = i64
        lib.emu_fastdiv_mismatches.restype = i64
        lib.emu_fastdiv_mismatches.argtypes = [ctypes.c_uint]
        lib.emu_update.argtypes = [ctypes.c_int, ctypes.c_int, i64, p, p, p, p, p, p, p,
                                   ctypes.c_ulonglong, i64, f32, f32, f32, f32, f32, f32]
        lib.emu_reduce_columns.restype = i64
        lib.emu_reduce_columns.argtypes = [ctypes.c_int, p]
        lib.emu_reduce.argtypes = [ctypes.c_int, ctypes.c_int, i64, p, p, p, p, p, f32, f32, f32,
                                   p, p]
        self.lib = lib

    @staticmethod
    def _ptrs(ts):
        return (ctypes.c_void_p * len(ts))(*[None if t is None else t.data_ptr() for t in ts])

    @staticmethod
    def _ns(states):
        n = torch.tensor([x[0].numel() for x in states], dtype=torch.int64)
        return n, ctypes.c_void_p(n.data_ptr())

    def update(self, states, grads, outs, *, seed, step, sample_offset, a, b, lam, clip_value,
               lo, hi, gscale=None, mode=None):
        n, n_p = self._ns(states)
        step_t = torch.tensor([step], dtype=torch.int64)
        addr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        before = self.lib.emu_launches()
        rc = self.lib.emu_update(
            _DTYPE_CODE[states[0].dtype], len(states), states[0].shape[0], self._ptrs(states),
            self._ptrs(grads), self._ptrs(outs), n_p, step_t.data_ptr(), addr(gscale),
            addr(mode), seed, sample_offset, a, b, lam, clip_value, lo, hi)
        assert rc == 0, f"launch_update returned cudaError {rc}"
        return self.lib.emu_launches() - before

    def reduce(self, states, grads, others, *, a, lam, clip_value, gscale=None):
        n, n_p = self._ns(states)
        B = states[0].shape[0]
        cols = self.lib.emu_reduce_columns(len(states), n_p)
        partial = torch.full((B, cols, 4), float("nan"))
        out = torch.full((B, 4), float("nan"))
        rc = self.lib.emu_reduce(
            _DTYPE_CODE[states[0].dtype], len(states), B, self._ptrs(states), self._ptrs(grads),
            self._ptrs(others if others is not None else [None] * len(states)), n_p,
            None if gscale is None else gscale.data_ptr(), a, lam, clip_value,
            partial.data_ptr(), out.data_ptr())
        assert rc == 0, f"launch_reduce returned cudaError {rc}"
        return out


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found in PATH, $CUDA_HOME/bin or /usr/local/cuda/bin")
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "emu.cu").write_text(_WRAPPER)

    def build(name):
        so = d / f"emu_{name}.so"
        _run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-O2", *TORCH_NVCC_FLAGS,
              "-DVAEBM_CUDA_EMULATE", *_VARIANTS[name], "-I", str(csrc_dir()), "emu.cu", "-o",
              str(so)], d)
        return name, _Emu(so)

    with ThreadPoolExecutor(len(_VARIANTS)) as pool:
        return dict(pool.map(build, _VARIANTS))


def test_fast_division_is_exact(emu):
    lib = emu["default"].lib
    divisors = [1, 2, 3, 5, 7, 25, 64, 100, 1280, 6241, 65535, 65536, 65537, 999_999_937,
                2**30, 2**30 + 1, 2**31 - 2, 2**31 - 1]
    assert {d: lib.emu_fastdiv_mismatches(d) for d in divisors} == {d: 0 for d in divisors}


SHAPES = {  # per-sample shapes: rows of whole packs, rows with tails, rows shorter than a pack
    "mixed": [(3, 5, 5), (2, 3), (1,), (4, 9, 13), (8,), (2, 2)],
    "vaebm": [(20, 4, 4)] * 30 + [(3, 8, 8)],
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}


def _state(shapes, B, dtype, gen):
    xs = [torch.randn((B, *s), generator=gen).to(dtype) for s in shapes]
    gs = [(3 * torch.randn((B, *s), generator=gen)).to(dtype) for s in shapes]
    return xs, gs


@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", list(SHAPES))
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "out_of_place"])
def test_emulated_update_matches_reference(emu, variant, dtype, shapes, in_place):
    gen = torch.Generator().manual_seed(hash((variant, str(dtype), shapes, in_place)) % 2**31)
    B = 5
    xs, gs = _state(SHAPES[shapes], B, dtype, gen)
    kw = dict(seed=2**63 + 12345, step=2**32 + 7, sample_offset=2**32 - 3, a=0.185,
              b=math.sqrt(0.37), lam=1.0, clip_value=2.0, lo=-1.5, hi=1.25,
              gscale=torch.rand(B, generator=gen),
              mode=torch.tensor([0, MODE_KEEP, MODE_RESET, 0, MODE_KEEP], dtype=torch.int32))
    want = [torch.zeros_like(x) for x in xs]
    update_ref(xs, gs, want, **kw)
    old = [x.clone() for x in xs]
    outs = xs if in_place else [torch.full_like(x, 99.0) for x in xs]
    launches = emu[variant].update(xs, gs, outs, **kw)
    if variant == "default":
        assert launches == 1  # a whole VAEBM state (31 tensors) is one launch
    else:
        assert launches > 1
    rtol, atol = TOL[dtype]
    for k, (w, o, x0) in enumerate(zip(want, outs, old)):
        torch.testing.assert_close(o.float(), w.float(), rtol=rtol, atol=atol, msg=f"tensor {k}")
        assert torch.equal(o[1], x0[1]) and torch.equal(o[4], x0[4])  # kept: bit-identical
    if not in_place:
        assert all(torch.equal(x, x0) for x, x0 in zip(xs, old))


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_emulated_noise_is_the_philox_stream(emu, variant):
    """x = g = 0, a = 0, b = 1: the output is xi itself, element for element."""
    shapes = [(1031,), (3, 5), (4,)]
    B = 3
    xs = [torch.zeros((B, *s)) for s in shapes]
    emu[variant].update(xs, [x.clone() for x in xs], xs, seed=2**40 + 3, step=9, sample_offset=2,
                        a=0.0, b=1.0, lam=0.0, clip_value=0.0, lo=-math.inf, hi=math.inf)
    for k, x in enumerate(xs):
        n = x[0].numel()
        want = philox_normal(2**40 + 3, 9, torch.arange(2, 2 + B).unsqueeze(1),
                             torch.arange(n).unsqueeze(0), tensor=k)
        torch.testing.assert_close(x.reshape(B, n), want, rtol=0, atol=1e-6)


def test_emulated_update_misaligned_and_many_tensors(emu):
    """Pointers off a pack boundary take the scalar path; 40 tensors need two launches."""
    gen = torch.Generator().manual_seed(5)
    B = 3
    base = torch.randn(B * 8 + 1, generator=gen)
    x_mis = base[1:].reshape(B, 8)  # whole rows of 2 packs, but 4 bytes off alignment
    xs = [x_mis] + [torch.randn(B, 4 * (k % 3) + 1 + (k % 4), generator=gen) for k in range(39)]
    gs = [torch.randn(x.shape, generator=gen) for x in xs]
    kw = dict(seed=11, step=4, sample_offset=0, a=0.05, b=0.3, lam=0.5, clip_value=0.0,
              lo=-math.inf, hi=math.inf)
    want = [torch.zeros_like(x) for x in xs]
    update_ref(xs, gs, want, **kw)
    assert emu["default"].update(xs, gs, xs, **kw) == 2
    for w, x in zip(want, xs):
        torch.testing.assert_close(x, w, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_others", [False, True])
def test_emulated_reduce_matches_reference(emu, variant, dtype, with_others):
    gen = torch.Generator().manual_seed(7 + with_others)
    B = 4
    shapes = [(3, 5, 5), (2, 3), (1,), (2, 4101), (8,)]  # (2, 4101): a row over 2 blocks
    xs, gs = _state(shapes, B, dtype, gen)
    xs[1][2, 0, 1] = float("nan")
    gs[0][3, 1, 2, 3] = float("nan")
    xs[3][1, 1, 4100] = float("inf")
    gs[2][0, 0] = -float("inf")  # clipped to -2.5, but still counted: a broken chain
    others = [x + (0.1 * torch.randn(x.shape, generator=gen)).to(dtype) for x in xs]
    kw = dict(a=0.1, lam=1.0, clip_value=2.5, gscale=torch.rand(B, generator=gen))
    o = others if with_others else None
    want = reduce_ref(xs, gs, o, **kw)
    got = emu[variant].reduce(xs, gs, o, **kw)
    assert torch.equal(got[:, 1], want[:, 1])
    assert got[:, 1].tolist() == [1, 1, 1, 1]
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-4)
    if not with_others:
        assert torch.equal(got[:, 3], torch.zeros(B))
