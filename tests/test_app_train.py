"""fused-rnn train / sample: resume, checkpoints, logs, errors."""

import json
import pickle

import pytest
import torch

from fused_rnn.app import checkpoint as ckpt
from fused_rnn.app import data
from fused_rnn.app.cli import main
from fused_rnn.app.models import build_model
from fused_rnn.app.train import TrainConfig, evaluate, train
from helpers import APP_TEXT, tiny_config


@pytest.mark.parametrize("model", ["stateful-lstm", "seq"])
def test_resume_gives_the_uninterrupted_run(corpus, tmp_path, model):
    """Two epochs straight against one epoch, then --resume for the second: the same
    losses and parameters bit for bit (dropout and shuffling included)."""
    quiet = dict(progress=False, log=lambda *a: None)
    straight = train(tiny_config(corpus, tmp_path / "a", model, epochs=2), **quiet)
    train(tiny_config(corpus, tmp_path / "b", model, epochs=1), **quiet)
    resumed = train(tiny_config(corpus, tmp_path / "b", model, epochs=2), resume=True, **quiet)
    assert len(straight["history"]) == len(resumed["history"]) == 2
    for a, b in zip(straight["history"], resumed["history"]):
        assert (a["train_loss"], a["val_loss"]) == (b["train_loss"], b["val_loss"])
    for (name, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        assert torch.equal(a, b), name
    first, second = straight["history"]
    assert second["train_loss"] < first["train_loss"]


def test_outputs_and_sample_command(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["train", "--model", "3char", "--text", str(corpus), "--epochs", "2", "--hidden", "16",
                   "--batch-size", "16", "--out", str(out), "--no-progress", "--sample-chars", "30"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "epoch 2: train loss" in printed and "--- sample" in printed
    for name in ("checkpoint.pt", "log.csv", "log.json", "loss.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp*"))
    log = json.loads((out / "log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["config"]["model"] == "3char"
    assert (out / "log.csv").read_text().splitlines()[0] == "epoch,train_loss,val_loss,seconds,chars_per_s"
    # checkpoints hold only plain data: they load with weights_only=True
    loaded = torch.load(out / "checkpoint.pt", weights_only=True)
    assert loaded["epoch"] == 2 and loaded["format"] == ckpt.FORMAT
    assert main(["sample", str(out / "checkpoint.pt"), "--seed", "def", "--chars", "40", "--random-seed", "1"]) == 0
    sampled = capsys.readouterr().out
    assert sampled.startswith("def") and len(sampled.rstrip("\n")) >= 40
    assert main(["sample", str(out / "checkpoint.pt"), "--seed", "deé", "--chars", "5"]) == 2
    assert "'é' at position 2 is not in the vocabulary" in capsys.readouterr().err


def test_bad_checkpoints_get_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="is not a readable fused_rnn checkpoint"):
        ckpt.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ValueError, match="not a fused_rnn character-model checkpoint"):
        ckpt.load_checkpoint(foreign)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump(print, f)  # a pickle that would call code: refused by weights_only
    with pytest.raises(ValueError, match="weights_only=True"):
        ckpt.load_checkpoint(evil)
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint({"config": {}, "vocab": "ab", "model": {}, "epoch": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"config": {}, "vocab": "ab", "model": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 1        # the previous checkpoint survives
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_bad_text_and_arguments(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--text", str(empty), "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "a language model needs at least 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--layers applies to the stateful models"):
        TrainConfig(model="seq", layers=3).resolved()
    with pytest.raises(ValueError, match="3char model reads 3 characters"):
        TrainConfig(model="3char", seq_len=5).resolved()
    assert TrainConfig().resolved().minutes == 4.0           # the default run is time-boxed
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_time_budget_stops_between_epochs(corpus, tmp_path):
    result = train(tiny_config(corpus, tmp_path / "t", minutes=1e-6), progress=False, log=lambda *a: None)
    assert len(result["history"]) == 1   # the first epoch always runs, then the budget is spent


def test_too_short_validation_fails_before_training(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(APP_TEXT[:9000])   # 900 validation characters: no batch of 64 streams of 65
    with pytest.raises(ValueError, match="too short"):
        train(TrainConfig(text=str(short), hidden=16, epochs=1, out=str(tmp_path / "o")), progress=False,
              log=lambda *a: None)
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_resume_refuses_conflicting_settings(corpus, tmp_path):
    quiet = dict(progress=False, log=lambda *a: None)
    train(tiny_config(corpus, tmp_path / "r", "seq", epochs=1), **quiet)
    with pytest.raises(ValueError, match=r"--lr 0.5 \(checkpoint: 0.002\)"):
        train(tiny_config(corpus, tmp_path / "r", "seq", epochs=2, lr=0.5), resume=True, **quiet)
    result = train(TrainConfig(out=str(tmp_path / "r"), epochs=2), resume=True, **quiet)  # defaults: fine
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_evaluate_restores_mode_and_state(corpus):
    vocab = data.Vocab.from_text(APP_TEXT)
    config = TrainConfig(model="stateful-lstm", seq_len=12, batch_size=8).resolved()
    model = build_model("stateful-lstm", vocab, hidden_size=16)
    model(vocab.encode(APP_TEXT[:8 * 12]).view(8, 12))
    carried = [tuple(t.clone() for t in layer) for layer in model.state]
    evaluate(model, config, vocab.encode(APP_TEXT[:3000]), "cpu")
    assert model.training
    assert all(torch.equal(a, b) for la, lb in zip(carried, model.state) for a, b in zip(la, lb))


def test_sample_reports_a_broken_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    ckpt.save_checkpoint({"config": {"model": "seq"}, "vocab": "ab", "model": {}, "epoch": 1}, bad)
    assert main(["sample", str(bad), "--seed", "ab"]) == 2
    assert "cannot be rebuilt" in capsys.readouterr().err


def test_resume_keeps_the_run_s_length_and_refuses_given_settings(corpus, tmp_path, capsys, monkeypatch):
    """--resume without --epochs / --minutes continues to the saved run's length (it
    fell back to the 4-minute default); a setting named on the command line that
    contradicts the checkpoint is refused even when it equals the default (it was
    dropped silently); a run already at its length says so; a fresh run never
    overwrites a run in --out; a run given a relative --text resumes from another
    folder (the config keeps the absolute path)."""
    (tmp_path / "corpus.txt").write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    common = ["--model", "seq", "--hidden", "8", "--batch-size", "16", "--out", str(out), "--no-progress",
              "--sample-chars", "5"]
    assert main(["train", "--text", "corpus.txt", "--epochs", "1", *common]) == 0
    assert main(["train", "--text", "corpus.txt", "--epochs", "1", *common]) == 2
    assert "already holds a run" in capsys.readouterr().err and (out / "checkpoint.pt").is_file()
    assert main(["train", "--resume", "--out", str(out), "--no-progress", "--hidden", "256"]) == 2
    assert "--hidden 256 (checkpoint: 8)" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train" in printed and "epoch 2" not in printed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", "--out", str(out), "--no-progress", "--epochs", "2"]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "log.json").read_text())["epochs"][-1]["epoch"] == 2


def test_resume_keeps_the_run_s_time_budget(corpus, tmp_path):
    """--minutes is the run's training time, its epochs' summed: a run whose budget is
    spent, resumed without a length, trains nothing more (it started the budget afresh)."""
    quiet = dict(progress=False, log=lambda *a: None)
    first = train(tiny_config(corpus, tmp_path / "m", "seq", minutes=1e-6), **quiet)
    assert len(first["history"]) == 1
    lines = []
    again = train(TrainConfig(out=str(tmp_path / "m")), resume=True, progress=False, log=lines.append)
    assert len(again["history"]) == 1 and any("nothing to train" in line for line in lines)


def test_train_checks_its_options_before_training(tmp_path, corpus, capsys):
    """--out that cannot be a folder, an unknown --device, a CUDA device on a machine
    without one, and infinite values fail at once, in one line naming the option."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [(["--out", str(blocker)], "--out"), (["--out", str(tmp_path / "o"), "--device", "foo"], "--device"),
             (["--out", str(tmp_path / "o"), "--lr", "inf"], "--lr"),
             (["--out", str(tmp_path / "o"), "--minutes", "inf"], "--minutes"),
             (["--out", str(tmp_path / "o"), "--seed", str(2 ** 70)], "--seed")]
    if not torch.cuda.is_available():
        cases.append((["--out", str(tmp_path / "o"), "--device", "cuda"], "no CUDA device"))
    for extra, named in cases:
        assert main(["train", "--model", "seq", "--text", str(corpus), "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_sample_names_its_options(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    train(tiny_config(corpus, out, "seq", epochs=1), progress=False, log=lambda *a: None)
    for extra, named in ((["--chars", "-5"], "--chars"), (["--temperature", "0"], "--temperature"),
                         (["--seed", ""], "--seed"), (["--random-seed", str(2 ** 70)], "--random-seed")):
        assert main(["sample", str(out / "checkpoint.pt"), *extra]) == 2, extra
        assert named in capsys.readouterr().err
    # a temperature far below the logits' spread samples the most likely character, not NaN
    assert main(["sample", str(out / "checkpoint.pt"), "--temperature", "1e-320", "--chars", "20"]) == 0


def test_only_rank_0_reports_an_interrupt(monkeypatch, capsys, tmp_path):
    """Under torchrun every rank stops on Ctrl-C; one line says so, rank 0's (each
    rank printed it)."""
    from fused_rnn.app import train as train_module

    def interrupted(*args, **kwargs):
        raise train_module.Interrupted(tmp_path / "checkpoint.pt", 0, 3)

    monkeypatch.setattr(train_module, "train", interrupted)
    for rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--out", str(tmp_path), "--no-progress"]) == 130
        assert ("interrupted; the run is saved" in capsys.readouterr().err) == says
