// Runs the CUDA kernel's device code (csrc/cuda/cross_attention_cuda.cuh, through the emulator
// seam) with the launcher's own plan (csrc/cuda/cross_attention_cuda_plan.h) on the CPU.
// Driven by tests/cuda_emu/test_cuda_emu.py, which writes the inputs, computes the reference
// with attnmem/reference.py and compares.
//
//   harness plans OPTIN...          every distinct launch plan on devices with these shared-memory
//                                   opt-ins, one line each (and checks the attribute bound)
//   harness run CASES RESULTS       runs every case of CASES under 3 thread schedules, checks the
//                                   runs are bit-identical, writes outputs and plans to RESULTS
//   harness dims                    the tensor-core head dims and the fp32 kernel's largest D
//   harness plan KERNEL B NQ H D NK OPTIN
//                                   the launcher's plan for that shape (KERNEL fp16|bf16|fp32)
//
// Case file: a sequence of records, each: "ATTNCASE", then int64 fields (see read_case), then
// the q, k, v storages, key_len (int64) and bos_scale (float32). Result file: per case
// "ATTNRSLT", int64 fields (see write_result), out in q's dtype, prob_sum, ent_sum, row_ent (fp32,
// those asked for). Little-endian, as written by numpy on x86-64.
//
// With CUDA_EMU_HEAD_DIMS defined (e.g. -DCUDA_EMU_HEAD_DIMS=40,64) only those tensor-core
// instantiations are compiled: the mutation check builds many harnesses and needs few dims.
#include "cuda_emu.h"  // first: the emulated CUDA built-ins
#include "cross_attention_cuda.cuh"

#include <array>
#include <cinttypes>
#include <map>
#include <set>
#include <string>
#include <tuple>

using namespace attnmem::cuda;

namespace {

enum DType { kF32 = 0, kF16 = 1, kBF16 = 2 };
int64_t element_size(int d) { return d == kF32 ? 4 : 2; }

template <int D>
constexpr bool dim_compiled() {
#ifdef CUDA_EMU_HEAD_DIMS
  constexpr int dims[] = {CUDA_EMU_HEAD_DIMS};
  for (int d : dims)
    if (d == D) return true;
  return false;
#else
  return true;
#endif
}

// ---- case and result records ----------------------------------------------------------------
struct Storage {
  std::vector<unsigned char> bytes;
  int64_t offset;     // elements
  int64_t stride[4];  // elements
};
struct Case {
  int64_t id, dtype, B, Nq, H, Nk, D, stats, row_entropy, has_key_len, has_bos, optin, tpc;
  double scale;
  Storage q, k, v;
  std::vector<int64_t> key_len;
  std::vector<float> bos;
};

bool read_exact(FILE* f, void* p, size_t n) { return n == 0 || std::fread(p, 1, n, f) == n; }
int64_t read_i64(FILE* f) {
  int64_t x;
  if (!read_exact(f, &x, 8)) cuda_emu::fail("case file truncated");
  return x;
}
bool read_case(FILE* f, Case& c) {
  char magic[8];
  if (std::fread(magic, 1, 8, f) != 8) return false;
  if (std::memcmp(magic, "ATTNCASE", 8) != 0) cuda_emu::fail("case file: bad record marker");
  int64_t* fields[] = {&c.id,     &c.dtype,       &c.B,           &c.Nq,      &c.H,
                       &c.Nk,     &c.D,           &c.stats,       &c.row_entropy,
                       &c.has_key_len, &c.has_bos, &c.optin,      &c.tpc};
  for (int64_t* x : fields) *x = read_i64(f);
  const int64_t bits = read_i64(f);
  std::memcpy(&c.scale, &bits, 8);
  for (Storage* s : {&c.q, &c.k, &c.v}) {
    const int64_t n = read_i64(f);
    s->offset = read_i64(f);
    for (auto& st : s->stride) st = read_i64(f);
    s->bytes.resize(static_cast<size_t>(n));
  }
  for (Storage* s : {&c.q, &c.k, &c.v})
    if (!read_exact(f, s->bytes.data(), s->bytes.size())) cuda_emu::fail("case file truncated");
  c.key_len.resize(c.has_key_len ? c.B : 0);
  c.bos.resize(c.has_bos ? c.B : 0);
  if (!read_exact(f, c.key_len.data(), c.key_len.size() * 8) ||
      !read_exact(f, c.bos.data(), c.bos.size() * 4))
    cuda_emu::fail("case file truncated");
  return true;
}

struct Output {
  Plan plan{};
  bool q_vec = false, k_vec = false, v_vec = false;
  std::vector<unsigned char> out;
  std::vector<float> prob_sum, ent_sum, row_ent;
  bool operator==(const Output& o) const {
    auto same = [](const auto& a, const auto& b) {
      return a.size() == b.size() &&
             (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
    };
    return same(out, o.out) && same(prob_sum, o.prob_sum) && same(ent_sum, o.ent_sum) &&
           same(row_ent, o.row_ent);
  }
};

void write_result(FILE* f, const Case& c, const Output& r, bool invariant) {
  std::fwrite("ATTNRSLT", 1, 8, f);
  const Plan& p = r.plan;
  const int64_t fields[] = {c.id,
                            invariant,
                            p.f32,
                            p.nkt,
                            p.tile_rows,
                            p.tiles_per_cta,
                            p.nchunks,
                            p.ctas,
                            p.warps,
                            p.nbuf,
                            static_cast<int64_t>(p.smem),
                            p.second_stage,
                            r.q_vec,
                            r.k_vec,
                            r.v_vec};
  std::fwrite(fields, 8, sizeof(fields) / 8, f);
  std::fwrite(r.out.data(), 1, r.out.size(), f);
  std::fwrite(r.prob_sum.data(), 4, r.prob_sum.size(), f);
  std::fwrite(r.ent_sum.data(), 4, r.ent_sum.size(), f);
  std::fwrite(r.row_ent.data(), 4, r.row_ent.size(), f);
  std::fflush(f);
}

// ---- one run of the op, as cross_attention_cuda.cu launches it ----------------------------------
struct Buffers {
  std::vector<cuda_emu::Region> regions;
  cuda_emu::Region& add(size_t bytes) {
    regions.push_back(cuda_emu::guarded_alloc(bytes ? bytes : 16));
    cuda_emu::register_global(regions.back());
    return regions.back();
  }
  ~Buffers() {
    for (auto& r : regions) {
      if (!cuda_emu::canaries_intact(r)) cuda_emu::fail("a kernel wrote outside a global buffer");
      cuda_emu::guarded_free(r);
    }
    cuda_emu::g_globals.clear();
  }
};

template <typename Ops>
struct MmaLaunch {
  const Plan& plan;
  const Params& p;
  size_t optin;
  template <int D, int NKT>
  void run() {
    if (NKT != plan.nkt) cuda_emu::fail("dispatch chose NKT %d, the plan %d", NKT, plan.nkt);
    if constexpr (dim_compiled<D>()) {
      cuda_emu::launch(unsigned(plan.ctas), unsigned(plan.warps * 32), plan.smem, optin,
                       [&] { mma_kernel<Ops, D, NKT>(p); });
    } else {
      cuda_emu::fail("head dim %d is not compiled into this harness", D);
    }
  }
};

Output run_once(const Case& c) {
  Buffers bufs;
  const int64_t es = element_size(int(c.dtype));
  auto operand = [&](const Storage& s, int64_t N) {
    cuda_emu::Region& r = bufs.add(s.bytes.size());
    std::memcpy(r.base, s.bytes.data(), s.bytes.size());
    Operand o{r.base + s.offset * es, {c.B, N, c.H, c.D}, {}, es};
    for (int d = 0; d < 4; ++d) o.stride[d] = s.stride[d];
    return o;
  };
  const Operand q = operand(c.q, c.Nq), k = operand(c.k, c.Nk), v = operand(c.v, c.Nk);
  const bool f32 = c.dtype == kF32;
  size_t optin = static_cast<size_t>(c.optin);
  if (!apply_smem_optin_cap(optin)) cuda_emu::fail("ATTNMEM_CUDA_SMEM_OPTIN_CAP is not a byte count");
  Output r;
  r.plan = make_plan(f32, c.B, c.Nq, c.H, c.Nk, c.D, optin, c.stats != 0, int(c.tpc));
  const Plan& plan = r.plan;
  if (!head_dim_supported(f32, c.D)) cuda_emu::fail("the launcher refuses D = %" PRId64, c.D);
  if (!plan.fits) cuda_emu::fail("the launcher refuses: %zu bytes of shared memory > %zu", plan.smem, optin);
  r.q_vec = rows_vectorizable(q), r.k_vec = rows_vectorizable(k), r.v_vec = rows_vectorizable(v);

  const int64_t BH = c.B * c.H;
  const int64_t n_out = c.B * c.Nq * c.H * c.D;
  Outputs o{};
  o.out = bufs.add(n_out * es).base;
  if (c.stats) {
    o.prob_sum = reinterpret_cast<float*>(bufs.add(BH * c.Nk * 4).base);
    o.ent_sum = reinterpret_cast<float*>(bufs.add(BH * 4).base);
    if (plan.second_stage) {
      o.slot_p = reinterpret_cast<float*>(bufs.add(BH * plan.nchunks * c.Nk * 4).base);
      o.slot_e = reinterpret_cast<float*>(bufs.add(BH * plan.nchunks * 4).base);
    }
  }
  if (c.row_entropy) o.row_ent = reinterpret_cast<float*>(bufs.add(BH * c.Nq * 4).base);
  const int64_t* kl = nullptr;
  const float* bos = nullptr;
  if (c.has_key_len) {
    auto& reg = bufs.add(c.B * 8);
    std::memcpy(reg.base, c.key_len.data(), c.B * 8);
    kl = reinterpret_cast<const int64_t*>(reg.base);
  }
  if (c.has_bos) {
    auto& reg = bufs.add(c.B * 4);
    std::memcpy(reg.base, c.bos.data(), c.B * 4);
    bos = reinterpret_cast<const float*>(reg.base);
  }
  const Params p = make_params(plan, q, k, v, kl, bos, o, c.scale);

  if (f32) {
    cuda_emu::launch(unsigned(plan.ctas), unsigned(plan.warps * 32), plan.smem, optin,
                     [&] { f32_kernel(p); });
  } else if (c.dtype == kF16) {
    MmaLaunch<HalfOps> l{plan, p, optin};
    if (!dispatch_mma(int(c.D), int(c.Nk), l)) cuda_emu::fail("no tensor-core kernel for D");
  } else {
    MmaLaunch<BFloat16Ops> l{plan, p, optin};
    if (!dispatch_mma(int(c.D), int(c.Nk), l)) cuda_emu::fail("no tensor-core kernel for D");
  }
  if (plan.second_stage) {
    cuda_emu::launch(unsigned(BH), kReduceThreads, 0, optin, [&] {
      reduce_slots_kernel(o.slot_p, o.slot_e, p.nchunks, p.Nk, o.prob_sum, o.ent_sum);
    });
  }
  r.out.assign(static_cast<unsigned char*>(o.out), static_cast<unsigned char*>(o.out) + n_out * es);
  if (c.stats) {
    r.prob_sum.assign(o.prob_sum, o.prob_sum + BH * c.Nk);
    r.ent_sum.assign(o.ent_sum, o.ent_sum + BH);
  }
  if (c.row_entropy) r.row_ent.assign(o.row_ent, o.row_ent + BH * c.Nq);
  return r;
}

// The 3 runs every case gets: each thread schedule once, with cp.async landing late (at the
// wait) or eager (at issue) and the buffers against the end or the start guard page.
struct RunMode {
  cuda_emu::Schedule schedule;
  cuda_emu::Landing landing;
  cuda_emu::Placement placement;
  const char* name;
};
constexpr RunMode kRunModes[] = {
    {cuda_emu::kLowestFirst, cuda_emu::kLate, cuda_emu::kAgainstEnd, "lowest-first"},
    {cuda_emu::kHighestFirst, cuda_emu::kEager, cuda_emu::kAgainstStart, "highest-first"},
    {cuda_emu::kRandom, cuda_emu::kLate, cuda_emu::kAgainstEnd, "random"},
};

int cmd_run(const char* cases_path, const char* results_path) {
  FILE* in = std::fopen(cases_path, "rb");
  FILE* out = std::fopen(results_path, "wb");
  if (!in || !out) cuda_emu::fail("cannot open %s or %s", cases_path, results_path);
  Case c;
  int n = 0, varying = 0;
  while (read_case(in, c)) {
    std::fprintf(stderr, "case %" PRId64 "\n", c.id);  // names the case if the emulator stops
    Output first;
    bool invariant = true;
    for (const RunMode& m : kRunModes) {
      cuda_emu::g_schedule = m.schedule;
      cuda_emu::g_landing = m.landing;
      cuda_emu::g_placement = m.placement;
      cuda_emu::g_seed = 1234u + unsigned(c.id);
      Output r = run_once(c);
      if (&m == &kRunModes[0]) {
        first = std::move(r);
      } else if (!(r == first)) {
        invariant = false;
        std::fprintf(stderr, "case %" PRId64 ": the %s run differs from the lowest-first run\n",
                     c.id, m.name);
      }
    }
    varying += !invariant;
    write_result(out, c, first, invariant);
    ++n;
  }
  std::fclose(in);
  std::fclose(out);
  std::printf("%d cases run, %d with schedule-dependent bits\n", n, varying);
  return 0;
}

// Every distinct plan the launcher can pick on devices with these opt-ins: for the tensor-core
// kernel per (dtype, D, NKT, tiles_per_cta) -> (warps, nbuf); for the fp32 kernel per
// (tiles_per_cta, warps) over every D <= 160 and key class. One line per plan with the cheapest
// input (smallest D, then Nk) that reaches it:
//   plan KERNEL D NK TPC WARPS NBUF SMEM OPTIN
// Also checks that no plan needs more shared memory than max_plan_smem(), the value the launcher
// sets once per (device, instantiation).
int cmd_plans(int argc, char** argv) {
  std::vector<size_t> optins;
  for (int i = 0; i < argc; ++i) optins.push_back(std::strtoull(argv[i], nullptr, 10));
  using Key = std::tuple<std::string, int, int, int, int, int>;  // kernel, D|0, nkt, tpc, W, nbuf
  std::map<Key, std::tuple<int, int, size_t, size_t>> found;       // -> D, Nk, smem, optin
  auto note = [&](const Key& key, int D, int Nk, const Plan& p, size_t optin) {
    if (!p.fits) cuda_emu::fail("no plan fits D %d Nk %d in %zu bytes", D, Nk, optin);
    if (!found.count(key)) found[key] = {D, Nk, p.smem, optin};
  };
  for (size_t optin : optins) {
    std::vector<int> dims;
#define CUDA_EMU_LIST_DIM(d) dims.push_back(d);
    ATTNMEM_CUDA_HEAD_DIMS(CUDA_EMU_LIST_DIM)
#undef CUDA_EMU_LIST_DIM
    for (int D : dims)
      for (int Nk : {80, 128}) {
        const int nkt = mma_key_tiles(Nk);
        const size_t bound = max_plan_smem(D, nkt, optin);
        if (bound == 0 || bound > optin) cuda_emu::fail("max_plan_smem out of range for D %d", D);
        for (int tpc = 1; tpc * kTileRows <= kMaxRowsPerCta; tpc *= 2) {
          const Plan p = make_plan(false, 1, tpc * kTileRows, 1, Nk, D, optin, true, tpc);
          if (p.smem > bound) cuda_emu::fail("plan above max_plan_smem for D %d", D);
          for (const char* k : {"fp16", "bf16"})
            note({k, D, nkt, tpc, p.warps, p.nbuf}, D, Nk, p, optin);
        }
      }
    const size_t bound = max_plan_smem(0, 0, optin);
    if (bound == 0 || bound > optin) cuda_emu::fail("max_plan_smem out of range for fp32");
    for (int tpc = 1; tpc * kTileRowsF32 <= kMaxRowsPerCta; tpc *= 2)
      for (int D = 1; D <= kF32MaxD; ++D)
        for (int Nk = 32; Nk <= kMaxKeysCuda; Nk += 32) {
          const Plan p = make_plan(true, 1, tpc * kTileRowsF32, 1, Nk, D, optin, true, tpc);
          if (p.smem > bound) cuda_emu::fail("fp32 plan above max_plan_smem");
          note({"fp32", 0, 0, tpc, p.warps, 0}, D, Nk, p, optin);
        }
  }
  for (const auto& [key, val] : found) {
    const auto& [kernel, d, nkt, tpc, W, nbuf] = key;
    const auto& [D, Nk, smem, optin] = val;
    std::printf("plan %s %d %d %d %d %d %zu %zu\n", kernel.c_str(), D, Nk, tpc, W, nbuf, smem,
                optin);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  if (cmd == "run" && argc == 4) return cmd_run(argv[2], argv[3]);
  if (cmd == "plans" && argc > 2) return cmd_plans(argc - 2, argv + 2);
  if (cmd == "plan" && argc == 9) {
    const bool f32 = std::string(argv[2]) == "fp32";
    int64_t v[6];
    for (int i = 0; i < 6; ++i) v[i] = std::strtoll(argv[3 + i], nullptr, 10);
    const Plan p = make_plan(f32, v[0], v[1], v[2], v[4], v[3], size_t(v[5]), true);
    std::printf("tiles_per_cta %d nchunks %" PRId64 " warps %d nbuf %d smem %zu\n",
                p.tiles_per_cta, p.nchunks, p.warps, p.nbuf, p.smem);
    return 0;
  }
  if (cmd == "dims" && argc == 2) {
#define CUDA_EMU_PRINT_DIM(d) std::printf("%d ", d);
    ATTNMEM_CUDA_HEAD_DIMS(CUDA_EMU_PRINT_DIM)
#undef CUDA_EMU_PRINT_DIM
    std::printf("\n%d\n", kF32MaxD);
    return 0;
  }
  std::fprintf(stderr, "usage: %s run CASES RESULTS | plans OPTIN... | plan ... | dims\n",
               argv[0]);
  return 2;
}
