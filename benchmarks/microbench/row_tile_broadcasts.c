// The inner loop of the row-tile kernel (inhouse/kernels/quant_cpu.h `row_tile`) at 8 activation
// rows, in variants, on synthetic data: what bounds it on a CPU, and what was tried. BENCHMARKS.md
// (2026-12-04) quotes its figures. Not part of the build or the tests.
//
//   gcc -O2 -mavx512f -mavx512bw -mavx512vl -mavx512vnni benchmarks/microbench/row_tile_broadcasts.c -o /tmp/rtb && /tmp/rtb
//
// Prints G vpdpwssd/s of one core (a 256-bit instruction counted as half a 512-bit one):
//   peak zmm / peak ymm: independent dot products on registers only (the instruction's rate);
//   kernel: the kernel's loop (codes widened from nibbles, one activation pair broadcast per dot);
//   two tiles: each broadcast feeds two tiles' dots (no unpacking: the bound of that layout);
//   qword pairs: one 64-bit broadcast feeds rows 0-7 and 8-15, lanes combined per group;
//   ymm halves: the kernel's loop in 256-bit halves (a 256-bit broadcast is a plain load on Zen 4).

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int16_t xs[64 * 8 * 32] __attribute__((aligned(64)));  // 64 groups x 8 rows x 32 int16
static uint8_t ws[64 * 256] __attribute__((aligned(64)));     // 64 groups of a 16-row 4-bit tile
static volatile long sink;

static void peaks(void) {
  const long n = 20000000;
  __m512i a[12];
  __m512i b = _mm512_set1_epi16(3), c = _mm512_set1_epi16(5);
  for (int i = 0; i < 12; i++) a[i] = _mm512_set1_epi32(i);
  double t = now();
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm512_dpwssd_epi32(a[i], b, c);
    __asm__ volatile("" : "+v"(b));
  }
  t = now() - t;
  for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_epi32(a[i]);
  printf("peak zmm:    %.2f G/s\n", n * 12 / t / 1e9);
  __m256i a2[12];
  __m256i b2 = _mm256_set1_epi16(3), c2 = _mm256_set1_epi16(5);
  for (int i = 0; i < 12; i++) a2[i] = _mm256_set1_epi32(i);
  t = now();
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a2[i] = _mm256_dpwssd_epi32(a2[i], b2, c2);
    __asm__ volatile("" : "+v"(b2));
  }
  t = now() - t;
  for (int i = 0; i < 12; i++) sink += _mm256_extract_epi32(a2[i], 0);
  printf("peak ymm:    %.2f G/s (256-bit dots, %.2f G/s as 512-bit)\n", n * 12 / t / 1e9, n * 6 / t / 1e9);
}

static int32_t pair(const int16_t* x) { int32_t p; __builtin_memcpy(&p, x, 4); return p; }
static int64_t quad(const int16_t* x) { int64_t p; __builtin_memcpy(&p, x, 8); return p; }

// One group of the loop, 8 rows, per variant (each its own function: compiled for that variant alone).
static const __m512i* mask16(void) { static __m512i m; m = _mm512_set1_epi16(15); return &m; }

__attribute__((noinline)) static double kernel(long n, __m512i* out) {  // returns dots per group
  const __m512i mask = *mask16();
  for (long k = 0; k < n; k++) {
    const int16_t* xg = xs + (k & 63) * 256;
    const uint8_t* wg = ws + (k & 63) * 256;
    __asm__ volatile("" : "+r"(xg), "+r"(wg));
    __m512i d[8];
    for (int r = 0; r < 8; r++) d[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int u = 0; u < 8; u++) {
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wg + u * 32)));
      const __m512i c0 = _mm512_and_si512(b, mask), c1 = _mm512_srli_epi16(b, 4);
#pragma GCC unroll 8
      for (int r = 0; r < 8; r++) {
        d[r] = _mm512_dpwssd_epi32(d[r], c0, _mm512_set1_epi32(pair(xg + r * 32 + 2 * u)));
        d[r] = _mm512_dpwssd_epi32(d[r], c1, _mm512_set1_epi32(pair(xg + r * 32 + 16 + 2 * u)));
      }
    }
    for (int r = 0; r < 8; r++) out[r] = _mm512_add_epi32(out[r], d[r]);
  }
  return 128;
}

__attribute__((noinline)) static double two_tiles(long n, __m512i* out) {
  for (long k = 0; k < n; k++) {
    const int16_t* xg = xs + (k & 63) * 256;
    __m512i w[4];
    for (int i = 0; i < 4; i++) w[i] = _mm512_set1_epi16((short)(3 + i + (k & 1)));
    __asm__ volatile("" : "+r"(xg), "+v"(w[0]), "+v"(w[1]), "+v"(w[2]), "+v"(w[3]));
    __m512i d[2][8];
    for (int r = 0; r < 8; r++) d[0][r] = d[1][r] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int u = 0; u < 8; u++) {
#pragma GCC unroll 8
      for (int r = 0; r < 8; r++) {
        const __m512i x0 = _mm512_set1_epi32(pair(xg + r * 32 + 2 * u)), x1 = _mm512_set1_epi32(pair(xg + r * 32 + 16 + 2 * u));
        d[0][r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(d[0][r], w[0], x0), w[1], x1);
        d[1][r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(d[1][r], w[2], x0), w[3], x1);
      }
    }
    for (int r = 0; r < 8; r++) out[r] = _mm512_add_epi32(out[r], _mm512_add_epi32(d[0][r], d[1][r]));
  }
  return 256;
}

__attribute__((noinline)) static double qword_pairs(long n, __m512i* out) {
  const __m512i mask = *mask16();
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (long k = 0; k < n; k++) {
    const int16_t* xg = xs + (k & 63) * 256;
    const uint8_t* wg = ws + (k & 63) * 256;
    __asm__ volatile("" : "+r"(xg), "+r"(wg));
    __m512i d[8][2];
    for (int r = 0; r < 8; r++) d[r][0] = d[r][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int u = 0; u < 8; u++) {
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wg + u * 32)));
      const __m512i c0 = _mm512_and_si512(b, mask), c1 = _mm512_srli_epi16(b, 4);
      const __m512i lo = _mm512_unpacklo_epi32(c0, c1), hi = _mm512_unpackhi_epi32(c0, c1);
#pragma GCC unroll 8
      for (int r = 0; r < 8; r++) {
        const __m512i x = _mm512_set1_epi64(quad(xg + r * 32 + 4 * u));
        d[r][0] = _mm512_dpwssd_epi32(d[r][0], lo, x);
        d[r][1] = _mm512_dpwssd_epi32(d[r][1], hi, x);
      }
    }
    for (int r = 0; r < 8; r++)
      out[r] = _mm512_add_epi32(out[r], _mm512_add_epi32(_mm512_permutex2var_epi32(d[r][0], odd, d[r][1]),
                                                         _mm512_permutex2var_epi32(d[r][0], even, d[r][1])));
  }
  return 128;
}

__attribute__((noinline)) static double ymm_halves(long n, __m512i* out) {
  const __m256i mask = _mm256_set1_epi16(15);
  for (long k = 0; k < n; k++) {
    const int16_t* xg = xs + (k & 63) * 256;
    const uint8_t* wg = ws + (k & 63) * 256;
    __asm__ volatile("" : "+r"(xg), "+r"(wg));
    __m256i d[8][2];
    for (int r = 0; r < 8; r++) d[r][0] = d[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int u = 0; u < 8; u++) {
      const __m256i b0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wg + u * 32)));
      const __m256i b1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wg + u * 32 + 16)));
      const __m256i c00 = _mm256_and_si256(b0, mask), c01 = _mm256_srli_epi16(b0, 4);
      const __m256i c10 = _mm256_and_si256(b1, mask), c11 = _mm256_srli_epi16(b1, 4);
#pragma GCC unroll 8
      for (int r = 0; r < 8; r++) {
        const __m256i x0 = _mm256_set1_epi32(pair(xg + r * 32 + 2 * u)), x1 = _mm256_set1_epi32(pair(xg + r * 32 + 16 + 2 * u));
        d[r][0] = _mm256_dpwssd_epi32(_mm256_dpwssd_epi32(d[r][0], c00, x0), c01, x1);
        d[r][1] = _mm256_dpwssd_epi32(_mm256_dpwssd_epi32(d[r][1], c10, x0), c11, x1);
      }
    }
    for (int r = 0; r < 8; r++)
      out[r] = _mm512_add_epi32(out[r], _mm512_inserti64x4(_mm512_castsi256_si512(d[r][0]), d[r][1], 1));
  }
  return 128;  // 256 half-width dots
}

static void loops(void) {
  const long n = 3000000;
  const char* names[] = {"kernel:     ", "two tiles:  ", "qword pairs:", "ymm halves: "};
  double (*fns[])(long, __m512i*) = {kernel, two_tiles, qword_pairs, ymm_halves};
  for (int v = 0; v < 4; v++) {
    __m512i out[8];
    for (int r = 0; r < 8; r++) out[r] = _mm512_setzero_si512();
    const double t0 = now();
    const double per = fns[v](n, out);
    const double t = now() - t0;
    for (int r = 0; r < 8; r++) sink += _mm512_reduce_add_epi32(out[r]);
    printf("%s %.2f G/s\n", names[v], n * per / t / 1e9);
  }
}

int main(void) {
  for (int i = 0; i < 64 * 8 * 32; i++) xs[i] = (int16_t)((i * 7) % 100);
  for (int i = 0; i < 64 * 256; i++) ws[i] = (uint8_t)((i * 13) & 255);
  peaks();
  loops();
  return 0;
}
