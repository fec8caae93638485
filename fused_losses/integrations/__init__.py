"""Drop-in replacements for the losses of other libraries, running this package's fused ops.

One module per library; each keeps the library's class names, constructor and ``forward``
signatures and numbers, so switching is a change of import::

    from fused_losses.integrations.open_clip import ClipLoss, SigLipLoss
    from fused_losses.integrations.sentence_transformers import MultipleNegativesRankingLoss
    from fused_losses.integrations.pytorch_metric_learning import NTXentLoss, SupConLoss
    from fused_losses.integrations.geomloss import SamplesLoss
    from fused_losses.integrations.lightly import NTXentLoss, DCLLoss, DCLWLoss

Importing ``fused_losses`` (or this package) imports none of those libraries; each module
imports its own library when it is imported, and says which extra to install when it is
missing (``pip install "fused-losses[pml]"``, ...).  ``open_clip`` is the exception: its drop-in
needs nothing from OpenCLIP, so it works without it.

Every class takes one extra keyword-only argument, ``fused_backend`` (default ``"auto"``), the
backend of this package's ops.  Options these classes do not fuse fall back to the library's own
code with a one-line warning (said per class), or raise a clear error where the library has no
code to fall back to (GeomLoss options other than Sinkhorn).
"""

__all__ = ["open_clip", "sentence_transformers", "pytorch_metric_learning", "geomloss", "lightly"]
