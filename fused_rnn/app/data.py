"""Text, character vocabularies and batches for the character-level language models.

- :class:`Vocab`: the characters of a corpus, encode/decode, saved with checkpoints.
- :func:`load_text` (a UTF-8 file) and :func:`default_corpus` (the running
  interpreter's standard library source, the corpus of ``fused-rnn train`` when no
  ``--text`` is given).
- :func:`split_text`: a contiguous train/validation split.
- :func:`window_batches`: non-overlapping windows, shuffled per epoch, for the
  3-character, n-character, sequence and one-hot models.
- :func:`stream_batches`: contiguous streams, one per batch row, for the stateful model:
  row r of batch k + 1 continues row r of batch k.

Both batchers shard their data over data-parallel ranks (``rank``, ``world_size``) so
that every rank gets the same number of batches and no two ranks see the same text.
"""

import hashlib
import os
import sysconfig
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# The default corpus: about 1 MB of the standard library's source, which the default
# `fused-rnn train` run (stateful 2-layer LSTM, 256 units) passes through a few times in
# its time budget on 2 CPU cores.
DEFAULT_CORPUS_CHARS = 1_000_000
# Folders of the standard library left out of the default corpus: tests (generated,
# repetitive data files and deliberately broken code), bundled third-party code and
# IDLE's GUI, so the corpus is ordinary library code.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "idlelib",
                 "lib2to3", "turtledemo", "ensurepip", "pydoc_data"}


# characters encoded per chunk (Vocab.encode): a few MB of temporaries whatever the corpus
_ENCODE_CHUNK = 1 << 20


class Vocab:
    """The sorted set of characters of a text; index i encodes ``chars[i]``."""

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"a vocabulary needs at least one character, got {chars!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary characters must be unique")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"Vocab({len(self)} characters)"

    def encode(self, text: str, compact: bool = False) -> Tensor:
        """Tensor of the characters' indices: int64, or with `compact` the smallest
        integer type that holds the vocabulary (uint8 up to 256 characters), for a whole
        corpus, whose batches are widened to int64 one at a time. Vectorised, in chunks
        of a million characters: no Python object per character, and besides the result
        a constant amount of memory. A character outside the vocabulary raises
        ValueError naming it and its position."""
        dtype = torch.int64
        if compact:
            dtype = next(t for t, top in ((torch.uint8, 255), (torch.int16, 32767), (torch.int32, 2 ** 31 - 1))
                         if len(self) - 1 <= top)
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        order = np.argsort(codes)
        known = codes[order]
        out = torch.empty(len(text), dtype=dtype)
        for start in range(0, len(text), _ENCODE_CHUNK):
            piece = text[start:start + _ENCODE_CHUNK]
            points = np.frombuffer(piece.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
            where = np.minimum(np.searchsorted(known, points), len(known) - 1)
            unknown = known[where] != points
            if unknown.any():
                first = int(np.argmax(unknown))
                raise ValueError(
                    f"character {piece[first]!r} at position {start + first} is not in the vocabulary "
                    f"({len(self)} characters seen in the training text)"
                )
            out[start:start + len(piece)] = torch.from_numpy(order[where])
        return out

    def decode(self, indices) -> str:
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        return "".join(self.chars[i] for i in indices)


def text_digest(text: str) -> str:
    """Short fingerprint of a corpus, stored in checkpoints so that a resumed run can
    tell that it is training on the same text (hashed in chunks: no copy of the text)."""
    digest = hashlib.sha256()
    for start in range(0, len(text), _ENCODE_CHUNK):
        digest.update(text[start:start + _ENCODE_CHUNK].encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()[:16]


def _check_length(text: str, source: str) -> str:
    if len(text) < 2:
        raise ValueError(
            f"{source} has {len(text)} character(s): a language model needs at least 2 "
            "(an input and the character that follows it), and realistically thousands"
        )
    return text


def load_text(path) -> str:
    """The text of a UTF-8 file. Bytes that are not UTF-8 are replaced by U+FFFD with a
    warning (how many); an empty or one-character file raises ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--text: {path} is a folder, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"--text: no such file: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
        warnings.warn(
            f"{path} is not valid UTF-8 (first bad byte at offset {error.start}); "
            f"{bad} undecodable sequence(s) were replaced by U+FFFD",
            stacklevel=2,
        )
    return _check_length(text, str(path))


def stdlib_sources(root: Optional[Path] = None) -> List[Path]:
    """The standard library's .py files, sorted by path (a deterministic order)."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        files.extend(Path(directory) / name for name in names if name.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def default_corpus(max_chars: int = DEFAULT_CORPUS_CHARS, root: Optional[Path] = None) -> str:
    """The first ``max_chars`` characters of the running interpreter's standard library
    source (:func:`stdlib_sources` order, files joined by a blank line): real code with
    brackets, quotes and indentation, present wherever Python is."""
    if max_chars < 2:
        raise ValueError(f"max_chars must be at least 2, got {max_chars}")
    parts, total = [], 0
    for path in stdlib_sources(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text) + 1
        if total >= max_chars:
            break
    if not parts:
        raise RuntimeError(f"no Python sources found under {root or sysconfig.get_paths()['stdlib']}")
    return _check_length("\n".join(parts)[:max_chars], "the default corpus")


def split_text(text: str, val_fraction: float = 0.1) -> Tuple[str, str]:
    """(train, validation): the last ``val_fraction`` of the text is validation."""
    cut = split_point(len(text), val_fraction)
    return text[:cut], text[cut:]


def split_point(length: int, val_fraction: float = 0.1) -> int:
    """Where split_text cuts a text of `length` characters (train before, validation
    from there), for cutting its encoding without copying the text."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(round(length * (1.0 - val_fraction)))
    if cut < 2 or length - cut < 2:
        raise ValueError(f"text of {length} characters is too short to split into train and validation")
    return cut


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


class LazyBatches(Sequence):
    """A sequence of `count` batches, each made when asked for (``make(k)``): an epoch's
    batches without a copy of the epoch's data."""

    def __init__(self, count: int, make: Callable[[int], object]):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self.count))]
        if not -self.count <= k < self.count:
            raise IndexError(f"batch {k} of {self.count}")
        return self.make(k % self.count)


def window_batches(data: Tensor, window: int, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                   epoch: int = 0, rank: int = 0, world_size: int = 1) -> LazyBatches:
    """Non-overlapping windows of ``window`` consecutive characters, [n, window], cut
    into batches of up to ``batch_size`` windows (the last may be smaller), made one at
    a time (the data is never copied whole: only the permutation of the windows is
    held, 8 bytes a window).

    With ``shuffle`` the window order is a permutation drawn from ``(seed, epoch)``
    alone, so that a resumed run sees exactly the batches of an uninterrupted one.
    Rank r takes every world_size-th window of that order, all ranks the same count.
    A model reads window[:, :-1] and predicts window[:, -1] (n-character models) or
    window[:, 1:] (sequence models)."""
    _check_batching(batch_size, rank, world_size)
    count = (data.numel() // window) // world_size * world_size
    if count == 0:
        raise ValueError(
            f"text of {data.numel()} characters holds no window of {window} characters per rank "
            f"({world_size} rank(s)): use a longer text or a shorter --seq-len"
        )
    windows = data[: count * window].view(count, window)
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(count, generator=generator)[rank::world_size]
        return LazyBatches(-(-order.numel() // batch_size),
                           lambda k: windows[order[k * batch_size:(k + 1) * batch_size]])
    mine = windows[rank::world_size]
    return LazyBatches(-(-mine.shape[0] // batch_size), lambda k: mine[k * batch_size:(k + 1) * batch_size])


def stream_batches(data: Tensor, seq_len: int, batch_size: int, *, rank: int = 0,
                   world_size: int = 1) -> Iterator[Tuple[Tensor, Tensor]]:
    """(inputs, targets) pairs, each [batch_size, seq_len], for a stateful model.

    The rank's shard of the text (one contiguous piece per rank) is cut into
    ``batch_size`` contiguous streams, one per batch row; batch k holds characters
    [k * seq_len, (k + 1) * seq_len) of every stream, targets one character later, so
    row r of batch k + 1 continues row r of batch k."""
    _check_batching(batch_size, rank, world_size)
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    shard = data.numel() // world_size
    per_row = (shard - 1) // batch_size
    steps = per_row // seq_len
    if steps == 0:
        raise ValueError(
            f"text of {data.numel()} characters is too short for {batch_size} streams of at least "
            f"{seq_len + 1} characters per rank ({world_size} rank(s)): use a longer text or a "
            "smaller --batch-size / --seq-len"
        )
    piece = data[rank * shard: (rank + 1) * shard]
    usable = steps * seq_len
    inputs = piece[: batch_size * per_row].view(batch_size, per_row)[:, :usable]
    targets = piece[1: batch_size * per_row + 1].view(batch_size, per_row)[:, :usable]
    for k in range(steps):
        yield inputs[:, k * seq_len:(k + 1) * seq_len], targets[:, k * seq_len:(k + 1) * seq_len]


def stream_batch_count(length: int, seq_len: int, batch_size: int, world_size: int = 1) -> int:
    """How many batches :func:`stream_batches` yields for a text of ``length`` characters."""
    return max(0, ((length // world_size - 1) // batch_size) // seq_len)
