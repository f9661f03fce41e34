// Microbenchmark (BENCHMARKS.md, 2026-12-03): variants of the 4-bit row-tile kernel (16 weight rows
// side by side per group of 32 columns, R activation rows), on synthetic data, one core:
//   int16: vpdpwssd with int16 activations, 2-column units (the kernel inhouse uses);
//   int8:  vpdpbusd with int8 activations, 4-column units (tried, dropped on quality);
//   amx:   AMX-INT8 tdpbsud, 8 int8 activation rows plus their 8 remainder rows as A, the codes
//          unpacked to bytes in 4-column units as B, one 16 x 16 int32 result per group scaled
//          with AVX-512, two groups in flight (and without the scaling step: its bound).
// Not part of the build or the tests; needs AVX-512 VNNI and AMX (Sapphire Rapids or later):
//   g++ -O3 -march=sapphirerapids int4_tile_variants.cpp -o /tmp/int4_tile_variants && /tmp/int4_tile_variants
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

constexpr int T = 16;  // weight rows per tile
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Mat {  // a 4-bit (N, K) matrix in tiles: 256 bytes of codes per tile and group, fp16 steps/mins
  int64_t N, K;
  const uint8_t* w;
  const uint16_t *st, *mn;
};

// Group g of tile t: acc[r] += (d[r] * step * xs[r]) + min * xsum[r], for each of the tile's rows.
template <int R>
inline void scale_group(const Mat& m, int64_t t, int64_t g, const __m512i* d, const float* xs, const float* xsum, __m512* acc) {
  const int64_t G = m.K / 32;
  const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(m.st + (t * G + g) * T)));
  const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(m.mn + (t * G + g) * T)));
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_mul_ps(sv, _mm512_set1_ps(xs[r * G + g])), acc[r]);
    acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[r * G + g]), acc[r]);
  }
}

// Every tile: body(t, g, acc) per group, the weights prefetched 4 KiB ahead.
template <int R, typename Body>
inline void tiles(const Mat& m, float* out, const Body& body) {
  const int64_t G = m.K / 32;
  for (int64_t t = 0; t < m.N / T; ++t) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = m.w + (t * G + g) * 256;
      for (int off = 0; off < 256; off += 64) _mm_prefetch((const char*)(wg + off + 4096), _MM_HINT_T0);
      body(t, g, wg, acc);
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * m.N + t * T, acc[r]);
  }
}

template <int R>
void k_int16(const Mat& m, const int16_t* x, const float* xs, const float* xsum, float* out) {
  tiles<R>(m, out, [&](int64_t t, int64_t g, const uint8_t* wg, __m512* acc) {
    const int16_t* xg = x + g * 32;
    __m512i d[R];
    for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wg + u * 32)));
      const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi16(15)), hi = _mm512_srli_epi16(b, 4);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t p0, p1;
        std::memcpy(&p0, xg + r * m.K + 2 * u, 4);
        std::memcpy(&p1, xg + r * m.K + 16 + 2 * u, 4);
        d[r] = _mm512_dpwssd_epi32(d[r], lo, _mm512_set1_epi32(p0));
        d[r] = _mm512_dpwssd_epi32(d[r], hi, _mm512_set1_epi32(p1));
      }
    }
    scale_group<R>(m, t, g, d, xs, xsum, acc);
  });
}

template <int R>
void k_int8(const Mat& m, const int8_t* x, const float* xs, const float* xsum, float* out) {
  tiles<R>(m, out, [&](int64_t t, int64_t g, const uint8_t* wg, __m512* acc) {
    const int8_t* xg = x + g * 32;
    __m512i d[R];
    for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512i b = _mm512_loadu_si512(wg + u * 64), m15 = _mm512_set1_epi8(15);
      const __m512i lo = _mm512_and_si512(b, m15), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m15);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t p0, p1;
        std::memcpy(&p0, xg + r * m.K + 4 * u, 4);
        std::memcpy(&p1, xg + r * m.K + 16 + 4 * u, 4);
        d[r] = _mm512_dpbusd_epi32(d[r], lo, _mm512_set1_epi32(p0));
        d[r] = _mm512_dpbusd_epi32(d[r], hi, _mm512_set1_epi32(p1));
      }
    }
    scale_group<R>(m, t, g, d, xs, xsum, acc);
  });
}

// A: 16 rows of K int8 (the 8 activation rows, then their 8 remainder rows). SCALE = false: without
// the scaling step (the tile pipeline's own bound).
struct alignas(64) TileConfig { uint8_t palette, start; uint8_t res[14]; uint16_t colsb[16]; uint8_t rows[16]; };
template <int R, bool SCALE = true>
void k_amx(const Mat& m, const int8_t* A, const float* xs, const float* xsum, float* out) {
  static_assert(R <= 8, "8 activation rows and their remainders fill A's 16 rows");
  const int64_t G = m.K / 32;
  alignas(64) uint8_t B[2][8][64];
  alignas(64) int32_t C[2][16][16];
  const __m512i m15 = _mm512_set1_epi8(15);
  for (int64_t t = 0; t < m.N / T; ++t) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 2) {  // two groups: tiles 0 (C), 1 (A), 2 (B) and 3, 4, 5
      for (int j = 0; j < 2; ++j) {
        const uint8_t* wg = m.w + (t * G + g + j) * 256;
        for (int off = 0; off < 256; off += 64) _mm_prefetch((const char*)(wg + off + 4096), _MM_HINT_T0);
        for (int u = 0; u < 4; ++u) {
          const __m512i b = _mm512_loadu_si512(wg + u * 64);
          _mm512_store_si512(B[j][u], _mm512_and_si512(b, m15));
          _mm512_store_si512(B[j][4 + u], _mm512_and_si512(_mm512_srli_epi16(b, 4), m15));
        }
      }
      _tile_loadd(2, B[0], 64);
      _tile_loadd(1, A + g * 32, m.K);
      _tile_zero(0);
      _tile_dpbsud(0, 1, 2);
      _tile_loadd(5, B[1], 64);
      _tile_loadd(4, A + (g + 1) * 32, m.K);
      _tile_zero(3);
      _tile_dpbsud(3, 4, 5);
      _tile_stored(0, C[0], 64);
      _tile_stored(3, C[1], 64);
      if (!SCALE) continue;
      for (int j = 0; j < 2; ++j) {
        __m512i d[R];
        for (int r = 0; r < R; ++r) d[r] = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(C[j][r]), 8), _mm512_load_si512(C[j][8 + r]));
        scale_group<R>(m, t, g + j, d, xs, xsum, acc);
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * m.N + t * T, acc[r]);
  }
}

template <typename F>
double best_of_5(int reps, const F& f) {
  double best = 1e9;
  for (int trial = 0; trial < 5; ++trial) {
    const double t = now();
    for (int i = 0; i < reps; ++i) f();
    best = std::min(best, now() - t);
  }
  return best;
}

template <int R>
void run(int64_t N, int64_t K) {
  const int64_t G = K / 32;
  std::vector<uint8_t> W(N * K / 2);
  for (auto& b : W) b = rand();
  std::vector<uint16_t> st(N * G, 0x3c00), mn(N * G, 0x3c00);
  std::vector<int16_t> x16(R * K);
  for (auto& v : x16) v = rand() % 65535 - 32767;
  std::vector<int8_t> x8(16 * K);
  for (auto& v : x8) v = rand() % 255 - 127;
  std::vector<float> xs(R * G, 1e-3f), xsum(R * G, 1.f), out(R * N);
  const Mat m{N, K, W.data(), st.data(), mn.data()};
  const int reps = int(4e9 / (double(N) * K * R)) + 1;
  const double mac = double(N) * K * R * reps / 1e9;
  const double t16 = best_of_5(reps, [&] { k_int16<R>(m, x16.data(), xs.data(), xsum.data(), out.data()); });
  const double t8 = best_of_5(reps, [&] { k_int8<R>(m, x8.data(), xs.data(), xsum.data(), out.data()); });
  const double ta = best_of_5(reps, [&] { k_amx<R>(m, x8.data(), xs.data(), xsum.data(), out.data()); });
  const double tn = best_of_5(reps, [&] { k_amx<R, false>(m, x8.data(), xs.data(), xsum.data(), out.data()); });
  printf("R=%d N=%ld K=%ld  GMAC/s: int16 %.1f | int8 %.1f (%.2fx) | amx %.1f (%.2fx) | amx unscaled %.1f\n", R, (long)N,
         (long)K, mac / t16, mac / t8, t16 / t8, mac / ta, t16 / ta, mac / tn);
}

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
    fprintf(stderr, "AMX tile data not permitted here\n");
    return 1;
  }
  TileConfig c{};
  c.palette = 1;
  for (int i : {0, 3}) c.rows[i] = 16, c.colsb[i] = 64;  // C: 16 x 16 int32
  for (int i : {1, 4}) c.rows[i] = 16, c.colsb[i] = 32;  // A: 16 rows x 32 int8 (one group)
  for (int i : {2, 5}) c.rows[i] = 8, c.colsb[i] = 64;   // B: 8 rows of 4 codes x 16 weight rows
  _tile_loadconfig(&c);
  run<8>(1536, 576);
  run<8>(576, 1536);
  run<8>(960, 576);
  run<1>(1536, 576);
  run<1>(576, 1536);
  _tile_release();
}
