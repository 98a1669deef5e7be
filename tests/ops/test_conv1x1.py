"""vaebm.ops.conv: the oneDNN 1x1 conv against its reference, F.conv2d, forward and input
gradient, in float32 and bfloat16, and the NVAE frozen decoder actually taking the path."""

import pytest
import torch
import torch.nn.functional as F

from vaebm.ops import conv

pytestmark = pytest.mark.skipif(not conv.available(), reason="torch built without oneDNN")


def _case(B, Ci, Co, H, W, fmt, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Ci, H, W, generator=g).contiguous(memory_format=fmt)
    w = torch.randn(Co, Ci, 1, 1, generator=g) / Ci ** 0.5
    b = torch.randn(Co, generator=g) if bias else None
    gy = torch.randn(B, Co, H, W, generator=g)
    return x, w, b, gy


def _fwd_bwd(fn, x, *args, gy):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, *args)
    (gx,) = torch.autograd.grad(y, x, gy.to(y.dtype))
    return y, gx


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 16, 40, 8, 8), (3, 33, 7, 5, 9), (1, 64, 128, 4, 4)])
def test_matches_reference_fp32(fmt, bias, shape, one_thread):
    x, w, b, gy = _case(*shape, fmt, bias, seed=hash((shape, bias)) % 1000)
    y, gx = _fwd_bwd(conv.conv1x1, x, w, b, gy=gy)
    y_ref, gx_ref = _fwd_bwd(conv.conv1x1_ref, x.double(), w.double(),
                             None if b is None else b.double(), gy=gy.double())
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)


def _tiny_decoder_grads():
    """A seeded tiny NVAE and a function giving the eps-gradients of log p(z) + log p(x|z) +
    sum(x_mean) at fixed eps (frozen or not, whatever the model is when it is called)."""
    from vaebm.models.nvae import NVAE

    torch.manual_seed(0)
    vae = NVAE("tiny").eval()
    eps = [torch.randn(s) for s in vae.eps_shapes(2)]

    def grads():
        xs = [e.clone().requires_grad_(True) for e in eps]
        out = vae.decode_eps(xs, with_log_prob=True)
        return torch.autograd.grad((out.log_p_z + out.log_p_x + out.x_mean.sum()).sum(), xs)

    return vae, grads


@pytest.fixture
def kernels_forced(monkeypatch):
    """Take the fast paths wherever they apply (no timing), as the profiler tests need."""
    monkeypatch.setenv("VAEBM_CPU_CONV", "kernel")


@pytest.mark.skipif(not conv.bf16_ok(), reason="oneDNN has no bf16 conv on this CPU (AVX2 only)")
@pytest.mark.parametrize("how", ["explicit", "autocast"])
def test_matches_reference_bf16(how, one_thread):
    x, w, b, gy = _case(2, 32, 48, 6, 6, torch.contiguous_format, True, seed=7)
    if how == "explicit":
        y, gx = _fwd_bwd(conv.conv1x1, x.bfloat16(), w.bfloat16(), b.bfloat16(), gy=gy)
        y_ref, gx_ref = _fwd_bwd(conv.conv1x1_ref, x.bfloat16(), w.bfloat16(), b.bfloat16(),
                                 gy=gy)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, gx = _fwd_bwd(conv.conv1x1, x, w, b, gy=gy)
            y_ref, gx_ref = _fwd_bwd(conv.conv1x1_ref, x, w, b, gy=gy)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    # both round to bf16; they may accumulate in different orders
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=2e-2, atol=2e-2)
    # and both are close to the fp32 answer
    y32 = F.conv2d(x, w, b)
    assert (y.float() - y32).abs().max() < 0.05 * y32.abs().max()


def test_bf16_without_cpu_support_falls_back(monkeypatch):
    """On a CPU whose oneDNN has no bf16 path (AVX2 only) the 1x1 path must decline bf16 calls,
    and the frozen decoder under bf16 autocast must run (on F.conv2d) instead of crashing."""
    monkeypatch.setattr(conv, "_BF16", [False])
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 1, 1)
    assert conv.supported(x, w)
    assert not conv.supported(x.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv.supported(x, w)
    with pytest.raises(ValueError, match="unsupported call"):
        conv.conv1x1(x.bfloat16(), w.bfloat16())
    from vaebm.models.nvae import NVAE

    torch.manual_seed(0)
    vae = NVAE("tiny").eval()
    eps = [torch.randn(s) for s in vae.eps_shapes(2)]
    ref = vae.decode_eps(eps).x_mean
    vae.freeze()

    def refuse(*a, **k):
        raise AssertionError("the 1x1 fast path was taken for a bf16 call")

    monkeypatch.setattr(conv, "conv1x1", refuse)
    monkeypatch.setenv("VAEBM_CPU_CONV", "kernel")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae.decode_eps(eps).x_mean
    assert (out.float() - ref).abs().max() < 0.05


def test_bf16_support_follows_onednn_isa():
    """bf16_ok() is oneDNN's own answer, which ONEDNN_MAX_CPU_ISA=AVX2 turns off (CI's
    restricted pass runs this module under it)."""
    import os

    assert conv.bf16_ok() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("AVX2", "AVX", "SSE41"):
        assert not conv.bf16_ok()


def test_prefer_picks_the_measured_faster_path(monkeypatch):
    """The choice follows measurement on the call's own shapes: a fast path made slow loses, a
    plain path made slow loses, the answer is cached per shape, and the env var overrides."""
    import time

    monkeypatch.setattr(conv, "_CHOICE", {})
    monkeypatch.delenv("VAEBM_CPU_CONV", raising=False)
    w = torch.randn(8, 4, 1, 1)

    def quick(t):
        return F.conv2d(t, w)

    def slow(t):
        time.sleep(0.004)
        return F.conv2d(t, w)

    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    assert not conv.prefer("t", x, slow, quick, (1,))
    assert conv.prefer("t", x, quick, slow, (2,))
    calls = []
    # cached: the second call with the same key times nothing
    assert not conv.prefer("t", x, lambda t: calls.append(1) or quick(t), quick, (1,))
    assert calls == []
    assert len(conv.choices()) == 2
    # a new shape is measured anew
    conv.prefer("t", torch.randn(3, 4, 6, 6), slow, quick, (1,))
    assert len(conv.choices()) == 3
    monkeypatch.setenv("VAEBM_CPU_CONV", "kernel")
    assert conv.prefer("t", x, slow, quick, (1,))
    monkeypatch.setenv("VAEBM_CPU_CONV", "torch")
    assert not conv.prefer("t", x, quick, slow, (2,))
    monkeypatch.setenv("VAEBM_CPU_CONV", "fastest")
    with pytest.raises(ValueError, match="VAEBM_CPU_CONV must be"):
        conv.prefer("t", x, quick, slow, (2,))


def test_frozen_decoder_auto_choice_matches_reference(monkeypatch, one_thread):
    """Under the default (measured) choice the frozen decoder's eps-gradient equals the
    unfrozen one whichever paths were chosen, and every served conv got a decision."""
    monkeypatch.setattr(conv, "_CHOICE", {})
    monkeypatch.delenv("VAEBM_CPU_CONV", raising=False)
    vae, grads = _tiny_decoder_grads()

    ref = grads()
    vae.freeze()
    fast = grads()
    kinds = {k[0] for k in conv.choices()}
    assert "1x1" in kinds
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_second_derivative_matches_reference(one_thread):
    x, w, b, _ = _case(2, 8, 12, 4, 4, torch.contiguous_format, True, seed=3)

    def hvp(fn):
        xx = x.clone().requires_grad_(True)
        y = fn(xx, w, b)
        (g,) = torch.autograd.grad(y.square().sum(), xx, create_graph=True)
        (h,) = torch.autograd.grad(g.sin().sum(), xx)
        return h

    torch.testing.assert_close(hvp(conv.conv1x1), hvp(conv.conv1x1_ref), rtol=1e-4, atol=1e-5)


def test_supported_and_errors():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 1, 1)
    assert conv.supported(x, w)
    assert not conv.supported(x, w.requires_grad_(True))
    w = w.detach()
    assert not conv.supported(x, torch.randn(6, 4, 3, 3))
    assert not conv.supported(x, w, stride=(2, 2))
    assert not conv.supported(x, w, padding=(1, 1))
    assert not conv.supported(x, torch.randn(6, 2, 1, 1), groups=2)
    assert not conv.supported(x.double(), w.double())
    with pytest.raises(ValueError, match="4 channels, weight expects 3"):
        conv.conv1x1(x, torch.randn(6, 3, 1, 1))
    with pytest.raises(ValueError, match="unsupported call"):
        conv.conv1x1(x.double(), w.double())


def test_frozen_nvae_decoder_uses_onednn_for_1x1(one_thread, kernels_forced):
    """With one thread and a small batch PyTorch would run the decoder's 1x1 convs on its im2col
    kernel; frozen, none of them may go there, and the eps-gradient is unchanged."""
    vae, grads = _tiny_decoder_grads()
    ref = grads()
    vae.freeze()
    with torch.profiler.profile() as prof:
        fast = grads()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_slow_conv2d_forward" not in names
    assert "aten::_slow_conv2d_backward" not in names
    assert "aten::mkldnn_convolution" in names
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- depthwise
@pytest.mark.parametrize("shape,k,pad", [((2, 48, 16, 16), 5, 2), ((2, 7, 9, 23), 3, 1),
                                         ((1, 3, 5, 5), 5, 0), ((2, 5, 8, 8), 5, 4),
                                         ((3, 4, 33, 17), 5, 2), ((1, 2, 4, 40), 1, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_matches_reference(shape, k, pad, bias, one_thread):
    g = torch.Generator().manual_seed(sum(shape) + k + pad)
    B, C, H, W = shape
    x = torch.randn(*shape, generator=g)
    w = torch.randn(C, 1, k, k, generator=g)
    b = torch.randn(C, generator=g) if bias else None
    OH, OW = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    gy = torch.randn(B, C, OH, OW, generator=g)
    y, gx = _fwd_bwd(lambda t: conv.depthwise(t, w, b, pad), x, gy=gy)
    y_ref, gx_ref = _fwd_bwd(lambda t: conv.depthwise_ref(t, w.double(),
                                                          None if b is None else b.double(), pad),
                             x.double(), gy=gy.double())
    assert y.shape == (B, C, OH, OW) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)


def test_depthwise_supported_and_errors():
    x = torch.randn(2, 6, 8, 8)
    w = torch.randn(6, 1, 5, 5)
    assert conv.depthwise_supported(x, w, padding=(2, 2), groups=6)
    assert not conv.depthwise_supported(x, w, padding=(2, 2), groups=1)
    assert not conv.depthwise_supported(x, w, stride=(2, 2), padding=(2, 2), groups=6)
    assert not conv.depthwise_supported(x, w, padding=(2, 1), groups=6)
    assert not conv.depthwise_supported(x, w, padding=(5, 5), groups=6)
    assert not conv.depthwise_supported(x, torch.randn(6, 1, 4, 4), padding=(1, 1), groups=6)
    assert not conv.depthwise_supported(x.double(), w.double(), padding=(2, 2), groups=6)
    assert not conv.depthwise_supported(x.contiguous(memory_format=torch.channels_last), w,
                                        padding=(2, 2), groups=6)
    assert not conv.depthwise_supported(x, w.clone().requires_grad_(True), padding=(2, 2),
                                        groups=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv.depthwise_supported(x, w, padding=(2, 2), groups=6)
    with pytest.raises(ValueError, match="unsupported call"):
        conv.depthwise(x, torch.randn(5, 1, 5, 5), None, 2)
    with pytest.raises(RuntimeError, match="pad must be in"):
        torch.ops.vaebm.dwconv2d(x, w, None, 7)
    with pytest.raises(RuntimeError, match="NCHW-contiguous"):
        torch.ops.vaebm.dwconv2d(x.transpose(2, 3), w, None, 2)


def test_frozen_nvae_decoder_uses_depthwise_kernel(one_thread, kernels_forced):
    from vaebm.models.nvae import NVAE

    torch.manual_seed(1)
    vae = NVAE("tiny").eval().freeze()
    eps = [torch.randn(s, requires_grad=True) for s in vae.eps_shapes(2)]
    with torch.profiler.profile() as prof:
        vae.decode_eps(eps, with_log_prob=True).log_p_x.sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "vaebm::dwconv2d" in names


def test_depthwise_follows_backend_choice():
    from vaebm.ops import use_backend

    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
    assert conv.depthwise_supported(x, w, padding=(1, 1), groups=4)
    with use_backend("torch"):  # the reference path was asked for
        assert not conv.depthwise_supported(x, w, padding=(1, 1), groups=4)


# ----------------------------------------------------------------------------- depthwise, training
@pytest.mark.parametrize("shape,k,pad", [((2, 12, 16, 16), 5, 2), ((3, 5, 7, 9), 5, 2),
                                         ((2, 4, 33, 17), 3, 1), ((1, 3, 4, 4), 5, 4),
                                         ((2, 7, 5, 40), 1, 0)])
def test_depthwise_train_matches_reference(shape, k, pad, one_thread):
    """Both gradients (input and weight) of the C++ training path against F.conv2d in float64
    on fresh random inputs, including planes narrower than one vector and odd widths."""
    g = torch.Generator().manual_seed(sum(shape) * k + pad)
    B, C, H, W = shape
    x = torch.randn(*shape, generator=g)
    w = torch.randn(C, 1, k, k, generator=g)
    OH, OW = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    gy = torch.randn(B, C, OH, OW, generator=g)

    def run(fn, xx, ww):
        xx, ww = xx.clone().requires_grad_(True), ww.clone().requires_grad_(True)
        y = fn(xx, ww)
        return (y, *torch.autograd.grad(y, (xx, ww), gy.to(y.dtype)))

    got = run(lambda a, b: conv.depthwise_train(a, b, pad), x, w)
    ref = run(lambda a, b: F.conv2d(a, b, None, 1, pad, 1, C), x.double(), w.double())
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)


def test_depthwise_train_supported_and_errors():
    x, w = torch.randn(2, 6, 8, 8), torch.randn(6, 1, 5, 5, requires_grad=True)
    assert conv.depthwise_train_supported(x, w, None, padding=(2, 2), groups=6)
    assert not conv.depthwise_train_supported(x, w, torch.zeros(6), padding=(2, 2), groups=6)
    assert not conv.depthwise_train_supported(x.double(), w.double(), None, padding=(2, 2),
                                              groups=6)
    assert not conv.depthwise_train_supported(x, w, None, stride=(2, 2), padding=(2, 2),
                                              groups=6)
    assert not conv.depthwise_train_supported(x, torch.randn(6, 1, 17, 17), None,
                                              padding=(8, 8), groups=6)
    with pytest.raises(ValueError, match="depthwise_train: unsupported call"):
        conv.depthwise_train(x.transpose(2, 3), w, 2)
    with pytest.raises(RuntimeError, match="g must be a contiguous float32"):
        torch.ops.vaebm.dwconv2d_wgrad(x, torch.randn(2, 6, 7, 8), 5, 2)


def test_nvae_training_step_same_with_depthwise_kernel(monkeypatch, one_thread):
    """A stage-1 loss and every parameter gradient of the mnist-shaped NVAE are the same
    (to fp32 summation order) with the C++ depthwise training path forced on and off."""
    from vaebm.models.nvae import NVAE

    def grads(policy):
        monkeypatch.setenv("VAEBM_CPU_CONV", policy)
        torch.manual_seed(0)
        m = NVAE("tiny").train()
        x = torch.rand(4, *m.image_shape, generator=torch.Generator().manual_seed(1))
        t = m.loss_terms(x, generator=torch.Generator().manual_seed(2))
        loss = (-t["log_p_x"] + sum(t["kl"])).mean()
        with torch.profiler.profile() as prof:
            loss.backward()
        used = "vaebm::dwconv2d_wgrad" in {e.key for e in prof.key_averages()}
        return loss.detach(), {n: p.grad for n, p in m.named_parameters()
                               if p.grad is not None}, used

    l1, g1, used1 = grads("kernel")
    l0, g0, used0 = grads("torch")
    assert used1 and not used0
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-4)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-4, msg=n)
