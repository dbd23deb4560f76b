// A CPU emulation of the CUDA execution model, just enough to run the float32 kernels
// of csrc/cuda/persistent_scan.cuh on a machine without a GPU: every CUDA thread is a
// fiber (its own stack, ucontext) on the calling host thread; __syncthreads is a barrier
// of the block's threads, __shfl_xor_sync a barrier-separated exchange within the warp,
// grid.sync() a barrier of the whole grid (all of a cooperative launch's blocks are
// resident at once, here as on a GPU), and each block has its own dynamic shared memory.
//
// A fiber runs until it waits at a barrier or returns; the scheduler then resumes the
// next one, in thread order on one round and in reverse order on the next. So the code
// between two barriers runs in thread order or in reverse, alternately, and each launch
// starts with the other order than the one before: over two launches, a kernel that
// forgot a barrier reads a value before another thread wrote it, whichever of the two
// comes first in thread order (tests/test_cuda_emulation.py checks both). (Host threads,
// one per CUDA thread, raced at random instead, and hundreds of them on two cores spent
// most of the time in the kernel's scheduler.) A round in which no fiber arrived at a barrier, passed one or returned is a
// deadlock (threads waiting at a barrier others never reach): the launch stops and the
// entry point returns -1 instead of hanging.
//
// Built by tests/test_cuda_emulation.py (g++ -std=c++20 -shared) and called through
// ctypes: one extern "C" entry point per kernel, taking float32 buffers.
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace emu {

// What one emulated thread has: its context, stack and indices.
struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

ucontext_t scheduler;
std::vector<Fiber>* fibers = nullptr;
size_t current = 0;
bool progress = false;  // this round, a fiber arrived at or passed a barrier, or returned

// Back to the scheduler until the fiber is resumed.
inline void yield() { swapcontext(&(*fibers)[current].context, &scheduler); }

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait() {
    progress = true;
    const int generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      return;
    }
    while (generation == generation_) yield();
  }

 private:
  int count_, waiting_ = 0, generation_ = 0;
};

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  Block(int threads, size_t smem_bytes) : smem(smem_bytes + 16), barrier(threads), shuffle(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Barrier>(32));
  }
  std::vector<unsigned char> smem;
  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<float> shuffle;
};

// The running fiber's indices and block (set by the scheduler before it resumes one).
Dim3 thread_index, block_index;
Block* block = nullptr;
Dim3 block_dim, grid_dim;
Barrier* grid_barrier = nullptr;

inline unsigned char* block_shared_memory() {
  // 16-byte aligned, as the CUDA declaration asks
  const auto address = reinterpret_cast<uintptr_t>(block->smem.data());
  return block->smem.data() + ((16 - address % 16) % 16);
}

// The body every fiber starts in: the launch's kernel, then back to the scheduler.
std::function<void()>* body = nullptr;
void fiber_main() {
  (*body)();
  (*fibers)[current].done = true;
  progress = true;
}  // uc_link resumes the scheduler

}  // namespace emu

// ---- what the kernels use from CUDA ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (emu::thread_index)
#define blockIdx (emu::block_index)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block->barrier.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const int thread = static_cast<int>(threadIdx.x), warp = thread / 32, lane = thread % 32;
  emu::block->shuffle[thread] = value;
  emu::block->warps[warp]->arrive_and_wait();
  const float other = emu::block->shuffle[warp * 32 + (lane ^ lane_mask)];
  emu::block->warps[warp]->arrive_and_wait();
  return other;
}

template <typename T>
inline T __ldcg(const T* address) {
  return *address;
}

namespace cooperative_groups {
struct grid_group {
  void sync() { emu::grid_barrier->arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

#define FUSED_RNN_EMULATE_CUDA
namespace fused_rnn {
namespace cuda {
namespace kernels {
inline unsigned char* dynamic_shared_memory() { return emu::block_shared_memory(); }
}  // namespace kernels
}  // namespace cuda
}  // namespace fused_rnn

#include "cuda/persistent_scan.cuh"

namespace {

using namespace fused_rnn::cuda;

// The kernels' locals are a few scalars and arrays of at most kMaxRows x 4 floats.
constexpr size_t kStackBytes = 256 * 1024;

// Runs kernel(args...) on `blocks` x `threads` fibers; false if it deadlocked.
template <typename Kernel, typename... Args>
bool launch(int64_t blocks, int threads, size_t smem_bytes, Kernel kernel, Args... args) {
  emu::block_dim = {static_cast<unsigned>(threads), 1, 1};
  emu::grid_dim = {static_cast<unsigned>(blocks), 1, 1};
  emu::Barrier grid(static_cast<int>(blocks) * threads);
  emu::grid_barrier = &grid;
  std::vector<std::unique_ptr<emu::Block>> block_state;
  for (int64_t b = 0; b < blocks; ++b) block_state.push_back(std::make_unique<emu::Block>(threads, smem_bytes));
  const size_t count = static_cast<size_t>(blocks) * threads;
  std::vector<emu::Fiber> fibers(count);
  std::function<void()> body = [&] { kernel(args...); };
  emu::fibers = &fibers;
  emu::body = &body;
  for (auto& fiber : fibers) {
    fiber.stack = std::make_unique<char[]>(kStackBytes);
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = &emu::scheduler;
    makecontext(&fiber.context, emu::fiber_main, 0);
  }
  static size_t launches = 0;
  const size_t first_order = launches++ % 2;
  size_t finished = 0;
  bool deadlock = false;
  for (size_t round = first_order; finished < count && !deadlock; ++round) {
    emu::progress = false;
    for (size_t k = 0; k < count; ++k) {
      const size_t f = round % 2 == 0 ? k : count - 1 - k;
      if (fibers[f].done) continue;
      emu::current = f;
      emu::thread_index = {static_cast<unsigned>(f % threads), 0, 0};
      emu::block_index = {static_cast<unsigned>(f / threads), 0, 0};
      emu::block = block_state[f / threads].get();
      swapcontext(&emu::scheduler, &fibers[f].context);
      finished += fibers[f].done;
    }
    deadlock = !emu::progress;
  }
  emu::grid_barrier = nullptr;
  emu::fibers = nullptr;
  emu::body = nullptr;
  return !deadlock;
}

// The most rows per pass the emulated plans may stage (set_rows_cap): the tests run each
// case with the rule's own choice and with smaller caps, for several passes per step.
int64_t rows_cap = kMaxRows;

// The plan the launcher would make on a device with `sm_count` SMs and unlimited shared
// memory, its rows per pass capped at rows_cap.
ScanPlan plan(int64_t gates, int64_t hidden, bool backward, int64_t sm_count, int64_t batch) {
  return plan_scan(gates, sizeof(float), hidden, backward, sm_count, int64_t{1} << 40,
                   batch < rows_cap ? batch : rows_cap);
}

// Launches kernel_of(gates, rows) (a generic lambda naming the kernel instantiation) with
// the plan; returns the number of blocks times 100 plus the rows per pass.
template <typename Args, typename KernelOf>
int64_t launch_scan(const ScanPlan& p, int64_t gates, const Args& args, const KernelOf& kernel_of) {
  bool finished = false;
  kernels::with_rows(p.rows, [&](auto rows) {
    if (gates == 1) {
      finished = launch(p.blocks, kThreads, p.smem_bytes, kernel_of(std::integral_constant<int, 1>{}, rows), args, p);
    } else {
      finished = launch(p.blocks, kThreads, p.smem_bytes, kernel_of(std::integral_constant<int, 4>{}, rows), args, p);
    }
  });
  return finished ? p.blocks * 100 + p.rows : -1;
}

}  // namespace

// The emulation's own checks: each of 64 threads stores t + 1 to shared memory, then
// (after a __syncthreads if with_barrier) reads its neighbour's, t + shift (its own at
// the ends), into out[t]; and a kernel whose thread 0 leaves before the others'
// __syncthreads.
__global__ void barrier_probe_kernel(int with_barrier, int shift, float* out) {
  float* shared = reinterpret_cast<float*>(fused_rnn::cuda::kernels::dynamic_shared_memory());
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  shared[t] = static_cast<float>(t + 1);
  if (with_barrier) __syncthreads();
  const int neighbour = t + shift;
  out[t] = shared[neighbour >= 0 && neighbour < n ? neighbour : t];
}

__global__ void deadlock_probe_kernel() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

extern "C" {

int64_t emulate_barrier_probe(int with_barrier, int shift, float* out) {
  return launch(1, 64, 64 * sizeof(float), barrier_probe_kernel, with_barrier, shift, out) ? 0 : -1;
}

int64_t emulate_deadlock_probe() { return launch(1, 64, 0, deadlock_probe_kernel) ? 0 : -1; }

void set_rows_cap(int64_t cap) { rows_cap = cap; }

// gates: 1 (IRNN) or 4 (LSTM). Buffers as in ForwardArgs / BackwardArgs (persistent_scan.h).
// Returns the number of blocks the plan used times 100 plus its rows per pass (-1: the
// kernel deadlocked).
// mask [B, H], lengths [B] may be null; has_clip switches the IRNN's bound on.
int64_t emulate_scan_forward(int64_t gates, float* pre, const float* h0, const float* c0, const float* w_hh,
                             float* y, float* state, float* cells, int64_t steps, int64_t batch, int64_t hidden,
                             int64_t sm_count, const float* mask, const int64_t* lengths, float clip, int has_clip) {
  const ScanPlan p = plan(gates, hidden, false, sm_count, batch);
  ForwardArgs<float> args{pre, h0, c0, w_hh, y, state, cells, steps, batch, hidden};
  args.mask = mask;
  args.lengths = lengths;
  args.clip = clip;
  args.has_clip = has_clip != 0;
  return launch_scan(p, gates, args, [](auto g, auto rows) {
    return kernels::scan_forward_kernel<float, decltype(g)::value, decltype(rows)::value>;
  });
}

int64_t emulate_scan_backward(int64_t gates, const float* grad_y, const float* grad_h_n, const float* y,
                              const float* c0, const float* cells, const float* gate_values, const float* w_hh,
                              float* dpre, float* grad_c, float* grad_h0, int64_t steps, int64_t batch,
                              int64_t hidden, int64_t sm_count, const float* mask, const int64_t* lengths, float clip,
                              int has_clip) {
  const ScanPlan p = plan(gates, hidden, true, sm_count, batch);
  BackwardArgs<float> args{grad_y, grad_h_n, y,    c0,    cells, gate_values, w_hh,
                           dpre,   grad_c,   grad_h0, steps, batch, hidden};
  args.mask = mask;
  args.lengths = lengths;
  args.clip = clip;
  args.has_clip = has_clip != 0;
  return launch_scan(p, gates, args, [](auto g, auto rows) {
    return kernels::scan_backward_kernel<float, decltype(g)::value, decltype(rows)::value>;
  });
}

// The step kernels, with 2 blocks of 32 threads so that the grid-stride loops wrap; 0, or -1
// if the kernel deadlocked.
int64_t emulate_lstm_step(float* gate_values, const float* c, float* c_new, float* h_new, int64_t batch,
                       int64_t hidden) {
  return launch(2, 32, 0, kernels::lstm_step_kernel<float>, gate_values, c, c_new, h_new, batch, hidden) ? 0 : -1;
}

int64_t emulate_lstm_step_backward(const float* grad_h_new, const float* grad_c_new, const float* c,
                                const float* c_new, const float* gate_values, float* dgates, float* grad_c,
                                int64_t batch, int64_t hidden) {
  return launch(2, 32, 0, kernels::lstm_step_backward_kernel<float>, grad_h_new, grad_c_new, c, c_new, gate_values, dgates,
         grad_c, batch, hidden) ? 0 : -1;
}

int64_t emulate_irnn_step(const float* z, float* h_new, int64_t n) {
  return launch(2, 32, 0, kernels::irnn_step_kernel<float>, z, h_new, n) ? 0 : -1;
}

int64_t emulate_irnn_step_backward(const float* grad_h_new, const float* h_new, float* dz, int64_t n) {
  return launch(2, 32, 0, kernels::irnn_step_backward_kernel<float>, grad_h_new, h_new, dz, n) ? 0 : -1;
}

}  // extern "C"
