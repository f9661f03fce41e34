// Scalar stand-ins for the AMX tile instructions amx.h uses, so that its kernels can be built and
// tested bit for bit on any AVX-512 CPU (INHOUSE_NATIVE_AMX=emulate: tests only, far slower than
// the vector kernels). Each thread has its own tile registers, shaped by its last
// _tile_loadconfig, as on the hardware.

#pragma once

#include <cstdint>
#include <cstring>

namespace inhouse_amx_emulate {

struct Tiles {
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  int8_t t[8][16][64] = {};
};
inline Tiles& tiles() {
  static thread_local Tiles s;
  return s;
}
// The 64-byte configuration: palette, start row, 14 reserved bytes, 16 x colsb (uint16), 16 x rows.
inline void loadconfig(const void* config) {
  const uint8_t* c = static_cast<const uint8_t*>(config);
  Tiles& s = tiles();
  for (int i = 0; i < 8; ++i) {
    s.colsb[i] = static_cast<uint16_t>(c[16 + 2 * i] | (c[17 + 2 * i] << 8));
    s.rows[i] = c[48 + i];
  }
}
inline void loadd(int t, const void* base, int64_t stride) {
  Tiles& s = tiles();
  for (int r = 0; r < s.rows[t]; ++r) std::memcpy(s.t[t][r], static_cast<const char*>(base) + r * stride, s.colsb[t]);
}
inline void stored(int t, void* base, int64_t stride) {
  Tiles& s = tiles();
  for (int r = 0; r < s.rows[t]; ++r) std::memcpy(static_cast<char*>(base) + r * stride, s.t[t][r], s.colsb[t]);
}
inline void zero(int t) { std::memset(tiles().t[t], 0, sizeof(tiles().t[t])); }
// C[m][n] += sum over k of A[m][4k + j] * B[k][4n + j], j = 0..3, all int8, sums int32.
inline void dpbssd(int c, int a, int b) {
  Tiles& s = tiles();
  for (int m = 0; m < s.rows[a]; ++m) {
    for (int n = 0; n < s.colsb[b] / 4; ++n) {
      int32_t acc;
      std::memcpy(&acc, &s.t[c][m][4 * n], 4);
      for (int k = 0; k < s.colsb[a] / 4; ++k)
        for (int j = 0; j < 4; ++j) acc += static_cast<int32_t>(s.t[a][m][4 * k + j]) * s.t[b][k][4 * n + j];
      std::memcpy(&s.t[c][m][4 * n], &acc, 4);
    }
  }
}

}  // namespace inhouse_amx_emulate

#define _tile_loadconfig(config) inhouse_amx_emulate::loadconfig(config)
#define _tile_loadd(t, base, stride) inhouse_amx_emulate::loadd(t, base, stride)
#define _tile_stored(t, base, stride) inhouse_amx_emulate::stored(t, base, stride)
#define _tile_zero(t) inhouse_amx_emulate::zero(t)
#define _tile_dpbssd(c, a, b) inhouse_amx_emulate::dpbssd(c, a, b)
