// Shared pieces of inhouse's native CPU kernels (AVX-512 VNNI or AVX2, see simd.h): activation quantization and the
// int4/int8 row kernels. Included by quant_cpu.cpp (the per-matmul ops) and decode_cpu.cpp (the
// whole decode step in one call).
//
// Weights: groups of 32 input columns, w = code * step + min (GGUF Q4_1's form), codes 0..15.
//   w (N, K/2) uint8: per output row, the codes in chunk order (`quads` below), two per byte.
//   steps, mins (N, K/32) fp16.
//   Or int8 (N, K) in chunk order with one fp32 scale per row.
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
constexpr int64_t kBlock = 64;  // columns per 32 bytes of 4-bit codes: two chunks
constexpr int64_t kMaxGroups = 2048;  // K up to 65536
using simd::kTileRows;  // activation rows served by one pass over the weights
#ifndef INHOUSE_PREFETCH
#define INHOUSE_PREFETCH 4096
#endif
constexpr int64_t kPrefetch = INHOUSE_PREFETCH;  // bytes ahead of the weight row being read

// Column order of weights and activations ("chunks", the same for both matrices): a row's groups
// are taken four at a time (a quad: 128 columns), the last two as a pair when their number is not a
// multiple of 4. A quad is four chunks of 32 columns, chunk c holding columns 8c..8c+7 of each of
// its groups (in group order); a pair is two chunks, chunk c holding columns 16c..16c+15 of each of
// its two groups. 4-bit weights pack two chunks per 32 bytes (byte j: place j of the first chunk in
// its low nibble, of the second in its high one); int8 weights are the chunks' bytes. The integer
// dot products of a quad then accumulate in one vector whose lanes each belong to one group
// (simd.h), scaled once per quad. inhouse.model.quant.native_order is the same order.
inline int64_t quads(int64_t G) { return G / 4; }

// Quantize one activation row: xq (K) int16 with one scale per group of 32 (xs, G) and the
// exact group sums (xsum, G padded to 16 with zeros), xq in chunks (above), each stored in the
// order this build's row kernels read it (simd.h `store_group`).
inline void quantize_row(const float* x, int64_t K, int16_t* xq, float* xs, float* xsum) {
  using namespace simd;
  const int64_t G = K / kGroup;
  vi v[4][2];  // a quad's groups, quantized: elements 0-15 and 16-31 of each
  auto group = [&](int64_t g, vi& lo, vi& hi) {
    const float* xg = x + g * kGroup;
    const vf a = load(xg), b = load(xg + 16);
    const float amax = reduce_max(max(abs(a), abs(b)));
    xsum[g] = reduce_add(add(a, b));
    xs[g] = amax / 32767.0f;
    const vf vinv = set1(amax > 0.0f ? 32767.0f / amax : 0.0f);
    lo = to_int(round(mul(a, vinv)));
    hi = to_int(round(mul(b, vinv)));
  };
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    for (int i = 0; i < 4; ++i) group(g + i, v[i][0], v[i][1]);
    int16_t* o = xq + g * kGroup;
    store_group(o, halves<0>(v[0][0], v[1][0]), halves<0>(v[2][0], v[3][0]));       // columns 0-7 of each
    store_group(o + 32, halves<1>(v[0][0], v[1][0]), halves<1>(v[2][0], v[3][0]));  // 8-15
    store_group(o + 64, halves<0>(v[0][1], v[1][1]), halves<0>(v[2][1], v[3][1]));  // 16-23
    store_group(o + 96, halves<1>(v[0][1], v[1][1]), halves<1>(v[2][1], v[3][1]));  // 24-31
  }
  if (g < G) {  // a pair
    group(g, v[0][0], v[0][1]);
    group(g + 1, v[1][0], v[1][1]);
    store_group(xq + g * kGroup, v[0][0], v[1][0]);       // columns 0-15 of each
    store_group(xq + g * kGroup + 32, v[0][1], v[1][1]);  // 16-31
  }
}

// The codes of group g of a 4-bit row (K columns, chunk layout) in column order: columns 0-15 in
// c0, 16-31 in c1 (one byte each).
inline void int4_group_codes(const uint8_t* w, int64_t K, int64_t g, __m128i& c0, __m128i& c1) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const int64_t q = g / 4;
  if (q < quads(K / kGroup)) {  // bytes 8i.. of the quad's two 32-byte halves: chunks 0/1 and 2/3
    const int i = static_cast<int>(g % 4);
    const uint8_t* p = w + q * 64;
    const __m128i b = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i)),
                                         _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 32 + 8 * i)));
    const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    c0 = _mm_unpacklo_epi64(lo, hi);  // columns 0-7 (chunk 0), 8-15 (chunk 1)
    c1 = _mm_unpackhi_epi64(lo, hi);  // 16-23, 24-31
  } else {  // a pair: bytes 16i.. of its 32 bytes
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + q * 64 + 16 * (g % 2)));
    c0 = _mm_and_si128(b, low4);
    c1 = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  }
}

// Group g of a 4-bit row in fp32, columns 0-15 in f0 and 16-31 in f1: code * step + min, a
// multiply then an add (as PyTorch's ops and inhouse.model.quant.int4_rows compute it).
inline void int4_group_values(const uint8_t* w, int64_t K, int64_t g, uint16_t step, uint16_t min, simd::vf& f0,
                              simd::vf& f1) {
  using namespace simd;
  __m128i c0, c1;
  int4_group_codes(w, K, g, c0, c1);
  const vf st = set1(_cvtsh_ss(step)), mn = set1(_cvtsh_ss(min));
  f0 = add(mul(to_float(u8_to_i32(c0)), st), mn);
  f1 = add(mul(to_float(u8_to_i32(c1)), st), mn);
}

template <int R>
void rows_times_int4(int64_t n0, int64_t n1, int64_t K, const uint8_t* w, const at::Half* steps,
                        const at::Half* mins, const int16_t* xq, const float* xs, const float* xsum,
                        int64_t G16, float* out, int64_t ldo) {
  using namespace simd;
  const int64_t G = K / kGroup, nq = quads(G);
  // step[n, g] * xs[r, g] at [r * G + g]: packed, not at a stride of kMaxGroups (rows 8 KB apart
  // fall into the same L1 sets)
  alignas(64) float scale[R * kMaxGroups];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const uint16_t* sr = reinterpret_cast<const uint16_t*>(steps + n * G);
    const uint16_t* mr = reinterpret_cast<const uint16_t*>(mins + n * G);
    vq acc[R];
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
        store(scale + r * G + g, mul(sv, load(xs + r * G16 + g)));
        macc[r] = fmadd(mv, load(xsum + r * G16 + g), macc[r]);  // the mins term
      }
    }
    float mtail[R];
    for (int r = 0; r < R; ++r) mtail[r] = 0.0f;
    for (int64_t g = Gv; g < G; ++g) {
      const float st = _cvtsh_ss(sr[g]), mn = _cvtsh_ss(mr[g]);
      for (int r = 0; r < R; ++r) {
        scale[r * G + g] = st * xs[r * G16 + g];
        mtail[r] += mn * xsum[r * G16 + g];
      }
    }
    for (int64_t q = 0; q < nq; ++q) {  // a quad: 64 bytes, four chunks
      // the weights are read once per token from memory, not cache: ask for them well ahead
      _mm_prefetch(reinterpret_cast<const char*>(wr + q * 64 + kPrefetch), _MM_HINT_T0);
      vw c0, c1, c2, c3;
      int4_groups(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + q * 64)), c0, c1);
      int4_groups(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + q * 64 + 32)), c2, c3);
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq + r * K + q * 128;
        const vd d = dot_acc(dot_acc(dot_acc(dot_acc(dot_zero(), c0, x), c1, x + 32), c2, x + 64), c3, x + 96);
        acc[r] = acc_scaled(acc[r], d, scale_quad(scale + r * G + 4 * q));
      }
    }
    if (4 * nq < G) {  // the last two groups: a pair, 32 bytes
      vw c0, c1;
      int4_groups(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + nq * 64)), c0, c1);
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq + r * K + nq * 128;
        acc[r] = acc_scaled(acc[r], dot_acc(dot_acc(dot_zero(), c0, x), c1, x + 32), scale_pair(scale + r * G + 4 * nq));
      }
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = acc_sum(acc[r], macc[r]) + mtail[r];
  }
}

template <int R>
void rows_times_int8(int64_t n0, int64_t n1, int64_t K, const int8_t* w, const float* row_scales,
                     const int16_t* xq, const float* xs, int64_t G16, float* out, int64_t ldo) {
  using namespace simd;
  const int64_t G = K / kGroup, nq = quads(G);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    vq acc[R];
    for (int r = 0; r < R; ++r) acc[r] = acc_zero();
    auto chunk = [&](int64_t c) { return int8_group(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32))); };
    for (int64_t q = 0; q < nq; ++q) {  // a quad: 128 bytes, four chunks
      _mm_prefetch(reinterpret_cast<const char*>(wr + q * 128 + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wr + q * 128 + 64 + kPrefetch), _MM_HINT_T0);
      const vw c0 = chunk(4 * q), c1 = chunk(4 * q + 1), c2 = chunk(4 * q + 2), c3 = chunk(4 * q + 3);
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq + r * K + q * 128;
        const vd d = dot_acc(dot_acc(dot_acc(dot_acc(dot_zero(), c0, x), c1, x + 32), c2, x + 64), c3, x + 96);
        acc[r] = acc_scaled(acc[r], d, scale_quad(xs + r * G16 + 4 * q));
      }
    }
    if (4 * nq < G) {  // a pair: 64 bytes, two chunks
      const vw c0 = chunk(4 * nq), c1 = chunk(4 * nq + 1);
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq + r * K + nq * 128;
        acc[r] = acc_scaled(acc[r], dot_acc(dot_acc(dot_zero(), c0, x), c1, x + 32), scale_pair(xs + r * G16 + 4 * nq));
      }
    }
    for (int r = 0; r < R; ++r) out[r * ldo + n] = acc_sum(acc[r], zero()) * row_scales[n];
  }
}


}  // namespace inhouse_kernels
