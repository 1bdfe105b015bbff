"""moe-merge: model merging during LLM pre-training (PMA) for DeepSpeed dense and MoE runs."""

__version__ = "0.1.0"
