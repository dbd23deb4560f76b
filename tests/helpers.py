"""What the backend tests share: the per-dtype tolerances, the standard shapes, layers
drawn for the NumPy reference, and the checks of one backend against it (layers,
cells, the per-sequence options), which the CPU, CUDA and Triton tests all run."""

import numpy as np
import torch

import fused_rnn
import rnn_reference as ref

# Tolerances, as |got - want| <= atol * max(1, max|want|) + rtol * |want|:
# - float64: the backends and the reference do the same arithmetic in another order;
#   rounding differences of ~1e-16 grow by at most the condition of a <= 63-step chain,
#   measured below 1e-12, so 1e-9 leaves a wide margin and still catches any wrong term.
# - float32: eps = 6e-8; a T-step chain of GEMMs over K <= 64 terms accumulates about
#   sqrt(K * T) * eps ~ 4e-6 relative error (measured: under 2e-6 on these shapes), so
#   1e-4 is a 25x margin, far below the O(1) error of any indexing or gate-order bug.
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4)}

SHAPES = [  # (T, B, I, H)
    (1, 1, 3, 5),
    (63, 4, 7, 37),
    (5, 1, 4, 6),
    (20, 8, 16, 32),
    (9, 20, 7, 13),  # B >= 16: the CPU backward folds dx into each step
    # row counts that leave 3 and 2 rows after the AVX2 GEMM's 4-row tiles, and more
    # rows than its 64-row block; H = 30 / 26 leave partial 24-column panels
    (4, 7, 5, 30),
    (3, 70, 5, 26),
]


def assert_matches(name, got, want, dtype):
    atol, rtol = TOLERANCES[dtype]
    got = got.detach().double().numpy()
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(got - want)
    bound = atol * scale + rtol * np.abs(want)
    worst = float((err - bound).max(initial=-1.0))
    assert worst <= 0, f"{name}: max error {err.max():.3e} exceeds tolerance (scale {scale:.3g})"


def make_layer(cell, steps, batch, inputs, hidden, bias, seed):
    """Weights that keep the activations O(1) over the sequence (float64 NumPy)."""
    rng = np.random.default_rng(seed)
    gates = 1 if cell == "irnn" else 4
    x = rng.normal(0.0, 0.5, (steps, batch, inputs))
    if cell == "irnn":
        # a contracting perturbed identity, so the ReLU RNN neither dies nor explodes
        w_hh = 0.9 * np.eye(hidden) + rng.normal(0.0, 0.3 / np.sqrt(hidden), (hidden, hidden))
    else:
        w_hh = rng.uniform(-1, 1, (4 * hidden, hidden)) / np.sqrt(hidden)
    w_ih = rng.normal(0.0, 1.0 / np.sqrt(inputs), (gates * hidden, inputs))
    b_ih = rng.normal(0.0, 0.1, gates * hidden) if bias else None
    b_hh = rng.normal(0.0, 0.1, gates * hidden) if bias else None
    states = [rng.normal(0.0, 0.5, (batch, hidden)) for _ in range(1 if cell == "irnn" else 2)]
    upstream = {
        "y": rng.normal(size=(steps, batch, hidden)),
        "h": rng.normal(size=(batch, hidden)),
        "c": rng.normal(size=(batch, hidden)),
    }
    return x, states, w_ih, w_hh, b_ih, b_hh, upstream


def to_torch(array, dtype, device="cpu"):
    return None if array is None else torch.tensor(array, dtype=dtype, device=device, requires_grad=True)


def check_layer_against_reference(cell, shape, bias, dtype, backend, device="cpu"):
    """One layer of `backend` on `device` (functional API, autograd) against the NumPy
    reference: outputs, final states and every gradient."""
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, *shape, bias=bias, seed=sum(shape))
    tx, tw_ih, tw_hh, tb_ih, tb_hh = (to_torch(a, dtype, device) for a in (x, w_ih, w_hh, b_ih, b_hh))
    tstates = [to_torch(s, dtype, device) for s in states]
    if cell == "irnn":
        y, h_n = fused_rnn.irnn(tx, tstates[0], tw_ih, tw_hh, tb_ih, tb_hh, backend=backend)
        outputs, upstream = (y, h_n), (up["y"], up["h"])
        want_y, want_h, cache = ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh)
        want_out = {"y": want_y, "h_T": want_h}
        want_grads = ref.irnn_backward(up["y"], up["h"], cache)
        grad_names = {"dx": tx, "dh0": tstates[0]}
    else:
        y, (h_n, c_n) = fused_rnn.lstm(tx, tuple(tstates), tw_ih, tw_hh, tb_ih, tb_hh, backend=backend)
        outputs, upstream = (y, h_n, c_n), (up["y"], up["h"], up["c"])
        want_y, want_h, want_c, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        want_out = {"y": want_y, "h_T": want_h, "c_T": want_c}
        want_grads = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        grad_names = {"dx": tx, "dh0": tstates[0], "dc0": tstates[1]}
    for (name, want), got in zip(want_out.items(), outputs):
        assert_matches(name, got.cpu(), want, dtype)
    torch.autograd.backward(outputs, [torch.tensor(u, dtype=dtype, device=device) for u in upstream])
    grad_names.update({"dw_ih": tw_ih, "dw_hh": tw_hh})
    if bias:
        grad_names.update({"db_ih": tb_ih, "db_hh": tb_hh})
    for name, tensor in grad_names.items():
        assert_matches(name, tensor.grad.cpu(), want_grads[name], dtype)


def check_cells_against_reference(cell, backend, dtype, device="cpu"):
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, 1, 5, 4, 6, bias=True, seed=3)
    tx, tw_ih, tw_hh, tb_ih, tb_hh = (to_torch(a, dtype, device) for a in (x[0], w_ih, w_hh, b_ih, b_hh))
    tstates = [to_torch(s, dtype, device) for s in states]
    if cell == "irnn":
        h = fused_rnn.irnn_cell(tx, tstates[0], tw_ih, tw_hh, tb_ih, tb_hh, backend=backend)
        _, want_h, cache = ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh)
        assert_matches("h", h.cpu(), want_h, dtype)
        h.backward(torch.tensor(up["h"], dtype=dtype, device=device))
        want = ref.irnn_backward(None, up["h"], cache)
        checks = {"dx": tx.grad, "dh0": tstates[0].grad}
    else:
        h, c = fused_rnn.lstm_cell(tx, tuple(tstates), tw_ih, tw_hh, tb_ih, tb_hh, backend=backend)
        _, want_h, want_c, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        assert_matches("h", h.cpu(), want_h, dtype)
        assert_matches("c", c.cpu(), want_c, dtype)
        torch.autograd.backward((h, c), (torch.tensor(up["h"], dtype=dtype, device=device),
                                         torch.tensor(up["c"], dtype=dtype, device=device)))
        want = ref.lstm_backward(None, up["h"], up["c"], cache)
        checks = {"dx": tx.grad, "dh0": tstates[0].grad, "dc0": tstates[1].grad}
    checks.update({"dw_ih": tw_ih.grad, "dw_hh": tw_hh.grad, "db_ih": tb_ih.grad, "db_hh": tb_hh.grad})
    for name, got in checks.items():
        want_value = want[name][0] if name == "dx" else want[name]
        assert_matches(name, got.cpu(), want_value, dtype)


def sequence_options(steps, batch, hidden, seed):
    rng = np.random.default_rng(seed)
    mask = (rng.random((batch, hidden)) > 0.25) / 0.75
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0] = steps  # the longest sequence spans the batch, as after padding
    return mask, lengths


def check_options(cell, shape, dtype, backend, used, device="cpu"):
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, *shape, bias=True, seed=sum(shape))
    mask, lengths = sequence_options(shape[0], shape[1], shape[3], seed=shape[0])
    mask = mask if "recurrent_mask" in used else None
    lengths = lengths if "lengths" in used else None
    clip = None
    if "hidden_clip" in used and cell == "irnn":  # half the largest activation: some are clipped
        clip = 0.5 * float(ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh, mask, lengths)[0].max())
    tx, tw_ih, tw_hh, tb_ih, tb_hh = (to_torch(a, dtype, device) for a in (x, w_ih, w_hh, b_ih, b_hh))
    tstates = [to_torch(s, dtype, device) for s in states]
    options = dict(recurrent_mask=None if mask is None else torch.tensor(mask, dtype=dtype, device=device),
                   lengths=None if lengths is None else torch.tensor(lengths))
    if cell == "irnn":
        y, h_n = fused_rnn.irnn(tx, tstates[0], tw_ih, tw_hh, tb_ih, tb_hh, backend=backend, **options,
                                hidden_clip=clip)
        outputs, upstream = (y, h_n), (up["y"], up["h"])
        want_y, want_h, cache = ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh, mask, lengths, clip)
        if clip is not None:
            assert (want_y == clip).any()  # the clip is reached
        want_out, want = (want_y, want_h), ref.irnn_backward(up["y"], up["h"], cache)
        grads = {"dx": tx, "dh0": tstates[0]}
    else:
        y, (h_n, c_n) = fused_rnn.lstm(tx, tuple(tstates), tw_ih, tw_hh, tb_ih, tb_hh, backend=backend, **options)
        outputs, upstream = (y, h_n, c_n), (up["y"], up["h"], up["c"])
        want_y, want_h, want_c, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh, mask, lengths)
        want_out, want = (want_y, want_h, want_c), ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        grads = {"dx": tx, "dh0": tstates[0], "dc0": tstates[1]}
    for name, got, expected in zip(("y", "h_T", "c_T"), outputs, want_out):
        assert_matches(name, got.cpu(), expected, dtype)
    torch.autograd.backward(outputs, [torch.tensor(u, dtype=dtype, device=device) for u in upstream])
    grads.update({"dw_ih": tw_ih, "dw_hh": tw_hh, "db_ih": tb_ih, "db_hh": tb_hh})
    for name, tensor in grads.items():
        assert_matches(name, tensor.grad.cpu(), want[name], dtype)


def implements(backend, options):
    """Whether `backend` takes every option named (the torch loop takes all of them)."""
    return backend == "torch" or set(options) <= set(fused_rnn.dispatch.OPTION_SUPPORT.get(backend, ()))


def options_for(backend, options: dict) -> dict:
    """`options` without those `backend` does not implement (torch.nn's kernels have
    lengths and the projection, not the recurrent mask or the clip)."""
    return {name: value for name, value in options.items() if implements(backend, (name,))}


def spawn_and_wait(fn, args, nprocs, seconds):
    """torch.multiprocessing.spawn(fn, args, nprocs) joined for at most `seconds`: a
    worker that hangs (a collective waiting for a peer that died) fails the test with
    the time it was given instead of holding the suite; the workers are terminated."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=max(0.0, deadline - time.monotonic()) or 0.001):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise AssertionError(f"the {nprocs} spawned workers did not finish within {seconds} s")


def run_in_group(command, timeout, **kwargs):
    """subprocess.run(command, capture_output=True, text=True, timeout=timeout,
    **kwargs), with the command in a process group of its own that is killed whole on
    timeout: a script that fans out to worker processes (bench/triton_resources.py's
    compile pool) leaves no orphans compiling on through the rest of the suite."""
    import os
    import signal
    import subprocess

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        try:  # reap it; a process that left the group may still hold the pipes
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        raise
    finally:
        try:  # workers the script left behind, even after it exited
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # none left (or the id is no longer the group's)
            pass
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# ---- bfloat16 / float16 inputs, float32 state and accumulation ----

# Against the float64 reference computed from the same rounded inputs and upstream
# gradients. The operands of every recurrent product are rounded to the dtype (unit
# roundoff u = 2^-8 for bfloat16, 2^-11 for float16) and outputs are rounded once, so
# errors grow with T and with the recurrence's gain. Measured worst (Triton, relative to
# max(1, max|want|)): 7.6e-3 (bf16) and 8.6e-4 (fp16) for the IRNN over <= 9 steps (W_hh
# spectral radius up to 1.17, inputs off the ReLU kink as below), 4e-3 and 6e-4 for the
# LSTM at T = 63; the bounds are 4x those, ~8u for both dtypes. The IRNN at T = 63 with
# that gain reaches 0.4 (bf16) in dx: inherent to rounding h and dz to bf16 at every
# step of an expanding recurrence, so no test runs it. A wrong gate or index errs by O(1).
LOW_PRECISION_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def relu_error_band(x, h0, w_ih, w_hh, b_ih, b_hh, dtype, mask=None, lengths=None, clip=None):
    """How far a kernel's IRNN pre-activations may lie from the float64 reference's
    when the kernel rounds to `dtype`: a probabilistic rounding-error bound (Higham &
    Mary, SIAM J. Sci. Comput. 41(5), 2019: independent rounding errors add in
    quadrature). Each rounding is an independent error of variance u^2/3 (relative error
    uniform in [-u, u]) of the value rounded: the input projection x_t W_ih^T (its result,
    and its products), each bias, and the recurrent product's operand (mask * h_{t-1});
    the error of h_{t-1} (relu and the clip are 1-Lipschitz) propagates through W_hh.
    The input terms are rounded before they are summed, so a pre-activation that is a
    small difference of larger terms carries their error, not its own: relative to the
    sum alone (z itself), the band missed a z of 4e-5 that a Triton bf16 kernel put on
    the other side of 0 (fuzz seed 154081924). Returns (z [T, B, H], 6 standard
    deviations [T, B, H])."""
    _, _, cache = ref.irnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, mask, lengths, clip)
    biases = [b for b in (b_ih, b_hh) if b is not None]
    inputs = np.sqrt((x @ w_ih.T) ** 2 + (x ** 2) @ (w_ih ** 2).T + sum(b ** 2 for b in biases))
    gain = 1.0 if mask is None else mask ** 2
    variance = np.zeros_like(h0)
    band = np.empty_like(cache.preactivations)
    u2 = UNIT_ROUNDOFF[dtype] ** 2 / 3
    for t in range(x.shape[0]):
        operand = cache.hidden_states[t] if mask is None else cache.hidden_states[t] * mask
        variance = (u2 * operand ** 2 + gain * variance) @ (w_hh ** 2).T + u2 * inputs[t] ** 2
        band[t] = 6 * np.sqrt(variance)
    return cache.preactivations, band


def irnn_inputs_off_the_kink(x, rest, dtype, seed, mask=None, lengths=None, clip=None):
    """ReLU's derivative jumps at 0 (and the clip's at the clip): a pre-activation
    within rounding error of a jump may come out on either side in a kernel, and then
    the gradients differ by O(1) there whatever the precision, which no tolerance can
    cover without hiding real errors. So the inputs, not the reference, move: each batch
    row with a pre-activation at step t within relu_error_band of a jump has x_t redrawn,
    until none has. rest = (h0, w_ih, w_hh, b_ih, b_hh) in float64, rounded here as the
    kernel gets them (mask: already rounded). Returns x, or None where redrawing x does
    not help (with I = 1, say, a row's step has one degree of freedom for H units)."""
    rng = np.random.default_rng(seed)
    rounded = [None if a is None else torch.tensor(a, dtype=dtype).double().numpy() for a in rest]
    x = x.copy()
    for _ in range(300):
        z, band = relu_error_band(torch.tensor(x, dtype=dtype).double().numpy(), *rounded, dtype, mask, lengths, clip)
        near = np.abs(z) <= band  # [T, B, H]
        if clip is not None:
            near |= np.abs(z - clip) <= band
        if not near.any():
            return x
        t = int(np.argmax(near.any(axis=(1, 2))))
        rows = near[t].any(axis=1)
        x[t, rows] = rng.normal(0.0, 0.5, (int(rows.sum()), x.shape[2]))
    return None


# ---- the char-RNN application's tests (test_app_*.py) ----

# A small corpus of Python-like lines, ~14k characters; the `corpus` fixture of
# tests/conftest.py writes it to a file.
APP_TEXT = "".join(f"def f{i}(x):\n    return (x + {i}) * 'ab'[{i % 2}]\n" for i in range(300))


def tiny_config(corpus, out, model="stateful-lstm", **kwargs):
    """A TrainConfig that trains in about a second on the CPU."""
    from fused_rnn.app.train import TrainConfig

    kwargs = {"hidden": 16, "seq_len": 12, "batch_size": 8, "sample_chars": 20, **kwargs}
    return TrainConfig(model=model, text=str(corpus), out=str(out), **kwargs)
