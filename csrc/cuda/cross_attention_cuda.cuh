// Device code of the CUDA kernel of attnmem::cross_attention (docs/method.md §2).
//
// Math, per query row (b, h, i) with keys j < Nk (Nk <= 128):
//   s_j = scale <q_i, k_j>            fp32 (tensor-core fp32 accumulate, or fp32 FMA)
//   s_0 <- bos[b] * s_0               a multiplication, before the mask
//   s_j <- -inf for j >= kl = key_len[b]   (a select: masked keys form a suffix)
//   m = max_j s_j,  e_j = exp(s_j - m),  l = sum_j e_j,  p_j = e_j / l
//   out_i     = sum_j p_j v_j
//   entropy_i = ln l - sum_j p_j (s_j - m)        (= -sum p ln p, one log per row)
// Statistics: prob_sum[b,h,j] = sum_i p_ij, ent_sum[b,h] = sum_i entropy_i, row_ent[b,h,i].
//
// Shapes and layout: q (B, Nq, H, D), k/v (B, Nk, H, D) with any strides (diffusers passes
// views of (B, N, H*D) projections); out is written contiguous (B, Nq, H, D).
//
// Work split: one CTA per (b, h, chunk of tiles_per_cta * tile rows), h fastest in blockIdx.x so
// the CTAs reading neighbouring head slices of the same q rows run together. The CTA stages K and
// V of its head once in shared memory, then each warp runs its own 16-row (8 for fp32) tiles
// with no CTA barrier in the loop. Statistics: per-thread registers -> warp butterfly -> one row
// per warp in shared memory -> warps summed in warp order into this CTA's slot of a global
// buffer -> a second kernel sums the slots of each (b, h) in chunk order. No atomics: the bits of
// prob_sum / ent_sum depend only on the shape (and on how many warps fit the device's shared
// memory), never on scheduling.
//
// Two kernels:
//  * mma_kernel (fp16 / bf16): QK^T and PV on tensor cores with mma.sync m16n8k16, fp32
//    accumulate. Keys are padded to NKP = 16 * NKT (NKT = 5 -> 80 for Nk <= 80, else 8 -> 128),
//    the QK^T reduction dim to DK = roundup(D, 16) (40 -> 48) with zeros in shared memory. Only
//    ceil(kl / 16) key tiles are computed (a short prompt with its summary tokens masked is
//    cheaper). Softmax runs in the log2 domain: the host passes scale * log2(e), so
//    e = exp2(x - m) and entropy = ln l - ln2 * sum_j p_j (x_j - m).
//  * f32_kernel (fp32): plain fp32 FMAs (no TF32), accurate expf/logf.
//
// Numerical hazards and how they are handled:
//  * fp16 logits overflow for SD2-768 (|s| > 65504): logits live only in fp32 registers.
//  * masked keys: s = -inf by select after the BOS multiply, so exp gives exactly 0; the entropy
//    term e * (s - m) would be 0 * -inf = NaN, so it is selected away rather than computed.
//  * kl = 0 (every key masked): no key tile runs, l = 0; 1/l and ln l are guarded, so out = 0,
//    entropy = 0 and nothing is added to the sums. Never NaN.
//  * rows past Nq in the last tile are zero-filled queries (finite, uniform p): their output is
//    not stored and a row-validity select keeps them out of every statistic.
//  * P is rounded to fp16/bf16 for the PV product (as flash attention does); prob_sum and the
//    entropy use the fp32 p.
//  * padding (keys >= Nk, dims D..DK) is zero in shared memory on both operands, so padded lanes
//    contribute exact zeros, never 0 * garbage.
#pragma once

// First: under the host emulator (tests/cuda_emu) it brings the emulated CUDA built-ins.
#include "cross_attention_cuda_ptx.cuh"  // cp.async / mma.sync wrappers: the emulator's seam

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cross_attention_cuda_plan.h"  // constants, shared-memory layouts (host and device)

namespace attnmem::cuda {

constexpr float kLn2 = 0.693147180559945309f;

// ---------------------------------------------------------------------------------------------
// Shared-memory words and the tensor-core operand types
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t lds32(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
__device__ __forceinline__ void sts32(uint16_t* p, uint32_t x) {
  *reinterpret_cast<uint32_t*>(p) = x;
}

// mma.sync m16n8k16 fragments (the table is in cross_attention_cuda_ptx.cuh): lane l,
// g = l / 4, t = l % 4; A rows g and g + 8, B column g, C/D rows g and g + 8, columns 2t, 2t+1.
// Consequences used below:
//  * S = Q K^T: A = Q tile (rows x dims), B[k=d][n=key] = K[key][d], so b[0] is the word at
//    Ks[key = 8 nt + g][d = 16 ks + 2t] (two consecutive dims of one key row).
//  * The C fragments of S n-tiles 2kt and 2kt+1 (keys 16kt .. 16kt+15) are exactly the A
//    fragment of P for PV k-step kt: a[0] = pack(c0, c1) of n-tile 2kt, a[1] = pack(c2, c3) of
//    2kt, a[2] = pack(c0, c1) of 2kt+1, a[3] = pack(c2, c3) of 2kt+1. P never leaves registers.
//  * O = P V: B[k=key][n=d] = V[key][d] = Vt[d][key], so b[0] is the word at
//    Vt[d = 8 nd + g][key = 16 kt + 2t] (two consecutive keys: hence V is stored transposed).
//  * Each thread owns rows g and g+8 of the tile; the 4 lanes of a group share a row, so row
//    reductions are two xor-shuffles (1, 2), column sums over rows are three (4, 8, 16).
struct HalfOps {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    mma_m16n8k16_f16(c, a, b0, b1);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
};

struct BFloat16Ops {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    mma_m16n8k16_bf16(c, a, b0, b1);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
};

// Butterfly reductions: every participating lane ends with the same bits (a + b == b + a), and
// the order is fixed, so the result is reproducible.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float group_sum(float x) {  // over g (lanes with equal t)
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Which (b, h, chunk) this CTA owns and which rows / key range that means.
struct CtaWork {
  int b, h, chunk, kl, row_begin, row_end, n_tiles;
  float bos;
  __device__ CtaWork(const Params& p, int tile_rows) {
    const int bid = blockIdx.x;
    h = bid % p.H;
    const int rest = bid / p.H;
    chunk = rest % p.nchunks;
    b = rest / p.nchunks;
    // The Python wrapper raises a ValueError for these before any launch; a direct call of the
    // raw op reaches the device asserts instead (never a silent wrong answer). The clamp keeps
    // every read in bounds when device asserts are compiled out (TORCH_DISABLE_GPU_ASSERTS).
    kl = p.Nk;
    if (p.key_len != nullptr) {
      const int64_t x = p.key_len[b];
      ATTNMEM_DEVICE_ASSERT(x >= 0 && x <= p.Nk,
                            "cross_attention: key_len values must lie in [0, Nk]");
      kl = x < 0 ? 0 : (x > p.Nk ? p.Nk : static_cast<int>(x));
    }
    bos = p.bos_scale != nullptr ? p.bos_scale[b] : 1.0f;
    ATTNMEM_DEVICE_ASSERT(isfinite(bos), "cross_attention: bos_scale must be finite");
    row_begin = chunk * p.tiles_per_cta * tile_rows;
    const int end = row_begin + p.tiles_per_cta * tile_rows;
    row_end = end < p.Nq ? end : p.Nq;
    n_tiles = (row_end - row_begin + tile_rows - 1) / tile_rows;
  }
};

// Cross-warp sum of the statistics in warp order, written to this CTA's slot.
__device__ __forceinline__ void write_slot(const Params& p, const CtaWork& w, const float* red_p,
                                           int red_stride, const float* red_e, int W) {
  const int64_t slot = (int64_t(w.b) * p.H + w.h) * p.nchunks + w.chunk;
  for (int j = threadIdx.x; j < p.Nk; j += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < W; ++i) acc += red_p[i * red_stride + j];
    p.slot_p[slot * p.Nk + j] = acc;
  }
  if (threadIdx.x == 0) {
    float acc = 0.0f;
    for (int i = 0; i < W; ++i) acc += red_e[i];
    p.slot_e[slot] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel: fp16 / bf16 inputs, D in the template list, Nk <= 16 * NKT.
// ---------------------------------------------------------------------------------------------
template <typename Ops, int D, int NKT>
__global__ void __launch_bounds__(kMaxWarps * 32) mma_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 and cp.async need sm_80; the launcher refuses older devices
#else
  using L = MmaLayout<D, NKT>;
  constexpr int DK = L::DK, KSTR = L::KSTR, NKP = L::NKP, VSTR = L::VSTR;
  constexpr int NT = 2 * NKT;  // n8 tiles of S (8 keys each)
  constexpr int KS = DK / 16;  // k16 steps of QK^T
  constexpr int ND = D / 8;    // n8 tiles of O; also 16-byte chunks per row
  static_assert(D % 8 == 0, "head dim must be a multiple of 8");

  ATTNMEM_DYNAMIC_SMEM(smem_raw);
  const int W = blockDim.x / 32;
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* Vt = Ks + L::ks_elems;
  uint16_t* Qb = Vt + L::vt_elems;
  float* red_p = reinterpret_cast<float*>(Qb + size_t(W) * p.nbuf * L::qtile_elems);
  float* red_e = red_p + W * NKP;

  const CtaWork w(p, kTileRows);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int nkt = (w.kl + 15) / 16;  // key tiles that hold an unmasked key
  const uint16_t* qbh = static_cast<const uint16_t*>(p.q) + w.b * p.qs[0] + w.h * p.qs[2];
  const uint16_t* kbh = static_cast<const uint16_t*>(p.k) + w.b * p.ks[0] + w.h * p.ks[2];
  const uint16_t* vbh = static_cast<const uint16_t*>(p.v) + w.b * p.vs[0] + w.h * p.vs[2];
  uint16_t* outp = static_cast<uint16_t*>(p.out);

  // This warp's tiles: warp, warp + W, ... < n_tiles.
  const int n_my = warp < w.n_tiles ? (w.n_tiles - warp + W - 1) / W : 0;
  uint16_t* qbuf0 = Qb + size_t(warp) * p.nbuf * L::qtile_elems;
  auto qbuf = [&](int it) { return qbuf0 + (p.nbuf == 2 ? (it & 1) : 0) * L::qtile_elems; };
  auto tile_row0 = [&](int it) { return w.row_begin + (warp + it * W) * kTileRows; };

  // Dims D..DK-1 of the Q buffers are the zero padding of the QK^T reduction; nothing else
  // writes them (Q loads and the output staging touch dims < D only).
  if constexpr (DK > D) {
    for (int c = lane; c < p.nbuf * kTileRows * (DK - D); c += 32) {
      const int r = c / (DK - D), d = D + c % (DK - D);
      qbuf0[r * KSTR + d] = 0;
    }
  }
  auto load_q = [&](int it) {
    uint16_t* buf = qbuf(it);
    const int r0 = tile_row0(it);
    if (p.q_vec) {
      for (int c = lane; c < kTileRows * ND; c += 32) {
        const int r = c / ND, cc = c % ND, i = r0 + r;
        const bool ok = i < p.Nq;
        cp_async_16(buf + r * KSTR + cc * 8, ok ? qbh + i * p.qs[1] + cc * 8 : qbh, ok);
      }
    } else {
      for (int c = lane; c < kTileRows * D; c += 32) {
        const int r = c / D, d = c % D, i = r0 + r;
        buf[r * KSTR + d] = i < p.Nq ? qbh[i * p.qs[1] + d * p.qs[3]] : uint16_t(0);
      }
    }
  };

  // Start the first Q tile, then stage K and V while it is in flight.
  if (n_my > 0) load_q(0);
  cp_async_commit();

  for (int idx = threadIdx.x; idx < NKP * (DK / 8); idx += blockDim.x) {
    const int j = idx % NKP, d0 = (idx / NKP) * 8;  // j fastest: conflict-free 16-byte stores
    uint4 val = make_uint4(0, 0, 0, 0);
    if (j < p.Nk && d0 < D) {
      const uint16_t* src = kbh + j * p.ks[1];
      if (p.k_vec) {
        val = __ldg(reinterpret_cast<const uint4*>(src + d0));
      } else {
        uint16_t tmp[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) tmp[e] = src[(d0 + e) * p.ks[3]];
        memcpy(&val, tmp, 16);
      }
    }
    *reinterpret_cast<uint4*>(Ks + j * KSTR + d0) = val;
  }
  for (int idx = threadIdx.x; idx < NKP * ND; idx += blockDim.x) {
    const int j = idx % NKP, d0 = (idx / NKP) * 8;  // j fastest: consecutive halves in Vt rows
    uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (j < p.Nk) {
      const uint16_t* src = vbh + j * p.vs[1];
      if (p.v_vec) {
        const uint4 val = __ldg(reinterpret_cast<const uint4*>(src + d0));
        memcpy(tmp, &val, 16);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) tmp[e] = src[(d0 + e) * p.vs[3]];
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) Vt[(d0 + e) * VSTR + j] = tmp[e];
  }
  __syncthreads();

  const bool stats = p.slot_p != nullptr;
  float psum[NT][2];  // column sums of p over this thread's valid rows (g, g+8 of every tile)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) psum[nt][0] = psum[nt][1] = 0.0f;
  float ent_acc = 0.0f;

  for (int it = 0; it < n_my; ++it) {
    if (p.nbuf == 2) {
      if (it + 1 < n_my) load_q(it + 1);  // into the other buffer, freed at the end of it - 1
      cp_async_commit();
      cp_async_wait<1>();  // everything but the newest group: tile `it` has landed
    } else {
      cp_async_wait<0>();
    }
    __syncwarp();  // other lanes' copies of this tile are visible
    uint16_t* buf = qbuf(it);
    const int r0 = tile_row0(it);

    // ---- S = Q K^T (fp32) -------------------------------------------------------------------
    float S[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) S[nt][0] = S[nt][1] = S[nt][2] = S[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const uint16_t* qa = buf + g * KSTR + ks * 16 + 2 * t;
      const uint32_t a[4] = {lds32(qa), lds32(qa + 8 * KSTR), lds32(qa + 8),
                             lds32(qa + 8 * KSTR + 8)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (nt < 2 * nkt) {
          const uint16_t* kb = Ks + (nt * 8 + g) * KSTR + ks * 16 + 2 * t;
          Ops::mma(S[nt], a, lds32(kb), lds32(kb + 8));
        }
      }
    }

    // ---- softmax in the log2 domain; rows g (c[0], c[1]) and g + 8 (c[2], c[3]) ------------
    float m0 = -INFINITY, m1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (nt < 2 * nkt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int j = nt * 8 + 2 * t + c;
          float x0 = S[nt][c] * p.scale, x1 = S[nt][c + 2] * p.scale;
          if (j == 0) {
            x0 *= w.bos;
            x1 *= w.bos;
          }
          const bool keep = j < w.kl;
          x0 = keep ? x0 : -INFINITY;
          x1 = keep ? x1 : -INFINITY;
          S[nt][c] = x0;
          S[nt][c + 2] = x1;
          m0 = fmaxf(m0, x0);
          m1 = fmaxf(m1, x1);
        }
      }
    }
    m0 = quad_max(m0);
    m1 = quad_max(m1);
    float l0 = 0.0f, l1 = 0.0f, t0 = 0.0f, t1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (nt < 2 * nkt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const bool keep = nt * 8 + 2 * t + c < w.kl;
          const float x0 = S[nt][c] - m0, x1 = S[nt][c + 2] - m1;  // -inf where masked
          const float e0 = keep ? exp2f(x0) : 0.0f, e1 = keep ? exp2f(x1) : 0.0f;
          l0 += e0;
          l1 += e1;
          t0 += keep ? e0 * x0 : 0.0f;
          t1 += keep ? e1 * x1 : 0.0f;
          S[nt][c] = e0;
          S[nt][c + 2] = e1;
        }
      }
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    t0 = quad_sum(t0);
    t1 = quad_sum(t1);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const float ent0 = l0 > 0.0f ? logf(l0) - kLn2 * (t0 * inv0) : 0.0f;
    const float ent1 = l1 > 0.0f ? logf(l1) - kLn2 * (t1 * inv1) : 0.0f;
    const bool valid0 = r0 + g < p.Nq, valid1 = r0 + g + 8 < p.Nq;

#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (nt < 2 * nkt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          S[nt][c] *= inv0;
          S[nt][c + 2] *= inv1;
          if (stats) psum[nt][c] += (valid0 ? S[nt][c] : 0.0f) + (valid1 ? S[nt][c + 2] : 0.0f);
        }
      }
    }
    ent_acc += (valid0 ? ent0 : 0.0f) + (valid1 ? ent1 : 0.0f);
    if (p.row_ent != nullptr && t == 0) {
      const int64_t base = (int64_t(w.b) * p.H + w.h) * p.Nq;
      if (valid0) p.row_ent[base + r0 + g] = ent0;
      if (valid1) p.row_ent[base + r0 + g + 8] = ent1;
    }

    // ---- O = P V (P rounded to the input dtype, fp32 accumulate) ---------------------------
    float O[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) O[nd][0] = O[nd][1] = O[nd][2] = O[nd][3] = 0.0f;
#pragma unroll
    for (int kt = 0; kt < NKT; ++kt) {
      if (kt < nkt) {
        const uint32_t a[4] = {Ops::pack(S[2 * kt][0], S[2 * kt][1]),
                               Ops::pack(S[2 * kt][2], S[2 * kt][3]),
                               Ops::pack(S[2 * kt + 1][0], S[2 * kt + 1][1]),
                               Ops::pack(S[2 * kt + 1][2], S[2 * kt + 1][3])};
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) {
          const uint16_t* vb = Vt + (nd * 8 + g) * VSTR + kt * 16 + 2 * t;
          Ops::mma(O[nd], a, lds32(vb), lds32(vb + 8));
        }
      }
    }

    // ---- out: registers -> this tile's Q buffer -> 16-byte coalesced stores ------------------
    __syncwarp();  // every lane is done reading Q from buf
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      sts32(buf + g * KSTR + nd * 8 + 2 * t, Ops::pack(O[nd][0], O[nd][1]));
      sts32(buf + (g + 8) * KSTR + nd * 8 + 2 * t, Ops::pack(O[nd][2], O[nd][3]));
    }
    __syncwarp();
    for (int c = lane; c < kTileRows * ND; c += 32) {
      const int r = c / ND, cc = c % ND, i = r0 + r;
      if (i < p.Nq) {
        const int64_t o = ((int64_t(w.b) * p.Nq + i) * p.H + w.h) * D + cc * 8;
        *reinterpret_cast<uint4*>(outp + o) =
            *reinterpret_cast<const uint4*>(buf + r * KSTR + cc * 8);
      }
    }
    __syncwarp();  // buf is free for the load issued at the top of iteration it + 1
    if (p.nbuf == 1 && it + 1 < n_my) {
      load_q(it + 1);
      cp_async_commit();
    }
  }

  if (!stats) return;  // uniform over the CTA: no barrier is skipped by only some threads
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float s = group_sum(psum[nt][c]);
      if (g == 0) red_p[warp * NKP + nt * 8 + 2 * t + c] = s;
    }
  }
  const float e = group_sum(ent_acc);  // the 4 lanes of a group hold equal copies: sum over g
  if (lane == 0) red_e[warp] = e;
  __syncthreads();
  write_slot(p, w, red_p, NKP, red_e, W);
#endif
}

// The kernels below are not templates, so the program must hold one definition of each: the
// files that only instantiate the tensor-core kernel (cross_attention_cuda_f16.cu, _bf16.cu)
// define ATTNMEM_CUDA_TENSOR_CORE_ONLY and leave them to the launcher's file.
#ifndef ATTNMEM_CUDA_TENSOR_CORE_ONLY

// ---------------------------------------------------------------------------------------------
// fp32 kernel: exact fp32 math on CUDA cores (no TF32), any D <= 160, Nk <= 128.
// Lane layout: for S, lane owns keys lane + 32 c (c < 4); for O, lane owns dims lane + 32 c
// (c < 5); p moves from the key owner to every lane with a shuffle. K is staged in shared
// memory; V rows are read from global memory (coalesced over d, L1/L2 resident), which keeps the
// shared footprint within the 99 KB of sm_86/sm_89 for D = 160, Nk = 128.
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kMaxWarps * 32) f32_kernel(const Params p) {
  constexpr int R = kTileRowsF32;
  constexpr int KC = kF32KeySlots;
  constexpr int DC = kF32MaxD / 32;
  const int D = p.D;
  const F32Layout L(p.Nk, D);
  ATTNMEM_DYNAMIC_SMEM(smem_raw);
  const int W = blockDim.x / 32;
  float* Ks = reinterpret_cast<float*>(smem_raw);
  float* Qs = Ks + L.ks_floats();
  float* red_p = Qs + size_t(W) * R * D;
  float* red_e = red_p + W * 32 * KC;

  const CtaWork w(p, R);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nc = (w.kl + 31) / 32;  // key slots that hold an unmasked key
  const float* qbh = static_cast<const float*>(p.q) + w.b * p.qs[0] + w.h * p.qs[2];
  const float* kbh = static_cast<const float*>(p.k) + w.b * p.ks[0] + w.h * p.ks[2];
  const float* vbh = static_cast<const float*>(p.v) + w.b * p.vs[0] + w.h * p.vs[2];
  float* outp = static_cast<float*>(p.out);
  float* qtile = Qs + size_t(warp) * R * D;  // this warp's R query rows

  for (int idx = threadIdx.x; idx < L.nk32 * D; idx += blockDim.x) {
    const int j = idx / D, d = idx % D;
    Ks[j * L.kstr + d] = j < p.Nk ? kbh[j * p.ks[1] + d * p.ks[3]] : 0.0f;
  }
  __syncthreads();

  const bool stats = p.slot_p != nullptr;
  float psum[KC] = {0.0f, 0.0f, 0.0f, 0.0f};
  float ent_acc = 0.0f;
  const int n_my = warp < w.n_tiles ? (w.n_tiles - warp + W - 1) / W : 0;
  for (int it = 0; it < n_my; ++it) {
    const int r0 = w.row_begin + (warp + it * W) * R;
    for (int idx = lane; idx < R * D; idx += 32) {
      const int r = idx / D, d = idx % D, i = r0 + r;
      qtile[idx] = i < p.Nq ? qbh[i * p.qs[1] + d * p.qs[3]] : 0.0f;
    }
    __syncwarp();

    float s[R][KC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < KC; ++c) s[r][c] = 0.0f;
    for (int d = 0; d < D; ++d) {
      float kv[KC];
#pragma unroll
      for (int c = 0; c < KC; ++c) kv[c] = c < nc ? Ks[(lane + 32 * c) * L.kstr + d] : 0.0f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float qv = qtile[r * D + d];  // same address in every lane: a broadcast
#pragma unroll
        for (int c = 0; c < KC; ++c) s[r][c] = fmaf(qv, kv[c], s[r][c]);
      }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
      float m = -INFINITY;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        const int j = lane + 32 * c;
        float x = s[r][c] * p.scale;
        if (j == 0) x *= w.bos;
        x = j < w.kl ? x : -INFINITY;
        s[r][c] = x;
        m = fmaxf(m, x);
      }
      m = warp_max(m);
      float l = 0.0f, tt = 0.0f;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        const bool keep = lane + 32 * c < w.kl;
        const float x = s[r][c] - m;
        const float e = keep ? expf(x) : 0.0f;
        l += e;
        tt += keep ? e * x : 0.0f;
        s[r][c] = e;
      }
      l = warp_sum(l);
      tt = warp_sum(tt);
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const float ent = l > 0.0f ? logf(l) - tt * inv : 0.0f;
      const bool valid = r0 + r < p.Nq;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        s[r][c] *= inv;
        if (stats) psum[c] += valid ? s[r][c] : 0.0f;
      }
      ent_acc += valid ? ent : 0.0f;
      if (p.row_ent != nullptr && lane == 0 && valid)
        p.row_ent[(int64_t(w.b) * p.H + w.h) * p.Nq + r0 + r] = ent;
    }

    float o[R][DC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < DC; ++c) o[r][c] = 0.0f;
#pragma unroll
    for (int c = 0; c < KC; ++c) {
      if (c < nc) {
        for (int src = 0; src < 32; ++src) {
          const int j = 32 * c + src;
          if (j >= w.kl) break;  // uniform over the warp
          const float* vrow = vbh + j * p.vs[1];
          float vv[DC];
#pragma unroll
          for (int cd = 0; cd < DC; ++cd) {
            const int d = lane + 32 * cd;
            vv[cd] = d < D ? __ldg(vrow + d * p.vs[3]) : 0.0f;
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const float pr = __shfl_sync(0xffffffffu, s[r][c], src);
#pragma unroll
            for (int cd = 0; cd < DC; ++cd) o[r][cd] = fmaf(pr, vv[cd], o[r][cd]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = r0 + r;
      if (i < p.Nq) {
        float* orow = outp + ((int64_t(w.b) * p.Nq + i) * p.H + w.h) * D;
#pragma unroll
        for (int cd = 0; cd < DC; ++cd) {
          const int d = lane + 32 * cd;
          if (d < D) orow[d] = o[r][cd];
        }
      }
    }
    __syncwarp();  // qtile is rewritten by the next tile
  }

  if (!stats) return;
#pragma unroll
  for (int c = 0; c < KC; ++c) red_p[warp * 32 * KC + lane + 32 * c] = psum[c];
  if (lane == 0) red_e[warp] = ent_acc;  // equal in every lane (warp_sum results)
  __syncthreads();
  write_slot(p, w, red_p, 32 * KC, red_e, W);
}

// Second stage: prob_sum[bh, j] = sum_c slot_p[bh, c, j] and ent_sum[bh] = sum_c slot_e[bh, c],
// c in increasing order. One CTA per (b, h).
__global__ void reduce_slots_kernel(const float* __restrict__ slot_p,
                                    const float* __restrict__ slot_e, int nchunks, int Nk,
                                    float* __restrict__ prob_sum, float* __restrict__ ent_sum) {
  const int64_t bh = blockIdx.x;
  for (int j = threadIdx.x; j < Nk; j += blockDim.x) {
    float acc = 0.0f;
    for (int c = 0; c < nchunks; ++c) acc += slot_p[(bh * nchunks + c) * Nk + j];
    prob_sum[bh * Nk + j] = acc;
  }
  if (threadIdx.x == 0) {
    float acc = 0.0f;
    for (int c = 0; c < nchunks; ++c) acc += slot_e[bh * nchunks + c];
    ent_sum[bh] = acc;
  }
}

#endif  // ATTNMEM_CUDA_TENSOR_CORE_ONLY

}  // namespace attnmem::cuda
