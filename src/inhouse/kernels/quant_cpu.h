// Shared pieces of inhouse's native CPU kernels (AVX-512 VNNI or AVX2, see simd.h): activation quantization and the
// int4/int8 row kernels. Included by quant_cpu.cpp (the per-matmul ops) and decode_cpu.cpp (the
// whole decode step in one call).
//
// Weights: groups of 32 input columns.
//   4-bit (w = code * step + min, GGUF Q4_1's form, codes 0..15) in row tiles: kTile rows (16 on
//     AVX-512, 8 on AVX2) side by side, the tiles one after the other (N padded to a multiple of
//     kTile with zero rows). Tile t, group g is 16 * kTile bytes at w + (t * G + g) * 16 * kTile:
//     8 units u of 2 * kTile bytes, byte 2i + h of unit u holding row i's code of column 2u + h in
//     its low nibble and of column 16 + 2u + h in its high one. Steps and mins fp16 in the same
//     order: tile t, group g, row i at (t * G + g) * kTile + i. (A tile's output rows are then one
//     vector, one int32 lane each: a group is converted and scaled once for kTile rows, whatever K.)
//   int8 with one fp16 step per group of 32 (GGUF Q8_0's form) in row tiles as well: tile t,
//     group g is 32 * kTile bytes at w + (t * G + g) * 32 * kTile, 8 units u of 4 * kTile bytes,
//     byte 2i + j of unit u holding row i's code of column 2u + j, byte 2 * kTile + 2i + j its code
//     of column 16 + 2u + j; steps in the same order as the 4-bit ones.
//   int8 (N, K) in block order (`block_groups` below) with one fp32 scale per row.
// Activations: each row is quantized per group of 32 to int16 with its own scale (max|x| / 32639:
//   finer than bf16; int8 here moved ~5% of SmolLM2's greedy tokens; 32639, not 32767, so that
//   each value is two int8 for the AMX kernel, amx.h); the mins term uses the
//   exact fp32 group sums of x. The row-tile kernels read them group by group, the int8 kernel
//   with row scales in block order (`quantize_row` writes either or both).
// y[m, n] = sum_g step[n,g] * xs[m,g] * sum_{k in g} code[n,k] * xq[m,k] + sum_g min[n,g] * xsum[m,g]
//
// Each output element is computed the same way whatever the number of rows is (integer dot
// products are exact whatever their order, and every fp32 operation on an output is the same), so
// a row's result does not depend on the batch it is in.

#pragma once

#include <ATen/ATen.h>
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

namespace inhouse_kernels {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlock = 64;  // columns per 32 bytes of 4-bit codes: two chunks
constexpr int64_t kMaxGroups = 2048;  // K up to 65536
constexpr float kActMax = 32639.0f;  // the largest |int16 activation|: 256 * 127 + 127 (amx.h)
using simd::kTileRows;  // activation rows served by one pass over the weights
#ifndef INHOUSE_PREFETCH
#define INHOUSE_PREFETCH 4096
#endif
constexpr int64_t kPrefetch = INHOUSE_PREFETCH;  // bytes ahead of the weight row being read

// Buffers of quantized activations and other vectors the kernels load 64 bytes at a time: aligned
// to cache lines, so that no load straddles two of them (a straddling 64-byte load costs two; on
// AVX-512 with activations at malloc's 16-byte alignment the row kernels ran ~1.5x slower).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// Column order of weights and activations ("blocks" of "chunks", the same for both matrices): a
// row's groups are taken kLanes at a time (a block: 16 groups on AVX-512, 8 on AVX2, simd.h), the
// rest in blocks of kLanes/2, kLanes/4, ... down to 2 (the number of groups is even). A block of P
// groups is P chunks of 32 columns, chunk c holding columns w*c .. w*c + w-1 of each of its groups
// (w = 32 / P), in group order. 4-bit weights pack two chunks per 32 bytes (byte j: place j of
// the first chunk in its low nibble, of the second in its high one); int8 weights are the chunks'
// bytes. A chunk's integer dot products land in kLanes lanes, each lane covering 32 / kLanes
// consecutive places: in a block of kLanes groups, one lane per group, so the block is converted
// and scaled once (3 vector operations per 16 dot products on AVX-512), not once per group.
// inhouse.model.native_layout.native_order is the same order.
inline int block_groups(int64_t G, int64_t g0) {  // the size of the block starting at group g0
  int P = simd::kLanes;
  while (P > G - g0) P /= 2;
  return P;
}

// The transposition between a block's groups and its chunks: chunk c, place i * w + k (w = 32 /
// P) is column c * w + k of group i. `groups` (P x 32 int16, each group's columns in order) ->
// the P chunks in the order this build's row kernels read them (simd.h `store_chunk`).
inline void block_chunks(const int16_t* groups, int P, int16_t* out) {
  const int w = static_cast<int>(kGroup) / P;
  alignas(64) int16_t chunk[kGroup];
  for (int c = 0; c < P; ++c) {
    for (int i = 0; i < P; ++i) std::memcpy(chunk + i * w, groups + i * kGroup + c * w, w * sizeof(int16_t));
    simd::store_chunk(out + c * kGroup, chunk);
  }
}

// Quantize row b of M activation rows: int16 with one scale per group of 32 (xs, G) and the exact
// group sums (xsum, G padded to 16 with zeros). The int16 values go to `grouped` (M x K, group by
// group: row b's 32 values of group g in column order at grouped + (g * M + b) * 32, the row-tile
// kernel's) and/or to xq (M x K, stored block by block for the row-scale int8 kernel (above), each
// block with the M rows' chunks one row after the other: row b's chunk c of the block at group g0
// (P groups) is at xq + (g0 * M + b * P + c) * 32); either may be null. Either way a kernel reaches
// every row of a pass from one pointer, at offsets known when it is compiled.
inline void quantize_row(const float* x, int64_t K, int64_t M, int64_t b, int16_t* xq, float* xs, float* xsum,
                         int16_t* grouped = nullptr) {
  using namespace simd;
  const int64_t G = K / kGroup;
  alignas(64) int16_t groups[kLanes * kGroup];  // a block's groups, quantized, columns in order
  for (int64_t g0 = 0; g0 < G;) {
    const int P = block_groups(G, g0);
    auto group = [&](int i, vi& lo, vi& hi) {
      const int64_t g = g0 + i;
      const float* xg = x + g * kGroup;
      const vf x0 = load(xg), x1 = load(xg + 16);
      const float amax = reduce_max(max(abs(x0), abs(x1)));
      xsum[g] = reduce_add(add(x0, x1));
      xs[g] = amax / kActMax;
      const vf vinv = set1(amax > 0.0f ? kActMax / amax : 0.0f);
      lo = to_int(round(mul(x0, vinv)));
      hi = to_int(round(mul(x1, vinv)));
      if (grouped != nullptr) store_i16(grouped + (g * M + b) * kGroup, lo, hi);
    };
    if (xq == nullptr) {
      for (int i = 0; i < P; ++i) {
        vi lo, hi;
        group(i, lo, hi);
      }
      g0 += P;
      continue;
    }
    int16_t* out = xq + (g0 * M + b * P) * kGroup;
#ifdef INHOUSE_SIMD_TRANSPOSE16
    if (P == 16) {  // a group's 32 values are 16 pairs, a chunk takes pair c of each: a 16 x 16 transposition
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        vi lo, hi;
        group(i, lo, hi);
        r[i] = pack_i16(lo, hi);
      }
      transpose16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(out + c * kGroup, r[c]);
      g0 += P;
      continue;
    }
#endif
    for (int i = 0; i < P; ++i) {
      vi lo, hi;
      group(i, lo, hi);
      store_i16(groups + i * kGroup, lo, hi);
    }
    block_chunks(groups, P, out);
    g0 += P;
  }
}

// The weight formats of the row kernels (see the top of this file):
//   int4:        4-bit codes in row tiles, fp16 step and min per group of 32 (Int4Linear; GGUF Q4_0/Q4_1);
//   int8_rows:   int8, one fp32 scale per row (Int8Linear);
//   int8_groups: int8 codes in row tiles, one fp16 step per group of 32 (Int8Linear of a GGUF Q8_0
//                matrix, exact).
enum class Fmt { int4, int8_rows, int8_groups };

constexpr int64_t kTile = simd::kLanes;               // weight rows per tile
constexpr int64_t kTileGroupBytes = 16 * kTile;        // a 4-bit tile's codes of one group
inline int64_t tile_padded(int64_t N) { return (N + kTile - 1) / kTile * kTile; }  // rows a row-tile matrix stores
constexpr bool row_tiles(Fmt f) { return f != Fmt::int8_rows; }
constexpr int64_t tile_group_bytes(Fmt f) { return f == Fmt::int4 ? kTileGroupBytes : 2 * kTileGroupBytes; }

// A quantized (N, K) matrix in the native layout: int8 row n's codes at w + n * K (row scales); a
// row-tile matrix is tile_padded(N) rows of K / 2 (4-bit) or K (int8) bytes (the top of this file).
struct Weights {
  Fmt fmt = Fmt::int4;
  const uint8_t* w = nullptr;
  const uint16_t* steps = nullptr;   // fp16, int4 and int8_groups (row tiles)
  const uint16_t* mins = nullptr;    // fp16, int4 (row tiles)
  const float* row_scales = nullptr; // (N,): int8_rows
  int64_t row_bytes(int64_t K) const { return fmt == Fmt::int4 ? K / 2 : K; }
};

// Activations of M rows as the kernels read them (`quantize_row`): `blocks` (the row-scale int8
// kernel's order, M x K), `grouped` (the row-tile kernel's: group by group, the M rows' 32 values
// each), group scales and sums (M x G16); `amx`: `grouped` as the AMX kernel's passes (amx.h
// `amx_blocks`), or null (then the row-tile kernel is `row_tile`).
struct Acts {
  const int16_t* blocks;
  const int16_t* grouped;
  const float* scales;
  const float* sums;
  int64_t K, G16, M;
  const int8_t* amx = nullptr;
};
// The row-tile kernels' steps per group (`row_tile` and amx.h's `row_tile_amx` share them, so
// that their results agree bit for bit). A tile's group (`bytes` at wg) is read from memory once
// per token: ask for it well ahead.
inline void prefetch_tile_group(const uint8_t* wg, int64_t bytes) {
  for (int off = 0; off < bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(wg + off + kPrefetch), _MM_HINT_T0);
}

// Group g of a tile (steps st, mins mn: the tile's first) for R activation rows: dd[r] the group's
// integer dot products, converted and scaled (the weights' steps times the activations' scale),
// then, for 4-bit weights (kMins), the mins term (the weights' mins times the exact group sums of
// x) added.
template <int R, bool kMins>
__attribute__((always_inline)) inline void scale_tile_group(const simd::vd* dd, const uint16_t* st, const uint16_t* mn, const float* xs,
                                                            const float* xsum, int64_t G16, int64_t g, simd::vq* acc) {
  using namespace simd;
  const vq sv = load_half_lanes_n(st + g * kTile, kTile);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = q_fmadd(dot_float(dd[r]), q_mul(sv, q_set1(xs[r * G16 + g])), acc[r]);
  if constexpr (kMins) {
    const vq mv = load_half_lanes_n(mn + g * kTile, kTile);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = q_fmadd(mv, q_set1(xsum[r * G16 + g]), acc[r]);
  }
}

}  // namespace inhouse_kernels

#include "amx.h"

namespace inhouse_kernels {

// M rows of int16 activations (`grouped`, `quantize_row`) as the AMX kernel's passes, in `buf`;
// null where row_tile serves them (fewer than kAmxMinRows rows, a build or a process without AMX).
inline const int8_t* amx_acts(const int16_t* grouped, int64_t K, int64_t M, AlignedVector<int8_t>& buf) {
#ifdef INHOUSE_AMX
  if (M >= kAmxMinRows && amx_ready()) {
    buf.resize((M + kTileRows - 1) / kTileRows * 16 * K);
    amx_blocks(grouped, K, M, buf.data());
    return buf.data();
  }
#endif
  (void)grouped, (void)K, (void)M, (void)buf;
  return nullptr;
}

// Before a thread's first row-tile pass over `a` (its tile shapes, if they are AMX passes).
inline void begin_passes(const Acts& a, const Weights& W) {
#ifdef INHOUSE_AMX
  if (a.amx != nullptr && row_tiles(W.fmt)) amx_configure();
#endif
  (void)a, (void)W;
}

// Two chunks of int8 weights as int16 (chunks 2u and 2u + 1 of a block starting at wb).
__attribute__((always_inline)) inline void chunk_pair(const uint8_t* wb, int u, simd::vw& c0, simd::vw& c1) {
  c0 = simd::int8_group(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * u)));
  c1 = simd::int8_group(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * u + 32)));
}

// A block's chunks: straight-line code with AVX-512's 32 registers; AVX2's 16 would spill when the
// compiler hoists the loads of later chunks, so there the loop stays a loop (unrolled by 2).
#ifdef INHOUSE_SIMD_AVX512
#define INHOUSE_UNROLL_CHUNKS _Pragma("GCC unroll 16")
#else
#define INHOUSE_UNROLL_CHUNKS _Pragma("GCC unroll 2")
#endif

// The integer dot products of one block of P groups of int8 weights (compile-time, so that its
// chunks unroll into straight-line code with every accumulator in a register and every address an
// offset of one pointer): d[j][r] for weight rows wr[j] (the block's codes) and activation rows r
// (the block's chunks of the tile's rows, from xb: `quantize_row`). S dot-product chains per output.
template <int R, int NB, int S, int P>
__attribute__((always_inline)) inline void block_dots(const uint8_t* const* wr, const int16_t* xb, simd::vd (&d)[NB][R]) {
  using namespace simd;
  // one pointer for the whole block: the compiler would otherwise hoist each chunk's address out
  // of the callers' loops (they do not depend on the weight row) and spill them
  __asm__("" : "+r"(xb));
  vd e[NB][R][S];
#pragma GCC unroll 2
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int i = 0; i < S; ++i) e[j][r][i] = dot_zero();
INHOUSE_UNROLL_CHUNKS
  for (int u = 0; u < P / 2; ++u) {
    vw c[NB][2];
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) chunk_pair(wr[j], u, c[j][0], c[j][1]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int16_t* x = xb + (r * P + 2 * u) * kGroup;
#pragma GCC unroll 2
      for (int j = 0; j < NB; ++j) {
        e[j][r][0] = dot_acc(e[j][r][0], c[j][0], x);
        e[j][r][S - 1] = dot_acc(e[j][r][S - 1], c[j][1], x + 32);
      }
    }
  }
#pragma GCC unroll 2
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) d[j][r] = S == 2 ? dot_add(e[j][r][0], e[j][r][S - 1]) : e[j][r][0];
}

// Runs f.template operator()<P>() for the block size P (16, 8, 4, 2) known at compile time.
template <typename F>
__attribute__((always_inline)) inline void with_block(int P, const F& f) {
  switch (P) {
    case 16: if constexpr (simd::kLanes >= 16) { f(std::integral_constant<int, 16>()); break; } [[fallthrough]];
    case 8: f(std::integral_constant<int, 8>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    default: f(std::integral_constant<int, 2>()); break;
  }
}

// Each output's lanes summed, 16 outputs at a time (`sum_lanes`), times the row scales.
template <int R>
inline void reduce_outputs(const simd::vq (*lanes)[R], int64_t nn, const float* row_scales, float* out, int64_t ldo) {
  using namespace simd;
  for (int64_t i0 = 0; i0 < nn; i0 += kLanes) {
    for (int r = 0; r < R; ++r) {
      vq v[kLanes];
      for (int i = 0; i < kLanes; ++i) v[i] = i0 + i < nn ? lanes[i0 + i][r] : q_zero();
      store_lanes_n(out + r * ldo + i0, q_mul(sum_lanes(v), load_lanes_n(row_scales + i0, nn - i0)), nn - i0);
    }
  }
}

// The int8 row kernel (one scale per row): output rows [n0, n1) (at most 16) of W for the R
// activation rows m.. of M (xq: all M rows in block order, `quantize_row`; xs and out: the tile's
// first row). kPassRows weight rows are computed side by side (each activation load serves all of
// them); a block's dot products are converted and scaled at once (per group: the activations'
// scale), and each output's lanes are summed at the end, times the row's scale. A lone last weight
// row is computed twice.
template <int R>
void rows_times(int64_t n0, int64_t n1, int64_t K, const Weights& W, const int16_t* xq, int64_t M, int64_t m,
                const float* xs, int64_t G16, float* out, int64_t ldo) {
  using namespace simd;
  constexpr int NB = R == 1 ? 1 : kPassRows;  // one row at a time is memory-bound: a pair only adds overhead
  constexpr int S = R > 2 ? 1 : 2;  // dot-product chains per output and row (few rows need two to hide latency)
  const int64_t G = K / kGroup;
  vq lanes[16][R];
  for (int64_t n = n0; n < n1; n += NB) {
    const uint8_t* wr[NB];
    for (int j = 0; j < NB; ++j) wr[j] = W.w + std::min(n + j, n1 - 1) * K;
    vq acc[NB][R];
    for (int j = 0; j < NB; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = q_zero();
    for (int64_t g0 = 0; g0 < G;) {
      const int P = block_groups(G, g0);
      const uint8_t* wb[NB];
      for (int j = 0; j < NB; ++j) {
        wb[j] = wr[j] + g0 * kGroup;
        // the weights are read once per token from memory, not cache: ask for them well ahead
        for (int off = 0; off < P * kGroup; off += 64) _mm_prefetch(reinterpret_cast<const char*>(wb[j] + off + kPrefetch), _MM_HINT_T0);
      }
      vd d[NB][R];
      with_block(P, [&](auto p) { block_dots<R, NB, S, decltype(p)::value>(wb, xq + (g0 * M + m * P) * kGroup, d); });
      for (int r = 0; r < R; ++r) {
        const vq xv = spread(load_lanes_n(xs + r * G16 + g0, P), P);
        for (int j = 0; j < NB; ++j) acc[j][r] = q_fmadd(dot_float(d[j][r]), xv, acc[j][r]);
      }
      g0 += P;
    }
    for (int j = 0; j < NB && n + j < n1; ++j)
      for (int r = 0; r < R; ++r) lanes[n + j - n0][r] = acc[j][r];
  }
  reduce_outputs<R>(lanes, n1 - n0, W.row_scales + n0, out + n0, ldo);
}

// The row-tile kernel (4-bit weights, or int8 with group steps): the tile of output rows [n0, n0 +
// kTile) (n0 a multiple of kTile) for R activation rows (xp: the first one's int16 in `grouped`
// order, of M rows; xs, xsum: its group scales and sums, the next G16 further on); writes the
// first nn of them (fewer in a padded last tile) to out[r * ldo + n0 ..]. Per group: each unit's
// two column pairs of all the tile's rows are one vector of codes, multiplied by the activations'
// pair (broadcast) in one integer dot product per activation row; the group's sums are converted
// and scaled once for the whole tile (the weights' steps times the activations' scale), then for
// 4-bit weights the mins term (the weights' mins times the exact group sums of x) is added, the
// groups in order.
template <Fmt F, int R>
void row_tile(int64_t n0, int64_t nn, int64_t K, const Weights& W, const int16_t* xp, int64_t M, const float* xs,
              const float* xsum, int64_t G16, float* out, int64_t ldo) {
  using namespace simd;
  static_assert(row_tiles(F), "int8 weights with row scales: rows_times");
  constexpr bool k4 = F == Fmt::int4;
  constexpr int64_t kBytes = tile_group_bytes(F);
  constexpr int S = R > 2 ? 1 : 2;  // dot-product chains per row (few rows need two to hide latency)
  const int64_t G = K / kGroup, t = n0 / kTile;
  const uint8_t* w = W.w + t * G * kBytes;
  const uint16_t* st = W.steps + t * G * kTile;
  const uint16_t* mn = k4 ? W.mins + t * G * kTile : nullptr;
  vq acc[R];
  for (int r = 0; r < R; ++r) acc[r] = q_zero();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * kBytes;
    prefetch_tile_group(wg, kBytes);
    const int16_t* xg = xp + g * M * kGroup;  // row r's values of group g at xg + 32 * r
    vd d[R][S];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < S; ++i) d[r][i] = dot_zero();
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      vr c0, c1;
      if constexpr (k4) tile_codes(wg + u * 2 * kTile, c0, c1);
      else tile_codes8(wg + u * 4 * kTile, c0, c1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        d[r][0] = tile_dot(d[r][0], c0, xg + r * kGroup + 2 * u);
        d[r][S - 1] = tile_dot(d[r][S - 1], c1, xg + r * kGroup + 16 + 2 * u);
      }
    }
    vd dd[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) dd[r] = S == 2 ? dot_add(d[r][0], d[r][S - 1]) : d[r][0];
    scale_tile_group<R, k4>(dd, st, mn, xs, xsum, G16, g, acc);
  }
  for (int r = 0; r < R; ++r) store_lanes_n(out + r * ldo + n0, acc[r], nn);
}

// Output rows [n0, n1) (at most 16; n0 a multiple of 16) of W for activation rows m .. m + R - 1
// (R <= kTileRows): out is the tile's first row.
template <Fmt F>
inline void tile_for(int64_t R, int64_t n0, int64_t n1, const Acts& a, int64_t m, const Weights& W, float* out, int64_t ldo) {
  const float* xs = a.scales + m * a.G16;
  if constexpr (row_tiles(F)) {
    const float* xsum = a.sums + m * a.G16;
    const int16_t* xp = a.grouped + m * kGroup;
    for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
      const int64_t nn = std::min(kTile, n1 - t0);
#ifdef INHOUSE_AMX
      if (a.amx != nullptr) {
        const int8_t* A = a.amx + (m / kTileRows) * 16 * a.K;
        switch (R) {
#define INHOUSE_TILE(R) case R: row_tile_amx<F, R>(t0, nn, a.K, W, A, xs, xsum, a.G16, out, ldo); break;
          INHOUSE_TILE(8) INHOUSE_TILE(7) INHOUSE_TILE(6) INHOUSE_TILE(5) INHOUSE_TILE(4) INHOUSE_TILE(3) INHOUSE_TILE(2)
#undef INHOUSE_TILE
          default: row_tile_amx<F, 1>(t0, nn, a.K, W, A, xs, xsum, a.G16, out, ldo); break;
        }
        continue;
      }
#endif
      switch (R) {
#define INHOUSE_TILE(R) case R: row_tile<F, R>(t0, nn, a.K, W, xp, a.M, xs, xsum, a.G16, out, ldo); break;
        INHOUSE_TILE(8) INHOUSE_TILE(7) INHOUSE_TILE(6) INHOUSE_TILE(5) INHOUSE_TILE(4) INHOUSE_TILE(3) INHOUSE_TILE(2)
#undef INHOUSE_TILE
        default: row_tile<F, 1>(t0, nn, a.K, W, xp, a.M, xs, xsum, a.G16, out, ldo); break;
      }
    }
  } else {
    switch (R) {
#define INHOUSE_TILE(R) case R: rows_times<R>(n0, n1, a.K, W, a.blocks, a.M, m, xs, a.G16, out, ldo); break;
      INHOUSE_TILE(8) INHOUSE_TILE(7) INHOUSE_TILE(6) INHOUSE_TILE(5) INHOUSE_TILE(4) INHOUSE_TILE(3) INHOUSE_TILE(2)
#undef INHOUSE_TILE
      default: rows_times<1>(n0, n1, a.K, W, a.blocks, a.M, m, xs, a.G16, out, ldo); break;
    }
  }
}

// The same, whatever W's format.
inline void tile(int64_t R, int64_t n0, int64_t n1, const Acts& a, int64_t m, const Weights& W, float* out, int64_t ldo) {
  switch (W.fmt) {
    case Fmt::int4: tile_for<Fmt::int4>(R, n0, n1, a, m, W, out, ldo); break;
    case Fmt::int8_rows: tile_for<Fmt::int8_rows>(R, n0, n1, a, m, W, out, ldo); break;
    case Fmt::int8_groups: tile_for<Fmt::int8_groups>(R, n0, n1, a, m, W, out, ldo); break;
  }
}

// Row n of W (int4 or int8_groups) in fp32, the file's values: code * step + min per element for
// int4 (a multiply then an add, as PyTorch's ops and inhouse.model.native_layout.int4_rows compute it),
// code * step for int8 (ggml's Q8_0): `put(g, f0, f1)` receives group g's columns 0-15 and 16-31.
template <typename Put>
inline void row_values(const Weights& W, int64_t n, int64_t K, const Put& put) {
  using namespace simd;
  const int64_t G = K / kGroup, t = n / kTile, i = n % kTile, bytes = tile_group_bytes(W.fmt);
  const bool k4 = W.fmt == Fmt::int4;  // otherwise int8_groups (rows with one scale have no group values: callers never ask)
  const uint8_t* w = W.w + t * G * bytes + 2 * i;  // row i of tile t: bytes 2i, 2i + 1 of each unit (and half unit) of each group
  const uint16_t* st = W.steps + t * G * kTile + i;
  const uint16_t* mn = k4 ? W.mins + t * G * kTile + i : nullptr;
  alignas(64) int16_t codes[kGroup];
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w + g * bytes;
    for (int u = 0; u < 8; ++u) {
      for (int j = 0; j < 2; ++j) {
        if (k4) {
          const uint8_t b = wg[u * 2 * kTile + j];
          codes[2 * u + j] = b & 15;
          codes[16 + 2 * u + j] = b >> 4;
        } else {
          codes[2 * u + j] = static_cast<int8_t>(wg[u * 4 * kTile + j]);
          codes[16 + 2 * u + j] = static_cast<int8_t>(wg[u * 4 * kTile + 2 * kTile + j]);
        }
      }
    }
    const vf s = set1(_cvtsh_ss(st[g * kTile]));
    const vf f0 = mul(to_float(i16_to_i32(codes)), s), f1 = mul(to_float(i16_to_i32(codes + 16)), s);
    if (k4) {
      const vf mv = set1(_cvtsh_ss(mn[g * kTile]));
      put(g, add(f0, mv), add(f1, mv));
    } else {
      put(g, f0, f1);
    }
  }
}

// Row n of W (int4 or int8_groups) in fp32, the file's values: out (K floats).
inline void weight_row(const Weights& W, int64_t n, int64_t K, float* out) {
  row_values(W, n, K, [&](int64_t g, simd::vf f0, simd::vf f1) {
    simd::store(out + g * kGroup, f0);
    simd::store(out + g * kGroup + 16, f1);
  });
}

}  // namespace inhouse_kernels
