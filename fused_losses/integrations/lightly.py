"""Drop-in lightly losses: ``NTXentLoss(temperature, memory_bank_size, gather_distributed)``,
``DCLLoss(temperature, weight_fn, gather_distributed)`` and ``DCLWLoss(temperature, sigma,
gather_distributed)``, computed by this package's fused ops.

Each subclasses lightly's class of the same name (lightly's memory bank, argument checks and
attributes are kept) and replaces only ``forward(out0, out1)``: no (2N × 2N) logit matrix.

- ``NTXentLoss`` without a memory bank is SimCLR's NT-Xent (:func:`fused_losses.nt_xent`); with a
  memory bank (``memory_bank_size=(K, D)``) each row's softmax is over its positive and the K
  bank entries (a streamed row log-sum-exp over the bank), and the bank is updated as lightly
  updates it.
- ``DCLLoss`` is decoupled contrastive learning (``info_nce(..., decoupled=True)`` over both
  views); a ``weight_fn`` (``DCLWLoss``: negative von Mises-Fisher weights) weights the positive
  term, as lightly does.

``gather_distributed=True``: the other ranks' features are all-gathered with gradient (each
rank's rows receive every rank's gradient, as lightly's ``GatherLayer``); each rank returns the
mean over its own rows, as lightly does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as FL
from ..distributed import group_rank
from ..functional import _two_view_labels
from ._common import require, world

_lightly_loss = require("lightly.loss", "lightly", "lightly")

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss"]


def _group(gather_distributed: bool):
    """torch.distributed's default group when gathering over more than one process, else None."""
    if not gather_distributed or world()[1] == 1:
        return None
    return torch.distributed.group.WORLD


class NTXentLoss(_lightly_loss.NTXentLoss):
    """lightly's ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``,
    fused; plus ``fused_backend``."""

    def __init__(self, temperature: float = 0.5, memory_bank_size=0,
                 gather_distributed: bool = False, *, fused_backend: str = "auto"):
        super().__init__(temperature=temperature, memory_bank_size=memory_bank_size,
                         gather_distributed=gather_distributed)
        self.fused_backend = fused_backend

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        out1, negatives = self.memory_bank.forward(out1, update=out0.requires_grad)
        if negatives is not None:  # (D, K): the positive against the bank only
            bank = negatives.to(out0.device).T
            positive = (out0 * out1).sum(1) / self.temperature
            bank_lse = FL.pairwise_logsumexp(out0, bank, scale=1.0 / self.temperature,
                                             backend=self.fused_backend)
            return (torch.logaddexp(positive, bank_lse) - positive).mean()
        group = _group(self.gather_distributed)
        if group is None:
            return FL.nt_xent(out0, out1, temperature=self.temperature, normalize=False,
                              backend=self.fused_backend)
        return FL.nt_xent(out0, out1, temperature=self.temperature, normalize=False,
                          reduction="none", backend=self.fused_backend,
                          process_group=group).mean()


class DCLLoss(_lightly_loss.DCLLoss):
    """lightly's ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``, fused;
    plus ``fused_backend``."""

    def __init__(self, temperature: float = 0.1, weight_fn=None,
                 gather_distributed: bool = False, *, fused_backend: str = "auto"):
        super().__init__(temperature=temperature, weight_fn=weight_fn,
                         gather_distributed=gather_distributed)
        self.fused_backend = fused_backend

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        group = _group(self.gather_distributed)
        z = torch.cat([out0, out1])
        labels = _two_view_labels(out0.shape[0], out0.device)
        if group is not None:  # pair labels unique over the ranks
            labels = labels + group_rank(group) * (1 << 40)
        # Per row: LSE over every other row but its positive, minus the positive's logit.
        per_row = FL.info_nce(z, z, temperature=self.temperature, labels=labels,
                              exclude_diagonal=True, decoupled=True, normalize=False,
                              reduction="none", backend=self.fused_backend,
                              process_group=group)
        if self.weight_fn is not None:  # the positive term weighted: −w·z_pos instead of −z_pos
            positive = (out0 * out1).sum(1) / self.temperature
            weights = torch.cat([self.weight_fn(out0, out1), self.weight_fn(out1, out0)])
            per_row = per_row + (1 - weights.to(per_row)) * positive.repeat(2).to(per_row)
        return per_row.mean()


class DCLWLoss(DCLLoss, _lightly_loss.DCLWLoss):
    """lightly's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``, fused;
    plus ``fused_backend``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False, *, fused_backend: str = "auto"):
        _lightly_loss.DCLWLoss.__init__(self, temperature=temperature, sigma=sigma,
                                        gather_distributed=gather_distributed)
        self.fused_backend = fused_backend
