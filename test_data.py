"""Tests for data.py: tokenizer, corpus loading/caching (txt, jsonl, tfrecords, tokens), batching."""
import json, os, shutil, struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import data
from data import EOT


# ---------------------------------------------------------------- TFRecord writer (tests only)

def _crc32c_bitwise(payload: bytes) -> int:
    """Independent bit-at-a-time CRC32C, to cross-check data.crc32c's table-driven one."""
    crc = 0xFFFFFFFF
    for byte in payload:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(payload: bytes) -> int:
    crc = _crc32c_bitwise(payload)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _example(ids, packed: bool) -> bytes:
    """tf.train.Example{features{feature{"meta": bytes_list, "text": int64_list(ids)}}}."""
    int64_list = _field(1, b"".join(map(_varint, ids))) if packed else b"".join(_field(1, i) for i in ids)
    text = _field(1, b"text") + _field(2, _field(3, int64_list))
    meta = _field(1, b"meta") + _field(2, _field(1, _field(1, b"ignored")))  # a BytesList feature
    return _field(1, _field(1, meta) + _field(1, text))


def write_tfrecords(path, docs, packed=True):
    with open(path, "wb") as f:
        for ids in docs:
            record = _example(ids, packed)
            header = struct.pack("<Q", len(record))
            f.write(header + struct.pack("<I", _masked(header)) + record + struct.pack("<I", _masked(record)))


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_known_gpt2_ids():
    enc = data.tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    assert enc.encode("The dog") == [464, 3290]
    assert enc.encode("Hello world") == [15496, 995]
    assert [enc.encode(s) for s in (" the", ",", ".", "\n")] == [[262], [11], [13], [198]]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "Wherefore art thou, Romeo? 1234 — naïve café\n\n  x"
    assert enc.decode(enc.encode(text)) == text
    assert data.tokenizer() is enc  # cached


def test_tokenizer_rejects_corrupt_asset(tmp_path):
    shutil.copytree(data.ASSETS / "gpt2", tmp_path / "gpt2")
    with open(tmp_path / "gpt2" / "vocab.bpe", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=r"vocab\.bpe: sha256 mismatch"):
        data._gpt2_encoding(tmp_path / "gpt2")


def test_tokenizer_rejects_wrong_hash(monkeypatch):
    monkeypatch.setitem(data.GPT2_SHA256, "encoder.json", "0" * 64)
    with pytest.raises(ValueError, match=r"encoder\.json: sha256 mismatch"):
        data._gpt2_encoding(data.ASSETS / "gpt2")


def test_crc32c():
    assert data.crc32c(b"123456789") == _crc32c_bitwise(b"123456789") == 0xE3069283
    payload = bytes(range(256)) * 3
    assert data.crc32c(payload) == _crc32c_bitwise(payload)
    assert data.masked_crc32c(payload) == _masked(payload)


# ---------------------------------------------------------------- builtin corpus

@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {split: data.load_tokens(f"shakespeare:{split}", str(cache)) for split in ("train", "val")}


def _docs(tokens) -> list[str]:
    enc, ends = data.tokenizer(), np.flatnonzero(np.asarray(tokens) == EOT)
    assert ends[-1] == len(tokens) - 1  # EOT after every document, the last one included
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(np.r_[-1, ends[:-1]], ends)]


def test_shakespeare_splits_are_disjoint_plays(shakespeare):
    train, val = _docs(shakespeare["train"]), _docs(shakespeare["val"])
    assert [d.split("\n")[0] for d in val] == ["HAMLET", "MACBETH", "TWELFTH NIGHT"]
    assert len(train) == 34 and len(set(train)) == 34 and not set(train) & set(val)
    titles = {d.split("\n")[0] for d in train}
    assert len(titles) == 34 and not titles & {"HAMLET", "MACBETH", "TWELFTH NIGHT"}
    for tokens in shakespeare.values():
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.ndim == 1


# ---------------------------------------------------------------- text corpora

def _enc(*texts) -> list[int]:
    return [t for text in texts for t in data.tokenizer().encode_ordinary(text) + [EOT]]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Hello world")
    (root / "sub" / "b.txt").write_text("The dog\nbarks.")
    (root / "c.jsonl").write_text(json.dumps({"text": "first doc", "id": 1}) + "\n\n"
                                  + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "second"}) + "\n")
    (root / "notes.md").write_text("ignored: not a corpus suffix")
    return root


def test_txt_jsonl_folder_glob(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    load = lambda spec: data.load_tokens(spec, cache).tolist()
    assert load(str(corpus / "a.txt")) == _enc("Hello world")
    assert load(str(corpus / "c.jsonl")) == _enc("first doc", "second")  # blank and empty docs skipped
    # folder: every corpus file below it, sorted by path
    assert load(str(corpus)) == _enc("Hello world", "first doc", "second", "The dog\nbarks.")
    assert load(str(corpus / "**" / "*.txt")) == _enc("Hello world", "The dog\nbarks.")
    # comma-separated parts keep the order given
    assert load(f"{corpus / 'sub' / 'b.txt'}, {corpus / 'a.txt'}") == _enc("The dog\nbarks.", "Hello world")


def test_jsonl_without_text_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object with a string 'text'"):
        data.load_tokens(str(path), str(tmp_path / "cache"))


def test_long_documents_are_split_without_changing_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 50)
    monkeypatch.setattr(data, "BATCH_CHARS", 300)  # several multi-threaded batches, in order
    text = "ACT I\n\n\nSCENE  II.\n   Enter\nHAMLET:\r\nWho's there?\nx\n" * 40 + "  tail\n\n"
    assert len(data._split_text(text)) > 10
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "short.txt").write_text("Hello world")
    tokens = data.load_tokens(f"{tmp_path / 'long.txt'},{tmp_path / 'short.txt'}", str(tmp_path / "c"))
    assert tokens.tolist() == _enc(text, "Hello world")


def test_progress_only_for_large_corpora(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("Hello world\n" * 100)
    data.load_tokens(str(tmp_path / "a.txt"), str(tmp_path / "c1"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(data, "PROGRESS_BYTES", 10)
    data.load_tokens(str(tmp_path / "a.txt"), str(tmp_path / "c2"))
    assert "tokenizing: 0.0/0.0 MB" in capsys.readouterr().err


# ---------------------------------------------------------------- tfrecords and .tokens

@pytest.mark.parametrize("packed", [True, False])
def test_tfrecords_round_trip(tmp_path, packed):
    path = tmp_path / "shard.tfrecords"
    write_tfrecords(path, [[1, 2, 3], [4, 5, EOT], [], [65535, 0, 300, 70000 % 65536]], packed=packed)
    tokens = data.load_tokens(str(path), str(tmp_path / "cache"))
    # EOT appended only to records that lack it; empty records dropped
    assert tokens.tolist() == [1, 2, 3, EOT, 4, 5, EOT, 65535, 0, 300, 4464, EOT]


def test_tfrecords_mixed_with_text_keeps_order(tmp_path):
    write_tfrecords(tmp_path / "b.tfrecords", [[7, 8]])
    (tmp_path / "a.txt").write_text("Hello world")
    (tmp_path / "c.txt").write_text("The dog")
    tokens = data.load_tokens(str(tmp_path), str(tmp_path / "cache"))
    assert tokens.tolist() == _enc("Hello world") + [7, 8, EOT] + _enc("The dog")


def test_original_index_file_lists_tfrecords(tmp_path):
    """The original configs name a .index file: one .tfrecords path per line, relative to the index."""
    (tmp_path / "shards").mkdir()
    write_tfrecords(tmp_path / "shards" / "0.tfrecords", [[1, 2]])
    write_tfrecords(tmp_path / "shards" / "1.tfrecords", [[3]])
    (tmp_path / "train.index").write_text("shards/1.tfrecords\nshards/0.tfrecords\n")
    assert data.load_tokens(str(tmp_path / "train.index"), str(tmp_path / "cache")).tolist() == [3, EOT, 1, 2, EOT]
    (tmp_path / "remote.index").write_text("gs://bucket/0.tfrecords\n")
    with pytest.raises(ValueError, match="remote files"):
        data.load_tokens(str(tmp_path / "remote.index"))
    (tmp_path / "gone.index").write_text("nope.tfrecords\n")
    with pytest.raises(ValueError, match="does not exist"):
        data.load_tokens(str(tmp_path / "gone.index"))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), r"record 1: corrupt TFRecord data"),  # data CRC
    (lambda b: b[:-3], r"record 1: corrupt TFRecord data"),  # truncated record
    (lambda b: b + b"\x00" * 5, r"record 2: corrupt TFRecord header"),  # truncated header
    # both records have the same size, so record 1's length field starts at len(b) // 2
    (lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 4]) + b[len(b) // 2 + 1:],
     r"record 1: corrupt TFRecord header"),
])
def test_tfrecords_corruption_names_file_and_record(tmp_path, damage, message):
    path = tmp_path / "bad.tfrecords"
    write_tfrecords(path, [[1, 2, 3], [4, 5, 6]])
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=r"bad\.tfrecords: " + message):
        data.load_tokens(str(path), str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("*"))  # no partial cache left behind


@pytest.mark.parametrize("bad_id", [65536, 2**40, -1])
def test_tfrecords_token_too_big_for_uint16(tmp_path, bad_id):
    path = tmp_path / "big.tfrecords"
    write_tfrecords(path, [[1], [2, bad_id]])
    with pytest.raises(ValueError, match=r"big\.tfrecords: record 1: token id \d+ does not fit in uint16"):
        data.load_tokens(str(path), str(tmp_path / "cache"))


def test_tfrecord_without_text_feature(tmp_path):
    path = tmp_path / "x.tfrecords"
    record = _field(1, _field(1, _field(1, b"other") + _field(2, b"")))
    header = struct.pack("<Q", len(record))
    path.write_bytes(header + struct.pack("<I", _masked(header)) + record + struct.pack("<I", _masked(record)))
    with pytest.raises(ValueError, match=r"x\.tfrecords: record 0: .*no feature 'text'"):
        data.load_tokens(str(path), str(tmp_path / "cache"))


def test_tokens_file_used_as_is(tmp_path):
    path = tmp_path / "corpus.tokens"
    np.array([5, 6, EOT, 7], "<u2").tofile(path)
    tokens = data.load_tokens(str(path), str(tmp_path / "cache"))
    assert isinstance(tokens, np.memmap) and tokens.filename == str(path) and tokens.tolist() == [5, 6, EOT, 7]
    (tmp_path / "a.txt").write_text("Hello world")  # combined with others: appended verbatim
    assert data.load_tokens(str(tmp_path), str(tmp_path / "cache")).tolist() == _enc("Hello world") + [5, 6, EOT, 7]


# ---------------------------------------------------------------- cache

def test_cache_reused_then_invalidated(tmp_path, monkeypatch):
    path, cache = tmp_path / "a.txt", tmp_path / "cache"
    path.write_text("Hello world")
    first = data.load_tokens(str(path), str(cache))
    assert isinstance(first, np.memmap) and first.mode == "r"
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first.filename)]
    assert first.filename.endswith(".tokens")

    def no_tokenizing(sources):
        raise AssertionError("cache was not reused")
    monkeypatch.setattr(data, "_token_chunks", no_tokenizing)
    again = data.load_tokens(str(path), str(cache))
    assert again.filename == first.filename and again.tolist() == _enc("Hello world")
    monkeypatch.undo()

    path.write_text("The dog")  # new content: size and mtime change -> new cache entry
    os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)
    changed = data.load_tokens(str(path), str(cache))
    assert changed.filename != first.filename and changed.tolist() == _enc("The dog")


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "envcache"))
    (tmp_path / "a.txt").write_text("Hello world")
    tokens = data.load_tokens(str(tmp_path / "a.txt"))
    assert os.path.dirname(tokens.filename) == str(tmp_path / "envcache")


# ---------------------------------------------------------------- errors

def test_data_errors(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="matches no"):
        data.load_tokens(str(tmp_path / "missing" / "*.txt"), cache)
    with pytest.raises(ValueError, match="no such file or folder"):
        data.load_tokens(str(tmp_path / "missing.txt"), cache)
    with pytest.raises(ValueError, match="no such file or folder .or one of shakespeare:train"):
        data.load_tokens("shakespeare:test", cache)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty \(0 tokens\)"):
        data.load_tokens(str(tmp_path / "empty.txt"), cache)
    (tmp_path / "empty.tokens").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty data \(0 tokens\)"):
        data.load_tokens(str(tmp_path / "empty.tokens"), cache)
    (tmp_path / "odd.tokens").write_bytes(b"\x01\x00\x02")
    (tmp_path / "even.tokens").write_bytes(b"\x01\x00")
    for spec in ("odd.tokens", "odd.tokens,even.tokens", "even.tokens,odd.tokens"):  # alone or among others
        with pytest.raises(ValueError, match="odd byte count"):
            data.load_tokens(",".join(str(tmp_path / f) for f in spec.split(",")), cache)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"x\.csv. matches no \.txt/\.jsonl/\.tfrecords/\.tokens files"):
        data.load_tokens(str(tmp_path / "x.csv"), cache)
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8"):
        data.load_tokens(str(tmp_path / "bad.txt"), cache)
    with pytest.raises(ValueError, match=r"too short for seq=8: 8 tokens, need at least 9"):
        data.batch_at(np.arange(8), 0, 1, 8, 0)
    with pytest.raises(ValueError, match=r"too short for seq=8: 3 tokens"):
        data.eval_windows(np.arange(3), 1, 8)


# ---------------------------------------------------------------- batches

def _starts(batch, seq):
    """Each row must be a whole window tokens[i*seq : i*seq+seq+1] of tokens = arange(...)."""
    assert batch.dtype == np.int32 and batch.shape[1] == seq + 1
    assert (batch == batch[:, :1] + np.arange(seq + 1)).all() and (batch[:, 0] % seq == 0).all()
    return batch[:, 0] // seq


@settings(derandomize=True, max_examples=60, deadline=None)
@given(length=st.integers(2, 300), seq=st.integers(1, 16), seed=st.integers(0, 2**32 - 1),
       position=st.integers(0, 200), n=st.integers(1, 40), m=st.integers(1, 40))
def test_batches_are_resumable(length, seq, seed, position, n, m):
    tokens = np.arange(length, dtype=np.uint16)
    if length < seq + 1:
        with pytest.raises(ValueError, match="too short"):
            data.batch_at(tokens, position, n, seq, seed)
        return
    whole = data.batch_at(tokens, position, n + m, seq, seed)
    resumed = np.concatenate([data.batch_at(tokens, position, n, seq, seed),
                              data.batch_at(tokens, position + n, m, seq, seed)])
    np.testing.assert_array_equal(whole, resumed)
    windows = (length - 1) // seq
    starts = _starts(whole, seq)
    assert starts.max() < windows
    # every epoch is a permutation of all windows
    epoch = 1 + position // windows
    full = _starts(data.batch_at(tokens, epoch * windows, windows, seq, seed), seq)
    assert sorted(full) == list(range(windows))


def test_batches_are_seeded_and_shuffled():
    tokens = np.arange(4097, dtype=np.uint16)
    a = data.batch_at(tokens, 0, 64, 16, seed=0)
    np.testing.assert_array_equal(a, data.batch_at(tokens, 0, 64, 16, seed=0))
    assert not np.array_equal(a, data.batch_at(tokens, 0, 64, 16, seed=1))
    next_epoch = data.batch_at(tokens, 256, 64, 16, seed=0)  # 256 windows per epoch
    assert not np.array_equal(a, next_epoch)
    assert not np.array_equal(_starts(a, 16), np.arange(64))


def test_data_parallel_rows_are_distinct_windows():
    tokens, seq, batch, dp = np.arange(10_001, dtype=np.uint16), 10, 40, 4
    windows = (len(tokens) - 1) // seq  # 1000: 25 batches per epoch
    seen = []
    for step in range(windows // batch):
        rows = _starts(data.batch_at(tokens, step * batch, batch, seq, seed=3), seq)
        replicas = np.split(rows, dp)  # contiguous rows -> one replica each
        assert len(set(rows)) == batch
        assert all(not set(a) & set(b) for i, a in enumerate(replicas) for b in replicas[i + 1:])
        seen += list(rows)
    assert sorted(seen) == list(range(windows))  # no window repeats within the epoch


def test_the_stream_orders_each_epoch_once(monkeypatch):
    tokens = np.arange(16 * 64 + 1, dtype=np.uint16)  # 64 windows of 16
    stream, calls, real = data.Stream(tokens, 16, seed=3), [], np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda s: calls.append(s) or real(s))
    rows = np.concatenate([stream.rows(np.arange(p, p + 12)) for p in range(0, 132, 12)])  # into a third epoch
    assert calls == [[3, 0], [3, 1], [3, 2]]  # not a permutation per batch
    monkeypatch.undo()
    np.testing.assert_array_equal(rows, data.batch_at(tokens, 0, 132, 16, 3))


@pytest.mark.parametrize("length, n, seq, expected_batches", [
    (101, 3, 10, 3), (100, 3, 10, 3), (41, 4, 10, 1), (31, 4, 10, 1), (11, 5, 10, 1), (1000, 1, 7, 142)])
def test_eval_windows_cover_val_in_order(length, n, seq, expected_batches):
    tokens = np.arange(length, dtype=np.uint16)
    index = data.eval_windows(tokens, n, seq)
    windows = (length - 1) // seq
    assert index.shape == (expected_batches, n)
    real = index[index >= 0]
    np.testing.assert_array_equal(real, np.arange(len(real)))  # consecutive, non-overlapping, in order
    assert (index < 0).sum() == (n - windows if windows < n else 0)  # padding only in a single short batch
    rows = data.window_rows(tokens, real, seq)
    assert rows.dtype == np.int32 and np.array_equal(_starts(rows, seq), real)
