"""The baseline for bench/train_throughput.py: a bare DeepSpeed loop on the recipe's model, data
and DeepSpeed config, with nothing else (no validation, logging, sidecars or progress bar).
Launched by the deepspeed launcher like the trainer; prints one JSON line on rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def main() -> None:
    import deepspeed

    from moe_merge.config.deepspeed import build_ds_config
    from moe_merge.config.recipe import load_recipe
    from moe_merge.training.data import Batches, prepare
    from moe_merge.training.distributed import init_distributed
    from moe_merge.training.model import build_model
    from moe_merge.training.trainer import param_groups

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_recipe(args[0], args[1:])
    local_ws = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ws))
    init_distributed(on_cpu=True)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    data = prepare(cfg.data)
    batches = Batches(data.train, cfg.data.seq_len, cfg.seed)
    ds = build_ds_config(cfg, world)
    ds.pop("tensorboard", None)
    model = build_model(cfg.model, data.vocab_size, cfg.seed)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                           config=ds)
    mb, accum = cfg.parallel.micro_batch, cfg.grad_accum(world)
    coef = cfg.model.router_aux_loss_coef if cfg.model.is_moe else 0.0
    every = cfg.checkpoint_every_steps
    times = []
    for step in range(cfg.total_steps):
        first = step * cfg.parallel.global_batch + rank * mb * accum
        rows = torch.from_numpy(batches.samples(first, mb * accum))
        for micro in range(accum):
            x = rows[micro * mb:(micro + 1) * mb]
            out = engine(input_ids=x[:, :-1])
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                   x[:, 1:].reshape(-1))
            aux = getattr(out, "aux_loss", None)
            engine.backward(loss + coef * aux if aux is not None else loss)
            engine.step()
        times.append(time.perf_counter())  # a save counts in the next step, as in the trainer
        if every and (step + 1) % every == 0:
            engine.save_checkpoint(os.path.join(cfg.run_dir, "checkpoints"))
    if rank == 0:
        print("BARE_LOOP " + json.dumps({"step_end_times": times,
                                         "tokens_per_step": cfg.tokens_per_step}), flush=True)


if __name__ == "__main__":
    main()
