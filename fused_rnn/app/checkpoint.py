"""Checkpoints of the character models: written atomically, read without unpickling
code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only, so it loads
with ``torch.load(weights_only=True)``: opening a checkpoint file never runs code from
it. It holds the model and optimiser state, the vocabulary, the training config, the
epochs done, the loss history and the RNG state, everything ``--resume`` needs.
"""

import os
from pathlib import Path
from typing import Any, Dict

import torch

from .data import Vocab
from .models import CharModel, build_model

FORMAT = "fused_rnn.char_model/1"


def save_checkpoint(checkpoint: Dict[str, Any], path) -> None:
    """Writes `checkpoint` to `path` atomically: into a temporary file in the same
    folder, flushed to disk, then renamed over `path`, so an interruption leaves the
    previous checkpoint intact and never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(checkpoint, format=FORMAT), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # make the rename itself durable
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, text: str) -> None:
    """Replaces a text file atomically (logs written every epoch)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path, for_resume: bool = False) -> Dict[str, Any]:
    """The checkpoint at `path`, loaded with ``weights_only=True`` onto the CPU. A file
    that is not a fused_rnn character-model checkpoint (corrupt, truncated, foreign,
    or missing what sampling, or with `for_resume` resuming, needs) raises ValueError
    saying so."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file (fused-rnn train writes OUT/checkpoint.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        # torch's own message for a file it cannot load safely suggests weights_only=False,
        # which is exactly what a checkpoint from an unknown source must not get
        raise ValueError(f"{path} is not a readable fused_rnn checkpoint (corrupt, truncated, or not written by "
                         f"fused-rnn train; torch.load(weights_only=True) raised {type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a fused_rnn character-model checkpoint "
                         f"(expected format {FORMAT!r}, found {found!r})")
    needed = {"config", "vocab", "model", "epoch"} | ({"optimizer", "rng", "text_digest"} if for_resume else set())
    missing = needed - checkpoint.keys()
    if missing:
        raise ValueError(f"{path} is an incomplete checkpoint: missing {sorted(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint: Dict[str, Any], backend: str = None) -> CharModel:
    """The trained model of a checkpoint, rebuilt from its config and vocabulary."""
    config = checkpoint["config"]
    try:
        model = build_model(config["model"], Vocab(checkpoint["vocab"]), hidden_size=config["hidden"],
                            num_layers=config["layers"], context=config["seq_len"], dropout=config["dropout"],
                            backend=backend or config["backend"])
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise ValueError(f"the checkpoint's model cannot be rebuilt from its config and weights: "
                         f"{type(error).__name__}: {one_line(error)}") from None
    return model


def one_line(error: BaseException) -> str:
    """An exception's message on one line: torch's load_state_dict lists every mismatch
    on lines of their own; the first is kept, with how many more there were."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} {lines[1]} (and {len(lines) - 2} more)"


def describe_os_error(error: OSError, checkpoint=None) -> str:
    """One line for an OSError: what failed and on which file; with the path of the run's
    `checkpoint`, that it is intact when there is one (written atomically, a failed write
    leaves it untouched)."""
    if error.strerror is None:  # raised with a message of its own (FileNotFoundError of load_text, ...)
        return str(error)
    target = f": {error.filename}" if error.filename is not None else ""
    kept = checkpoint is not None and Path(checkpoint).is_file()
    return f"{error.strerror}{target}" + (f" (the last checkpoint, {checkpoint}, is intact)" if kept else "")
