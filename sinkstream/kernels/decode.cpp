// Small CPU ops of one decode step, where torch's general kernels cost more in dispatch and threading than
// in arithmetic:
//
//   decode_attention(q [B,H,D] f32, k [B,KV,L,D], v [B,KV,L,Dv] (f32 or f16, any strides but the last),
//                    scale) -> [B,H,Dv] f32
//       one query per head over every cached key (no mask). The H/KV query heads sharing a kv head read
//       each key and value row once; work is split over kv heads and chunks of keys.
//   rms_norm(x [..., D] f32 contiguous, w [D] f32, eps, offset) -> x / rms(x) * (offset + w)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t CHUNK = 256;  // keys per task

inline void load_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void load_row(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

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

inline void axpy(float p, const float* x, float* y, int64_t n) {  // y += p * x
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += p * x[i];
}

template <typename T>
void attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), L = k.size(2), Dv = v.size(3);
  const int64_t G = H / KV, nch = (L + CHUNK - 1) / CHUNK;
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const auto ks = k.strides(), vs = v.strides();
  std::vector<float> scores(B * H * L), partial(B * KV * nch * G * Dv, 0.f), mx(B * H), sum(B * H);
  // 1. scores: q . k for the G heads of each kv head, each key row read once
  at::parallel_for(0, B * KV * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (KV * nch), h = (t / nch) % KV, c = t % nch;
      for (int64_t l = c * CHUNK; l < std::min(L, (c + 1) * CHUNK); ++l) {
        load_row(kp + b * ks[0] + h * ks[1] + l * ks[2], row.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t qh = h * G + g;
          scores[(b * H + qh) * L + l] = scale * dot(qp + (b * H + qh) * D, row.data(), D);
        }
      }
    }
  });
  // 2. softmax numerators in place, with each row's max and sum
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* s = scores.data() + r * L;
      float m = -INFINITY, z = 0.f;
      for (int64_t l = 0; l < L; ++l) m = std::max(m, s[l]);
      for (int64_t l = 0; l < L; ++l) { s[l] = std::exp(s[l] - m); z += s[l]; }
      mx[r] = m;
      sum[r] = z;
    }
  });
  // 3. weighted values per chunk, each value row read once for the G heads; then the chunks summed
  at::parallel_for(0, B * KV * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(Dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (KV * nch), h = (t / nch) % KV, c = t % nch;
      float* acc = partial.data() + t * G * Dv;
      for (int64_t l = c * CHUNK; l < std::min(L, (c + 1) * CHUNK); ++l) {
        load_row(vp + b * vs[0] + h * vs[1] + l * vs[2], row.data(), Dv);
        for (int64_t g = 0; g < G; ++g) axpy(scores[(b * H + h * G + g) * L + l], row.data(), acc + g * Dv, Dv);
      }
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < KV; ++h) {
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (b * H + h * G + g) * Dv;
        std::fill(o, o + Dv, 0.f);
        for (int64_t c = 0; c < nch; ++c) axpy(1.f, partial.data() + (((b * KV + h) * nch + c) * G + g) * Dv, o, Dv);
        const float inv = 1.f / sum[b * H + h * G + g];
        for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
      }
    }
  }
}

}  // namespace

at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 [B, H, D]");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.scalar_type() == v.scalar_type(), "k, v: [B, KV, L, D] of one dtype");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k, v: contiguous last dimension");
  TORCH_CHECK(k.size(0) == q.size(0) && q.size(1) % k.size(1) == 0 && k.size(3) == q.size(2) &&
              v.sizes().slice(0, 3) == k.sizes().slice(0, 3), "shapes of q, k, v do not match");
  TORCH_CHECK(k.size(2) > 0, "no keys");
  auto out = at::empty({q.size(0), q.size(1), v.size(3)}, q.options());
  if (k.scalar_type() == at::kFloat) {
    attend_one<float>(q, k, v, (float)scale, out);
  } else {
    TORCH_CHECK(k.scalar_type() == at::kHalf, "k, v: float32 or float16");
    attend_one<at::Half>(q, k, v, (float)scale, out);
  }
  return out;
}

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
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  lib.def("rms_norm(Tensor x, Tensor w, float eps, float offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(sinkstream, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
  lib.impl("rms_norm", &rms_norm);
}
