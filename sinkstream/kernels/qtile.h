// Column kernels for block-quantized products on AVX-512 VNNI CPUs (qtile.cpp), called by qmm.cpp.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QTILE_COLS 1
#endif

namespace qtile {

// y[M, N] from activations quantized per block of 32 in natural order (xq [M, K] int8, xd and xs [M, K/32]:
// the scale and scale * sum of the block) and weights in qmm.cpp's layouts:
//   q4: qs u8 [N, K/2] (byte j of a block: element j low, j + 16 high), d and m f16 [N, K/32], w = q * d + m;
//   q8: qs i8 [N, K], d f16 [N, K/32], w = q * d.
void q4(const int8_t* xq, const float* xd, const float* xs, int64_t M, int64_t K, const uint8_t* qs,
        const at::Half* d, const at::Half* m, int64_t N, float* y);
void q8(const int8_t* xq, const float* xd, int64_t M, int64_t K, const int8_t* qs, const at::Half* d, int64_t N,
        float* y);

}  // namespace qtile
