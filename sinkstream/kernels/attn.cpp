// Attention of one decode token over a cache view, grouped-query layout:
//
//   decode_attention(q [1, H, G, D] f32 contiguous, k [1, H, n, D], v [1, H, n, Dv], scale) -> [1, H, G, Dv] f32
//
// H kv heads, G query heads sharing each (the rows `attention._sdpa` forms for a decode step), k/v float32 or
// bfloat16 with contiguous rows (a slice of a cache buffer). Keys are split into chunks that run in parallel
// (each keeps its own max, sum and partial output, merged at the end: "flash decoding"); each chunk reads
// its keys and values once for all G query rows. torch's CPU SDPA spends 2-3x longer on these shapes (it is
// built for blocks of many queries).
//
//   decode_attention_many(q [B, H, G, D], k_new [B, H, D], v_new [B, H, Dv], sinks [B, H, S, D] or None,
//                         k_bufs, v_bufs, slots, lens, scale) -> [B, H, G, Dv] f32
//
// One decode token of each of B caches (`attention._decode_together`): writes cache b's new key and value
// into slot slots[b] of its buffers k_bufs[b], v_bufs[b] ([1, H, capacity, D], float32 or bfloat16, rounded
// as a copy into them rounds), and its rotated sinks into slots 0..S-1, then attends over slots
// 0..lens[b]-1, every cache's chunks in one parallel loop: one call a layer for the whole batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 256;  // keys per task
constexpr int64_t MAX_D = 256;  // head sizes up to this take the 8-keys-at-a-time path

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

#if defined(__AVX2__)
// The dots of q with 8 consecutive rows of k (float32, D a multiple of 8), as 8 lanes: one accumulator a
// row, reduced together by a tree of horizontal adds.
inline __m256 dot8(const float* q, const float* k, int64_t D) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t i = 0; i < D; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + D + i), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * D + i), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * D + i), a3);
    a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * D + i), a4);
    a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * D + i), a5);
    a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * D + i), a6);
    a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * D + i), a7);
  }
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// n values at k as float32: k itself, or converted into buf
inline const float* as_f32(const float* k, float*, int64_t) { return k; }
inline const float* as_f32(const at::BFloat16* k, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(buf + i, load8(k + i));
  return buf;
}
#endif

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

// out[g][0..dv) = sum_j p[g][j] * v[j * dv + 0..dv) for NG query rows (p rows `ps` apart, out rows `dv`
// apart): each value row is loaded once for all of them, 32 columns at a time (dv a multiple of 32).
template <int NG, typename T>
inline void weighted_sums(float* out, const float* p, int64_t ps, const T* v, int64_t m, int64_t dv) {
#if defined(__AVX2__)
  for (int64_t c = 0; c < dv; c += 32) {
    __m256 a[NG][4];
    for (int g = 0; g < NG; ++g)
      for (int u = 0; u < 4; ++u) a[g][u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < m; ++j) {
      const T* vj = v + j * dv + c;
      const __m256 v0 = load8(vj), v1 = load8(vj + 8), v2 = load8(vj + 16), v3 = load8(vj + 24);
      for (int g = 0; g < NG; ++g) {
        const __m256 pj = _mm256_set1_ps(p[g * ps + j]);
        a[g][0] = _mm256_fmadd_ps(pj, v0, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(pj, v1, a[g][1]);
        a[g][2] = _mm256_fmadd_ps(pj, v2, a[g][2]);
        a[g][3] = _mm256_fmadd_ps(pj, v3, a[g][3]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(out + g * dv + c + 8 * u, a[g][u]);
  }
#else
  for (int g = 0; g < NG; ++g) weighted_sum(out + g * dv, p + g * ps, v, m, dv);
#endif
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

// One cache's keys and values for one call: n rows of each kv head, heads `ks` / `vs` elements apart.
template <typename T>
struct View {
  const T* k;
  const T* v;
  int64_t n, ks, vs;
};

// out[b] = attention of q[b] ([H, G, D]) over views[b], for every b, in one parallel loop over (b, h, chunk)
template <typename T>
void run(const float* q, const std::vector<View<T>>& views, float* out, int64_t H, int64_t G, int64_t D, int64_t Dv,
         float scale) {
  const int64_t B = views.size();
  std::vector<int64_t> first(B + 1, 0);  // first task of view b (its chunks of head 0, then head 1, ...)
  for (int64_t b = 0; b < B; ++b) first[b + 1] = first[b] + H * ((views[b].n + CHUNK - 1) / CHUNK);
  const int64_t tasks = first[B];
  std::vector<int64_t> owner(tasks);
  for (int64_t b = 0; b < B; ++b) std::fill(owner.begin() + first[b], owner.begin() + first[b + 1], b);
  std::vector<float> pm(tasks * G), pl(tasks * G), po(tasks * G * Dv, 0.f);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(G * CHUNK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = owner[t], chunks = (first[b + 1] - first[b]) / H, local = t - first[b];
      const View<T>& w = views[b];
      const int64_t h = local / chunks, j0 = (local % chunks) * CHUNK, j1 = std::min(w.n, j0 + CHUNK), m = j1 - j0;
      const float* qh = q + (b * H + h) * G * D;
      const T* vh = w.v + h * w.vs + j0 * Dv;
      const int64_t vbytes = Dv * (int64_t)sizeof(T), kbytes = D * (int64_t)sizeof(T);
      int64_t j = 0;
#if defined(__AVX2__)
      if (D % 8 == 0 && D <= MAX_D) {  // 8 keys at a time, each converted once for the G query rows
        alignas(32) float kb[8 * MAX_D];
        const __m256 sc = _mm256_set1_ps(scale);
        for (; j + 8 <= m; j += 8) {
          const T* kj = w.k + h * w.ks + (j0 + j) * D;
          // the chunk's values are read once its scores are known: ask for them now, with the next keys
          for (int64_t c = 0; c < 8 * vbytes; c += 64) _mm_prefetch((const char*)(vh + j * Dv) + c, _MM_HINT_T0);
          if (j + 16 <= m)
            for (int64_t c = 0; c < 8 * kbytes; c += 64) _mm_prefetch((const char*)(kj + 8 * D) + c, _MM_HINT_T0);
          const float* kf = as_f32(kj, kb, 8 * D);
          for (int64_t g = 0; g < G; ++g) _mm256_storeu_ps(&s[g * CHUNK + j], _mm256_mul_ps(dot8(qh + g * D, kf, D), sc));
        }
      }
#endif
      for (; j < m; ++j) {
        const T* kj = w.k + h * w.ks + (j0 + j) * D;
        // the chunk's values are read once its scores are known: ask for them now, while the keys stream in
        for (int64_t c = 0; c < vbytes; c += 64) _mm_prefetch((const char*)(vh + j * Dv) + c, _MM_HINT_T0);
        if (j + 8 < m)
          for (int64_t c = 0; c < kbytes; c += 64) _mm_prefetch((const char*)(kj + 8 * D) + c, _MM_HINT_T0);
        for (int64_t g = 0; g < G; ++g) s[g * CHUNK + j] = dot(qh + g * D, kj, D) * scale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * CHUNK;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < m; ++j) mx = std::max(mx, sg[j]);
        pm[t * G + g] = mx;
        pl[t * G + g] = exp_sub(sg, m, mx);
      }
      const T* vc = w.v + h * w.vs + j0 * Dv;
      float* oc = po.data() + t * G * Dv;
      if (Dv % 32 == 0) {  // up to 4 query rows a pass over the chunk's values
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) weighted_sums<4>(oc + g * Dv, s.data() + g * CHUNK, CHUNK, vc, m, Dv);
        switch (G - g) {
          case 3: weighted_sums<3>(oc + g * Dv, s.data() + g * CHUNK, CHUNK, vc, m, Dv); break;
          case 2: weighted_sums<2>(oc + g * Dv, s.data() + g * CHUNK, CHUNK, vc, m, Dv); break;
          case 1: weighted_sums<1>(oc + g * Dv, s.data() + g * CHUNK, CHUNK, vc, m, Dv); break;
          default: break;
        }
      } else {
        for (int64_t g = 0; g < G; ++g) weighted_sum(oc + g * Dv, s.data() + g * CHUNK, vc, m, Dv);
      }
    }
  });
  // merge each (b, h, g) row's chunks by their maxima
  at::parallel_for(0, B * H * G, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * G), h = (r / G) % H, g = r % G;
      const int64_t chunks = (first[b + 1] - first[b]) / H, t_first = first[b] + h * chunks;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, pm[(t_first + c) * G + g]);
      float* o = out + r * Dv;
      for (int64_t i = 0; i < Dv; ++i) o[i] = 0.f;
      float l = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t = t_first + c;
        const float w = std::exp(pm[t * G + g] - mx);
        l += w * pl[t * G + g];
        axpy(o, w, po.data() + (t * G + g) * Dv, Dv);
      }
      const float inv = 1.f / l;
      for (int64_t i = 0; i < Dv; ++i) o[i] *= inv;
    }
  });
}

template <typename T>
View<T> view_of(const at::Tensor& k, const at::Tensor& v, int64_t n) {
  return View<T>{k.data_ptr<T>(), v.data_ptr<T>(), n, k.stride(1), v.stride(1)};
}

template <typename T>
inline void store_row(T* dst, const float* src, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(src[i]);
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
    run<float>(q.data_ptr<float>(), {view_of<float>(k, v, n)}, out.data_ptr<float>(), H, G, D, Dv, (float)scale);
  } else {
    run<at::BFloat16>(q.data_ptr<float>(), {view_of<at::BFloat16>(k, v, n)}, out.data_ptr<float>(), H, G, D, Dv,
                      (float)scale);
  }
  return out;
}

template <typename T>
at::Tensor many(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const c10::optional<at::Tensor>& sinks,
                at::TensorList k_bufs, at::TensorList v_bufs, at::IntArrayRef slots, at::IntArrayRef lens, double scale) {
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), Dv = v_new.size(2);
  const int64_t S = sinks.has_value() ? sinks->size(2) : 0;
  std::vector<View<T>> views;
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor &k = k_bufs[b], &v = v_bufs[b];
    const int64_t cap = k.size(2), n = lens[b], slot = slots[b];
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == 1 && v.size(0) == 1 && k.size(1) == H && v.size(1) == H &&
                k.size(3) == D && v.size(3) == Dv && v.size(2) == cap, "buffer ", b, ": [1, H, capacity, D] expected");
    TORCH_CHECK(k.scalar_type() == k_bufs[0].scalar_type() && v.scalar_type() == k.scalar_type(), "buffers of one dtype");
    TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == Dv, "buffers: contiguous rows");
    TORCH_CHECK(0 <= slot && slot < n && n <= cap && S <= slot, "cache ", b, ": slot ", slot, " outside its view of ", n);
    T* kp = k.data_ptr<T>();
    T* vp = v.data_ptr<T>();
    for (int64_t h = 0; h < H; ++h) {
      store_row(kp + h * k.stride(1) + slot * D, k_new.data_ptr<float>() + (b * H + h) * D, D);
      store_row(vp + h * v.stride(1) + slot * Dv, v_new.data_ptr<float>() + (b * H + h) * Dv, Dv);
      for (int64_t j = 0; j < S; ++j)
        store_row(kp + h * k.stride(1) + j * D, sinks->data_ptr<float>() + ((b * H + h) * S + j) * D, D);
    }
    views.push_back(view_of<T>(k, v, n));
  }
  auto out = at::empty({B, H, G, Dv}, q.options());
  run<T>(q.data_ptr<float>(), views, out.data_ptr<float>(), H, G, D, Dv, (float)scale);
  return out;
}

at::Tensor decode_attention_many(at::Tensor q, at::Tensor k_new, at::Tensor v_new, c10::optional<at::Tensor> sinks,
                                 at::TensorList k_bufs, at::TensorList v_bufs, at::IntArrayRef slots,
                                 at::IntArrayRef lens, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 [B, H, G, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(k_new.dim() == 3 && k_new.size(0) == B && k_new.size(1) == H && k_new.size(2) == D &&
              k_new.scalar_type() == at::kFloat && k_new.is_contiguous(), "k_new: contiguous float32 [B, H, D]");
  TORCH_CHECK(v_new.dim() == 3 && v_new.size(0) == B && v_new.size(1) == H && v_new.scalar_type() == at::kFloat &&
              v_new.is_contiguous(), "v_new: contiguous float32 [B, H, Dv]");
  TORCH_CHECK(!sinks.has_value() || (sinks->dim() == 4 && sinks->size(0) == B && sinks->size(1) == H &&
              sinks->size(3) == D && sinks->scalar_type() == at::kFloat && sinks->is_contiguous()),
              "sinks: contiguous float32 [B, H, S, D]");
  TORCH_CHECK((int64_t)k_bufs.size() == B && (int64_t)v_bufs.size() == B && (int64_t)slots.size() == B &&
              (int64_t)lens.size() == B && B > 0, "one buffer pair, slot and length per cache");
  if (k_bufs[0].scalar_type() == at::kFloat) return many<float>(q, k_new, v_new, sinks, k_bufs, v_bufs, slots, lens, scale);
  TORCH_CHECK(k_bufs[0].scalar_type() == at::kBFloat16, "buffers: float32 or bfloat16");
  return many<at::BFloat16>(q, k_new, v_new, sinks, k_bufs, v_bufs, slots, lens, scale);
}

TORCH_LIBRARY_FRAGMENT(sinkstream, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  lib.def("decode_attention_many(Tensor q, Tensor k_new, Tensor v_new, Tensor? sinks, Tensor(a!)[] k_bufs, "
          "Tensor(b!)[] v_bufs, int[] slots, int[] lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sinkstream, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
  lib.impl("decode_attention_many", &decode_attention_many);
}
