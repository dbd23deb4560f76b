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
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

# Unit blocks: 16 is tl.dot's smallest M; above 64 the W_hh tile of a K chunk and the
# LSTM's four accumulators outgrow the registers of one program. 8 runs the product on
# float32 FMAs instead of tl.dot (split.py), which IEEE float32 does on the CUDA cores
# anyway: only float32 without TF32 has configs there (on_fma_variant), and it doubles
# the programs that share a step where H / 16 leaves SMs idle (H = 1024: 128 of 132).
BLOCK_UNITS = (8, 16, 32, 64)
# tl.dot's smallest M and N: smaller tiles (BLOCK_U or the batch tile) run on FMAs.
MIN_DOT = 16
# A batch group holds at least this many rows: tl.dot's smallest N (fewer rows would
# pad the product with zeros, no faster); on FMAs at least FMA_TILES[-1].
MIN_GROUP_ROWS = 16
# On float32 FMAs the batch tiles of these rows (split.CANDIDATES) serve a group of at
# most 8 rows with less padding than 16: one row (B = 1, generation), or up to 8.
FMA_TILES = (1, 8)
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
    padded: int = MIN_GROUP_ROWS  # rows the product multiplies for them (padded_rows)

    @property
    def programs(self) -> int:
        return self.unit_blocks * self.groups


def on_fma_variant(kernel_variant: str) -> bool:
    """Whether a kernel variant (common.variant: "fp32", "bf16+options", ...) runs its
    product on float32 FMAs below tl.dot's sizes: IEEE float32 only; bf16, fp16 and TF32
    keep tl.dot and the tensor cores."""
    return kernel_variant.split("+")[0] == "fp32"


def on_fma(block_u: int, block_b: int) -> bool:
    """Whether a program of BLOCK_U units and a batch tile of BLOCK_B rows multiplies on
    FMAs (either below tl.dot's 16)."""
    return block_u < MIN_DOT or block_b < MIN_DOT


def fma_tile(rows: int, tiles: Iterable[int] = FMA_TILES) -> Optional[int]:
    """The smallest FMA batch tile (below MIN_DOT) among `tiles` that holds `rows` rows,
    or None."""
    return min((t for t in tiles if t < MIN_DOT and rows <= t), default=None)


def padded_rows(rows: int, tiles: Iterable[int] = ()) -> int:
    """The rows the product multiplies for a group of `rows`: its FMA tile among
    `tiles` (the batch tiles with configs), or at least tl.dot's 16."""
    tile = fma_tile(rows, tiles)
    return tile if tile is not None else max(rows, MIN_GROUP_ROWS)


def program_step(hidden: int, gates: int, weight_bytes: int, block_u: int, rows: int,
                 backward: bool = False, padded: Optional[int] = None) -> Tuple[float, float]:
    """(bytes read, flops) of one program's step: its W_hh slice (the forward's G *
    BLOCK_U rows, the backward's BLOCK_U columns of G * H) and the exchanged state of
    its rows (the forward's h, H wide; the backward's dz or dgates, G * H wide), which
    travels in the weights' dtype (split.py; but for a forward with a recurrent mask,
    float32); the product multiplies `padded` rows (default: padded to tl.dot's 16)."""
    state = rows * hidden * (gates if backward else 1) * weight_bytes
    padded = max(rows, MIN_GROUP_ROWS) if padded is None else padded
    return gates * block_u * hidden * weight_bytes + state, 2 * gates * block_u * padded * hidden


def step_cost(hidden: int, gates: int, weight_bytes: int, block_u: int, rows: int, backward: bool = False,
              padded: Optional[int] = None) -> float:
    """The busiest program's step in bytes-equivalent: max(bytes read, flops / rate)."""
    read, flops = program_step(hidden, gates, weight_bytes, block_u, rows, backward, padded)
    return max(read, flops / FLOPS_PER_BYTE[weight_bytes])


def plan(hidden: int, batch: int, gates: int, weight_bytes: int, programs: int,
         block_units=BLOCK_UNITS, backward: bool = False, fma_tiles: Optional[Mapping[int, Sequence[int]]] = None
         ) -> Plan:
    """The plan of a step of `hidden` units and `batch` rows on at most `programs`
    programs (fewer when there is not that much work), with a BLOCK_U from
    `block_units` (those the kernel has spill-free configs for, ascending). A hidden
    size too large for `programs` blocks of the widest gets more programs than the
    budget: the persistent driver then refuses it (split.py) and the per-step driver
    runs it. `fma_tiles`, for IEEE float32 (the product may run on FMAs): {BLOCK_U: the
    batch tiles it has configs for}, so that BLOCK_U below 16 and groups of fewer than
    16 rows are planned with the padding they really get; None: tl.dot only."""
    best = None
    min_rows = FMA_TILES[-1] if fma_tiles is not None else MIN_GROUP_ROWS
    for block_u in block_units:
        unit_blocks = math.ceil(hidden / block_u)
        if (unit_blocks > programs and block_u != block_units[-1]) or (block_u < MIN_DOT and fma_tiles is None):
            continue
        groups = max(1, min(programs // unit_blocks, math.ceil(batch / min_rows)))
        rows = math.ceil(batch / groups)
        groups = math.ceil(batch / rows)
        padded = padded_rows(rows, (fma_tiles or {}).get(block_u, ()))
        cost = step_cost(hidden, gates, weight_bytes, block_u, rows, backward, padded)
        candidate = (cost, unit_blocks * groups, Plan(block_u, unit_blocks, rows, groups, padded))
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return best[2]
