"""Published NVAE checkpoints: safe loading, weight mapping, and equality with the published model.

The fixtures (tests/fixtures/nvae_official/README.md) are small checkpoints in the published
format with random weights, and the published model's outputs and eps-gradients for fixed eps.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from vaebm.models.nvae import PRESETS, NVAE
from vaebm.models.nvae.official import (NVAECheckpointError, convert_state_dict,
                                        load_nvae_checkpoint, nvae_args_to_config,
                                        read_nvae_checkpoint)

# VAEBM_NVAE_FIXTURES: another folder of fixtures, e.g. regenerated with
# tests/fixtures/nvae_official/make_fixtures.py (default: the committed ones)
FIX = Path(os.environ.get("VAEBM_NVAE_FIXTURES")
           or Path(__file__).resolve().parents[1] / "fixtures" / "nvae_official")
NAMES = ("a", "b")


def ckpt_path(name):
    return FIX / f"nvae_small_{name}.pt"


def refs(name):
    return torch.load(FIX / f"nvae_small_{name}_ref.pt", weights_only=True)


def raw_ckpt(name):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(ckpt_path(name), weights_only=True)


def assert_close(actual, expected, tol, what):
    """|a - e| <= tol * max(1, max|e|): rounding-level agreement for sums and large gradients."""
    expected = expected.to(actual.dtype)
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual.detach() - expected).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


_models = {}


def loaded(name):
    if name not in _models:
        _models[name] = load_nvae_checkpoint(ckpt_path(name))
    return _models[name]


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", NAMES)
def test_load_builds_the_stored_architecture_and_copies_every_weight(name):
    model, info = loaded(name)
    raw = raw_ckpt(name)
    args, sd = raw["args"], raw["state_dict"]
    cfg = info["config"]
    assert cfg.image_size == {"a": 16, "b": 32}[name]
    fields = ("num_latent_scales", "num_groups_per_scale", "num_latent_per_group", "num_nf",
              "num_channels_enc", "num_channels_dec", "num_cell_per_cond_enc")
    assert [getattr(cfg, f) for f in fields] == [getattr(args, f) for f in fields]
    assert cfg.ada_groups == getattr(args, "ada_groups", False)
    shapes = [tuple(s) for s in model.eps_shapes(2)]
    assert shapes[:-1] == [tuple(s) for s in refs(name)["zshapes"]]
    assert not model.training
    assert info["unexpected"] == [] and info["missing"] == [] and info["shape_mismatch"] == {}
    dup = sorted(k for k in sd if k.endswith(".weight_normalized"))
    assert dup and sorted(info["dropped"]) == dup
    assert info["local_only"]
    assert all(k.rsplit(".", 1)[1] in ("sr_u", "sr_v") for k in info["local_only"])
    assert info["epoch"] == raw["epoch"] and info["global_step"] == raw["global_step"]
    ours = model.state_dict()
    for k, v in sd.items():
        if not k.endswith(".weight_normalized"):
            assert torch.equal(ours[k], v), k


# ------------------------------------------------------------ equality with the published model


def _decode_case(name, tag):
    r = refs(name)
    if tag not in r:
        pytest.skip(f"fixture {name} has no {tag} set")
    return r[tag]


@pytest.mark.parametrize("name,tag", [("a", "t1"), ("a", "t07"), ("b", "t1")])
def test_decoder_outputs_and_eps_gradients_match_published(name, tag):
    ref = _decode_case(name, tag)
    model, _ = loaded(name)
    dtype = ref["eps_x"].dtype
    # fixture a/t1 was computed in float64: compare in float64 at a tighter tolerance
    tol = 1e-7 if dtype == torch.float64 else 1e-5
    model = model.to(dtype)
    try:
        eps = [e.clone().requires_grad_(True) for e in ref["eps_z"] + [ref["eps_x"]]]
        out = model.decode_eps(eps, t=ref["t"], with_log_prob=True)
        assert_close(out.x_mean, 0.5 * ref["dec_mu"] + 0.5, tol, "x_mean")
        assert_close(out.x_sample, ref["x_sample"], tol, "x_sample")
        assert_close(out.log_p_z, ref["log_p_z"], tol, "log p(z)")
        assert_close(out.log_p_x, ref["log_p_x"], tol, "log p(x|z)")
        s_mean = ((2 * out.x_mean - 1) * ref["R"]).sum()
        g_mean = torch.autograd.grad(s_mean, eps[:-1], retain_graph=True)
        for i, (g, gr) in enumerate(zip(g_mean, ref["grad_mean_R"])):
            assert_close(g, gr, tol, f"d sum(mu R) / d eps_z[{i}]")
        g_off = torch.autograd.grad((-out.log_p_z - out.log_p_x).sum(), eps)
        for i, (g, gr) in enumerate(zip(g_off, ref["grad_official"])):
            assert_close(g, gr, tol, f"d (-log p(z) - log p(x|z)) / d eps[{i}]")
    finally:
        model.float()


@pytest.mark.parametrize("name", NAMES)
def test_posterior_matches_published_forward(name):
    """Encoder, residual posterior and flows: published forward(x) with given posterior noise."""
    model, _ = loaded(name)
    e = refs(name)["enc"]
    with torch.no_grad():
        out = model._posterior(e["x"], noise=e["q_eps"])
    for i, (z, zr) in enumerate(zip(out["z"], e["q_z"])):
        assert_close(z, zr, 1e-5, f"posterior z[{i}] after flows")
    for i, (ep, er) in enumerate(zip(out["eps"], e["prior_eps"])):
        assert_close(ep, er, 1e-5, f"z[{i}] in the prior's frame")
    for i, (k, kr) in enumerate(zip(out["kl"], e["kl"])):
        assert_close(k, kr, 1e-5, f"kl[{i}]")
    assert_close(torch.stack(out["log_q"]).sum(0), e["log_q"], 1e-5, "log q")
    assert_close(torch.stack(out["log_p"]).sum(0), e["log_p"], 1e-5, "log p")
    assert_close(out["logits"], e["logits"], 1e-5, "logits")


@pytest.mark.parametrize("name", NAMES)
def test_encode_eps_posterior_mean_matches_published(name):
    model, _ = loaded(name)
    r = refs(name)["enc_mean"]
    with torch.no_grad():
        eps = model.encode_eps(r["x"], use_mean=True)
    for i, (a, b) in enumerate(zip(eps, r["prior_eps"] + [r["eps_x"]])):
        assert_close(a, b, 1e-5, f"encode_eps[{i}]")


def test_reference_comparison_detects_a_changed_weight(tmp_path):
    """The equality tests can fail: one BN's running variance changed breaks the agreement."""
    raw = raw_ckpt("b")
    key = next(k for k in raw["state_dict"]
               if k.startswith("post_process") and k.endswith("running_var"))
    raw["state_dict"][key] = raw["state_dict"][key] * 1.5
    p = tmp_path / "changed.pt"
    torch.save(raw, p)
    model, _ = load_nvae_checkpoint(p)
    ref = refs("b")["t1"]
    with torch.no_grad():
        out = model.decode_eps(ref["eps_z"] + [ref["eps_x"]])
    with pytest.raises(AssertionError, match="x_mean"):
        assert_close(out.x_mean, 0.5 * ref["dec_mu"] + 0.5, 1e-5, "x_mean")


# ------------------------------------------------------------------------ args -> configuration


def _published_args(**kw):
    base = dict(num_preprocess_blocks=1, num_preprocess_cells=2, num_postprocess_blocks=1,
                num_postprocess_cells=2, num_latent_per_group=20, num_cell_per_cond_enc=2,
                num_cell_per_cond_dec=2, num_mixture_dec=1, arch_instance="res_mbconv",
                use_se=True, res_dist=True, fast_adamax=True, epochs=400)
    base.update(kw)
    return argparse.Namespace(**base)


def test_args_of_the_published_vaebm_backbones_give_our_presets():
    # the NVAE training commands of the VAEBM README (the published checkpoints)
    cifar = _published_args(dataset="cifar10", num_channels_enc=128, num_channels_dec=128,
                            num_latent_scales=1, num_groups_per_scale=30, num_nf=1, num_x_bits=8,
                            ada_groups=False, min_groups_per_scale=1)
    assert nvae_args_to_config(cifar) == PRESETS["cifar10"]
    # old-style args: no ada_groups / min_groups_per_scale fields
    hq = _published_args(dataset="celeba_256", num_channels_enc=32, num_channels_dec=32,
                         num_latent_scales=5, num_groups_per_scale=4, num_nf=2, num_x_bits=5)
    assert nvae_args_to_config(hq) == PRESETS["celebahq256"]
    assert nvae_args_to_config(vars(hq)) == PRESETS["celebahq256"]


@pytest.mark.parametrize("change,match", [
    (dict(num_mixture_dec=10), "num_mixture_dec=10"),
    (dict(dataset="mnist"), "Bernoulli"),
    (dict(arch_instance="res_elu"), "res_elu"),
    (dict(dataset="svhn"), "svhn"),
    (dict(num_groups_per_scale=1), "single latent group"),
])
def test_unsupported_args_are_refused_with_the_reason(change, match):
    args = _published_args(dataset="cifar10", num_channels_enc=8, num_channels_dec=8,
                           num_latent_scales=1, num_groups_per_scale=3, num_nf=0, num_x_bits=8)
    vars(args).update(change)
    with pytest.raises(NVAECheckpointError, match=match):
        nvae_args_to_config(args)


def test_args_missing_an_architecture_field_are_refused():
    args = _published_args(dataset="cifar10", num_channels_enc=8, num_latent_scales=1,
                           num_groups_per_scale=3, num_nf=0, num_x_bits=8)
    with pytest.raises(NVAECheckpointError, match="num_channels_dec"):
        nvae_args_to_config(args)


def test_stored_arch_instance_must_match_the_recipe(tmp_path):
    raw = raw_ckpt("a")
    raw["arch_instance"] = dict(raw["arch_instance"], normal_dec=["mconv_e3k5g0"])
    p = tmp_path / "arch.pt"
    torch.save(raw, p)
    with pytest.raises(NVAECheckpointError, match="normal_dec"):
        load_nvae_checkpoint(p)


# ------------------------------------------------------------------------------ weight mismatches


def _save_modified(tmp_path, fn, name="a"):
    raw = raw_ckpt(name)
    fn(raw)
    p = tmp_path / "modified.pt"
    torch.save(raw, p)
    return p


def test_unknown_weight_strict_raises_nonstrict_loads_and_reports(tmp_path):
    p = _save_modified(tmp_path,
                       lambda c: c["state_dict"].__setitem__("extra_head.weight", torch.zeros(3)))
    with pytest.raises(NVAECheckpointError, match="unknown weights.*extra_head.weight"):
        load_nvae_checkpoint(p)
    with pytest.warns(UserWarning, match="extra_head.weight"):
        model, info = load_nvae_checkpoint(p, strict=False)
    assert info["unexpected"] == ["extra_head.weight"] and info["missing"] == []
    ref = refs("a")["t07"]
    with torch.no_grad():
        out = model.decode_eps(ref["eps_z"] + [ref["eps_x"]], t=ref["t"])
    assert_close(out.x_mean, 0.5 * ref["dec_mu"] + 0.5, 1e-5, "x_mean")


def test_missing_weight_strict_raises_nonstrict_reports(tmp_path):
    p = _save_modified(tmp_path, lambda c: c["state_dict"].pop("dec_tower.0.conv.bias"))
    with pytest.raises(NVAECheckpointError, match="missing weights.*dec_tower.0.conv.bias"):
        load_nvae_checkpoint(p)
    with pytest.warns(UserWarning, match="dec_tower.0.conv.bias"):
        _, info = load_nvae_checkpoint(p, strict=False)
    assert info["missing"] == ["dec_tower.0.conv.bias"] and info["unexpected"] == []


def test_weights_that_do_not_fit_the_args_raise_even_when_not_strict(tmp_path):
    p = _save_modified(tmp_path, lambda c: setattr(c["args"], "num_latent_per_group", 5))
    with pytest.raises(NVAECheckpointError, match="do not fit.*enc_sampler"):
        load_nvae_checkpoint(p, strict=False)


def test_weight_normalized_alias_must_equal_the_weight():
    raw = raw_ckpt("a")
    sd = dict(raw["state_dict"])
    key = next(k for k in sd if k.endswith(".weight_normalized"))
    sd[key] = sd[key] + 1.0
    with pytest.raises(NVAECheckpointError, match="alias"):
        convert_state_dict(sd, NVAE(nvae_args_to_config(raw["args"])))


# --------------------------------------------------------------------------- unsafe / corrupt files


class _Payload:
    """Pickles as a call of os.system: unpickling it without a guard would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_checkpoint_with_a_malicious_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    raw = raw_ckpt("a")
    raw["scheduler"] = {"last_epoch": 3, "hook": _Payload(marker)}   # hidden beside valid weights
    p = tmp_path / "evil.pt"
    torch.save(raw, p)
    with pytest.raises(NVAECheckpointError, match=r"refusing.*system"):
        load_nvae_checkpoint(p)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["legacy", "raw_pickle"])
def test_non_zip_malicious_pickles_are_refused_without_running_them(tmp_path, fmt):
    marker = tmp_path / "executed"
    obj = {"state_dict": {}, "args": _Payload(marker)}
    p = tmp_path / "evil.pt"
    if fmt == "legacy":
        torch.save(obj, p, _use_new_zipfile_serialization=False)
    else:
        p.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(NVAECheckpointError, match="refused"):
        read_nvae_checkpoint(p)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 10, 1000, 0.5, -64])
def test_truncated_checkpoint_is_reported(tmp_path, keep):
    data = ckpt_path("a").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % (len(data) + 1)
    p = tmp_path / "cut.pt"
    p.write_bytes(data[:n])
    with pytest.raises(NVAECheckpointError, match="empty|truncated or corrupt"):
        load_nvae_checkpoint(p)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_nvae_checkpoint(FIX / "no_such_checkpoint.pt")


@pytest.mark.parametrize("content,match", [
    ({"model": {"w": torch.zeros(2)}}, r"missing \['state_dict', 'args'\]"),
    ([torch.zeros(2)], "holds a list"),
    ({"state_dict": {"prior_ftr0": torch.zeros(1)}, "args": {"dataset": "cifar10"}},
     "'args' is a dict"),
    ({"state_dict": {"w": 1.0}, "args": argparse.Namespace()}, "not a mapping of tensors"),
])
def test_foreign_pickles_are_rejected(tmp_path, content, match):
    p = tmp_path / "foreign.pt"
    torch.save(content, p)
    with pytest.raises(NVAECheckpointError, match=match):
        load_nvae_checkpoint(p)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    from vaebm.models import EnergyNet

    net = EnergyNet("tiny")
    p = tmp_path / "energy.pt"
    torch.save({"epoch": 1, "state_dict": net.state_dict(),
                "args": argparse.Namespace(dataset="cifar10")}, p)
    with pytest.raises(NVAECheckpointError, match="another model"):
        load_nvae_checkpoint(p)


# ------------------------------------------------------------------------------------------ device


@pytest.mark.gpu
def test_map_location_cuda_gives_a_cuda_model_with_the_same_outputs():
    model, _ = load_nvae_checkpoint(ckpt_path("b"), map_location="cuda")
    assert model.prior_ftr0.is_cuda
    ref = refs("b")["t1"]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            eps = [e.cuda() for e in ref["eps_z"] + [ref["eps_x"]]]
            out = model.decode_eps(eps, with_log_prob=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert_close(out.x_mean.cpu(), 0.5 * ref["dec_mu"] + 0.5, 1e-4, "x_mean on cuda")
    assert_close(out.log_p_x.cpu(), ref["log_p_x"], 1e-4, "log p(x|z) on cuda")
