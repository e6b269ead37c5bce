"""Data: the GPT-2 tokenizer, corpora as cached uint16 token streams, and deterministic batches.

A corpus is one flat token stream with an EOT after every document. Text is tokenized once and
cached on disk as raw little-endian uint16 (`<key>.tokens`), then memory-mapped, so huge corpora
cost no RAM. Batches are a pure function of (position, seed): a checkpoint only has to remember
how many sequences were consumed to resume the exact same stream.
"""
import functools, glob, hashlib, json, os, re, socket, struct, sys, tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT = 50256  # <|endoftext|>
ASSETS = Path(__file__).resolve().parent / "assets"
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHAKESPEARE_VAL = ("hamlet.txt", "macbeth.txt", "twelfth-night.txt")  # held-out plays
BUILTIN = ("shakespeare:train", "shakespeare:val")
SUFFIXES = (".txt", ".jsonl", ".tfrecords", ".tokens")
TOKEN_DTYPE = np.dtype("<u2")
CACHE_VERSION = b"gptj-jax tokens v1"  # bump when the on-disk token format or tokenization changes
CACHE_ENV = "GPTJ_DATA_CACHE"
PIECE_CHARS = 1 << 18  # long documents are cut into ~256K-char pieces so threads can share them
BATCH_CHARS = 1 << 23  # text handed to tiktoken per multi-threaded call
PROGRESS_BYTES = 1 << 24  # report every 16 MB, and only for corpora at least that big


# ---------------------------------------------------------------- tokenizer

def _gpt2_encoding(folder: Path) -> tiktoken.Encoding:
    for name, sha in GPT2_SHA256.items():
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != sha:
            raise ValueError(f"{folder / name}: sha256 mismatch, file is corrupt; restore it from git")
    # tiktoken re-checks the hashes; it also keeps its own copy in its data-gym cache dir.
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"),
                                            GPT2_SHA256["vocab.bpe"], GPT2_SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2-vendored", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


@functools.lru_cache(maxsize=None)
def tokenizer() -> tiktoken.Encoding:
    """GPT-2 BPE (n_vocab 50257) built from the vendored, hash-checked assets; no network."""
    return _gpt2_encoding(ASSETS / "gpt2")


# ---------------------------------------------------------------- TFRecord / protobuf, by hand

def _crc32c_byte(crc: int) -> int:
    for _ in range(8):  # reflected Castagnoli polynomial, one bit at a time
        crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


_CRC32C_TABLE = tuple(_crc32c_byte(b) for b in range(256))


def crc32c(data: bytes) -> int:
    """CRC-32C, table-driven: pure Python, slow but fine for a one-off tokenization cache (docs/performance.md)."""
    crc, table = 0xFFFFFFFF, _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord stores CRCs rotated and offset, so CRCs of data that holds CRCs stay well-behaved."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _varints(buf: bytes) -> Iterator[int]:
    pos = 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        yield value


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Protobuf wire format -> (field number, wire type, int or bytes) for every field in `buf`."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        else:
            size = {1: 8, 5: 4}.get(wire)
            if wire == 2:
                size, pos = _varint(buf, pos)
            if size is None or pos + size > len(buf):
                raise ValueError(f"bad protobuf field (wire type {wire})")
            value, pos = buf[pos:pos + size], pos + size
        yield key >> 3, wire, value


def _messages(buf: bytes, number: int) -> list[bytes]:
    return [v for f, w, v in _fields(buf) if f == number and w == 2]


def _example_text_ids(record: bytes) -> np.ndarray:
    """tf.train.Example{features{feature["text"]: Feature{int64_list{value}}}} -> uint64 ids."""
    for features in _messages(record, 1):
        for entry in _messages(features, 1):  # map<string, Feature> entries: key=1, value=2
            if _messages(entry, 1) != [b"text"]:
                continue
            ids = []
            for int64_list in (m for feature in _messages(entry, 2) for m in _messages(feature, 3)):
                for f, wire, value in _fields(int64_list):  # writers may use packed or plain form
                    if f == 1 and wire in (0, 2):
                        ids += _varints(value) if wire == 2 else [value]
            return np.array(ids, np.uint64)
    raise ValueError("no feature 'text'")


def _tfrecord_docs(path: Path) -> Iterator[tuple[np.ndarray, int]]:
    with open(path, "rb") as f:
        index = 0
        while header := f.read(12):
            # Framing: uint64 length, uint32 masked crc(length), data, uint32 masked crc(data).
            where = f"{path}: record {index}"
            if len(header) < 12 or masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
                raise ValueError(f"{where}: corrupt TFRecord header (truncated or CRC mismatch)")
            length = struct.unpack("<Q", header[:8])[0]
            body = f.read(length + 4)
            if len(body) < length + 4 or masked_crc32c(body[:-4]) != struct.unpack("<I", body[-4:])[0]:
                raise ValueError(f"{where}: corrupt TFRecord data (truncated or CRC mismatch)")
            try:
                ids = _example_text_ids(body[:-4])
            except ValueError as e:
                raise ValueError(f"{where}: not a tf.train.Example with int64 'text': {e}") from None
            if ids.size and ids.max() >= 1 << 16:
                raise ValueError(f"{where}: token id {ids.max()} does not fit in uint16; "
                                 "re-tokenize with a vocabulary below 65536")
            yield ids.astype(TOKEN_DTYPE), 16 + length
            index += 1


# ---------------------------------------------------------------- corpora

def _shakespeare(split: str) -> Iterator[tuple[str, int]]:
    with tarfile.open(ASSETS / "shakespeare.tar.xz") as tar:
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            if (member.name in SHAKESPEARE_VAL) == (split == "val"):
                yield tar.extractfile(member).read().decode("utf-8"), 0  # 0: not counted in progress


def _documents(source: str | Path) -> Iterator[tuple[str | np.ndarray, int]]:
    """Yield (document, input bytes it used): text to tokenize, or ready-made uint16 tokens."""
    if isinstance(source, str):
        yield from _shakespeare(source.split(":")[1])
    elif source.suffix == ".txt":
        try:
            text = source.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        yield text, source.stat().st_size
    elif source.suffix == ".jsonl":
        with open(source, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:  # bad JSON and bad UTF-8 are ValueErrors too
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise ValueError(f"{source}:{number}: expected a JSON object with a string 'text' field")
                yield text, len(line)
    elif source.suffix == ".tfrecords":
        # Records are documents tokenized elsewhere. The original pipeline already ends each one
        # with EOT, so we add one only when missing rather than doubling the separator.
        for ids, nbytes in _tfrecord_docs(source):
            yield (ids if ids.size == 0 or ids[-1] == EOT else np.append(ids, EOT).astype(TOKEN_DTYPE)), nbytes
    else:  # .tokens: already a finished stream, separators included; taken verbatim
        if source.stat().st_size % 2:
            raise ValueError(f"{source}: odd byte count, not a stream of uint16 tokens; check the data")
        yield np.fromfile(source, TOKEN_DTYPE), source.stat().st_size


_SAFE_CUT = re.compile(r"\S\n(?=\S)")


def _split_text(text: str) -> list[str]:
    """Cut long text only at a lone newline between non-space characters: there the GPT-2 regex
    always emits "\\n" as its own piece, so the pieces tokenize exactly like the whole."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        cut = _SAFE_CUT.search(text, start + PIECE_CHARS)
        if cut is None:
            break
        pieces.append(text[start:cut.end()])
        start = cut.end()
    return pieces + [text[start:]]


def _token_chunks(sources: list) -> Iterator[tuple[np.ndarray, int]]:
    """The corpus in order as (uint16 tokens, input bytes consumed); empty documents are skipped."""
    enc, batch, batch_chars, consumed = tokenizer(), [], 0, 0

    def encode(batch: list[tuple[str, bool]]) -> np.ndarray:
        ids = []
        for piece_ids, (_, ends_document) in zip(enc.encode_ordinary_batch([t for t, _ in batch]), batch):
            ids += piece_ids + [EOT] * ends_document
        return np.array(ids, TOKEN_DTYPE)

    for source in sources:
        for doc, nbytes in _documents(source):
            consumed += nbytes
            if isinstance(doc, str):
                pieces = _split_text(doc) if doc else []
                batch += [(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
                batch_chars += len(doc)
            elif doc.size:  # token document: flush the text before it to keep corpus order
                if batch:
                    yield encode(batch), 0
                    batch, batch_chars = [], 0
                yield doc, consumed
                consumed = 0
            if batch_chars >= BATCH_CHARS:
                yield encode(batch), consumed
                batch, batch_chars, consumed = [], 0, 0
    if batch:
        yield encode(batch), consumed


def _resolve(spec: str) -> list:
    sources = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path = Path(part).expanduser()
        if part in BUILTIN:
            found = [part]
        elif path.suffix == ".index" and path.is_file():  # the original's list of .tfrecords, one per line
            names = [n.strip() for n in path.read_text().splitlines() if n.strip()]
            remote = [n for n in names if "://" in n]
            if remote:
                raise ValueError(f"{path} lists remote files ({remote[0]}): copy them locally and list local paths")
            found = [p if p.is_absolute() else path.parent / p for p in map(Path, names)]
            missing = [p for p in found if not p.is_file()]
            if missing:
                raise ValueError(f"{path} lists {missing[0]}, which does not exist")
        else:  # a file, everything below a folder (hidden files skipped), or a glob
            matches = [path] if path.is_file() else map(Path, glob.glob(
                str(path / "**" / "*") if path.is_dir() else str(path), recursive=True))
            found = sorted(p for p in matches if p.suffix in SUFFIXES and p.is_file())
        if not found and not any(c in part for c in "*?[") and not path.exists():
            raise ValueError(f"data spec {part!r}: no such file or folder (or one of {', '.join(BUILTIN)})")
        if not found:
            raise ValueError(f"data spec {part!r} matches no {'/'.join(SUFFIXES)} files; "
                             f"give a file, folder, glob, or one of {', '.join(BUILTIN)}")
        sources += found
    if not sources:
        raise ValueError("empty data spec; give a file, folder, glob or builtin name")
    return sources


def _open_tokens(path: Path, what: str) -> np.memmap:
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise ValueError(f"{what}: {'empty data (0 tokens)' if size == 0 else 'odd byte count'} "
                         f"in {path}; check the data")
    return np.memmap(str(path), TOKEN_DTYPE, mode="r")


def _write_tokens(sources: list, path: Path, spec: str) -> None:
    # os.replace: readers never see half a file. The host's name too: hosts sharing a cache folder can share pids.
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        total = sum(s.stat().st_size for s in sources if isinstance(s, Path))
        count = done = reported = 0
        with open(tmp, "wb") as f:
            for tokens, nbytes in _token_chunks(sources):
                f.write(tokens.tobytes())
                count, done = count + tokens.size, done + nbytes
                if total >= PROGRESS_BYTES and done - reported >= PROGRESS_BYTES:
                    print(f"tokenizing: {done / 1e6:.1f}/{total / 1e6:.1f} MB", file=sys.stderr, flush=True)
                    reported = done
        if count == 0:
            raise ValueError(f"data {spec!r} is empty (0 tokens); check the files")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tokens(spec: str, cache_dir: str | None = None) -> np.ndarray:
    """Corpus `spec` -> 1-D uint16 tokens, an EOT after each document (empty documents skipped).

    `spec`: "shakespeare:train" / "shakespeare:val", or comma-separated files, folders and globs.
    .txt: a file is a document. .jsonl: each line's "text" is a document. .tfrecords: the
    mesh-transformer-jax format, a record is an already tokenized document. .tokens: a raw
    little-endian uint16 stream, taken verbatim. Everything but a lone .tokens file is converted
    once into `cache_dir` (default $GPTJ_DATA_CACHE or ~/.cache/gptj-jax), keyed by the files'
    paths, sizes and mtimes; the result is memory-mapped."""
    sources = _resolve(spec)
    if len(sources) == 1 and isinstance(sources[0], Path) and sources[0].suffix == ".tokens":
        return _open_tokens(sources[0], spec)
    key = hashlib.sha256(CACHE_VERSION)
    for s in sources:
        if isinstance(s, str):  # builtin: its content is the vendored archive
            key.update(f"{s}|".encode() + hashlib.sha256((ASSETS / "shakespeare.tar.xz").read_bytes()).digest())
        else:
            stat = s.stat()
            key.update(f"|{s.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    folder = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gptj-jax")
    path = folder / f"{key.hexdigest()}.tokens"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _write_tokens(sources, path, spec)
    return _open_tokens(path, spec)


# ---------------------------------------------------------------- batches

def num_windows(tokens: np.ndarray, seq: int) -> int:
    if len(tokens) < seq + 1:
        raise ValueError(f"data too short for seq={seq}: {len(tokens)} tokens, need at least {seq + 1}")
    return (len(tokens) - 1) // seq


def window_rows(tokens: np.ndarray, index: np.ndarray, seq: int) -> np.ndarray:
    # Window i is tokens[i*seq : i*seq+seq+1]: inputs and next-token targets in one row.
    return np.array(tokens[index[:, None] * seq + np.arange(seq + 1)], dtype=np.int32)


class Stream:
    """The endless shuffled stream of a corpus' windows. Epoch e visits every window once, in the order
    np.random.default_rng([seed, e]).permutation, so the stream depends only on (tokens, seq, seed) and resuming
    needs only a position in it. An epoch's order is computed once, when a batch first reaches it, and kept
    (uint32: 4 bytes a window), so a batch costs only its own rows: every process of a run holds the same order
    and reads just the sequences its devices train on."""

    def __init__(self, tokens: np.ndarray, seq: int, seed: int):
        self.tokens, self.seq, self.seed = tokens, seq, seed
        self.windows = num_windows(tokens, seq)
        self._orders = {}  # epoch -> permutation; a batch can straddle two epochs

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = perm.astype(np.uint32) if self.windows < 2**32 else perm
        return self._orders[epoch]

    def rows(self, positions) -> np.ndarray:
        """Sequences at these positions of the stream (int64 >= 0), as int32 [len(positions), seq + 1]."""
        positions = np.asarray(positions, np.int64)
        if positions.size and positions.min() < 0:
            raise ValueError(f"stream positions must be >= 0, got {positions.min()}")
        epoch, offset = np.divmod(positions, self.windows)
        index = np.empty(positions.shape, np.int64)
        for e in np.unique(epoch):
            here = epoch == e
            index[here] = self.order(int(e))[offset[here]]
        return window_rows(self.tokens, index, self.seq)


def batch_at(tokens: np.ndarray, position: int, n: int, seq: int, seed: int) -> np.ndarray:
    """Sequences position..position+n-1 of the stream (see Stream), as int32 [n, seq+1]."""
    if position < 0 or n < 1:
        raise ValueError(f"need position >= 0 and n >= 1, got position={position}, n={n}")
    return Stream(tokens, seq, seed).rows(position + np.arange(n, dtype=np.int64))


def eval_windows(tokens: np.ndarray, n: int, seq: int) -> np.ndarray:
    """The windows validation reads, as batches of window indices [batches, n]: consecutive windows in order, the
    last partial batch dropped; with fewer than n windows in all, one batch of all of them, the rows past them -1
    (padding, for a mask to leave out). Each process then builds just its own rows (window_rows)."""
    windows = num_windows(tokens, seq)
    rows = min(n, windows)
    index = np.arange(windows // rows * rows).reshape(-1, rows)
    return np.pad(index, ((0, 0), (0, n - rows)), constant_values=-1)
