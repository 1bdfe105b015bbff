"""A plain DeepSpeed training loop (no Trainer) with moe-merge's LivePMA, as the example of
docs/other_trainers.md writes it, for the tests:

    deepspeed --num_gpus 2 tests/support/plain_loop.py --zero 3 --out DIR [--ep 2] [--no-pma]

Trains the tiny Qwen3-MoE of other_trainers.py 6 steps, saves ``DIR/ckpts`` every 2 steps and,
with LivePMA(n=3), scores the merge of the latest 3 saves on the eval rows at each save; rank 0
writes ``DIR/losses.json`` (training losses, mean over ranks) and ``DIR/pma.json``
(``{step: {"merged": ..., "live": ...}}``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.other_trainers import (  # noqa: E402
    EVAL_ROWS,
    ROWS,
    Tokens,
    build_model,
    drop_shm_names,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-pma", action="store_true")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    deepspeed.init_distributed("gloo" if not torch.cuda.is_available() else "nccl")
    drop_shm_names()
    from moe_merge import LivePMA

    config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
              "zero_optimization": {"stage": args.zero}, "steps_per_print": 10 ** 9}
    if args.ep > 1:
        config["expert_parallel"] = {"enabled": True, "autoep_size": args.ep,
                                     "preset_model": "qwen3_moe", "use_grouped_mm": False}
    model = build_model()
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=model.parameters())
    rank, world = dist.get_rank(), dist.get_world_size()
    train, held = Tokens(ROWS, 1).ids, Tokens(EVAL_ROWS, 2).ids
    eval_batches = [held[i:i + 2] for i in range(0, EVAL_ROWS, 2)]  # every rank: all of them

    def eval_loss() -> float:
        engine.eval()
        with torch.no_grad():
            losses = [engine(input_ids=b, labels=b).loss.item() for b in eval_batches]
        engine.train()
        return sum(losses) / len(losses)

    pma = None if args.no_pma else LivePMA(engine, n=3)
    losses, scores = [], {}
    for step in range(1, 7):
        rows = train[(step - 1) * 4 + 2 * rank:(step - 1) * 4 + 2 * rank + 2]
        loss = engine(input_ids=rows, labels=rows).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if step % 2 == 0:
            engine.save_checkpoint(str(args.out / "ckpts"))
            if pma is not None:
                pma.update(step)
                merged = pma.evaluate(eval_loss)
                if merged is not None:
                    scores[step] = {"merged": merged["pma/loss"], "live": eval_loss()}
    if rank == 0:
        (args.out / "losses.json").write_text(json.dumps(losses))
        (args.out / "pma.json").write_text(json.dumps(scores))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
