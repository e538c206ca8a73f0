// Matrix products with 4-bit and 8-bit block-quantized weights for the CPU, the way llama.cpp computes
// them: activations are quantized to int8 per block of 32 on entry, each 32-weight block is an integer dot
// product scaled once in float. With AVX-512 VNNI the products are qtile.cpp's (16 weight rows at a time,
// AMX tiles where the CPU has them); with AVX2 each weight row is a dot product (maddubs, or AVX-VNNI).
//
//   q4_mm(x [M,K] f32, qs u8 [N,K/2], d f16 [N,K/32], m f16 [N,K/32]) -> [M,N] f32,  w = q * d + m
//       nibbles: byte j of a block holds element j (low) and element j + 16 (high), as GGUF's Q4_0/Q4_1.
//   q8_mm(x [M,K] f32, qs i8 [N,K], d f16 [N,K/32]) -> [M,N] f32,                    w = q * d
//   f32_mm(x [M,K] f32, w [N,K] f32) -> [M,N] f32: float weights for passes of a few rows (decode steps of
//       one or several streams), each weight row read once for up to 4 of them, every row's arithmetic the
//       same whatever M.
//   q4_dequant / q8_dequant(rows [r0, r1) of the same) -> [r1-r0, K] bf16: for many-token passes, which go
//       through a bf16 matrix multiply (oneDNN, AMX where the CPU has it) on a slice of rows at a time.
// Every path computes a row of y the same whatever the other rows of x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "qtile.h"

namespace {

constexpr int QK = 32;

struct QuantizedRows {  // activations: int8 per block of 32 with a float scale, and scale * sum(q)
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

// Where element i of block b of a row of nb blocks goes in the quantized activations, so that one load of
// packed weight bytes, unpacked as low nibbles then high nibbles, meets its activations with no shuffle:
//   PLAIN: in order (q8_mm, and the column kernels of qtile.cpp);
//   PAIRS (q4_mm with AVX2 only): blocks 2j, 2j+1 as [2j: 0..15, 2j+1: 0..15, 2j: 16..31, 2j+1: 16..31], and a
//       last odd block in order.
enum Layout { PLAIN, PAIRS };

inline int64_t slot(int64_t b, int i, int64_t nb, Layout layout) {
  if (layout == PLAIN || (b | 1) >= nb) return b * QK + i;
  return (b & ~int64_t(1)) * QK + (i < 16 ? 0 : QK) + (b & 1) * 16 + (i & 15);
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, Layout layout = PLAIN) {
  const int64_t nb = K / QK;
  QuantizedRows r{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb)};
  at::parallel_for(0, M * nb, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* v = x + b * QK;
#if defined(__AVX512F__)
      if (layout == PLAIN) {  // the same numbers as the loop below, 16 lanes at a time
        const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.f, inv = d ? 1.f / d : 0.f;
        const __m512 iv = _mm512_set1_ps(inv);  // rounded to nearest even, as nearbyint
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, iv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, iv));
        _mm_storeu_si128((__m128i*)(r.q.data() + b * QK), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i*)(r.q.data() + b * QK + 16), _mm512_cvtepi32_epi8(q1));
        r.d[b] = d;
        r.s[b] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        continue;
      }
#endif
      float amax = 0.f;
      for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f, inv = d ? 1.f / d : 0.f;
      int sum = 0;
      for (int i = 0; i < QK; ++i) {
        const int q = (int)std::nearbyint(v[i] * inv);
        r.q[(b / nb) * K + slot(b % nb, i, nb, layout)] = (int8_t)q;
        sum += q;
      }
      r.d[b] = d;
      r.s[b] = d * (float)sum;
    }
  });
  return r;
}

#if defined(__AVX2__)
inline __m256i dot_u8_s8(__m256i u, __m256i s) {  // 8 int32 sums of 4 adjacent u8*s8 products
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
#endif

inline float h2f(at::Half h) { return static_cast<float>(h); }

constexpr int64_t MAX_BLOCKS = 2048;  // rows up to 65536 columns take the vectorized scale path

float dot_q4(const uint8_t* qs, const at::Half* d, const at::Half* m, const int8_t* xq, const float* xd,
             const float* xs, int64_t nb) {
  float mins = 0.f;
#if defined(__AVX2__)
  // each block's scale (the weight's d times the activation's) and the min term, 8 blocks a step, so the
  // block loop below does integer dots and one broadcast multiply-add per block
  alignas(32) float dd[MAX_BLOCKS];
  int64_t b = 0;
  if (nb <= MAX_BLOCKS) {
    __m256 mins8 = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8) {
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(d + b)));
      _mm256_store_ps(dd + b, _mm256_mul_ps(dv, _mm256_loadu_ps(xd + b)));
      mins8 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(m + b))), _mm256_loadu_ps(xs + b), mins8);
    }
    mins = hsum(mins8);
    for (; b < nb; ++b) {
      dd[b] = h2f(d[b]) * xd[b];
      mins += h2f(m[b]) * xs[b];
    }
  } else {
    return dot_q4(qs, d, m, xq, xd, xs, MAX_BLOCKS) +
           dot_q4(qs + MAX_BLOCKS * 16, d + MAX_BLOCKS, m + MAX_BLOCKS, xq + MAX_BLOCKS * QK, xd + MAX_BLOCKS,
                  xs + MAX_BLOCKS, nb - MAX_BLOCKS);
  }
  b = 0;
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i low32 = _mm256_set1_epi8(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; b + 1 < nb; b += 2) {  // blocks b, b+1: 32 weight bytes, activations in pair order
    const __m256i r = _mm256_loadu_si256((const __m256i*)(qs + b * 16));
    const __m256i p0 = dot_u8_s8(_mm256_and_si256(r, low32), _mm256_loadu_si256((const __m256i*)(xq + b * QK)));
    const __m256i p1 = dot_u8_s8(_mm256_and_si256(_mm256_srli_epi16(r, 4), low32),
                                 _mm256_loadu_si256((const __m256i*)(xq + b * QK + QK)));
    // lanes 0-3 hold block b's sums, lanes 4-7 block b+1's
    const __m256 sc = _mm256_set_m128(_mm_broadcast_ss(dd + b + 1), _mm_broadcast_ss(dd + b));
    acc0 = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p0), acc0);
    acc1 = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(p1), acc1);
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; b < nb; ++b) {
    const __m128i r0 = _mm_loadu_si128((const __m128i*)(qs + b * 16));
    const __m256i w0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(r0, 4), low), _mm_and_si128(r0, low));
    const __m256i p0 = dot_u8_s8(w0, _mm256_loadu_si256((const __m256i*)(xq + b * QK)));
    sum += dd[b] * hsum(_mm256_cvtepi32_ps(p0));
  }
  return sum + mins;
#else
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    int acc = 0;
    for (int j = 0; j < 16; ++j) {
      acc += (qs[b * 16 + j] & 15) * xq[b * QK + j] + (qs[b * 16 + j] >> 4) * xq[b * QK + j + 16];
    }
    sum += h2f(d[b]) * xd[b] * (float)acc;
    mins += h2f(m[b]) * xs[b];
  }
  return sum + mins;
#endif
}

float dot_q8(const int8_t* qs, const at::Half* d, const int8_t* xq, const float* xd, int64_t nb) {
#if defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(qs + b * QK));
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)(qs + b * QK + QK));
    const __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq + b * QK));
    const __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq + b * QK + QK));
    // signed x signed as unsigned x signed: |w| times x carrying w's sign
    const __m256i p0 = dot_u8_s8(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0));
    const __m256i p1 = dot_u8_s8(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1));
    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(d[b]) * xd[b]), _mm256_cvtepi32_ps(p0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(d[b + 1]) * xd[b + 1]), _mm256_cvtepi32_ps(p1), acc1);
  }
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; b < nb; ++b) {
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(qs + b * QK));
    const __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq + b * QK));
    const __m256i p0 = dot_u8_s8(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0));
    sum += h2f(d[b]) * xd[b] * hsum(_mm256_cvtepi32_ps(p0));
  }
  return sum;
#else
  float sum = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    int acc = 0;
    for (int j = 0; j < QK; ++j) acc += qs[b * QK + j] * xq[b * QK + j];
    sum += h2f(d[b]) * xd[b] * (float)acc;
  }
  return sum;
#endif
}

// One float weight row against R activation rows: out[r * N] for each (two accumulators a row).
template <int R>
void f32_rows(const float* w, const float* x, int64_t K, float* out, int64_t N) {
#if defined(__AVX2__)
  __m256 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm_prefetch((const char*)(w + 2 * K + k), _MM_HINT_T0);  // the row after next, a line per step
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k), a[r][0]);
      a[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + 8), a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float sum = hsum(_mm256_add_ps(a[r][0], a[r][1]));
    for (int64_t i = k; i < K; ++i) sum += w[i] * x[r * K + i];
    out[r * N] = sum;
  }
#else
  for (int r = 0; r < R; ++r) {
    float sum = 0.f;
    for (int64_t i = 0; i < K; ++i) sum += w[i] * x[r * K + i];
    out[r * N] = sum;
  }
#endif
}

void check(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t row_bytes_per_block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(x.size(1) % QK == 0, "K must be a multiple of 32");
  const int64_t nb = x.size(1) / QK;
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.size(1) == nb * row_bytes_per_block, "qs shape");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == qs.size(0) && d.size(1) == nb,
              "d: float16 [N, K/32]");
}

// rows of the weight per task: whole cache lines of work, enough tasks to share among threads
constexpr int64_t GRAIN = 16;

}  // namespace

at::Tensor q4_mm(at::Tensor x, at::Tensor qs, at::Tensor d, at::Tensor m) {
  check(x, qs, d, 16);
  TORCH_CHECK(qs.scalar_type() == at::kByte, "qs: uint8");
  TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == at::kHalf && m.is_contiguous(), "m like d");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), nb = K / QK;
  auto y = at::empty({M, N}, x.options());
  const uint8_t* w = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  float* out = y.data_ptr<float>();
#if defined(QTILE_COLS)
  const auto xr = quantize_rows(x.data_ptr<float>(), M, K);
  qtile::q4(xr.q.data(), xr.d.data(), xr.s.data(), M, K, w, dp, mp, N, out);
#else
#if defined(__AVX2__)
  const auto xr = quantize_rows(x.data_ptr<float>(), M, K, PAIRS);
#else
  const auto xr = quantize_rows(x.data_ptr<float>(), M, K);
#endif
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t i = 0; i < M; ++i) {
        out[i * N + n] = dot_q4(w + n * nb * 16, dp + n * nb, mp + n * nb, xr.q.data() + i * K,
                                xr.d.data() + i * nb, xr.s.data() + i * nb, nb);
      }
    }
  });
#endif
  return y;
}

at::Tensor f32_mm(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) == x.size(1),
              "w: contiguous float32 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* wn = wp + n * K;
      int64_t i = 0;
      for (; i + 4 <= M; i += 4) f32_rows<4>(wn, xp + i * K, K, out + i * N + n, N);
      switch (M - i) {
        case 3: f32_rows<3>(wn, xp + i * K, K, out + i * N + n, N); break;
        case 2: f32_rows<2>(wn, xp + i * K, K, out + i * N + n, N); break;
        case 1: f32_rows<1>(wn, xp + i * K, K, out + i * N + n, N); break;
        default: break;
      }
    }
  });
  return y;
}

at::Tensor q8_mm(at::Tensor x, at::Tensor qs, at::Tensor d) {
  check(x, qs, d, QK);
  TORCH_CHECK(qs.scalar_type() == at::kChar, "qs: int8");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), nb = K / QK;
  auto y = at::empty({M, N}, x.options());
  const auto xr = quantize_rows(x.data_ptr<float>(), M, K);
  const int8_t* w = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  float* out = y.data_ptr<float>();
#if defined(QTILE_COLS)
  qtile::q8(xr.q.data(), xr.d.data(), M, K, w, dp, N, out);
#else
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t i = 0; i < M; ++i) {
        out[i * N + n] = dot_q8(w + n * K, dp + n * nb, xr.q.data() + i * K, xr.d.data() + i * nb, nb);
      }
    }
  });
#endif
  return y;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 floats to bfloat16, rounded to nearest even as at::BFloat16 rounds finite values
inline void store_bf16(at::BFloat16* dst, __m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(b, bias), 16)));
}
#define QMM_DEQUANT_512 1
#endif

at::Tensor q4_dequant(at::Tensor qs, at::Tensor d, at::Tensor m, int64_t r0, int64_t r1) {
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && d.is_contiguous() && m.is_contiguous(), "q4 layout");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= qs.size(0), "row range");
  const int64_t K = qs.size(1) * 2, nb = K / QK;
  auto w = at::empty({r1 - r0, K}, qs.options().dtype(at::kBFloat16));
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  at::BFloat16* out = w.data_ptr<at::BFloat16>();
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      for (int64_t j = 0; j < nb; ++j) {
        const float dd = h2f(dp[n * nb + j]), mm = h2f(mp[n * nb + j]);
        const uint8_t* src = q + (n * nb + j) * 16;
        at::BFloat16* dst = out + (n - r0) * K + j * QK;
#if defined(QMM_DEQUANT_512)  // the same multiply and add, 16 at a time
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)src));
        const __m512 dv = _mm512_set1_ps(dd), mv = _mm512_set1_ps(mm);
        const __m512i fifteen = _mm512_set1_epi32(15);
        store_bf16(dst, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, fifteen)), dv), mv));
        store_bf16(dst + 16, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), dv), mv));
        continue;
#endif
        for (int i = 0; i < 16; ++i) {
          dst[i] = at::BFloat16((src[i] & 15) * dd + mm);
          dst[i + 16] = at::BFloat16((src[i] >> 4) * dd + mm);
        }
      }
    }
  });
  return w;
}

at::Tensor q8_dequant(at::Tensor qs, at::Tensor d, int64_t r0, int64_t r1) {
  TORCH_CHECK(qs.scalar_type() == at::kChar && qs.is_contiguous() && d.is_contiguous(), "q8 layout");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= qs.size(0), "row range");
  const int64_t K = qs.size(1), nb = K / QK;
  auto w = at::empty({r1 - r0, K}, qs.options().dtype(at::kBFloat16));
  const int8_t* q = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  at::BFloat16* out = w.data_ptr<at::BFloat16>();
  at::parallel_for(r0, r1, 8, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
#if defined(QMM_DEQUANT_512)
      for (int64_t i = 0; i < K; i += 16) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + n * K + i))));
        store_bf16(out + (n - r0) * K + i, _mm512_mul_ps(w, _mm512_set1_ps(h2f(dp[n * nb + i / QK]))));
      }
      continue;
#endif
      for (int64_t i = 0; i < K; ++i) out[(n - r0) * K + i] = at::BFloat16(q[n * K + i] * h2f(dp[n * nb + i / QK]));
    }
  });
  return w;
}

TORCH_LIBRARY(sinkstream, lib) {
  lib.def("q4_mm(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  lib.def("f32_mm(Tensor x, Tensor w) -> Tensor");
  lib.def("q8_mm(Tensor x, Tensor qs, Tensor d) -> Tensor");
  lib.def("q4_dequant(Tensor qs, Tensor d, Tensor m, int r0, int r1) -> Tensor");
  lib.def("q8_dequant(Tensor qs, Tensor d, int r0, int r1) -> Tensor");
}

TORCH_LIBRARY_IMPL(sinkstream, CPU, lib) {
  lib.impl("q4_mm", &q4_mm);
  lib.impl("f32_mm", &f32_mm);
  lib.impl("q8_mm", &q8_mm);
  lib.impl("q4_dequant", &q4_dequant);
  lib.impl("q8_dequant", &q8_dequant);
}
