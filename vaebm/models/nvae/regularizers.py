"""NVAE's stage-1 regularisers (Vahdat & Kautz 2020, Sec. 3.2): the spectral regulariser, the sum
over convs of the largest singular value of each (normalised) weight as a (C_out, C_in/groups*k*k)
matrix, by power iteration with the persistent vectors each :class:`~.cells.Conv2D` keeps in its
``sr_u`` / ``sr_v`` buffers; and the BN regulariser, the sum over BN layers of max |gamma|."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SR_ITERS = 4            # power iterations per call of the spectral regulariser
SR_ITERS_FIRST = 40     # at first use (cold u, v)


def spectral_norm_loss(convs, state) -> Tensor:
    """Sum of the convs' top singular values. ``convs``: Conv2D layers; ``state._sr_warm``
    (bool, updated here) says whether their u/v hold converged vectors (else they are drawn
    fresh and iterated SR_ITERS_FIRST times). Convs of one weight shape are iterated as a batch."""
    groups: dict[tuple, list] = {}
    for m in convs:
        groups.setdefault((m.weight.shape[0], m.weight[0].numel()), []).append(m)
    n_iter = SR_ITERS if state._sr_warm else SR_ITERS_FIRST
    total = 0.0
    for convs in groups.values():
        W = torch.stack([m.normalized_weight().flatten(1) for m in convs]).float()  # (n, r, c)
        with torch.no_grad():
            Wd = W.detach()
            if state._sr_warm:
                u = torch.stack([m.sr_u for m in convs]).float()
                v = torch.stack([m.sr_v for m in convs]).float()
            else:
                u = F.normalize(torch.randn(Wd.shape[:2], device=Wd.device), dim=1, eps=1e-3)
                v = F.normalize(torch.randn(Wd.shape[0], Wd.shape[2], device=Wd.device), dim=1,
                                eps=1e-3)
            for _ in range(n_iter):
                v = F.normalize(torch.bmm(u.unsqueeze(1), Wd).squeeze(1), dim=1, eps=1e-3)
                u = F.normalize(torch.bmm(Wd, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)
            for i, m in enumerate(convs):
                m.sr_u.copy_(u[i])
                m.sr_v.copy_(v[i])
        total = total + torch.bmm(u.unsqueeze(1), torch.bmm(W, v.unsqueeze(2))).sum()
    state._sr_warm = True
    return total


def batchnorm_loss(bns) -> Tensor:
    return torch.stack([bn.weight.abs().max() for bn in bns]).sum()
