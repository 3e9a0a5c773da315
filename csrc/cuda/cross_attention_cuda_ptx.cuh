// The only place the kernel touches hardware-specific instructions: the PTX wrappers (cp.async,
// mma.sync), the dynamic shared-memory declaration and the device-side assert. This is the seam
// of the host emulator test (tests/cuda_emu/): compiled with ATTNMEM_CUDA_EMULATOR defined, each
// wrapper calls the emulator's model of the instruction instead (cuda_emu.h, on the include path
// of that test only), and the rest of the device code runs unchanged on the CPU. The wrappers'
// contracts below are what the emulator models and what bench/gpu_check.sh's conformance stage
// checks on a real GPU.
#pragma once

#include <cstdint>

#ifdef ATTNMEM_CUDA_EMULATOR
#include "cuda_emu.h"
#else
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT_MSG
#endif

// The CTA's dynamic shared memory, as `unsigned char name[]`, 16-byte aligned.
#ifdef ATTNMEM_CUDA_EMULATOR
#define ATTNMEM_DYNAMIC_SMEM(name) unsigned char* name = ::cuda_emu::dynamic_smem()
#else
#define ATTNMEM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// A device-side input check, PyTorch's convention for errors only the device can see: on a GPU
// the kernel stops and the next CUDA call raises "device-side assert triggered" (the message is
// printed by the device); in the emulator the run stops with the message.
#ifdef ATTNMEM_CUDA_EMULATOR
#define ATTNMEM_DEVICE_ASSERT(cond, msg) ::cuda_emu::device_assert((cond), #cond, msg)
#elif defined(CUDA_KERNEL_ASSERT_MSG)
#define ATTNMEM_DEVICE_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#else  // older torch: the condition is printed, not the message
#define ATTNMEM_DEVICE_ASSERT(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

namespace attnmem::cuda {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#ifdef ATTNMEM_CUDA_EMULATOR
  return ::cuda_emu::smem_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// cp.async.cg.shared.global, 16 bytes: copies 16 bytes from global `gmem` to shared `smem`
// (both 16-byte aligned) without going through L1; with pred false it reads nothing and writes
// 16 zero bytes (src-size 0), which zero-fills rows past Nq. The copy is only guaranteed to have
// landed after a cp.async.wait_group that covers its commit group, and only for the issuing
// thread: other lanes see it after a __syncwarp.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
#ifdef ATTNMEM_CUDA_EMULATOR
  ::cuda_emu::cp_async_16(smem, gmem, pred);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(pred ? 16 : 0)
               : "memory");
#endif
}
// Closes the group of this thread's cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef ATTNMEM_CUDA_EMULATOR
  ::cuda_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef ATTNMEM_CUDA_EMULATOR
  ::cuda_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D(16x8) = A(16x16) B(16x8) + C
// with fp32 C/D, c in place. Lane l of the warp, g = l / 4 ("group", 0..7), t = l % 4 ("thread
// in group", 0..3). Each 32-bit A/B register holds two 16-bit values, the lower column/row index
// in the low half (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   A (row-major 16x16, M x K): a[0] = A[g    ][2t, 2t+1]     a[1] = A[g + 8][2t, 2t+1]
//                               a[2] = A[g    ][2t+8, 2t+9]   a[3] = A[g + 8][2t+8, 2t+9]
//   B ("col" 16x8, K x N):      b0 = B[2t, 2t+1][g]           b1 = B[2t+8, 2t+9][g]
//   C/D (16x8 fp32):            c[0] = C[g][2t]    c[1] = C[g][2t+1]
//                               c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
// All 32 lanes must execute it together (it is also a warp-wide rendezvous in the emulator).
__device__ __forceinline__ void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
#ifdef ATTNMEM_CUDA_EMULATOR
  ::cuda_emu::mma_m16n8k16(c, a, b0, b1, ::cuda_emu::kF16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
#ifdef ATTNMEM_CUDA_EMULATOR
  ::cuda_emu::mma_m16n8k16(c, a, b0, b1, ::cuda_emu::kBF16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

}  // namespace attnmem::cuda
