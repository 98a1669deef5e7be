"""Energy networks: Table 7 parameter counts, data-dependent init, spectral norms, fast paths."""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from vaebm.models import EnergyNet, WNConv2d, energy_ref
from vaebm.models.layers import data_init
from vaebm.ops.weight_norm import weight_norm_ref

# ---------------------------------------------------------------- parameter counts from Table 7
# Table 7 of the paper, written out again here (not imported): stem width, then the ResBlocks
# as (channels, down). Each conv is weight-normed: v (C_out*C_in*k*k) + log_g (C_out) + bias.
TABLE7 = {
    "cifar10": (128, [(128, 1), (128, 0), (256, 1), (256, 0), (256, 1), (256, 0)]),
    "celeba64": (64, [(64, 1), (64, 0), (128, 1), (128, 0), (128, 1), (256, 0), (256, 1),
                      (256, 0)]),
    "lsun_church64": (64, [(64, 1), (64, 0), (128, 1), (128, 0), (128, 0), (128, 1), (256, 0),
                           (256, 0), (256, 1), (256, 0)]),
    "celebahq256": (64, [(64, 1), (64, 0), (128, 1), (128, 0), (128, 1), (128, 0), (256, 1),
                         (256, 0), (256, 1), (256, 0), (512, 1), (512, 0)]),
}


def _conv(cin, cout, k, bias):
    return cout * cin * k * k + cout + (cout if bias else 0)


def table7_count(preset):
    stem, blocks = TABLE7[preset]
    n, c = _conv(3, stem, 3, True), stem
    for out, down in blocks:
        n += _conv(c, out, 3, True) + _conv(out, out, 3, True)
        if down or c != out:
            n += _conv(c, out, 1, False)  # 1x1 skip without bias
        c = out
    return n + c + 1  # linear head: C -> 1 with bias


@pytest.mark.parametrize("preset", list(TABLE7))
def test_parameter_counts_match_table7(preset):
    with torch.device("meta"):  # no memory, no forward at 256 px
        net = EnergyNet(preset)
    assert sum(p.numel() for p in net.parameters()) == table7_count(preset)


def test_info_command_reports_the_counts(capsys):
    from vaebm.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for preset in TABLE7:
        assert f"EnergyNet({preset!r}" in out and f"{table7_count(preset):,} parameters" in out
    # for the record: cifar10 5,137,921; celeba64 4,337,537; lsun 5,813,633; celebahq 14,207,105
    assert table7_count("cifar10") == 5_137_921


# ---------------------------------------------------------------- helpers
def _batches(n, B=16, preset="tiny", seed=0):
    gen = torch.Generator().manual_seed(seed)
    net = EnergyNet(preset)
    C, R = net.in_channels, net.resolution
    # real-data-like inputs: images in [0, 1] with per-channel offsets so means are not zero
    return [(torch.rand(B, C, R, R, generator=gen) * 0.6 + 0.2 * torch.arange(C).view(1, -1, 1, 1)
             / max(C, 1)).clamp(0, 1) for _ in range(n)]


def _net(preset="tiny", seed=0, init=True, **kw):
    torch.manual_seed(seed)
    net = EnergyNet(preset, **kw)
    if init:
        net.data_init(_batches(2, preset=preset, seed=seed + 100))
    return net


def _conv_outputs(net, x):
    """Each conv's output, computed the plain way (weight_norm_ref, conv, avg_pool)."""
    outs = {}

    def conv(m, h):
        outs[m] = F.conv2d(h, weight_norm_ref(m.weight_v, m.log_g), m.bias, m.stride, m.padding)
        return outs[m]

    sw = lambda y: F.silu(y) / 1.1  # noqa: E731
    h = sw(conv(net.stem, x))
    for b in net.blocks:
        y = conv(b.conv2, sw(conv(b.conv1, h))) + (h if b.skip is None else conv(b.skip, h))
        h = sw(F.avg_pool2d(y, 2) if b.down else y)
    return outs


# ---------------------------------------------------------------- data-dependent init
def test_data_init_gives_mean0_std02_per_channel():
    torch.manual_seed(0)
    net = EnergyNet("tiny")
    batches = _batches(3, seed=1)
    assert net.data_init(batches) == 12 and net.initialised
    with torch.no_grad():
        outs = _conv_outputs(net, torch.cat(batches))
    for m, y in outs.items():
        mean, std = y.mean((0, 2, 3)), y.std((0, 2, 3), correction=0)
        torch.testing.assert_close(std, torch.full_like(std, 0.2), atol=2e-4, rtol=0)
        if m.bias is not None:  # a bias-free 1x1 skip cannot move its mean; only its spread
            torch.testing.assert_close(mean, torch.zeros_like(mean), atol=2e-4, rtol=0)


def test_init_flag_survives_state_dict_round_trip():
    net = _net()
    sd = net.state_dict()
    assert sd["stem.initialised"].item() and sd["blocks.0.skip.initialised"].item()
    torch.manual_seed(1)
    other = EnergyNet("tiny")
    with tempfile.TemporaryDirectory() as d:  # through a file, weights_only, like a checkpoint
        torch.save(sd, os.path.join(d, "ebm.pt"))
        other.load_state_dict(torch.load(os.path.join(d, "ebm.pt"), weights_only=True))
    x = _batches(1, seed=7)[0]
    before = other(x)
    assert other.data_init(_batches(2, seed=9)) == 0  # the training script may call it anyway
    torch.testing.assert_close(other(x), before)
    torch.testing.assert_close(other(x), net(x))
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    assert other.data_init(_batches(2, seed=9), force=True) == 12  # unless forced


def test_data_init_averages_over_ranks(tmp_path):
    """Two gloo ranks with different data end with identical weights and the pooled stats."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=2, join=True)
    sds = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k in sds[0]:
        torch.testing.assert_close(sds[0][k], sds[1][k])
    net = EnergyNet("tiny")
    net.load_state_dict(sds[0])
    with torch.no_grad():
        outs = _conv_outputs(net, torch.cat(_batches(1, seed=20) + _batches(1, seed=21)))
    for m, y in outs.items():
        torch.testing.assert_close(y.std((0, 2, 3), correction=0),
                                   torch.full((m.out_channels,), 0.2), atol=2e-4, rtol=0)


def _rank_main(rank, tmp):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store",
                                         rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial parameters on every rank, as DDP would broadcast
    net = EnergyNet("tiny")
    net.data_init(_batches(1, seed=20 + rank))
    torch.save(net.state_dict(), f"{tmp}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- spectral norms
def test_spectral_norms_match_matrix_norm():
    net = _net()
    net.spectral_regularisation()  # first use: 40 iterations
    for _ in range(50):
        reg = net.spectral_regularisation()  # 4 more each call, from the persistent u/v
    want = 0
    for m in net.modules():
        if isinstance(m, WNConv2d):
            w = weight_norm_ref(m.weight_v, m.log_g).flatten(1)
            sigma = torch.linalg.matrix_norm(w, ord=2)
            torch.testing.assert_close(m.spectral_norm(), sigma, rtol=1e-4, atol=0)
            # the gradient is that of the exact norm too: u v^T pulled back through weight norm
            g1 = torch.autograd.grad(m.spectral_norm(), (m.weight_v, m.log_g))
            g2 = torch.autograd.grad(sigma, (m.weight_v, m.log_g))
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4)
            want = want + sigma.detach()
    torch.testing.assert_close(reg.detach(), want, rtol=1e-4, atol=0)


def test_power_iteration_state_is_saved():
    net = _net()
    for _ in range(20):
        net.spectral_regularisation()
    sigma = net.stem.spectral_norm(n_iter=0)
    other = EnergyNet("tiny")
    other.load_state_dict(net.state_dict())
    # with u/v restored no iteration is needed; a cold start would use random vectors
    torch.testing.assert_close(other.stem.spectral_norm(n_iter=0), sigma)


# ---------------------------------------------------------------- forward paths
@pytest.mark.parametrize("preset,width", [("tiny", 1.0), ("mnist", 0.125), ("mnist32", 0.125)])
@pytest.mark.parametrize("mode", ["train", "frozen", "frozen_channels_last"])
def test_forward_and_input_gradient_match_reference(preset, width, mode):
    net = _net(preset, width=width).double()
    x = _batches(1, B=4, preset=preset, seed=5)[0].double().requires_grad_()
    want = energy_ref(net, x)
    (gwant,) = torch.autograd.grad(want.sum(), x)
    if mode != "train":
        net.freeze(channels_last=mode.endswith("channels_last"))
    e = net(x)
    (g,) = torch.autograd.grad(e.sum(), x)
    assert e.shape == (4,) and e.dtype == torch.float64
    torch.testing.assert_close(e, want)
    torch.testing.assert_close(g, gwant)


def test_gradient_penalty_double_backward_matches_reference():
    net = _net().double()
    x = _batches(1, B=3, seed=6)[0].double().requires_grad_()
    params = [p for p in net.parameters()]

    def penalty(fn):
        (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), params[:-1])  # not the head bias

    for a, b in zip(penalty(net), penalty(lambda x: energy_ref(net, x))):
        torch.testing.assert_close(a, b)


def test_frozen_mode_caches_and_detaches():
    net = _net()
    x = _batches(1, B=4, seed=8)[0].requires_grad_()
    with net.frozen(channels_last=True):
        e = net(x)
        assert not any(t.requires_grad for t in [net.stem.weight()])
        with torch.no_grad():
            net.stem.log_g.add_(1.0)  # cached: a stale copy until unfrozen
        torch.testing.assert_close(net(x), e)
        e.sum().backward()
        assert all(p.grad is None for p in net.parameters())  # gradients reach x only
    assert not net.is_frozen
    assert not torch.allclose(net(x), e)


def test_bf16_autocast_in_frozen_mode():
    net = _net("mnist", width=0.25)
    x = _batches(1, B=4, preset="mnist", seed=9)[0]
    want = net(x)
    with net.frozen(channels_last=True), torch.autocast("cpu", dtype=torch.bfloat16):
        e = net(x)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e, want, rtol=0.05, atol=0.05 * want.abs().max().item())


# ---------------------------------------------------------------- construction and errors
def test_width_multiplier_and_config():
    net = EnergyNet("tiny", width=2)
    assert net.stem.out_channels == 16 and net.blocks[-1].out_channels == 32
    assert EnergyNet(**net.config).config == net.config


@pytest.mark.parametrize("bad", [(2, 1, 8, 8), (2, 3, 16, 16), (2, 3, 8, 9), (3, 8, 8)])
def test_wrong_shape_names_the_expected_shape(bad):
    net = EnergyNet("tiny")
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, 8, 8\)"):
        net(torch.rand(bad))


def test_bad_dtype_preset_and_resolution():
    with pytest.raises(TypeError, match="floating-point"):
        EnergyNet("tiny")(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown preset"):
        EnergyNet("imagenet")
    with pytest.raises(ValueError, match="too small"):
        EnergyNet("cifar10", resolution=4)
    with pytest.raises(RuntimeError, match="frozen"):
        _net().freeze().data_init(_batches(1))


def test_generic_data_init_helper_on_a_plain_stack():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(WNConv2d(3, 5, 3), torch.nn.Tanh(), WNConv2d(5, 4, 1))
    x = torch.randn(20, 3, 6, 6) * 3 + 1
    assert data_init(seq, [x[:10], x[10:]]) == 2
    with torch.no_grad():
        y = seq(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), correction=0), torch.full((4,), 0.2),
                               atol=1e-5, rtol=0)


def test_torch_compile_fullgraph_matches_eager():
    """The custom ops and the layers trace without graph breaks, in both modes."""
    net = _net()
    x = _batches(1, B=4, seed=10)[0].requires_grad_()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    want = energy_ref(net, x)
    (gwant,) = torch.autograd.grad(want.sum(), x)
    for frozen in (False, True):
        if frozen:
            net.freeze(channels_last=True)
        e = compiled(x)
        (g,) = torch.autograd.grad(e.sum(), x)
        torch.testing.assert_close(e, want)
        torch.testing.assert_close(g, gwant)
