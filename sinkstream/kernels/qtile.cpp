// Block-quantized products on CPUs with AVX-512 VNNI, for any number of activation rows; with AMX tiles
// (Sapphire Rapids and later) where the CPU has them and Linux grants them.
//
// Every path computes a block's integer dot product exactly (int32), then the same float arithmetic per
// output: 16 partial sums, one per block position p = b % 16, each taking its blocks in order,
//     s_p = fma(float(dot_b), d_b * x_d_b, s_p);  s_p = fma(m_b, x_s_b, s_p)       (the m term for q4 only)
// and y = the fixed tree ((s_l + s_l+8) then + lanes 4 apart, 2 apart, 1 apart). So a row's result does not
// depend on the path, on how many activation rows share the call, or on which they are. The paths:
//   group(): 16 weight rows at a time, 4 blocks (q4) or 2 (q8) of each read and transposed in registers
//       (16x16 32-bit lanes) into the layout of a VNNI dot product or an AMX B tile (row kk of a block: for
//       each weight row, its elements 4kk..4kk+3); then one tile product (AMX, from AMX_MIN_ROWS activation
//       rows) or 8 VNNI products a row per block. Its cost is mostly the transposition: several activation
//       rows (streams of a batch) cost little more than one.
//   q4_rows(): fewer activation rows, one weight row after another (memory order), 4 blocks a VNNI step.
#include "qtile.h"

#include <torch/library.h>

#if defined(QTILE_COLS)
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define QTILE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qtile {
namespace {

constexpr int QK = 32;
constexpr int MR = 16;  // activation rows a pass over the weights (the rows of an AMX tile)
constexpr int AMX_MIN_ROWS = 4;  // fewer rows go through VNNI (measured: the same time at 3 rows)
// q4 activation rows that take q4_rows rather than group() (measured on one matrix: q4_rows faster up to 2
// rows on SmolLM2's short rows, K 576, and up to 5 on a 1B model's, K 2048)
inline int rows_max(int64_t nb) { return nb >= 64 ? 5 : 3; }
constexpr int PREFETCH = 16;  // chunks

// r[i] lane j -> r[j] lane i, 16 x 16 32-bit lanes: 32-bit and 64-bit interleaves within 128-bit lanes, then
// a 4 x 4 transpose of the 128-bit lanes.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i u[16];  // u[4q + c] lane L: column 4L + c of rows 4q..4q+3
  for (int q = 0; q < 4; ++q) {
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44), x3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
}

// f16 values [row][b16 .. b16 + left) of the group's rows, as float [block][row]
inline void scales_by_block(const at::Half* d, const int64_t* row, int64_t nb, int64_t b16, __mmask16 mask,
                            float* out) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, d + row[i] * nb + b16)));
  }
  transpose16(r);
  for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + 16 * j, r[j]);
}

// The d (and m) of every block of the group's rows as float [block][row], in a per-thread buffer (m after d).
float* group_scales(const at::Half* d, const at::Half* m, const int64_t* row, int64_t nb) {
  thread_local std::vector<float> cols;
  const int64_t span = 16 * 16 * ((nb + 15) / 16);
  cols.resize(2 * span);
  for (int64_t b16 = 0; b16 < nb; b16 += 16) {
    const __mmask16 hmask = (__mmask16)((1u << std::min<int64_t>(16, nb - b16)) - 1u);
    scales_by_block(d, row, nb, b16, hmask, cols.data() + 16 * b16);
    if (m != nullptr) scales_by_block(m, row, nb, b16, hmask, cols.data() + span + 16 * b16);
  }
  return cols.data();
}

struct Acts {  // activation rows m0 .. m0 + mc of a call
  const int8_t* q;
  const float* d;
  const float* s;
  int mc;
  int64_t K, nb;
};

// The integer dot products of `nbl` blocks (B tiles in `b`, activations from block b0) for the mc rows:
// c[bl][r][n].
#if defined(QTILE_AMX)
// Tiles: 0-3 the blocks' int32 results (mc x 16), 4-5 activations (mc x 32 bytes), 6-7 weights (8 x 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure(int mc) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = (uint8_t)mc, cfg.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) cfg.rows[t] = (uint8_t)mc, cfg.colsb[t] = 32;
  for (int t = 6; t < 8; ++t) cfg.rows[t] = 8, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

template <bool SIGNED_W>
inline void tile_dots(const uint8_t (*b)[8][64], int nbl, const Acts& a, int64_t b0, int32_t (*c)[MR][16]) {
  const int8_t* x = a.q + b0 * QK;
#define QTILE_BLOCK(T, AT, BT)                                              \
  _tile_loadd(BT, b[T], 64);                                                \
  _tile_loadd(AT, x + (T) * QK, a.K);                                       \
  _tile_zero(T);                                                            \
  if (SIGNED_W) _tile_dpbssd(T, AT, BT); else _tile_dpbsud(T, AT, BT);
  QTILE_BLOCK(0, 4, 6)
  if (nbl > 1) { QTILE_BLOCK(1, 5, 7) }
  if (nbl > 2) { QTILE_BLOCK(2, 4, 6) }
  if (nbl > 3) { QTILE_BLOCK(3, 5, 7) }
#undef QTILE_BLOCK
  _tile_stored(0, c[0], 64);
  if (nbl > 1) _tile_stored(1, c[1], 64);
  if (nbl > 2) _tile_stored(2, c[2], 64);
  if (nbl > 3) _tile_stored(3, c[3], 64);
}

bool amx_granted() {  // Linux hands out AMX tile state to processes that ask (arch_prctl, since 5.16)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}
#endif

std::atomic<bool> use_amx{true};

bool amx_on() {
#if defined(QTILE_AMX)
  return use_amx.load(std::memory_order_relaxed) && amx_granted();
#else
  return false;
#endif
}

// The same with VNNI: per row, 8 products of a B row with the row's 4 activation bytes broadcast. q8 weights
// are signed: |w| times x carrying w's sign.
template <bool SIGNED_W>
inline void vnni_dots(const uint8_t (*b)[8][64], int nbl, const Acts& a, int64_t b0, int32_t (*c)[MR][16]) {
  const __m512i zero = _mm512_setzero_si512();
  for (int bl = 0; bl < nbl; ++bl) {
    __m512i w[8];
    __mmask64 neg[8];
    for (int kk = 0; kk < 8; ++kk) {
      w[kk] = _mm512_load_si512(b[bl][kk]);
      if (SIGNED_W) {
        neg[kk] = _mm512_movepi8_mask(w[kk]);
        w[kk] = _mm512_abs_epi8(w[kk]);
      }
    }
    for (int r = 0; r < a.mc; ++r) {
      const int8_t* x = a.q + r * a.K + (b0 + bl) * QK;
      __m512i acc = zero;
      for (int kk = 0; kk < 8; ++kk) {
        int32_t v;
        std::memcpy(&v, x + 4 * kk, 4);
        __m512i xv = _mm512_set1_epi32(v);
        if (SIGNED_W) xv = _mm512_mask_sub_epi8(xv, neg[kk], zero, xv);
        acc = _mm512_dpbusd_epi32(acc, w[kk], xv);
      }
      _mm512_store_si512(c[bl][r], acc);
    }
  }
}

// The float step of one block for every row (see the file's head): sums[r][b % 16] over the 16 weight rows.
inline void scale_block(const int32_t (*c)[16], const float* dcol, const float* mcol, const Acts& a, int64_t b,
                        __m512 (*sums)[16]) {
  const __m512 dv = _mm512_loadu_ps(dcol);
  const int p = (int)(b % 16);
  for (int r = 0; r < a.mc; ++r) {
    const __m512 sc = _mm512_mul_ps(dv, _mm512_set1_ps(a.d[r * a.nb + b]));
    sums[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[r])), sc, sums[r][p]);
  }
  if (mcol != nullptr) {
    const __m512 mv = _mm512_loadu_ps(mcol);
    for (int r = 0; r < a.mc; ++r) sums[r][p] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.s[r * a.nb + b]), sums[r][p]);
  }
}

// The file head's tree over 16 partial sums: s[p] lanes are outputs (group), or lanes of one vector are the
// partial sums of one output (tree_lanes); the same additions in the same order.
inline __m512 tree(__m512 s[16]) {
  for (int w = 8; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) s[l] = _mm512_add_ps(s[l], s[l + w]);
  }
  return s[0];
}

inline float tree_lanes(__m512 v) {
  const __m256 t8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
  const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
  return _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)));
}

// Weight rows n0 .. n0 + rows (rows <= 16; a short last group repeats its last row, whose lanes are not
// stored) against the activation rows of `a`: y[r * N + n]. The float step of a chunk of blocks runs after
// the next chunk's products are issued, so that it does not wait for the tile unit.
template <bool AMX, bool Q8>
void group(const uint8_t* qs, const at::Half* d, const at::Half* m, int64_t n0, int rows, const Acts& a,
           float* y, int64_t N) {
  constexpr int BYTES = Q8 ? QK : QK / 2;  // weight bytes a block
  constexpr int STEP = 64 / BYTES;         // blocks a 64-byte load of a row
  const int64_t nb = a.nb;
  alignas(64) uint8_t b[2][4][8][64];
  alignas(64) int32_t c[2][4][MR][16];
  __m512 sums[MR][16];
  for (int r = 0; r < a.mc; ++r) {
    for (int p = 0; p < 16; ++p) sums[r][p] = _mm512_setzero_ps();
  }
  int64_t row[16];
  for (int i = 0; i < 16; ++i) row[i] = n0 + std::min(i, rows - 1);
  float* dcol = group_scales(d, Q8 ? nullptr : m, row, nb);
  float* mcol = dcol + 16 * 16 * ((nb + 15) / 16);
  const __m512i low = _mm512_set1_epi8(0x0F);
  int cur = 0, pending = 0;
  int64_t prev = 0;
  auto finish = [&](int64_t b0, int n, int which) {
    for (int bl = 0; bl < n; ++bl) {
      scale_block(c[which][bl], dcol + 16 * (b0 + bl), Q8 ? nullptr : mcol + 16 * (b0 + bl), a, b0 + bl, sums);
    }
  };
  for (int64_t bs = 0; bs < nb; bs += STEP) {
    const int nbl = (int)std::min<int64_t>(STEP, nb - bs);
    const __mmask64 wmask = nbl == STEP ? ~0ull : (1ull << (nbl * BYTES)) - 1;
    // each row's bytes PREFETCH chunks ahead, running on into the next group's rows (rows read 64 bytes at a
    // time, 16 at once, and short rows, are what the hardware prefetcher does not follow)
    const int64_t ahead = bs + PREFETCH * STEP;
    const uint8_t* pf = ahead < nb ? qs + (n0 * nb + ahead) * BYTES : qs + ((n0 + 16) * nb + ahead - nb) * BYTES;
    for (int i = 0; i < 16; ++i) _mm_prefetch((const char*)(pf + i * nb * BYTES), _MM_HINT_T0);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi8(wmask, qs + (row[i] * nb + bs) * BYTES);
    transpose16(r);  // r[j]: 32-bit word j of the 64 bytes, of every row
    for (int bl = 0; bl < nbl; ++bl) {
      for (int kk = 0; kk < (Q8 ? 8 : 4); ++kk) {
        if (Q8) {
          _mm512_store_si512(b[cur][bl][kk], r[8 * bl + kk]);
        } else {  // low nibbles: elements 4kk..4kk+3; high nibbles: 16 + 4kk..
          _mm512_store_si512(b[cur][bl][kk], _mm512_and_si512(r[4 * bl + kk], low));
          _mm512_store_si512(b[cur][bl][kk + 4], _mm512_and_si512(_mm512_srli_epi16(r[4 * bl + kk], 4), low));
        }
      }
    }
#if defined(QTILE_AMX)
    if (AMX) tile_dots<Q8>(b[cur], nbl, a, bs, c[cur]); else vnni_dots<Q8>(b[cur], nbl, a, bs, c[cur]);
#else
    vnni_dots<Q8>(b[cur], nbl, a, bs, c[cur]);
#endif
    if (pending) finish(prev, pending, cur ^ 1);
    prev = bs, pending = nbl, cur ^= 1;
  }
  if (pending) finish(prev, pending, cur ^ 1);
  const __mmask16 out = (__mmask16)((1u << rows) - 1u);
  for (int r = 0; r < a.mc; ++r) _mm512_mask_storeu_ps(y + r * N + n0, out, tree(sums[r]));
}

// q4 weight rows n0 .. n0 + rows against R < AMX_MIN_ROWS activation rows, one weight row after another
// (memory order; group() reads 16 rows at once, slower for one or two activation rows), 4 blocks a VNNI
// step with the activations in `quads` order (per 4 blocks: their elements 0..15, then 16..31). Per 16
// blocks the step's lanes are summed per block, and the float step runs with lanes = block positions, the
// file head's arithmetic. `quads`: the activations of the call, K4 bytes a row.
template <int R>
void q4_rows(const uint8_t* qs, const at::Half* d, const at::Half* m, int64_t n0, int rows, const Acts& a,
             const int8_t* quads, int64_t K4, float* y, int64_t N) {
  const int64_t nb = a.nb;
  const __m512i low = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
  // lane 4j + c of a step's sums is block 4c + j of the 16: back to block order
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (int i = 0; i < rows; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* w = qs + n * nb * 16;
    __m512 sums[R];
    for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_ps();
    for (int64_t b16 = 0; b16 < nb; b16 += 16) {
      __m512i lo[4], hi[4];  // the 16 blocks' low and high nibbles (zeros past the row)
      for (int c = 0; c < 4; ++c) {
        const int64_t ch = b16 / 4 + c, left = nb - ch * 4;
        if (left <= 0) {
          lo[c] = hi[c] = zero;
          continue;
        }
        _mm_prefetch((const char*)(w + 2 * nb * 16 + ch * 64), _MM_HINT_T0);  // the row after next
        const __m512i wv = left >= 4 ? _mm512_loadu_si512(w + ch * 64) : _mm512_maskz_loadu_epi8((1ull << (left * 16)) - 1, w + ch * 64);
        lo[c] = _mm512_and_si512(wv, low);
        hi[c] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
      }
      const __mmask16 hmask = (__mmask16)((1u << std::min<int64_t>(16, nb - b16)) - 1u);
      const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(hmask, d + n * nb + b16));
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(hmask, m + n * nb + b16));
      for (int r = 0; r < R; ++r) {
        const int8_t* x = quads + r * K4 + b16 * 32;  // 4 steps of 128 bytes (zeros past K)
        __m512i p[4];
        for (int c = 0; c < 4; ++c) {
          p[c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[c], _mm512_loadu_si512(x + c * 128)), hi[c],
                                     _mm512_loadu_si512(x + c * 128 + 64));
        }
        const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(p[0], p[1]), _mm512_unpackhi_epi32(p[0], p[1]));
        const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2], p[3]), _mm512_unpackhi_epi32(p[2], p[3]));
        const __m512i dots = _mm512_permutexvar_epi32(
            order, _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23)));
        const __m512 sc = _mm512_mul_ps(dv, _mm512_maskz_loadu_ps(hmask, a.d + r * nb + b16));
        sums[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), sc, sums[r]);
        sums[r] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(hmask, a.s + r * nb + b16), sums[r]);
      }
    }
    for (int r = 0; r < R; ++r) y[r * N + n] = tree_lanes(sums[r]);
  }
}

// xq [M, K] (natural order) in q4_rows' order, K4 bytes a row (zeros past K).
std::vector<int8_t> to_quads(const int8_t* xq, int64_t M, int64_t K, int64_t K4) {
  std::vector<int8_t> out(M * K4, 0);
  const int64_t nb = K / QK;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* dst = out.data() + r * K4 + (b / 4) * 128 + (b % 4) * 16;
      std::memcpy(dst, xq + r * K + b * QK, 16);
      std::memcpy(dst + 64, xq + r * K + b * QK + 16, 16);
    }
  }
  return out;
}

template <bool Q8>
void run(const int8_t* xq, const float* xd, const float* xs, int64_t M, int64_t K, const uint8_t* qs,
         const at::Half* d, const at::Half* m, int64_t N, float* y) {
  const int64_t nb = K / QK, groups = (N + 15) / 16;
  const bool amx = amx_on();
  const int64_t K4 = (nb + 15) / 16 * 512;  // whole spans of 16 blocks, zeros past K
  const bool by_rows = !Q8 && (M % MR == 0 ? MR : M % MR) <= rows_max(nb);  // a chunk of rows takes q4_rows
  const std::vector<int8_t> quads = by_rows ? to_quads(xq, M, K, K4) : std::vector<int8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    bool configured = false;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const Acts a{xq + m0 * K, xd + m0 * nb, xs ? xs + m0 * nb : nullptr, (int)std::min<int64_t>(MR, M - m0), K, nb};
      const bool rows_path = !Q8 && a.mc <= rows_max(nb), tiles = amx && !rows_path && a.mc >= AMX_MIN_ROWS;
#if defined(QTILE_AMX)
      if (tiles) configure(a.mc), configured = true;
#endif
      for (int64_t g = g0; g < g1; ++g) {
        const int rows = (int)std::min<int64_t>(16, N - 16 * g);
        float* yg = y + m0 * N;
        const int8_t* xg = rows_path ? quads.data() + m0 * K4 : nullptr;
        if (tiles) group<true, Q8>(qs, d, m, 16 * g, rows, a, yg, N);
        else if (!rows_path) group<false, Q8>(qs, d, m, 16 * g, rows, a, yg, N);
        else switch (a.mc) {
          case 1: q4_rows<1>(qs, d, m, 16 * g, rows, a, xg, K4, yg, N); break;
          case 2: q4_rows<2>(qs, d, m, 16 * g, rows, a, xg, K4, yg, N); break;
          case 3: q4_rows<3>(qs, d, m, 16 * g, rows, a, xg, K4, yg, N); break;
          case 4: q4_rows<4>(qs, d, m, 16 * g, rows, a, xg, K4, yg, N); break;
          default: q4_rows<5>(qs, d, m, 16 * g, rows, a, xg, K4, yg, N); break;
        }
      }
    }
#if defined(QTILE_AMX)
    if (configured) _tile_release();
#endif
  });
}

}  // namespace

void q4(const int8_t* xq, const float* xd, const float* xs, int64_t M, int64_t K, const uint8_t* qs,
        const at::Half* d, const at::Half* m, int64_t N, float* y) {
  run<false>(xq, xd, xs, M, K, qs, d, m, N, y);
}

void q8(const int8_t* xq, const float* xd, int64_t M, int64_t K, const int8_t* qs, const at::Half* d, int64_t N,
        float* y) {
  run<true>(xq, xd, nullptr, M, K, reinterpret_cast<const uint8_t*>(qs), d, nullptr, N, y);
}

}  // namespace qtile

// qmm_amx(mode): -1 asks, 0 turns the AMX tiles off (the VNNI path, same results), 1 back on; returns whether
// the products use AMX now.
bool qmm_amx(int64_t mode) {
  if (mode >= 0) qtile::use_amx.store(mode != 0);
  return qtile::amx_on();
}
#else
bool qmm_amx(int64_t) { return false; }
#endif

TORCH_LIBRARY_FRAGMENT(sinkstream, lib) { lib.def("qmm_amx(int mode) -> bool", &qmm_amx); }
