"""NVAE with Gaussian decoder: construction, the eps-space contract (decode/encode, log-densities,
gradients), the stage-1 terms, regularisers, BN re-estimation, the frozen sampling path."""

import io
import math

import pytest
import torch
from torch.distributions import Normal

from vaebm.models.eps_space import EpsVAE, eps_energy_fn, sample_eps
from vaebm.models.nvae import NVAE, NVAEConfig, PRESETS, count_parameters, describe
from vaebm.models.nvae.cells import Conv2D, DecCombinerCell, InvertedResidual
from vaebm.models.nvae.flows import CellAR, channel_mask, conv_mask

# regression values; the eps dims of cifar10 are the paper's (FACTS sec. 3: 30 x 20x16x16 + 3x32x32)
EXPECTED = {  # preset: (parameters, groups, eps dims)
    "cifar10": (130_744_004, 30, 156_672),
    "celeba64": (65_005_372, 15, 146_688),
    "lsun_church64": (65_005_372, 15, 146_688),
    "celebahq256": (365_372_032, 20, 1_942_528),
    "mnist": (2_549_744, 6, 2_704),
    "stacked_mnist": (2_550_616, 6, 4_272),
    "tiny": (47_456, 4, 312),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These small convs gain nothing from threads, and on a loaded 2-core machine two threads
    per process made the tests ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_bn(model, seed=0):
    """Non-trivial BN affine parameters and running statistics, so folding BN is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.6 + 0.8 * torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    return model


def _model(name="tiny", seed=0, **kw):
    torch.manual_seed(seed)
    return _randomise_bn(NVAE(name, **kw), seed).eval()


def _eps(m, batch, seed=1, dtype=torch.float32):
    return sample_eps(m, batch, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- construction
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_construct_and_count(name):
    with torch.device("meta"):
        m = NVAE(name)
    params, groups, eps_dims = EXPECTED[name]
    assert count_parameters(m) == params
    assert m.num_groups == groups
    shapes = m.eps_shapes(2)
    assert len(shapes) == groups + 1 and shapes[-1] == (2, *m.image_shape)
    assert sum(math.prod(s[1:]) for s in shapes) == eps_dims
    assert f"{params:,}" in describe(name)


def test_layout_matches_published_config():
    with torch.device("meta"):  # big presets: layout only
        m = NVAE("celeba64")
    # 3 scales x 5 groups of 20 channels, coarsest first: 8x8, 16x16, 32x32 for 64x64 images
    assert [s[1:] for s in m.latent_shapes[::5]] == [(8, 8), (16, 16), (32, 32)]
    assert m.prior_ftr0.shape == (48 * 8, 8, 8)
    cfg = NVAEConfig.from_args({"dataset": "celeba_256", "num_channels_enc": 32,
                                "num_channels_dec": 32, "num_latent_scales": 5,
                                "num_groups_per_scale": 4, "num_nf": 2, "num_mixture_dec": 1})
    assert cfg.image_size == 256 and cfg.groups_per_scale == [4] * 5
    ada = PRESETS["tiny"].replace(num_groups_per_scale=4, ada_groups=True)
    assert ada.groups_per_scale == [4, 2]


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="unknown NVAE preset"):
        NVAE("cifar100")
    with pytest.raises(ValueError, match="num_latent_scales"):
        NVAE("tiny", num_latent_scales=0)
    with pytest.raises(ValueError, match="Gaussian"):
        NVAEConfig.from_args({"dataset": "cifar10", "num_mixture_dec": 10})
    m = _model()
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
        m.encode_eps(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
        m.loss_terms(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m.encode_eps(torch.rand(3, 8, 8))
    eps = _eps(m, 2)
    with pytest.raises(ValueError, match="expected 5 eps tensors"):
        m.decode_eps(eps[:-1])
    eps[1] = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"eps\[1\]"):
        m.decode_eps(eps)


# --------------------------------------------------------------------------- decode / encode
@pytest.mark.parametrize("name", ["tiny", "mnist"])
def test_decode_shapes_ranges_and_determinism(name):
    m = _model(name)
    assert isinstance(m, EpsVAE)
    eps = _eps(m, 2)
    out = m.decode_eps(eps, with_log_prob=True)
    assert out.x_sample.shape == out.x_mean.shape == (2, *m.image_shape)
    assert out.x_sample.min() >= 0 and out.x_sample.max() <= 1
    assert out.log_p_z.shape == out.log_p_x.shape == (2,)
    again = m.decode_eps([e.clone() for e in eps], with_log_prob=True)
    for a, b in zip(out, again):
        assert torch.equal(a, b)
    # per-sample independence in eval mode: sample 0 alone gives the same result
    one = m.decode_eps([e[:1] for e in eps], with_log_prob=True)
    torch.testing.assert_close(one.x_sample, out.x_sample[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.log_p_z, out.log_p_z[:1], atol=1e-3, rtol=1e-5)
    assert m.decode_eps(eps).log_p_z is None


def _capture(m):
    """Hooks recording the prior's raw params, every z fed to the decoder and the logits."""
    rec = {"prior": [], "z": [], "logits": []}
    hooks = [s.register_forward_hook(lambda mod, i, o: rec["prior"].append(o))
             for s in m.dec_sampler]
    hooks += [c.register_forward_pre_hook(lambda mod, i: rec["z"].append(i[1]))
              for c in m.dec_tower if isinstance(c, DecCombinerCell)]
    hooks.append(m.image_conditional.register_forward_hook(
        lambda mod, i, o: rec["logits"].append(o)))
    return rec, hooks


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_log_densities_against_torch_distributions(t):
    """log p(z) and log p(x|z) recomputed with torch.distributions from the captured prior and
    decoder parameters; and the residual-prior identity -log p(z) = ||eps_z||^2/2 +
    sum log sigma + (D/2) log 2 pi."""
    m = _model().double()
    eps = _eps(m, 3, dtype=torch.float64)
    rec, hooks = _capture(m)
    out = m.decode_eps(eps, t=t, with_log_prob=True)
    for h in hooks:
        h.remove()
    sc = lambda v: 5 * torch.tanh(v / 5)  # noqa: E731
    log_p, sum_log_sigma, d = 0.0, 0.0, 0
    for i, z in enumerate(rec["z"]):
        if i == 0:
            mu, sigma = torch.zeros_like(z), torch.full_like(z, 1.01 * t)
        else:
            mu_raw, ls_raw = rec["prior"][i - 1].chunk(2, 1)
            mu, sigma = sc(mu_raw), (torch.exp(sc(ls_raw)) + 0.01) * t
        torch.testing.assert_close(z, mu + sigma * eps[i])
        log_p = log_p + Normal(mu, sigma).log_prob(z).sum((1, 2, 3))
        sum_log_sigma = sum_log_sigma + sigma.log().sum((1, 2, 3))
        d += z[0].numel()
    torch.testing.assert_close(out.log_p_z, log_p, rtol=1e-10, atol=1e-8)
    sq = sum(e.square().sum((1, 2, 3)) for e in eps[:-1])
    const = 0.5 * d * math.log(2 * math.pi)
    torch.testing.assert_close(-out.log_p_z, 0.5 * sq + sum_log_sigma + const,
                               rtol=1e-10, atol=1e-8)
    mu_raw, ls_raw = rec["logits"][0].chunk(2, 1)
    mu_x, ls_x = sc(mu_raw), sc(ls_raw)
    x = torch.clamp(mu_x + (torch.exp(ls_x) + 0.01) * eps[-1], -1, 1)
    torch.testing.assert_close(out.x_sample, x / 2 + 0.5)
    torch.testing.assert_close(out.x_mean, mu_x / 2 + 0.5)
    sigma1 = torch.exp(ls_x.clamp(min=-2)) + 0.01
    torch.testing.assert_close(out.log_p_x, Normal(mu_x, sigma1).log_prob(x).sum((1, 2, 3)))


def test_energy_modes_differ_by_log_terms():
    m = _model()
    eps = _eps(m, 2)
    energy = lambda x: (x - 0.3).square().sum((1, 2, 3))  # noqa: E731
    paper, lam_p = eps_energy_fn(m, energy, "paper")
    official, lam_o = eps_energy_fn(m, energy, "official")
    assert (lam_p, lam_o) == (1.0, 0.0)
    out = m.decode_eps(eps, with_log_prob=True)
    torch.testing.assert_close(official(eps) - paper(eps), -out.log_p_z - out.log_p_x)
    torch.testing.assert_close(paper(eps), energy(out.x_sample))
    mean_fn, _ = eps_energy_fn(m, energy, "paper", negative="mean")
    torch.testing.assert_close(mean_fn(eps), energy(out.x_mean))


def test_eps_gradients_match_finite_differences():
    m = _model().double()
    eps = [e.requires_grad_(True) for e in _eps(m, 1, dtype=torch.float64)]
    g = torch.Generator().manual_seed(5)
    R = torch.randn(1, *m.image_shape, dtype=torch.float64, generator=g)

    def f(*e):
        out = m.decode_eps(list(e), with_log_prob=True)
        return torch.stack([out.log_p_z.sum(), out.log_p_x.sum(), (out.x_mean * R).sum(),
                            (out.x_sample * R).sum()])

    assert torch.autograd.gradcheck(f, eps, eps=1e-6, atol=1e-5, rtol=1e-4)
    with m.frozen():
        assert torch.autograd.gradcheck(f, eps, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("name", ["tiny", "mnist"])
def test_encode_then_decode_reproduces_x(name):
    m = _model(name)
    x = torch.rand(2, *m.image_shape, generator=torch.Generator().manual_seed(3))
    for use_mean in (True, False):
        eps = m.encode_eps(x, use_mean=use_mean, generator=torch.Generator().manual_seed(4))
        assert [e.shape for e in eps] == m.eps_shapes(2)
        out = m.decode_eps(eps)
        torch.testing.assert_close(out.x_sample, x, atol=2e-5, rtol=0)
    # the posterior pass and T agree on z: same latents -> same decoder mean and log p(z)
    g = torch.Generator().manual_seed(6)
    post = m._posterior(x, generator=g)
    eps = post["eps"] + [torch.zeros_like(x)]
    out = m.decode_eps(eps, with_log_prob=True)
    mu = m._crop(post["logits"])[:, :m.config.in_channels]
    torch.testing.assert_close(out.x_mean, 5 * torch.tanh(mu / 5) / 2 + 0.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.log_p_z, torch.stack(post["log_p"]).sum(0), atol=2e-3, rtol=1e-5)
    # the posterior mean's eps differs from a sample's, and is reproducible
    a = m.encode_eps(x, use_mean=True)
    b = m.encode_eps(x, use_mean=True)
    c = m.encode_eps(x, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a[0], c[0])


# --------------------------------------------------------------------------- stage 1
def test_loss_terms_and_iwae():
    m = _model()
    x = torch.rand(2, *m.image_shape, generator=torch.Generator().manual_seed(0))
    terms = m.loss_terms(x, generator=torch.Generator().manual_seed(1))
    assert terms["log_p_x"].shape == (2,) and len(terms["kl"]) == m.num_groups
    # with flows the KL is the sample estimate log q - log p. Error budget: both sides are float32
    # sums over every latent of terms of size |log q| + |log p|; a different summation order
    # (AVX2 vs AVX-512 reductions) moves them by a few ulps of that size, not of the small KL
    budget = 4 * torch.finfo(torch.float32).eps * (terms["log_q"].abs() + terms["log_p_z"].abs())
    kl_err = (sum(terms["kl"]) - (terms["log_q"] - terms["log_p_z"])).abs()
    assert (kl_err <= budget).all(), (kl_err, budget)
    torch.manual_seed(7)
    via_forward = m(x)
    torch.manual_seed(7)
    torch.testing.assert_close(via_forward["kl"], m.loss_terms(x)["kl"])
    iw1 = m.iwae(x, 1, generator=torch.Generator().manual_seed(1))
    iw_budget = budget + 4 * torch.finfo(torch.float32).eps * terms["log_p_x"].abs()
    assert ((iw1 - (terms["log_p_x"] - sum(terms["kl"]))).abs() <= iw_budget).all()
    # k = 4: log of the mean of the four importance weights drawn from the same generator
    g = torch.Generator().manual_seed(2)
    logw = []
    with torch.no_grad():
        for _ in range(4):
            t4 = m.loss_terms(x, generator=g)
            logw.append((t4["log_p_x"] + t4["log_p_z"] - t4["log_q"]).double())
    logw = torch.stack(logw)
    shift = logw.max(0).values  # log mean exp, computed by hand in float64
    ref = shift + (logw - shift).exp().mean(0).log()
    torch.testing.assert_close(m.iwae(x, 4, generator=torch.Generator().manual_seed(2)),
                               ref.float(), atol=1e-3, rtol=1e-6)
    # gradients reach the encoder and the decoder
    loss = -(terms["log_p_x"] - sum(terms["kl"])).mean()
    loss.backward()
    assert m.stem.weight.grad.abs().sum() > 0 and m.image_conditional[1].weight.grad.abs().sum() > 0


def test_analytic_kl_without_flows():
    m = _model(num_nf=0)
    x = torch.rand(2, *m.image_shape, generator=torch.Generator().manual_seed(0))
    from vaebm.models.nvae.model import _kl_normal
    a, b = torch.randn(50), torch.randn(50)
    s1, s2 = torch.rand(50) + 0.1, torch.rand(50) + 0.1
    torch.testing.assert_close(_kl_normal(a, s1, b, s2),
                               torch.distributions.kl_divergence(Normal(a, s1), Normal(b, s2)))
    kl = m.loss_terms(x)["kl"]
    assert all((k >= 0).all() for k in kl)


def test_regularizers_against_svd():
    m = _model()
    m.regularizers()  # 40 iterations from cold
    for _ in range(30):
        reg = m.regularizers()
    ref = sum(torch.linalg.matrix_norm(c.normalized_weight().detach().flatten(1), ord=2)
              for c in m.modules() if isinstance(c, Conv2D))
    torch.testing.assert_close(reg["spectral"].detach(), ref, rtol=2e-3, atol=0)
    bn = sum(b.weight.abs().max() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    torch.testing.assert_close(reg["bn"], bn)
    reg["spectral"].backward()
    assert m.stem.log_weight_norm.grad.abs().sum() > 0
    # u/v persist: a loaded model starts warm (4 iterations) and gives the same value
    m2 = _model(seed=1)
    m2.load_state_dict(m.state_dict())
    assert m2._sr_warm
    torch.testing.assert_close(m2.regularizers()["spectral"], m.regularizers()["spectral"])


def test_readjust_bn_is_exact_average():
    m = _model()
    enc_bn = m.pre_process[0]._ops[0].bn_act
    enc_before = enc_bn.running_mean.clone()
    target = next(b for b in m.dec_tower.modules() if isinstance(b, torch.nn.BatchNorm2d))
    target_before = target.running_mean.clone()
    seen = []
    h = target.register_forward_pre_hook(lambda mod, i: seen.append(i[0].detach().clone()))
    g = torch.Generator().manual_seed(0)
    old = m.readjust_bn(num_batches=3, batch_size=4, t=0.8, generator=g)
    h.remove()
    assert not m.training and len(seen) == 3
    mean = torch.stack([s.mean((0, 2, 3)) for s in seen]).mean(0)
    var = torch.stack([s.transpose(0, 1).flatten(1).var(1, unbiased=True) for s in seen]).mean(0)
    torch.testing.assert_close(target.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target.running_var, var, atol=1e-5, rtol=1e-5)
    assert target.momentum == 0.05 and int(target.num_batches_tracked) == 3
    assert torch.equal(enc_bn.running_mean, enc_before)
    m.load_state_dict(old, strict=False)  # the returned statistics restore the old ones
    assert torch.equal(target.running_mean, target_before)


# --------------------------------------------------------------------------- flows
@pytest.mark.parametrize("mirror", [False, True])
def test_flow_is_autoregressive(mirror):
    torch.manual_seed(0)
    Z, H = 3, 3
    cell = CellAR(Z, 8, mirror=mirror).double()
    with torch.no_grad():
        cell.mu.conv_0.log_weight_norm.add_(2.0)  # make mu non-negligible
    z = torch.randn(1, Z, H, H, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: cell(v)[0], z).reshape(Z * H * H, Z * H * H)
    # reorder (c, h, w) -> raster position major, channel minor (reversed raster if mirror)
    idx = torch.arange(Z * H * H).view(Z, H, H)
    if mirror:
        idx = idx.flip(1, 2)
    order = idx.permute(1, 2, 0).flatten()
    Jo = J[order][:, order]
    assert torch.equal(torch.triu(Jo, 1), torch.zeros_like(Jo))   # no dependence on later dims
    torch.testing.assert_close(torch.diagonal(Jo), torch.ones(Z * H * H, dtype=torch.float64))
    assert torch.tril(Jo, -1).abs().sum() > 1e-3                   # but on earlier ones


def test_masks():
    assert torch.equal(channel_mask(2, 1, 4, True), torch.tensor([[0., 0], [0, 0], [1, 0], [1, 0]]))
    assert torch.equal(channel_mask(4, 1, 2, False), torch.tensor([[1., 1, 0, 0], [1, 1, 1, 1]]))
    m = conv_mask(3, 1, 1, 1, zero_diag=False, mirror=False)[0, 0]
    assert torch.equal(m, torch.tensor([[1., 1, 1], [1, 1, 0], [0, 0, 0]]))
    assert torch.equal(conv_mask(3, 1, 1, 1, False, True)[0, 0], m.flip(0, 1))


# --------------------------------------------------------------------------- modes and state
@pytest.mark.parametrize("name", ["tiny", "mnist"])
def test_frozen_matches_unfrozen(name):
    m = _model(name)
    eps = _eps(m, 2)
    ref = m.decode_eps(eps, with_log_prob=True)
    with m.frozen():
        assert m.is_frozen
        out = m.decode_eps(eps, with_log_prob=True)
    assert not m.is_frozen and not m.training
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    m.freeze(channels_last=True)
    out = m.decode_eps([e.contiguous(memory_format=torch.channels_last) if e.dim() == 4 else e
                        for e in eps], with_log_prob=True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    folded = [mod for mod in m.modules() if isinstance(mod, InvertedResidual)]
    assert folded and all(mod._frozen for mod in folded)
    m.train()
    assert not m.is_frozen and not any(mod._frozen for mod in folded)


def test_autocast_bf16_close():
    m = _model("mnist").freeze()
    eps = _eps(m, 2)
    ref = m.decode_eps(eps, with_log_prob=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.decode_eps(eps, with_log_prob=True)
    assert out.log_p_z.dtype == torch.float32
    assert (out.x_mean - ref.x_mean).abs().max() < 0.05
    assert ((out.log_p_z - ref.log_p_z).abs() / ref.log_p_z.abs()).max() < 0.02


def test_state_dict_roundtrip():
    m = _model("tiny")
    m.regularizers()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = NVAE("tiny")
    m2.load_state_dict(torch.load(buf, weights_only=True))
    m2.eval()
    eps = _eps(m, 2)
    for a, b in zip(m.decode_eps(eps, with_log_prob=True), m2.decode_eps(eps, with_log_prob=True)):
        assert torch.equal(a, b)
    x = torch.rand(2, *m.image_shape)
    for a, b in zip(m.encode_eps(x, use_mean=True), m2.encode_eps(x, use_mean=True)):
        assert torch.equal(a, b)


def test_sample():
    m = _model("tiny")
    a = m.sample(3, t=0.8, generator=torch.Generator().manual_seed(0))
    b = m.sample(3, t=0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    eps = _eps(m, 3, seed=0)
    x_mean = m.decode_eps(eps, t=0.8).x_mean
    torch.testing.assert_close(a, x_mean.clamp(0, 1))
    noisy = m.sample(3, generator=torch.Generator().manual_seed(0), mean=False)
    assert not torch.equal(noisy, m.sample(3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10", "celeba64"])
def test_big_presets_forward(name):
    m = _model(name)
    eps = _eps(m, 1)
    with torch.no_grad():
        ref = m.decode_eps(eps, with_log_prob=True)
        with m.frozen():
            out = m.decode_eps(eps, with_log_prob=True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    x = torch.rand(1, *m.image_shape)
    with torch.no_grad():
        eps = m.encode_eps(x)
        torch.testing.assert_close(m.decode_eps(eps).x_sample, x, atol=1e-4, rtol=0)


def test_convert_sync_batchnorm_keeps_swish_and_state():
    from vaebm.models.nvae.cells import SyncBNSwish

    m = _model("tiny")
    eps = _eps(m, 2)
    ref = m.decode_eps(eps, with_log_prob=True)
    keys = list(m.state_dict())
    n_bn = len(m._bn_layers())
    m.convert_sync_batchnorm()
    assert not any(type(b) is torch.nn.BatchNorm2d for b in m.modules())
    assert any(isinstance(b, SyncBNSwish) for b in m.modules()) and len(m._bn_layers()) == n_bn
    assert list(m.state_dict()) == keys
    for a, b in zip(m.decode_eps(eps, with_log_prob=True), ref):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_frozen_channels_last_bf16():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = _randomise_bn(NVAE("celeba64")).to(dev).eval()
    eps = [e.to(dev) for e in _eps(m, 2)]
    with torch.no_grad():
        ref = m.decode_eps(eps, with_log_prob=True)
        m.freeze(channels_last=True)
        out = m.decode_eps(eps, with_log_prob=True)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)  # TF32 convs may differ
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = m.decode_eps(eps, with_log_prob=True)
    assert low.log_p_z.dtype == torch.float32
    assert (low.x_mean - ref.x_mean).abs().max() < 0.1
    assert ((low.log_p_z - ref.log_p_z).abs() / ref.log_p_z.abs()).max() < 0.02
    eps = [e.requires_grad_(True) for e in eps]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m.decode_eps(eps, with_log_prob=True)
    grads = torch.autograd.grad((-out.log_p_z - out.log_p_x).sum(), eps)
    assert all(torch.isfinite(g).all() for g in grads)
