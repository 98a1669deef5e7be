"""vaebm: VAEBM (Xiao, Kreis, Kautz, Vahdat, ICLR 2021) with fused Langevin kernels.

Nothing is compiled at install time: the C++/CUDA extensions are built just-in-time on first use
(see vaebm/ops/_build.py), so torch stays out of the build requirements. The repository's
top-level ``kernels/`` (Triton) and ``csrc/`` (C++/CUDA) folders are shipped inside the package as
``vaebm/_triton`` and ``vaebm/_csrc``: no top-level package named ``kernels`` is installed.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithKernelSources(build_py):
    """Copy kernels/*.py into vaebm/_triton and csrc/ into vaebm/_csrc of the build tree."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "vaebm"
        for f in (ROOT / "kernels").glob("*.py"):
            shutil.copy2(f, dest / "_triton" / f.name)
        csrc = dest / "_csrc"
        if csrc.exists():
            shutil.rmtree(csrc)
        shutil.copytree(ROOT / "csrc", csrc,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "build*", "__pycache__"))


setup(
    name="vaebm",
    version="0.1.0",
    description="VAEBM: VAE x energy-based model, with fused Langevin sampling kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["vaebm", "vaebm.*"]),
    install_requires=["torch>=2.3", "numpy", "tomli>=1.1; python_version < '3.11'"],
    extras_require={
        "kernels": ["ninja", "triton>=3.2; platform_system == 'Linux'"],
        "data": ["pillow"],
        "train": ["tqdm", "tensorboard"],
        "eval": ["scipy", "scikit-learn", "matplotlib"],
        "export": ["safetensors"],
        "test": ["pytest", "pytest-benchmark", "scipy", "ninja", "pillow",
                 "scikit-learn", "matplotlib", "safetensors",
                 "triton>=3.2; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["vaebm=vaebm.cli:main"]},
    cmdclass={"build_py": BuildWithKernelSources},
    zip_safe=False,
)
