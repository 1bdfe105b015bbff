"""Validation loss of an HF model directory or a DeepSpeed checkpoint on fixed batches.

The batches are those the trainer logs ``val/loss`` on: the first windows of the recipe's
validation split (``logging.val_batches`` x ``parallel.micro_batch`` windows, rounded up to a
multiple of the world size), so a checkpoint's eval loss equals the trainer's ``val/loss`` at
that step and merged models are compared on exactly the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_merge.checkpoint.discover import find_tags, is_tag_dir, scan
from moe_merge.config.recipe import RecipeConfig, load_recipe
from moe_merge.errors import CheckpointError, MergeError


def recipe_for(model: Path) -> Path | None:
    """The recipe of the run a model or checkpoint comes from, when it can be found."""
    model = Path(model)
    candidates = []
    manifest = model / "merge_manifest.json"
    if manifest.is_file():
        inputs = json.loads(manifest.read_text()).get("inputs") or []
        if inputs:
            candidates.append(Path(inputs[-1]["path"]).parent.parent)
    if is_tag_dir(model):
        candidates.append(model.parent.parent)
    candidates += [model, model / ".."]
    for c in candidates:
        if (c / "recipe.yaml").is_file():
            return c / "recipe.yaml"
    return None


def eval_windows(cfg: RecipeConfig, data_source: str | None = None,
                 tokenizer_dir: Path | None = None):
    """The fixed validation windows [n, seq_len + 1] of the recipe, or the first windows of all
    of ``data_source`` (text / JSONL / directory, tokenized with the model's tokenizer, or a
    pre-tokenized .bin)."""
    import numpy as np

    from moe_merge.training.data import (
        _write_tokens,
        iter_texts,
        list_documents,
        prepare,
        validation_windows,
    )

    world = cfg.parallel.world_size or 1  # a run's recipe.yaml has the launched world size
    n_windows = -(-cfg.logging.val_batches // world) * world * cfg.parallel.micro_batch
    if data_source is None:
        return validation_windows(prepare(cfg.data).val, cfg.data.seq_len, n_windows)
    data_cfg = dataclasses.replace(cfg.data, source=str(data_source))
    if str(data_source).endswith(".bin"):
        if not Path(data_source).is_file():
            raise MergeError(f"--data: {data_source} does not exist")
        tokens = np.memmap(data_source, dtype=data_cfg.bin_dtype, mode="r")
    else:
        from transformers import AutoTokenizer

        from moe_merge.checkpoint.names import check_no_remote_code

        check_no_remote_code(tokenizer_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise MergeError(f"{tokenizer_dir}: cannot load its tokenizer ({_first_line(e)})"
                             ) from None
        with tempfile.TemporaryDirectory(prefix="moe_merge_data_") as tmp:
            path = Path(tmp) / "eval.bin"
            _write_tokens(iter_texts(list_documents(data_cfg), data_cfg.jsonl_key), tokenizer,
                          path, np.uint32)
            tokens = np.fromfile(path, dtype=np.uint32)
    n = min(n_windows, (len(tokens) - 1) // data_cfg.seq_len)
    if n < 1:
        raise MergeError(f"--data: {data_source} holds {len(tokens)} tokens, fewer than one "
                         f"window of data.seq_len={data_cfg.seq_len}")
    return validation_windows(tokens, data_cfg.seq_len, n)


@torch.no_grad()
def loss_on(model: torch.nn.Module, windows, micro_batch: int) -> tuple[float, int]:
    """Mean next-token cross entropy over all windows, and the number of tokens scored."""
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(windows), micro_batch):
        x = torch.from_numpy(windows[i:i + micro_batch])
        logits = model(input_ids=x[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count, count


def load_hf(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from moe_merge.checkpoint.names import check_no_remote_code, check_sizes, read_hf_config

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MergeError(f"{model_dir}: not an HF model directory (no config.json)")
    check_no_remote_code(model_dir)
    # a config far larger than the weights is refused before transformers builds it
    check_sizes(read_hf_config(model_dir), _weight_shapes(model_dir), model_dir / "config.json")
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                    trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise MergeError(f"{model_dir}: cannot load the HF model ({_first_line(e)})") from None


def _weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in the model's safetensors files (their headers only;
    files inside the directory)."""
    from safetensors import SafetensorError, safe_open

    from moe_merge.checkpoint.safe_load import open_regular, real_path

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        os.close(open_regular(f, model_dir))  # a regular file inside the directory
        try:
            with safe_open(str(real_path(f, model_dir)), "np") as st:
                shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
        except (OSError, SafetensorError) as e:
            raise MergeError(f"{f}: not a readable safetensors file ({_first_line(e)})") from None
    return shapes


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


DEFAULTS = Path("(defaults)")  # the recipe of a run that has none: the schema's defaults


def default_recipe(overrides: list[str]) -> RecipeConfig:
    """The recipe for scoring ``--data`` of another trainer's run: the schema's defaults
    (seq_len 256, 8 validation batches of 8) with the overrides given."""
    return load_recipe(DEFAULTS, overrides, data={"name": "eval"})


@contextlib.contextmanager
def as_hf_dir(model_path: Path, hf_config: str | Path | None = None):
    """``(HF directory, label)`` of ``model_path``: itself when it is an HF directory, else the
    newest checkpoint under it (a run, a tag, a transformers Trainer's folder) gathered into a
    temporary one, deleted on leaving."""
    model_path = Path(model_path)
    if not (_holds_tags(model_path) or not (model_path / "config.json").is_file()):
        yield model_path, str(model_path)
        return
    from moe_merge.merge.merger import OutputOptions, merge
    from moe_merge.merge.selection import Selection

    with tempfile.TemporaryDirectory(prefix="moe_merge_eval_") as tmp:
        tag = find_tags([model_path])[-1]
        merge([tag.path], Path(tmp) / "model", Selection(last=1),
              OutputOptions(hf_config=hf_config), progress=False, echo=lambda s: None)
        yield Path(tmp) / "model", str(tag.path)


def _holds_tags(path: Path) -> bool:
    """Whether ``path`` holds DeepSpeed tags (a run, a tag, another trainer's checkpoint
    folder beside its own HF files), read in preference to any HF weights beside them."""
    try:
        return bool(scan(path))
    except CheckpointError:
        return False


def evaluate(model_path: str | Path, recipe: str | Path | None = None,
             data: str | None = None, overrides: list[str] | None = None,
             hf_config: str | Path | None = None) -> dict:
    """Validation loss and perplexity of ``model_path`` (HF dir or DeepSpeed checkpoint)."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise MergeError(f"{model_path}: no such file or directory")
    recipe_path = Path(recipe) if recipe else recipe_for(model_path)
    if recipe_path is None and data is None:
        raise MergeError(f"{model_path}: cannot find the run's recipe.yaml for its validation "
                         "batches; pass --recipe RECIPE, or --data FILE (a run of another "
                         "trainer)")
    if recipe_path is None:  # --data of another trainer's run: the default windows of it
        recipe_path, cfg = DEFAULTS, default_recipe(overrides or [])
    else:
        cfg = load_recipe(recipe_path, overrides or [])
    return score(model_path, cfg, recipe_path, data=data, hf_config=hf_config)


def score(model_path: Path, cfg: RecipeConfig, recipe_path: Path, data: str | None = None,
          hf_config: str | Path | None = None, windows=None) -> dict:
    """:func:`evaluate` with the recipe loaded; ``windows``: the validation windows, when the
    caller scores several models on the same ones (built here otherwise)."""
    with as_hf_dir(model_path, hf_config) as (hf_dir, label):
        if windows is None:
            windows = eval_windows(cfg, data, hf_dir if data else None)
        model = load_hf(hf_dir)
        loss, tokens = loss_on(model, windows, cfg.parallel.micro_batch)
    return {"model": label, "recipe": str(recipe_path), "data": data or cfg.data.source,
            "windows": int(len(windows)), "tokens": tokens, "loss": loss,
            "ppl": math.exp(min(loss, 50.0))}
