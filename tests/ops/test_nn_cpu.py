"""The C++ CPU Swish on each instruction-set path (AVX-512, AVX2, scalar: VAEBM_CPU_ISA), its
span plans (long rows, expanded-bias periods, channels_last, ragged tails) and saturated or
non-finite inputs, against the PyTorch implementation of the seam; and what importing costs."""

import subprocess
import sys

import pytest
import torch

from vaebm.ops import swish as sw
from vaebm.ops import weight_norm as wn

ISAS = {"avx512": 2, "avx2": 1, "scalar": 0}
# against the float64 evaluation, rounded once: (rtol, atol relative to the largest |value|)
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
# (shape, channels_last): rows of 1024 (one bias each), 3-element rows (expanded bias period),
# channels_last with C = 130 (a period that is no multiple of the vector width), an odd
# contiguous shape, and no bias over a ragged flat tail
CASES = {"long_rows": ((2, 3, 32, 32), False), "short_rows": ((3, 130, 1, 3), False),
         "channels_last": ((2, 130, 5, 3), True), "odd": ((3, 5, 7, 11), False),
         "flat": ((1031,), False)}


class _CpuNN:
    """The C++ CPU network kernels: torch.ops.vaebm.<op>, and the ISA the Swish kernels take."""

    def __getattr__(self, name):
        return getattr(torch.ops.vaebm, name)

    def _load(self):
        return self

    def swish_isa(self):
        return torch.ops.vaebm.cpu_swish_isa()


@pytest.fixture(scope="module")
def cpu_nn():
    if not sys.platform.startswith("linux"):
        pytest.skip("the C++ backend is built and tested on Linux")
    from vaebm.ops import _registry

    _registry.load_extension("cpu_nn")
    return _CpuNN()


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_isa_paths_match_reference(cpu_nn, monkeypatch, isa, dtype):
    monkeypatch.setenv("VAEBM_CPU_ISA", isa)
    ops = cpu_nn._load()
    if ops.swish_isa() != ISAS[isa]:
        pytest.skip(f"this CPU has no {isa}")
    gen = torch.Generator().manual_seed(ISAS[isa] * 7 + len(str(dtype)))
    rtol, atol = TOL[dtype]
    for name, (shape, cl) in CASES.items():
        x, g, h = [(4 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(3)]
        if cl:
            x, g, h = [t.contiguous(memory_format=torch.channels_last) for t in (x, g, h)]
        b = None if len(shape) == 1 else torch.randn(shape[1], generator=gen).to(dtype)
        xd, gd, hd = x.double(), g.double(), h.double()
        bd = None if b is None else b.double()
        for got, gold in [(cpu_nn.swish_fwd(x, b), sw._torch_fwd(xd, bd)),
                          (cpu_nn.swish_bwd(g, x, b), sw._torch_bwd(gd, xd, bd)),
                          (cpu_nn.swish_bwd2(h, g, x, b), sw._torch_bwd2(hd, gd, xd, bd))]:
            assert got.stride() == x.stride() and got.dtype == dtype
            torch.testing.assert_close(got.double(), gold, rtol=rtol,
                                       atol=atol * max(1.0, gold.abs().max().item()),
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("isa", list(ISAS))
def test_saturation_and_nan(cpu_nn, monkeypatch, isa):
    monkeypatch.setenv("VAEBM_CPU_ISA", isa)
    x = torch.tensor([-1e4, -200.0, -88.0, -87.0, -30.0, -1e-30, 0.0, 1e-30, 30.0, 88.0, 200.0,
                      1e4, float("nan")] + [0.5] * 7)  # 20: a full AVX-512 vector and a tail
    g = torch.full_like(x, 0.75)
    fwd, bwd = cpu_nn.swish_fwd(x, None), cpu_nn.swish_bwd(g, x, None)
    bwd2 = cpu_nn.swish_bwd2(g, g, x, None)
    fin, y = ~x.isnan(), x.double()
    # float64 gold with 1 - s taken from exp(-|y|): the reference's 1 - sigmoid(y) is all
    # cancellation out here (0 in float64 at y = 88, where the float32 answer is ~1e-37)
    e = torch.exp(-y.abs())
    s = torch.where(y >= 0, 1 / (1 + e), e / (1 + e))
    sc = torch.where(y >= 0, e / (1 + e), 1 / (1 + e))
    k, gd = 1 / 1.1, g.double()
    for got, gold in [(fwd, y * s * k), (bwd, gd * s * (1 + y * sc) * k),
                      (bwd2, gd * gd * s * sc * (2 + y * (sc - s)) * k)]:
        torch.testing.assert_close(got[fin], gold.float()[fin], rtol=4e-6, atol=1e-44)
    assert fwd[~fin].isnan().all() and bwd[~fin].isnan().all() and bwd2[~fin].isnan().all()


def test_weight_norm_zero_row_and_bad_input(cpu_nn):
    v = torch.randn(3, 4, 2, 2)
    v[1] = 0
    log_g = torch.randn(3)
    torch.testing.assert_close(cpu_nn.weight_norm_fwd(v, log_g),
                               wn.weight_norm_ref(v, log_g))
    with pytest.raises(RuntimeError, match="log_g must be"):
        cpu_nn.weight_norm_fwd(v, torch.randn(4))
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        cpu_nn.swish_fwd(torch.randn(4, 6)[:, ::2], None)


def test_import_builds_nothing_and_skips_triton():
    code = ("import sys, vaebm, vaebm.ops._library, vaebm.ops._triton_ops, vaebm.ops.conv\n"
            "from vaebm.ops import _build\n"
            "assert 'triton' not in sys.modules, 'importing vaebm imported triton'\n"
            "assert not _build._loaded, _build._loaded\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
