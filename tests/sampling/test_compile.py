"""torch.compile (inductor) of a whole FusedLangevin step, and torch.library.opcheck of the three
``vaebm`` Langevin ops (with the fake implementations of ``vaebm.ops._library``).

Compiling is slow on a small CPU machine: a cold inductor cache costs ~10 s (cpp) and ~30 s
(torch backend: the Philox reference is compiled) here; a warm one a few seconds.
"""

import math

import pytest
import torch

from vaebm import FusedLangevin
from vaebm.ops import BackendUnavailable

# With PyTorch's ATen dispatch capped (ATEN_CPU_CAPABILITY=avx2, CI's second pass, on an
# AVX-512 machine) inductor tiles its CPU loops for 16-lane vectors but compiles them with 8-lane
# AVX2 ``Vectorized<float>``: ``loadu(p, 16)`` then moves 8 floats, and half of every 16-float
# block of a copied buffer is left uninitialised (seen here as chains that left the eager ones by
# 1e12 in samples 2, 3, 6, 7 of a (8, 4) state). A PyTorch inconsistency of the emulated cap (on
# a real AVX2 CPU both agree), not of these ops: under the cap the tests pin inductor's SIMD
# width to the capped ISA's 256 bits. That fixes the cpp step; with the torch backend
# the compiled step still returns NaN energies under the cap while its chain matches the eager
# one exactly (not investigated further: the same inductor-under-emulated-cap territory), so it
# stays an expected failure there. (MALA was one too while its pieces went through the Python
# front-ends; calling its kernels directly, it passes under the cap.)
_CAPPED = (__import__("os").environ.get("ATEN_CPU_CAPABILITY") or "").lower()
capped_xfail = pytest.mark.xfail(bool(_CAPPED), strict=False,
                                 reason="inductor under an emulated ATEN_CPU_CAPABILITY cap")


@pytest.fixture(autouse=True)
def _inductor_simd_matches_the_cap():
    if _CAPPED != "avx2":
        yield
        return
    import torch._inductor.config as ic

    with ic.patch({"cpp.simdlen": 256}):
        yield


def energy(x):
    return (0.5 * x.pow(2) + 0.2 * torch.cos(3 * x)).flatten(1).sum(1)


@pytest.fixture(scope="module")
def cpp_ops():
    """The vaebm Langevin ops with their CPU kernels built (schemas and fakes are declared at
    import, in vaebm.ops._library)."""
    from vaebm.ops import _registry

    try:
        _registry.load_extension("cpu")
    except BackendUnavailable as e:
        pytest.skip(f"cpp backend unavailable: {e}")
    return torch.ops.vaebm


def _arg_names(op) -> list[str]:
    return [a.name for a in op.default._schema.arguments]


def test_no_op_argument_is_named_mode(cpp_ops):
    """An op argument named ``mode`` collides with the ``mode`` parameter of torch's
    auto_functionalize (``redirect_to_mode.<locals>.impl() got multiple values for argument
    'mode'``): compiling or opcheck-ing such an op fails."""
    for name in ("langevin_update_", "langevin_reduce", "langevin_step_"):
        assert "mode" not in _arg_names(getattr(cpp_ops, name)), name


def test_fakes_take_the_schemas_argument_names(cpp_ops):
    import inspect

    from vaebm.ops import _library

    for name, fn in _library.FAKES.items():
        params = list(inspect.signature(fn).parameters)
        assert params == _arg_names(getattr(cpp_ops, name)), name


def _ops_in(graphs) -> set[str]:
    """The vaebm ops (packet names, overload dropped) called in the recorded FX graphs."""
    out = set()
    for g in graphs:
        for n in g.graph.nodes:
            name = str(n.target)
            if name.startswith("vaebm."):
                out.add(name.removesuffix(".default"))
    return out


def _inductor_recording(graphs):
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)
    return backend


# ------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", ["cpp", pytest.param("torch", marks=capped_xfail)])
def test_whole_step_compiles_with_inductor(backend, cpp_ops, one_thread):
    """One graph per step (fullgraph: energy, input gradient, guard, statistics and update), run
    by inductor, gives the eager chain (to float32 rounding: inductor's cos differs by an ulp)."""
    torch._dynamo.reset()
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    xa, xb = x0.clone(), x0.clone()
    sa = FusedLangevin(xa, 0.1, sigma=0.5, seed=1, backend=backend, clip_grad_norm=3.0)
    sb = FusedLangevin(xb, 0.1, sigma=0.5, seed=1, backend=backend, clip_grad_norm=3.0)
    graphs = []
    step = torch.compile(lambda: sb.step(energy), backend=_inductor_recording(graphs),
                         fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # autograd.grad in the graph
        for _ in range(3):
            ea = sa.step(energy)
            eb = step()
    torch.testing.assert_close(xb, xa, rtol=0, atol=1e-6)
    torch.testing.assert_close(eb, ea, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sb.stats.energy, sa.stats.energy, rtol=1e-6, atol=1e-6)
    assert sb.t == 3 and sb.stats.steps == 3 and int(sb.step_t) == 3
    assert graphs, "nothing was compiled"
    if backend == "cpp":  # the whole update is the custom op, inside the compiled graph
        assert "vaebm.langevin_step_" in _ops_in(graphs)


def test_compiled_step_is_not_recompiled_every_step(cpp_ops, one_thread):
    """The planned step touches no host int while compiled (a guard on a changing counter would
    recompile every step); the host counters catch up from the device counter when read."""
    torch._dynamo.reset()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    xe = x.clone()
    s = FusedLangevin(x, 0.1, seed=1, backend="cpp")
    se = FusedLangevin(xe, 0.1, seed=1, backend="cpp")
    graphs = []
    step = torch.compile(lambda: s.step(energy), backend=_inductor_recording(graphs),
                         fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(3):
            step()
            se.step(energy)
    assert len(graphs) == 1, f"{len(graphs)} compilations for 3 steps"
    assert s.stats.steps == 3 and s.t == 3 and int(s.step_t) == 3
    if not _CAPPED:
        torch.testing.assert_close(s.stats.energy, se.stats.energy, rtol=1e-6, atol=1e-6)
    s.step(energy)  # eager again: the counters continue from the caught-up values
    assert s.t == 4 and s.stats.steps == 4
    # without statistics too (nothing reads a counter between the compiled and the eager step)
    torch._dynamo.reset()
    s2 = FusedLangevin(torch.randn(8, 4), 0.1, seed=1, backend="cpp", track=False)
    step2 = torch.compile(lambda: s2.step(energy), fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step2()
        step2()
    s2.step(energy)
    assert s2.t == 3 and int(s2.step_t) == 3


def test_mala_step_compiles_on_cpp(cpp_ops, one_thread):
    """MALA calls its resolved kernels directly (langevin_update_, langevin_reduce and the accept
    uniforms, philox_uniform; not the one-call plan), and they go into inductor graphs."""
    torch._dynamo.reset()
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    xa, xb = x0.clone(), x0.clone()
    sa = FusedLangevin(xa, 0.1, seed=1, backend="cpp", mala=True)
    sb = FusedLangevin(xb, 0.1, seed=1, backend="cpp", mala=True)
    graphs = []
    step = torch.compile(lambda: sb.step(energy), backend=_inductor_recording(graphs))
    for _ in range(2):
        sa.step(energy)
        step()
    torch.testing.assert_close(xb, xa, rtol=0, atol=1e-6)
    called = _ops_in(graphs)
    # the mutating op went into an inductor graph (through auto_functionalize)
    assert {"vaebm.langevin_update_", "vaebm.langevin_reduce", "vaebm.philox_uniform"} <= called, \
        called


# --------------------------------------------------------------------------------------- opcheck
def _step_args(B=4, D=6, energy=True, chain_ids=False, stats=True, dtype=torch.float32, n=1):
    g = torch.Generator().manual_seed(B * 10 + D)
    xs = [torch.randn(B, D, generator=g).to(dtype) for _ in range(n)]
    gs = [torch.randn(B, D, generator=g).to(dtype) for _ in range(n)]
    return (xs, gs, torch.randn(B, generator=g) if energy else None,
            torch.tensor([3], dtype=torch.int64), 1, 2, 0,
            torch.arange(B, dtype=torch.int64) * 7 if chain_ids else None,
            0.05, 0.3, 0.0, 0.5, 1.0, -2.0, 2.0, 1,
            torch.zeros(8, 4, B) if stats else None,
            torch.zeros(1, dtype=torch.int64) if stats else None)


@pytest.mark.parametrize("kw", [dict(), dict(energy=False, stats=False), dict(chain_ids=True),
                                dict(dtype=torch.bfloat16, n=2), dict(B=3, D=200)])
def test_opcheck_langevin_step_(cpp_ops, kw):
    torch.library.opcheck(cpp_ops.langevin_step_.default, _step_args(**kw))


@pytest.mark.parametrize("others,gscale,dtype", [(False, False, torch.float32),
                                                 (True, True, torch.float32),
                                                 (True, False, torch.float16)])
def test_opcheck_langevin_reduce(cpp_ops, others, gscale, dtype):
    g = torch.Generator().manual_seed(1)
    B, D = 5, 7
    xs = [torch.randn(B, D, generator=g).to(dtype), torch.randn(B, 2, 3, generator=g).to(dtype)]
    gs = [torch.randn_like(x) for x in xs]
    os_ = [torch.randn_like(x) for x in xs] if others else None
    gsc = torch.rand(B, generator=g) if gscale else None
    args = (xs, gs, os_, 0.05, 1.0, 0.5, gsc)
    torch.library.opcheck(cpp_ops.langevin_reduce.default, args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:  # the fake says (B, 4) float32
        fake = cpp_ops.langevin_reduce.default(*[
            [mode.from_tensor(t) for t in a] if isinstance(a, list) else
            (mode.from_tensor(a) if isinstance(a, torch.Tensor) else a) for a in args])
    assert fake.shape == (B, 4) and fake.dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(), dict(chain_mode=True, gscale=True, chain_ids=True)])
def test_opcheck_langevin_update_(cpp_ops, kw):
    g = torch.Generator().manual_seed(2)
    B, D = 4, 6
    xs, gs = [torch.randn(B, D, generator=g)], [torch.randn(B, D, generator=g)]
    outs = [torch.empty(B, D)]
    args = (xs, gs, outs, torch.tensor([5], dtype=torch.int64), 1, 0, 0, 0.05, 0.3, 0.0, 0.0,
            -math.inf, math.inf,
            torch.rand(B, generator=g) if kw.get("gscale") else None,
            torch.tensor([0, 1, 2, 0], dtype=torch.int32) if kw.get("chain_mode") else None,
            torch.arange(B, dtype=torch.int64) + 9 if kw.get("chain_ids") else None)
    torch.library.opcheck(cpp_ops.langevin_update_.default, args)
