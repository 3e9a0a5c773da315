// Launch plan of the CUDA kernel of attnmem::cross_attention: which kernel, how many query rows
// per CTA, warps per CTA, Q prefetch depth, shared-memory size, vector or element loads, and
// whether the statistics need the second stage. Plain C++ (host code, plus layout formulas the
// device code uses too): the launcher (cross_attention_cuda.cu) and the host emulator test
// (tests/cuda_emu/) include this one header, so the emulator runs exactly the plans the launcher
// picks.
//
// What is fixed by the shape alone, and why: the chunk of query rows per CTA (tiles_per_cta)
// fixes the order in which the statistics are summed, so it never depends on the device.
// What depends on the device: warps per CTA and the prefetch depth, from the shared-memory
// opt-in (sharedMemPerBlockOptin: 227 KB on sm_90/sm_100, 163 KB on sm_80/sm_87, 99 KB on
// sm_86/sm_89/sm_120). Fewer warps on a short part change only how many warps share a chunk;
// each warp still sums its own tiles, then the warps are summed in warp order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#if defined(__CUDACC__)
#define ATTNMEM_HD __host__ __device__
#else
#define ATTNMEM_HD
#endif

// Head dims with a compiled tensor-core kernel (each costs two key classes x two dtypes of
// compile time). The fp32 kernel takes any D <= kF32MaxD. attnmem/ops.py reads both through
// build_info(); other inputs run the reference.
#define ATTNMEM_CUDA_HEAD_DIMS(X) X(40) X(64) X(80) X(128) X(160)

namespace attnmem::cuda {

constexpr int kMaxWarps = 4;      // warps per CTA (fewer when the chunk is small or smem is short)
constexpr int kTileRows = 16;     // query rows per warp tile, tensor-core kernel (mma M = 16)
constexpr int kTileRowsF32 = 8;   // query rows per warp tile, fp32 kernel
constexpr int kF32MaxD = 160;     // fp32 kernel: 5 head-dim slots of 32 lanes
constexpr int kF32KeySlots = 4;   // fp32 kernel: 4 key slots of 32 lanes (Nk <= 128)
constexpr int kMaxKeysCuda = 32 * kF32KeySlots;
// A CTA covers at most 256 query rows; the chunk is halved until there are at least kMinCtas
// CTAs (two per SM of a 132-SM H100), so small Nq still spreads over the whole GPU. A constant,
// not the device's SM count: the chunking fixes the order in which the statistics are summed.
constexpr int64_t kMaxRowsPerCta = 256;
constexpr int64_t kMinCtas = 264;
constexpr int kReduceThreads = 128;  // threads per CTA of the statistics' second stage

// ---------------------------------------------------------------------------------------------
// Shared-memory layouts (the device code carves its buffer with the same formulas).
// ---------------------------------------------------------------------------------------------
// mma kernel, in order (every region is a multiple of 16 bytes):
//   Ks  [NKP][KSTR]  16-bit  K rows, zero-padded: keys >= Nk and dims D..DK-1
//   Vt  [D][VSTR]    16-bit  V transposed (PV's B operand reads two consecutive keys per lane)
//   Qb  [W][nbuf][16][KSTR]  16-bit  per-warp Q tiles; the current one is reused to stage `out`
//   red_p [W][NKP]   fp32    per-warp probability sums
//   red_e [W]        fp32    per-warp entropy sums
// Row strides are padded by 8 halves: KSTR/2 and VSTR/2 (in 32-bit words) are then 4 mod 8, so
// the fragment loads (8 rows x 4 consecutive words per instruction) hit 32 distinct banks.
// NKT = key tiles of 16: 5 (keys padded to 80) when Nk <= 80, else 8 (128).
constexpr ATTNMEM_HD int mma_key_tiles(int Nk) { return Nk <= 80 ? 5 : 8; }
constexpr ATTNMEM_HD int mma_dk(int D) { return (D + 15) / 16 * 16; }
constexpr ATTNMEM_HD int mma_kstr(int D) { return mma_dk(D) + 8; }
constexpr ATTNMEM_HD int mma_vstr(int NKT) { return 16 * NKT + 8; }
constexpr ATTNMEM_HD size_t mma_ks_elems(int D, int NKT) { return size_t(16 * NKT) * mma_kstr(D); }
constexpr ATTNMEM_HD size_t mma_vt_elems(int D, int NKT) { return size_t(D) * mma_vstr(NKT); }
constexpr ATTNMEM_HD size_t mma_qtile_elems(int D) { return size_t(kTileRows) * mma_kstr(D); }
constexpr ATTNMEM_HD size_t mma_smem_bytes(int D, int NKT, int W, int nbuf) {
  return (mma_ks_elems(D, NKT) + mma_vt_elems(D, NKT) + size_t(W) * nbuf * mma_qtile_elems(D)) *
             2 +
         size_t(W) * 16 * NKT * 4 + ((size_t(W) * 4 + 15) / 16) * 16;
}

template <int D, int NKT>
struct MmaLayout {
  static constexpr int DK = mma_dk(D);
  static constexpr int KSTR = mma_kstr(D);
  static constexpr int NKP = NKT * 16;
  static constexpr int VSTR = mma_vstr(NKT);
  static constexpr size_t ks_elems = mma_ks_elems(D, NKT);
  static constexpr size_t vt_elems = mma_vt_elems(D, NKT);
  static constexpr size_t qtile_elems = mma_qtile_elems(D);
};

// fp32 kernel: Ks [NK32][KSTR] (NK32 = roundup(Nk, 32), KSTR odd so 32 lanes reading 32 keys at
// one d hit 32 banks), Qs [W][8][D], red_p [W][128], red_e [W].
struct F32Layout {
  int nk32, kstr;
  ATTNMEM_HD F32Layout(int Nk, int D) : nk32((Nk + 31) / 32 * 32), kstr(D % 2 == 0 ? D + 1 : D) {}
  ATTNMEM_HD size_t ks_floats() const { return size_t(nk32) * kstr; }
  ATTNMEM_HD size_t bytes(int W, int D) const {
    return (ks_floats() + size_t(W) * kTileRowsF32 * D + size_t(W) * 32 * kF32KeySlots + W) * 4;
  }
};

// ---------------------------------------------------------------------------------------------
// Which inputs have a kernel, and which instantiation runs them.
// ---------------------------------------------------------------------------------------------
inline bool mma_head_dim_compiled(int64_t D) {
#define ATTNMEM_IS_DIM(d) if (D == d) return true;
  ATTNMEM_CUDA_HEAD_DIMS(ATTNMEM_IS_DIM)
#undef ATTNMEM_IS_DIM
  return false;
}

inline bool head_dim_supported(bool f32, int64_t D) {
  return f32 ? (D >= 1 && D <= kF32MaxD) : mma_head_dim_compiled(D);
}

// Calls launch.template run<D, NKT>() for the tensor-core instantiation of (D, Nk); false when
// D has none. One switch for the launcher and the emulator.
template <typename Launch>
bool dispatch_mma(int D, int Nk, Launch& launch) {
  const bool nk80 = mma_key_tiles(Nk) == 5;
  switch (D) {
#define ATTNMEM_CASE_DIM(d)              \
  case d:                                \
    if (nk80) {                          \
      launch.template run<d, 5>();       \
    } else {                             \
      launch.template run<d, 8>();       \
    }                                    \
    return true;
    ATTNMEM_CUDA_HEAD_DIMS(ATTNMEM_CASE_DIM)
#undef ATTNMEM_CASE_DIM
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// The plan.
// ---------------------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int choose_tiles_per_cta(int64_t BH, int64_t Nq, int tile_rows) {
  const int64_t tiles = ceil_div(Nq, tile_rows);
  int64_t tpc = 1;
  while (2 * tpc * tile_rows <= kMaxRowsPerCta && tpc < tiles &&
         BH * ceil_div(tiles, 2 * tpc) >= kMinCtas) {
    tpc *= 2;
  }
  return static_cast<int>(tpc);
}

// A (B, N, H, D) operand as the plan sees it.
struct Operand {
  const void* data;
  int64_t size[4];
  int64_t stride[4];  // in elements
  int64_t element_size;
};

// True when every row of t starts 16-byte aligned and is contiguous, so rows can be moved with
// 16-byte vector loads (D is a multiple of 8 for 16-bit types, of 4 for fp32).
inline bool rows_vectorizable(const Operand& t) {
  const int64_t per16 = 16 / t.element_size;
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  if (t.size[3] > 1 && t.stride[3] != 1) return false;
  if (t.size[3] % per16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size[d] > 1 && t.stride[d] % per16 != 0) return false;
  }
  return true;
}

struct Plan {
  bool f32;            // fp32 kernel (else the tensor-core kernel for fp16 / bf16)
  int nkt;             // tensor-core kernel: key tiles of 16 (5 or 8); 0 for fp32
  int tile_rows;       // query rows per warp tile
  int tiles_per_cta;   // the chunk is tiles_per_cta * tile_rows query rows
  int64_t nchunks;     // chunks per (b, h)
  int64_t ctas;        // B * H * nchunks
  int warps;           // warps per CTA
  int nbuf;            // tensor-core kernel: 2 = prefetch the next Q tile, 1 = not; 0 for fp32
  size_t smem;         // dynamic shared memory per CTA, bytes
  bool fits;           // smem <= the opt-in it was planned for
  bool second_stage;   // statistics go through per-chunk slots and reduce_slots_kernel
};

// Warps and prefetch depth for a chunk of `tiles_per_cta` tiles under `smem_optin` bytes:
// as many warps as tiles (at most kMaxWarps) and a second Q buffer only when a warp runs more
// than one tile; when that does not fit, drop the prefetch first, then halve the warps.
inline void plan_warps(Plan& p, int D, int Nk, size_t smem_optin) {
  int W = p.tiles_per_cta < kMaxWarps ? p.tiles_per_cta : kMaxWarps;
  if (p.f32) {
    const F32Layout L(Nk, D);
    while (L.bytes(W, D) > smem_optin && W > 1) W /= 2;
    p.nbuf = 0;
    p.smem = L.bytes(W, D);
  } else {
    int nbuf = p.tiles_per_cta > W ? 2 : 1;
    while (mma_smem_bytes(D, p.nkt, W, nbuf) > smem_optin && (nbuf > 1 || W > 1)) {
      if (nbuf > 1) {
        nbuf = 1;
      } else {
        W /= 2;
      }
    }
    p.nbuf = nbuf;
    p.smem = mma_smem_bytes(D, p.nkt, W, nbuf);
  }
  p.warps = W;
  p.fits = p.smem <= smem_optin;
}

// The launcher's plan for a (B, Nq, H, D) x (B, Nk, H, D) problem with B * H > 0 and Nq > 0.
// `tiles_per_cta` > 0 imposes the chunk instead of choosing it from the shape: the emulator uses
// it to reach the chunks of shapes too large to emulate (the launcher always passes 0).
inline Plan make_plan(bool f32, int64_t B, int64_t Nq, int64_t H, int64_t Nk, int64_t D,
                      size_t smem_optin, bool stats, int tiles_per_cta = 0) {
  Plan p{};
  p.f32 = f32;
  p.nkt = f32 ? 0 : mma_key_tiles(static_cast<int>(Nk));
  p.tile_rows = f32 ? kTileRowsF32 : kTileRows;
  p.tiles_per_cta =
      tiles_per_cta > 0 ? tiles_per_cta : choose_tiles_per_cta(B * H, Nq, p.tile_rows);
  p.nchunks = ceil_div(Nq, int64_t(p.tiles_per_cta) * p.tile_rows);
  p.ctas = B * H * p.nchunks;
  p.second_stage = stats && p.nchunks > 1;
  plan_warps(p, static_cast<int>(D), static_cast<int>(Nk), smem_optin);
  return p;
}

// The largest dynamic shared memory any plan of one kernel instantiation can take on a device
// with this opt-in: the value given to cudaFuncSetAttribute once per (device, instantiation), so
// no launch ever changes the attribute under another thread's launch. d = 0: the fp32 kernel
// (one instantiation for every D and Nk); else the tensor-core kernel <d, nkt>.
inline size_t max_plan_smem(int d, int nkt, size_t smem_optin) {
  size_t best = 0;
  const int tile_rows = d == 0 ? kTileRowsF32 : kTileRows;
  for (int tpc = 1; tpc * tile_rows <= kMaxRowsPerCta; tpc *= 2) {
    Plan p{};
    p.f32 = d == 0;
    p.nkt = nkt;
    p.tiles_per_cta = tpc;
    if (d != 0) {
      plan_warps(p, d, 16 * nkt, smem_optin);
      if (p.fits && p.smem > best) best = p.smem;
      continue;
    }
    for (int D = 1; D <= kF32MaxD; ++D) {
      for (int Nk = 32; Nk <= kMaxKeysCuda; Nk += 32) {
        plan_warps(p, D, Nk, smem_optin);
        if (p.fits && p.smem > best) best = p.smem;
      }
    }
  }
  return best;
}

// The kernels' argument block.
struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* out;                 // (B, Nq, H, D) contiguous, q's dtype
  const int64_t* key_len;    // (B,) or nullptr
  const float* bos_scale;    // (B,) or nullptr
  float* slot_p;             // (B*H, nchunks, Nk) per-CTA probability sums, or nullptr (no stats)
  float* slot_e;             // (B*H, nchunks) per-CTA entropy sums
  float* row_ent;            // (B, H, Nq) or nullptr
  int64_t qs[4], ks[4], vs[4];  // element strides
  int B, Nq, H, Nk, D;
  int tiles_per_cta;         // warp tiles per CTA (the chunk is tiles_per_cta * tile rows)
  int nchunks;               // chunks per (b, h)
  int nbuf;                  // mma kernel: 2 = prefetch the next Q tile (cp.async), 1 = no prefetch
  float scale;               // mma kernel: scale * log2(e); fp32 kernel: scale
  bool q_vec, k_vec, v_vec;  // 16-byte aligned rows with unit last stride (else element loads)
};

// Where the kernels write: `out`, then the statistics. With plan.second_stage the kernel writes
// per-chunk slots (B*H, nchunks, Nk) and (B*H, nchunks) and reduce_slots_kernel sums them into
// prob_sum / ent_sum; with one chunk per (b, h) the slots are prob_sum / ent_sum themselves.
// Pointers of statistics that were not asked for are nullptr.
struct Outputs {
  void* out;
  float* prob_sum;
  float* ent_sum;
  float* row_ent;
  float* slot_p;  // used only with plan.second_stage
  float* slot_e;
};

inline Params make_params(const Plan& plan, const Operand& q, const Operand& k, const Operand& v,
                          const int64_t* key_len, const float* bos_scale, const Outputs& o,
                          double scale) {
  Params p{};
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = o.out;
  p.key_len = key_len;
  p.bos_scale = bos_scale;
  p.slot_p = plan.second_stage ? o.slot_p : o.prob_sum;
  p.slot_e = plan.second_stage ? o.slot_e : o.ent_sum;
  p.row_ent = o.row_ent;
  for (int d = 0; d < 4; ++d) {
    p.qs[d] = q.stride[d];
    p.ks[d] = k.stride[d];
    p.vs[d] = v.stride[d];
  }
  p.B = static_cast<int>(q.size[0]);
  p.Nq = static_cast<int>(q.size[1]);
  p.H = static_cast<int>(q.size[2]);
  p.D = static_cast<int>(q.size[3]);
  p.Nk = static_cast<int>(k.size[1]);
  p.tiles_per_cta = plan.tiles_per_cta;
  p.nchunks = static_cast<int>(plan.nchunks);
  p.nbuf = plan.nbuf;
  // The tensor-core kernel's softmax runs on exp2: it takes the scale times log2(e).
  p.scale = static_cast<float>(plan.f32 ? scale : scale * 1.4426950408889634);
  p.q_vec = rows_vectorizable(q);
  p.k_vec = rows_vectorizable(k);
  p.v_vec = rows_vectorizable(v);
  return p;
}

// Test-only knob: ATTNMEM_CUDA_SMEM_OPTIN_CAP=<bytes> plans as if the device allowed at most
// that much shared memory per block, so a large-smem GPU (or the emulator) runs the plans of a
// smaller part. Returns false when the variable is set but is not a decimal byte count (the
// launcher raises); unset or empty leaves `optin` as it is.
inline bool apply_smem_optin_cap(size_t& optin) {
  const char* env = std::getenv("ATTNMEM_CUDA_SMEM_OPTIN_CAP");
  if (env == nullptr || *env == '\0') return true;
  char* end = nullptr;
  const unsigned long long cap = std::strtoull(env, &end, 10);
  if (end == env || *end != '\0' || *env == '-') return false;
  if (cap < optin) optin = static_cast<size_t>(cap);
  return true;
}

}  // namespace attnmem::cuda
