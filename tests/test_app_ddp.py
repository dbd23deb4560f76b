"""Data parallel training: two gloo processes on this machine."""

import os

import pytest
import torch
import torch.distributed as dist

from fused_rnn.app import data
from fused_rnn.app.models import SequenceModel
from fused_rnn.app.train import TrainConfig, train, train_step
from helpers import spawn_and_wait

TEXT = "one DDP step equals one step on the concatenated batch; (checked) 'here'.\n" * 20
VOCAB = data.Vocab.from_text(TEXT)
WORLD = 2


def _batch():
    chars = VOCAB.encode(TEXT[: 8 * 11]).view(8, 11)
    return chars[:, :-1], chars[:, 1:]


def _model():
    torch.manual_seed(0)
    return SequenceModel(VOCAB, embed_dim=8, hidden_size=16)


def _ddp_step(rank, port, result):
    # a TCP store, as torchrun's: with a file:// store the teardown aborted about once in
    # 15 runs ("terminate called without an active exception" in one rank, SIGABRT)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        inputs, targets = _batch()
        rows = inputs.shape[0] // WORLD  # rank r takes its consecutive rows of the batch
        train_step(ddp, optimizer, inputs[rank * rows:(rank + 1) * rows], targets[rank * rows:(rank + 1) * rows],
                   clip=1.0)
        torch.save(model.state_dict(), f"{result}.{rank}")
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def _ddp_train(rank, corpus, out, params, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a time budget spent after the first epoch: rank 0's clock must stop both ranks
    result = train(TrainConfig(model="stateful-lstm", text=corpus, hidden=16, seq_len=8, batch_size=4,
                               minutes=1e-6, sample_chars=10, out=out), progress=False, log=lambda *a: None)
    torch.save(result["model"].state_dict(), f"{params}.{rank}")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_one_ddp_step_equals_a_step_on_the_whole_batch(tmp_path):
    result = tmp_path / "params"
    spawn_and_wait(_ddp_step, (_free_port(), str(result)), WORLD, seconds=300)
    model = _model()
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.5), *_batch(), clip=1.0)
    expected = model.state_dict()
    before = _model().state_dict()
    for rank in range(WORLD):
        got = torch.load(f"{result}.{rank}", weights_only=True)
        for name, tensor in expected.items():
            # float32: the gradient is a sum over 8 rows either way, split 4 + 4 across
            # ranks and averaged by all-reduce, so only the summation order differs
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
    assert any(not torch.equal(expected[n], before[n]) for n in expected)  # the step did move the weights


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_train_command_runs_data_parallel(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 3)
    out, params = tmp_path / "run", tmp_path / "params"
    spawn_and_wait(_ddp_train, (str(corpus), str(out), str(params), _free_port()), WORLD, seconds=600)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["checkpoint.pt", "log.csv", "log.json", "loss.png"]   # written by rank 0 only, no leftovers
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1
    ranks = [torch.load(f"{params}.{r}", weights_only=True) for r in range(WORLD)]
    for name, tensor in ranks[0].items():
        # weights: all-reduced gradients; batch-norm buffers: DDP broadcasts rank 0's
        assert torch.equal(tensor, ranks[1][name]), name
        assert torch.equal(tensor, saved["model"][name]), name
