"""Evaluation of models and runs: validation loss, analyze (what a merge gains and why),
scaling law."""
