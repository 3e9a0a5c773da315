// CUDA kernel of attnmem::cross_attention (docs/method.md §2): launcher and registration.
//
// Device code and its design (tiling, fragment layouts, numerical hazards) are in
// cross_attention_cuda.cuh; the launch plan (kernel, chunk of query rows per CTA, warps, Q
// prefetch depth, shared memory, vector loads, second stage) is computed by
// cross_attention_cuda_plan.h, which the host emulator test shares. This file turns tensors into
// that plan's inputs, allocates the outputs, launches (cross_attention_cuda_launch.cuh; the
// tensor-core instantiations are in cross_attention_cuda_f16.cu / _bf16.cu), and registers the
// op for CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "cross_attention_cuda_launch.cuh"
#include "cross_attention_cuda_plan.h"

namespace attnmem {

std::vector<int64_t> cuda_head_dims() {
#define ATTNMEM_LIST_DIM(d) d,
  return {ATTNMEM_CUDA_HEAD_DIMS(ATTNMEM_LIST_DIM)};
#undef ATTNMEM_LIST_DIM
}

int64_t cuda_f32_max_head_dim() { return cuda::kF32MaxD; }

namespace cuda {
namespace {

Operand operand(const at::Tensor& t) {
  Operand o{t.const_data_ptr(), {}, {}, static_cast<int64_t>(t.element_size())};
  for (int d = 0; d < 4; ++d) {
    o.size[d] = t.size(d);
    o.stride[d] = t.stride(d);
  }
  return o;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_len, const std::optional<at::Tensor>& bos_scale,
    std::optional<double> scale, bool stats, bool row_entropy) {
  const Dims dm = check_inputs(q, k, v, key_len, bos_scale);
  TORCH_CHECK(q.is_cuda(), "cross_attention (CUDA kernel): q must be a CUDA tensor, got ",
              q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "cross_attention (CUDA kernel): dtype must be float32, float16 or bfloat16, got ", st);
  const bool f32 = st == at::kFloat;
  if (f32) {
    TORCH_CHECK(head_dim_supported(true, dm.D), "cross_attention (CUDA kernel): float32 takes "
                "head dims 1 <= D <= ", kF32MaxD, ", got D = ", dm.D);
  } else {
    TORCH_CHECK(head_dim_supported(false, dm.D), "cross_attention (CUDA kernel): ", st,
                " takes head dims ", cuda_head_dims(), ", got D = ", dm.D);
  }
  const double sc = resolve_scale(scale, dm.D);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "cross_attention (CUDA kernel): needs compute capability 8.0 or "
              "newer (mma.sync m16n8k16, cp.async), got ", prop->major, ".", prop->minor);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const auto f32_opts = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({dm.B, dm.Nq, dm.H, dm.D}, q.options());
  at::Tensor row_ent =
      row_entropy ? at::empty({dm.B, dm.H, dm.Nq}, f32_opts) : at::empty({0}, f32_opts);
  at::Tensor prob_sum = stats ? at::empty({dm.B, dm.H, dm.Nk}, f32_opts) : at::empty({0}, f32_opts);
  at::Tensor ent_sum = stats ? at::empty({dm.B, dm.H}, f32_opts) : at::empty({0}, f32_opts);
  const int64_t BH = dm.B * dm.H;
  if (BH == 0 || dm.Nq == 0) {  // nothing to launch; sums over no query are zero
    if (stats) {
      prob_sum.zero_();
      ent_sum.zero_();
    }
    return {out, prob_sum, ent_sum, row_ent};
  }

  // key_len may arrive as any integer dtype; the kernel reads int64.
  at::Tensor kl_t, bs_t;
  if (key_len.has_value()) kl_t = key_len->to(at::kLong).contiguous();
  if (bos_scale.has_value()) bs_t = bos_scale->contiguous();

  const size_t device_optin = prop->sharedMemPerBlockOptin;
  size_t optin = device_optin;
  TORCH_CHECK(apply_smem_optin_cap(optin), "cross_attention (CUDA kernel): "
              "ATTNMEM_CUDA_SMEM_OPTIN_CAP must be a byte count, got '",
              std::getenv("ATTNMEM_CUDA_SMEM_OPTIN_CAP"), "'");
  const Plan plan = make_plan(f32, dm.B, dm.Nq, dm.H, dm.Nk, dm.D, optin, stats);
  TORCH_CHECK(plan.ctas <= INT32_MAX && dm.Nq <= INT32_MAX,
              "cross_attention (CUDA kernel): problem too large (", plan.ctas, " CTAs, Nq = ",
              dm.Nq, ")");
  TORCH_CHECK(plan.fits, "cross_attention (CUDA kernel): D = ", dm.D, ", Nk = ", dm.Nk, " needs ",
              plan.smem, " bytes of shared memory per block, the device allows ", optin);

  at::Tensor slot_p, slot_e;
  if (plan.second_stage) {
    slot_p = at::empty({BH, plan.nchunks, dm.Nk}, f32_opts);
    slot_e = at::empty({BH, plan.nchunks}, f32_opts);
  }
  Outputs o{};
  o.out = out.mutable_data_ptr();
  o.prob_sum = stats ? prob_sum.mutable_data_ptr<float>() : nullptr;
  o.ent_sum = stats ? ent_sum.mutable_data_ptr<float>() : nullptr;
  o.row_ent = row_entropy ? row_ent.mutable_data_ptr<float>() : nullptr;
  o.slot_p = plan.second_stage ? slot_p.mutable_data_ptr<float>() : nullptr;
  o.slot_e = plan.second_stage ? slot_e.mutable_data_ptr<float>() : nullptr;
  const Params p =
      make_params(plan, operand(q), operand(k), operand(v),
                  key_len.has_value() ? kl_t.const_data_ptr<int64_t>() : nullptr,
                  bos_scale.has_value() ? bs_t.const_data_ptr<float>() : nullptr, o, sc);

  const LaunchTarget target{q.get_device(), device_optin, stream};
  if (f32) {
    launch<f32_kernel>(plan, p, target, 0, 0);
  } else {
    const bool ok = st == at::kBFloat16 ? launch_mma_bf16(plan, p, target)
                                        : launch_mma_f16(plan, p, target);
    TORCH_CHECK(ok, "cross_attention (CUDA kernel): no tensor-core kernel for D = ", p.D);
  }
  if (plan.second_stage) {
    reduce_slots_kernel<<<static_cast<unsigned>(BH), kReduceThreads, 0, stream>>>(
        o.slot_p, o.slot_e, p.nchunks, p.Nk, o.prob_sum, o.ent_sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, prob_sum, ent_sum, row_ent};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnmem, CUDA, m) { m.impl("cross_attention", &cross_attention_cuda); }

}  // namespace cuda
}  // namespace attnmem
