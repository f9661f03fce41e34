// Shared pieces of inhouse's native CPU kernels (AVX-512 VNNI): activation quantization and the
// int4/int8 row kernels. Included by quant_cpu.cpp (the per-matmul ops) and decode_cpu.cpp (the
// whole decode step in one call).
//
// Weights: groups of 32 input columns, w = code * step + min (GGUF Q4_1's form), codes 0..15.
//   w (N, K/2) uint8: per output row, per block of 64 columns, 32 bytes; byte j holds
//     code[64b + j] in its low nibble and code[64b + 32 + j] in its high nibble.
//   steps, mins (N, K/32) fp16.
// Activations: each row is quantized per group of 32 to int16 with its own scale (max|x| / 32767:
//   finer than bf16; int8 here moved ~5% of SmolLM2's greedy tokens); the mins term uses the
//   exact fp32 group sums of x.
// y[m, n] = sum_g step[n,g] * xs[m,g] * sum_{k in g} code[n,k] * xq[m,k] + sum_g min[n,g] * xsum[m,g]
//
// Each output element is computed the same way whatever the number of rows is, so a row's result
// does not depend on the batch it is in.

#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace inhouse_kernels {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlock = 64;  // columns per 32-byte block: two groups
constexpr int64_t kMaxGroups = 2048;  // K up to 65536
constexpr int64_t kTileRows = 8;  // activation rows served by one pass over the weights
#ifndef INHOUSE_PREFETCH
#define INHOUSE_PREFETCH 4096
#endif
constexpr int64_t kPrefetch = INHOUSE_PREFETCH;  // bytes ahead of the weight row being read

// Quantize one activation row: xq (K) int16 with one scale per group of 32 (xs, G) and the
// exact group sums (xsum, G padded to 16 with zeros).
inline void quantize_row(const float* x, int64_t K, int16_t* xq, float* xs, float* xsum) {
  const int64_t G = K / kGroup;
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + g * kGroup;
    __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    xsum[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    xs[g] = amax / 32767.0f;
    __m512 vinv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    __m512i qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, vinv), _MM_FROUND_TO_NEAREST_INT));
    __m512i qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(b, vinv), _MM_FROUND_TO_NEAREST_INT));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + g * kGroup), _mm512_cvtsepi32_epi16(qa));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + g * kGroup + 16), _mm512_cvtsepi32_epi16(qb));
  }
}

template <int R>
void rows_times_int4(int64_t n0, int64_t n1, int64_t K, const uint8_t* w, const at::Half* steps,
                        const at::Half* mins, const int16_t* xq, const float* xs, const float* xsum,
                        int64_t G16, float* out, int64_t ldo) {
  const int64_t G = K / kGroup, nb = K / kBlock;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  float scale[R][kMaxGroups];  // step[n, g] * xs[r, g]
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const uint16_t* sr = reinterpret_cast<const uint16_t*>(steps + n * G);
    const uint16_t* mr = reinterpret_cast<const uint16_t*>(mins + n * G);
    __m512 acc[R], macc[R];
    for (int r = 0; r < R; ++r) acc[r] = macc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
      const int64_t left = G - g;
      const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
      const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, sr + g));
      const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mr + g));
      for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(scale[r] + g, _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(mask, xs + r * G16 + g)));
        macc[r] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(xsum + r * G16 + g), macc[r]);  // the mins term
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      // the weights are read once per token from memory, not cache: ask for them well ahead
      _mm_prefetch(reinterpret_cast<const char*>(wr + b * 32 + kPrefetch), _MM_HINT_T0);
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 32));
      const __m512i wlo = _mm512_cvtepu8_epi16(_mm256_and_si256(wb, low4));                        // group 2b
      const __m512i whi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(wb, 4), low4));  // 2b+1
      for (int r = 0; r < R; ++r) {
        const int16_t* xr = xq + r * K + b * kBlock;
        const __m512i da = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wlo, _mm512_loadu_si512(xr));
        const __m512i db = _mm512_dpwssd_epi32(_mm512_setzero_si512(), whi, _mm512_loadu_si512(xr + 32));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(da), _mm512_set1_ps(scale[r][2 * b]), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(db), _mm512_set1_ps(scale[r][2 * b + 1]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(macc[r]);
  }
}

template <int R>
void rows_times_int8(int64_t n0, int64_t n1, int64_t K, const int8_t* w, const float* row_scales,
                     const int16_t* xq, const float* xs, int64_t G16, float* out, int64_t ldo) {
  const int64_t G = K / kGroup;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + g * kGroup + kPrefetch), _MM_HINT_T0);
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + g * kGroup)));
      for (int r = 0; r < R; ++r) {
        const __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(xq + r * K + g * kGroup));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xs[r * G16 + g]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = _mm512_reduce_add_ps(acc[r]) * row_scales[n];
  }
}


}  // namespace inhouse_kernels
