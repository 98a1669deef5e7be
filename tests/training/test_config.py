"""Configs: Table 8 presets, TOML loading, overrides, validation."""

import pytest

from vaebm.training.config import (EBM_PRESETS, EBMConfig, VAEConfig, ebm_config, from_dict,
                                   load_config, parse_overrides, to_dict, vae_config)

# Table 8 of the paper + FACTS sec. 1: (lr, batch, LD steps, LD step size, buffer, ramp, negative)
TABLE8 = {
    "cifar10": (4e-5, 32, 10, 8e-5, 0, None, "sample"),
    "cifar10_persistent": (4e-5, 32, 6, 6e-5, 10_000, 5_000, "sample"),
    "celeba64": (5e-5, 32, 10, 5e-6, 0, None, "mean"),
    "lsun_church64": (4e-5, 32, 10, 4e-6, 10_000, 5_000, "mean"),
    "celebahq256": (4e-5, 16, 6, 3e-6, 8_000, 3_000, "mean"),
}


@pytest.mark.parametrize("name", list(TABLE8))
def test_presets_match_table8(name):
    lr, bs, steps, eta, buf, ramp, neg = TABLE8[name]
    c = ebm_config(name)
    assert (c.lr, c.batch_size, c.ld_steps, c.ld_step_size, c.buffer_size, c.negative) == \
        (lr, bs, steps, eta, buf, neg)
    if ramp is not None:
        assert c.buffer_ramp == ramp and c.buffer_prob == 0.6
    assert c.betas == (0.99, 0.999) and c.weight_decay == 3e-5 and c.grad_clip
    assert c.alpha_spectral == (0.3 if name == "celebahq256" else 0.2)
    assert c.preset == name


def test_all_presets_build_and_unknown_preset():
    for name in EBM_PRESETS:
        ebm_config(name)
    vae_config("cifar10")
    with pytest.raises(ValueError, match="unknown ebm preset 'cifar100'"):
        ebm_config("cifar100")


def test_overrides_and_validation():
    c = ebm_config("cifar10", lr=1e-5, betas=[0.9, 0.99])
    assert c.lr == 1e-5 and c.betas == (0.9, 0.99)
    with pytest.raises(KeyError, match="unknown EBMConfig field 'ld_step'"):
        ebm_config("cifar10", ld_step=3)
    with pytest.raises(ValueError, match="energy_mode"):
        ebm_config(energy_mode="both")
    with pytest.raises(ValueError, match="batch_size"):
        ebm_config(batch_size=0)
    with pytest.raises(ValueError, match="steps or epochs"):
        vae_config(steps=None, epochs=None)
    assert parse_overrides(["lr=1e-5", "energy_mode=official", "betas=[0.9, 0.999]",
                            "out_dir=runs/a b", "tensorboard=false", "device=none"]) == {
        "lr": 1e-5, "energy_mode": "official", "betas": [0.9, 0.999], "out_dir": "runs/a b",
        "tensorboard": False, "device": None}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])


def test_load_toml(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[ebm]\npreset = "celebahq256"\nsteps = 123\nout_dir = "x"\n'
                 '[vae]\npreset = "tiny"\nlr = 0.5\n')
    c = load_config(p, "ebm", ["lr=2e-5"])
    assert isinstance(c, EBMConfig)
    assert (c.steps, c.out_dir, c.lr, c.ld_step_size, c.alpha_spectral) == (123, "x", 2e-5, 3e-6, 0.3)
    v = load_config(p, "vae")
    assert isinstance(v, VAEConfig) and v.lr == 0.5 and v.steps == 6
    flat = tmp_path / "flat.toml"
    flat.write_text('preset = "celeba64"\nseed = 7\n')
    assert load_config(flat, "ebm").seed == 7
    bad = tmp_path / "bad.toml"
    bad.write_text("[ebm]\nlr = = 3\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad, "ebm")
    unk = tmp_path / "unk.toml"
    unk.write_text("[ebm]\nfoo = 3\n")
    with pytest.raises(KeyError, match="unk.toml.*foo"):
        load_config(unk, "ebm")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml", "ebm")


def test_dict_round_trip():
    c = ebm_config("lsun_church64", seed=5)
    assert from_dict("ebm", to_dict(c)) == c
    v = vae_config("celebahq256")
    assert from_dict("vae", to_dict(v)) == v
