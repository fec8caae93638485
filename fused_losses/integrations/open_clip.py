"""Drop-in OpenCLIP losses: ``ClipLoss`` and ``SigLipLoss`` computed by this package's fused ops.

Same constructors (``ClipLoss(local_loss, gather_with_grad, cache_labels, rank, world_size,
use_horovod)``, ``SigLipLoss(cache_labels, rank, world_size, dist_impl)``), same
``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``
(``{"contrastive_loss": loss}`` with ``output_dict``), same numbers: the features are used as
given (OpenCLIP's models normalize them; these losses do not normalize again), ``logit_scale``
is the exponentiated scale, and gradients reach the features, ``logit_scale`` and
``logit_bias``.  Nothing of OpenCLIP is imported: this module works without it (OpenCLIP needs
torchvision, which not every torch build can import).

``get_logits``/``get_ground_truth`` are kept, with OpenCLIP's semantics, for subclasses that
call them (CoCa, distillation): they build the dense logits on purpose, as OpenCLIP's do.

logit_bias.  ``ClipLoss`` adds it to the logits of both directions; a scalar bias shifts every
logit of a softmax row alike, so the loss does not depend on it and its gradient is exactly 0
(OpenCLIP returns rounding noise there).  A non-scalar bias runs the dense OpenCLIP formula
(``get_logits``), with a one-line warning.  ``SigLipLoss`` takes a scalar bias (fused); a
non-scalar one runs the dense formula likewise.

Distributed (``world_size > 1``, over ``torch.distributed``'s default group unless
``process_group`` is given), each mode with OpenCLIP's own gradients, rank by rank:

- ``ClipLoss()`` (gather without grad, global loss): every rank returns the global loss; the
  features get ``∂L/∂(own rows)``: **1/world_size of the exact gradient** after DDP averages the
  encoder gradients (OpenCLIP's behaviour, reproduced), while ``logit_scale`` gets the exact
  ``∂L/∂scale`` on every rank.
- ``ClipLoss(gather_with_grad=True)``: global loss, exact gradients (each rank's rows get the
  gradient of every rank's loss, so DDP's average is ``∇L``); ``logit_scale`` as above.
- ``ClipLoss(local_loss=True, gather_with_grad=True)``: each rank returns the mean over its own
  rows (against all columns); gradients as OpenCLIP's (exact after DDP averaging for equal
  per-rank batches); ``logit_scale`` gets this rank's ``∂L_rank/∂scale``.
- ``ClipLoss(local_loss=True)``: local loss, the gathered columns carry **no gradient** (only
  each rank's own rows do), as in OpenCLIP: not the exact gradient, reproduced.
- ``SigLipLoss`` (every ``dist_impl``: "bidir", "shift", "reduce", "gather" give the same numbers):
  each rank returns its images against every text, divided by its number of images; texts get
  the gradients of every rank's images; ``logit_scale``/``logit_bias`` this rank's share.
  Computed by one all-gather whatever ``dist_impl`` says (OpenCLIP's ring exchanges are a
  memory device for its dense blocks; the fused op holds no block).

Uneven per-rank batches are supported (OpenCLIP requires equal ones).  ``use_horovod=True``
with ``world_size > 1`` is not supported (ValueError).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import functional as FL
from ..distributed import _row_counts, all_gather_rows
from ._common import mean_grad_over_ranks, scale_grad, warn_fallback

__all__ = ["ClipLoss", "SigLipLoss"]


def _is_scalar(v) -> bool:
    return not isinstance(v, torch.Tensor) or v.numel() == 1


def _as_scalar(v):
    return v.reshape(()) if isinstance(v, torch.Tensor) else v


class _Distributed(nn.Module):
    """What both losses share: OpenCLIP's forward, and rank / world size / group handling."""

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict=False):
        if logit_bias is not None and not _is_scalar(logit_bias):
            warn_fallback(self, "a non-scalar logit_bias is not fused")
            loss = self._dense(image_features, text_features, logit_scale, logit_bias)
        else:
            bias = None if logit_bias is None else _as_scalar(logit_bias)
            loss = self._fused(image_features, text_features, _as_scalar(logit_scale), bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _gather(self, x, with_grad, keep_own):
        """OpenCLIP's gather of one feature tensor: all ranks' rows in rank order; with grad
        (every rank's gradient summed into the owner's rows, as torch.distributed.nn's
        all_gather), or without, this rank's own rows kept live when ``keep_own``."""
        group = self._group()
        if with_grad:
            return all_gather_rows(x, group)
        (sizes,) = _row_counts(group, x.device, x.shape[0])
        out = all_gather_rows(x.detach(), group, sizes)
        if not keep_own:
            return out
        off = sum(sizes[:dist.get_rank(group)])
        return torch.cat([out[:off], x, out[off + x.shape[0]:]])

    def _offset(self, x):
        """(global index of this rank's first row of ``x``, every rank's row count)."""
        group = self._group()
        (sizes,) = _row_counts(group, x.device, x.shape[0])
        return sum(sizes[:dist.get_rank(group)]), sizes


class ClipLoss(_Distributed):
    """OpenCLIP's ``ClipLoss``, fused (see the module docstring); plus ``fused_backend`` and
    ``process_group`` (default: torch.distributed's default group when ``world_size > 1``)."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False, *, fused_backend="auto", process_group=None):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.fused_backend = fused_backend
        self.process_group = process_group
        self.prev_num_logits = 0
        self.labels = {}

    # --- OpenCLIP's dense helpers, for subclasses (CoCa, distillation) ---------------------

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        if self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        if self.cache_labels:
            self.labels[device] = labels
            self.prev_num_logits = num_logits
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """The dense logit matrices (image→text, text→image), as OpenCLIP builds them."""
        if self.world_size > 1:
            self._check_distributed()
            keep_own = not self.local_loss
            all_img = self._gather(image_features, self.gather_with_grad, keep_own)
            all_txt = self._gather(text_features, self.gather_with_grad, keep_own)
            if self.local_loss:
                per_image = logit_scale * image_features @ all_txt.T
                per_text = logit_scale * text_features @ all_img.T
            else:
                per_image = logit_scale * all_img @ all_txt.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image = per_image + logit_bias
            per_text = per_text + logit_bias
        return per_image, per_text

    # --- the loss ------------------------------------------------------------------------

    def _check_distributed(self):
        if self.use_horovod:
            raise ValueError("fused_losses' ClipLoss does not support use_horovod=True; use "
                             "torch.distributed (use_horovod=False)")

    def _dense(self, image_features, text_features, logit_scale, logit_bias):
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale,
                                              logit_bias)
        labels = self.get_ground_truth(image_features.device, per_image.shape[0])
        if self.world_size > 1 and self.local_loss:  # this rank's true offset (uneven sizes)
            off, _ = self._offset(image_features)
            labels = torch.arange(off, off + per_image.shape[0], device=per_image.device)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2

    def _fused(self, img, txt, scale, bias):
        loss = self._fused_clip(img, txt, scale)
        if isinstance(bias, torch.Tensor) and bias.requires_grad:
            # A scalar bias shifts whole softmax rows: no effect, gradient exactly 0.
            loss = loss + 0.0 * bias
        return loss

    def _fused_clip(self, img, txt, scale):
        opts = dict(normalize=False, backend=self.fused_backend)
        if self.world_size == 1:
            return FL.clip_loss(img, txt, scale, **opts)
        self._check_distributed()
        group, world = self._group(), self.world_size
        if not self.local_loss:
            # Global loss on every rank; OpenCLIP's scale gradient is the full one on each rank.
            scale = mean_grad_over_ranks(scale, group)
            if not self.gather_with_grad:  # own rows only: 1/world of this package's gradient
                img, txt = scale_grad(img, 1.0 / world), scale_grad(txt, 1.0 / world)
            return FL.clip_loss(img, txt, scale, process_group=group, **opts)
        if self.gather_with_grad:  # local mean, columns carry gradient to their owners
            return FL.clip_loss(img, txt, scale, reduction="none", process_group=group,
                                **opts).mean()
        # local mean, gathered columns detached: positives by global index
        off, sizes = self._offset(img)
        all_img = all_gather_rows(img.detach(), group, sizes)
        all_txt = all_gather_rows(txt.detach(), group, sizes)
        own = torch.arange(off, off + img.shape[0], device=img.device)
        every = torch.arange(all_img.shape[0], device=img.device)
        row = FL.info_nce(img, all_txt, logit_scale=scale, labels=own, key_labels=every, **opts)
        col = FL.info_nce(txt, all_img, logit_scale=scale, labels=own, key_labels=every, **opts)
        return (row + col) / 2


class SigLipLoss(_Distributed):
    """OpenCLIP's ``SigLipLoss``, fused (see the module docstring); plus ``fused_backend`` and
    ``process_group``."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, *, fused_backend="auto", process_group=None):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather', "
                             f"got {dist_impl!r}")
        self.fused_backend = fused_backend
        self.process_group = process_group
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        logits = logit_scale * image_features @ text_features.T
        return logits if logit_bias is None else logits + logit_bias

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None,
              negative_only=False):
        """One dense block of OpenCLIP's SigLIP loss (for subclasses and the fallback)."""
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        labels = self.get_ground_truth(image_features.device, image_features.dtype,
                                       image_features.shape[0], negative_only=negative_only)
        return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]

    def _dense(self, img, txt, scale, bias):
        loss = self._loss(img, txt, scale, bias)
        if self.world_size > 1:
            all_txt = self._gather(txt, True, False)
            off, sizes = self._offset(img)
            start = 0
            for n in sizes:
                if start != off:
                    loss = loss + self._loss(img, all_txt[start:start + n], scale, bias,
                                             negative_only=True)
                start += n
        return loss

    def _fused(self, img, txt, scale, bias):
        bias = 0.0 if bias is None else bias
        opts = dict(normalize=False, backend=self.fused_backend)
        if self.world_size == 1:
            return FL.siglip_loss(img, txt, scale, bias, **opts)
        per_image = FL.siglip_loss(img, txt, scale, bias, reduction="none",
                                   process_group=self._group(), **opts)
        return per_image.sum() / img.shape[0]
