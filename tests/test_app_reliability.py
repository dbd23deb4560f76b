"""fused-rnn train survives interruptions: checkpoints inside an epoch that resume bit
for bit (also after SIGKILL), Ctrl-C and SIGTERM saving where the run is, stale
temporary files removed, and every failure of the command line one line on stderr
with a non-zero status while the last good checkpoint survives."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fused_rnn.app import checkpoint as ckpt
from fused_rnn.app.cli import main
from fused_rnn.app.train import Interrupted, StopFlag, train
from helpers import APP_TEXT, tiny_config

QUIET = dict(progress=False, log=lambda *a: None)


class StopAfter(StopFlag):
    """A stop request that arrives after `batches` looks (one per batch)."""

    def __init__(self, batches):
        super().__init__()
        self.left = batches

    @property
    def requested(self):
        self.left -= 1
        return self.left < 0

    @requested.setter
    def requested(self, value):
        pass


def _same_run(a, b):
    assert [(e["train_loss"], e["val_loss"]) for e in a["history"]] == \
        [(e["train_loss"], e["val_loss"]) for e in b["history"]]
    for (name, x), (_, y) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert torch.equal(x, y), name


def _one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("model", ["stateful-lstm", "seq"])
def test_an_interrupted_epoch_resumes_bit_for_bit(corpus, tmp_path, model):
    """Stopped inside the second epoch (the stateful model's carried state, the shuffled
    order, dropout's RNG, the running loss all mid-way) and resumed: the losses and
    weights of the run that was never stopped."""
    straight = train(tiny_config(corpus, tmp_path / "a", model, epochs=2), **QUIET)
    per_epoch = len(ckpt.load_checkpoint(tmp_path / "a" / "checkpoint.pt")["batch_losses"]) // 2
    with pytest.raises(Interrupted, match=f"epoch 2, after batch {per_epoch // 2}"):
        train(tiny_config(corpus, tmp_path / "b", model, epochs=2), stop=StopAfter(per_epoch + per_epoch // 2), **QUIET)
    saved = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.pt", for_resume=True)
    assert saved["epoch"] == 1 and saved["position"]["batch"] == per_epoch // 2
    assert (saved["position"]["state"] is not None) == (model == "stateful-lstm")
    resumed = train(tiny_config(corpus, tmp_path / "b", model, epochs=2), resume=True, **QUIET)
    _same_run(straight, resumed)


def test_checkpoints_inside_an_epoch_every_few_minutes(corpus, tmp_path, monkeypatch):
    """With --checkpoint-minutes the run writes checkpoints between batches (here a
    clock that advances a minute a look makes every batch due), each resumable."""
    from fused_rnn.app import train as train_module

    clock = [0.0]

    def tick():
        clock[0] += 60.0
        return clock[0]

    writes = []
    real_save = train_module.save_checkpoint
    monkeypatch.setattr(train_module.time, "monotonic", tick)
    monkeypatch.setattr(train_module, "save_checkpoint", lambda c, p: writes.append(c["position"]) or real_save(c, p))
    train(tiny_config(corpus, tmp_path / "c", epochs=1, checkpoint_minutes=1.5), **QUIET)
    inside = [w for w in writes if w is not None]
    assert len(inside) >= 3 and writes[-1] is None  # several inside the epoch, then the epoch's own
    assert [w["batch"] for w in inside] == sorted({w["batch"] for w in inside})


def _train_command(corpus, out, *extra):
    return [sys.executable, "-m", "fused_rnn.app.cli", "train", "--model", "stateful-lstm", "--text", str(corpus),
            "--hidden", "32", "--seq-len", "16", "--batch-size", "8", "--sample-chars", "10", "--epochs", "2",
            "--out", str(out), "--no-progress", *extra]


def _env():
    # one thread, as the in-process runs (bit for bit needs the same thread count)
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _wait_for_position(path, process, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before a checkpoint inside an epoch was written"
        if path.is_file():
            try:
                saved = ckpt.load_checkpoint(path, for_resume=True)
            except (ValueError, OSError):
                saved = None
            if saved is not None and saved.get("position") is not None and saved["epoch"] >= 1:
                return saved
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint inside the second epoch within {seconds} s")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(corpus, tmp_path, how):
    """`fused-rnn train` in a subprocess, checkpointing every 30 ms, is killed (SIGKILL,
    or Ctrl-C's SIGINT, which saves and exits with status 130) inside its second epoch,
    then resumed with --resume: its final weights and losses equal those of a run that
    was never interrupted. A killed write's temporary file is removed on resume."""
    big = tmp_path / "big.txt"
    big.write_text(APP_TEXT * 3, encoding="utf-8")
    straight_out, killed_out = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_train_command(big, straight_out), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    process = subprocess.Popen(_train_command(big, killed_out, "--checkpoint-minutes", "0.0005"), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_position(killed_out / "checkpoint.pt", process)
        process.send_signal(getattr(signal, how))
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)
    if how == "SIGINT":
        assert process.returncode == 130, err
        assert "interrupted; the run is saved in" in _one_line(err)
    else:
        assert process.returncode == -signal.SIGKILL
    stale = killed_out / f".checkpoint.pt.tmp-{process.pid}"
    stale.write_bytes(b"half a checkpoint")  # as a write killed before its rename leaves it
    resumed = subprocess.run(_train_command(big, killed_out, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"removed {stale}" in resumed.stdout and not stale.exists()
    a = ckpt.load_checkpoint(straight_out / "checkpoint.pt", for_resume=True)
    b = ckpt.load_checkpoint(killed_out / "checkpoint.pt", for_resume=True)
    assert [(e["train_loss"], e["val_loss"]) for e in a["history"]] == \
        [(e["train_loss"], e["val_loss"]) for e in b["history"]]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_a_full_disk_keeps_the_last_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    """The second epoch's checkpoint hits a full disk: one line naming the file and a
    non-zero status; the first epoch's checkpoint loads and nothing temporary is left."""
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def save(obj, f):
        calls.append(1)
        if obj.get("epoch") == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    status = main(["train", "--model", "seq", "--text", str(corpus), "--epochs", "2", "--hidden", "16",
                   "--batch-size", "16", "--out", str(out), "--no-progress", "--checkpoint-minutes", "0"])
    assert status == 2
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "checkpoint.pt" in line
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not list(out.glob(".*tmp*"))


def test_permission_denied_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def deny(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(ckpt.os, "replace", deny)
    status = main(["train", "--model", "seq", "--text", str(corpus), "--epochs", "1", "--hidden", "16",
                   "--out", str(out), "--no-progress"])
    assert status == 2
    line = _one_line(capsys.readouterr().err)
    assert "Permission denied" in line and "checkpoint.pt" in line


def test_command_line_failures_are_one_line(corpus, tmp_path, capsys):
    """A folder as --text; a checkpoint that loads but does not fit the model its config
    describes; a truncated checkpoint, to --resume and to sample; a folder to sample."""
    assert main(["train", "--text", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "is a folder, not a text file" in _one_line(capsys.readouterr().err)

    out = tmp_path / "run"
    assert main(["train", "--model", "seq", "--text", str(corpus), "--epochs", "1", "--hidden", "16",
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    path = out / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    good = path.read_bytes()
    saved["model"] = {k: v[..., :-1] if v.dim() else v for k, v in saved["model"].items()}  # not the config's shapes
    torch.save(saved, path)
    assert main(["train", "--text", str(corpus), "--resume", "--out", str(out), "--no-progress"]) == 2
    assert "does not fit the model" in _one_line(capsys.readouterr().err)
    assert main(["sample", str(path)]) == 2
    assert "cannot be rebuilt" in _one_line(capsys.readouterr().err)

    path.write_bytes(good[: len(good) // 2])
    assert main(["train", "--text", str(corpus), "--resume", "--out", str(out), "--no-progress"]) == 2
    assert "not a readable fused_rnn checkpoint" in _one_line(capsys.readouterr().err)
    assert main(["sample", str(path)]) == 2
    assert "not a readable fused_rnn checkpoint" in _one_line(capsys.readouterr().err)
    assert main(["sample", str(out)]) == 2
    assert "is a folder, not a checkpoint file" in _one_line(capsys.readouterr().err)


def test_stale_temporaries_of_dead_processes_only_are_removed(tmp_path):
    from fused_rnn.app.train import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".checkpoint.pt.tmp-{dead_pid}"
    live = tmp_path / f".log.csv.tmp-{os.getpid()}"
    other = tmp_path / "notes.tmp-1"
    for path in (stale, live, other):
        path.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and other.exists() and not stale.exists()
