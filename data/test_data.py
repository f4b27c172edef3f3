"""Tests of data/: the shard writer and its format, text preparation, the FineWeb download against a stand-in of
the hub, the bundled sample, the Debian corpus."""
import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import cached_fineweb10B as download  # noqa: E402
import debian_corpus  # noqa: E402
import prepare  # noqa: E402
import train_tst as T  # noqa: E402
from test_train import bad_shard  # noqa: E402

ROOT = os.path.dirname(HERE)


def test_data_tools_and_the_trainer_agree_on_the_shard_format(tmp_path):
    assert (prepare.SHARD_MAGIC, prepare.SHARD_VERSION, prepare.HEADER_INTS) == (T.SHARD_MAGIC, T.SHARD_VERSION, T.HEADER_INTS)
    whole = str(tmp_path / "whole.bin")
    prepare.write_shard(whole, np.arange(300))
    assert prepare.shard_problem(whole) is None and len(T.read_shard(whole)) == 300
    for name, header, raw in [("magic", [7, 1, 3], None), ("version", [20240520, 2, 3], None),
                              ("count", [20240520, 1, 4], None), ("zero", [20240520, 1, 0], None), ("short", None, b"\0" * 9)]:
        path = bad_shard(str(tmp_path), f"{name}.bin", header=header, raw=raw)
        assert prepare.shard_problem(path) is not None, name  # what the downloader refetches, the trainer refuses
        with pytest.raises(T.UsageError):
            T.read_shard(path)


def test_writer_and_reader_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = str(tmp_path / "a.bin")
    prepare.write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert os.path.getsize(path) == 1024 + 2 * 5
    assert T.read_shard(path).tolist() == tokens.tolist()
    with pytest.raises(prepare.DataError, match="does not fit the shard format's uint16"):
        prepare.write_shard(path, [1, 70000])
    with pytest.raises(prepare.DataError, match="empty shard"):
        prepare.write_shard(path, [])
    assert T.read_shard(path).tolist() == tokens.tolist()  # a refused write leaves the old shard


def test_gpt2_encoding_works_offline_from_local_files():
    enc = prepare.gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_local_bpe_files_prefer_tiktoken_cache(tmp_path, monkeypatch):
    package = prepare.local_bpe_files()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for name, (url, _) in prepare.GPT2_BPE_URLS.items():
        import hashlib
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(open(package[name], "rb").read())
    assert all(str(tmp_path) in p for p in prepare.local_bpe_files().values())


DOCS = ["The quick brown fox jumps over the lazy dog.\n" * 40, "Pack my box with five dozen liquor jugs. " * 60,
        "Sphinx of black quartz, judge my vow!\n" * 50]


def test_prepare_makes_shards_that_decode_back_to_the_text(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in DOCS[1:]) + "\n")
    out = tmp_path / "out"
    assert prepare.main([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--out", str(out), "--name", "tiny",
                         "--val_tokens", "100", "--shard_tokens", "500"]) == 0
    names = sorted(os.listdir(out))
    assert names[0] == "tiny_train_000001.bin" and names[-1] == "tiny_val_000000.bin" and len(names) > 2
    val = T.read_shard(str(out / "tiny_val_000000.bin"))
    assert len(val) == 100
    train = [T.read_shard(str(out / n)) for n in names[:-1]]
    assert all(len(t) == 500 for t in train[:-1])
    stream = np.concatenate([val] + train).tolist()
    enc = prepare.gpt2_encoding()
    docs, current = [], None
    for tok in stream:
        if tok == prepare.EOT:
            current = []
            docs.append(current)
        else:
            current.append(tok)
    assert [enc.decode(d) for d in docs] == DOCS
    again = tmp_path / "again"
    assert prepare.main([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--out", str(again), "--name", "tiny",
                         "--val_tokens", "100", "--shard_tokens", "500", "--workers", "2"]) == 0
    assert all(open(out / n, "rb").read() == open(again / n, "rb").read() for n in names)


def test_prepare_refuses_empty_or_bad_input(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    assert prepare.main([str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "holds 0 tokens" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    assert prepare.main([str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: not a JSON object with a 'text' field" in capsys.readouterr().err
    assert prepare.main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such input file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class FakeHub:
    """Stands in for hf_hub_download: writes shards into local_dir, broken ones where asked."""

    def __init__(self, broken=(), offline=False):
        self.calls, self.broken, self.offline = [], list(broken), offline

    def __call__(self, repo_id, filename, repo_type, local_dir, force_download=False):
        self.calls.append((repo_id, filename, force_download))
        if self.offline:
            from huggingface_hub.errors import LocalEntryNotFoundError
            raise LocalEntryNotFoundError("Cannot reach huggingface.co: offline")
        path = os.path.join(local_dir, filename)
        prepare.write_shard(path, np.arange(2000) % 50257)
        if filename in self.broken:
            self.broken.remove(filename)
            with open(path, "r+b") as f:
                f.truncate(1500)
        return path


def test_download_fetches_val_and_train_shards_and_skips_whole_ones(tmp_path, monkeypatch, capsys):
    hub = FakeHub()
    monkeypatch.setattr(download, "hf_hub_download", hub)
    assert download.main(["2", "--dir", str(tmp_path)]) == 0
    assert [c[:2] for c in hub.calls] == [("kjj0/fineweb10B-gpt2", f) for f in
                                          ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin")]
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(offline=True))  # a second run needs no network
    assert download.main(["2", "--dir", str(tmp_path)]) == 0
    assert "0 shards downloaded, 3 already present" in capsys.readouterr().out
    hub = FakeHub()
    monkeypatch.setattr(download, "hf_hub_download", hub)
    assert download.main(["1", "--dataset", "finewebedu10B", "--dir", str(tmp_path / "edu")]) == 0
    assert [c[:2] for c in hub.calls] == [("kjj0/finewebedu10B-gpt2", "finewebedu_val_000000.bin"),
                                          ("kjj0/finewebedu10B-gpt2", "finewebedu_train_000001.bin")]


def test_download_replaces_truncated_and_corrupt_shards(tmp_path, monkeypatch, capsys):
    bad_shard(str(tmp_path), "fineweb_train_000001.bin", raw=b"\x00" * 3000)  # left by an interrupted run
    hub = FakeHub(broken=["fineweb_val_000000.bin"])  # and one that arrives truncated
    monkeypatch.setattr(download, "hf_hub_download", hub)
    assert download.main(["1", "--dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "fineweb_train_000001.bin: no shard header" in err and "not the 5024 its header says; fetching it again" in err
    assert [c[1:] for c in hub.calls] == [("fineweb_val_000000.bin", False), ("fineweb_val_000000.bin", True),
                                          ("fineweb_train_000001.bin", False)]
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin"):
        assert len(T.read_shard(str(tmp_path / name))) == 2000
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(broken=["fineweb_train_000002.bin"] * 2))
    assert download.main(["2", "--dir", str(tmp_path)]) == 1
    assert "still corrupt after downloading twice" in capsys.readouterr().err
    assert not (tmp_path / "fineweb_train_000002.bin").exists()  # never left looking whole


def test_a_failed_download_leaves_nothing_the_trainer_would_pick_up(tmp_path, monkeypatch, capsys):
    target = tmp_path / "fineweb10B"
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(offline=True))
    assert download.main(["1", "--dir", str(target)]) == 1
    assert not target.exists()  # the hub's .cache went to the staging folder, not here
    monkeypatch.setattr(T, "FINEWEB_DIR", str(target))
    target.mkdir()  # an empty or half-made folder (an older download) does not switch the default to FineWeb
    (target / ".cache").mkdir()
    assert T.default_shards("train").endswith(os.path.join("sample", "sample_train_*.bin"))
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(broken=["fineweb_train_000001.bin"] * 2))
    assert download.main(["1", "--dir", str(target)]) == 1  # the val shard arrives whole, the train shard never
    assert sorted(os.listdir(target)) == [".cache", "fineweb_val_000000.bin"]
    assert T.default_shards("train").endswith(os.path.join("sample", "sample_train_*.bin"))
    monkeypatch.setattr(download, "hf_hub_download", FakeHub())
    assert download.main(["1", "--dir", str(target)]) == 0
    assert T.default_shards("train") == os.path.join(str(target), "fineweb_train_*.bin")
    assert not (tmp_path / "fineweb10B.partial").exists()


def test_download_without_network_says_what_could_not_be_reached(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(offline=True))
    assert download.main(["1", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not download fineweb_val_000000.bin from the Hugging Face dataset kjj0/fineweb10B-gpt2")
    assert "LocalEntryNotFoundError" in err and len(err.splitlines()) == 1


def test_bundled_sample_is_the_default_without_fineweb():
    if os.path.isdir(os.path.join(HERE, "data", "fineweb10B")):
        pytest.skip("FineWeb shards are present, so they are the default")
    args = T.parse_args([])
    assert args.train_files.endswith(os.path.join("data", "sample", "sample_train_*.bin"))
    train = [T.read_shard(f) for f in T.find_shards(args.train_files)]
    val = [T.read_shard(f) for f in T.find_shards(args.val_files)]
    total = sum(map(len, train + val))
    assert 3_000_000 <= total <= 5_000_000 and sum(os.path.getsize(f) for f in T.find_shards(args.train_files)) < 10e6
    assert max(int(t.max()) for t in train + val) <= 50256
    assert sum(map(len, val)) >= args.val_tokens




# ---------------------------------------------------------------------------------------------------
# data/debian_corpus.py: the CPU corpus from Debian documentation

def test_debian_corpus_keeps_what_a_reader_sees_of_an_html_page():
    page = """<html><head><title>T</title><script>var x = 1;</script></head><body>
    <div class="navheader"><p>Prev <p>Next</div>
    <nav><ul><li>Home<li>Index</ul></nav>
    <div class="sidebar"><div class="toc"><p>Contents</div></div>
    <h1>Chapter 7. Queries</h1><p>A <b>query</b> &amp; its plan.<br>Second line.
    <style>p { color: red }</style><div class="footer">(c) 2023</div><p>Last words.</body></html>"""
    assert debian_corpus.html_to_text(page) == "Chapter 7. Queries\nA query & its plan.\nSecond line.\nLast words."


def test_debian_corpus_holds_out_whole_documents_for_val(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [dict(package="p", path=f"d{i}", text=" ".join(words[i % 10:] + words[:i % 10]) * (20 + i)) for i in range(30)]
    val_docs, written = debian_corpus.write_corpus(docs, str(tmp_path / "out"), "deb", 2000, 10**6, str(tmp_path / "work"), seed=1)
    enc = prepare.gpt2_encoding()

    def documents(path):
        return [enc.decode(list(d)) for d in np.split(np.asarray(T.read_shard(path)), np.where(T.read_shard(path) == prepare.EOT)[0])[1:]]

    val, train = documents(written[0][0]), documents(written[1][0])
    assert written[0][1] >= 2000 and len(val) == val_docs and len(val) + len(train) == 30
    texts = {d["text"] for d in docs}
    assert {t[len("<|endoftext|>"):] for t in val} <= texts and {t[len("<|endoftext|>"):] for t in train} <= texts
    assert not set(val) & set(train)
