"""The ops seam: every kernel op declared once (vaebm.ops._library), implemented by the extensions,
resolved by one function (vaebm.ops._registry.resolve_op), checked with torch.library.opcheck.

(The Langevin ops' opchecks are in tests/sampling/test_compile.py with the compile tests.)
"""

import re

import pytest
import torch

from vaebm._paths import csrc_dir
from vaebm.ops import BackendUnavailable, _library, _registry
from vaebm.ops.conv import DWCONV, DWCONV_WGRAD
from vaebm.ops.langevin import REDUCE, STEP, UNIFORM, UPDATE
from vaebm.ops.swish import SWISH
from vaebm.ops.weight_norm import WEIGHT_NORM

TABLES = {"langevin_update_": UPDATE, "langevin_reduce": REDUCE, "langevin_step_": STEP,
          "philox_uniform": UNIFORM,
          **SWISH, **WEIGHT_NORM, "dwconv2d": DWCONV, "dwconv2d_wgrad": DWCONV_WGRAD}


def test_every_op_is_declared_once_and_only_implemented_in_csrc():
    """No C++ or CUDA source declares a schema (m.def) besides the tensor-less ISA diagnostic;
    every TORCH_LIBRARY block is an IMPL block of the one namespace."""
    for p in sorted(csrc_dir().rglob("*")):
        if p.suffix not in (".cpp", ".cu", ".h", ".cuh"):
            continue
        text = p.read_text()
        defs = re.findall(r'm\.def\("([a-z_0-9]+)', text)
        assert set(defs) <= {"cpu_swish_isa"}, (p.name, defs)
        for ns, key in re.findall(r"TORCH_LIBRARY_IMPL\((\w+), (\w+), m\)", text):
            assert ns == "vaebm" and key in ("CPU", "CUDA"), (p.name, ns, key)
        assert not re.search(r"TORCH_LIBRARY\(", text), p.name


def test_every_table_names_a_declared_op_and_every_declared_op_has_a_table():
    declared = set(_library.SCHEMAS)
    assert set(TABLES) == declared
    for op, table in TABLES.items():
        for backend, k in table.items():
            assert backend in _registry.BACKENDS
            assert k.name in ("triton_" + op, op), (op, backend, k.name)
            if k.ext != "triton" or op in _library.TRITON:  # declared before any build
                assert hasattr(torch.ops.vaebm, k.name), k.name


def test_fakes_shapes_without_any_kernel():
    """The schemas and fakes exist at import: shapes come out under FakeTensorMode whether
    or not an extension was ever built."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 8, 8)
        w = torch.empty(3, 1, 5, 5)
        assert torch.ops.vaebm.dwconv2d(x, w, None, 2).shape == (2, 3, 8, 8)
        assert torch.ops.vaebm.dwconv2d(x, w, None, 0).shape == (2, 3, 4, 4)
        assert torch.ops.vaebm.dwconv2d_wgrad(x, x, 5, 2).shape == (3, 1, 5, 5)
        assert torch.ops.vaebm.swish_bwd2(x, x, x, None).shape == x.shape
        gv, gl = torch.ops.vaebm.weight_norm_bwd(w, w, torch.empty(3))
        assert gv.shape == w.shape and gl.shape == (3,)
        r = torch.ops.vaebm.langevin_reduce([torch.empty(5, 4)], [torch.empty(5, 4)], None,
                                            0.1, 0.0, 0.0, None)
        assert r.shape == (5, 4) and r.dtype == torch.float32


def test_resolver_order_and_reasons(monkeypatch, fake_kernel):
    table = {"cpp": fake_kernel("swish_fwd", lambda *a: "k", dtypes=(torch.float32,))}
    cpu = torch.device("cpu")
    monkeypatch.delenv("VAEBM_BACKEND", raising=False)
    assert _registry.resolve_op(table, cpu, torch.float32) == ("cpp", table["cpp"].fn)
    assert _registry.resolve_op(table, cpu, torch.float64) == ("torch", None)  # auto: quietly
    with pytest.raises(BackendUnavailable, match="supports torch.float32, got torch.float64"):
        _registry.resolve_op(table, cpu, torch.float64, "cpp")
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):  # the device first
        _registry.resolve_op(table, cpu, torch.float32, "cuda")
    with monkeypatch.context() as m:
        m.setattr(_registry, "why_not", lambda name, device: None)
        with pytest.raises(BackendUnavailable, match="does not implement swish_fwd"):
            _registry.resolve_op(table, cpu, torch.float32, "triton")
    with pytest.raises(BackendUnavailable, match="with chain_ids"):
        _registry.resolve_op(table, cpu, torch.float32, "cpp", need=("chain_ids",))
    monkeypatch.setenv("VAEBM_BACKEND", "torch")
    assert _registry.resolve_op(table, cpu, torch.float32) == ("torch", None)
    with _registry.use_backend("cpp"):  # the context beats the environment
        assert _registry.resolve_op(table, cpu, torch.float32)[0] == "cpp"
        # and the argument beats the context
        assert _registry.resolve_op(table, cpu, torch.float32, "torch")[0] == "torch"


def test_auto_falls_back_once_when_an_extension_fails(monkeypatch, fake_kernel, caplog):
    tries = []

    class Broken(fake_kernel):
        def get(self):
            tries.append(1)
            raise BackendUnavailable("no compiler")

    table = {"cpp": Broken("swish_fwd", None)}
    table["cpp"].ext = "broken_ext"
    monkeypatch.delitem(_registry._failed, "broken_ext", raising=False)
    monkeypatch.delenv("VAEBM_BACKEND", raising=False)
    for _ in range(3):
        assert _registry.resolve_op(table, torch.device("cpu"), torch.float32) == ("torch", None)
    assert tries == [1] and "no compiler" in caplog.text
    monkeypatch.delitem(_registry._failed, "broken_ext")


# ------------------------------------------------------------------ opcheck of the CPU kernels
@pytest.fixture(scope="module")
def cpu_nn():
    try:
        _registry.load_extension("cpu_nn")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    return torch.ops.vaebm


def _nn_cases():
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, b = r(2, 5, 6, 7), r(5)
    v, lg = r(4, 3, 3, 3), r(4)
    return [("swish_fwd", (x, b)), ("swish_fwd", (x.to(torch.bfloat16), None)),
            ("swish_bwd", (r(2, 5, 6, 7), x, b)), ("swish_bwd2", (r(2, 5, 6, 7), r(2, 5, 6, 7), x, b)),
            ("weight_norm_fwd", (v, lg)), ("weight_norm_bwd", (r(4, 3, 3, 3), v, lg)),
            ("dwconv2d", (x, r(5, 1, 3, 3), b, 1)), ("dwconv2d", (x, r(5, 1, 5, 5), None, 0)),
            ("dwconv2d_wgrad", (x, r(2, 5, 6, 7), 3, 1))]


@pytest.mark.parametrize("case", range(len(_nn_cases())))
def test_opcheck_network_kernels(cpu_nn, case):
    name, args = _nn_cases()[case]
    torch.library.opcheck(getattr(cpu_nn, name).default, args)


@pytest.mark.skipif(not _registry.interpreting_triton() and not torch.cuda.is_available(),
                    reason="Triton runs on CPU only under TRITON_INTERPRET=1")
def test_opcheck_triton_ops():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        _registry.load_extension("triton")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    g = torch.Generator().manual_seed(4)
    x, b = torch.randn(2, 3, 4, 5, generator=g).to(dev), torch.randn(3, generator=g).to(dev)
    # (triton_op traces the kernels for fake tensors through wrap_triton, which the interpreter
    # bypasses: the fake-tensor check runs where the kernels are compiled)
    torch.library.opcheck(torch.ops.vaebm.triton_swish_fwd.default, (x, b),
                          test_utils=("test_schema",) if dev == "cpu" else
                          ("test_schema", "test_faketensor"))
    xs = [torch.randn(3, 7, generator=g).to(dev)]
    gs = [torch.randn(3, 7, generator=g).to(dev)]
    torch.library.opcheck(torch.ops.vaebm.triton_langevin_reduce.default,
                          (xs, gs, None, 0.1, 0.0, 0.0, None),
                          test_utils=("test_schema", "test_faketensor"))
