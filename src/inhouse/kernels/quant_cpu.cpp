// 4-bit or int8 weights x 16-bit integer activations (AVX-512 VNNI or AVX2, see simd.h): the decode-time matmuls of
// inhouse's Int4Linear and Int8Linear (the kernels themselves are in quant_cpu.h).
//
// One pass over the weights serves up to 8 activation rows; output rows are split across
// PyTorch's threads (at::parallel_for); weights are prefetched well ahead (they come from
// memory, not cache, once per token).

#include "quant_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace {

using namespace inhouse_kernels;

// The activations of one call, quantized by the calling thread in the order W's kernel reads
// them (`Acts`); the workers only read them.
Acts quantize_rows(const at::Tensor& x, Fmt fmt) {
  const int64_t M = x.size(0), K = x.size(1), G16 = (K / kGroup + 15) / 16 * 16;
  thread_local AlignedVector<int16_t> xq;
  thread_local AlignedVector<float> xs, xsum;
  thread_local AlignedVector<int8_t> xa;
  xq.resize(M * K);
  xs.assign(M * G16, 0.0f);
  xsum.assign(M * G16, 0.0f);
  const float* xp = x.data_ptr<float>();
  const bool grouped = row_tiles(fmt);
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(xp + m * K, K, M, m, grouped ? nullptr : xq.data(), xs.data() + m * G16, xsum.data() + m * G16,
                 grouped ? xq.data() : nullptr);
  }
  return {grouped ? nullptr : xq.data(), grouped ? xq.data() : nullptr, xs.data(), xsum.data(), K, G16, M,
          grouped ? amx_acts(xq.data(), K, M, xa) : nullptr};
}

// y = x W^T for the first N output rows: output rows split across threads; 16 of them at a time
// stay in L1 while every block of up to 8 activation rows passes over them.
at::Tensor times(const at::Tensor& x_in, const Weights& W, int64_t N, int64_t K) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), rb = W.row_bytes(K);
  const Acts a = quantize_rows(x, W.fmt);
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const char* w = reinterpret_cast<const char*>(W.w);
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {  // in blocks of 16 rows (whole 4-bit tiles)
    const int64_t begin = b0 * 16, end = std::min(N, b1 * 16);
    begin_passes(a, W);
    // the first rows: later ones are prefetched while earlier ones are computed
    for (int64_t off = 0; off < std::min<int64_t>(kPrefetch, (end - begin) * rb); off += 64) {
      _mm_prefetch(w + begin * rb + off, _MM_HINT_T0);
    }
    for (int64_t n0 = begin; n0 < end; n0 += 16) {
      const int64_t n1 = std::min<int64_t>(n0 + 16, end);
      for (int64_t m = 0; m < M; m += kTileRows) tile(std::min<int64_t>(kTileRows, M - m), n0, n1, a, m, W, op + m * N, N);
    }
  });
  return x_in.scalar_type() == at::kFloat ? out : out.to(x_in.scalar_type());
}

void check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(K % kBlock == 0 && K / kGroup <= kMaxGroups, op, ": K must be a multiple of 64 up to ",
              kMaxGroups * kGroup, ", got ", K);
}

const uint16_t* halves(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

// A 4-bit matrix of n rows (n < 0: all the stored ones) in row tiles: codes (tile_padded(n), K/2),
// steps and mins (tile_padded(n), K/32) in tile order.
Weights int4_weights(const at::Tensor& w, const at::Tensor& steps, const at::Tensor& mins, int64_t& n, const char* op) {
  TORCH_CHECK(w.scalar_type() == at::kByte && steps.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf,
              op, ": weights must be uint8 codes with fp16 steps and mins");
  TORCH_CHECK(w.dim() == 2 && w.size(0) % kTile == 0 && w.is_contiguous() && steps.is_contiguous() && mins.is_contiguous(),
              op, ": the codes must be contiguous row tiles of ", kTile, " rows, got ", w.sizes());
  const int64_t stored = w.size(0), K = w.size(1) * 2;
  if (n < 0) n = stored;
  TORCH_CHECK(n <= stored && tile_padded(n) == stored, op, ": ", n, " rows are stored as ", tile_padded(n), ", not ", stored);
  TORCH_CHECK(steps.dim() == 2 && steps.size(0) == stored && steps.size(1) == K / kGroup && mins.sizes() == steps.sizes(),
              op, ": steps/mins must be (N, K/32) (N padded to whole tiles as the codes)");
  Weights W;
  W.fmt = Fmt::int4;
  W.w = w.data_ptr<uint8_t>();
  W.steps = halves(steps);
  W.mins = halves(mins);
  return W;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& steps, const at::Tensor& mins, int64_t n) {
  const Weights W = int4_weights(w, steps, mins, n, "int4_mm");
  const int64_t K = w.size(1) * 2;
  check_x(x, K, "int4_mm");
  return times(x, W, n, K);
}

// int8 weights with one fp32 scale per row (w (N, K), scales (N,)) or one fp16 step per group of
// 32 (a GGUF Q8_0 matrix as it is, in row tiles: w and scales (tile_padded(n), K) and (.., K/32);
// n < 0: all the stored rows).
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t n) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "int8_mm: weights must be (N, K) int8");
  const int64_t stored = w.size(0), K = w.size(1);
  check_x(x, K, "int8_mm");
  const bool groups = scales.dim() == 2;
  const int64_t N = n < 0 ? stored : n;
  TORCH_CHECK(groups ? scales.scalar_type() == at::kHalf && scales.size(0) == stored && scales.size(1) == K / kGroup &&
                           stored % kTile == 0 && N <= stored && tile_padded(N) == stored
                     : scales.scalar_type() == at::kFloat && scales.numel() == stored && N == stored,
              "int8_mm: the scales must be (N,) fp32 (one per row) or fp16 (N, K/32) in row tiles of ", kTile,
              " rows (one per group; N rounded up to whole tiles, ", N, " rows of ", stored, ")");
  const at::Tensor wc = w.contiguous(), sc = scales.contiguous();
  Weights W;
  W.w = reinterpret_cast<const uint8_t*>(wc.data_ptr<int8_t>());
  if (groups) {
    W.fmt = Fmt::int8_groups;
    W.steps = halves(sc);
  } else {
    W.fmt = Fmt::int8_rows;
    W.row_scales = sc.data_ptr<float>();
  }
  return times(x, W, N, K);
}

// The (n, K) matrix of int4 weights, for prompt chunks (where a regular matmul wins): each weight
// computed as code * step + min in fp32 (a product, then a sum, like PyTorch's own ops), and
// rounded once to bf16 unless `fp32` (CPUs without bf16 hardware, where fp32 matmuls are faster).
at::Tensor int4_dequantize(const at::Tensor& w, const at::Tensor& steps, const at::Tensor& mins, bool fp32, int64_t n) {
  const Weights W = int4_weights(w, steps, mins, n, "int4_dequantize");
  const int64_t K = w.size(1) * 2;
  TORCH_CHECK(K % kBlock == 0, "int4_dequantize: K must be a multiple of 64, got ", K);
  at::Tensor out = at::empty({n, K}, w.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
  uint16_t* op = fp32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* of = fp32 ? out.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t r = n0; r < n1; ++r) {
      row_values(W, r, K, [&](int64_t g, simd::vf f0, simd::vf f1) {
        if (fp32) {
          simd::store(of + r * K + g * kGroup, f0);
          simd::store(of + r * K + g * kGroup + 16, f1);
        } else {
          simd::store_bf16(op + r * K + g * kGroup, f0);
          simd::store_bf16(op + r * K + g * kGroup + 16, f1);
        }
      });
    }
  });
  return out;
}

// Whether the row-tile kernel runs passes of kAmxMinRows or more rows on AMX tiles (amx.h); `on`: 0
// turns that off, 1 on again (where the build and the process have AMX), -1 changes nothing.
// The results are the same either way.
bool use_amx(int64_t on) {
#ifdef INHOUSE_AMX
  if (on == 0) amx_state().store(0);
  if (on == 1) amx_state().store(-1);  // asks again
  return amx_ready();
#else
  (void)on;
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(inhouse, m) {
  m.def("use_amx(int on=-1) -> bool", &use_amx);
  m.def("int4_mm(Tensor x, Tensor w, Tensor steps, Tensor mins, int n=-1) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor row_scales, int n=-1) -> Tensor");
  m.def("int4_dequantize(Tensor w, Tensor steps, Tensor mins, bool fp32=False, int n=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(inhouse, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_dequantize", &int4_dequantize);
}
