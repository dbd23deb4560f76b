"""Text loading, the vocabulary, and the batchers of fused_rnn.app.data."""

import subprocess
import sys

import pytest
import torch

from fused_rnn.app import data


def test_vocab_round_trip_and_unknown_character():
    vocab = data.Vocab.from_text("hello world")
    assert vocab.chars == " dehlorw"
    assert vocab.decode(vocab.encode("hold  row")) == "hold  row"
    with pytest.raises(ValueError, match=r"character 'z' at position 3 is not in the vocabulary"):
        vocab.encode("helzo")
    with pytest.raises(ValueError, match="at least one character"):
        data.Vocab("")
    with pytest.raises(ValueError, match="unique"):
        data.Vocab("aa")


def test_load_text_utf8_replacement_and_too_short(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("naïve text\n", encoding="utf-8")
    assert data.load_text(good) == "naïve text\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfedef")
    with pytest.warns(UserWarning, match=r"not valid UTF-8 \(first bad byte at offset 3\); 2 undecodable"):
        text = data.load_text(bad)
    assert text == "abc\ufffd\ufffddef"
    for content in (b"", b"x"):
        short = tmp_path / "short.txt"
        short.write_bytes(content)
        with pytest.raises(ValueError, match=r"has \d character\(s\): a language model needs at least 2"):
            data.load_text(short)
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_text(tmp_path / "missing.txt")


def test_default_corpus_is_deterministic_real_python():
    first = data.default_corpus(50_000)
    assert first == data.default_corpus(50_000)
    assert len(first) == 50_000
    assert "def " in first and "import " in first
    import sysconfig
    from pathlib import Path
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = data.stdlib_sources()
    relative = [p.relative_to(root).as_posix() for p in paths]
    assert len(paths) > 100 and relative == sorted(relative)
    assert not any(part in ("test", "tests", "site-packages") for p in paths for part in p.relative_to(root).parts)


def test_split_text():
    train, val = data.split_text("abcdefghij" * 10, 0.1)
    assert (len(train), len(val)) == (90, 10) and train + val == "abcdefghij" * 10
    with pytest.raises(ValueError, match="too short"):
        data.split_text("abc", 0.1)


def test_stream_batches_rows_continue_across_batches():
    encoded = torch.arange(1000)
    batches = list(data.stream_batches(encoded, seq_len=7, batch_size=4))
    assert len(batches) == data.stream_batch_count(1000, 7, 4) == (999 // 4) // 7
    for (x0, y0), (x1, _) in zip(batches, batches[1:]):
        assert x0.shape == (4, 7)
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)      # row r of batch k+1 continues row r of batch k
        assert torch.equal(y0, x0 + 1)                   # targets are the next characters
    rows = torch.cat([x for x, _ in batches], dim=1)
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(4, rows.shape[1] - 1, dtype=torch.int64))


def test_stream_batches_shard_per_rank():
    encoded = torch.arange(1000)
    ranks = [torch.cat([x for x, _ in data.stream_batches(encoded, 5, 3, rank=r, world_size=2)]) for r in (0, 1)]
    assert ranks[0].shape == ranks[1].shape
    assert ranks[0].max() < 500 <= ranks[1].min()   # one contiguous half of the text per rank
    with pytest.raises(ValueError, match="too short"):
        list(data.stream_batches(torch.arange(10), 8, 4))


def test_window_batches_shuffle_and_shard():
    encoded = torch.arange(100)
    plain = list(data.window_batches(encoded, 5, 4))
    assert torch.equal(torch.cat(plain), encoded.view(20, 5)) and len(plain) == 5
    a = list(data.window_batches(encoded, 5, 4, shuffle=True, seed=1, epoch=0))
    b = list(data.window_batches(encoded, 5, 4, shuffle=True, seed=1, epoch=0))
    c = list(data.window_batches(encoded, 5, 4, shuffle=True, seed=1, epoch=1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert sorted(torch.cat(a)[:, 0].tolist()) == list(range(0, 100, 5))  # every window once
    shards = [torch.cat(list(data.window_batches(encoded, 5, 4, shuffle=True, epoch=3, rank=r, world_size=3)))
              for r in range(3)]
    assert len({s.shape[0] for s in shards}) == 1
    seen = torch.cat(shards)[:, 0].tolist()
    assert len(seen) == len(set(seen)) == 18          # 20 windows, 6 per rank, none twice


def test_compact_encoding_equals_the_plain_one_and_names_a_stranger():
    text = "ab\u00e9\u4e2d\U0001f600 " * 5 + "x"
    vocab = data.Vocab.from_text(text)
    plain, compact = vocab.encode(text), vocab.encode(text, compact=True)
    assert plain.dtype == torch.int64 and compact.dtype == torch.uint8
    assert torch.equal(plain, compact.long()) and vocab.decode(plain) == text
    assert plain.tolist() == [vocab.chars.index(c) for c in text]
    wide = data.Vocab("".join(chr(0x100 + i) for i in range(300)))
    assert wide.encode(wide.chars, compact=True).dtype == torch.int16
    with pytest.raises(ValueError, match=r"character 'q' at position 3 is not in the vocabulary"):
        vocab.encode("abxq")


@pytest.mark.slow
def test_a_large_corpus_takes_about_twice_its_size(tmp_path):
    """The training pipeline on generated corpora of 20 and 60 MB (read, fingerprinted,
    encoded, split, an epoch's shuffled windows and its streams, one batch of each), each
    in a process of its own: the peak memory grows with the text by at most 2.2 bytes a
    byte (the text as a str, 1 byte a character here, and its uint8 encoding make 2;
    the windows' permutation adds 8 bytes a 65-character window), and the rest (torch's
    kernels and buffers met for the first time) stays under 64 MB."""
    script = tmp_path / "measure.py"
    script.write_text("""
import resource, sys, torch
from fused_rnn.app import data
from fused_rnn.app.train import TrainConfig, batches
path, lines = sys.argv[1], int(sys.argv[2])
line = "".join(chr(32 + (i * 7) % 90) for i in range(999)) + "\\n"
with open(path, "w") as f:
    for _ in range(lines):
        f.write(line)
torch.zeros(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
text = data.load_text(path)
digest = data.text_digest(text)
vocab = data.Vocab.from_text(text)
cut = data.split_point(len(text))
encoded = vocab.encode(text, compact=True)
del text
for model in ("seq", "stateful-lstm"):
    config = TrainConfig(model=model, seq_len=64).resolved()
    epoch = batches(config, encoded[:cut], shuffle=True, epoch=0)
    x, y = epoch[len(epoch) // 2]
    assert x.shape[0] == config.batch_size
print(lines * 1000, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
""")
    grown = {}
    for lines in (20_000, 60_000):
        result = subprocess.run([sys.executable, str(script), str(tmp_path / f"corpus{lines}.txt"), str(lines)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        size, peak = map(int, result.stdout.split())
        grown[size] = peak
    (small, a), (large, b) = sorted(grown.items())
    per_byte = (b - a) / (large - small)
    fixed = a - per_byte * small
    assert per_byte <= 2.2, f"{per_byte:.2f} bytes of memory per byte of text"
    assert fixed <= 64 * 2 ** 20, f"{fixed / 2 ** 20:.0f} MB besides the text's share"
