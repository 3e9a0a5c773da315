// Model of mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 at the level of the
// 32 lanes' registers, written from the PTX ISA's fragment tables ("Matrix Fragments for
// mma.m16n8k16 with floating point type"), independently of the kernel. Plain C++ with no CUDA
// header: the emulator (cuda_emu.h) computes every mma with it, and the GPU conformance check
// (ptx_conformance.cu) compares the real instruction with it.
//
//   A (.f16/.bf16, 4 x .b32 regs a0..a3 = elements a0..a7, two per register, lower index in
//     the lower half): row = groupID for a0,a1,a4,a5 and groupID + 8 for a2,a3,a6,a7;
//     col = threadID_in_group * 2 + (i & 1) for a0..a3, + 8 for a4..a7.
//   B (2 x .b32 = b0..b3): row = threadID_in_group * 2 + (i & 1) for b0,b1, + 8 for b2,b3;
//     col = groupID.
//   C/D (.f32 c0..c3): row = groupID for c0,c1, groupID + 8 for c2,c3;
//     col = threadID_in_group * 2 + (i & 1).
// groupID = lane / 4, threadID_in_group = lane % 4. Products are exact and the sum is taken in
// double, then rounded once to fp32: a real tensor core may round differently inside the sum.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mma_model {

enum Kind { kF16 = 0, kBF16 = 1 };

inline float bf16_to_float(uint32_t h) {
  const uint32_t u = (h & 0xffffu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_float(uint32_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
  double v;
  if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else if (exp == 0) {
    v = std::ldexp(static_cast<double>(man), -24);  // subnormal
  } else {
    v = std::ldexp(1.0 + man / 1024.0, exp - 15);
  }
  return static_cast<float>(sign ? -v : v);
}

inline float to_float(uint32_t h16, Kind kind) {
  return kind == kBF16 ? bf16_to_float(h16) : f16_to_float(h16);
}

// The 16x16 A, 16x8 B and 16x8 C a warp's registers hold. False if the tables do not place
// every element exactly once (a self-check of the tables above).
inline bool decode(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], const float (&c)[32][4],
                   Kind kind, double (&A)[16][16], double (&B)[16][8], double (&C)[16][8]) {
  int setA[16][16] = {}, setB[16][8] = {}, setC[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    const int gid = l >> 2, tig = l & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = gid + ((i & 2) ? 8 : 0);
      const int col = tig * 2 + (i & 1) + ((i & 4) ? 8 : 0);
      const uint32_t reg = a[l][i >> 1];
      A[row][col] = to_float((i & 1) ? reg >> 16 : reg & 0xffffu, kind);
      ++setA[row][col];
    }
    for (int i = 0; i < 4; ++i) {
      const int row = tig * 2 + (i & 1) + ((i & 2) ? 8 : 0);
      const uint32_t reg = b[l][i >> 1];
      B[row][gid] = to_float((i & 1) ? reg >> 16 : reg & 0xffffu, kind);
      ++setB[row][gid];
    }
    for (int i = 0; i < 4; ++i) {
      const int row = gid + ((i & 2) ? 8 : 0), col = tig * 2 + (i & 1);
      C[row][col] = c[l][i];
      ++setC[row][col];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col)
      if (setA[r][col] != 1 || (col < 8 && (setB[r][col] != 1 || setC[r][col] != 1)))
        return false;
  return true;
}

// d[lane][i] = D element the C/D table gives lane `lane`, i = 0..3. False on a table error.
inline bool mma_m16n8k16(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2],
                         const float (&c)[32][4], Kind kind, float (&d)[32][4]) {
  double A[16][16], B[16][8], C[16][8];
  if (!decode(a, b, c, kind, A, B, C)) return false;
  for (int l = 0; l < 32; ++l) {
    const int gid = l >> 2, tig = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = gid + ((i & 2) ? 8 : 0), col = tig * 2 + (i & 1);
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[l][i] = static_cast<float>(acc);
    }
  }
  return true;
}

// Sum of |A_row,k B_k,col| + |C_row,col| for the element lane `l`, slot `i` receives: the scale
// of the rounding error a real fp32-accumulating tensor core may add.
inline double magnitude(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2],
                        const float (&c)[32][4], Kind kind, int l, int i) {
  double A[16][16], B[16][8], C[16][8];
  decode(a, b, c, kind, A, B, C);
  const int row = (l >> 2) + ((i & 2) ? 8 : 0), col = (l & 3) * 2 + (i & 1);
  double s = std::fabs(C[row][col]);
  for (int k = 0; k < 16; ++k) s += std::fabs(A[row][k] * B[k][col]);
  return s;
}

}  // namespace mma_model
