"""Weight-norm reparameterisation: every backend against the float64 reference, to second order."""

import types
import zlib

import pytest
import torch

from vaebm.ops import BackendUnavailable, _registry
from vaebm.ops.weight_norm import WEIGHT_NORM, _torch_bwd, _torch_fwd, weight_norm, weight_norm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32: the second-order terms cancel (G - <G, v^> v^): ~2e-6 relative seen in 1 of 3000 draws
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(7, 5, 3, 3), (13, 2), (1, 1, 1, 1), (3, 11, 1, 1), (256, 128, 3, 3)]


def _backend_or_skip(backend, dtype=torch.float32):
    if backend == "cpp" and DEV != "cpu" or backend == "cuda" and DEV != "cuda":
        pytest.skip(f"{backend} does not run on {DEV}")
    try:
        _registry.resolve_op(WEIGHT_NORM["weight_norm_fwd"], torch.device(DEV), dtype, backend)
    except BackendUnavailable as e:
        if "does not implement" in str(e) or "needs CUDA" in str(e):
            pytest.skip(str(e))
        raise


def _naive(v, log_g):  # the same-precision eager computation
    n = v.flatten(1).norm(dim=1).view(-1, *[1] * (v.ndim - 1))
    return torch.exp(log_g).view_as(n) * v / n


def _assert_close(got, gold, naive, atol):
    err = (got.double() - gold).abs().max().item()
    scale = max(1.0, gold.abs().max().item())
    bound = 2 * (naive.double() - gold).abs().max().item() + atol * scale
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_matches_reference_to_second_order(backend, dtype, shape, strided):
    _backend_or_skip(backend, dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, strided)).encode()))
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    if strided:  # a transposed view of the same values
        v = v.transpose(0, 1).contiguous().transpose(0, 1)
    v = v.to(DEV, dtype).requires_grad_()
    log_g = (0.5 * torch.randn(shape[0], generator=gen)).to(DEV, dtype).requires_grad_()
    go = torch.randn(shape, generator=gen).to(DEV, dtype)
    gg = torch.randn(shape, generator=gen).to(DEV, dtype)

    def run(fn, v, log_g):
        w = fn(v, log_g)
        goo = go.to(w.dtype).requires_grad_()
        gv, gl = torch.autograd.grad(w, (v, log_g), goo, create_graph=True)
        # second order: d(<gv, gg> + sum(gl))/d(v, log_g, go) goes through the backward's backward
        second = torch.autograd.grad((gv * gg.to(gv.dtype)).sum() + gl.sum(), (v, log_g, goo))
        return [w, gv, gl, *second]

    got = run(lambda v, g: weight_norm(v, g, backend=backend), v, log_g)
    gold = run(weight_norm_ref, v.detach().double().requires_grad_(),
               log_g.detach().double().requires_grad_())
    naive = run(_naive, v.detach().requires_grad_(), log_g.detach().requires_grad_())
    assert got[0].shape == v.shape and got[0].dtype == dtype
    for g, r, n in zip(got, gold, naive):
        _assert_close(g, r, n, ATOL[dtype])


def test_rows_have_norm_g():
    v = torch.randn(9, 4, 3, 3, dtype=torch.float64)
    log_g = torch.randn(9, dtype=torch.float64)
    w = weight_norm(v, log_g)
    torch.testing.assert_close(w.flatten(1).norm(dim=1), log_g.exp())
    torch.testing.assert_close(w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1),
                               v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    _backend_or_skip(backend, torch.float64)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64).requires_grad_()
    log_g = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    f = lambda v, g: weight_norm(v, g, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (v, log_g))
    assert torch.autograd.gradgradcheck(f, (v, log_g))


def test_opcheck():
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(6, 4, 3, 3, generator=gen).to(DEV).requires_grad_()
    log_g = torch.randn(6, generator=gen).to(DEV).requires_grad_()
    gw = torch.randn(6, 4, 3, 3, generator=gen).to(DEV).requires_grad_()
    for op, args in [(torch.ops.vaebm.weight_norm.default, (v, log_g, "")),
                     (torch.ops.vaebm.weight_norm_backward.default, (gw, v, log_g, "torch"))]:
        result = torch.library.opcheck(op, args)
        assert all(r == "SUCCESS" for r in result.values()), result


def test_backend_seam(monkeypatch, fake_kernel):
    mod = types.SimpleNamespace(calls=[])
    fwd = fake_kernel("weight_norm_fwd", lambda *a: mod.calls.append("fwd") or _torch_fwd(*a))
    bwd = fake_kernel("weight_norm_bwd", lambda *a: mod.calls.append("bwd") or _torch_bwd(*a))
    monkeypatch.setitem(WEIGHT_NORM["weight_norm_fwd"], "cpp", fwd)
    monkeypatch.setitem(WEIGHT_NORM["weight_norm_bwd"], "cpp", bwd)
    monkeypatch.setattr(_registry, "why_not", lambda name, device: None)
    v = torch.randn(4, 3, 3, 3, requires_grad=True)
    log_g = torch.zeros(4, requires_grad=True)
    weight_norm(v, log_g, backend="cpp").sum().backward()
    assert mod.calls == ["fwd", "bwd"]
    del WEIGHT_NORM["weight_norm_bwd"]["cpp"]
    with pytest.raises(BackendUnavailable, match="does not implement weight_norm_bwd"):
        weight_norm(v, log_g, backend="cpp").sum().backward()
    mod.calls.clear()
    weight_norm(v, log_g, backend="auto").sum().backward()  # auto: fwd from the module,
    assert mod.calls == ["fwd"]                               # bwd falls back to PyTorch


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"log_g \(C_out,\)"):
        weight_norm(torch.randn(4, 3), torch.randn(3))
    with pytest.raises(ValueError, match="ndim >= 2"):
        weight_norm(torch.randn(4), torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        weight_norm(torch.ones(4, 3, dtype=torch.int32), torch.zeros(4))
