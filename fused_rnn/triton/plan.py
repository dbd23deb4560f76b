"""How the hidden-split Triton scans (split.py) share a step among their programs: pure
Python, so that bench/gpu_model.py predicts the plan the kernels run.

The grid is (unit blocks, batch groups). Program (p, q) owns units [p * BLOCK_U, (p + 1)
* BLOCK_U) with all their G gates (G = 1 IRNN, 4 LSTM) and batch rows [q * rows, (q + 1)
* rows). Every step it reads its W_hh slice (G * BLOCK_U rows of H) and the previous
state of its rows (rows x H; the backward's rows x G * H; in the weights' dtype) from L2,
and does 2 * G * BLOCK_U * rows * H flops.
Over the grid the step reads W_hh `groups` times and the state `unit_blocks` times: wide
unit blocks cut the state's traffic, more batch groups spread the arithmetic over more
SMs but re-read the weights. The plan minimises the step of the busiest program,
max(bytes it reads, flops / FLOPS_PER_BYTE), within the program budget (at most one
program per SM for the persistent driver).
"""

import math
from typing import NamedTuple, Tuple

# Unit blocks: 16 is tl.dot's smallest M; above 64 the W_hh tile of a K chunk and the
# LSTM's four accumulators outgrow the registers of one program.
BLOCK_UNITS = (16, 32, 64)
# A batch group holds at least this many rows (tl.dot's smallest N: fewer rows would
# pad the product with zeros, no faster).
MIN_GROUP_ROWS = 16
# Flops an SM does in the time it reads one byte from L2, from the H100/H200 datasheet
# rates and bench/gpu_model.py's efficiencies (a MODEL): fp32 on CUDA cores at half of
# 67 TFLOP/s against 6 TB/s of L2 shared by 132 SMs is about 5.6; bf16/fp16 on tensor
# cores at a third of 989 TFLOP/s, about 55.
FLOPS_PER_BYTE = {4: 5.6, 2: 55.0}


class Plan(NamedTuple):
    block_u: int  # units a program owns (all G gates of each)
    unit_blocks: int
    rows: int  # batch rows a program owns
    groups: int

    @property
    def programs(self) -> int:
        return self.unit_blocks * self.groups


def program_step(hidden: int, gates: int, weight_bytes: int, block_u: int, rows: int,
                 backward: bool = False) -> Tuple[float, float]:
    """(bytes read, flops) of one program's step: its W_hh slice (the forward's G *
    BLOCK_U rows, the backward's BLOCK_U columns of G * H) and the exchanged state of
    its rows (the forward's h, H wide; the backward's dz or dgates, G * H wide), which
    travels in the weights' dtype (split.py; but for a forward with a recurrent mask,
    float32); the product's N side is padded to 16 rows."""
    state = rows * hidden * (gates if backward else 1) * weight_bytes
    return gates * block_u * hidden * weight_bytes + state, 2 * gates * block_u * max(rows, MIN_GROUP_ROWS) * hidden


def step_cost(hidden: int, gates: int, weight_bytes: int, block_u: int, rows: int, backward: bool = False) -> float:
    """The busiest program's step in bytes-equivalent: max(bytes read, flops / rate)."""
    read, flops = program_step(hidden, gates, weight_bytes, block_u, rows, backward)
    return max(read, flops / FLOPS_PER_BYTE[weight_bytes])


def plan(hidden: int, batch: int, gates: int, weight_bytes: int, programs: int,
         block_units=BLOCK_UNITS, backward: bool = False) -> Plan:
    """The plan of a step of `hidden` units and `batch` rows on at most `programs`
    programs (fewer when there is not that much work), with a BLOCK_U from
    `block_units` (those the kernel has spill-free configs for, ascending). A hidden
    size too large for `programs` blocks of the widest gets more programs than the
    budget: the persistent driver then refuses it (split.py) and the per-step driver
    runs it."""
    best = None
    for block_u in block_units:
        unit_blocks = math.ceil(hidden / block_u)
        if unit_blocks > programs and block_u != block_units[-1]:
            continue
        groups = max(1, min(programs // unit_blocks, math.ceil(batch / MIN_GROUP_ROWS)))
        rows = math.ceil(batch / groups)
        groups = math.ceil(batch / rows)
        cost = step_cost(hidden, gates, weight_bytes, block_u, rows, backward)
        candidate = (cost, unit_blocks * groups, Plan(block_u, unit_blocks, rows, groups))
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return best[2]
