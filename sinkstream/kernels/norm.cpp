// Small CPU ops of a decode step, where torch's general kernels cost more than the arithmetic (torch's
// fused CPU rms_norm: ~13 us for one row of 576, 12 ms for 512 rows):
//
//   rms_norm(x [..., D] f32 contiguous, w [D] f32, eps, offset) -> x / rms(x) * (offset + w)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  s = _mm_cvtss_f32(h);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

at::Tensor rms_norm(at::Tensor x, at::Tensor w, double eps, double offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "x, w: contiguous float32");
  const int64_t D = w.numel(), R = x.numel() / D;
  TORCH_CHECK(x.size(-1) == D, "x's last dimension must match w");
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = xp + r * D;
      const float inv = 1.f / std::sqrt(dot(a, a, D) / (float)D + (float)eps);
      for (int64_t i = 0; i < D; ++i) op[r * D + i] = a[i] * inv * ((float)offset + wp[i]);
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(sinkstream, lib) {
  lib.def("rms_norm(Tensor x, Tensor w, float eps, float offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(sinkstream, CPU, lib) {
  lib.impl("rms_norm", &rms_norm);
}
