"""Data-parallel training: two gloo processes started the torchrun way (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) against one process on the concatenated batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from vaebm.training import BatchStream, EBMTrainer, ebm_config

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _train_models import TinyVAE, make_data, make_models  # noqa: E402

STEPS = 2
WORKER = r"""
import sys, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from _train_models import TinyVAE, make_data, make_models
from vaebm.training import EBMTrainer, ebm_config, init_distributed, train_vae, vae_config
info = init_distributed()
assert info.world_size == 2 and torch.distributed.get_backend() == "gloo"
grads = []
def keep(tr, it, stats):
    grads.append([p.grad.clone() for p in tr.energy.parameters()])
vae, energy = make_models(0)
cfg = ebm_config("tiny", steps={steps}, buffer_size=0, out_dir={out!r}, ckpt_every=1)
t = EBMTrainer(vae, energy, make_data(), cfg, callback=keep)
h = t.run(resume=False)
per_rank_cap = EBMTrainer(vae, energy, make_data(), ebm_config("tiny", buffer_size=16)).buffer.capacity
torch.manual_seed(0)
v = TinyVAE()
train_vae(v, make_data(), vae_config("tiny", steps=2, batch_size=4), resume=False)
torch.save({{"grads": grads, "params": dict(energy.state_dict()), "loss": h["loss"],
            "cap": per_rank_cap, "vae": dict(v.state_dict())}},
           {out!r} + f"/rank{{info.rank}}.pt")
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    port = _free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), str(HERE)]))
        code = WORKER.format(here=str(HERE), steps=STEPS, out=str(tmp_path))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # one process, the global batch of 4 (= rank 0's 2 rows then rank 1's 2 rows)
    grads = []
    vae, energy = make_models(0)
    cfg = ebm_config("tiny", steps=STEPS, buffer_size=0)
    single = EBMTrainer(vae, energy, make_data(), cfg,
                        callback=lambda tr, it, st: grads.append(
                            [p.grad.clone() for p in tr.energy.parameters()]))
    h = single.run(resume=False)

    for it in range(STEPS):
        for g1, g0, g in zip(ranks[1]["grads"][it], ranks[0]["grads"][it], grads[it]):
            assert torch.equal(g0, g1)  # all-reduced: identical on both ranks
            torch.testing.assert_close(g0, g, rtol=1e-4, atol=1e-5)
    for k, v in energy.state_dict().items():
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k
        torch.testing.assert_close(ranks[0]["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(ranks[0]["loss"], h["loss"]):
        assert abs(a - b) < 1e-4 * max(1, abs(b))
    assert ranks[0]["cap"] == 8  # capacity / world_size per rank
    # stage 1: both ranks end with the same VAE, and it moved
    torch.manual_seed(0)
    v0 = TinyVAE().state_dict()
    for k, v in ranks[0]["vae"].items():
        assert torch.equal(v, ranks[1]["vae"][k]), k
    assert any(not torch.equal(v, v0[k]) for k, v in ranks[0]["vae"].items())
    # rank 0 alone wrote the checkpoint (no per-rank buffer files without a buffer)
    assert sorted(p.name for p in tmp_path.glob("ebm*.pt*")) == ["ebm.pt", "ebm.pt.prev"]


def test_batch_stream_shards_are_slices_of_the_global_batch():
    data = torch.arange(40.0).view(40, 1, 1, 1)
    one = BatchStream(data, 8, seed=3)
    parts = [BatchStream(data, 8, seed=3, rank=r, world=4) for r in range(4)]
    it1 = one.iterate(0)
    its = [p.iterate(0) for p in parts]
    seen = []
    for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
        i, full = next(it1)
        shards = [next(x)[1] for x in its]
        assert torch.equal(torch.cat(shards), full)
        seen.append(full.flatten().tolist())
    assert sorted(sum(seen[:5], [])) == list(range(40))  # one epoch: every item once
    assert seen[5] != seen[0]                          # a new order each epoch
    # resuming at iteration 6 gives the same batch as iterating up to it
    assert torch.equal(next(one.iterate(6))[1].flatten(), torch.tensor(seen[6]))
    import pytest
    with pytest.raises(ValueError, match="not divisible"):
        BatchStream(data, 6, world=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchStream(data[:4], 8)
