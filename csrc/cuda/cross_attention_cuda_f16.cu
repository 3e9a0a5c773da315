// The fp16 instantiations of the tensor-core kernel (every head dim x key class), in a file of
// their own so that nvcc compiles them in parallel with the bf16 ones and the launcher.
#define ATTNMEM_CUDA_TENSOR_CORE_ONLY  // the non-template kernels are in cross_attention_cuda.cu
#include "cross_attention_cuda_launch.cuh"

namespace attnmem::cuda {

bool launch_mma_f16(const Plan& plan, const Params& p, const LaunchTarget& t) {
  MmaLaunch<HalfOps> launch{plan, p, t};
  return dispatch_mma(p.D, p.Nk, launch);
}

}  // namespace attnmem::cuda
