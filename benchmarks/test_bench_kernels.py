"""pytest-benchmark cases for the fused kernels (``pytest benchmarks --benchmark-only``):
scaled Swish with fused bias and weight norm, forward + backward through the public ops, on
every backend that runs here, plus the Langevin update and its guard reduction at a small batch
(the 50-sample workloads are in test_bench_langevin.py). Each backend is grouped with the torch
reference of the same op."""

import pytest
import torch

from vaebm.ops import BackendUnavailable, langevin_reduce, langevin_update_
from vaebm.ops.swish import swish
from vaebm.ops.weight_norm import weight_norm

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "cpp"] if DEV == "cpu" else ["torch", "cuda", "triton"]


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _skip_if_unavailable(fn):
    try:
        fn()
    except BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_swish_fwd_bwd(benchmark, backend, layout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, 32, 32, generator=gen).to(DEV)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    b = torch.randn(128, generator=gen).to(DEV).requires_grad_(True)
    g = torch.randn_like(x)

    def fn():
        y = swish(x, b, backend=backend)
        torch.autograd.grad(y, (x, b), g)
        _sync()

    _skip_if_unavailable(fn)
    benchmark.group = f"swish fwd+bwd (8,128,32,32) {layout}"
    benchmark(fn)


@pytest.mark.parametrize("shape", [(256, 256, 3, 3), (128, 3, 3, 3)], ids=["256x256x3x3", "stem"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_norm_fwd_bwd(benchmark, backend, shape):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=gen).to(DEV).requires_grad_(True)
    lg = torch.randn(shape[0], generator=gen).to(DEV).requires_grad_(True)
    gw = torch.randn(shape, generator=gen).to(DEV)

    def fn():
        w = weight_norm(v, lg, backend=backend)
        torch.autograd.grad(w, (v, lg), gw)
        _sync()

    _skip_if_unavailable(fn)
    benchmark.group = f"weight_norm fwd+bwd {shape}"
    benchmark(fn)


@pytest.mark.parametrize("what", ["update", "reduce+update"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_langevin_small_batch(benchmark, backend, what):
    """The VAEBM cifar10 state (30 x (B,20,16,16) + (B,3,32,32)) at B = 4."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 20, 16, 16, generator=gen).to(DEV) for _ in range(30)]
    xs.append(torch.randn(4, 3, 32, 32, generator=gen).to(DEV))
    gs = [torch.randn_like(x) for x in xs]

    def fn():
        if what != "update":
            langevin_reduce(xs, gs, step_size=8e-5, lam=1.0, backend=backend)
        langevin_update_(xs, gs, seed=1, step=0, step_size=8e-5, lam=1.0, backend=backend)
        _sync()

    _skip_if_unavailable(fn)
    benchmark.group = f"langevin {what}, VAEBM cifar10 state, batch 4"
    benchmark(fn)


@pytest.mark.skipif(DEV != "cpu", reason="CPU conv paths of the frozen NVAE decoder")
@pytest.mark.parametrize("impl", ["torch", "vaebm"])
@pytest.mark.parametrize("op", ["conv1x1 256->1536", "depthwise 5x5"])
def test_frozen_decoder_conv_fwd_bwd(benchmark, impl, op):
    """One thread, batch 2, (2, C, 16, 16): the cifar10 decoder cell's convs, forward + input
    gradient, F.conv2d (PyTorch's kernel choice) against vaebm.ops.conv."""
    from vaebm.ops import conv

    gen = torch.Generator().manual_seed(0)
    if op.startswith("conv1x1"):
        x = torch.randn(2, 256, 16, 16, generator=gen)
        w = torch.randn(1536, 256, 1, 1, generator=gen) / 16
        wt = conv.transpose_weight(w)
        f = (lambda t: conv.conv1x1(t, w, None, wt)) if impl == "vaebm" else \
            (lambda t: conv.conv1x1_ref(t, w))
    else:
        x = torch.randn(2, 1536, 16, 16, generator=gen)
        w = torch.randn(1536, 1, 5, 5, generator=gen) / 5
        wf = conv.flip_weight(w)
        f = (lambda t: conv.depthwise(t, w, None, 2, wf)) if impl == "vaebm" else \
            (lambda t: conv.depthwise_ref(t, w, None, 2))
    x.requires_grad_(True)
    threads = torch.get_num_threads()

    def fn():
        y = f(x)
        torch.autograd.grad(y, x, torch.ones_like(y))

    torch.set_num_threads(1)
    try:
        benchmark.group = f"frozen decoder {op} fwd+bwd, 1 thread"
        benchmark(fn)
    finally:
        torch.set_num_threads(threads)
