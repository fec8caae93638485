"""Drop-in GeomLoss ``SamplesLoss("sinkhorn", ...)`` computed by :func:`fused_losses.sinkhorn`.

Same constructor, same calls: ``loss(x, y)``, ``loss(a, x, b, y)``, batched ``(B, N, D)``
clouds (a vector of B values), ``potentials=True`` (the dual potentials ``(F, G)``).  The
algorithm is GeomLoss's (ε-scaling from the diameter, symmetric averaged updates, debiasing,
final extrapolation, envelope gradients), streamed: no N×M cost matrix at any size, so GeomLoss's
``backend`` choice ("tensorized", "online", "multiscale", "auto") does not matter and is kept
only as an attribute.

Not implemented, and refused with a ValueError at the call (use ``geomloss.SamplesLoss``):
losses other than ``"sinkhorn"``, unbalanced OT (``reach``), custom ``cost`` functions or
formulas, and cluster labels (the six-argument call).  Differences: the potentials come back
without a gradient (shaped as GeomLoss's: (1, N) for an unbatched cloud); a diameter of 0 (a
single point, identical clouds) is well defined here (GeomLoss: log(0), #51/#74); under
``torch.no_grad()`` autograd stays off (GeomLoss #57).
"""

from __future__ import annotations

from .. import ot
from ._common import require

_geomloss = require("geomloss", "geomloss", "GeomLoss")

__all__ = ["SamplesLoss"]


class SamplesLoss(_geomloss.SamplesLoss):
    """GeomLoss's ``SamplesLoss(loss="sinkhorn", p=2, blur=0.05, reach=None, diameter=None,
    scaling=0.5, truncate=5, cost=None, kernel=None, cluster_scale=None, debias=True,
    potentials=False, verbose=False, backend="auto")``, fused; plus ``fused_backend``."""

    def __init__(self, loss="sinkhorn", p=2, blur=0.05, reach=None, diameter=None, scaling=0.5,
                 truncate=5, cost=None, kernel=None, cluster_scale=None, debias=True,
                 potentials=False, verbose=False, backend="auto", *, fused_backend="auto"):
        super().__init__(loss=loss, p=p, blur=blur, reach=reach, diameter=diameter,
                         scaling=scaling, truncate=truncate, cost=cost, kernel=kernel,
                         cluster_scale=cluster_scale, debias=debias, potentials=potentials,
                         verbose=verbose, backend=backend)
        self.fused_backend = fused_backend

    def _unsupported(self, n_args: int) -> str | None:
        if self.loss != "sinkhorn":
            return f"loss={self.loss!r} (only 'sinkhorn' is fused)"
        if self.reach is not None:
            return f"reach={self.reach!r} (unbalanced OT is not implemented)"
        if self.cost is not None:
            return "a custom cost (only GeomLoss's default |x-y|^p/p is implemented)"
        if n_args == 6:
            return "cluster labels (the multiscale six-argument call)"
        if self.backend not in ("auto", "tensorized", "online", "multiscale"):
            return f"backend={self.backend!r}"
        return None

    def forward(self, *args):
        why = self._unsupported(len(args))
        if why is not None:
            raise ValueError(f"fused_losses.integrations.geomloss.SamplesLoss does not implement "
                             f"{why}; use geomloss.SamplesLoss for it")
        _, a, x, _, b, y = self.process_args(*args)
        batch, _, _, _, _, a, _, b = self.check_shapes(None, a, x, None, b, y)
        opts = dict(a=a, b=b, blur=self.blur, p=self.p, scaling=self.scaling,
                    diameter=self.diameter, debias=self.debias, backend=self.fused_backend)
        if self.potentials:
            f, g = ot.sinkhorn_potentials(x, y, **opts)
            if batch == 0 and self.backend != "multiscale":  # GeomLoss: shape (1, N) then
                return f.view(1, -1), g.view(1, -1)
            return f.view_as(a), g.view_as(b)
        return ot.sinkhorn(x, y, reduction="none", **opts)
