// Argument checks shared by the CPU and CUDA entry points of attnmem::cross_attention.
//
// The Python wrapper (attnmem/ops.py) raises ValueError with the same wording before the op is
// reached; these checks guard direct calls through torch.ops.attnmem.cross_attention so a bad
// input is always a RuntimeError naming the argument, never a crash or a silent wrong answer.
// Value checks that would need a device sync (key_len range, bos_scale finiteness) are only done
// here for CPU tensors; the wrapper does them for every device.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <optional>

namespace attnmem {

constexpr int64_t kMaxKeys = 128;

struct Dims {
  int64_t B, Nq, H, D, Nk;
};

inline Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_len,
                         const std::optional<at::Tensor>& bos_scale) {
  TORCH_CHECK(q.dim() == 4, "cross_attention: q must be 4-D (B, Nq, H, D), got ", q.dim(),
              "-D with shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "cross_attention: k must be 4-D (B, Nk, H, D), got ", k.dim(),
              "-D with shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "cross_attention: v must be 4-D (B, Nk, H, D), got ", v.dim(),
              "-D with shape ", v.sizes());
  Dims d{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1)};
  TORCH_CHECK(k.size(0) == d.B && k.size(2) == d.H && k.size(3) == d.D,
              "cross_attention: k must have shape (B, Nk, H, D) = (", d.B, ", Nk, ", d.H, ", ", d.D,
              ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "cross_attention: v must have the shape of k ", k.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK(d.Nk >= 1 && d.Nk <= kMaxKeys, "cross_attention: k must have 1 <= Nk <= ", kMaxKeys,
              " keys, got Nk = ", d.Nk);
  TORCH_CHECK(d.D >= 1, "cross_attention: head dim D must be >= 1, got ", d.D);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "cross_attention: q, k, v must share one dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "cross_attention: q, k, v must be on one device, got ", q.device(), ", ", k.device(),
              ", ", v.device());
  if (key_len.has_value()) {
    const auto& kl = *key_len;
    TORCH_CHECK(kl.dim() == 1 && kl.size(0) == d.B, "cross_attention: key_len must have shape (B,) = (",
                d.B, ",), got ", kl.sizes());
    TORCH_CHECK(!at::isFloatingType(kl.scalar_type()) && kl.scalar_type() != at::kBool,
                "cross_attention: key_len must be an integer tensor, got ", kl.scalar_type());
    TORCH_CHECK(kl.device() == q.device(), "cross_attention: key_len must be on ", q.device(),
                ", got ", kl.device());
    if (kl.device().is_cpu() && kl.numel() > 0) {
      auto lo = kl.min().item<int64_t>();
      auto hi = kl.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi <= d.Nk, "cross_attention: key_len values must lie in [0, Nk] = [0, ",
                  d.Nk, "], got min ", lo, " max ", hi);
    }
  }
  if (bos_scale.has_value()) {
    const auto& bs = *bos_scale;
    TORCH_CHECK(bs.dim() == 1 && bs.size(0) == d.B,
                "cross_attention: bos_scale must have shape (B,) = (", d.B, ",), got ", bs.sizes());
    TORCH_CHECK(bs.scalar_type() == at::kFloat, "cross_attention: bos_scale must be float32, got ",
                bs.scalar_type());
    TORCH_CHECK(bs.device() == q.device(), "cross_attention: bos_scale must be on ", q.device(),
                ", got ", bs.device());
    if (bs.device().is_cpu() && bs.numel() > 0) {
      TORCH_CHECK(at::isfinite(bs).all().item<bool>(),
                  "cross_attention: bos_scale must be finite, got ", bs);
    }
  }
  return d;
}

inline double resolve_scale(std::optional<double> scale, int64_t D) {
  double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK(std::isfinite(s), "cross_attention: scale must be finite, got ", s);
  return s;
}

}  // namespace attnmem
