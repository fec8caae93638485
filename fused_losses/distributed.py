"""torch.distributed support (SPEC §5).  Not implemented yet: every entry point raises, so a
``process_group`` is never silently ignored."""

from __future__ import annotations


def _unsupported(*_args, **_kwargs):
    raise NotImplementedError(
        "process_group is not supported yet by fused_losses; call the loss without it "
        "(single process) or gather the features yourself"
    )


distributed_info_nce = _unsupported
distributed_siglip = _unsupported
distributed_multi_similarity = _unsupported
