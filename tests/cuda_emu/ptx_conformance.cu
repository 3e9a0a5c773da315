// On a real GPU: do the kernel's PTX wrappers (csrc/cuda/cross_attention_cuda_ptx.cuh) behave as
// the host emulator models them? The emulator's evidence rests on that model, so this is the
// first stage of bench/gpu_check.sh. Checks, each printed as PASS or FAIL:
//   * mma.sync m16n8k16 f16 and bf16 against mma_model.h (the PTX ISA fragment tables): exactly
//     on small integers (every product and sum is exact in fp32), and within fp32 accumulation
//     error on random values. A fragment-table error gives O(1) differences.
//   * cp.async 16 B: pred true copies the 16 bytes, pred false writes 16 zeros (src-size 0: the
//     source, a buffer of other bytes as in the kernel, which always passes a valid address, is
//     not copied); wait_group 1 retires the older of two groups.
//   * the float -> fp16 / bf16 packing the kernel uses (__floats2half2_rn, __floats2bfloat162_rn)
//     gives on the device the bits the emulator gets from the same intrinsics on the host.
// Build (bench/gpu_check.sh does): nvcc -std=c++17 -arch=sm_XY -I csrc/cuda -I tests/cuda_emu
//   -I <torch>/include tests/cuda_emu/ptx_conformance.cu   (the torch include is for c10 macros)
// Exit status 0 when every check passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cross_attention_cuda_ptx.cuh"
#include "mma_model.h"

namespace {

int g_failures = 0;

void report(bool ok, const char* what, const char* detail = "") {
  std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", what, *detail ? ": " : "", detail);
  if (!ok) ++g_failures;
}

#define CUDA_OK(x)                                                                   \
  do {                                                                               \
    const cudaError_t e_ = (x);                                                      \
    if (e_ != cudaSuccess) {                                                         \
      std::printf("FAIL CUDA call %s: %s\n", #x, cudaGetErrorString(e_));            \
      std::exit(2);                                                                  \
    }                                                                                \
  } while (0)

__global__ void mma_warp(const uint32_t* a, const uint32_t* b, const float* c, float* d,
                         bool bf16) {
  const int l = threadIdx.x;
  const uint32_t ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
  float rc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  if (bf16) {
    attnmem::cuda::mma_m16n8k16_bf16(rc, ra, b[2 * l], b[2 * l + 1]);
  } else {
    attnmem::cuda::mma_m16n8k16_f16(rc, ra, b[2 * l], b[2 * l + 1]);
  }
  for (int i = 0; i < 4; ++i) d[4 * l + i] = rc[i];
}

uint16_t to16(float x, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x)) : __half_as_ushort(__float2half_rn(x));
}

// One warp's registers with values from `gen`, run on the device, compared with the model.
template <typename Gen>
void check_mma(bool bf16, bool exact, Gen gen, const char* what) {
  uint32_t a[32][4], b[32][2];
  float c[32][4], want[32][4], got[32][4];
  auto pack = [&](float lo, float hi) {
    return uint32_t(to16(lo, bf16)) | (uint32_t(to16(hi, bf16)) << 16);
  };
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 4; ++i) a[l][i] = pack(gen(), gen()), c[l][i] = gen();
    for (int i = 0; i < 2; ++i) b[l][i] = pack(gen(), gen());
  }
  if (!mma_model::mma_m16n8k16(a, b, c, bf16 ? mma_model::kBF16 : mma_model::kF16, want)) {
    report(false, what, "the model's fragment tables do not cover the tile");
    return;
  }
  uint32_t *da, *db;
  float *dc, *dd;
  CUDA_OK(cudaMalloc(&da, sizeof a));
  CUDA_OK(cudaMalloc(&db, sizeof b));
  CUDA_OK(cudaMalloc(&dc, sizeof c));
  CUDA_OK(cudaMalloc(&dd, sizeof got));
  CUDA_OK(cudaMemcpy(da, a, sizeof a, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(db, b, sizeof b, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dc, c, sizeof c, cudaMemcpyHostToDevice));
  mma_warp<<<1, 32>>>(da, db, dc, dd, bf16);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaMemcpy(got, dd, sizeof got, cudaMemcpyDeviceToHost));
  for (void* p : {static_cast<void*>(da), static_cast<void*>(db), static_cast<void*>(dc),
                  static_cast<void*>(dd)})
    CUDA_OK(cudaFree(p));
  int bad = 0;
  double worst = 0;
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const double err = std::fabs(double(got[l][i]) - want[l][i]);
      // Real tensor cores round inside the fp32 sum; a fragment error is of the order of the
      // magnitude itself.
      const mma_model::Kind kind = bf16 ? mma_model::kBF16 : mma_model::kF16;
      const double tol = exact ? 0.0 : 1e-4 * mma_model::magnitude(a, b, c, kind, l, i);
      worst = std::fmax(worst, err);
      bad += !(err <= tol);  // NaN counts as bad
    }
  char detail[128];
  std::snprintf(detail, sizeof detail, "%d of 128 elements off, worst |difference| %.3g", bad, worst);
  report(bad == 0, what, detail);
}

__global__ void cp_async_block(const uint4* src, const uint4* other, const int* pred,
                               uint4* first, uint4* second) {
  ATTNMEM_DYNAMIC_SMEM(smem_raw);
  uint4* smem = reinterpret_cast<uint4*>(smem_raw);
  const int t = threadIdx.x, n = blockDim.x;
  smem[t] = make_uint4(0xabababab, 0xabababab, 0xabababab, 0xabababab);
  smem[n + t] = smem[t];
  __syncthreads();
  // group 1: this thread's slot t; group 2: slot n + t. pred false must not copy `other`.
  attnmem::cuda::cp_async_16(smem + t, pred[t] ? src + t : other + t, pred[t] != 0);
  attnmem::cuda::cp_async_commit();
  attnmem::cuda::cp_async_16(smem + n + t, pred[n + t] ? src + n + t : other + n + t,
                             pred[n + t] != 0);
  attnmem::cuda::cp_async_commit();
  attnmem::cuda::cp_async_wait<1>();  // the older group has landed for this thread
  first[t] = smem[t];
  attnmem::cuda::cp_async_wait<0>();
  second[t] = smem[n + t];
}

void check_cp_async() {
  const int n = 128;
  std::vector<uint4> src(2 * n);
  std::vector<int> pred(2 * n);
  std::mt19937 rng(7);
  for (int i = 0; i < 2 * n; ++i) {
    src[i] = make_uint4(rng(), rng(), rng(), rng());
    pred[i] = (rng() % 3) != 0;
  }
  uint4 *dsrc, *dother, *dfirst, *dsecond;
  int* dpred;
  CUDA_OK(cudaMalloc(&dsrc, 2 * n * sizeof(uint4)));
  CUDA_OK(cudaMalloc(&dother, 2 * n * sizeof(uint4)));
  CUDA_OK(cudaMemset(dother, 0xcd, 2 * n * sizeof(uint4)));
  CUDA_OK(cudaMalloc(&dfirst, n * sizeof(uint4)));
  CUDA_OK(cudaMalloc(&dsecond, n * sizeof(uint4)));
  CUDA_OK(cudaMalloc(&dpred, 2 * n * sizeof(int)));
  CUDA_OK(cudaMemcpy(dsrc, src.data(), 2 * n * sizeof(uint4), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dpred, pred.data(), 2 * n * sizeof(int), cudaMemcpyHostToDevice));
  cp_async_block<<<1, n, 2 * n * sizeof(uint4)>>>(dsrc, dother, dpred, dfirst, dsecond);
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    report(false, "cp.async 16 B copy / zero-fill / wait_group", cudaGetErrorString(e));
    std::exit(2);  // the context is gone
  }
  std::vector<uint4> first(n), second(n);
  CUDA_OK(cudaMemcpy(first.data(), dfirst, n * sizeof(uint4), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(second.data(), dsecond, n * sizeof(uint4), cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int i = 0; i < 2 * n; ++i) {
    const uint4 got = i < n ? first[i] : second[i - n];
    const uint4 want = pred[i] ? src[i] : make_uint4(0, 0, 0, 0);
    bad += std::memcmp(&got, &want, sizeof got) != 0;
  }
  char detail[96];
  std::snprintf(detail, sizeof detail, "%d of %d slots wrong", bad, 2 * n);
  report(bad == 0, "cp.async 16 B copy / zero-fill / wait_group", detail);
  for (void* p : {static_cast<void*>(dsrc), static_cast<void*>(dother), static_cast<void*>(dfirst),
                  static_cast<void*>(dsecond), static_cast<void*>(dpred)})
    CUDA_OK(cudaFree(p));
}

__global__ void pack_pairs(const float* x, uint32_t* h, uint32_t* bf, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half2 a = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
  const __nv_bfloat162 b = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
  memcpy(&h[i], &a, 4);
  memcpy(&bf[i], &b, 4);
}

void check_packing() {
  const int n = 1 << 16;
  std::vector<float> x(2 * n);
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int i = 0; i < 2 * n; ++i) {
    switch (i % 4) {
      case 0: x[i] = nd(rng); break;
      case 1: x[i] = nd(rng) * 70000.f; break;  // fp16 overflow
      case 2: x[i] = nd(rng) * 1e-6f; break;    // fp16 subnormals
      default: {  // exact halfway cases between two fp16 / bf16 neighbours
        const uint32_t u = (rng() & 0x7fffe000u) | 0x1000u;
        std::memcpy(&x[i], &u, 4);
      }
    }
  }
  float* dx;
  uint32_t *dh, *db;
  CUDA_OK(cudaMalloc(&dx, 2 * n * sizeof(float)));
  CUDA_OK(cudaMalloc(&dh, n * 4));
  CUDA_OK(cudaMalloc(&db, n * 4));
  CUDA_OK(cudaMemcpy(dx, x.data(), 2 * n * sizeof(float), cudaMemcpyHostToDevice));
  pack_pairs<<<n / 256, 256>>>(dx, dh, db, n);
  CUDA_OK(cudaGetLastError());
  std::vector<uint32_t> h(n), bf(n);
  CUDA_OK(cudaMemcpy(h.data(), dh, n * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(bf.data(), db, n * 4, cudaMemcpyDeviceToHost));
  int bad_h = 0, bad_b = 0;
  for (int i = 0; i < n; ++i) {
    const __half2 a = __floats2half2_rn(x[2 * i], x[2 * i + 1]);  // host implementation
    const __nv_bfloat162 b = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
    uint32_t ha, hb;
    std::memcpy(&ha, &a, 4);
    std::memcpy(&hb, &b, 4);
    bad_h += ha != h[i];
    bad_b += hb != bf[i];
  }
  char detail[96];
  std::snprintf(detail, sizeof detail, "%d of %d pairs differ", bad_h, n);
  report(bad_h == 0, "__floats2half2_rn device == host", detail);
  std::snprintf(detail, sizeof detail, "%d of %d pairs differ", bad_b, n);
  report(bad_b == 0, "__floats2bfloat162_rn device == host", detail);
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dh), static_cast<void*>(db)})
    CUDA_OK(cudaFree(p));
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, compute capability %d.%d\n", prop.name, prop.major, prop.minor);
  std::mt19937 rng(1);
  for (const bool bf16 : {false, true}) {
    const char* k = bf16 ? "bf16" : "f16";
    std::uniform_int_distribution<int> small(-4, 4);
    for (int rep = 0; rep < 8; ++rep) {
      char what[64];
      std::snprintf(what, sizeof what, "mma.sync m16n8k16 %s, small integers (exact) #%d", k, rep);
      check_mma(bf16, true, [&] { return float(small(rng)); }, what);
    }
    std::normal_distribution<float> nd(0.f, 1.f);
    for (int rep = 0; rep < 8; ++rep) {
      char what[64];
      std::snprintf(what, sizeof what, "mma.sync m16n8k16 %s, normal values #%d", k, rep);
      check_mma(bf16, false, [&] { return nd(rng); }, what);
    }
  }
  check_cp_async();
  check_packing();
  std::printf("%s: %d failed check(s)\n", g_failures ? "PTX CONFORMANCE FAILED" : "PTX conformance OK",
              g_failures);
  return g_failures ? 1 : 0;
}
