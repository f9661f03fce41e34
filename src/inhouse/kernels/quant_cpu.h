// Shared pieces of inhouse's native CPU kernels (AVX-512 VNNI or AVX2, see simd.h): activation quantization and the
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
#include "simd.h"

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
  using namespace simd;
  const int64_t G = K / kGroup;
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + g * kGroup;
    const vf a = load(xg), b = load(xg + 16);
    const float amax = reduce_max(max(abs(a), abs(b)));
    xsum[g] = reduce_add(add(a, b));
    xs[g] = amax / 32767.0f;
    const vf vinv = set1(amax > 0.0f ? 32767.0f / amax : 0.0f);
    store_group(xq + g * kGroup, to_int(round(mul(a, vinv))), to_int(round(mul(b, vinv))));
  }
}

template <int R>
void rows_times_int4(int64_t n0, int64_t n1, int64_t K, const uint8_t* w, const at::Half* steps,
                        const at::Half* mins, const int16_t* xq, const float* xs, const float* xsum,
                        int64_t G16, float* out, int64_t ldo) {
  using namespace simd;
  const int64_t G = K / kGroup, nb = K / kBlock;
  float scale[R][kMaxGroups];  // step[n, g] * xs[r, g]
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const uint16_t* sr = reinterpret_cast<const uint16_t*>(steps + n * G);
    const uint16_t* mr = reinterpret_cast<const uint16_t*>(mins + n * G);
    // two accumulators per row (even and odd groups): a single one would make every block wait for
    // the previous block's fused multiply-add (its latency, not the loads, would set the speed)
    vacc acc[R], acc2[R];
    vf macc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = acc2[r] = acc_zero();
      macc[r] = zero();
    }
    for (int64_t g = 0; g < G; g += 16) {
      const vf sv = load_half_n(sr + g, G - g);
      const vf mv = load_half_n(mr + g, G - g);
      for (int r = 0; r < R; ++r) {
        store(scale[r] + g, mul(sv, load_n(xs + r * G16 + g, G - g)));
        macc[r] = fmadd(mv, load(xsum + r * G16 + g), macc[r]);  // the mins term
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      // the weights are read once per token from memory, not cache: ask for them well ahead
      _mm_prefetch(reinterpret_cast<const char*>(wr + b * 32 + kPrefetch), _MM_HINT_T0);
      const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 32));
      vw wlo, whi;  // groups 2b and 2b+1
      int4_groups(wb, wlo, whi);
      for (int r = 0; r < R; ++r) {
        const int16_t* xr = xq + r * K + b * kBlock;
        acc[r] = acc_group(acc[r], wlo, xr, scale[r][2 * b]);
        acc2[r] = acc_group(acc2[r], whi, xr + 32, scale[r][2 * b + 1]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = acc_sum(acc_add(acc[r], acc2[r])) + reduce_add(macc[r]);
  }
}

template <int R>
void rows_times_int8(int64_t n0, int64_t n1, int64_t K, const int8_t* w, const float* row_scales,
                     const int16_t* xq, const float* xs, int64_t G16, float* out, int64_t ldo) {
  using namespace simd;
  const int64_t G = K / kGroup;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    vacc acc[R], acc2[R];  // even and odd groups (see rows_times_int4)
    for (int r = 0; r < R; ++r) acc[r] = acc2[r] = acc_zero();
    for (int64_t g = 0; g < G; g += 2) {  // G is even (K % 64 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(wr + g * kGroup + kPrefetch), _MM_HINT_T0);
      const vw w0 = int8_group(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + g * kGroup)));
      const vw w1 = int8_group(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + (g + 1) * kGroup)));
      for (int r = 0; r < R; ++r) {
        acc[r] = acc_group(acc[r], w0, xq + r * K + g * kGroup, xs[r * G16 + g]);
        acc2[r] = acc_group(acc2[r], w1, xq + r * K + (g + 1) * kGroup, xs[r * G16 + g + 1]);
      }
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = acc_sum(acc_add(acc[r], acc2[r])) * row_scales[n];
  }
}


}  // namespace inhouse_kernels
