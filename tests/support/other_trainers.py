"""A program that is not moe-merge: trains a tiny Qwen3-MoE as a user of the transformers
``Trainer`` or of Accelerate would, with DeepSpeed, and writes those trainers' checkpoints.

Launched by the deepspeed launcher (2 CPU ranks, gloo):

    deepspeed --num_gpus 2 tests/support/other_trainers.py --trainer hf --zero 2 --out DIR
        [--ep 2] [--steps 6] [--save-every 2] [--pma N] [--eval-every K]
    deepspeed --num_gpus 2 tests/support/other_trainers.py --trainer accelerate --zero 2 --out DIR
    deepspeed --num_gpus 2 tests/support/other_trainers.py --trainer hf --zero 2 --ep 2 --out DIR
        --dump-from CKPT_FOLDER --dump-to PREFIX

``hf`` writes ``DIR/checkpoint-N/{global_stepN/, latest, config.json, trainer_state.json, ...}``;
``accelerate`` writes ``DIR/checkpoints/checkpoint_K/{pytorch_model/, latest, ...}`` (automatic
checkpoint naming) and the model's ``DIR/config.json``. ``--ep 2`` turns on AutoEP through
the DeepSpeed config. ``--pma N`` adds moe-merge's PMACallback (SMA of the latest N saves) to
the Trainer, which writes its merge at the end to ``DIR/pma_merged``. Rank 0 writes each
step's training loss to ``DIR/losses.json``.
``--dump-from`` is the oracle: a fresh engine ``load_checkpoint``s the tag of CKPT_FOLDER and
every rank writes the module parameters it holds to ``PREFIX.rank{R}.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

VOCAB, SEQ, ROWS, EVAL_ROWS = 128, 32, 64, 8


SIZE = {"hidden": 64, "layers": 2}  # --hidden / --layers (the benchmark's larger model)


def model_config():
    from transformers import Qwen3MoeConfig

    h = SIZE["hidden"]
    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=h, num_hidden_layers=SIZE["layers"],
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                          intermediate_size=2 * h, moe_intermediate_size=h, num_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=SEQ,
                          tie_word_embeddings=False)


def build_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(), dtype=torch.float32)


class Tokens(torch.utils.data.Dataset):
    """Fixed random token rows (labels = inputs), the same on every rank."""

    def __init__(self, rows: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def ds_config(args, auto: bool) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": "auto" if auto else 2,
        "train_batch_size": "auto" if auto else 4,
        "gradient_accumulation_steps": "auto" if auto else 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
        "zero_optimization": {"stage": args.zero},
        "bf16": {"enabled": args.bf16},
        "steps_per_print": 10 ** 9,
    }
    if args.ep > 1:
        cfg["expert_parallel"] = {"enabled": True, "autoep_size": args.ep,
                                  "preset_model": "qwen3_moe", "use_grouped_mm": False}
    return cfg


def run_hf(args) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs and "eval_loss" not in logs:
                losses.append(float(logs["loss"]))
                if state.is_world_process_zero:
                    print(f"step {state.global_step} loss {logs['loss']!r}", flush=True)

    targs = TrainingArguments(
        output_dir=str(args.out), deepspeed=ds_config(args, auto=True), max_steps=args.steps,
        save_strategy="steps", save_steps=args.save_every, logging_steps=1,
        eval_strategy="steps" if args.eval_every else "no", eval_steps=args.eval_every or None,
        per_device_train_batch_size=2, per_device_eval_batch_size=2, learning_rate=1e-3,
        warmup_steps=0, lr_scheduler_type="constant", weight_decay=0.0, seed=0, data_seed=0,
        report_to=["tensorboard"] if args.pma else [],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=True, bf16=args.bf16)
    trainer = Trainer(model=build_model(), args=targs, train_dataset=Tokens(args.rows, 1),
                      eval_dataset=Tokens(EVAL_ROWS, 2), callbacks=[Losses()])
    if args.pma:
        from moe_merge import PMACallback

        trainer.add_callback(PMACallback(trainer, n=args.pma,
                                         save_merged=args.out / "pma_merged"))
    result = trainer.train()
    if trainer.is_world_process_zero():
        (args.out / "summary.json").write_text(json.dumps(result.metrics))
    return losses


def run_accelerate(args) -> list[float]:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DummyOptim, InitProcessGroupKwargs, ProjectConfiguration

    # On CPU Accelerate finds no backend of its own (cpu=True would turn DeepSpeed off) and
    # would then take every rank for the only process: name the process group's backend.
    backend = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(args, auto=False)),
                      project_config=ProjectConfiguration(project_dir=str(args.out),
                                                          automatic_checkpoint_naming=True),
                      kwargs_handlers=backend)
    assert acc.distributed_type == "DEEPSPEED" and acc.num_processes == dist.get_world_size()
    model = build_model()
    loader = torch.utils.data.DataLoader(Tokens(ROWS, 1), batch_size=2, shuffle=False)
    model, optim, loader = acc.prepare(model, DummyOptim(model.parameters(), lr=1e-3), loader)
    if acc.is_main_process:
        model_config().save_pretrained(str(args.out))
    losses, step = [], 0
    while step < args.steps:
        for batch in loader:
            loss = model(**batch).loss
            acc.backward(loss)
            optim.step()
            optim.zero_grad()
            step += 1
            losses.append(float(acc.reduce(loss.detach(), "mean")))
            if acc.is_main_process:
                print(f"step {step} loss {losses[-1]!r}", flush=True)
            if step % args.save_every == 0:
                acc.save_state()
            if step == args.steps:
                break
    return losses


def dump(args) -> None:
    """The oracle: a fresh engine loads the tag of --dump-from; every rank writes what it holds."""
    from safetensors.torch import save_file

    folder = Path(args.dump_from)
    engine, *_ = deepspeed.initialize(model=build_model(), config=ds_config(args, auto=False))
    path, _ = engine.load_checkpoint(str(folder), load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    assert path is not None, f"engine.load_checkpoint found nothing in {folder}"
    held = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            held[name] = p.detach().to("cpu", torch.float32).clone().contiguous()
    save_file(held, f"{args.dump_to}.rank{dist.get_rank()}.safetensors")


def drop_shm_names() -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm segment per rank and never unlinks it: once
    every rank has mapped them all (inside init), drop the names so that exit frees them."""
    if torch.cuda.is_available():
        return
    from moe_merge.training.distributed import shm_segment

    dist.barrier()
    shm_segment(dist.get_rank()).unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainer", choices=["hf", "accelerate"], required=True)
    ap.add_argument("--zero", type=int, choices=[0, 1, 2, 3], required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--pma", type=int, default=0, help="add PMACallback(n=N)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dump-from", default=None)
    ap.add_argument("--dump-to", default=None)
    ap.add_argument("--hidden", type=int, default=SIZE["hidden"])
    ap.add_argument("--layers", type=int, default=SIZE["layers"])
    ap.add_argument("--rows", type=int, default=ROWS, help="training rows")
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    SIZE.update(hidden=args.hidden, layers=args.layers)
    # the process group first: the Trainer's zero.Init reads the world size from it
    deepspeed.init_distributed("gloo" if not torch.cuda.is_available() else "nccl")
    drop_shm_names()
    try:
        if args.dump_from:
            dump(args)
            return
        args.out.mkdir(parents=True, exist_ok=True)
        losses = run_hf(args) if args.trainer == "hf" else run_accelerate(args)
        if dist.get_rank() == 0:
            (args.out / "losses.json").write_text(json.dumps(losses))
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
