"""A program that is not moe-merge: trains a small model built on DeepSpeed's native
``deepspeed.moe.layer.MoE`` and writes the checkpoints a user of that API would have.

Launched by the deepspeed launcher (2 CPU ranks, gloo, ep_size 2):

    deepspeed --num_gpus 2 tests/support/native_moe_train.py --out DIR --zero 2 [--steps 4] [--bf16]
    deepspeed --num_gpus 2 tests/support/native_moe_train.py --out DIR --zero 2 --load CKPT_DIR

Writes ``DIR/checkpoints/global_stepN`` after every step, then the oracle for the merge tests:
for each tag, a fresh engine ``load_checkpoint``s it and every rank dumps the module parameters
it holds to ``DIR/oracle/global_stepN/rank{R}.safetensors``, expert parameters renamed to their
global expert index exactly as DeepSpeed names them in its per-expert checkpoint files.
With ``--load``, it only loads the latest tag of another checkpoint directory and dumps that.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from safetensors.torch import save_file
from torch import nn

VOCAB, HIDDEN, SEQ, EXPERTS, EP = 97, 32, 16, 4, 2
EXPERT_RE = re.compile(r"(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..*)")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        expert = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(),
                               nn.Linear(2 * HIDDEN, HIDDEN))
        self.moe = MoE(hidden_size=HIDDEN, expert=expert, num_experts=EXPERTS, ep_size=EP, k=1,
                       min_capacity=SEQ, drop_tokens=False)

    def forward(self, x):
        x = x + self.mix(self.norm(x))
        y, aux, _ = self.moe(x)
        return x + y, aux


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens):
        x, aux = self.embed(tokens[:, :-1]), 0.0
        for b in self.blocks:
            x, a = b(x)
            aux = aux + a
        logits = self.head(x).float()
        return (nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
                + 0.01 * aux)


def engine_for(args) -> deepspeed.DeepSpeedEngine:
    torch.manual_seed(0)
    model = Net()
    groups = split_params_into_different_moe_groups_for_optimizer(
        [{"params": list(model.parameters()), "name": "all"}])
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 3e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": args.zero},
        "bf16": {"enabled": args.bf16},
        "steps_per_print": 10 ** 9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine


def dump(engine, path: Path, rank: int) -> None:
    ep_rank = deepspeed.utils.groups._get_expert_parallel_rank(f"ep_size_{EP}")
    n_local = EXPERTS // EP
    out = {}
    for name, p in engine.module.named_parameters():
        m = EXPERT_RE.match(name)
        if m:
            name = f"{m.group(1)}{ep_rank * n_local + int(m.group(2))}{m.group(3)}"
        elif rank != 0:
            continue
        out[name] = p.detach().float().clone().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / f"rank{rank}.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--load", type=Path,
                    help="only load this checkpoint dir's latest tag and dump it")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()

    from moe_merge.training.distributed import init_distributed
    init_distributed(on_cpu=not torch.cuda.is_available())
    rank = torch.distributed.get_rank()
    torch.set_num_threads(1)
    if args.load:
        fresh = engine_for(args)
        path, _ = fresh.load_checkpoint(str(args.load))
        assert path is not None, f"engine.load_checkpoint found nothing in {args.load}"
        dump(fresh, args.out / "oracle" / Path(path).parent.name, rank)
        torch.distributed.barrier()
        return
    engine = engine_for(args)
    ckpts = args.out / "checkpoints"
    gen = torch.Generator().manual_seed(1 + rank)
    losses = []
    for step in range(1, args.steps + 1):
        tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
        loss = engine(tokens)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        engine.save_checkpoint(str(ckpts), tag=f"global_step{step}")

    fresh = engine_for(args)
    for step in range(1, args.steps + 1):
        tag = f"global_step{step}"
        fresh.load_checkpoint(str(ckpts), tag=tag)
        dump(fresh, args.out / "oracle" / tag, rank)
    if rank == 0:
        (args.out / "losses.json").write_text(json.dumps(losses))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
