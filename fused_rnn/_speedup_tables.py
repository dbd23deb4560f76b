"""Predicted speed of the fused backends against torch.nn's kernels (above 1: faster),
read by fused_rnn._speedups. Generated: each section is written by the command it names.
"""

# begin CPU: written by `python bench/table.py --write-speedups` (measured)
CPU_SOURCE = 'measured by bench/table.py on AMD EPYC, 2 threads, 2026-11-30 20:54 UTC'
# (cell, mode, dtype, batch, hidden) -> {backend: speed-up over torch.nn's kernels}
CPU = {
    ('irnn', 'inference', 'float32', 1, 256): {'cpp': 1.953},
    ('irnn', 'inference', 'float32', 64, 256): {'cpp': 1.724},
    ('irnn', 'inference', 'float32', 64, 512): {'cpp': 1.284},
    ('irnn', 'training', 'float32', 1, 256): {'cpp': 6.212},
    ('irnn', 'training', 'float32', 64, 256): {'cpp': 1.718},
    ('irnn', 'training', 'float32', 64, 512): {'cpp': 1.274},
    ('lstm', 'inference', 'float32', 1, 256): {'cpp': 0.919},
    ('lstm', 'inference', 'float32', 64, 256): {'cpp': 0.481},
    ('lstm', 'inference', 'float32', 64, 512): {'cpp': 0.482},
    ('lstm', 'training', 'float32', 1, 256): {'cpp': 0.805},
    ('lstm', 'training', 'float32', 64, 256): {'cpp': 0.573},
    ('lstm', 'training', 'float32', 64, 512): {'cpp': 0.631},
}
# end CPU

# begin GPU: written by `python bench/gpu_model.py --write-speedups` (a model, not a measurement)
GPU_SOURCE = "none yet"
# (GPU, cell, mode, dtype, batch, hidden) -> {backend: speed-up over torch.nn's kernels}
GPU = {}
# end GPU
