// 4-bit weights x 16-bit integer activations on AVX-512 VNNI: the decode-time matmul of
// inhouse's Int4Linear.
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
// One pass over the weights serves up to 8 activation rows; output rows are split across
// PyTorch's threads (at::parallel_for); weights are prefetched well ahead (they come from
// memory, not cache, once per token). Each output element is computed the same way whatever M
// is, so a row's result does not depend on the batch it is in.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

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
void quantize_row(const float* x, int64_t K, int16_t* xq, float* xs, float* xsum) {
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

// The activations of one call, quantized by the calling thread; the workers only read them.
struct QuantizedRows {
  const int16_t* q;
  const float* scales;
  const float* sums;
  int64_t G16;
};

QuantizedRows quantize_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), G16 = (K / kGroup + 15) / 16 * 16;
  thread_local std::vector<int16_t> xq;
  thread_local std::vector<float> xs, xsum;
  xq.resize(M * K);
  xs.assign(M * G16, 0.0f);
  xsum.assign(M * G16, 0.0f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, xq.data() + m * K, xs.data() + m * G16, xsum.data() + m * G16);
  return {xq.data(), xs.data(), xsum.data(), G16};
}

// Output rows split across threads; 16 of them at a time stay in L1 while every block of up to
// 8 activation rows passes over them. `rows(R, n0, n1, m)` runs one such tile.
template <typename Tile>
void over_tiles(int64_t M, int64_t N, const char* w, int64_t row_bytes, const Tile& tile) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    // the first rows: later ones are prefetched while earlier ones are computed
    for (int64_t off = 0; off < std::min<int64_t>(kPrefetch, (end - begin) * row_bytes); off += 64) {
      _mm_prefetch(w + begin * row_bytes + off, _MM_HINT_T0);
    }
    for (int64_t n0 = begin; n0 < end; n0 += 16) {
      const int64_t n1 = std::min<int64_t>(n0 + 16, end);
      for (int64_t m = 0; m < M; m += kTileRows) tile(std::min<int64_t>(kTileRows, M - m), n0, n1, m);
    }
  });
}

void check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(K % kBlock == 0 && K / kGroup <= kMaxGroups, op, ": K must be a multiple of 64 up to ",
              kMaxGroups * kGroup, ", got ", K);
}

at::Tensor int4_mm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& steps, const at::Tensor& mins) {
  TORCH_CHECK(w.scalar_type() == at::kByte && steps.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf,
              "int4_mm: weights must be uint8 codes with fp16 steps and mins");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  check_x(x_in, K, "int4_mm");
  TORCH_CHECK(steps.size(0) == N && steps.size(1) == K / kGroup && mins.sizes() == steps.sizes(),
              "int4_mm: steps/mins must be (N, K/32)");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor wc = w.contiguous(), sc = steps.contiguous(), mc = mins.contiguous();
  const int64_t M = x.size(0);
  const QuantizedRows xr = quantize_rows(x);
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const at::Half* spp = sc.data_ptr<at::Half>();
  const at::Half* mpp = mc.data_ptr<at::Half>();
  over_tiles(M, N, reinterpret_cast<const char*>(wp), K / 2, [&](int64_t r, int64_t n0, int64_t n1, int64_t m) {
    const int16_t* q = xr.q + m * K;
    const float* s = xr.scales + m * xr.G16;
    const float* su = xr.sums + m * xr.G16;
    float* o = op + m * N;
    switch (r) {
#define INHOUSE_TILE(R) case R: rows_times_int4<R>(n0, n1, K, wp, spp, mpp, q, s, su, xr.G16, o, N); break;
      INHOUSE_TILE(8) INHOUSE_TILE(7) INHOUSE_TILE(6) INHOUSE_TILE(5) INHOUSE_TILE(4) INHOUSE_TILE(3) INHOUSE_TILE(2)
      default: rows_times_int4<1>(n0, n1, K, wp, spp, mpp, q, s, su, xr.G16, o, N); break;
#undef INHOUSE_TILE
    }
  });
  return x_in.scalar_type() == at::kFloat ? out : out.to(x_in.scalar_type());
}

at::Tensor int8_mm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& row_scales) {
  TORCH_CHECK(w.scalar_type() == at::kChar && row_scales.scalar_type() == at::kFloat,
              "int8_mm: weights must be int8 with fp32 row scales");
  const int64_t N = w.size(0), K = w.size(1);
  check_x(x_in, K, "int8_mm");
  TORCH_CHECK(row_scales.numel() == N, "int8_mm: one scale per output row");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor wc = w.contiguous(), sc = row_scales.contiguous();
  const int64_t M = x.size(0);
  const QuantizedRows xr = quantize_rows(x);
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  over_tiles(M, N, reinterpret_cast<const char*>(wp), K, [&](int64_t r, int64_t n0, int64_t n1, int64_t m) {
    const int16_t* q = xr.q + m * K;
    const float* s = xr.scales + m * xr.G16;
    float* o = op + m * N;
    switch (r) {
#define INHOUSE_TILE(R) case R: rows_times_int8<R>(n0, n1, K, wp, sp, q, s, xr.G16, o, N); break;
      INHOUSE_TILE(8) INHOUSE_TILE(7) INHOUSE_TILE(6) INHOUSE_TILE(5) INHOUSE_TILE(4) INHOUSE_TILE(3) INHOUSE_TILE(2)
      default: rows_times_int8<1>(n0, n1, K, wp, sp, q, s, xr.G16, o, N); break;
#undef INHOUSE_TILE
    }
  });
  return x_in.scalar_type() == at::kFloat ? out : out.to(x_in.scalar_type());
}

// The (N, K) bf16 matrix of int4 weights, for prompt chunks (where a bf16 matmul wins): each
// weight computed as code * step + min in fp32 (a product, then a sum, like PyTorch's own ops)
// and rounded once to bf16.
at::Tensor int4_dequantize(const at::Tensor& w, const at::Tensor& steps, const at::Tensor& mins) {
  TORCH_CHECK(w.scalar_type() == at::kByte && steps.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf,
              "int4_dequantize: weights must be uint8 codes with fp16 steps and mins");
  const int64_t N = w.size(0), K = w.size(1) * 2, G = K / kGroup;
  TORCH_CHECK(K % kBlock == 0 && steps.size(0) == N && steps.size(1) == G && mins.sizes() == steps.sizes(),
              "int4_dequantize: shapes do not match");
  const at::Tensor wc = w.contiguous(), sc = steps.contiguous(), mc = mins.contiguous();
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kBFloat16));
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const at::Half* spp = sc.data_ptr<at::Half>();
  const at::Half* mpp = mc.data_ptr<at::Half>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const __m128i low4 = _mm_set1_epi8(0x0F);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t b = g / 2;  // group 2b: low nibbles of block b; group 2b+1: high nibbles
        const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + n * (K / 2) + b * 32));
        const __m128i h0 = _mm256_castsi256_si128(wb), h1 = _mm256_extracti128_si256(wb, 1);
        const __m128i c0 = (g & 1) ? _mm_and_si128(_mm_srli_epi16(h0, 4), low4) : _mm_and_si128(h0, low4);
        const __m128i c1 = (g & 1) ? _mm_and_si128(_mm_srli_epi16(h1, 4), low4) : _mm_and_si128(h1, low4);
        const __m512 step = _mm512_set1_ps(static_cast<float>(spp[n * G + g]));
        const __m512 lo = _mm512_set1_ps(static_cast<float>(mpp[n * G + g]));
        const __m512 f0 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c0)), step), lo);
        const __m512 f1 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c1)), step), lo);
        uint16_t* o = op + n * K + g * kGroup;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(f0)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(f1)));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(inhouse, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor steps, Tensor mins) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor row_scales) -> Tensor");
  m.def("int4_dequantize(Tensor w, Tensor steps, Tensor mins) -> Tensor");
}

TORCH_LIBRARY_IMPL(inhouse, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_dequantize", &int4_dequantize);
}
