// CUDA kernel of attnmem::cross_attention (SPEC §2): launcher, registration, head-dim list.
//
// Device code and its design (tiling, fragment layouts, numerical hazards) are in
// cross_attention_cuda.cuh. This file picks the kernel (tensor cores for fp16/bf16, fp32 FMAs for
// fp32), the chunk of query rows per CTA (from the shape only, so the statistics' summation
// order never depends on the device), the warps per CTA and the Q prefetch depth (from the
// device's shared memory), and runs the fixed-order second stage of the statistics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "cross_attention_cuda.cuh"

// Head dims with a compiled tensor-core kernel (each costs two Nk classes x two dtypes of compile
// time). attnmem/ops.py reads this list through build_info() and runs the reference for others.
#define ATTNMEM_CUDA_HEAD_DIMS(X) X(40) X(64) X(80) X(128) X(160)

namespace attnmem {

std::vector<int64_t> cuda_head_dims() {
#define ATTNMEM_LIST_DIM(d) d,
  return {ATTNMEM_CUDA_HEAD_DIMS(ATTNMEM_LIST_DIM)};
#undef ATTNMEM_LIST_DIM
}

namespace cuda {
namespace {

// A CTA covers at most 256 query rows; the chunk is halved until there are at least kMinCtas
// CTAs (two per SM of a 132-SM H100), so small Nq still spreads over the whole GPU. A constant,
// not the device's SM count: the chunking fixes the order in which the statistics are summed.
constexpr int64_t kMaxRowsPerCta = 256;
constexpr int64_t kMinCtas = 264;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int choose_tiles_per_cta(int64_t BH, int64_t Nq, int tile_rows) {
  const int64_t tiles = ceil_div(Nq, tile_rows);
  int64_t tpc = 1;
  while (2 * tpc * tile_rows <= kMaxRowsPerCta && tpc < tiles &&
         BH * ceil_div(tiles, 2 * tpc) >= kMinCtas) {
    tpc *= 2;
  }
  return static_cast<int>(tpc);
}

// True when every row of t (B, N, H, D) starts 16-byte aligned and is contiguous, so rows can be
// moved with 16-byte vector loads (D is a multiple of 8 for 16-bit types, of 4 for fp32).
bool rows_vectorizable(const at::Tensor& t) {
  const int64_t per16 = 16 / t.element_size();
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  if (t.size(3) > 1 && t.stride(3) != 1) return false;
  if (t.size(3) % per16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % per16 != 0) return false;
  }
  return true;
}

void set_smem(const void* kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

template <typename Ops, int D, int NKT>
void launch_mma(Params& p, int64_t ctas, size_t smem_optin, cudaStream_t stream) {
  using L = MmaLayout<D, NKT>;
  // Prefetching the next Q tile only helps a warp that runs more than one tile.
  int W = p.tiles_per_cta < kMaxWarps ? p.tiles_per_cta : kMaxWarps;
  int nbuf = p.tiles_per_cta > W ? 2 : 1;
  while (L::bytes(W, nbuf) > smem_optin && (nbuf > 1 || W > 1)) {
    if (nbuf > 1) {
      nbuf = 1;
    } else {
      W /= 2;
    }
  }
  const size_t smem = L::bytes(W, nbuf);
  TORCH_CHECK(smem <= smem_optin, "cross_attention (CUDA kernel): D = ", D, ", Nk = ", p.Nk,
              " needs ", smem, " bytes of shared memory per block, the device allows ", smem_optin);
  p.nbuf = nbuf;
  const auto kernel = mma_kernel<Ops, D, NKT>;
  set_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<static_cast<unsigned>(ctas), W * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Ops>
void dispatch_mma(Params& p, int64_t ctas, size_t smem_optin, cudaStream_t stream) {
  // Keys padded to 80 (5 tiles of 16) when they fit, else to 128: never 128 for SD's 77.
  const bool nk80 = p.Nk <= 80;
  switch (p.D) {
#define ATTNMEM_CASE_DIM(d)                                        \
  case d:                                                          \
    if (nk80) {                                                    \
      launch_mma<Ops, d, 5>(p, ctas, smem_optin, stream);          \
    } else {                                                       \
      launch_mma<Ops, d, 8>(p, ctas, smem_optin, stream);          \
    }                                                              \
    break;
    ATTNMEM_CUDA_HEAD_DIMS(ATTNMEM_CASE_DIM)
#undef ATTNMEM_CASE_DIM
    default:
      TORCH_CHECK(false, "cross_attention (CUDA kernel): unsupported head dim ", p.D);
  }
}

void launch_f32(Params& p, int64_t ctas, size_t smem_optin, cudaStream_t stream) {
  const F32Layout L(p.Nk, p.D);
  int W = p.tiles_per_cta < kMaxWarps ? p.tiles_per_cta : kMaxWarps;
  while (L.bytes(W, p.D) > smem_optin && W > 1) W /= 2;
  const size_t smem = L.bytes(W, p.D);
  TORCH_CHECK(smem <= smem_optin, "cross_attention (CUDA kernel): D = ", p.D, ", Nk = ", p.Nk,
              " needs ", smem, " bytes of shared memory per block, the device allows ", smem_optin);
  set_smem(reinterpret_cast<const void*>(f32_kernel), smem);
  f32_kernel<<<static_cast<unsigned>(ctas), W * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool head_dim_supported(int64_t D) {
  for (int64_t d : cuda_head_dims()) {
    if (d == D) return true;
  }
  return false;
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
  TORCH_CHECK(head_dim_supported(dm.D), "cross_attention (CUDA kernel): head dim D must be one of ",
              cuda_head_dims(), ", got D = ", dm.D);
  const double sc = resolve_scale(scale, dm.D);

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "cross_attention (CUDA kernel): needs compute capability 8.0 or "
              "newer (mma.sync m16n8k16, cp.async), got ", prop->major, ".", prop->minor);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({dm.B, dm.Nq, dm.H, dm.D}, q.options());
  at::Tensor row_ent = row_entropy ? at::empty({dm.B, dm.H, dm.Nq}, f32) : at::empty({0}, f32);
  at::Tensor prob_sum = stats ? at::empty({dm.B, dm.H, dm.Nk}, f32) : at::empty({0}, f32);
  at::Tensor ent_sum = stats ? at::empty({dm.B, dm.H}, f32) : at::empty({0}, f32);
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

  const bool f32_path = st == at::kFloat;
  const int tile_rows = f32_path ? kTileRowsF32 : kTileRows;
  const int tpc = choose_tiles_per_cta(BH, dm.Nq, tile_rows);
  const int64_t nchunks = ceil_div(dm.Nq, int64_t(tpc) * tile_rows);
  const int64_t ctas = BH * nchunks;
  TORCH_CHECK(ctas <= INT32_MAX && dm.Nq <= INT32_MAX,
              "cross_attention (CUDA kernel): problem too large (", ctas, " CTAs, Nq = ", dm.Nq,
              ")");

  // Per-CTA statistics slots. With one chunk per (b, h) the slots are the result itself.
  at::Tensor slot_p, slot_e;
  if (stats) {
    if (nchunks == 1) {
      slot_p = prob_sum;
      slot_e = ent_sum;
    } else {
      slot_p = at::empty({BH, nchunks, dm.Nk}, f32);
      slot_e = at::empty({BH, nchunks}, f32);
    }
  }

  Params p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.key_len = key_len.has_value() ? kl_t.const_data_ptr<int64_t>() : nullptr;
  p.bos_scale = bos_scale.has_value() ? bs_t.const_data_ptr<float>() : nullptr;
  p.slot_p = stats ? slot_p.mutable_data_ptr<float>() : nullptr;
  p.slot_e = stats ? slot_e.mutable_data_ptr<float>() : nullptr;
  p.row_ent = row_entropy ? row_ent.mutable_data_ptr<float>() : nullptr;
  for (int d = 0; d < 4; ++d) {
    p.qs[d] = q.stride(d);
    p.ks[d] = k.stride(d);
    p.vs[d] = v.stride(d);
  }
  p.B = static_cast<int>(dm.B);
  p.Nq = static_cast<int>(dm.Nq);
  p.H = static_cast<int>(dm.H);
  p.Nk = static_cast<int>(dm.Nk);
  p.D = static_cast<int>(dm.D);
  p.tiles_per_cta = tpc;
  p.nchunks = static_cast<int>(nchunks);
  p.nbuf = 1;
  p.q_vec = rows_vectorizable(q);
  p.k_vec = rows_vectorizable(k);
  p.v_vec = rows_vectorizable(v);

  const size_t smem_optin = prop->sharedMemPerBlockOptin;
  if (f32_path) {
    p.scale = static_cast<float>(sc);
    launch_f32(p, ctas, smem_optin, stream);
  } else {
    p.scale = static_cast<float>(sc * 1.4426950408889634);  // log2(e): softmax runs on exp2
    if (st == at::kHalf) {
      dispatch_mma<HalfOps>(p, ctas, smem_optin, stream);
    } else {
      dispatch_mma<BFloat16Ops>(p, ctas, smem_optin, stream);
    }
  }

  if (stats && nchunks > 1) {
    reduce_slots_kernel<<<static_cast<unsigned>(BH), 128, 0, stream>>>(
        slot_p.const_data_ptr<float>(), slot_e.const_data_ptr<float>(), p.nchunks, p.Nk,
        prob_sum.mutable_data_ptr<float>(), ent_sum.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, prob_sum, ent_sum, row_ent};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnmem, CUDA, m) { m.impl("cross_attention", &cross_attention_cuda); }

}  // namespace cuda
}  // namespace attnmem
