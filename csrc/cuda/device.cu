// What the host side (csrc/ops.cpp, fused_rnn._C) asks of the CUDA half of the
// extension, which setup.py compiles with nvcc whenever it finds a CUDA build of torch
// and a CUDA toolkit: the CUDA version it was compiled against, and whether a persistent
// scan fits a device (dispatch's question). It also instantiates every function of the
// shared cell maths (csrc/cell_math.h) in device code, float64 included, which the
// kernels of persistent_scan.cu (float32 only) do not all use.
#include <cuda_runtime_api.h>

#include "../cell_math.h"
#include "common.cuh"

namespace fused_rnn {

int cuda_runtime_version_compiled() { return CUDART_VERSION; }

namespace {

// One LSTM and one IRNN cell, forward and backward, per element: the device
// instantiation of every function of cell_math.h.
template <typename T>
__global__ void cell_math_device_instantiation(T* data, int count) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= count) return;
  T i = data[idx], f = i + T(1), g = i - T(1), o = i * T(2), c = T(0), h = T(0);
  cell::lstm_forward(i, f, g, o, data[idx], c, h);
  T di, df, dg, dout, dc_prev;
  cell::lstm_backward(h, c, i, f, g, o, c, data[idx], di, df, dg, dout, dc_prev);
  data[idx] = cell::relu(di + df + dg + dout + dc_prev) + cell::relu_backward(h, c);
}

template __global__ void cell_math_device_instantiation<float>(float*, int);
template __global__ void cell_math_device_instantiation<double>(double*, int);

}  // namespace

namespace cuda {

// Why the persistent scans (both directions) cannot take (gates, dtype, H) on `device`;
// "" if they can.
std::string cuda_scan_unsupported(int device, int64_t gates, at::ScalarType dtype, int64_t hidden) {
  for (const bool backward : {false, true}) {
    const ScanCheck check = checked_scan(device, gates, dtype, hidden, backward);
    if (!check.reason.empty()) return check.reason;
  }
  return "";
}

}  // namespace cuda
}  // namespace fused_rnn
