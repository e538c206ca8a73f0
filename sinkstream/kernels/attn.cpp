// Attention of one decode token over a cache view, grouped-query layout:
//
//   decode_attention(q [1, H, G, D] f32 contiguous, k [1, H, n, D], v [1, H, n, Dv], scale) -> [1, H, G, Dv] f32
//
// H kv heads, G query heads sharing each (the rows `attention._sdpa` forms for a decode step), k/v float32 or
// bfloat16 with contiguous rows (a slice of a cache buffer). Keys are split into chunks that run in parallel
// (each keeps its own max, sum and partial output, merged at the end: "flash decoding"); each chunk reads
// its keys and values once for all G query rows. torch's CPU SDPA spends 2-3x longer on these shapes (it is
// built for blocks of many queries).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 256;  // keys per task

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// e^x for x <= 0 (scores minus their maximum): 2^(x log2 e) split into an integer power of two and a degree-6
// polynomial on [-ln2/2, ln2/2]; relative error about 2e-7. Below -87 the result is 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

template <typename T> inline float to_f(T x) { return static_cast<float>(x); }

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), a1);
  }
  for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
  s = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; i < d; ++i) s += q[i] * to_f(k[i]);
  return s;
}

// out[0..dv) += p * v[0..dv)
template <typename T>
inline void axpy(float* out, float p, const T* v, int64_t dv) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= dv; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(out + i)));
#endif
  for (; i < dv; ++i) out[i] += p * to_f(v[i]);
}

// out[0..dv) = sum_j p[j] * v[j * dv + 0..dv), 32 columns at a time held in registers
template <typename T>
inline void weighted_sum(float* out, const float* p, const T* v, int64_t m, int64_t dv) {
  int64_t c = 0;
#if defined(__AVX2__)
  for (; c + 32 <= dv; c += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t j = 0; j < m; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const T* vj = v + j * dv + c;
      a0 = _mm256_fmadd_ps(pj, load8(vj), a0);
      a1 = _mm256_fmadd_ps(pj, load8(vj + 8), a1);
      a2 = _mm256_fmadd_ps(pj, load8(vj + 16), a2);
      a3 = _mm256_fmadd_ps(pj, load8(vj + 24), a3);
    }
    _mm256_storeu_ps(out + c, a0);
    _mm256_storeu_ps(out + c + 8, a1);
    _mm256_storeu_ps(out + c + 16, a2);
    _mm256_storeu_ps(out + c + 24, a3);
  }
#endif
  for (; c < dv; ++c) {
    float a = 0.f;
    for (int64_t j = 0; j < m; ++j) a += p[j] * to_f(v[j * dv + c]);
    out[c] = a;
  }
}

// softmax numerators of s[0..n) in place (s - max), returning their sum
inline float exp_sub(float* s, int64_t n, float m) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX2__)
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

template <typename T>
void run(const float* q, const T* k, const T* v, float* out, int64_t H, int64_t G, int64_t D, int64_t Dv,
         int64_t n, int64_t ks, int64_t vs, float scale) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK, tasks = H * chunks;
  std::vector<float> pm(tasks * G), pl(tasks * G), po(tasks * G * Dv, 0.f);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(G * CHUNK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / chunks, j0 = (t % chunks) * CHUNK, j1 = std::min(n, j0 + CHUNK), m = j1 - j0;
      const float* qh = q + h * G * D;
      for (int64_t j = 0; j < m; ++j) {
        const T* kj = k + h * ks + (j0 + j) * D;
        for (int64_t g = 0; g < G; ++g) s[g * CHUNK + j] = dot(qh + g * D, kj, D) * scale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * CHUNK;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < m; ++j) mx = std::max(mx, sg[j]);
        pm[t * G + g] = mx;
        pl[t * G + g] = exp_sub(sg, m, mx);
        weighted_sum(po.data() + (t * G + g) * Dv, sg, v + h * vs + j0 * Dv, m, Dv);
      }
    }
  });
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, pm[(h * chunks + c) * G + g]);
      float* o = out + (h * G + g) * Dv;
      for (int64_t i = 0; i < Dv; ++i) o[i] = 0.f;
      float l = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t = h * chunks + c;
        const float w = std::exp(pm[t * G + g] - mx);
        l += w * pl[t * G + g];
        axpy(o, w, po.data() + (t * G + g) * Dv, Dv);
      }
      const float inv = 1.f / l;
      for (int64_t i = 0; i < Dv; ++i) o[i] *= inv;
    }
  }
}

}  // namespace

at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(0) == 1 && k.size(0) == 1 && v.size(0) == 1,
              "q [1, H, G, D], k [1, H, n, D], v [1, H, n, Dv]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
              (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16), "k, v: float32 or bfloat16");
  const int64_t H = q.size(1), G = q.size(2), D = q.size(3), n = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(1) == H && v.size(1) == H && k.size(3) == D && v.size(2) == n && n > 0, "shapes disagree");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == Dv, "k, v: contiguous rows");
  auto out = at::empty({1, H, G, Dv}, q.options());
  if (k.scalar_type() == at::kFloat) {
    run(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(), H, G, D, Dv, n,
        k.stride(1), v.stride(1), (float)scale);
  } else {
    run(q.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), out.data_ptr<float>(), H, G,
        D, Dv, n, k.stride(1), v.stride(1), (float)scale);
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(sinkstream, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sinkstream, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
}
