"""Corpus, tokenizer and token memmaps.

The embedded default corpus is this Python's own standard-library source files: present on every
machine that runs the project, written by other people, no download. A byte-level BPE tokenizer is
trained on the training split and saved in HF format; both splits are tokenized once into uint16 /
uint32 memmaps in a cache keyed by the corpus and tokenizer settings.

Data order is a pure function of (seed, step): the token stream of the training split is cut into
non-overlapping windows of seq_len + 1 tokens; epoch e visits them in a seeded permutation; global
sample g of step s is window perm[(s * global_batch + g) mod n]. Resuming at any step, on any
number of ranks, reproduces the same batches. Validation uses the first windows of the held-out
split, fixed once and for all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from moe_merge.config.recipe import DataConfig
from moe_merge.errors import DataError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}



@dataclass(frozen=True)
class Document:
    doc_id: str
    path: Path
    jsonl_line: int = -1


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("MOE_MERGE_CACHE", Path.home() / ".cache" / "moe_merge"))


def list_documents(cfg: DataConfig) -> list[Document]:
    """All documents of the source, in a fixed order."""
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for parent, dirs, names in os.walk(root):  # skipped directories are not entered
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
            files.extend(Path(parent, n) for n in names if n.endswith(".py"))
        return [Document(str(f.relative_to(root)), f) for f in sorted(files)]
    src = Path(cfg.source)
    if not src.exists():
        raise DataError(f"data.source: {src} does not exist")
    files = (sorted(p for p in src.rglob("*") if p.suffix in (".txt", ".jsonl")) if src.is_dir()
             else [src])
    if not files:
        raise DataError(f"data.source: no .txt or .jsonl files under {src}")
    docs: list[Document] = []
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                docs.extend(Document(f"{f}:{i}", f, i) for i, _ in enumerate(fh))
        else:
            docs.append(Document(str(f), f))
    return docs


def _parse_jsonl(path: Path, lineno: int, line: str, key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno + 1}: not valid JSON ({e.msg})") from None
    text = record.get(key) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno + 1}: no string field '{key}' (set data.jsonl_key)")
    return text


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of the id, not the order of files."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def iter_texts(docs: list[Document], jsonl_key: str) -> Iterator[str]:
    """Texts of ``docs`` in order (JSONL lines of one file come in increasing order)."""
    fh, fh_path, next_line = None, None, 0
    try:
        for d in docs:
            if d.jsonl_line < 0:
                yield d.path.read_text(encoding="utf-8", errors="replace")
                continue
            if fh_path != d.path:
                if fh is not None:
                    fh.close()
                fh, fh_path, next_line = open(d.path, encoding="utf-8"), d.path, 0
            while True:
                line = fh.readline()
                next_line += 1
                if next_line - 1 == d.jsonl_line:
                    break
            yield _parse_jsonl(d.path, d.jsonl_line, line, jsonl_key)
    finally:
        if fh is not None:
            fh.close()


def _fingerprint(cfg: DataConfig, docs: list[Document]) -> str:
    h = hashlib.sha256()
    for key in ("source", "jsonl_key", "tokenizer", "vocab_size", "tokenizer_train_bytes",
                "val_fraction"):
        h.update(f"{key}={getattr(cfg, key)!r};".encode())
    for d in docs:
        st = d.path.stat()
        h.update(f"{d.doc_id}:{st.st_size}:{int(st.st_mtime)};".encode())
    return h.hexdigest()[:16]


def train_tokenizer(texts: Iterator[str], vocab_size: int, max_bytes: float, out_dir: Path):
    """Train a byte-level BPE on up to max_bytes of text; save it in HF format in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def limited() -> Iterator[str]:
        seen = 0
        for t in texts:
            yield t
            seen += len(t)
            if seen >= max_bytes:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(limited(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                 pad_token=EOS_TOKEN, unk_token=None)
    hf.save_pretrained(str(out_dir))
    return hf


def _write_tokens(texts: Iterator[str], tokenizer, path: Path, dtype) -> int:
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    n = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        batch: list[str] = []

        def flush() -> int:
            enc = tokenizer(batch, add_special_tokens=False)["input_ids"]
            out = 0
            for ids in enc:
                arr = np.asarray(ids + [eos], dtype=dtype)
                fh.write(arr.tobytes())
                out += arr.size
            batch.clear()
            return out

        for t in texts:
            batch.append(t)
            if len(batch) == 64:
                n += flush()
        if batch:
            n += flush()
    os.replace(tmp, path)
    return n


@dataclass
class TokenData:
    """Token memmaps of both splits plus the tokenizer directory."""
    train: np.ndarray
    val: np.ndarray
    tokenizer_dir: Path | None
    vocab_size: int


def prepare(cfg: DataConfig) -> TokenData:
    """Build (or reuse from the cache) tokenizer and token memmaps. Call on one process first."""
    if cfg.source.endswith(".bin"):
        return _prepare_bin(cfg)
    docs = list_documents(cfg)
    key = _fingerprint(cfg, docs)
    root = cache_root(cfg) / key
    done = root / "done.json"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        train_docs = [d for d in docs if not is_validation(d.doc_id, cfg.val_fraction)]
        val_docs = [d for d in docs if is_validation(d.doc_id, cfg.val_fraction)]
        if not train_docs or not val_docs:
            raise DataError(f"data.source: {cfg.source} has {len(docs)} documents, too few for a "
                            f"train/validation split at data.val_fraction={cfg.val_fraction}")
        if cfg.tokenizer:
            from transformers import AutoTokenizer

            from moe_merge.checkpoint.names import check_no_remote_code
            from moe_merge.errors import CheckpointError
            try:
                if Path(cfg.tokenizer).is_dir():
                    check_no_remote_code(cfg.tokenizer)
                tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=False)
            except (CheckpointError, OSError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"data.tokenizer: cannot load {cfg.tokenizer} ({first})") from None
            tokenizer.save_pretrained(str(root / "tokenizer"))
        else:
            logger.info("training a %d-token byte-level BPE on %s", cfg.vocab_size, cfg.source)
            tokenizer = train_tokenizer(iter_texts(train_docs, cfg.jsonl_key), cfg.vocab_size,
                                        cfg.tokenizer_train_bytes, root / "tokenizer")
        vocab = len(tokenizer)
        dtype = np.uint16 if vocab <= 65535 else np.uint32
        logger.info("tokenizing %d train / %d validation documents", len(train_docs), len(val_docs))
        n_train = _write_tokens(iter_texts(train_docs, cfg.jsonl_key), tokenizer,
                                root / "train.bin", dtype)
        n_val = _write_tokens(iter_texts(val_docs, cfg.jsonl_key), tokenizer, root / "val.bin",
                              dtype)
        meta = {"vocab_size": vocab, "dtype": np.dtype(dtype).name, "train_tokens": n_train,
                "val_tokens": n_val, "train_docs": len(train_docs), "val_docs": len(val_docs)}
        tmp = root / "done.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, done)
    meta = json.loads(done.read_text())
    return TokenData(
        train=np.memmap(root / "train.bin", dtype=meta["dtype"], mode="r"),
        val=np.memmap(root / "val.bin", dtype=meta["dtype"], mode="r"),
        tokenizer_dir=root / "tokenizer",
        vocab_size=meta["vocab_size"],
    )


def _prepare_bin(cfg: DataConfig) -> TokenData:
    """A pre-tokenized stream: the last val_fraction of it is the validation split."""
    path = Path(cfg.source)
    if not path.is_file():
        raise DataError(f"data.source: {path} does not exist")
    tokens = np.memmap(path, dtype=cfg.bin_dtype, mode="r")
    cut = int(len(tokens) * (1 - cfg.val_fraction))
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else None
    return TokenData(train=tokens[:cut], val=tokens[cut:], tokenizer_dir=tok_dir,
                     vocab_size=cfg.vocab_size)


class Batches:
    """Deterministic batches: a pure function of (seed, step, rank)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"only {len(tokens)} tokens, fewer than one sequence of {seq_len}")
        self.seed = seed
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _window(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        start = int(self._perm[i]) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def samples(self, first: int, count: int) -> np.ndarray:
        """Global samples first .. first+count-1 as an int64 array [count, seq_len + 1]."""
        return np.stack([self._window(g) for g in range(first, first + count)]).astype(np.int64)


def validation_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """The first ``count`` windows of the validation split: fixed for the life of the corpus."""
    n = (len(tokens) - 1) // seq_len
    if n < count:
        raise DataError(f"validation split has {n} sequences of {seq_len} tokens, fewer than the "
                        f"{count} asked for (lower logging.val_batches or raise data.val_fraction)")
    return np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)]).astype(
        np.int64)
