"""Check every available fused_rnn backend on every available device against the NumPy reference.

    python python/check.py [--device cpu|cuda|all] [--backends NAME ...] [--dtype float32|float64|all]
    TRITON_INTERPRET=1 python python/check.py --device cpu --backends triton --dtype float32

For each cell (IRNN, LSTM), device, backend, dtype and shape it runs the forward and
the backward (autograd with random upstream gradients on y, h_T and, for the LSTM,
c_T), runs ``rnn_reference`` in float64 on the same inputs and the same upstream
gradients, and prints one row of errors per tensor:

    error = max|backend - reference| / max(1, max|reference|)

i.e. an absolute error for tensors of magnitude up to 1 and a relative one for larger
tensors (weight gradients sum over T * B terms and grow with them). A row passes when
every error is within its dtype's tolerance. The exit status is 0 when every row
passes and 1 otherwise; a backend that raises counts as a failure and the run goes on.
This is the script a GPU owner runs to validate the GPU paths.
"""

import argparse
import platform
import sys
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

import rnn_reference

try:
    import fused_rnn
except ImportError:
    # run from a source checkout that was built in place but not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fused_rnn

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Normalised error allowed per dtype. The torch time-loop backend differs from the
# reference only by rounding; over these shapes (64 steps, weight gradients summed over
# T * B = 4096 terms) it measures at most 5e-15 in float64 and 9e-7 in float32, against
# unit roundoffs of 1.1e-16 and 6e-8. A wrong formula is off by 1e-3 or more. So:
# float64 1e-9, loose for any correct summation order yet tight against a wrong one;
# float32 1e-4, two orders above the measured rounding and well below a maths error.
TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-9}

TENSOR_NAMES = ["y", "h_T", "c_T", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]


@dataclass(frozen=True)
class Shape:
    steps: int
    batch: int
    inputs: int
    hidden: int
    bias: bool = True

    def __str__(self):
        label = f"T={self.steps} B={self.batch} I={self.inputs} H={self.hidden}"
        return label if self.bias else label + " nobias"


# Single step and batch of one; odd T and H; no bias; the char-RNN lesson's layer
# (42-dim embeddings, 256 hidden units, 64 sequences of 64 characters).
SHAPES = [
    Shape(1, 1, 3, 5),
    Shape(63, 4, 7, 37),
    Shape(17, 1, 5, 8, bias=False),
    Shape(64, 64, 42, 256),
]

CELLS = ["irnn", "lstm"]


@dataclass
class Row:
    cell: str
    backend: str
    device: str
    dtype: str
    shape: Shape
    errors: Dict[str, float] = field(default_factory=dict)
    failure: Optional[str] = None  # why the row failed outside the error columns
    failure_traceback: Optional[str] = None
    relu_ties: int = 0  # ReLU ties the backend resolved the other way (see RELU_TIE_MARGIN)
    skipped: Optional[str] = None  # why the backend declines these inputs by design

    @property
    def passed(self):
        if self.skipped is not None:
            return True
        tolerance = TOLERANCES[DTYPES[self.dtype]]
        # a NaN error compares False and so fails
        return self.failure is None and all(error <= tolerance for error in self.errors.values())


# ---------------------------------------------------------------- problem and reference


def make_problem(cell: str, shape: Shape, seed: int) -> Dict[str, Optional[np.ndarray]]:
    """Inputs, weights and upstream gradients in float64, scaled so 64 steps stay bounded."""
    rng = np.random.default_rng(seed)
    steps, batch, inputs, hidden = shape.steps, shape.batch, shape.inputs, shape.hidden
    gates = 1 if cell == "irnn" else 4
    scale = 1.0 / np.sqrt(hidden)
    problem = {
        "x": rng.normal(0.0, 0.1 if cell == "irnn" else 1.0, size=(steps, batch, inputs)),  # [T, B, I]
        "h0": rng.uniform(0.0, 0.5, size=(batch, hidden)),  # [B, H]
        "c0": rng.normal(0.0, 0.5, size=(batch, hidden)) if cell == "lstm" else None,  # [B, H]
        "w_ih": rng.uniform(-scale, scale, size=(gates * hidden, inputs)),  # [G*H, I]
        "b_ih": rng.uniform(-0.1 * scale, 0.1 * scale, size=gates * hidden) if shape.bias else None,
        "b_hh": rng.uniform(-0.1 * scale, 0.1 * scale, size=gates * hidden) if shape.bias else None,
        "dy": rng.normal(size=(steps, batch, hidden)),  # [T, B, H]
        "dh_T": rng.normal(size=(batch, hidden)),  # [B, H]
        "dc_T": rng.normal(size=(batch, hidden)) if cell == "lstm" else None,  # [B, H]
    }
    if cell == "irnn":
        # identity initialisation scaled to 0.9 so h does not grow over the sequence; the
        # noise has spectral norm ~0.1, keeping the whole matrix a contraction
        noise = rng.normal(0.0, 0.05 * scale, size=(hidden, hidden))
        problem["w_hh"] = 0.9 * np.eye(hidden) + noise  # [H, H]
    else:
        problem["w_hh"] = rng.uniform(-scale, scale, size=(4 * hidden, hidden))  # [4H, H]
    return problem


def round_to(problem, dtype):
    """The problem as `dtype` would hold it, back in float64: the reference then sees
    exactly the numbers the backend sees, and input rounding is not counted as error."""
    return {
        name: None if value is None else torch.from_numpy(value).to(dtype).double().numpy()
        for name, value in problem.items()
    }


@dataclass
class Reference:
    result: Dict[str, Optional[np.ndarray]]  # outputs and gradients, float64
    cache: object  # the forward's cache, to redo the IRNN backward with other ReLU choices


def reference_result(cell: str, problem) -> Reference:
    parameters = (problem["w_ih"], problem["w_hh"], problem["b_ih"], problem["b_hh"])
    if cell == "irnn":
        y, h_T, cache = rnn_reference.irnn_forward(problem["x"], problem["h0"], *parameters)
        result = {"y": y, "h_T": h_T}
        result.update(rnn_reference.irnn_backward(problem["dy"], problem["dh_T"], cache))
    else:
        y, h_T, c_T, cache = rnn_reference.lstm_forward(problem["x"], problem["h0"], problem["c0"], *parameters)
        result = {"y": y, "h_T": h_T, "c_T": c_T}
        result.update(rnn_reference.lstm_backward(problem["dy"], problem["dh_T"], problem["dc_T"], cache))
    return Reference(result, cache)


# |z| below which a pre-activation counts as a tie at the ReLU kink. A correct float32
# kernel computes z with an error of ~1e-7 here (the y errors it shows), so a z closer
# to 0 than that may come out with the other sign; with ~1e6 pre-activations in the
# 64x64x256 shape a few always do (4 of them within 1e-7). The margin is 100x that error.
RELU_TIE_MARGIN = 1e-5


def irnn_reference_for_backend_ties(problem, reference: Reference, backend_y: np.ndarray):
    """The IRNN reference gradients with ReLU ties resolved the way the backend resolved them.

    Where |z_t| < RELU_TIE_MARGIN and the backend's h_t > 0 disagrees with the reference's
    z_t > 0, both sides are right to within rounding, but relu'(z) differs (1 against 0)
    and the whole gradient flowing through that unit with it. So the reference backward
    is redone with the backend's choice at those ties only; a disagreement farther from
    the kink is left alone and fails as it should. Returns (gradients, number of ties).
    """
    preactivations = reference.cache.preactivations  # [T, B, H]
    if backend_y.shape != preactivations.shape:
        return reference.result, 0  # the shape check of normalised_errors reports it
    taken_other_way = (np.abs(preactivations) < RELU_TIE_MARGIN) & ((backend_y > 0) != (preactivations > 0))
    ties = int(taken_other_way.sum())
    if ties == 0:
        return reference.result, 0
    cache = replace(reference.cache, preactivations=np.where(taken_other_way, -preactivations, preactivations))
    result = dict(reference.result)
    result.update(rnn_reference.irnn_backward(problem["dy"], problem["dh_T"], cache))
    return result, ties


# ---------------------------------------------------------------- backend under test


def backend_result(cell: str, problem, backend: str, device: str, dtype: torch.dtype):
    """Forward and autograd backward of one fused_rnn backend, everything back in float64 NumPy."""

    def tensor(name, requires_grad):
        value = problem[name]
        if value is None:
            return None
        return torch.from_numpy(value).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    differentiable = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]
    leaves = {name: tensor(name, True) for name in differentiable}
    parameters = (leaves["w_ih"], leaves["w_hh"], leaves["b_ih"], leaves["b_hh"])
    if cell == "irnn":
        y, h_T = fused_rnn.irnn(leaves["x"], leaves["h0"], *parameters, backend=backend)
        outputs = {"y": y, "h_T": h_T}
        upstream = [tensor("dy", False), tensor("dh_T", False)]
    else:
        y, (h_T, c_T) = fused_rnn.lstm(leaves["x"], (leaves["h0"], leaves["c0"]), *parameters, backend=backend)
        outputs = {"y": y, "h_T": h_T, "c_T": c_T}
        upstream = [tensor("dy", False), tensor("dh_T", False), tensor("dc_T", False)]

    inputs = {name: leaf for name, leaf in leaves.items() if leaf is not None}
    gradients = torch.autograd.grad(list(outputs.values()), list(inputs.values()), upstream, allow_unused=True)
    result = {name: value.detach().double().cpu().numpy() for name, value in outputs.items()}
    for name, gradient in zip(inputs, gradients):
        if gradient is None:
            raise RuntimeError(f"backend returned no gradient for {name}")
        result["d" + name] = gradient.double().cpu().numpy()
    return result


def normalised_errors(result, reference) -> Dict[str, float]:
    errors = {}
    for name in TENSOR_NAMES:
        expected = reference.get(name)
        if expected is None:
            continue
        actual = result.get(name)
        if actual is None or actual.shape != expected.shape:
            got = None if actual is None else actual.shape
            raise RuntimeError(f"{name}: expected shape {expected.shape}, got {got}")
        if expected.size == 0:
            errors[name] = 0.0
            continue
        scale = max(1.0, float(np.max(np.abs(expected))))
        errors[name] = float(np.max(np.abs(actual - expected))) / scale
    return errors


# ---------------------------------------------------------------- report


def device_names(devices: List[str]) -> List[str]:
    names = []
    for device in devices:
        if device == "cpu":
            names.append(f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
        else:
            names.append(f"{device}: {torch.cuda.get_device_name(torch.device(device))}")
    return names


def print_header(devices: List[str]):
    print(f"fused_rnn {getattr(fused_rnn, '__version__', '?')} from {Path(fused_rnn.__file__).parent}")
    if hasattr(fused_rnn, "build_info"):
        print(f"build_info: {fused_rnn.build_info()}")
    print(f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    for name in device_names(devices):
        print(f"device {name}")
    print("error = max|backend - reference| / max(1, max|reference|); tolerance "
          + ", ".join(f"{str(dtype).replace('torch.', '')} {tol:.0e}" for dtype, tol in TOLERANCES.items()))
    print()


COLUMN_WIDTH = 8


def print_table_head():
    head = f"{'cell':<5} {'backend':<8} {'device':<7} {'dtype':<8} {'shape':<26}"
    head += "".join(f"{name:>{COLUMN_WIDTH}}" for name in TENSOR_NAMES) + "  result"
    print(head)
    print("-" * len(head))


def print_row(row: Row):
    line = f"{row.cell:<5} {row.backend:<8} {row.device:<7} {row.dtype:<8} {str(row.shape):<26}"
    for name in TENSOR_NAMES:
        cell = f"{row.errors[name]:.1e}" if name in row.errors else "-"
        line += f"{cell:>{COLUMN_WIDTH}}"
    if row.skipped is not None:
        line += f"  SKIP ({row.skipped})"
    else:
        line += "  PASS" if row.passed else "  FAIL"
        if row.relu_ties:
            line += f" ({row.relu_ties} ReLU ties)"
        if row.failure is not None:
            message = row.failure if len(row.failure) <= 100 else row.failure[:97] + "..."
            line += f" ({message})"
    print(line, flush=True)


# ---------------------------------------------------------------- main


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="devices to check (default: all available)")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="backends to check, 'auto' included (default: every backend "
                             "fused_rnn.available_backends lists for the device)")
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="all")
    return parser.parse_args(argv)


def unsupported_reason(backend: str, device: str, dtype: torch.dtype, cell: Optional[str] = None,
                       shape: Optional[Shape] = None) -> Optional[str]:
    """Why `backend` declines these tensors by design (not a failure), or None. A backend
    named explicitly is asked directly (select_backend), so that, for instance, the Triton
    kernels can be checked on CPU tensors under TRITON_INTERPRET=1."""
    try:  # with the layer's shape: the CUDA scans' limits depend on it
        fused_rnn.select_backend(device, dtype, backend, cell=cell, hidden=None if shape is None else shape.hidden,
                                 batch=None if shape is None else shape.batch)
    except ValueError as error:
        return str(error).split(": ", 1)[-1]
    return None


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    cuda_available = torch.cuda.is_available()
    if arguments.device == "cuda" and not cuda_available:
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    devices = []
    if arguments.device in ("cpu", "all"):
        devices.append("cpu")
    if arguments.device in ("cuda", "all") and cuda_available:
        devices.append("cuda")
    dtype_names = list(DTYPES) if arguments.dtype == "all" else [arguments.dtype]

    print_header(devices)
    print_table_head()
    rows = []
    references = {}  # (cell, shape, dtype) -> Reference, shared by every device and backend
    for cell, device, backend, dtype_name, shape in cases(devices, arguments.backends, dtype_names):
        dtype = DTYPES[dtype_name]
        row = Row(cell, backend, device, dtype_name, shape)
        row.skipped = unsupported_reason(backend, device, dtype, cell, shape)
        if row.skipped is None:
            # the same problem for every backend and device: the seed depends on cell and shape only
            seed = 100 * CELLS.index(cell) + SHAPES.index(shape)
            problem = round_to(make_problem(cell, shape, seed), dtype)
            key = (cell, shape, dtype_name)
            if key not in references:
                references[key] = reference_result(cell, problem)
            check_backend(row, problem, references[key])
        rows.append(row)
        print_row(row)
    print_summary(rows)
    return 0 if all(row.passed for row in rows) else 1


def cases(devices, backend_names, dtype_names):
    """(cell, device, backend, dtype, shape) in the order of the table."""
    for cell in CELLS:
        for device in devices:
            for backend in backend_names or fused_rnn.available_backends(device):
                for dtype_name in dtype_names:
                    for shape in SHAPES:
                        yield cell, device, backend, dtype_name, shape


def check_backend(row: Row, problem, reference: Reference):
    """Fill in the row's errors, or its failure when the backend raises."""
    try:
        result = backend_result(row.cell, problem, row.backend, row.device, DTYPES[row.dtype])
        expected = reference.result
        if row.cell == "irnn":
            expected, row.relu_ties = irnn_reference_for_backend_ties(problem, reference, result["y"])
        row.errors = normalised_errors(result, expected)
    except Exception as error:  # a crashing backend is a failure to report, not to stop on
        row.failure = f"{type(error).__name__}: {error}".splitlines()[0]
        row.failure_traceback = traceback.format_exc()


def print_summary(rows: List[Row]):
    failed = [row for row in rows if not row.passed]
    checked = [row for row in rows if row.skipped is None]
    # one traceback per distinct error, not one per row
    rows_by_traceback: Dict[str, List[Row]] = {}
    for row in failed:
        if row.failure_traceback is not None:
            rows_by_traceback.setdefault(row.failure_traceback, []).append(row)
    for failure_traceback, same_rows in rows_by_traceback.items():
        print(f"\n--- raised in {len(same_rows)} row(s), first: "
              f"{same_rows[0].cell} {same_rows[0].backend} {same_rows[0].device} {same_rows[0].dtype} "
              f"{same_rows[0].shape}")
        print(failure_traceback, end="")
    ties = sum(row.relu_ties for row in rows)
    print()
    if ties:
        print(f"{ties} ReLU pre-activations within {RELU_TIE_MARGIN:g} of 0 came out with the other sign "
              "in a backend; the reference gradients took the backend's side there (see RELU_TIE_MARGIN)")
    summary = f"{len(checked) - len(failed)} of {len(checked)} checks passed"
    if len(rows) > len(checked):
        summary += f", {len(rows) - len(checked)} skipped"
    if failed:
        summary += f"; {len(failed)} FAILED"
    print(summary)


if __name__ == "__main__":
    sys.exit(main())
