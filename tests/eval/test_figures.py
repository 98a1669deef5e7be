"""Nearest neighbours against a brute-force numpy search; the grid and histogram files."""

import numpy as np
import pytest
import torch

from vaebm.eval import figures as FG
from vaebm.imageio import read_png


def brute(q, r, k):
    q = np.asarray(q, np.float64).reshape(len(q), -1)
    r = np.asarray(r, np.float64).reshape(len(r), -1)
    d = np.linalg.norm(q[:, None, :] - r[None, :, :], axis=2)
    i = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, i, 1), i


@pytest.mark.parametrize("chunk", [7, 1000])
def test_nearest_neighbors_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(53, 3, 5, 5, generator=g)
    q = torch.rand(9, 3, 5, 5, generator=g)
    q[0] = ref[17]  # an exact copy must come first at distance 0
    d, i = FG.nearest_neighbors(q, ref, k=4, batch_size=chunk)
    bd, bi = brute(q, ref, 4)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(d, bd, rtol=1e-9, atol=1e-6)
    assert i[0, 0] == 17 and d[0, 0] < 1e-6
    assert (np.diff(d, axis=1) >= 0).all()


def test_nearest_neighbors_crop_features_dataset_and_errors():
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(30, 1, 8, 8, generator=g)
    q = torch.rand(5, 1, 8, 8, generator=g)
    d, i = FG.nearest_neighbors(q, ref, k=3, crop=4, batch_size=8)
    bd, bi = brute(q[..., 2:6, 2:6], ref[..., 2:6, 2:6], 3)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(d, bd, rtol=1e-9, atol=1e-9)
    # features (N, D) as numpy, and an image dataset of (x, y) as the reference
    f_ref, f_q = np.random.default_rng(2).standard_normal((2, 40, 6))
    np.testing.assert_array_equal(FG.nearest_neighbors(f_q, f_ref, 5)[1], brute(f_q, f_ref, 5)[1])
    ds = [(ref[j], j) for j in range(30)]

    class DS:
        def __len__(self):
            return len(ds)

        def __getitem__(self, j):
            return ds[j]
    np.testing.assert_array_equal(FG.nearest_neighbors(q, DS(), 3, batch_size=7)[1],
                                  brute(q, ref, 3)[1])
    with pytest.raises(ValueError, match="only 30 rows"):
        FG.nearest_neighbors(q, ref, k=31)
    with pytest.raises(ValueError, match="values per row"):
        FG.nearest_neighbors(q, torch.rand(4, 1, 7, 7), k=1)
    with pytest.raises(ValueError, match="larger"):
        FG.center_crop(q, 9)


def test_feature_neighbors_with_fake_extractor():
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(25, 3, 4, 4, generator=g)
    q = torch.rand(4, 3, 4, 4, generator=g)
    ex = lambda x: x.mean(dim=(2, 3))  # noqa: E731  channel means as "features"
    d, i, fs, fr = FG.feature_neighbors(q, ref, 3, extractor=ex)
    bd, bi = brute(ex(q).numpy(), ex(FG.center_crop(ref, 4)).numpy(), 3)
    np.testing.assert_array_equal(i, bi)
    assert fs.shape == (4, 3) and fr.shape == (25, 3)


def test_save_neighbor_grid_layout(tmp_path):
    g = torch.Generator().manual_seed(4)
    ref = torch.rand(10, 3, 6, 6, generator=g)
    q = torch.rand(2, 3, 6, 6, generator=g)
    idx = np.array([[3, 1, 4], [1, 5, 9]])
    p = FG.save_neighbor_grid(q, ref, idx, tmp_path / "sub" / "nn.png", padding=2)
    img = read_png(p)
    assert img.shape[:2] == (2 * 8 + 2, 4 * 8 + 2)

    def tile(r, c):  # (H, W, C) uint8 of grid cell (row r, column c)
        y, x = 2 + r * 8, 2 + c * 8
        return img[y:y + 6, x:x + 6]

    def u8(t):
        return np.round(t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    for r in range(2):
        assert np.abs(tile(r, 0).astype(int) - u8(q[r])).max() <= 1
        for c, j in enumerate(idx[r]):
            assert np.abs(tile(r, c + 1).astype(int) - u8(ref[j])).max() <= 1
    with pytest.raises(ValueError, match="indices"):
        FG.save_neighbor_grid(q, ref, idx[:1], tmp_path / "x.png")


def test_likelihood_histograms(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(5)
    tr, te = rng.normal(-3000, 40, 500), rng.normal(-3005, 42, 400)
    s = FG.plot_likelihood_histograms({"train": tr, "test": te}, tmp_path / "h.png",
                                      title="CIFAR-10")
    data = (tmp_path / "h.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert s["train"]["n"] == 500 and s["test"]["mean"] == pytest.approx(te.mean())
    assert s["path"] == str(tmp_path / "h.png")
    with pytest.raises(ValueError, match="no finite"):
        FG.plot_likelihood_histograms({"a": [np.nan]}, tmp_path / "n.png")
