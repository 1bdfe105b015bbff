"""Merging: strategies (pure weight functions), the streaming merge, and its HF and DeepSpeed
writers."""
