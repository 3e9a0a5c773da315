// attnmem::cross_attention: schema registration and the pybind11 module `attnmem._C`.
//
// The op (docs/method.md §2):
//   cross_attention(q (B, Nq, H, D), k (B, Nk, H, D), v (B, Nk, H, D),
//                   key_len (B,) int or None, bos_scale (B,) f32 or None, scale float or None,
//                   stats bool, row_entropy bool)
//     -> out (B, Nq, H, D) in q's dtype (contiguous, so `to_out` reads it without a copy),
//        prob_sum (B, H, Nk) f32, ent_sum (B, H) f32, row_ent (B, H, Nq) f32
//   Statistics that were not asked for are returned as empty tensors.
//
// Kernels are registered per dispatch key in cpu/cross_attention_cpu.cpp and
// cuda/cross_attention_cuda.cu. The fake kernel and autograd formula live in attnmem/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/cross_attention_cpu.h"

#ifdef ATTNMEM_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION

namespace attnmem {
std::vector<int64_t> cuda_head_dims();  // defined in cuda/cross_attention_cuda.cu
int64_t cuda_f32_max_head_dim();
}  // namespace attnmem
#endif

// Set by setup.py: TORCH_CUDA_ARCH_LIST as given, and what nvcc built for it ("sm_80;sm_90;
// compute_90": machine code per sm_XY, PTX per compute_XY), which attnmem/ops.py compares with
// the device's compute capability.
#ifndef ATTNMEM_CUDA_ARCH_LIST
#define ATTNMEM_CUDA_ARCH_LIST ""
#endif
#ifndef ATTNMEM_CUDA_TARGETS
#define ATTNMEM_CUDA_TARGETS ""
#endif
// Set by setup.py when it built the CPU kernel alone: why the CUDA kernel was not built.
#ifndef ATTNMEM_NO_CUDA_REASON
#define ATTNMEM_NO_CUDA_REASON ""
#endif

TORCH_LIBRARY(attnmem, m) {
  m.def(
      "cross_attention(Tensor q, Tensor k, Tensor v, Tensor? key_len, Tensor? bos_scale, "
      "float? scale, bool stats, bool row_entropy) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  info["cpu"] = true;
  info["cpu_simd_compiled"] = attnmem::cpu::simd_compiled();
  info["cpu_simd_runtime"] = attnmem::cpu::simd_runtime();
  info["max_keys"] = attnmem::kMaxKeys;
#ifdef ATTNMEM_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." +
                         std::to_string((CUDA_VERSION % 1000) / 10);
  info["cuda_arch_list"] = std::string(ATTNMEM_CUDA_ARCH_LIST);
  info["cuda_targets"] = std::string(ATTNMEM_CUDA_TARGETS);
  info["cuda_head_dims"] = attnmem::cuda_head_dims();
  info["cuda_f32_max_head_dim"] = attnmem::cuda_f32_max_head_dim();
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_arch_list"] = std::string("");
  info["cuda_targets"] = std::string("");
  info["cuda_head_dims"] = std::vector<int64_t>{};
  info["cuda_f32_max_head_dim"] = 0;
  info["cuda_not_built"] = std::string(ATTNMEM_NO_CUDA_REASON);
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnmem compiled kernels: fused cross-attention with attention statistics";
  m.def("build_info", &build_info, "What this module was built with: devices, versions, limits.");
}
