// Launchers of the persistent scans and step kernels (device code in persistent_scan.cuh,
// which explains the design), and every instantiation the ATen side (irnn.cu and lstm.cu)
// uses. No torch include: bench/cuda_resources.py compiles this file on its own with
// nvcc -Xptxas -v.
#include <mutex>

#include "persistent_scan.cuh"

namespace fused_rnn {
namespace cuda {

using namespace kernels;

namespace {

constexpr int kMaxDevices = 64;

// Raises `kernel`'s dynamic shared memory limit to the device's opt-in maximum, once
// per device: a per-call value could be lowered by another host thread between its
// set and this thread's launch. Every launch and occupancy query passes its own size.
template <auto kernel>
cudaError_t allow_opt_in_shared_memory() {
  static std::mutex mutex;
  static bool done[kMaxDevices] = {};
  int device = 0, limit = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  std::lock_guard<std::mutex> lock(mutex);
  if (device < kMaxDevices && done[device]) return cudaSuccess;
  error = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error == cudaSuccess) error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (error == cudaSuccess && device < kMaxDevices) done[device] = true;
  return error;
}

// A cooperative launch of kernel(args, plan): plan.blocks blocks of kThreads threads
// with plan.smem_bytes of dynamic shared memory.
template <auto kernel, typename Args>
cudaError_t cooperative_launch(const Args& args, const ScanPlan& plan, cudaStream_t stream) {
  cudaError_t error = allow_opt_in_shared_memory<kernel>();
  if (error != cudaSuccess) return error;
  Args kernel_args = args;
  ScanPlan kernel_plan = plan;
  void* params[] = {&kernel_args, &kernel_plan};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(plan.blocks)),
                                     dim3(kThreads), params, static_cast<size_t>(plan.smem_bytes), stream);
}

template <auto kernel>
cudaError_t residency(const ScanPlan& plan, bool* fits) {
  int device = 0, sm_count = 0, cooperative = 0, per_sm = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (error == cudaSuccess) error = allow_opt_in_shared_memory<kernel>();
  if (error == cudaSuccess)
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                          static_cast<size_t>(plan.smem_bytes));
  *fits = error == cudaSuccess && cooperative && static_cast<int64_t>(per_sm) * sm_count >= plan.blocks;
  return error;
}

}  // namespace

template <typename scalar_t, int G>
cudaError_t launch_scan_forward(const ForwardArgs<scalar_t>& args, const ScanPlan& plan, cudaStream_t stream) {
  return with_rows(plan.rows, [&](auto rows) {
    return cooperative_launch<scan_forward_kernel<scalar_t, G, decltype(rows)::value>>(args, plan, stream);
  });
}

template <typename scalar_t, int G>
cudaError_t launch_scan_backward(const BackwardArgs<scalar_t>& args, const ScanPlan& plan, cudaStream_t stream) {
  return with_rows(plan.rows, [&](auto rows) {
    return cooperative_launch<scan_backward_kernel<scalar_t, G, decltype(rows)::value>>(args, plan, stream);
  });
}

// The instantiation for the plan's rows: every instantiation runs one block of kThreads
// per SM (__launch_bounds__(kThreads, 1)), so whichever fits at its plan's shared memory.
template <typename scalar_t, int G>
cudaError_t check_scan_residency(const ScanPlan& plan, bool backward, bool* fits) {
  return with_rows(plan.rows, [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    return backward ? residency<scan_backward_kernel<scalar_t, G, R>>(plan, fits)
                    : residency<scan_forward_kernel<scalar_t, G, R>>(plan, fits);
  });
}

template <typename scalar_t>
cudaError_t launch_irnn_step(const float* z, scalar_t* h_new, int64_t n, cudaStream_t stream) {
  irnn_step_kernel<scalar_t><<<step_blocks(n), kStepThreads, 0, stream>>>(z, h_new, n);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_irnn_step_backward(const scalar_t* grad_h_new, const scalar_t* h_new, float* dz, int64_t n,
                                      cudaStream_t stream) {
  irnn_step_backward_kernel<scalar_t><<<step_blocks(n), kStepThreads, 0, stream>>>(grad_h_new, h_new, dz, n);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_lstm_step(float* gates, const scalar_t* c, scalar_t* c_new, scalar_t* h_new, int64_t batch,
                             int64_t hidden, cudaStream_t stream) {
  lstm_step_kernel<scalar_t><<<step_blocks(batch * hidden), kStepThreads, 0, stream>>>(gates, c, c_new, h_new, batch,
                                                                                       hidden);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_lstm_step_backward(const scalar_t* grad_h_new, const scalar_t* grad_c_new, const scalar_t* c,
                                      const scalar_t* c_new, const float* gates, float* dgates, scalar_t* grad_c,
                                      int64_t batch, int64_t hidden, cudaStream_t stream) {
  lstm_step_backward_kernel<scalar_t><<<step_blocks(batch * hidden), kStepThreads, 0, stream>>>(
      grad_h_new, grad_c_new, c, c_new, gates, dgates, grad_c, batch, hidden);
  return cudaGetLastError();
}

// Every instantiation the ATen side launches (and bench/cuda_resources.py checks).
#define FUSED_RNN_INSTANTIATE_SCANS(scalar_t)                                                                     \
  template cudaError_t launch_scan_forward<scalar_t, 1>(const ForwardArgs<scalar_t>&, const ScanPlan&,           \
                                                        cudaStream_t);                                           \
  template cudaError_t launch_scan_forward<scalar_t, 4>(const ForwardArgs<scalar_t>&, const ScanPlan&,           \
                                                        cudaStream_t);                                           \
  template cudaError_t launch_scan_backward<scalar_t, 1>(const BackwardArgs<scalar_t>&, const ScanPlan&,         \
                                                         cudaStream_t);                                          \
  template cudaError_t launch_scan_backward<scalar_t, 4>(const BackwardArgs<scalar_t>&, const ScanPlan&,         \
                                                         cudaStream_t);                                          \
  template cudaError_t check_scan_residency<scalar_t, 1>(const ScanPlan&, bool, bool*);                          \
  template cudaError_t check_scan_residency<scalar_t, 4>(const ScanPlan&, bool, bool*);                          \
  template cudaError_t launch_irnn_step<scalar_t>(const float*, scalar_t*, int64_t, cudaStream_t);               \
  template cudaError_t launch_irnn_step_backward<scalar_t>(const scalar_t*, const scalar_t*, float*, int64_t,    \
                                                           cudaStream_t);                                        \
  template cudaError_t launch_lstm_step<scalar_t>(float*, const scalar_t*, scalar_t*, scalar_t*, int64_t,        \
                                                  int64_t, cudaStream_t);                                        \
  template cudaError_t launch_lstm_step_backward<scalar_t>(const scalar_t*, const scalar_t*, const scalar_t*,    \
                                                           const scalar_t*, const float*, float*, scalar_t*,     \
                                                           int64_t, int64_t, cudaStream_t);

FUSED_RNN_INSTANTIATE_SCANS(float)
FUSED_RNN_INSTANTIATE_SCANS(__nv_bfloat16)
FUSED_RNN_INSTANTIATE_SCANS(__half)

}  // namespace cuda
}  // namespace fused_rnn
