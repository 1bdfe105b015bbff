"""Data: the embedded corpus, the split, the tokenizer cache and deterministic batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_merge.config.recipe import DataConfig
from moe_merge.errors import DataError
from moe_merge.training.data import (
    Batches,
    is_validation,
    list_documents,
    prepare,
    validation_windows,
)


def test_stdlib_corpus_is_found_in_fixed_order():
    docs = list_documents(DataConfig(source="stdlib"))
    assert len(docs) > 200
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids)
    assert not any("site-packages" in i for i in ids)


def test_split_is_by_document_hash():
    ids = [f"doc{i}" for i in range(20000)]
    val = [i for i in ids if is_validation(i, 0.05)]
    assert 800 < len(val) < 1200
    assert val == [i for i in ids if is_validation(i, 0.05)]  # stable
    assert is_validation("x", 0.999999) and not is_validation("x", 0.0)


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    import sysconfig
    from pathlib import Path
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
    with open(root / "docs.jsonl", "w") as fh:
        for p in stdlib:
            fh.write(json.dumps({"body": p.read_text(errors="replace")}) + "\n")
    return root / "docs.jsonl"


def test_jsonl_source_tokenizer_and_cache_are_deterministic(jsonl_corpus, tmp_path):
    cfg = DataConfig(source=str(jsonl_corpus), jsonl_key="body", vocab_size=300,
                     tokenizer_train_bytes=2e5, cache_dir=str(tmp_path / "a"), val_fraction=0.1)
    a = prepare(cfg)
    b = prepare(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "b")}))
    assert a.vocab_size == 300
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert len(a.train) > 2 * len(a.val) > 0
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    again = prepare(cfg)  # cached
    assert np.array_equal(again.train, a.train)


def test_jsonl_missing_field_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "a"}\n' * 30 + '{"txt": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:31: no string field 'text'"):
        prepare(DataConfig(source=str(src), vocab_size=300, cache_dir=str(tmp_path / "c"),
                           val_fraction=0.5))


def test_missing_source():
    with pytest.raises(DataError, match="does not exist"):
        list_documents(DataConfig(source="/nonexistent/corpus"))


def test_pretokenized_bin_source(tmp_path):
    tokens = np.arange(10000, dtype=np.uint16) % 500
    tokens.tofile(tmp_path / "t.bin")
    td = prepare(DataConfig(source=str(tmp_path / "t.bin"), vocab_size=500, val_fraction=0.1))
    assert len(td.train) == 9000 and np.array_equal(td.val, tokens[9000:])


def test_batches_are_a_pure_function_of_the_sample_index():
    tokens = np.arange(10 * 33 + 1) % 1000
    a, b = Batches(tokens, 32, seed=7), Batches(tokens, 32, seed=7)
    whole = a.samples(0, 25)  # wraps into a second epoch
    parts = np.concatenate([b.samples(20, 5), b.samples(0, 20)])
    assert np.array_equal(whole, np.concatenate([parts[5:], parts[:5]]))
    # each epoch visits every window exactly once
    starts = sorted(int(r[0]) for r in whole[:10])
    assert starts == sorted(int(tokens[i * 32]) for i in range(10))
    assert not np.array_equal(whole[:10], Batches(tokens, 32, seed=8).samples(0, 10))
    # targets are inputs shifted by one
    assert whole.shape == (25, 33)


def test_validation_windows_are_fixed():
    tokens = np.arange(1000)
    v = validation_windows(tokens, 10, 5)
    assert np.array_equal(v[1], np.arange(10, 21))
    with pytest.raises(DataError, match="logging.val_batches"):
        validation_windows(tokens, 10, 500)
