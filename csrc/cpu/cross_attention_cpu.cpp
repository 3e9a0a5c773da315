// CPU kernel of attnmem::cross_attention (docs/method.md §2): driver, statistics reduction,
// registration.
//
// Shapes: q (B, Nq, H, D), k/v (B, Nk, H, D) with any strides (diffusers hands us views of
// (B, N, H*D) projections: no transpose copies are made). out is written contiguous
// (B, Nq, H, D) so the caller's reshape to (B, Nq, H*D) is free.
//
// Work split: a work item is (b, h, chunk of kChunk query rows). Items are independent and
// each is computed by one thread from start to end, so the result does not depend on the
// number of threads. Per-token probability sums and entropy sums of an item go to their own
// slot; a second pass adds the slots of each (b, h) in chunk order. No atomics, bit-identical
// for any thread count. Keys and values of the current head are staged once per thread per
// head into fp32 (fp64 for fp64 inputs) buffers padded to multiples of kPad = 16 (see
// cross_attention_cpu_kernels.h for the row math and its numerical hazards).
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "cross_attention_cpu.h"
#include "cross_attention_cpu_kernels.h"

namespace attnmem::cpu {

namespace {

constexpr int64_t kChunk = 64;  // query rows per work item (fixed: determinism)

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Instruction sets, best last. Chosen once per call: the best this machine runs, optionally
// capped by ATTNMEM_CPU_ISA=generic|avx2 (tests use it to check every path).
enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

int detected_isa() {
#if ATTNMEM_HAVE_X86_SIMD
  static const int isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vl");
    return avx512 ? kAvx512 : avx2 ? kAvx2 : kGeneric;
  }();
  return isa;
#else
  return kGeneric;
#endif
}

int selected_isa() {
  int isa = detected_isa();
  if (const char* cap = std::getenv("ATTNMEM_CPU_ISA")) {
    const std::string c(cap);
    if (c == "generic") isa = std::min(isa, int(kGeneric));
    else if (c == "avx2") isa = std::min(isa, int(kAvx2));
  }
  return isa;
}

const char* isa_name(int isa) {
  return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "generic";
}

template <typename scalar_t, typename acc_t, int isa>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* key_len,
         const float* bos_scale, acc_t scale, const Dims& dm, at::Tensor& out, float* psum_slots,
         float* ent_slots, float* row_ent) {
  const int64_t B = dm.B, Nq = dm.Nq, H = dm.H, D = dm.D, Nk = dm.Nk;
  const int64_t Nkp = round_up(Nk, kPad), Dp = round_up(D, kPad);
  const int64_t nchunk = (Nq + kChunk - 1) / kChunk;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2), qs3 = q.stride(3);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2), ks3 = k.stride(3);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2), vs3 = v.stride(3);
  const bool want_stats = psum_slots != nullptr;

  at::parallel_for(0, B * H * nchunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> KT(D * Nkp, acc_t(0)), V(Nk * Dp, acc_t(0));
    std::vector<acc_t> Q(kRowBlock * D), S(kRowBlock * Nkp), O(kRowBlock * Dp), ent(kRowBlock);
    std::vector<acc_t> psum(Nkp);
    int64_t staged = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nchunk, c = item % nchunk;
      const int64_t b = bh / H, h = bh % H;
      if (bh != staged) {
        for (int64_t j = 0; j < Nk; ++j) {
          const scalar_t* kj = kp + b * ks0 + j * ks1 + h * ks2;
          const scalar_t* vj = vp + b * vs0 + j * vs1 + h * vs2;
          for (int64_t d = 0; d < D; ++d) {
            KT[d * Nkp + j] = static_cast<acc_t>(kj[d * ks3]);
            V[j * Dp + d] = static_cast<acc_t>(vj[d * vs3]);
          }
        }
        staged = bh;
      }
      const int64_t kl = key_len ? key_len[b] : Nk;
      const acc_t bos = bos_scale ? static_cast<acc_t>(bos_scale[b]) : acc_t(1);
      std::fill(psum.begin(), psum.end(), acc_t(0));
      acc_t ent_item = 0;
      const int64_t i_end = std::min(Nq, (c + 1) * kChunk);
      for (int64_t i0 = c * kChunk; i0 < i_end; i0 += kRowBlock) {
        const int64_t R = std::min(kRowBlock, i_end - i0);
        const scalar_t* qrow = qp + b * qs0 + i0 * qs1 + h * qs2;
        scalar_t* orow = op + ((b * Nq + i0) * H + h) * D;
        RowBlock<acc_t> a{Q.data(), D,        R,    D,   Dp,       Nkp,      KT.data(),
                          V.data(), kl,       bos,  scale,    S.data(), O.data(),
                          want_stats ? psum.data() : nullptr, ent.data()};
#if ATTNMEM_HAVE_X86_SIMD
        if constexpr (std::is_same_v<scalar_t, float> && isa != kGeneric) {
          if (qs3 == 1) {  // fp32 rows with unit stride are read in place: no copy
            a.Q = qrow;
            a.ldq = qs1;
          }
        }
        if constexpr (isa == kAvx512) {
          if (a.Q == Q.data())
            for (int64_t r = 0; r < R; ++r) avx512::load_row(qrow + r * qs1, qs3, D, Q.data() + r * D);
          avx512::row_block(a);
          for (int64_t r = 0; r < R; ++r) avx512::store_row(O.data() + r * Dp, D, orow + r * H * D);
        } else if constexpr (isa == kAvx2) {
          if (a.Q == Q.data())
            for (int64_t r = 0; r < R; ++r) avx2::load_row(qrow + r * qs1, qs3, D, Q.data() + r * D);
          avx2::row_block(a);
          for (int64_t r = 0; r < R; ++r) avx2::store_row(O.data() + r * Dp, D, orow + r * H * D);
        } else
#endif
        {
          for (int64_t r = 0; r < R; ++r)
            for (int64_t d = 0; d < D; ++d) Q[r * D + d] = static_cast<acc_t>(qrow[r * qs1 + d * qs3]);
          row_block_generic(a);
          for (int64_t r = 0; r < R; ++r)
            for (int64_t d = 0; d < D; ++d) orow[r * H * D + d] = static_cast<scalar_t>(O[r * Dp + d]);
        }
        for (int64_t r = 0; r < R; ++r) {
          ent_item += ent[r];
          if (row_ent) row_ent[bh * Nq + i0 + r] = static_cast<float>(ent[r]);
        }
      }
      if (want_stats) {
        float* slot = psum_slots + (bh * nchunk + c) * Nk;
        for (int64_t j = 0; j < Nk; ++j) slot[j] = static_cast<float>(psum[j]);
        ent_slots[bh * nchunk + c] = static_cast<float>(ent_item);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_len, const std::optional<at::Tensor>& bos_scale,
    std::optional<double> scale, bool stats, bool row_entropy) {
  const Dims dm = check_inputs(q, k, v, key_len, bos_scale);
  TORCH_CHECK(q.device().is_cpu(), "cross_attention (CPU kernel): q must be on the CPU, got ",
              q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "cross_attention (CPU kernel): dtype must be float32, float16, bfloat16 or float64, got ",
              st);
  const double sc = resolve_scale(scale, dm.D);
  const int64_t nchunk = (dm.Nq + kChunk - 1) / kChunk;
  const auto f32 = q.options().dtype(at::kFloat);

  at::Tensor out = at::empty({dm.B, dm.Nq, dm.H, dm.D}, q.options());
  at::Tensor kl_t, bs_t;
  if (key_len.has_value()) kl_t = key_len->to(at::kLong).contiguous();
  if (bos_scale.has_value()) bs_t = bos_scale->contiguous();
  at::Tensor psum_slots, ent_slots;
  if (stats) {
    psum_slots = at::empty({dm.B * dm.H, nchunk, dm.Nk}, f32);
    ent_slots = at::empty({dm.B * dm.H, nchunk}, f32);
  }
  at::Tensor row_ent = row_entropy ? at::empty({dm.B, dm.H, dm.Nq}, f32) : at::empty({0}, f32);
  const int isa = selected_isa();
  const int64_t* klp = key_len.has_value() ? kl_t.const_data_ptr<int64_t>() : nullptr;
  const float* bsp = bos_scale.has_value() ? bs_t.const_data_ptr<float>() : nullptr;
  float* pss = stats ? psum_slots.mutable_data_ptr<float>() : nullptr;
  float* ess = stats ? ent_slots.mutable_data_ptr<float>() : nullptr;
  float* rep = row_entropy ? row_ent.mutable_data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "attnmem_cross_attention_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      run<double, double, kGeneric>(q, k, v, klp, bsp, sc, dm, out, pss, ess, rep);
    } else {
      const float scf = static_cast<float>(sc);
      if (isa == kAvx512) {
        run<scalar_t, float, kAvx512>(q, k, v, klp, bsp, scf, dm, out, pss, ess, rep);
      } else if (isa == kAvx2) {
        run<scalar_t, float, kAvx2>(q, k, v, klp, bsp, scf, dm, out, pss, ess, rep);
      } else {
        run<scalar_t, float, kGeneric>(q, k, v, klp, bsp, scf, dm, out, pss, ess, rep);
      }
    }
  });

  if (!stats) return {out, at::empty({0}, f32), at::empty({0}, f32), row_ent};

  // Second stage: fixed-order sum of the per-chunk slots.
  at::Tensor prob_sum = at::zeros({dm.B, dm.H, dm.Nk}, f32);
  at::Tensor ent_sum = at::zeros({dm.B, dm.H}, f32);
  const float* ps = psum_slots.const_data_ptr<float>();
  const float* es = ent_slots.const_data_ptr<float>();
  float* po = prob_sum.mutable_data_ptr<float>();
  float* eo = ent_sum.mutable_data_ptr<float>();
  const int64_t Nk = dm.Nk;
  at::parallel_for(0, dm.B * dm.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      float* dst = po + bh * Nk;
      float e = 0.0f;
      for (int64_t c = 0; c < nchunk; ++c) {
        const float* src = ps + (bh * nchunk + c) * Nk;
        for (int64_t j = 0; j < Nk; ++j) dst[j] += src[j];
        e += es[bh * nchunk + c];
      }
      eo[bh] = e;
    }
  });
  return {out, prob_sum, ent_sum, row_ent};
}

}  // namespace

bool simd_compiled() { return ATTNMEM_HAVE_X86_SIMD != 0; }

std::string simd_runtime() { return isa_name(selected_isa()); }

TORCH_LIBRARY_IMPL(attnmem, CPU, m) { m.impl("cross_attention", &cross_attention_cpu); }

}  // namespace attnmem::cpu
