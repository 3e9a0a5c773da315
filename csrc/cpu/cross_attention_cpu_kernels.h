// Row-block math of the CPU cross-attention kernel: scores, softmax, entropy, PV.
//
// A "row block" is R <= 4 query rows of one (batch, head). Keys and values of that head are
// staged once per head as fp32 (fp64 for fp64 inputs):
//   KT: (D, Nkp)  keys transposed, zero-padded to Nkp = roundup(Nk, 16) columns
//   V : (Nk, Dp)  values, zero-padded to Dp = roundup(D, 16) columns
// so every inner loop runs over whole vectors (8 or 16 floats) without tails.
//
// Per row (docs/method.md §2):  s_j = scale <q, k_j>;  s_0 *= bos;  keys j >= kl are masked;
//   m = max_{j<kl} s_j;  e_j = exp(s_j - m);  l = sum e_j;  p_j = e_j / l;
//   entropy = ln l - sum_j p_j (s_j - m)      (one log per row, none per element)
//   out = sum_{j<kl} p_j v_j
// The mask is a prefix (j >= kl), so masked keys are never read: loops stop at kl, and the lanes
// of the last partial vector are cleared with a bit mask after exp (never multiplied by -inf,
// so no 0 * inf = NaN). A row with kl = 0 gives out = 0, entropy 0, no contribution to sums.
//
// Numerical hazards: the max subtraction keeps exp's argument <= 0; exp's argument is clamped
// to >= -87 so the vector exp never forms a denormal exponent (values below e^-87 ~ 1.6e-38
// are far below fp32 resolution of a sum that contains e^0 = 1).
// Non-finite input: a row with a NaN or infinite unmasked logit (a NaN or inf in q, or in an
// unmasked key) gives NaN output, probabilities and entropy, like attnmem/reference.py: the sum
// of (s_j - s_j) over the unmasked keys is 0 for finite logits and NaN otherwise, and is added
// to the softmax denominator. (max() and the clamped exp would otherwise drop NaNs silently.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ATTNMEM_HAVE_X86_SIMD 1
#include <immintrin.h>
#else
#define ATTNMEM_HAVE_X86_SIMD 0
#endif

namespace attnmem::cpu {

constexpr int64_t kRowBlock = 4;
constexpr int64_t kPad = 16;  // Nk and D are padded to a multiple of this (the widest vector)

// One row block's inputs and outputs. Pointers to scratch are owned by the caller.
template <typename acc_t>
struct RowBlock {
  const acc_t* Q;  // R x D, row r at Q + r * ldq
  int64_t ldq;
  int64_t R;
  int64_t D, Dp, Nkp;
  const acc_t* KT;  // D x Nkp
  const acc_t* V;   // Nk x Dp
  int64_t kl;       // number of unmasked keys (prefix), 0..Nk
  acc_t bos;        // multiplier of key 0's logit
  acc_t scale;
  acc_t* S;        // R x Nkp scratch: scores, then probabilities
  acc_t* O;        // R x Dp: output rows
  acc_t* psum;     // Nkp: running sum of probabilities (stats), or nullptr
  acc_t* ent;      // R: per-row entropy
};

// ---------------------------------------------------------------------------------------------
// Portable path (any acc_t; fp64 inputs and machines without AVX2 use it).
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
inline void row_block_generic(const RowBlock<acc_t>& a) {
  for (int64_t r = 0; r < a.R; ++r) {
    acc_t* s = a.S + r * a.Nkp;
    acc_t* o = a.O + r * a.Dp;
    std::fill(o, o + a.Dp, acc_t(0));
    if (a.kl == 0) {
      a.ent[r] = 0;
      continue;
    }
    const acc_t* qr = a.Q + r * a.ldq;
    for (int64_t j = 0; j < a.kl; ++j) s[j] = 0;
    for (int64_t d = 0; d < a.D; ++d) {
      const acc_t qd = qr[d];
      const acc_t* kt = a.KT + d * a.Nkp;
      for (int64_t j = 0; j < a.kl; ++j) s[j] += qd * kt[j];
    }
    for (int64_t j = 0; j < a.kl; ++j) s[j] *= a.scale;
    s[0] *= a.bos;
    acc_t m = s[0];
    acc_t nf = 0;  // 0 when every unmasked logit is finite, NaN otherwise (x - x)
    for (int64_t j = 0; j < a.kl; ++j) {
      m = std::max(m, s[j]);
      nf += s[j] - s[j];
    }
    acc_t l = 0, t = 0;
    for (int64_t j = 0; j < a.kl; ++j) {
      const acc_t x = s[j] - m;
      const acc_t e = std::exp(x);
      l += e;
      t += e * x;
      s[j] = e;
    }
    l += nf;  // a non-finite logit makes the whole row NaN, as in the reference
    const acc_t inv = acc_t(1) / l;
    a.ent[r] = std::log(l) - t * inv;
    for (int64_t j = 0; j < a.kl; ++j) {
      const acc_t p = s[j] * inv;
      s[j] = p;
      if (a.psum) a.psum[j] += p;
      const acc_t* vj = a.V + j * a.Dp;
      for (int64_t d = 0; d < a.Dp; ++d) o[d] += p * vj[d];
    }
  }
}


#if ATTNMEM_HAVE_X86_SIMD
// ---------------------------------------------------------------------------------------------
// x86-64 SIMD paths for fp32 math: AVX2+FMA (8 lanes) and AVX-512 (16 lanes). Each is compiled
// for its instruction set by a target region (never by -march flags) and chosen at run time
// (see simd_level() in cross_attention_cpu.cpp), so the default build runs on any x86-64.
// exp is the Cephes expf polynomial (~1 ulp) for x <= 0: x = n ln2 + r, |r| <= ln2 / 2; its
// argument is clamped to [-87, 0] so 2^n never becomes a denormal or negative exponent.
// ---------------------------------------------------------------------------------------------
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
struct Vec {
  using reg = __m256;
  using mask = __m256;
  static constexpr int W = 8;
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg set1(float x) { return _mm256_set1_ps(x); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static inline reg bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline mask first_n(int64_t n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx));
  }
  static inline reg fill_outside(mask m, reg x, reg fill) { return _mm256_blendv_ps(fill, x, m); }
  static inline reg zero_outside(mask m, reg x) { return _mm256_and_ps(x, m); }
  static inline reg exp_nonpos(reg x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    x = _mm256_min_ps(x, _mm256_set1_ps(0.0f));
    const reg fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    reg y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i n = _mm256_cvtps_epi32(fx);
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
  }
  static inline float hsum(reg x) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
  }
  static inline float hmax(reg x) {
    __m128 lo = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
  }
  static inline reg load_cvt(const float* p) { return load(p); }
  static inline reg load_cvt(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline reg load_cvt(const c10::BFloat16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline void store_cvt(float* p, reg x) { store(p, x); }
  static inline void store_cvt(c10::Half* p, reg x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  static inline void store_cvt(c10::BFloat16* p, reg x) {
    // Round to nearest even, as c10::BFloat16(float) does; NaN stays NaN.
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  // Partial vectors (n < W lanes): through a small buffer, converted like the scalar path.
  template <typename T>
  static inline reg load_cvt_n(const T* p, int64_t n) {
    alignas(32) float buf[W] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return _mm256_load_ps(buf);
  }
  static inline void store_n(float* p, reg x, int64_t n) {
    _mm256_maskstore_ps(p, _mm256_castps_si256(first_n(n)), x);
  }
  template <typename T>
  static inline void store_cvt_n(T* p, reg x, int64_t n) {
    alignas(32) float buf[W];
    _mm256_store_ps(buf, x);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
};
constexpr int kMaxNV = 3;  // 4 rows x 3 vectors = 12 accumulators of 16 ymm registers
#include "cross_attention_cpu_vec.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif
namespace avx512 {
struct Vec {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int W = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg set1(float x) { return _mm512_set1_ps(x); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static inline reg bcast(const float* p) { return _mm512_set1_ps(*p); }
  static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static inline mask first_n(int64_t n) { return static_cast<mask>((1u << n) - 1u); }
  static inline reg fill_outside(mask m, reg x, reg fill) { return _mm512_mask_blend_ps(m, fill, x); }
  static inline reg zero_outside(mask m, reg x) { return _mm512_maskz_mov_ps(m, x); }
  static inline reg exp_nonpos(reg x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(0.0f));
    const reg fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    reg r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
    reg y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i n = _mm512_cvtps_epi32(fx);
    const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2n));
  }
  static inline float hsum(reg x) { return _mm512_reduce_add_ps(x); }
  static inline float hmax(reg x) { return _mm512_reduce_max_ps(x); }
  static inline reg load_cvt(const float* p) { return load(p); }
  static inline reg load_cvt(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline reg load_cvt(const c10::BFloat16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static inline void store_cvt(float* p, reg x) { store(p, x); }
  static inline void store_cvt(c10::Half* p, reg x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  static inline void store_cvt(c10::BFloat16* p, reg x) {
    // Round to nearest even, as c10::BFloat16(float) does; NaN stays NaN.
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static inline reg load_cvt_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_n(n), p); }
  static inline reg load_cvt_n(const c10::Half* p, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_n(n), p));
  }
  static inline reg load_cvt_n(const c10::BFloat16* p, int64_t n) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first_n(n), p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static inline void store_n(float* p, reg x, int64_t n) { _mm512_mask_storeu_ps(p, first_n(n), x); }
  template <typename T>
  static inline void store_cvt_n(T* p, reg x, int64_t n) {
    alignas(64) float buf[W];
    _mm512_store_ps(buf, x);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
  static inline void store_cvt_n(float* p, reg x, int64_t n) { store_n(p, x, n); }
};
constexpr int kMaxNV = 5;  // 4 rows x 5 vectors = 20 accumulators of 32 zmm registers
#include "cross_attention_cpu_vec.h"
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // ATTNMEM_HAVE_X86_SIMD

}  // namespace attnmem::cpu
