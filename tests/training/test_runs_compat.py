"""Python 3.9 / 3.10 support: without the standard library's tomllib the configs read TOML with
the tomli package (declared for those versions in setup.py)."""

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import vaebm.training.config as config

ROOT = Path(__file__).resolve().parents[2]


def test_config_falls_back_to_tomli_without_tomllib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # "import tomllib" fails as on 3.9 / 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # tomli is tomllib's origin, same API
    # a private copy of the module, so the real one (and its dataclasses) stays untouched
    spec = importlib.util.spec_from_file_location("_vaebm_config_py39", config.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    assert mod.tomllib is tomllib
    assert mod.parse_overrides(["lr=1e-5", "betas=[0.9, 0.99]"]) == {"lr": 1e-5, "betas": [0.9, 0.99]}
    f = tmp_path / "run.toml"
    f.write_text('[ebm]\npreset = "tiny"\nsteps = 3\n')
    assert mod.load_config(f, "ebm").steps == 3


def test_setup_declares_tomli_for_old_pythons():
    setup = (ROOT / "setup.py").read_text()
    assert re.search(r'python_requires=">=3\.9"', setup)
    assert re.search(r"\"tomli[^\"]*; python_version < '3\.11'\"", setup)
