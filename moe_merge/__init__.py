"""moe-merge: model merging during LLM pre-training (PMA) for DeepSpeed dense and MoE runs.

``from moe_merge import LivePMA`` (any DeepSpeed loop) and ``from moe_merge import PMACallback``
(the transformers Trainer) are the live-merge APIs; they are imported when first asked for, so
``import moe_merge`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["LivePMA", "PMACallback", "__version__"]


def __getattr__(name: str):
    if name == "LivePMA":
        from moe_merge.live import LivePMA

        return LivePMA
    if name == "PMACallback":
        from moe_merge.hf_callback import PMACallback

        return PMACallback
    raise AttributeError(f"module 'moe_merge' has no attribute {name!r}")
