// The vector operations inhouse's native CPU kernels are written in, for two instruction sets.
//
// The kernels (quant_cpu.h, quant_cpu.cpp, decode_cpu.cpp) compute on 16 floats, 16 int32 or 32
// int16 at a time. Compiled with AVX-512 (F, BW, VL, VNNI, BF16: recent Intel Xeons, AMD Zen 4+)
// each of these is one register and each operation one instruction. Compiled with AVX2 + FMA +
// F16C only (AMD Zen 2/3, most Intel desktop and older server parts) each is a pair of 256-bit
// registers and the float operations do the same lane by lane. The integer dot products of a chunk
// of 32 quantized weights and activations (quant_cpu.h: the columns of a chunk come from up to 16
// groups) are exact on both. The builds differ in the width of a block (`kLanes` groups: 16 or 8,
// so the weights' layout is per instruction set) and in how a chunk's activations are laid out
// (`store_chunk`, `int4_groups`, `int8_group`: AVX2 keeps the even and the odd places apart so that
// unpacking weights needs shifts only, no lane-crossing shuffles); results differ only in the
// order of fp32 sums (last-bit differences).
//
// inhouse.kernels builds the sources once for the instruction set the CPU has, selected by the
// compiler flags (__AVX512F__ ...).

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace inhouse_kernels {
namespace simd {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define INHOUSE_SIMD_AVX512 1
constexpr const char* kIsa = "avx512";

using vf = __m512;   // 16 floats
using vi = __m512i;  // 16 int32
using vw = __m512i;  // 32 int16

inline __mmask16 first(int64_t n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }  // lanes >= n: 0
inline void store_n(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
inline vf keep_n(vf v, int64_t n) { return _mm512_maskz_mov_ps(first(n), v); }  // lanes >= n: 0
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
inline vf fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf abs(vf a) { return _mm512_abs_ps(a); }
inline vf round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf scale_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
inline float reduce_add(vf a) { return _mm512_reduce_add_ps(a); }
inline float reduce_max(vf a) { return _mm512_reduce_max_ps(a); }
// Bit i set where lane i (< n) is greater than t.
inline uint32_t greater(vf a, float t, int64_t n) { return _mm512_mask_cmp_ps_mask(first(n), a, _mm512_set1_ps(t), _CMP_GT_OQ); }

// 16 fp16 / bf16 values -> fp32 (exact).
inline vf load_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vf load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// fp32 -> bf16, rounded to nearest even.
inline void store_bf16(uint16_t* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

inline vi to_int(vf a) { return _mm512_cvtps_epi32(a); }  // round to nearest even
inline vf to_float(vi a) { return _mm512_cvtepi32_ps(a); }
inline vi u8_to_i32(__m128i b) { return _mm512_cvtepu8_epi32(b); }  // 16 bytes

// 32 int32 (a: places 0-15, b: 16-31) saturated to int16, in order.
inline void store_i16(int16_t* p, vi a, vi b) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtsepi32_epi16(a));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), _mm512_cvtsepi32_epi16(b));
}
// A chunk of 32 int16 activations, in order, stored in the order this build's row kernels read
// them (here: the same order).
inline void store_chunk(int16_t* p, const int16_t* in_order) { _mm512_storeu_si512(p, _mm512_loadu_si512(in_order)); }
// The two chunks of 32 4-bit codes in 32 bytes (the first: the low nibbles, the second: the
// high ones), as int16 in `store_chunk`'s order; and a chunk of 32 int8 weights.
inline void int4_groups(__m256i wb, vw& g0, vw& g1) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  g0 = _mm512_cvtepu8_epi16(_mm256_and_si256(wb, low4));
  g1 = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(wb, 4), low4));
}
inline vw int8_group(__m256i wb) { return _mm512_cvtepi8_epi16(wb); }
inline vw load_i16(const int16_t* p) { return _mm512_loadu_si512(p); }  // 32 values

// The accumulators of a row kernel (quant_cpu.h). The integer dot products of a chunk of 32
// weights and activations land in kLanes int32 lanes, lane l holding places 2l and 2l+1; a block
// of kLanes groups (its chunks holding 2 columns of each group) thus has its groups' dot products
// one per lane, converted and multiplied by the lanes' scales once per block. Smaller blocks (P
// groups) spread each group over kLanes / P lanes (`spread`).
constexpr int kTileRows = 8;   // activation rows served by one pass over the weights
constexpr int kLanes = 16;     // groups per block
constexpr int kPassRows = 2;   // weight rows computed side by side (each activation load serves both)
using vd = __m512i;  // int32 dot products of a block
using vq = __m512;   // fp32, one lane per group of a block (or per output row, `sum_lanes`)
inline vd dot_zero() { return _mm512_setzero_si512(); }
inline vd dot_acc(vd acc, vw w, const int16_t* x) { return _mm512_dpwssd_epi32(acc, w, load_i16(x)); }
inline vd dot_add(vd a, vd b) { return _mm512_add_epi32(a, b); }
inline vq dot_float(vd d) { return _mm512_cvtepi32_ps(d); }
inline vq q_zero() { return _mm512_setzero_ps(); }
inline vq q_mul(vq a, vq b) { return _mm512_mul_ps(a, b); }
inline vq q_fmadd(vq a, vq b, vq c) { return _mm512_fmadd_ps(a, b, c); }
inline vq load_lanes(const float* p) { return _mm512_loadu_ps(p); }
inline vq load_lanes_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }  // lanes >= n: 0
inline vq load_half_lanes_n(const uint16_t* p, int64_t n) {  // fp16 -> fp32; lanes >= n: 0
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p));
}
inline void store_lanes_n(float* p, vq v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
inline vq q_set1(float x) { return _mm512_set1_ps(x); }
// 4-bit weights in row tiles (quant_cpu.h): kLanes weight rows side by side, one int32 lane per
// row. `tile_codes` reads 2 * kLanes bytes (byte 2i + h: row i's code of one column in its low
// nibble, of the column 16 further in its high one) as the rows' code pairs of the two column
// pairs (int16 lanes 2i, 2i + 1: row i); `tile_dot` adds each row's pair times the activations'
// pair x[0], x[1] (broadcast) to its lane.
using vr = __m512i;
inline void tile_codes(const uint8_t* p, vr& lo, vr& hi) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  lo = _mm512_and_si512(b, _mm512_set1_epi16(0x0F));
  hi = _mm512_srli_epi16(b, 4);
}
inline vd tile_dot(vd acc, vr c, const int16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, 4);
  return _mm512_dpwssd_epi32(acc, c, _mm512_set1_epi32(pair));
}
// int8 row tiles: `tile_codes8` reads 4 * kLanes bytes (the rows' column pairs, then the pairs of
// the columns 16 further, 2 bytes per row each) as the same two vectors of code pairs.
inline void tile_codes8(const uint8_t* p, vr& lo, vr& hi) {
  lo = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  hi = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
}
// Lane l <- v[l * P / kLanes]: the scales of a block of P groups (P = 2, 4, 8, 16) over its lanes.
__attribute__((always_inline)) inline vq spread(vq v, int P) {
  switch (P) {
    case 8: return _mm512_permutexvar_ps(_mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0), v);
    case 4: return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), v);
    case 2: return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), v);
    default: return v;
  }
}
// Lane i of the result = the sum of v[i]'s lanes (kLanes vectors): a transposing tree, ~3 operations
// per vector where a horizontal sum each would take ~8. The order of the sums of a lane does not
// depend on the other vectors.
__attribute__((always_inline)) inline vq sum_lanes(const vq* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 2; ++i) {
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}
// Lane i of the result = the sum of v[i]'s 16 floats (16 vectors).
__attribute__((always_inline)) inline vf sum16(const vf* v) { return sum_lanes(v); }
// 16 int16 -> 16 int32.
inline vi i16_to_i32(const int16_t* p) { return _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
// The 32 int32 a, b saturated to int16 in one register, in order.
inline __m512i pack_i16(vi a, vi b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi32_epi16(a)), _mm512_cvtsepi32_epi16(b), 1);
}
// r[i] lane j <- r[j] lane i (16 x 16 32-bit values): a block's groups <-> its chunks (quant_cpu.h).
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
}
#define INHOUSE_SIMD_TRANSPOSE16 1

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr const char* kIsa = "avx2";

struct vf { __m256 lo, hi; };   // lanes 0-7, 8-15
struct vi { __m256i lo, hi; };
struct vw { __m256i lo, hi; };  // 32 int16: the even elements of a group, then the odd ones

inline __m256i first8(int64_t n) {  // all-ones in lanes < n (n clamped to [0, 8])
  const int32_t k = static_cast<int32_t>(n < 0 ? 0 : (n > 8 ? 8 : n));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline vf zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vf set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline vf load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
inline vf load_n(const float* p, int64_t n) {
  if (n >= 16) return load(p);
  return {_mm256_maskload_ps(p, first8(n)), _mm256_maskload_ps(p + 8, first8(n - 8))};
}
inline void store_n(float* p, vf v, int64_t n) {
  if (n >= 16) return store(p, v);
  _mm256_maskstore_ps(p, first8(n), v.lo);
  _mm256_maskstore_ps(p + 8, first8(n - 8), v.hi);
}
inline vf keep_n(vf v, int64_t n) {
  return {_mm256_and_ps(v.lo, _mm256_castsi256_ps(first8(n))), _mm256_and_ps(v.hi, _mm256_castsi256_ps(first8(n - 8)))};
}
inline vf add(vf a, vf b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline vf sub(vf a, vf b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline vf mul(vf a, vf b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline vf div(vf a, vf b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline vf fmadd(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline vf fnmadd(vf a, vf b, vf c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline vf max(vf a, vf b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline vf min(vf a, vf b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline vf abs(vf a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline vf round(vf a) {
  return {_mm256_round_ps(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
          _mm256_round_ps(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// p * 2^n for integral n in [-252, 254]: two exact power-of-two factors, each a normal float.
inline __m256 scale_pow2_8(__m256 p, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i a = _mm256_srai_epi32(ni, 1), b = _mm256_sub_epi32(ni, a);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 fa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
  const __m256 fb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, fa), fb);
}
inline vf scale_pow2(vf p, vf n) { return {scale_pow2_8(p.lo, n.lo), scale_pow2_8(p.hi, n.hi)}; }
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_add(vf a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float reduce_max(vf a) {
  const __m256 m8 = _mm256_max_ps(a.lo, a.hi);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline uint32_t greater(vf a, float t, int64_t n) {
  const __m256 tv = _mm256_set1_ps(t);
  const uint32_t lo = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, tv, _CMP_GT_OQ)));
  const uint32_t hi = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.hi, tv, _CMP_GT_OQ)));
  const uint32_t valid = n >= 16 ? 0xFFFFu : ((1u << n) - 1);
  return (lo | (hi << 8)) & valid;
}

inline vf load_half(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline __m256 bf16_8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline vf load_bf16(const uint16_t* p) {
  return {bf16_8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          bf16_8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
// 8 fp32 -> 8 bf16 (in the low 16 bits of each int32 lane), round to nearest even, NaN kept quiet.
inline __m256i bf16_round_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(r, qnan, nan);
}
inline __m128i pack_u32_low16(__m256i x) {  // the low 16 bits of 8 int32 lanes, in order
  const __m256i p = _mm256_packus_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF)), _mm256_setzero_si256());
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(p, 0xD8));
}
inline void store_bf16(uint16_t* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack_u32_low16(bf16_round_8(v.lo)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), pack_u32_low16(bf16_round_8(v.hi)));
}

inline vi to_int(vf a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
inline vf to_float(vi a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline vi u8_to_i32(__m128i b) { return {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))}; }
inline vi i16_to_i32(const int16_t* p) {
  return {_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}

// 16 int32 -> 16 int16 (saturated), in order: packs interleaves the 128-bit halves (lo0-3, hi0-3,
// lo4-7, hi4-7), the permutation puts them back.
inline __m256i pack16(vi a) { return _mm256_permute4x64_epi64(_mm256_packs_epi32(a.lo, a.hi), 0xD8); }
// 32 int32 (a: places 0-15, b: 16-31) saturated to int16, in order.
inline void store_i16(int16_t* p, vi a, vi b) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack16(a));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), pack16(b));
}
// A chunk of 32 int16 activations, in order, stored as its 16 even elements, then its 16 odd
// ones: the order in which `int4_groups` and `int8_group` unpack weights with shifts alone.
inline void store_chunk(int16_t* p, const int16_t* in_order) {
  // per 128-bit lane, the 4 even int16 then the 4 odd ones; then the lanes' evens together
  const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                         0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in_order));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in_order + 16));
  const __m256i v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(a, split), 0xD8);  // evens 0-14, odds 1-15
  const __m256i w = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, split), 0xD8);  // evens 16-30, odds 17-31
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute2x128_si256(v, w, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), _mm256_permute2x128_si256(v, w, 0x31));
}
// The 32 bytes as 16 int16 lanes: lane i holds bytes 2i and 2i+1, i.e. the codes of places 2i
// and 2i+1 of the first chunk (low nibbles) and of the second (high nibbles).
inline void int4_groups(__m256i wb, vw& g0, vw& g1) {
  const __m256i low4 = _mm256_set1_epi16(0x000F);
  g0 = {_mm256_and_si256(wb, low4), _mm256_and_si256(_mm256_srli_epi16(wb, 8), low4)};
  g1 = {_mm256_and_si256(_mm256_srli_epi16(wb, 4), low4), _mm256_srli_epi16(wb, 12)};
}
inline vw int8_group(__m256i wb) { return {_mm256_srai_epi16(_mm256_slli_epi16(wb, 8), 8), _mm256_srai_epi16(wb, 8)}; }

// The accumulators of a row kernel (see the AVX-512 ones). A chunk of 32 int16 is two registers
// (its even places, then its odd ones), whose pairwise products (madd) land in 8 int32 lanes,
// lane l holding places 4l..4l+3: a block of 8 groups (4 columns of each per chunk) has a lane per group.
constexpr int kTileRows = 4;   // activation rows per pass: more would spill the 16 registers
constexpr int kLanes = 8;
constexpr int kPassRows = 1;
using vd = __m256i;
using vq = __m256;
inline vd dot_zero() { return _mm256_setzero_si256(); }
inline vd dot_acc(vd acc, vw w, const int16_t* x) {
  const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w.lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                                     _mm256_madd_epi16(w.hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
  return _mm256_add_epi32(acc, p);
}
inline vd dot_add(vd a, vd b) { return _mm256_add_epi32(a, b); }
inline vq dot_float(vd d) { return _mm256_cvtepi32_ps(d); }
inline vq q_zero() { return _mm256_setzero_ps(); }
inline vq q_mul(vq a, vq b) { return _mm256_mul_ps(a, b); }
inline vq q_fmadd(vq a, vq b, vq c) { return _mm256_fmadd_ps(a, b, c); }
inline vq load_lanes(const float* p) { return _mm256_loadu_ps(p); }
inline vq load_lanes_n(const float* p, int64_t n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first8(n)); }
inline vq load_half_lanes_n(const uint16_t* p, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  if (n % 2 == 0) {  // the kernels' case (groups come in pairs): a masked load of n / 2 pairs
    const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n / 2)), _mm_setr_epi32(0, 1, 2, 3));
    return _mm256_cvtph_ps(_mm_maskload_epi32(reinterpret_cast<const int*>(p), m));
  }
  alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}
inline void store_lanes_n(float* p, vq v, int64_t n) {
  if (n >= 8) return _mm256_storeu_ps(p, v);
  _mm256_maskstore_ps(p, first8(n), v);
}
inline vq q_set1(float x) { return _mm256_set1_ps(x); }
using vr = __m256i;  // row tiles (see the AVX-512 ones): 8 rows, 16 bytes per two column pairs
inline void tile_codes(const uint8_t* p, vr& lo, vr& hi) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_and_si256(b, _mm256_set1_epi16(0x0F));
  hi = _mm256_srli_epi16(b, 4);
}
inline vd tile_dot(vd acc, vr c, const int16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, 4);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(c, _mm256_set1_epi32(pair)));
}
inline void tile_codes8(const uint8_t* p, vr& lo, vr& hi) {
  lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
}
__attribute__((always_inline)) inline vq spread(vq v, int P) {
  switch (P) {
    case 4: return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    case 2: return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    default: return v;
  }
}
__attribute__((always_inline)) inline vq sum_lanes(const vq* v) {  // lane i = the sum of v[i]'s 8 lanes
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: v0..3, v4..7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
// Lane i of the result = the sum of v[i]'s 16 floats (16 vectors).
__attribute__((always_inline)) inline vf sum16(const vf* v) {
  __m256 w[16];
  for (int i = 0; i < 16; ++i) w[i] = _mm256_add_ps(v[i].lo, v[i].hi);
  return {sum_lanes(w), sum_lanes(w + 8)};
}

#else
#error "inhouse's native kernels need AVX-512 (F, BW, VL, VNNI, BF16) or AVX2 with FMA and F16C"
#endif

}  // namespace simd
}  // namespace inhouse_kernels
