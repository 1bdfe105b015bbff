"""Helpers shared by the tests: fixture runs and launches, crafted checkpoints, the fuzzer."""
