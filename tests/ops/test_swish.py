"""Scaled Swish (+ fused bias): every backend against the float64 reference, to third order."""

import types
import zlib

import pytest
import torch
import torch.nn.functional as F

from vaebm.ops import BackendUnavailable, use_backend
from vaebm.ops import _registry
from vaebm.ops.swish import SWISH, _torch_bwd, _torch_bwd2, _torch_fwd, swish, swish_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(3, 5, 7, 11), (2, 13), (1, 1, 1, 1), (4, 7, 9), (2, 3, 1, 17)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _backend_or_skip(backend, dtype=torch.float32):
    """Skip a backend that does not implement Swish yet; one that does must work here."""
    if backend == "cpp" and DEV != "cpu" or backend == "cuda" and DEV != "cuda":
        pytest.skip(f"{backend} does not run on {DEV}")
    try:
        _registry.resolve_op(SWISH["swish_fwd"], torch.device(DEV), dtype, backend)
    except BackendUnavailable as e:
        if "does not implement" in str(e) or "needs CUDA" in str(e):
            pytest.skip(str(e))
        raise


def _make(shape, layout, dtype, gen, scale=3.0):
    x = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        if len(shape) != 4:
            pytest.skip("channels_last needs 4-D")
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-dense view: every other element of a wider tensor
        x = torch.stack([x, x], -1)[..., 0]
    return x.to(DEV, dtype)


def _assert_close(got, gold, naive, atol):
    """err(got, gold) <= 2 * err(same-precision eager PyTorch, gold) + atol."""
    err = (got.double() - gold).abs().max().item()
    scale = max(1.0, gold.abs().max().item())
    bound = 2 * (naive.double() - gold).abs().max().item() + atol * scale
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


def _naive(x, b):  # same-precision eager PyTorch, what a plain implementation would compute
    y = x if b is None else x + b.view(1, -1, *[1] * (x.ndim - 2))
    return y * torch.sigmoid(y) / 1.1


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference_to_second_order(backend, dtype, shape, layout, with_bias):
    _backend_or_skip(backend, dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout, dtype)).encode()))
    x = _make(shape, layout, dtype, gen).requires_grad_()
    b = (torch.randn(shape[1], generator=gen).to(DEV, dtype).requires_grad_() if with_bias
         else None)
    go = torch.randn(shape, generator=gen).to(DEV, dtype)
    gg = torch.randn(shape, generator=gen).to(DEV, dtype)
    ins = [x] + ([b] if with_bias else [])

    def run(fn, ins):
        out = fn(ins[0], ins[1] if with_bias else None)
        grads = torch.autograd.grad(out, ins, go.to(out.dtype), create_graph=True)
        # second order: d<grad_x, gg>/d(x, bias, go) exercises swish_backward's own backward
        goo = go.to(out.dtype).detach().requires_grad_()
        gx = torch.autograd.grad(fn(ins[0], ins[1] if with_bias else None), ins[0], goo,
                                 create_graph=True)[0]
        second = torch.autograd.grad(gx, ins + [goo], gg.to(gx.dtype))
        return [out, *grads, *second]

    got = run(lambda x, b: swish(x, b, backend=backend), ins)
    gold = run(swish_ref, [t.detach().double().requires_grad_() for t in ins])
    naive = run(_naive, [t.detach().requires_grad_() for t in ins])
    assert got[0].dtype == dtype and got[0].shape == x.shape
    if layout != "strided":
        assert got[0].stride() == x.stride(), "output must keep the input's memory format"
    for g, r, n in zip(got, gold, naive):
        assert g.dtype == dtype
        _assert_close(g, r, n, ATOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(backend, with_bias):
    _backend_or_skip(backend, torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    args = (x, b) if with_bias else (x,)
    f = lambda x, b=None: swish(x, b, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)
    # third order: gradgradcheck of the gradient function reaches swish_backward2's backward
    g = lambda x, b=None: torch.autograd.grad(f(x, b).sum(), x, create_graph=True)[0]  # noqa: E731
    assert torch.autograd.gradgradcheck(g, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(layout, with_bias):
    gen = torch.Generator().manual_seed(2)
    mk = lambda: _make((2, 3, 5, 4), layout, torch.float32, gen)  # noqa: E731
    x, go, gg = mk().requires_grad_(), mk().requires_grad_(), mk()
    b = torch.randn(3, generator=gen).to(DEV).requires_grad_() if with_bias else None
    ops = torch.ops.vaebm
    for op, args in [(ops.swish.default, (x, b, "")),
                     (ops.swish_backward.default, (go, x, b, "torch")),
                     (ops.swish_backward2.default, (gg, go, x, b, ""))]:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_traces_through():
    """fullgraph: the dispatcher wrapper and both derivatives trace without graph breaks."""
    def f(x, b):
        y = swish(x, b)
        g, = torch.autograd.grad(y.sum(), x, create_graph=True)
        return y, g

    x = torch.randn(2, 3, 4, 4, device=DEV, requires_grad=True)
    b = torch.randn(3, device=DEV)
    compiled = torch.compile(swish, backend="aot_eager", fullgraph=True)
    y = compiled(x, b)
    (gx,) = torch.autograd.grad(y.sum(), x)
    ye, ge = f(x, b)
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(gx, ge)


def test_is_one_lipschitz_and_scaled():
    y = torch.linspace(-20, 20, 100001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(swish(y).sum(), y)
    assert d.abs().max() <= 1.0 and d.max() > 0.99  # silu' peaks at ~1.0998; /1.1 makes it < 1
    torch.testing.assert_close(swish(y.detach()), F.silu(y.detach()) / 1.1)


# ---------------------------------------------------------------- the backend seam
@pytest.fixture
def fake_backend(monkeypatch, fake_kernel):
    """A backend module with swish_* functions that records its calls and layouts."""
    mod = types.SimpleNamespace(calls=[])

    def rec(name, impl):
        def fn(*args):
            mod.calls.append((name, [a.stride() for a in args if a is not None and a.ndim > 1]))
            return impl(*args)
        return fn

    for fn, tag, impl in (("swish_fwd", "fwd", _torch_fwd), ("swish_bwd", "bwd", _torch_bwd),
                          ("swish_bwd2", "bwd2", _torch_bwd2)):
        monkeypatch.setitem(SWISH[fn], "cpp", fake_kernel(fn, rec(tag, impl)))
    monkeypatch.setattr(_registry, "why_not", lambda name, device: None)
    monkeypatch.delenv("VAEBM_BACKEND", raising=False)
    return mod


def test_backend_seam_explicit_context_env_and_auto(fake_backend, monkeypatch):
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(3)
    gx, = torch.autograd.grad(swish(x, b, backend="cpp").sum(), x, create_graph=True)
    gx.sum().backward()
    assert [c[0] for c in fake_backend.calls] == ["fwd", "bwd", "bwd2"]
    # one layout for every tensor a kernel gets: the input's (channels_last here)
    assert all(s == x.stride() for _, strides in fake_backend.calls for s in strides)
    for route in (lambda: use_backend("cpp"), lambda: _env(monkeypatch, "cpp"),
                  lambda: _env(monkeypatch, "auto")):
        fake_backend.calls.clear()
        with route():
            swish(x.detach(), b)
        assert [c[0] for c in fake_backend.calls] == ["fwd"]
    fake_backend.calls.clear()
    with use_backend("cpp"):
        swish(x.detach(), b, backend="torch")  # the explicit argument wins over the context
        assert fake_backend.calls == []
        with pytest.raises(BackendUnavailable, match="float64"):  # named: serve it or raise
            swish(x.detach().double(), b)
    swish(x.detach().double(), b, backend="auto")  # auto falls back to PyTorch quietly
    assert fake_backend.calls == []


def _env(monkeypatch, value):
    import contextlib
    monkeypatch.setenv("VAEBM_BACKEND", value)
    return contextlib.nullcontext()


def test_named_backend_without_the_op_raises_and_auto_falls_back(fake_backend):
    del SWISH["swish_fwd"]["cpp"]  # (the fixture restores it)
    x = torch.randn(2, 3, 4)
    with pytest.raises(BackendUnavailable, match="does not implement swish_fwd"):
        swish(x, backend="cpp")
    torch.testing.assert_close(swish(x, backend="auto"), swish_ref(x))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        swish(torch.randn(2, 3, 4), torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        swish(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown backend"):
        swish(torch.randn(2, 3), backend="fortran")
