"""``vaebm export``: plain weights files that open outside vaebm (``torch.load(weights_only=True)``
or safetensors) and rebuild the same models from the JSON sidecar. A tiny run (tiny training
presets on the synthetic Fashion-MNIST of ``test_cli``) is built once for the module."""

import hashlib
import json
import sys

import pytest
import torch
import test_cli

from vaebm.cli import main
from vaebm.loading import load_ebm, load_vae

pytestmark = pytest.mark.usefixtures("one_thread")
data_root = test_cli.data_root  # the module-scoped synthetic data set


run = test_cli.tiny_run  # (vae run folder, ebm run folder), built once per module


def _rebuild(meta: dict, state_dict: dict):
    """The model a sidecar describes, built from its class and config alone (no checkpoint)."""
    from vaebm.models.energy import EnergyNet
    from vaebm.models.nvae import NVAE, NVAEConfig

    if meta["class"] == "vaebm.models.nvae.NVAE":
        model = NVAE(NVAEConfig(**meta["config"]))
    else:
        assert meta["class"] == "vaebm.models.energy.EnergyNet"
        model = EnergyNet(**meta["config"])
    model.load_state_dict(state_dict)  # strict: every name and shape matches
    return model.eval()


def _same_outputs(kind: str, ours, theirs) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if kind == "vae":
            eps = [torch.randn(s, generator=g) for s in ours.eps_shapes(2)]
            torch.testing.assert_close(theirs.decode_eps(eps).x_mean, ours.decode_eps(eps).x_mean,
                                       rtol=0, atol=0)
        else:
            x = torch.rand(3, 1, 28, 28, generator=g)
            torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)


def _check_export(out, run, load_weights, ext):
    models = {"vae": load_vae(run[0])[0], "ebm": load_ebm(run[1])[0]}
    for kind, model in models.items():
        path = out / f"{kind}.{ext}"
        sd = load_weights(path)
        ref = model.state_dict()
        assert sorted(sd) == sorted(ref)  # safetensors stores the names sorted
        for k, v in ref.items():
            assert type(sd[k]) is torch.Tensor and sd[k].dtype == v.dtype, k
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
        meta = json.loads((out / f"{kind}.json").read_text())
        assert meta["kind"] == kind and meta["weights"] == path.name
        assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert meta["iteration"] == 1 and meta["tensors"] == len(ref)
        _same_outputs(kind, model, _rebuild(meta, sd))
    vae_meta = json.loads((out / "vae.json").read_text())
    assert vae_meta["preset"] == "mnist"  # the NVAE preset whose config the run stored
    ebm_meta = json.loads((out / "ebm.json").read_text())
    assert ebm_meta["preset"] == "tiny" and ebm_meta["config"] == {
        "preset": "tiny", "width": 1.0, "in_channels": 1, "resolution": 28}


def test_export_pt_opens_with_torch_load_weights_only(run, tmp_path, capsys):
    out = tmp_path / "ex"
    assert main(["export", "--vae", str(run[0]), "--ebm", str(run[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out / 'vae.pt'}" in printed and f"-> {out / 'ebm.pt'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["ebm.json", "ebm.pt", "vae.json", "vae.pt"]
    _check_export(out, run, lambda p: torch.load(p, weights_only=True), "pt")


def test_export_refuses_to_overwrite_unless_forced(run, tmp_path, capsys):
    out = tmp_path / "ex"
    assert main(["export", "--ebm", str(run[1]), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "vae.json").write_text("mine")  # one of the two targets exists: nothing is written
    capsys.readouterr()
    assert main(["export", "--vae", str(run[0]), "--ebm", str(run[1]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--force" in err and str(out / "ebm.pt") in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**before, "vae.json": b"mine"}
    assert main(["export", "--vae", str(run[0]), "--ebm", str(run[1]), "--out", str(out),
                 "--force"]) == 0
    assert json.loads((out / "vae.json").read_text())["kind"] == "vae"
    assert sorted(p.name for p in out.iterdir()) == ["ebm.json", "ebm.pt", "vae.json", "vae.pt"]


def test_export_needs_a_model(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "ex")]) == 2
    assert "give --vae and/or --ebm" in capsys.readouterr().err
    assert not (tmp_path / "ex").exists()


def test_export_safetensors(run, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    out = tmp_path / "ex"
    assert main(["export", "--vae", str(run[0]), "--ebm", str(run[1]), "--out", str(out),
                 "--format", "safetensors"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ebm.json", "ebm.safetensors", "vae.json",
                                                     "vae.safetensors"]
    _check_export(out, run, st.load_file, "safetensors")
    from safetensors import safe_open

    with safe_open(str(out / "ebm.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["vaebm"])["config"]["preset"] == "tiny"


def test_export_safetensors_without_the_package(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert main(["export", "--ebm", str(run[1]), "--out", str(tmp_path / "ex"),
                 "--format", "safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaebm: error: --format safetensors needs the safetensors package")
    assert "pip install safetensors" in err
    assert not (tmp_path / "ex").exists()
