// How the launcher starts the kernels of cross_attention_cuda.cuh for a plan of
// cross_attention_cuda_plan.h: the shared-memory attribute, then the launch. Included by the
// launcher (cross_attention_cuda.cu: fp32 kernel, second stage) and by the files holding the
// tensor-core instantiations (cross_attention_cuda_f16.cu, cross_attention_cuda_bf16.cu), which
// nvcc compiles in parallel.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>  // C10_COMPILE_TIME_MAX_GPUS

#include <mutex>

#include "cross_attention_cuda.cuh"
#include "cross_attention_cuda_plan.h"

namespace attnmem::cuda {

struct LaunchTarget {
  int device;           // CUDA device index (current device)
  size_t device_optin;  // its sharedMemPerBlockOptin, uncapped
  cudaStream_t stream;
};

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) changes a per-(device, function) setting that
// every later launch of that function checks. Setting it before each launch to that launch's
// size would let two host threads race: one lowers it between the other's set and launch, and
// that launch fails with an invalid argument. So it is set once per (device, instantiation), to
// the largest size any plan of that instantiation can take on the device (max_plan_smem; the
// test-only opt-in cap only ever picks smaller plans). d = 0: the fp32 kernel.
template <auto Kernel>
void allow_max_dynamic_smem(const LaunchTarget& t, int d, int nkt) {
  static std::once_flag done[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_CHECK(t.device >= 0 && t.device < C10_COMPILE_TIME_MAX_GPUS,
              "cross_attention (CUDA kernel): device index ", t.device, " out of range");
  std::call_once(done[t.device], [&] {  // a throw leaves the flag unset: the next call retries
    const size_t bytes = max_plan_smem(d, nkt, t.device_optin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(Kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  });
}

template <auto Kernel>
void launch(const Plan& plan, const Params& p, const LaunchTarget& t, int d, int nkt) {
  allow_max_dynamic_smem<Kernel>(t, d, nkt);
  Kernel<<<static_cast<unsigned>(plan.ctas), plan.warps * 32, plan.smem, t.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dispatch_mma's callback: launches mma_kernel<Ops, D, NKT>.
template <typename Ops>
struct MmaLaunch {
  const Plan& plan;
  const Params& p;
  const LaunchTarget& t;
  template <int D, int NKT>
  void run() {
    TORCH_CHECK(NKT == plan.nkt, "cross_attention (CUDA kernel): key tiles ", NKT, " != plan ",
                plan.nkt);
    launch<mma_kernel<Ops, D, NKT>>(plan, p, t, D, NKT);
  }
};

// The tensor-core kernel for fp16 / bf16 inputs; false when p.D has no instantiation.
bool launch_mma_f16(const Plan& plan, const Params& p, const LaunchTarget& t);
bool launch_mma_bf16(const Plan& plan, const Params& p, const LaunchTarget& t);

}  // namespace attnmem::cuda
