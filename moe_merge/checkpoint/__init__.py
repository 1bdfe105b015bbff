"""Checkpoint reading: discovery, the restricted unpickler, layouts of DeepSpeed checkpoints,
names."""
