// SIMD body of the CPU kernel, written once against a small vector interface `Vec` and
// included once per instruction set (see cross_attention_cpu_kernels.h): inside a namespace
// that defines `Vec` and `kMaxNV`, within a region compiled for that instruction set.
// No include guard on purpose.
//
// Vec provides: W (lanes), reg, mask, zero, set1, load, store, bcast, fmadd, add, sub, mul, max,
// first_n(n) (lanes [0, n)), fill_outside(m, x, fill), zero_outside(m, x), exp_nonpos(x),
// hsum, hmax, and load/store with conversion from/to float, c10::Half, c10::BFloat16.
//
// Register blocking: kRowBlock query rows x NV vectors of accumulators (NV <= kMaxNV), so
// every key (scores) or value (PV) vector loaded from L1 feeds kRowBlock FMAs.

// S[r, j0 : j0 + W NV] = scale * Q[r, :] . KT[:, j0 : j0 + W NV]  for r < R.
template <int R, int NV>
inline void scores_tile(const float* Q, int64_t ldq, int64_t D, const float* KT, int64_t Nkp,
                        int64_t j0, float* S, float scale) {
  typename Vec::reg acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
  for (int64_t d = 0; d < D; ++d) {
    const float* kt = KT + d * Nkp + j0;
    typename Vec::reg kv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) kv[v] = Vec::load(kt + Vec::W * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const auto qb = Vec::bcast(Q + r * ldq + d);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fmadd(qb, kv[v], acc[r][v]);
    }
  }
  const auto sc = Vec::set1(scale);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) Vec::store(S + r * Nkp + j0 + Vec::W * v, Vec::mul(acc[r][v], sc));
}

// O[r, d0 : d0 + W NV] = sum_{j < kl} P[r, j] V[j, d0 : d0 + W NV]  for r < R.
template <int R, int NV>
inline void pv_tile(const float* P, int64_t Nkp, const float* V, int64_t Dp, int64_t kl,
                    int64_t d0, float* O) {
  typename Vec::reg acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
  for (int64_t j = 0; j < kl; ++j) {
    const float* vj = V + j * Dp + d0;
    typename Vec::reg vv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vv[v] = Vec::load(vj + Vec::W * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const auto pb = Vec::bcast(P + r * Nkp + j);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fmadd(pb, vv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) Vec::store(O + r * Dp + d0 + Vec::W * v, acc[r][v]);
}

// Run tiles of kMaxNV vectors over `nvec` vectors, then one tile for the remainder.
template <int R, int NV>
inline void scores_rest(int64_t rem, const float* Q, int64_t ldq, int64_t D, const float* KT,
                        int64_t Nkp, int64_t j0, float* S, float scale) {
  if constexpr (NV >= 1) {
    if (rem == NV) return scores_tile<R, NV>(Q, ldq, D, KT, Nkp, j0, S, scale);
    scores_rest<R, NV - 1>(rem, Q, ldq, D, KT, Nkp, j0, S, scale);
  }
}

template <int R, int NV>
inline void pv_rest(int64_t rem, const float* P, int64_t Nkp, const float* V, int64_t Dp,
                    int64_t kl, int64_t d0, float* O) {
  if constexpr (NV >= 1) {
    if (rem == NV) return pv_tile<R, NV>(P, Nkp, V, Dp, kl, d0, O);
    pv_rest<R, NV - 1>(rem, P, Nkp, V, Dp, kl, d0, O);
  }
}

// Softmax, entropy and probability sums of R score rows, in place (the rows become p). The R
// rows are interleaved in every pass so their reductions (max, sums) overlap instead of
// waiting on each other; probability sums are added to psum in a fixed order (row 0 first).
template <int R>
inline void softmax_rows(float* S, int64_t Nkp, int64_t kl, float* psum, float* ent) {
  constexpr int W = Vec::W;
  const int64_t nvec = (kl + W - 1) / W;
  const auto tail = Vec::first_n(kl - W * (nvec - 1));
  const auto ninf = Vec::set1(-std::numeric_limits<float>::infinity());
  typename Vec::reg vmax[R], vnf[R], m[R], vl[R], vt[R], inv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    vmax[r] = ninf;
    vnf[r] = Vec::zero();
  }
  for (int64_t v = 0; v < nvec; ++v) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      auto x = Vec::load(S + r * Nkp + W * v);
      auto nf = Vec::sub(x, x);  // 0 for a finite logit, NaN otherwise (kernels.h)
      if (v == nvec - 1) {
        x = Vec::fill_outside(tail, x, ninf);
        nf = Vec::zero_outside(tail, nf);
      }
      vmax[r] = Vec::max(vmax[r], x);
      vnf[r] = Vec::add(vnf[r], nf);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    m[r] = Vec::set1(Vec::hmax(vmax[r]));
    vl[r] = Vec::zero();
    vt[r] = Vec::zero();
  }
  for (int64_t v = 0; v < nvec; ++v) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* s = S + r * Nkp + W * v;
      const auto x = Vec::sub(Vec::load(s), m[r]);
      auto e = Vec::exp_nonpos(x);
      if (v == nvec - 1) e = Vec::zero_outside(tail, e);
      vl[r] = Vec::add(vl[r], e);
      vt[r] = Vec::fmadd(e, x, vt[r]);  // masked lanes: e = 0 and x finite
      Vec::store(s, e);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float l = Vec::hsum(vl[r]) + Vec::hsum(vnf[r]);
    const float t = Vec::hsum(vt[r]);
    inv[r] = Vec::set1(1.0f / l);
    ent[r] = std::log(l) - t / l;
  }
  for (int64_t v = 0; v < nvec; ++v) {
    auto acc = Vec::zero();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* s = S + r * Nkp + W * v;
      auto p = Vec::mul(Vec::load(s), inv[r]);
      if (v == nvec - 1) p = Vec::zero_outside(tail, p);  // masked lanes: 0, even if inv is NaN
      Vec::store(s, p);
      acc = Vec::add(acc, p);
    }
    if (psum) Vec::store(psum + W * v, Vec::add(Vec::load(psum + W * v), acc));
  }
}

template <int R>
inline void row_block_r(const RowBlock<float>& a) {
  constexpr int W = Vec::W;
  const int64_t nvec_k = (a.kl + W - 1) / W;
  int64_t vk = 0;
  for (; vk + kMaxNV <= nvec_k; vk += kMaxNV)
    scores_tile<R, kMaxNV>(a.Q, a.ldq, a.D, a.KT, a.Nkp, W * vk, a.S, a.scale);
  scores_rest<R, kMaxNV - 1>(nvec_k - vk, a.Q, a.ldq, a.D, a.KT, a.Nkp, W * vk, a.S, a.scale);
  for (int r = 0; r < R; ++r) a.S[r * a.Nkp] *= a.bos;  // rescale, then mask (the kl bound)
  softmax_rows<R>(a.S, a.Nkp, a.kl, a.psum, a.ent);
  const int64_t nvec_d = (a.D + W - 1) / W;
  int64_t vd = 0;
  for (; vd + kMaxNV <= nvec_d; vd += kMaxNV)
    pv_tile<R, kMaxNV>(a.S, a.Nkp, a.V, a.Dp, a.kl, W * vd, a.O);
  pv_rest<R, kMaxNV - 1>(nvec_d - vd, a.S, a.Nkp, a.V, a.Dp, a.kl, W * vd, a.O);
}

inline void row_block(const RowBlock<float>& a) {
  if (a.kl == 0) {
    std::fill(a.O, a.O + a.R * a.Dp, 0.0f);
    std::fill(a.ent, a.ent + a.R, 0.0f);
    return;
  }
  switch (a.R) {
    case 4: row_block_r<4>(a); break;
    case 3: row_block_r<3>(a); break;
    case 2: row_block_r<2>(a); break;
    default: row_block_r<1>(a); break;
  }
}

// dst[0:n] = float(src[0:n * stride : stride])
template <typename scalar_t>
inline void load_row(const scalar_t* src, int64_t stride, int64_t n, float* dst) {
  int64_t d = 0;
  if (stride == 1) {
    for (; d + Vec::W <= n; d += Vec::W) Vec::store(dst + d, Vec::load_cvt(src + d));
    if (d < n) Vec::store_n(dst + d, Vec::load_cvt_n(src + d, n - d), n - d);
    return;
  }
  for (; d < n; ++d) dst[d] = static_cast<float>(src[d * stride]);
}

// dst[0:n] = scalar_t(src[0:n])
template <typename scalar_t>
inline void store_row(const float* src, int64_t n, scalar_t* dst) {
  int64_t d = 0;
  for (; d + Vec::W <= n; d += Vec::W) Vec::store_cvt(dst + d, Vec::load(src + d));
  if (d < n) Vec::store_cvt_n(dst + d, Vec::load(src + d), n - d);
}
