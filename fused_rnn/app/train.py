"""``fused-rnn train``: train a character-level language model on the fused kernels.

    fused-rnn train                      # the default: stateful 2-layer LSTM on the
                                         # standard library's source, about 4 minutes
    fused-rnn train --model seq --text nietzsche.txt --epochs 10 --out runs/seq
    fused-rnn train --out runs/seq --resume --epochs 20
    torchrun --nproc_per_node=2 -m fused_rnn train ...   # data parallel (gloo / nccl)

Every epoch: a progress bar (loss, characters/s), the validation loss, a sample of
generated text, and a checkpoint (``OUT/checkpoint.pt``, written atomically) plus the
logs ``OUT/log.csv`` and ``OUT/log.json``; at the end a plot of the losses,
``OUT/loss.png`` (needs matplotlib). Inside an epoch a checkpoint is also written every
``--checkpoint-minutes`` (5 by default) and on Ctrl-C or SIGTERM (exit status 130), so
a kill loses at most that much work. ``--resume`` continues from the checkpoint, at the
end of an epoch or inside one, and gives the same losses as a run that was never
interrupted (bit for bit on CPU with the same thread count): batches are drawn from
(seed, epoch) alone, and the position in the epoch, the stateful models' carried state
and the RNG state are saved with the model. Temporary files of a write that was killed
are removed at the next start.
"""

import argparse
import csv
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import distributed as dist
from torch.nn import functional as F

from . import data
from .checkpoint import describe_os_error, load_checkpoint, one_line, save_checkpoint, write_atomic
from .models import MODEL_NAMES, StatefulModel, build_model

DEFAULT_MINUTES = 4.0
# Input characters per example when --seq-len is not given: the lesson's 3 and 8
# (n = 9) for the window models, 64 for the stateful model's truncated BPTT.
DEFAULT_SEQ_LEN = {"3char": 3, "nchar": 8, "seq": 8, "onehot": 8, "stateful-lstm": 64, "stateful-irnn": 64}


@dataclass
class TrainConfig:
    model: str = "stateful-lstm"
    text: Optional[str] = None       # None: the standard library's source (data.default_corpus)
    max_chars: int = data.DEFAULT_CORPUS_CHARS
    epochs: Optional[int] = None     # None: as many as --minutes allows
    minutes: Optional[float] = None
    hidden: int = 256
    layers: Optional[int] = None     # None: 2 for the stateful models, else 1
    seq_len: Optional[int] = None    # None: DEFAULT_SEQ_LEN[model]
    batch_size: int = 64
    lr: float = 2e-3
    clip: float = 1.0                # max gradient norm; 0 turns clipping off
    dropout: float = 0.1
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    val_fraction: float = 0.1
    sample_chars: int = 300
    temperature: float = 0.8
    out: str = "runs/char-rnn"
    checkpoint_minutes: float = 5.0  # also checkpoint inside an epoch this often (0: at epoch ends only)

    def resolved(self) -> "TrainConfig":
        """Defaults filled in and values checked."""
        if self.model not in MODEL_NAMES:
            raise ValueError(f"--model must be one of {MODEL_NAMES}, got {self.model!r}")
        seq_len = DEFAULT_SEQ_LEN[self.model] if self.seq_len is None else self.seq_len
        if self.model == "3char" and seq_len != 3:
            raise ValueError(f"the 3char model reads 3 characters; --seq-len {seq_len} does not apply "
                             "(use --model nchar)")
        layers = self.layers if self.layers is not None else (2 if is_stateful(self.model) else 1)
        if not is_stateful(self.model) and layers != 1:
            raise ValueError(f"--layers applies to the stateful models; {self.model} is one IRNN layer")
        epochs, minutes = self.epochs, self.minutes
        if epochs is None and minutes is None:
            minutes = DEFAULT_MINUTES
        for name, value, ok in (("--epochs", epochs, epochs is None or epochs >= 1),
                                ("--minutes", minutes, minutes is None or 0 < minutes < math.inf),
                                ("--hidden", self.hidden, self.hidden >= 1),
                                ("--layers", layers, layers >= 1),
                                ("--seq-len", seq_len, seq_len >= 1),
                                ("--batch-size", self.batch_size, self.batch_size >= 1),
                                ("--lr", self.lr, 0 < self.lr < math.inf),
                                ("--clip", self.clip, 0 <= self.clip < math.inf),
                                ("--dropout", self.dropout, 0 <= self.dropout < 1),
                                ("--temperature", self.temperature, self.temperature > 0),
                                ("--sample-chars", self.sample_chars, self.sample_chars >= 0),
                                ("--checkpoint-minutes", self.checkpoint_minutes, self.checkpoint_minutes >= 0),
                                ("--max-chars", self.max_chars, self.max_chars >= 2),
                                # torch.manual_seed's range
                                ("--seed", self.seed, -2 ** 63 <= self.seed < 2 ** 64 - 2 ** 20)):
            if not ok:
                raise ValueError(f"{name}: invalid value {value!r}")
        _check_device(self.device)
        values = asdict(self)
        # the corpus by its absolute path: a resumed run finds it from any working folder
        text = os.path.abspath(self.text) if self.text else None
        values.update(seq_len=seq_len, layers=layers, epochs=epochs, minutes=minutes, text=text)
        return TrainConfig(**values)


def _check_device(name: str) -> None:
    """--device names a device torch knows, and for CUDA one this machine has."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device: {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# ---- one step, shared by the trainer and the data-parallel test ----

def loss_of(model, inputs, targets):
    """Mean sparse cross-entropy of the model's logits against integer targets."""
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_step(model, optimizer, inputs, targets, clip: float):
    """One optimiser step on one batch; returns the loss (a detached tensor)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_of(model, inputs, targets)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.detach()


def is_stateful(name: str) -> bool:
    return name.startswith("stateful")


def batches(config: TrainConfig, encoded: torch.Tensor, *, shuffle: bool, epoch: int, rank: int = 0,
            world_size: int = 1):
    """(inputs, targets) pairs of one epoch for config.model (see fused_rnn.app.data)."""
    if is_stateful(config.model):
        return list(data.stream_batches(encoded, config.seq_len, config.batch_size, rank=rank,
                                        world_size=world_size))
    windows = data.window_batches(encoded, config.seq_len + 1, config.batch_size, shuffle=shuffle,
                                  seed=config.seed, epoch=epoch, rank=rank, world_size=world_size)
    last_only = config.model in ("nchar", "3char")

    def pair(k):
        window = windows[k]
        return window[:, :-1], (window[:, -1] if last_only else window[:, 1:])

    return data.LazyBatches(len(windows), pair)


@torch.no_grad()
def evaluate(model, config: TrainConfig, encoded: torch.Tensor, device) -> float:
    """Mean validation loss per character (stateful models read the text in streams
    from a fresh state). The model's mode and carried state are restored afterwards."""
    was_training = model.training
    saved_state = getattr(model, "state", None)
    model.eval()
    if isinstance(model, StatefulModel):
        model.reset_state()
    total, count = 0.0, 0
    try:
        for inputs, targets in batches(config, encoded, shuffle=False, epoch=0):
            loss = loss_of(model, inputs.to(device, torch.int64), targets.to(device, torch.int64))
            total += float(loss) * targets.numel()
            count += targets.numel()
    finally:
        model.train(was_training)
        if isinstance(model, StatefulModel):
            model.state = saved_state
    return total / count


# ---- the training run ----

class _Distributed:
    """Rank and world size; initialises torch.distributed under torchrun. Decisions
    that end or stop the loop are made collectively, so no rank is left waiting in a
    collective that the others have abandoned."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.started = False
        self.cuda = device.startswith("cuda")
        if self.world_size > 1 and not dist.is_initialized():
            if self.cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if self.cuda else "gloo")
            self.started = True
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.main = self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def _tensor(self, value: float) -> torch.Tensor:
        return torch.tensor([value], dtype=torch.float64, device="cuda" if self.cuda else "cpu")

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks."""
        if not self.active:
            return value
        tensor = self._tensor(value)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def rank0_says(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        if not self.active:
            return flag
        tensor = self._tensor(float(flag))
        dist.broadcast(tensor, 0)
        return bool(tensor)

    def close(self, finished: bool = False) -> None:
        """Leave the process group. After a finished run, wait for every rank first: rank
        0 hosts the group's store, and a rank still tearing down after rank 0 has exited
        aborted (seen as "terminate called without an active exception" in a gloo
        worker). After an error no barrier: the other ranks may never reach it."""
        if self.started:
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _load_corpus(config: TrainConfig) -> str:
    return data.load_text(config.text) if config.text else data.default_corpus(config.max_chars)


def _write_logs(out: Path, config: TrainConfig, history: List[Dict]) -> None:
    buffer = io.StringIO()
    columns = ["epoch", "train_loss", "val_loss", "seconds", "chars_per_s"]
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_atomic(out / "log.csv", buffer.getvalue())
    write_atomic(out / "log.json", json.dumps({"config": asdict(config), "epochs": history}, indent=2))


def plot_losses(out: Path, history: List[Dict], batch_losses: List[float]) -> Optional[Path]:
    """Writes OUT/loss.png (training loss per batch, validation loss per epoch);
    returns None, with a message, when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print("loss plot skipped: matplotlib is not installed (pip install matplotlib); "
              f"the losses are in {out / 'log.csv'}", file=sys.stderr)
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    if batch_losses and history:
        per_epoch = len(batch_losses) / len(history)
        axes.plot([(k + 1) / per_epoch for k in range(len(batch_losses))], batch_losses, lw=0.6, alpha=0.6,
                  label="training (per batch)")
    axes.plot([h["epoch"] for h in history], [h["val_loss"] for h in history], "o-", label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("cross-entropy (nats per character)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = out / "loss.png"
    tmp = out / f".loss.png.tmp-{os.getpid()}.png"  # remove_stale_temporaries' pattern; savefig wants .png
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)
    return path


# what --resume takes from the command line rather than from the checkpoint: where and how
# this process runs (from the command line, defaults included), and the run's length and
# corpus when given there (else the saved ones; the corpus's digest, saved with the run, must
# match)
_RESUME_RUNNING = ("out", "backend", "device", "checkpoint_minutes")
_RESUME_OVERRIDES = _RESUME_RUNNING + ("epochs", "minutes", "text")


def _resumed_config(config: TrainConfig, saved_values: Dict, given: Optional[set] = None) -> TrainConfig:
    """The saved run's config with _RESUME_RUNNING taken from `config`, and the run's
    length (--epochs or --minutes) and corpus too where `given` (the names of the settings
    on the command line). Any other setting given that contradicts the checkpoint is an
    error, not silently dropped. `given` None: those that differ from their defaults (a
    caller of train() without a command line)."""
    names = {f.name for f in fields(TrainConfig)}
    if not isinstance(saved_values, dict):
        raise ValueError(f"the checkpoint's config is not a mapping of settings (found {type(saved_values).__name__})")
    saved = TrainConfig(**{k: v for k, v in saved_values.items() if k in names})
    defaults = TrainConfig()
    if given is None:
        given = {f for f in names if getattr(config, f) != getattr(defaults, f)}
    conflicts = [f"--{f.replace('_', '-')} {getattr(config, f)!r} (checkpoint: {getattr(saved, f)!r})"
                 for f in sorted((names - set(_RESUME_OVERRIDES)) & set(given))
                 if getattr(config, f) != getattr(saved, f)]
    if conflicts:
        raise ValueError("--resume continues the saved run with its own settings; these differ: "
                         + "; ".join(conflicts))
    taken = {k for k in _RESUME_OVERRIDES if k in given} | set(_RESUME_RUNNING)
    if taken & {"epochs", "minutes"}:
        taken |= {"epochs", "minutes"}  # the one given replaces the saved length, the other None
    return TrainConfig(**dict(asdict(saved), **{k: getattr(config, k) for k in taken})).resolved()


class Interrupted(Exception):
    """Training stopped on request (SIGINT, SIGTERM) after saving where it was."""

    def __init__(self, checkpoint: Path, epoch: int, batch: int):
        if batch < 0 and epoch < 0:
            super().__init__("interrupted in the first epoch of a data-parallel run: nothing was saved")
        else:
            where = f"epoch {epoch + 1}, after batch {batch}" if batch >= 0 else f"the end of epoch {epoch + 1}"
            super().__init__(f"interrupted; the run is saved in {checkpoint} as of {where}: continue it with --resume")
        self.checkpoint = checkpoint


class StopFlag:
    """Set by a signal handler (run_command's); the training loop looks at it between
    batches, so a stop never lands inside an optimiser step."""

    def __init__(self):
        self.requested = False

    def request(self, *_):
        self.requested = True


def remove_stale_temporaries(out: Path) -> List[Path]:
    """Deletes the temporary files (``.NAME.tmp-PID``) that a write killed before its
    rename left in `out`, those of processes no longer running. Returns them."""
    removed = []
    for path in out.glob(".*.tmp-*") if out.is_dir() else ():
        pid = path.name.rsplit("-", 1)[-1].split(".")[0]  # .NAME.tmp-PID, or .NAME.tmp-PID.png
        if not pid.isdigit() or _running(int(pid)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _rng_state() -> Dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, log=print,
          stop: Optional[StopFlag] = None, given: Optional[set] = None) -> Dict:
    """Runs a training (or resumes one from ``config.out``) and returns
    ``{"history": [...per epoch...], "model": the model, "checkpoint": path}``.

    Checkpoints are written at the end of every epoch and, every
    ``config.checkpoint_minutes``, between batches (one process only: a data-parallel
    run checkpoints at epoch ends); a checkpoint inside an epoch holds the position in
    it, the stateful models' carried state, the running totals and every RNG state, so
    that ``resume`` continues bit for bit on the CPU. When `stop` is set (by a signal
    handler), the run saves where it is after the batch under way and raises
    Interrupted. `given`: the settings named on the command line (see _resumed_config).
    Without `resume`, an existing run in ``config.out`` is an error, never overwritten."""
    requested, config = config, config.resolved()
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    ddp = _Distributed(config.device)
    device = torch.device(config.device)
    if device.type == "cuda" and ddp.world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    start_time = time.monotonic()
    finished = False
    try:
        history: List[Dict] = []
        batch_losses: List[float] = []
        checkpoint = None
        if ddp.main:
            for path in remove_stale_temporaries(out):
                log(f"removed {path}, left by an interrupted write")
        if resume:
            checkpoint = load_checkpoint(checkpoint_path, for_resume=True)
            config = _resumed_config(requested, checkpoint["config"], given)
            history, batch_losses = list(checkpoint.get("history", [])), list(checkpoint.get("batch_losses", []))
            if config.text and not os.path.exists(config.text) and "text" not in (given or ()):
                raise ValueError(f"the run's corpus {config.text} is not there (a checkpoint that kept a relative "
                                 "path, resumed from another folder?): pass --text")
        elif checkpoint_path.exists():
            raise ValueError(f"--out {out} already holds a run ({checkpoint_path}): continue it with --resume, "
                             "or train into another --out")
        if ddp.main:
            _make_folder(out)
        text = _load_corpus(config)
        digest = data.text_digest(text)
        if checkpoint is not None and checkpoint.get("text_digest") != digest:
            raise ValueError(f"{checkpoint_path} was trained on another text (the corpus changed since): "
                             "cannot resume; train afresh with another --out")
        vocab = data.Vocab.from_text(text)
        # the corpus encoded once, compactly (uint8 for up to 256 characters), and cut
        # without copying: the text and its encoding are all the memory it takes
        cut = data.split_point(len(text), config.val_fraction)
        encoded = vocab.encode(text, compact=True)
        train_data, val_data = encoded[:cut], encoded[cut:]
        train_chars, val_chars = cut, len(text) - cut

        torch.manual_seed(config.seed)
        model = build_model(config.model, vocab, hidden_size=config.hidden, num_layers=config.layers,
                            context=config.seq_len, dropout=config.dropout, backend=config.backend).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        # what the end of every epoch needs, checked before the first one trains
        batches(config, val_data, shuffle=False, epoch=0)  # raises if the validation text is too short
        if val_chars < model.min_seed_length():
            raise ValueError(f"the validation text ({val_chars} characters) is shorter than the "
                             f"{model.min_seed_length()} characters a sample starts from")
        seed_text = text[cut:cut + max(model.min_seed_length(), 40)]
        del text  # from here on the encoding is the corpus
        start_epoch, position = 0, None
        if checkpoint is not None:
            try:
                model.load_state_dict(checkpoint["model"])
                optimizer.load_state_dict(checkpoint["optimizer"])
            except (RuntimeError, ValueError, KeyError) as error:
                raise ValueError(f"{checkpoint_path} does not fit the model its config describes "
                                 f"({type(error).__name__}: {one_line(error)})") from None
            _set_rng_state(checkpoint["rng"])
            start_epoch, position = checkpoint["epoch"], checkpoint.get("position")

        def snapshot(epoch_done: int, where: Optional[Dict]) -> None:
            save_checkpoint({"config": asdict(config), "vocab": vocab.chars, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "epoch": epoch_done, "position": where,
                             "history": history, "batch_losses": batch_losses, "rng": _rng_state(),
                             "text_digest": digest}, checkpoint_path)
        trained = model
        if ddp.world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if ddp.main:
            log(f"fused-rnn train: {config.model}, {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"{len(vocab)}-character vocabulary, {train_chars:,} training / {val_chars:,} "
                f"validation characters{'' if config.text else ' (the Python standard library source)'}, "
                f"backend {config.backend}, {ddp.world_size} process(es)"
                + (f"; resuming after epoch {start_epoch}" if checkpoint is not None else ""))

        epoch, last_seconds = start_epoch, (history[-1]["seconds"] if history else 0.0)
        # --minutes is the run's training time: a resumed run has spent its epochs' already
        start_time -= sum(h["seconds"] for h in history) + (position["seconds"] if position is not None else 0.0)
        ran_epoch = False
        while config.epochs is None or epoch < config.epochs:
            # --minutes: another whole epoch only if, at the last one's pace, it ends in
            # time (a new run trains at least one, a resumed one finishes the epoch it was
            # saved in); rank 0's clock decides for all ranks
            if config.minutes is not None and (epoch > start_epoch or (checkpoint is not None and position is None)):
                late = time.monotonic() - start_time + last_seconds > config.minutes * 60
                if ddp.rank0_says(late):
                    break
            ran_epoch = True
            epoch_batches = batches(config, train_data, shuffle=True, epoch=epoch, rank=ddp.rank,
                                    world_size=ddp.world_size)
            if isinstance(model, StatefulModel):
                model.reset_state()
            model.train()
            began = time.monotonic()
            total, counted, chars, done = 0.0, 0, 0, 0
            if position is not None:  # resuming inside this epoch, after `done` batches
                done, total = position["batch"], position["total"]
                counted, chars = position["counted"], position["chars"]
                began -= position["seconds"]
                if isinstance(model, StatefulModel) and position.get("state") is not None:
                    model.state = [tuple(t.to(device) for t in layer) for layer in position["state"]]
                position = None
            total_label = "?" if config.epochs is None else str(config.epochs)
            bar = _progress(len(epoch_batches), f"epoch {epoch + 1}/{total_label}", progress and ddp.main)
            if bar is not None and done:
                bar.update(done)
            saved_at = time.monotonic()
            for k, (inputs, targets) in enumerate(epoch_batches):
                if k < done:
                    continue
                stopping = stop is not None and stop.requested
                if ddp.world_size == 1 and (stopping or config.checkpoint_minutes > 0
                                            and time.monotonic() - saved_at >= config.checkpoint_minutes * 60):
                    carried = getattr(model, "state", None)
                    snapshot(epoch, {"batch": k, "total": total, "counted": counted, "chars": chars,
                                     "seconds": time.monotonic() - began,
                                     "state": None if carried is None else [tuple(t.cpu() for t in layer)
                                                                            for layer in carried]})
                    saved_at = time.monotonic()
                if stopping:
                    if bar is not None:
                        bar.close()
                    if ddp.world_size > 1:  # each rank stops; the last epoch's checkpoint stands
                        raise Interrupted(checkpoint_path, epoch - 1, -1)
                    raise Interrupted(checkpoint_path, epoch, k)
                loss = float(train_step(trained, optimizer, inputs.to(device, torch.int64),
                                        targets.to(device, torch.int64), config.clip))
                loss = ddp.mean(loss)  # every rank sees the same value, and stops together on a NaN
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the training loss became {loss} in epoch {epoch + 1}, batch {k + 1}: "
                                             "lower --lr or keep --clip on")
                total += loss * targets.numel()
                counted += targets.numel()
                chars += inputs.numel() * ddp.world_size
                batch_losses.append(loss)
                if bar is not None:
                    bar.set_postfix(loss=f"{total / counted:.3f}",
                                    chars_per_s=f"{chars / max(time.monotonic() - began, 1e-9):,.0f}")
                    bar.update()
            if bar is not None:
                bar.close()
            last_seconds = time.monotonic() - began
            epoch += 1
            failure = None
            if ddp.main:
                try:
                    val_loss = evaluate(model, config, val_data, device)
                    record = {"epoch": epoch, "train_loss": total / counted, "val_loss": val_loss,
                              "seconds": round(last_seconds, 3), "chars_per_s": round(chars / last_seconds)}
                    history.append(record)
                    snapshot(epoch, None)  # saved before the sample, which cannot then lose the epoch
                    _write_logs(out, config, history)
                    log(f"epoch {epoch}: train loss {record['train_loss']:.4f}, validation loss {val_loss:.4f}, "
                        f"{record['chars_per_s']:,} chars/s")
                    generator = torch.Generator().manual_seed(config.seed + epoch)
                    sample = model.generate(seed_text, config.sample_chars, config.temperature, generator=generator)
                    log(f"--- sample (temperature {config.temperature}) ---\n{seed_text}{sample}\n---")
                except Exception as error:  # re-raised below, after telling the other ranks
                    failure = error
            if ddp.rank0_says(failure is not None):
                if failure is not None:
                    raise failure
                raise RuntimeError(f"rank 0 failed at the end of epoch {epoch}; see its error")
        if ddp.main and checkpoint is not None and not ran_epoch:
            length = f"--epochs {config.epochs}" if config.epochs is not None else f"--minutes {config.minutes:g}"
            log(f"nothing to train: the run in {out} has {start_epoch} epoch(s) already, its length ({length}) "
                "is reached; pass a larger one to continue it")
        if ddp.main and history:
            plot = plot_losses(out, history, batch_losses)
            log(f"checkpoint: {checkpoint_path}; logs: {out / 'log.csv'}" + (f"; plot: {plot}" if plot else ""))
        finished = True
        return {"history": history, "model": model, "checkpoint": checkpoint_path}
    finally:
        ddp.close(finished)


def _make_folder(out: Path) -> None:
    """Creates --out before any training, so that a path that cannot hold the run fails
    at once, not after an epoch."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create the folder ({error.strerror or error})") from None


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=True, dynamic_ncols=True)


# ---- command line ----

def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--model", choices=MODEL_NAMES, default=None,
                        help=f"which model of the char-RNN lesson (default: {defaults.model})")
    parser.add_argument("--text", help="a UTF-8 text file (default: the Python standard library source)")
    parser.add_argument("--max-chars", type=int, default=None,
                        help=f"size of the default corpus in characters (default: {defaults.max_chars})")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="number of epochs")
    length.add_argument("--minutes", type=float,
                        help=f"train whole epochs while they fit in this many minutes (default without --epochs: "
                             f"{DEFAULT_MINUTES:g})")
    parser.add_argument("--hidden", type=int, default=None, help=f"hidden units (default: {defaults.hidden})")
    parser.add_argument("--layers", type=int, help="recurrent layers of the stateful models (default: 2)")
    parser.add_argument("--seq-len", type=int, help="input characters per example / per truncated-BPTT chunk "
                                                    "(default: 3 for 3char, 8 for nchar/seq/onehot, 64 stateful)")
    parser.add_argument("--batch-size", type=int, default=None, help=f"(default: {defaults.batch_size})")
    parser.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default: {defaults.lr})")
    parser.add_argument("--clip", type=float, default=None,
                        help=f"max gradient norm, 0 for none (default: {defaults.clip})")
    parser.add_argument("--dropout", type=float, default=None,
                        help=f"input, recurrent and output dropout of the stateful models "
                             f"(default: {defaults.dropout})")
    parser.add_argument("--backend", choices=("auto", "cpp", "triton", "cuda", "torch"), default=None,
                        help=f"kernel backend (default: {defaults.backend})")
    parser.add_argument("--device", default=None, help=f"cpu or cuda (default: {defaults.device})")
    parser.add_argument("--seed", type=int, default=None, help=f"random seed (default: {defaults.seed})")
    parser.add_argument("--sample-chars", type=int, default=None,
                        help=f"characters generated after each epoch (default: {defaults.sample_chars})")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"sampling temperature (default: {defaults.temperature})")
    parser.add_argument("--out", default=None, help=f"folder for checkpoint and logs (default: {defaults.out})")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in --out: settings not given come from the checkpoint, not "
                             "the defaults above (but --backend, --device and --checkpoint-minutes, this process's "
                             "own); those given must agree with the checkpoint's, but --epochs/--minutes and --text")
    parser.add_argument("--checkpoint-minutes", type=float, default=None,
                        help="also checkpoint between batches this often, so that a kill loses at most this much "
                             f"work; 0 for epoch ends only (default: {defaults.checkpoint_minutes})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_command(args: argparse.Namespace, command: str = "") -> int:
    """`fused-rnn train`: every failure is one line on stderr and a non-zero status;
    SIGINT and SIGTERM save the run where it is (exit status 130)."""
    names = {f.name for f in fields(TrainConfig)}
    # the options default to None, so that those given (which --resume must not ignore) are known
    given = {k for k, v in vars(args).items() if k in names and v is not None}
    config = TrainConfig(**{k: getattr(args, k) for k in given})
    stop = StopFlag()
    previous = {}
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            try:
                previous[name] = signal.signal(getattr(signal, name), stop.request)
            except ValueError:  # not the main thread: no handlers, Ctrl-C stays an exception
                pass
    try:
        train(config, resume=args.resume, progress=not args.no_progress, stop=stop, given=given)
    except Interrupted as interrupted:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank stops; rank 0 says so
            print(f"fused-rnn train: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print("fused-rnn train: interrupted before training began; nothing was saved", file=sys.stderr)
        return 130
    except (ValueError, FloatingPointError) as error:
        print(f"fused-rnn train: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permission denied, a folder where a file belongs, ...
        print(f"fused-rnn train: error: {describe_os_error(error, Path(config.out) / 'checkpoint.pt')}",
              file=sys.stderr)
        return 2
    except Exception as error:  # anything else (out of memory, a kernel's error): one line, not a traceback
        print(f"fused-rnn train: error: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 1
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    return 0
