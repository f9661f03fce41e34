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
using simd::kTileRows;  // activation rows served by one pass over the weights
#ifndef INHOUSE_PREFETCH
#define INHOUSE_PREFETCH 4096
#endif
constexpr int64_t kPrefetch = INHOUSE_PREFETCH;  // bytes ahead of the weight row being read

// Quantize one activation row: xq (K) int16 with one scale per group of 32 (xs, G) and the
// exact group sums (xsum, G padded to 16 with zeros). Within a group the 32 values are stored in
// the order this build's row kernels read them (simd.h `store_group`), not necessarily in order.
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
    vacc acc[R];
    vf macc[R];
    for (int r = 0; r < R; ++r) {
      acc[r] = acc_zero();
      macc[r] = zero();
    }
    const int64_t Gv = G / 16 * 16;  // groups in whole vectors; the last G % 16 one by one (cheaper than masks)
    for (int64_t g = 0; g < Gv; g += 16) {
      const vf sv = load_half(sr + g);
      const vf mv = load_half(mr + g);
      for (int r = 0; r < R; ++r) {
        store(scale[r] + g, mul(sv, load(xs + r * G16 + g)));
        macc[r] = fmadd(mv, load(xsum + r * G16 + g), macc[r]);  // the mins term
      }
    }
    float mtail[R];
    for (int r = 0; r < R; ++r) mtail[r] = 0.0f;
    for (int64_t g = Gv; g < G; ++g) {
      const float st = _cvtsh_ss(sr[g]), mn = _cvtsh_ss(mr[g]);
      for (int r = 0; r < R; ++r) {
        scale[r][g] = st * xs[r * G16 + g];
        mtail[r] += mn * xsum[r * G16 + g];
      }
    }
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {  // two blocks (64 bytes, four groups) at a time
      // the weights are read once per token from memory, not cache: ask for them well ahead
      _mm_prefetch(reinterpret_cast<const char*>(wr + b * 32 + kPrefetch), _MM_HINT_T0);
      vw g0, g1, g2, g3;
      int4_groups(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 32)), g0, g1);
      int4_groups(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 32 + 32)), g2, g3);
      for (int r = 0; r < R; ++r) acc[r] = acc_quad(acc[r], g0, g1, g2, g3, xq + r * K + b * kBlock, scale[r] + 2 * b);
    }
    if (b < nb) {  // an odd number of blocks: the last one
      vw g0, g1;
      int4_groups(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * 32)), g0, g1);
      for (int r = 0; r < R; ++r) acc[r] = acc_pair(acc[r], g0, g1, xq + r * K + b * kBlock, scale[r] + 2 * b);
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = acc_sum(acc[r], macc[r]) + mtail[r];
  }
}

template <int R>
void rows_times_int8(int64_t n0, int64_t n1, int64_t K, const int8_t* w, const float* row_scales,
                     const int16_t* xq, const float* xs, int64_t G16, float* out, int64_t ldo) {
  using namespace simd;
  const int64_t G = K / kGroup;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    vacc acc[R];
    for (int r = 0; r < R; ++r) acc[r] = acc_zero();
    auto group = [&](int64_t g) { return int8_group(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + g * kGroup))); };
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {  // four groups (128 bytes) at a time
      _mm_prefetch(reinterpret_cast<const char*>(wr + g * kGroup + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wr + g * kGroup + 64 + kPrefetch), _MM_HINT_T0);
      const vw g0 = group(g), g1 = group(g + 1), g2 = group(g + 2), g3 = group(g + 3);
      for (int r = 0; r < R; ++r) acc[r] = acc_quad(acc[r], g0, g1, g2, g3, xq + r * K + g * kGroup, xs + r * G16 + g);
    }
    if (g < G) {  // two groups left (G is even: K % 64 == 0)
      const vw g0 = group(g), g1 = group(g + 1);
      for (int r = 0; r < R; ++r) acc[r] = acc_pair(acc[r], g0, g1, xq + r * K + g * kGroup, xs + r * G16 + g);
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = acc_sum(acc[r], zero()) * row_scales[n];
  }
}


}  // namespace inhouse_kernels
