// Build facts recorded at compile time by setup.py (through -D definitions) and
// reported by fused_rnn.build_info().
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "cpu/common.h"

namespace fused_rnn {

#if defined(FUSED_RNN_WITH_CUDA)
// Defined in csrc/cuda/device.cu, compiled by nvcc.
int cuda_runtime_version_compiled();
#endif

inline pybind11::dict build_info_dict() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpp");
  pybind11::list archs;
#if defined(FUSED_RNN_WITH_CUDA)
  backends.append("cuda");
  info["cuda_compiled"] = true;
  info["cuda_version"] = cuda_runtime_version_compiled();
  // FUSED_RNN_CUDA_ARCHS is "80;90": reported as ["sm_80", "sm_90"]
  std::string arch_list = FUSED_RNN_CUDA_ARCHS;
  size_t start = 0;
  while (start < arch_list.size()) {
    size_t end = arch_list.find(';', start);
    if (end == std::string::npos) end = arch_list.size();
    if (end > start) archs.append("sm_" + arch_list.substr(start, end - start));
    start = end + 1;
  }
#else
  info["cuda_compiled"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["backends"] = backends;
  info["cuda_archs"] = archs;
  info["torch_version"] = FUSED_RNN_TORCH_VERSION;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cxx_flags"] = FUSED_RNN_CXX_FLAGS;
  // the float32 scans' per-step GEMM on this CPU now (csrc/cpu/blas.h, RecurrentGemm)
  info["cpu_gemm"] = cpu::gemm_kernel_name(cpu::gemm_kernel());
  // the instruction set the CPU scans' pointwise row loops run with, which follows it (csrc/cpu/common.h)
  info["cpu_loops"] = cpu::row_isa_name(cpu::row_isa());
  // the products of a bfloat16 layer's CPU scans (csrc/cpu/gemm_bf16.h): "avx512_bf16", "emulated" (FUSED_RNN_CPU_BF16=emulate, for the tests), or "off" (float32)
  info["cpu_bf16"] = cpu::bf16_products_name(cpu::bf16_products());
  return info;
}

}  // namespace fused_rnn
