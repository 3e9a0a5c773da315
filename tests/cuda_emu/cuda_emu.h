// Host emulation of the CUDA features attnmem's kernel uses, so its real device code
// (csrc/cuda/cross_attention_cuda.cuh, compiled with ATTNMEM_CUDA_EMULATOR) runs on a CPU.
// Included through the seam csrc/cuda/cross_attention_cuda_ptx.cuh, which routes the PTX
// wrappers, the dynamic shared memory and the device assert here.
//
//   * threads: one fiber per CUDA thread on one OS thread (a stack switch of the callee-saved
//     registers on x86-64, ucontext elsewhere), CTAs one after another.
//     The schedule picks the next runnable thread: lowest index first, highest first, or random
//     (seeded). A thread runs until it reaches a collective, so the schedules differ in which
//     thread gets ahead of which between rendezvous points.
//   * __syncthreads / __syncwarp / __shfl_*_sync / mma.sync: checked rendezvous. A deadlock (a
//     thread that never arrives) or threads of one warp (CTA) sitting in different collectives
//     fail loudly. Only full-warp masks are modelled.
//   * mma.sync.m16n8k16.row.col.f32.{f16,bf16}: the 32 lanes' registers are decoded with the
//     fragment tables of the PTX ISA (written here independently of the kernel's comments),
//     multiplied in double, rounded once to fp32 per output element.
//   * cp.async.cg 16 B: queued per thread in commit groups. Landing "late": a group lands at the
//     cp.async.wait_group that retires it (the latest legal moment), so a missing wait or commit
//     reads poison; "eager": it lands at issue (the earliest), so a copy into a buffer other
//     lanes still read shows up. Alignment and bounds are checked; pred false writes 16 zeros.
//   * memory: dynamic shared memory and every global buffer are poisoned with 0xFF bytes (NaN in
//     fp16/bf16/fp32) and sit against a PROT_NONE guard page, at the end or at the start of the
//     mapping; the slack on the other side is poison and checked after each launch (canaries).
//   * device asserts stop the run with the message, as a GPU's "device-side assert" would.
// What it cannot see: bugs inside the asm strings themselves (bench/gpu_check.sh's
// conformance stage checks them on a GPU), real tensor-core rounding, memory-ordering bugs that
// its rendezvous points hide (a missing __syncwarp next to an mma or a shuffle), and speed.
#pragma once

#define __host__
#define __device__
#define __global__
#define __shared__
#define __forceinline__ inline
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <math.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "mma_model.h"

#undef __launch_bounds__
#define __launch_bounds__(...)

namespace cuda_emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "EMU FAILURE: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(3);
}

struct Barrier;
inline void block_on(const Barrier* b);  // park the current fiber until b releases it
inline void make_ready(int i);           // fiber i may run again

// A rendezvous of n threads. The last to arrive runs `complete` (e.g. the mma of the warp) and
// releases the others; `gen` counts completed rendezvous, so a collective can double-buffer its
// exchange slots by gen & 1 and needs one rendezvous, not two.
struct Barrier {
  int n = 0, count = 0;
  unsigned gen = 0;
  const char* tag = nullptr;
  std::vector<int> waiters;
  template <typename F>
  void wait(const char* t, unsigned who, int fiber, F&& complete) {
    if (count == 0) {
      tag = t;
    } else if (std::strcmp(tag, t) != 0) {
      fail("thread %u arrived at '%s' while others wait at '%s' (divergent collective)", who, t,
           tag);
    }
    if (++count == n) {
      complete();
      count = 0;
      ++gen;
      for (int i : waiters) make_ready(i);
      waiters.clear();
      return;
    }
    waiters.push_back(fiber);
    block_on(this);
  }
  void wait(const char* t, unsigned who, int fiber) {
    wait(t, who, fiber, [] {});
  }
};

enum Kind { kF16 = mma_model::kF16, kBF16 = mma_model::kBF16 };

// A warp's exchange slots, two generations each (see Barrier).
struct Warp {
  Barrier bar;
  float fx[2][32];                    // shuffle values
  uint32_t a[2][32][4], b[2][32][2];  // mma operands, per lane
  float c[2][32][4], d[2][32][4];
  int kind[2][32];
};

struct Cta {
  Barrier bar;
  Warp warps[32];
};

struct Copy {
  void* dst;
  const void* src;  // nullptr: zero-fill
};

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  std::vector<unsigned char> stack;
  unsigned tid = 0;
  int lane = 0;
  Warp* warp = nullptr;
  Cta* cta = nullptr;
  uint3 tidx, bidx;
  std::vector<Copy> open;                // issued, not yet committed
  std::deque<std::vector<Copy>> groups;  // committed, not yet landed
  const Barrier* waiting = nullptr;
  bool done = false;
};

inline Fiber* cur = nullptr;
inline uint3 g_blockDim, g_gridDim;

// ---- run options --------------------------------------------------------------------------
enum Schedule { kLowestFirst = 0, kHighestFirst = 1, kRandom = 2 };
enum Landing { kLate = 0, kEager = 1 };
enum Placement { kAgainstEnd = 0, kAgainstStart = 1 };
inline Schedule g_schedule = kLowestFirst;
inline Landing g_landing = kLate;
inline Placement g_placement = kAgainstEnd;
inline unsigned g_seed = 1;

// ---- memory with guard pages --------------------------------------------------------------
struct Region {
  unsigned char* base = nullptr;  // first usable byte (16-byte aligned)
  size_t bytes = 0;
  void* map = nullptr;
  size_t map_bytes = 0;
};
inline size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
// `bytes` usable bytes (rounded up to 16) against a PROT_NONE page on the side g_placement
// says, with a PROT_NONE page on the other side too. Everything is poisoned with 0xFF.
inline Region guarded_alloc(size_t bytes) {
  const size_t pg = page();
  const size_t usable = (bytes + 15) / 16 * 16;
  const size_t body = (usable + pg - 1) / pg * pg + pg;  // at least a page of slack to check
  Region r;
  r.map_bytes = body + 2 * pg;
  r.map = mmap(nullptr, r.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (r.map == MAP_FAILED) fail("mmap of %zu bytes", r.map_bytes);
  auto* m = static_cast<unsigned char*>(r.map);
  std::memset(m + pg, 0xff, body);
  if (mprotect(m, pg, PROT_NONE) != 0 || mprotect(m + pg + body, pg, PROT_NONE) != 0)
    fail("mprotect");
  r.base = g_placement == kAgainstEnd ? m + pg + body - usable : m + pg;
  r.bytes = usable;
  return r;
}
// True when nothing wrote into the slack around the usable bytes.
inline bool canaries_intact(const Region& r) {
  const size_t pg = page();
  auto* body = static_cast<unsigned char*>(r.map) + pg;
  const size_t body_bytes = r.map_bytes - 2 * pg;
  for (unsigned char* p = body; p < body + body_bytes; ++p) {
    if (p >= r.base && p < r.base + r.bytes) {
      p = r.base + r.bytes - 1;
      continue;
    }
    if (*p != 0xff) return false;
  }
  return true;
}
inline void guarded_free(Region& r) {
  if (r.map) munmap(r.map, r.map_bytes);
  r = Region{};
}

// Global buffers the kernel may read with cp.async (every tensor handed to a launch).
inline std::vector<std::pair<const unsigned char*, size_t>> g_globals;
inline void register_global(const Region& r) { g_globals.push_back({r.base, r.bytes}); }
inline bool in_global(const void* p, size_t n) {
  auto* q = static_cast<const unsigned char*>(p);
  for (auto& [b, s] : g_globals)
    if (q >= b && q + n <= b + s) return true;
  return false;
}

inline Region g_smem;
inline size_t g_smem_bytes = 0;  // what the launch asked for
inline unsigned char* dynamic_smem() { return g_smem.base; }
inline uint32_t smem_offset(const void* p) {
  auto* q = static_cast<const unsigned char*>(p);
  if (q < g_smem.base || q >= g_smem.base + g_smem_bytes)
    fail("shared-memory address outside the dynamic shared memory");
  return static_cast<uint32_t>(q - g_smem.base);
}

// ---- device assert ------------------------------------------------------------------------
inline void device_assert(bool ok, const char* expr, const char* msg) {
  if (ok) return;
  std::fprintf(stderr, "EMU DEVICE ASSERT: %s [%s] block %u thread %u\n", msg, expr,
               cur ? cur->bidx.x : 0u, cur ? cur->tidx.x : 0u);
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(4);
}

// ---- warp collectives ---------------------------------------------------------------------
inline void check_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail("%s with mask %08x (only full warps are modelled)", what, mask);
}
inline float shfl(unsigned mask, float x, int src_lane, bool xor_mode) {
  check_mask(mask, xor_mode ? "__shfl_xor_sync" : "__shfl_sync");
  Warp& w = *cur->warp;
  const int lane = cur->lane;
  const unsigned g = w.bar.gen & 1;
  w.fx[g][lane] = x;
  w.bar.wait("shfl", cur->tid, int(cur->tid));
  return w.fx[g][(xor_mode ? (lane ^ src_lane) : src_lane) & 31];
}
inline void syncwarp(unsigned mask = 0xffffffffu) {
  check_mask(mask, "__syncwarp");
  cur->warp->bar.wait("syncwarp", cur->tid, int(cur->tid));
}
inline void syncthreads() { cur->cta->bar.wait("syncthreads", cur->tid, int(cur->tid)); }

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 -----------------------
// Every lane deposits its registers; the last to arrive releases the warp; lane 0 computes D
// with the fragment-table model (mma_model.h); every lane reads its D fragment back.
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                         Kind kind) {
  Warp& w = *cur->warp;
  const int l = cur->lane;
  const unsigned g = w.bar.gen & 1;
  for (int i = 0; i < 4; ++i) w.a[g][l][i] = a[i], w.c[g][l][i] = c[i];
  w.b[g][l][0] = b0;
  w.b[g][l][1] = b1;
  w.kind[g][l] = kind;
  w.bar.wait("mma", cur->tid, int(cur->tid), [&] {
    for (int j = 1; j < 32; ++j)
      if (w.kind[g][j] != w.kind[g][0]) fail("mma: lanes disagree on the operand type");
    if (!mma_model::mma_m16n8k16(w.a[g], w.b[g], w.c[g], static_cast<mma_model::Kind>(kind),
                                 w.d[g]))
      fail("mma model: the fragment tables do not cover the tile once");
  });
  for (int i = 0; i < 4; ++i) c[i] = w.d[g][l][i];
}

// ---- cp.async -----------------------------------------------------------------------------
inline void land(const Copy& c) {
  if (c.src) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}
inline void cp_async_16(void* smem, const void* gmem, bool pred) {
  auto* s = static_cast<unsigned char*>(smem);
  if (reinterpret_cast<uintptr_t>(s) % 16) fail("cp.async: shared address not 16-byte aligned");
  if (s < g_smem.base || s + 16 > g_smem.base + g_smem_bytes)
    fail("cp.async: shared address outside the dynamic shared memory");
  if (pred) {
    if (reinterpret_cast<uintptr_t>(gmem) % 16) fail("cp.async: global address not 16-byte aligned");
    if (!in_global(gmem, 16)) fail("cp.async: global source outside every tensor");
  }
  const Copy c{smem, pred ? gmem : nullptr};
  if (g_landing == kEager) land(c);
  else cur->open.push_back(c);
}
inline void cp_async_commit() {
  cur->groups.push_back(std::move(cur->open));
  cur->open.clear();
}
inline void cp_async_wait(int n) {
  while (static_cast<int>(cur->groups.size()) > n) {
    for (const Copy& c : cur->groups.front()) land(c);
    cur->groups.pop_front();
  }
}

template <typename T>
inline T ldg(const T* p) {
  return *p;
}

// ---- fibers and launch ---------------------------------------------------------------------
#if defined(__x86_64__)
// Saves the System V callee-saved registers on the current stack, stores the stack pointer in
// *save_sp, switches to load_sp and restores that stack's registers: no system call, unlike
// swapcontext (which saves the signal mask), so a rendezvous of 128 threads stays cheap.
[[gnu::naked, gnu::noinline]] inline void switch_stack(void** /*save_sp*/, void* /*load_sp*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}
inline void* g_sched_sp = nullptr;
inline void to_scheduler() { switch_stack(&cur->sp, g_sched_sp); }
inline void to_fiber(Fiber* f) { switch_stack(&g_sched_sp, f->sp); }
#else
inline ucontext_t g_sched_uc;
inline void to_scheduler() { swapcontext(&cur->uc, &g_sched_uc); }
inline void to_fiber(Fiber* f) { swapcontext(&g_sched_uc, &f->uc); }
#endif

// Runnable threads of the CTA being run, as a bitset: lowest / highest / k-th in a few words.
inline std::vector<Fiber*> g_fibers;
inline uint64_t g_ready[16];
inline int g_nready = 0;
inline void make_ready(int i) {
  g_fibers[i]->waiting = nullptr;
  g_ready[i >> 6] |= uint64_t(1) << (i & 63);
  ++g_nready;
}
inline void unready(int i) {
  g_ready[i >> 6] &= ~(uint64_t(1) << (i & 63));
  --g_nready;
}
inline int pick_ready(std::mt19937& rng) {
  if (g_schedule == kHighestFirst) {
    for (int w = 15; w >= 0; --w)
      if (g_ready[w]) return w * 64 + 63 - __builtin_clzll(g_ready[w]);
  }
  int k = g_schedule == kRandom ? int(rng() % unsigned(g_nready)) : 0;
  for (int w = 0; w < 16; ++w) {
    const int n = __builtin_popcountll(g_ready[w]);
    if (k >= n) {
      k -= n;
      continue;
    }
    uint64_t bits = g_ready[w];
    for (; k > 0; --k) bits &= bits - 1;
    return w * 64 + __builtin_ctzll(bits);
  }
  fail("scheduler: no runnable thread");
}

inline void block_on(const Barrier* b) {
  cur->waiting = b;
  unready(int(cur->tid));
  to_scheduler();
}

inline std::function<void()>* g_kernel = nullptr;
[[noreturn]] inline void fiber_main() {
  (*g_kernel)();
  if (!cur->open.empty()) fail("thread %u exited with uncommitted cp.async copies", cur->tid);
  for (auto& g : cur->groups)
    if (!g.empty()) fail("thread %u exited with cp.async copies never waited for", cur->tid);
  cur->done = true;
  unready(int(cur->tid));
  to_scheduler();
  fail("a finished thread was resumed");
}

// Thread t of CTA bx, ready to start fiber_main on its own stack.
inline void start_fiber(Fiber* f, unsigned t, unsigned bx, Cta* cta) {
  f->tid = t;
  f->lane = static_cast<int>(t & 31);
  f->warp = &cta->warps[t / 32];
  f->cta = cta;
  f->tidx = make_uint3(t, 0, 0);
  f->bidx = make_uint3(bx, 0, 0);
  f->open.clear();
  f->groups.clear();
  f->waiting = nullptr;
  f->done = false;
#if defined(__x86_64__)
  // The first switch pops 6 zero registers and returns into fiber_main with the stack as a
  // call would leave it (16-byte aligned before the return address).
  auto top = reinterpret_cast<uintptr_t>(f->stack.data() + f->stack.size()) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // fiber_main's return address: it never returns
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack.data();
  f->uc.uc_stack.ss_size = f->stack.size();
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

// Runs kernel() for every CTA of a 1-D grid, one CTA at a time, `block` fibers each, with
// `smem_bytes` of dynamic shared memory (at most `smem_limit`, the opt-in it was planned for).
template <typename F>
void launch(unsigned grid, unsigned block, size_t smem_bytes, size_t smem_limit, F&& kernel) {
  if (block == 0 || block % 32 || block > 1024) fail("block size %u", block);
  if (smem_bytes > smem_limit)
    fail("launch asks for %zu bytes of shared memory > %zu", smem_bytes, smem_limit);
  g_blockDim = make_uint3(block, 1, 1);
  g_gridDim = make_uint3(grid, 1, 1);
  std::function<void()> fn = kernel;
  g_kernel = &fn;
  std::mt19937 rng(g_seed);
  std::vector<std::unique_ptr<Fiber>> fibers(block);
  for (auto& f : fibers) {
    f = std::make_unique<Fiber>();
    f->stack.resize(256 * 1024);
  }
  g_smem_bytes = smem_bytes;
  for (unsigned bx = 0; bx < grid; ++bx) {
    g_smem = guarded_alloc(smem_bytes ? smem_bytes : 16);  // fresh poison for every CTA
    auto cta = std::make_unique<Cta>();
    cta->bar.n = static_cast<int>(block);
    for (auto& w : cta->warps) w.bar.n = 32;
    g_fibers.clear();
    std::memset(g_ready, 0, sizeof g_ready);
    g_nready = 0;
    for (unsigned t = 0; t < block; ++t) {
      start_fiber(fibers[t].get(), t, bx, cta.get());
      g_fibers.push_back(fibers[t].get());
      make_ready(int(t));
    }
    while (g_nready > 0) {
      cur = g_fibers[pick_ready(rng)];
      to_fiber(cur);
      cur = nullptr;
    }
    for (Fiber* f : g_fibers)
      if (!f->done && f->waiting)
        fail("deadlock in CTA %u: thread %u waits at '%s' (%d of %d arrived)", bx, f->tid,
             f->waiting->tag, f->waiting->count, f->waiting->n);
    if (!canaries_intact(g_smem)) fail("CTA %u wrote outside its dynamic shared memory", bx);
    guarded_free(g_smem);
  }
  g_kernel = nullptr;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::cur->tidx)
#define blockIdx (::cuda_emu::cur->bidx)
#define blockDim (::cuda_emu::g_blockDim)
#define gridDim (::cuda_emu::g_gridDim)
#define __syncthreads() ::cuda_emu::syncthreads()
#define __syncwarp(...) ::cuda_emu::syncwarp(__VA_ARGS__)
#define __shfl_xor_sync(m, x, o) ::cuda_emu::shfl((m), (x), (o), true)
#define __shfl_sync(m, x, s) ::cuda_emu::shfl((m), (x), (s), false)
#define __ldg(p) ::cuda_emu::ldg(p)
#define __trap() ::cuda_emu::fail("__trap()")
