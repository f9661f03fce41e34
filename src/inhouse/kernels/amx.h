// The row-tile kernel (4-bit weights, int8 with group steps) on AMX-INT8 tiles (Intel Sapphire
// Rapids and later), for passes of 4 to 8 activation rows: the same results as quant_cpu.h's
// `row_tile`, bit for bit.
//
// `row_tile` spends one vpdpwssd (32 multiply-adds) per two columns, weight tile row and
// activation row: at 8 activation rows that is the whole budget of a core's vector unit. A tile
// multiply (tdpbssd) does a group's 16 weight rows x 32 columns x 16 rows at once, in int8.
// Activations are int16, so each row enters as two int8 rows: x = 256 * hi + lo, with hi =
// (x + 128) >> 8 and lo = x - 256 * hi, both in [-128, 127] because |x| <= 32639 (`kActMax`).
// A group's integer dot products sum_k code * x = 256 * (sum_k code * hi) + sum_k code * lo are
// then exact, the same int32 as row_tile's, and are scaled by the same fp32 operations in the
// same order: the two kernels agree exactly, and a row's result still does not depend on the batch
// it is in (nor on whether this CPU has AMX).
//
// Per group of 32 columns and tile of 16 weight rows:
//   A (16 x 32 bytes): rows 0-7 the activation rows' hi bytes, rows 8-15 their lo bytes (rows past
//     the pass's last are zero), the group's columns in the order the codes unpack to: place 4u + j
//     holds column (2u, 2u + 1, 16 + 2u, 17 + 2u)[j] (`amx_blocks`);
//   B (8 x 64 bytes): row u holds, for each weight row i, its codes of those four columns, one
//     byte each: unit u of the tile's codes (quant_cpu.h) widened with one shift and one mask
//     (4-bit), or permuted by words (int8);
//   C (16 x 16 int32) = A x B, stored and read back by the vector unit for the scaling.
// Tiles alternate between two sets by group parity, codes are unpacked a group ahead and results
// scaled two groups behind, so that the tile unit and the vector unit overlap.
//
// Compiled only with -mamx-tile -mamx-int8 (inhouse.kernels adds them where the CPU has AMX), or
// with INHOUSE_AMX_EMULATE (amx_emulate.h: the tile instructions in scalar code, for tests on any
// AVX-512 CPU); used only once the kernel asked Linux for the tile state (`amx_ready`).

#pragma once

#if defined(INHOUSE_SIMD_AVX512) && ((defined(__AMX_TILE__) && defined(__AMX_INT8__)) || defined(INHOUSE_AMX_EMULATE))
#define INHOUSE_AMX 1

#include <sys/syscall.h>
#include <unistd.h>

#ifdef INHOUSE_AMX_EMULATE
#include "amx_emulate.h"
#endif

#include <atomic>

namespace inhouse_kernels {

constexpr int64_t kAmxMinRows = 4;  // fewer rows: row_tile is as fast (the tile work is per group, not per row)

// Whether the process may use the tile registers (asked once); quant_cpu.cpp's `use_amx` turns their use off and on.
inline std::atomic<int>& amx_state() {  // -1: not asked yet, 0: off, 1: on
  static std::atomic<int> s{-1};
  return s;
}
inline bool amx_ready() {
  int s = amx_state().load(std::memory_order_relaxed);
  if (s < 0) {
#ifdef INHOUSE_AMX_EMULATE
    s = 1;
#else
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    s = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0 ? 1 : 0;
#endif
    amx_state().store(s, std::memory_order_relaxed);
  }
  return s == 1;
}

// The tile shapes (tiles 0/1: A, 2/3: B, 4/5: C), loaded by each thread before a pass: other code
// on the same thread (oneDNN's AMX matmuls) loads its own.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {32, 32, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 8, 8, 16, 16};
};
inline void amx_configure() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

// A for every pass of 8 rows of M (`grouped`: int16, row m's group g at grouped + (g * M + m) * 32,
// quant_cpu.h `quantize_row`): pass p's
// 16 x K bytes at out + p * 16 * K (the layout at the top of this file). Per group, the column
// pairs (2u, 2u + 1) and (16 + 2u, 17 + 2u) become places 4u .. 4u + 3: one dword permutation.
inline void amx_blocks(const int16_t* grouped, int64_t K, int64_t M, int8_t* out) {
  const int64_t passes = (M + kTileRows - 1) / kTileRows;
  const __m512i order = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i half = _mm512_set1_epi16(128);
  for (int64_t m = 0; m < passes * kTileRows; ++m) {
    int8_t* hi = out + (m / kTileRows) * 16 * K + (m % kTileRows) * K;
    int8_t* lo = hi + kTileRows * K;
    if (m >= M) {  // rows past the last: zero
      std::memset(hi, 0, K);
      std::memset(lo, 0, K);
      continue;
    }
    for (int64_t g = 0; g < K; g += kGroup) {
      const __m512i v = _mm512_permutexvar_epi32(order, _mm512_loadu_si512(grouped + (g / kGroup * M + m) * kGroup));
      const __m512i h = _mm512_srai_epi16(_mm512_add_epi16(v, half), 8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + g), _mm512_cvtepi16_epi8(h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + g), _mm512_cvtepi16_epi8(_mm512_sub_epi16(v, _mm512_slli_epi16(h, 8))));
    }
  }
}

// A group's 4-bit codes (256 bytes of one tile) as B: unit u's 16 pairs of bytes (b0, b1) of weight
// row i become the four bytes (b0 & 15, b1 & 15, b0 >> 4, b1 >> 4) of B's row u.
inline void amx_codes(const uint8_t* wg, uint8_t* B) {
  const __m512i nibbles = _mm512_set1_epi32(0x0F0F0F0F);
#pragma GCC unroll 8
  for (int u = 0; u < 8; ++u) {
    const __m512i d = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + u * 32)));
    _mm512_store_si512(B + u * 64, _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nibbles, 0xA8));  // (d | d << 12) & mask
  }
}

// A group's int8 codes (512 bytes of one tile) as B: unit u holds weight row i's pair of columns
// (2u, 2u + 1) at bytes 2i, 2i + 1 and of columns (16 + 2u, 17 + 2u) 32 bytes further: one word
// permutation puts each row's four side by side.
inline void amx_codes8(const uint8_t* wg, uint8_t* B) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
#pragma GCC unroll 8
  for (int u = 0; u < 8; ++u)
    _mm512_store_si512(B + u * 64, _mm512_permutexvar_epi16(order, _mm512_loadu_si512(wg + u * 64)));
}

// `row_tile` on tiles: the tile of output rows [n0, n0 + 16) for R (<= 8) activation rows, A their
// pass (`amx_blocks`), xs/xsum as there. The tile configuration must be loaded (`amx_configure`).
template <Fmt F, int R>
void row_tile_amx(int64_t n0, int64_t nn, int64_t K, const Weights& W, const int8_t* A, const float* xs,
                  const float* xsum, int64_t G16, float* out, int64_t ldo) {
  using namespace simd;
  static_assert(kTile == 16 && R <= 8, "AMX: 16 weight rows per tile, 8 activation rows per pass");
  static_assert(row_tiles(F), "AMX: row tiles only");
  constexpr bool k4 = F == Fmt::int4;
  constexpr int64_t kBytes = tile_group_bytes(F);
  constexpr int kAhead = 1, kLag = 2, kRing = 4;
  const int64_t G = K / kGroup, t = n0 / kTile;
  const uint8_t* w = W.w + t * G * kBytes;
  const uint16_t* st = W.steps + t * G * kTile;
  const uint16_t* mn = k4 ? W.mins + t * G * kTile : nullptr;
  alignas(64) uint8_t codes[kRing][512];
  alignas(64) int32_t C[kRing][16 * 16];
  vq acc[R];
  for (int r = 0; r < R; ++r) acc[r] = q_zero();
  auto scale = [&](int64_t g) {  // hi * 256 + lo, then row_tile's own per-group operations
    const int32_t* c = C[g % kRing];
    vd dd[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) dd[r] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c + 16 * r), 8), _mm512_load_si512(c + 16 * (8 + r)));
    scale_tile_group<R, k4>(dd, st, mn, xs, xsum, G16, g, acc);
  };
  auto unpack = [&](int64_t g) {
    const uint8_t* wg = w + g * kBytes;
    prefetch_tile_group(wg, kBytes);
    if constexpr (k4) amx_codes(wg, codes[g % kRing]);
    else amx_codes8(wg, codes[g % kRing]);
  };
  for (int64_t g = 0; g < std::min<int64_t>(kAhead, G); ++g) unpack(g);
  for (int64_t g = 0; g < G; ++g) {
    if (g + kAhead < G) unpack(g + kAhead);
    if (g & 1) {
      _tile_loadd(1, A + g * kGroup, K);
      _tile_loadd(3, codes[g % kRing], 64);
      _tile_zero(5);
      _tile_dpbssd(5, 1, 3);
      _tile_stored(5, C[g % kRing], 64);
    } else {
      _tile_loadd(0, A + g * kGroup, K);
      _tile_loadd(2, codes[g % kRing], 64);
      _tile_zero(4);
      _tile_dpbssd(4, 0, 2);
      _tile_stored(4, C[g % kRing], 64);
    }
    if (g >= kLag) scale(g - kLag);
  }
  for (int64_t g = std::max<int64_t>(0, G - kLag); g < G; ++g) scale(g);
  for (int r = 0; r < R; ++r) store_lanes_n(out + r * ldo + n0, acc[r], nn);
}

}  // namespace inhouse_kernels

#endif
