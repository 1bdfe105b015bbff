"""Work-arounds for DeepSpeed behaviour measured here (DeepSpeed 0.19.8), each applied only where
the behaviour is seen, so a DeepSpeed that fixes it makes the work-around a no-op.

ZeRO-3, fp32: a second fp32 copy of every partition. ``DeepSpeedZeroOptimizer_Stage3`` means to
step the partitions themselves when they are already fp32 (its fp32 masters are then aliases
of the flat parameter partitions; ``_reassign_or_swap_out_partitioned_parameters`` counts on
it), but it decides that with ``tensor.device == self.device``, a ``torch.device`` compared to
the string ``get_accelerator().current_device_name()`` returns (``'cpu'``, ``'cuda:0'``), which
is always False. So it clones them: 4 more bytes per parameter and rank (20 instead of 16).
Minimal reproduction: ``torch.zeros(1).device == "cpu"`` is False.
"""

from __future__ import annotations

import torch


def share_zero3_fp32_masters(optimizer) -> int:
    """Under ZeRO-3 with fp32 parameters, make each fp32 master partition the flat parameter
    partition itself (what DeepSpeed intends), freeing the clone. Returns the bytes freed."""
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    params = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not params or getattr(optimizer, "offload_optimizer", False):
        return 0
    freed = 0
    with torch.no_grad():
        for master, flat in zip(masters, params):
            if (flat is None or master.dtype != flat.dtype or master.shape != flat.shape
                    or master.device != flat.device
                    or master.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()):
                continue
            if not torch.equal(master, flat):  # not the clone this is about: leave it
                continue
            freed += master.untyped_storage().nbytes()
            master.data = flat.data
    return freed
