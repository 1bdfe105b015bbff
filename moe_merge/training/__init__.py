"""The training runtime: the loop and what it calls (data, model, schedule, run directory,
metrics, live PMA monitor, spike detection and recovery, init-from, process start-up, launching)."""
