// The decode step of a weight-quantized Llama model in one native call (inhouse.model.fused_decode).
//
// A decode step (every sequence one token behind) of a small model is hundreds of small
// operations: on SmolLM2-135M, 210 matrix x vector products of 0.1-0.9 MB of 4-bit weights and
// ~1,500 element-wise operations. Run one by one from Python, each costs a few microseconds of
// dispatch and thread fork/join on top of its bytes, which is more than the bytes themselves. Here
// the whole step (embedding, 30 layers, final norm, vocabulary projection) runs inside one OpenMP
// parallel region: the threads split each matrix by output rows and meet at a barrier between
// phases (five per layer), so the step costs about what its weights take to read. The
// same call also runs prompt chunks, as rows at consecutive positions of one sequence
// (`FusedDecode.rows`).
//
// The arithmetic is the eager model's (inhouse/model/transformer.py with Int4Linear/Int8Linear
// and RescoredOutput): fp32 residual stream and norms, activations quantized to int16 per group of
// 32 for the quantized matmuls (quant_cpu.h, the same row kernels), RoPE on interleaved pairs in
// fp32, keys/values stored in the bf16 cache, attention scores and softmax in fp32, SwiGLU in
// fp32; the vocabulary projection an int8 pass whose top-k logits are recomputed exactly from the
// bf16 rows. Only the order of some fp32 sums differs (within ~1e-6 relative). Every row of the
// batch is computed alone, the same way whatever the batch: a sequence's tokens do not depend on
// which others share its steps.

#include "quant_cpu.h"

#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
#include <initializer_list>
#include <cstring>
#include <memory>
#include <limits>
#include <vector>

namespace {

using namespace inhouse_kernels;

// e^x for 16 floats: x = n ln2 + r, |r| <= ln2/2, e^r by Cephes' degree-6 polynomial (~1e-7 relative).
inline simd::vf exp16(simd::vf x) {
  using namespace simd;
  x = min(max(x, set1(-87.3f)), set1(88.7f));
  const vf n = round(mul(x, set1(1.44269504088896341f)));
  vf r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return scale_pow2(p, n);
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as PyTorch's conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// A quantized (N, K) matrix (quant_cpu.h `Weights`): 4-bit codes with fp16 steps/mins per group
// of 32 (Int4Linear), int8 with one fp32 scale per row or one fp16 step per group (Int8Linear).
struct Linear {
  int64_t N = 0, K = 0;
  Weights W;
  int64_t row_bytes() const { return W.row_bytes(K); }
};

// Output rows [n0, n1) of `L` (n0 a multiple of 16) for all M rows of `a`: out[m * ldo + n]. Sixteen
// weight rows at a time stay in L1 while each block of up to 8 activation rows passes over them.
void linear_rows(const Linear& L, int64_t n0, int64_t n1, const Acts& a, int64_t M, float* out, int64_t ldo) {
  if (n0 >= n1) return;
  begin_passes(a, L.W);
  const int64_t rb = L.row_bytes();
  const char* w = reinterpret_cast<const char*>(L.W.w);
  for (int64_t off = 0; off < std::min<int64_t>(kPrefetch, (n1 - n0) * rb); off += 64) {
    _mm_prefetch(w + n0 * rb + off, _MM_HINT_T0);  // the first rows; later ones are prefetched as we go
  }
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t ne = std::min<int64_t>(nb + 16, n1);
    for (int64_t m = 0; m < M; m += kTileRows) tile(std::min<int64_t>(kTileRows, M - m), nb, ne, a, m, L.W, out + m * ldo, ldo);
  }
}

// Work handed out in chunks to whichever thread asks next (attention: a few dozen (row, head)
// units of uneven length). Which thread computes a unit never changes how it is computed.
struct alignas(64) Counter {
  std::atomic<int64_t> next{0};
};

template <typename F>
inline void for_chunks(Counter& c, int64_t N, int64_t chunk, const F& f) {
  for (;;) {
    const int64_t n0 = c.next.fetch_add(chunk, std::memory_order_relaxed);
    if (n0 >= N) return;
    f(n0, std::min(n0 + chunk, N));
  }
}

// This thread's share [begin, end) of N rows split over T threads, in multiples of 16 rows.
inline void share(int64_t N, int t, int T, int64_t& begin, int64_t& end) {
  begin = t == 0 ? 0 : std::min<int64_t>(N, (N * t / T + 15) / 16 * 16);
  end = t == T - 1 ? N : std::min<int64_t>(N, (N * (t + 1) / T + 15) / 16 * 16);
}

// y = x / rms(x) * w over D floats (fp32, as F.rms_norm on fp32 tensors).
inline void rms_norm(const float* x, const float* w, int64_t D, float eps, float* y) {
  using namespace simd;
  vf acc = zero();
  for (int64_t d = 0; d < D; d += 16) {
    const vf v = load(x + d);
    acc = fmadd(v, v, acc);
  }
  const float inv = 1.0f / std::sqrt(reduce_add(acc) / static_cast<float>(D) + eps);
  const vf vi = set1(inv);
  for (int64_t d = 0; d < D; d += 16) store(y + d, mul(mul(load(x + d), vi), load(w + d)));
}

// Rotate the interleaved pairs (x[2i], x[2i+1]) of one head by (cos[i], sin[i]), in place.
inline void rope(float* x, const float* cs, const float* sn, int64_t hd) {
  for (int64_t i = 0; i < hd / 2; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = x0 * cs[i] - x1 * sn[i];
    x[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
  }
}

// scores[0..S) <- e^(scores - mx), in place; returns 1 / their sum (softmax's normalization).
inline float exp_and_normalizer(float* scores, int64_t S, float mx) {
  using namespace simd;
  const vf vmx = set1(mx);
  vf vsum = zero();
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    const vf e = exp16(sub(load(scores + s), vmx));
    store(scores + s, e);
    vsum = add(vsum, e);
  }
  if (s < S) {
    const vf e = exp16(sub(load_n(scores + s, S - s), vmx));
    store_n(scores + s, e, S - s);
    vsum = add(vsum, keep_n(e, S - s));
  }
  return 1.0f / reduce_add(vsum);
}

// One query head over S cached positions (bf16 keys/values, rows of hd, a multiple of 16): y =
// softmax(q.k * scale) v. For head widths `attend_heads` has no registers laid out for.
void attend_head(const float* q, const uint16_t* kc, const uint16_t* vc, int64_t S, int64_t hd, float scale,
                 float* scores, float* y) {
  using namespace simd;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < S; ++s) {
    const uint16_t* kr = kc + s * hd;
    vf a = zero();
    for (int64_t d = 0; d < hd; d += 16) a = fmadd(load(q + d), load_bf16(kr + d), a);
    scores[s] = reduce_add(a) * scale;
    mx = std::max(mx, scores[s]);
  }
  const float inv = exp_and_normalizer(scores, S, mx);
  for (int64_t d = 0; d < hd; d += 16) store(y + d, zero());
  for (int64_t t = 0; t < S; ++t) {
    const vf p = set1(scores[t] * inv);
    const uint16_t* vr = vc + t * hd;
    for (int64_t d = 0; d < hd; d += 16) store(y + d, fmadd(p, load_bf16(vr + d), load(y + d)));
  }
}

// NH query heads of one kv head (q: NH x hd, consecutive) over S cached positions: each key and
// value row is read once for all of them (grouped-query attention). Scores of 16 positions are
// summed at once (`sum16`). scores: NH rows of ls >= S floats; y: NH x hd.
constexpr int64_t kKvAhead = 8;  // key rows prefetched ahead of the one read

template <int NV, int NH>
void attend_heads(const float* q, const uint16_t* kc, const uint16_t* vc, int64_t S, float scale, float* scores,
                  int64_t ls, float* y) {
  using namespace simd;
  constexpr int64_t hd = 16 * NV;
  vf qv[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j) qv[h][j] = load(q + h * hd + 16 * j);
  vf part[NH][16];
  for (int64_t off = 0; off < std::min(S, kKvAhead) * hd * 2; off += 64) _mm_prefetch(reinterpret_cast<const char*>(kc) + off, _MM_HINT_T0);
  for (int64_t s0 = 0; s0 < S; s0 += 16) {
    const int64_t ns = std::min<int64_t>(16, S - s0);
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= ns) {
        for (int h = 0; h < NH; ++h) part[h][i] = zero();
        continue;
      }
      const uint16_t* kr = kc + (s0 + i) * hd;
      // the cache rows come from memory (a batch's caches outgrow L2), in short streams the
      // hardware prefetcher meets late: the key row kKvAhead positions on, and this value row for
      // the second pass
      const char* ka = reinterpret_cast<const char*>(kr + kKvAhead * hd);
      const char* va = reinterpret_cast<const char*>(vc + (s0 + i) * hd);
      for (int64_t off = 0; off < hd * 2; off += 64) {
        _mm_prefetch(ka + off, _MM_HINT_T0);
        _mm_prefetch(va + off, _MM_HINT_T0);
      }
      vf k[NV];
      for (int j = 0; j < NV; ++j) k[j] = load_bf16(kr + 16 * j);
      for (int h = 0; h < NH; ++h) {
        vf a = zero();
        for (int j = 0; j < NV; ++j) a = fmadd(qv[h][j], k[j], a);
        part[h][i] = a;
      }
    }
    for (int h = 0; h < NH; ++h) store(scores + h * ls + s0, mul(sum16(part[h]), set1(scale)));
  }
  float inv[NH];
  for (int h = 0; h < NH; ++h) {  // softmax
    float* sc = scores + h * ls;
    vf vmx = set1(-std::numeric_limits<float>::infinity());
    int64_t s = 0;
    for (; s + 16 <= S; s += 16) vmx = max(vmx, load(sc + s));
    float mx = reduce_max(vmx);
    for (; s < S; ++s) mx = std::max(mx, sc[s]);
    inv[h] = exp_and_normalizer(sc, S, mx);
  }
  vf acc[NH][NV];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j) acc[h][j] = zero();
  for (int64_t t = 0; t < S; ++t) {
    const uint16_t* vr = vc + t * hd;
    vf v[NV];
    for (int j = 0; j < NV; ++j) v[j] = load_bf16(vr + 16 * j);
    for (int h = 0; h < NH; ++h) {
      const vf p = set1(scores[h * ls + t] * inv[h]);
      for (int j = 0; j < NV; ++j) acc[h][j] = fmadd(p, v[j], acc[h][j]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NV; ++j) store(y + h * hd + 16 * j, acc[h][j]);
}

// The G query heads of one kv head, a few at a time (as many as keep their accumulators in registers).
void attend_group(const float* q, int64_t G, const uint16_t* kc, const uint16_t* vc, int64_t S, int64_t hd, float scale,
                  float* scores, int64_t ls, float* y) {
  if (hd != 64 && hd != 128) {
    for (int64_t h = 0; h < G; ++h) attend_head(q + h * hd, kc, vc, S, hd, scale, scores, y + h * hd);
    return;
  }
  const int64_t per = hd == 64 ? 4 : 2;
  for (int64_t h0 = 0; h0 < G; h0 += per) {
    const int64_t nh = std::min(per, G - h0);
    const float* qh = q + h0 * hd;
    float* yh = y + h0 * hd;
    if (hd == 64) {
      switch (nh) {
        case 4: attend_heads<4, 4>(qh, kc, vc, S, scale, scores, ls, yh); break;
        case 3: attend_heads<4, 3>(qh, kc, vc, S, scale, scores, ls, yh); break;
        case 2: attend_heads<4, 2>(qh, kc, vc, S, scale, scores, ls, yh); break;
        default: attend_heads<4, 1>(qh, kc, vc, S, scale, scores, ls, yh); break;
      }
    } else {
      if (nh == 2) attend_heads<8, 2>(qh, kc, vc, S, scale, scores, ls, yh);
      else attend_heads<8, 1>(qh, kc, vc, S, scale, scores, ls, yh);
    }
  }
}

// Indices of the k largest of v[0..n) (any order).
void top_k(const float* v, int64_t n, int64_t k, int64_t* out) {
  std::vector<std::pair<float, int64_t>> heap;  // min-heap of the best so far
  heap.reserve(k + 1);
  auto cmp = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) { return a.first > b.first; };
  float thresh = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t left = n - i;
    uint32_t hits = static_cast<int64_t>(heap.size()) < k  // fill the heap first
                        ? (left >= 16 ? 0xFFFFu : (1u << left) - 1)
                        : simd::greater(simd::load_n(v + i, left), thresh, left);
    while (hits) {
      const int j = __builtin_ctz(hits);
      hits &= hits - 1;
      const float x_j = v[i + j];
      if (static_cast<int64_t>(heap.size()) < k) {
        heap.emplace_back(x_j, i + j);
        std::push_heap(heap.begin(), heap.end(), cmp);
      } else if (x_j > heap.front().first) {
        std::pop_heap(heap.begin(), heap.end(), cmp);
        heap.back() = {x_j, i + j};
        std::push_heap(heap.begin(), heap.end(), cmp);
      }
      if (static_cast<int64_t>(heap.size()) == k) thresh = heap.front().first;
    }
  }
  for (size_t j = 0; j < heap.size(); ++j) out[j] = heap[j].second;
  for (int64_t j = static_cast<int64_t>(heap.size()); j < k; ++j) out[j] = 0;
}

struct Layer {
  const float* attn_norm;
  const float* ffn_norm;
  Linear wq, wk, wv, wo, w1, w3, w2;
};

// Per-thread scratch: the activations each thread quantizes for itself (every thread computes
// the same norms and quantization of the same inputs, which costs less than a barrier).
struct Scratch {
  AlignedVector<float> xn, tmp, tmp2, scores, cs;
  AlignedVector<int16_t> q, p;  // quantized activations in block order (row-scale int8 kernel), grouped (row tiles)
  AlignedVector<int8_t> amx;     // p as the AMX kernel's passes (amx.h)
  AlignedVector<float> scales, sums;
};

class FusedDecoder : public torch::CustomClassHolder {
 public:
  // final_norm (D,) fp32; inv_freq (hd/2,) fp32; `vocab` V. The embedding: [table (V, D) bf16], a 4-bit table
  // [codes, steps, mins] in row tiles (Int4Embedding, quant_cpu.h) or an int8 one with group
  // steps [codes, steps, unused], row tiles too (Int8Embedding). The output projection:
  // an int8 pass [w8 (V, D) int8, scales (V,) fp32, rows (V, D) bf16] whose top `rescore_k` logits
  // are recomputed from the bf16 rows, or a 4-bit pass [codes, steps, mins] or an int8 one with
  // group steps [codes, steps, unused] whose top logits are recomputed from its own rows,
  // dequantized: the file's values (RescoredOutput).
  FusedDecoder(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps, at::Tensor final_norm,
               at::Tensor inv_freq, std::vector<at::Tensor> embedding, std::vector<at::Tensor> output, int64_t rescore_k,
               int64_t vocab)
      : H_(n_heads), KH_(n_kv_heads), hd_(head_dim), eps_(static_cast<float>(eps)), k_(rescore_k) {
    TORCH_CHECK((embedding.size() == 1 || embedding.size() == 3) && embedding[0].dim() == 2,
                "FusedDecoder: the embedding is one bf16 (V, D) table or a quantized one (codes, steps, mins)");
    V_ = vocab;  // a quantized table stores whole row tiles: more rows than V
    D_ = embedding[0].scalar_type() == at::kByte ? embedding[0].size(1) * 2 : embedding[0].size(1);
    TORCH_CHECK(D_ % 64 == 0 && hd_ % 16 == 0 && H_ % KH_ == 0 && (H_ * hd_) % 64 == 0,
                "FusedDecoder: unsupported geometry (dim ", D_, ", heads ", H_, "/", KH_, ", head_dim ", hd_, ")");
    check_f32(final_norm, D_, "final norm");
    check_f32(inv_freq, hd_ / 2, "inv_freq");
    if (embedding.size() == 1) {
      TORCH_CHECK(embedding[0].scalar_type() == at::kBFloat16 && embedding[0].is_contiguous() && embedding[0].size(0) == V_,
                  "FusedDecoder: the embedding table must be contiguous (V, D) bf16");
      emb_ = reinterpret_cast<const uint16_t*>(embedding[0].data_ptr<at::BFloat16>());
    } else {
      table_ = make_linear(embedding[0], embedding[1], embedding[2], V_, D_);
      TORCH_CHECK(table_.W.fmt != Fmt::int8_rows, "FusedDecoder: a quantized embedding must be 4-bit or int8 with group steps");
    }
    TORCH_CHECK(output.size() == 3, "FusedDecoder: the output projection is 3 tensors");
    out_ = make_linear(output[0], output[1], output[2], V_, D_);
    if (out_.W.fmt == Fmt::int8_rows) {
      check_f32(output[1], V_, "output scales");
      TORCH_CHECK(output[2].scalar_type() == at::kBFloat16 && output[2].is_contiguous() && output[2].size(0) == V_ &&
                  output[2].size(1) == D_, "FusedDecoder: the output rows must be (V, D) bf16");
      out_rows_ = reinterpret_cast<const uint16_t*>(output[2].data_ptr<at::BFloat16>());
    }
    TORCH_CHECK(rescore_k > 0 && rescore_k <= V_, "FusedDecoder: rescore_k must be in [1, V]");
    keep_ = {final_norm, inv_freq};
    for (auto* ts : {&embedding, &output})
      for (auto& x : *ts) keep_.push_back(x);
    final_norm_ = final_norm.data_ptr<float>();
    inv_freq_ = inv_freq.data_ptr<float>();
  }

  // One layer: its two norm weights, then (w, a, b) for wq, wk, wv, wo, w1, w3, w2, each either
  // int4 (uint8 codes, fp16 steps and mins in row tiles, quant_cpu.h) or int8 (int8 (N, K) with fp32
  // row scales (N,), or int8 codes with fp16 group steps in row tiles; b unused).
  void add_layer(std::vector<at::Tensor> t) {
    TORCH_CHECK(t.size() == 23, "FusedDecoder.add_layer: expected 23 tensors, got ", t.size());
    Layer L;
    check_f32(t[0], D_, "attention norm");
    check_f32(t[1], D_, "ffn norm");
    L.attn_norm = t[0].data_ptr<float>();
    L.ffn_norm = t[1].data_ptr<float>();
    const int64_t qd = H_ * hd_, kvd = KH_ * hd_;
    Linear* lins[7] = {&L.wq, &L.wk, &L.wv, &L.wo, &L.w1, &L.w3, &L.w2};
    const int64_t F = t[14].size(0);  // w1's rows
    const int64_t shapes[7][2] = {{qd, D_}, {kvd, D_}, {kvd, D_}, {D_, qd}, {F, D_}, {F, D_}, {D_, F}};
    for (int i = 0; i < 7; ++i) *lins[i] = make_linear(t[2 + 3 * i], t[3 + 3 * i], t[4 + 3 * i], shapes[i][0], shapes[i][1]);
    TORCH_CHECK(layers_.empty() || F == F_, "FusedDecoder: every layer must have the same hidden size");
    TORCH_CHECK(F % 64 == 0, "FusedDecoder: hidden size must be a multiple of 64, got ", F);
    F_ = F;
    layers_.push_back(L);
    for (auto& x : t) keep_.push_back(x);
  }

  // The KV cache: per layer (rows, n_kv_heads, max_len, head_dim) bf16 keys and values.
  void set_caches(std::vector<at::Tensor> k, std::vector<at::Tensor> v) {
    TORCH_CHECK(k.size() == layers_.size() && v.size() == layers_.size(), "FusedDecoder: one cache per layer");
    kc_.clear();
    vc_.clear();
    for (size_t i = 0; i < k.size(); ++i) {
      for (const at::Tensor* c : {&k[i], &v[i]}) {
        TORCH_CHECK(c->scalar_type() == at::kBFloat16 && c->is_contiguous() && c->dim() == 4 && c->size(1) == KH_ &&
                    c->size(3) == hd_ && c->sizes() == k[0].sizes(), "FusedDecoder: caches must be contiguous bf16 (rows, ",
                    KH_, ", max_len, ", hd_, ")");
      }
      kc_.push_back(reinterpret_cast<uint16_t*>(k[i].data_ptr<at::BFloat16>()));
      vc_.push_back(reinterpret_cast<uint16_t*>(v[i].data_ptr<at::BFloat16>()));
    }
    cache_rows_ = k[0].size(0);
    cache_len_ = k[0].size(2);
    caches_ = std::move(k);
    for (auto& x : v) caches_.push_back(x);
  }

  // Logits (n, 1, V) fp32 after B tokens: token ids (B,), their positions (B,) and their cache rows
  // (B,), all int64; `logit_rows` (n,) int64 says which of the B rows need logits, in that order (empty: all).
  // Writes each token's key/value at its position before any row attends, so rows of one sequence
  // at consecutive positions (a prompt chunk) each attend to the ones before them, as in a causal
  // forward: a row's result depends only on its sequence's tokens up to it, not on which other rows
  // share the call.
  at::Tensor step(at::Tensor tokens, at::Tensor positions, at::Tensor rows, at::Tensor logit_rows) {
    TORCH_CHECK(!kc_.empty(), "FusedDecoder.step: set_caches first");
    const int64_t B = tokens.numel();
    for (const at::Tensor* x : {&tokens, &positions, &rows}) {
      TORCH_CHECK(x->scalar_type() == at::kLong && x->numel() == B, "FusedDecoder.step: tokens, positions and rows must be ",
                  B, " int64 values each");
    }
    TORCH_CHECK(logit_rows.scalar_type() == at::kLong && logit_rows.dim() == 1, "FusedDecoder.step: logit_rows must be a 1-d int64 tensor");
    const at::Tensor lr = logit_rows.contiguous();
    std::vector<int64_t> out_rows(lr.data_ptr<int64_t>(), lr.data_ptr<int64_t>() + lr.numel());
    if (out_rows.empty()) {
      for (int64_t b = 0; b < B; ++b) out_rows.push_back(b);
    }
    for (const int64_t r : out_rows) TORCH_CHECK(r >= 0 && r < B, "FusedDecoder.step: logit row ", r, " is outside [0, ", B, ")");
    const int64_t n_out = static_cast<int64_t>(out_rows.size());
    const at::Tensor tk = tokens.contiguous(), ps = positions.contiguous(), rw = rows.contiguous();
    const int64_t* tok = tk.data_ptr<int64_t>();
    const int64_t* pos = ps.data_ptr<int64_t>();
    const int64_t* row = rw.data_ptr<int64_t>();
    int64_t max_pos = 0;
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(tok[b] >= 0 && tok[b] < V_, "FusedDecoder.step: token id ", tok[b], " is outside [0, ", V_, ")");
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cache_len_, "FusedDecoder.step: position ", pos[b], " is past the cache length ",
                  cache_len_);
      TORCH_CHECK(row[b] >= 0 && row[b] < cache_rows_, "FusedDecoder.step: cache row ", row[b], " is outside [0, ",
                  cache_rows_, ")");
      max_pos = std::max(max_pos, pos[b]);
    }
    at::Tensor logits = at::empty({n_out, 1, V_}, at::TensorOptions().dtype(at::kFloat));
    float* lg = logits.data_ptr<float>();
    const int64_t qd = H_ * hd_, kvd = KH_ * hd_, qkv = qd + 2 * kvd, kmax = std::max(F_, std::max(D_, qd));
    const int64_t g16 = (kmax / kGroup + 15) / 16 * 16, half = hd_ / 2;
    h_.assign(B * D_, 0.0f);
    qkv_.resize(B * qkv);
    y_.resize(B * qd);
    g_.resize(B * F_);
    top_.resize(n_out * k_);
    const int64_t score_len = (max_pos + 1 + 15) / 16 * 16;  // one head's scores (16 at a time)
    const int T = std::max(1, at::get_num_threads());
    if (static_cast<int>(scratch_.size()) < T) scratch_.resize(T);
    for (int t = 0; t < T; ++t) {
      Scratch& s = scratch_[t];
      s.xn.resize(B * kmax);
      s.tmp.resize(B * std::max(F_, std::max(qkv, D_)));
      s.tmp2.resize(B * F_);
      s.scores.resize((H_ / KH_) * score_len);
      s.cs.resize(B * hd_);
      s.q.resize(B * kmax);
      s.p.resize(B * kmax);
      s.scales.assign(B * g16, 0.0f);  // zero padding past each row's groups (the kernels read 16 at a time)
      s.sums.assign(B * g16, 0.0f);
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    // Rows of one sequence (a prompt chunk) read each other's keys/values: written in a phase of
    // their own, before a barrier. Otherwise each (row, kv head) writes its own and attends at once.
    bool shared_rows = false;
    {
      std::vector<int64_t> seen(row, row + B);
      std::sort(seen.begin(), seen.end());
      shared_rows = std::adjacent_find(seen.begin(), seen.end()) != seen.end();
    }
    const int64_t n_counters = static_cast<int64_t>(layers_.size());
    if (n_counters_ < n_counters) {
      counters_.reset(new Counter[n_counters]);
      n_counters_ = n_counters;
    }
    for (int64_t i = 0; i < n_counters; ++i) counters_[i].next.store(0, std::memory_order_relaxed);

#pragma omp parallel num_threads(T)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      // A matrix's output rows: a fixed share per thread, one sequential stream each (decode is
      // bound by memory bandwidth, and chunks handed out in turn would break the prefetch streams).
      auto rows_of = [&](int64_t N, const auto& f) {
        int64_t n0, n1;
        share(N, t, nt, n0, n1);
        if (n0 < n1) f(n0, n1);
      };
      Scratch& sc = scratch_[t];
      // M rows of K (stride K) quantized in the orders the kernels of `fmts` read (`Acts`)
      auto quantize = [&](const float* x, int64_t K, int64_t M, std::initializer_list<Fmt> fmts) -> Acts {
        bool blocks = false, grouped = false;
        for (const Fmt f : fmts) (row_tiles(f) ? grouped : blocks) = true;
        for (int64_t b = 0; b < M; ++b) {
          quantize_row(x + b * K, K, M, b, blocks ? sc.q.data() : nullptr, sc.scales.data() + b * g16, sc.sums.data() + b * g16,
                       grouped ? sc.p.data() : nullptr);
        }
        return Acts{sc.q.data(), sc.p.data(), sc.scales.data(), sc.sums.data(), K, g16, M,
                    grouped ? amx_acts(sc.p.data(), K, M, sc.amx) : nullptr};
      };
      auto norm_and_quantize = [&](const float* w, std::initializer_list<Fmt> fmts) -> Acts {
        for (int64_t b = 0; b < B; ++b) rms_norm(h_.data() + b * D_, w, D_, eps_, sc.xn.data() + b * D_);
        return quantize(sc.xn.data(), D_, B, fmts);
      };
      // RoPE angles of each row (the same in every layer): positions * inv_freq in fp32, as the model
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < half; ++i) {
          const float a = static_cast<float>(pos[b]) * inv_freq_[i];
          sc.cs[b * hd_ + i] = std::cos(a);
          sc.cs[b * hd_ + half + i] = std::sin(a);
        }
      }
      int64_t b0, b1;
      if (emb_ != nullptr) {
        share(B * D_, t, nt, b0, b1);
        for (int64_t i = b0; i < b1; ++i) {  // the embedding rows, bf16 -> fp32
          const int64_t b = i / D_, d = i % D_;
          uint32_t u = static_cast<uint32_t>(emb_[tok[b] * D_ + d]) << 16;
          std::memcpy(&h_[i], &u, 4);
        }
      } else {
        share(B, t, nt, b0, b1);
        for (int64_t b = b0; b < b1; ++b) weight_row(table_.W, tok[b], D_, h_.data() + b * D_);
      }
#pragma omp barrier
      for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& L = layers_[l];
        Counter& units = counters_[l];
        // q, k, v: one quantized input, the three matrices' rows split as one
        Acts a = norm_and_quantize(L.attn_norm, {L.wq.W.fmt, L.wk.W.fmt, L.wv.W.fmt});
        const Linear* segs[3] = {&L.wq, &L.wk, &L.wv};
        rows_of(qkv, [&](int64_t n0, int64_t n1) {
          int64_t off = 0;
          for (const Linear* sg : segs) {
            const int64_t s0 = std::max(n0, off) - off, s1 = std::min(n1, off + sg->N) - off;
            linear_rows(*sg, s0, s1, a, B, qkv_.data() + off, qkv);
            off += sg->N;
          }
        });
#pragma omp barrier
        // keys and values of the new tokens into the cache (keys rotated); attention, one query head
        // at a time
        auto write_kv = [&](int64_t b, int64_t j) {
          float* kr = qkv_.data() + b * qkv + qd + j * hd_;
          const float* vr = qkv_.data() + b * qkv + qd + kvd + j * hd_;
          rope(kr, sc.cs.data() + b * hd_, sc.cs.data() + b * hd_ + half, hd_);
          const int64_t at_ = ((row[b] * KH_ + j) * cache_len_ + pos[b]) * hd_;
          for (int64_t d = 0; d < hd_; ++d) {
            kc_[l][at_ + d] = to_bf16(kr[d]);
            vc_[l][at_ + d] = to_bf16(vr[d]);
          }
        };
        const int64_t group = H_ / KH_;
        auto attend = [&](int64_t b, int64_t j) {  // the query heads of kv head j, each key/value read once for all
          float* qr = qkv_.data() + b * qkv + j * group * hd_;
          for (int64_t h = 0; h < group; ++h) rope(qr + h * hd_, sc.cs.data() + b * hd_, sc.cs.data() + b * hd_ + half, hd_);
          const int64_t c0 = (row[b] * KH_ + j) * cache_len_ * hd_;
          attend_group(qr, group, kc_[l] + c0, vc_[l] + c0, pos[b] + 1, hd_, scale, sc.scores.data(), score_len,
                       y_.data() + b * qd + j * group * hd_);
        };
        if (shared_rows) {
          for (int64_t u = t; u < B * KH_; u += nt) write_kv(u / KH_, u % KH_);
#pragma omp barrier
          for_chunks(units, B * KH_, 1, [&](int64_t u, int64_t) { attend(u / KH_, u % KH_); });
        } else {  // each (row, kv head): its key/value, then the query heads that read them
          for_chunks(units, B * KH_, 1, [&](int64_t u, int64_t) {
            const int64_t b = u / KH_, j = u % KH_;
            write_kv(b, j);
            attend(b, j);
          });
        }
#pragma omp barrier
        // h += wo y
        a = quantize(y_.data(), qd, B, {L.wo.W.fmt});
        rows_of(D_, [&](int64_t n0, int64_t n1) {
          linear_rows(L.wo, n0, n1, a, B, sc.tmp.data(), D_);
          for (int64_t b = 0; b < B; ++b)
            for (int64_t n = n0; n < n1; ++n) h_[b * D_ + n] += sc.tmp[b * D_ + n];
        });
#pragma omp barrier
        // g = silu(w1 x) * (w3 x), this thread's rows of both
        a = norm_and_quantize(L.ffn_norm, {L.w1.W.fmt, L.w3.W.fmt});
        rows_of(F_, [&](int64_t n0, int64_t n1) {
          linear_rows(L.w1, n0, n1, a, B, sc.tmp.data(), F_);
          linear_rows(L.w3, n0, n1, a, B, sc.tmp2.data(), F_);
          for (int64_t b = 0; b < B; ++b) {
            for (int64_t n = n0; n < n1; n += 16) {
              using namespace simd;
              const vf x1 = load_n(sc.tmp.data() + b * F_ + n, n1 - n);
              const vf x3 = load_n(sc.tmp2.data() + b * F_ + n, n1 - n);
              const vf sig = div(x1, add(set1(1.0f), exp16(sub(zero(), x1))));
              store_n(g_.data() + b * F_ + n, mul(sig, x3), n1 - n);
            }
          }
        });
#pragma omp barrier
        // h += w2 g
        a = quantize(g_.data(), F_, B, {L.w2.W.fmt});
        rows_of(D_, [&](int64_t n0, int64_t n1) {
          linear_rows(L.w2, n0, n1, a, B, sc.tmp.data(), D_);
          for (int64_t b = 0; b < B; ++b)
            for (int64_t n = n0; n < n1; ++n) h_[b * D_ + n] += sc.tmp[b * D_ + n];
        });
#pragma omp barrier
      }
      // the vocabulary, for the rows that need logits: an int8 pass, then each row's top k
      // recomputed from the bf16 rows
      for (int64_t i = 0; i < n_out; ++i) rms_norm(h_.data() + out_rows[i] * D_, final_norm_, D_, eps_, sc.xn.data() + i * D_);
      Acts a = quantize(sc.xn.data(), D_, n_out, {out_.W.fmt});
      rows_of(V_, [&](int64_t n0, int64_t n1) { linear_rows(out_, n0, n1, a, n_out, lg, V_); });
#pragma omp barrier
      for (int64_t b = t; b < n_out; b += nt) {
        int64_t* top = top_.data() + b * k_;
        top_k(lg + b * V_, V_, k_, top);
        const float* x = sc.xn.data() + b * D_;
        for (int64_t j = 0; j < k_; ++j) {
          simd::vf acc = simd::zero();
          if (out_rows_ != nullptr) {
            const uint16_t* r = out_rows_ + top[j] * D_;
            for (int64_t d = 0; d < D_; d += 16) acc = simd::fmadd(simd::load_bf16(r + d), simd::load(x + d), acc);
          } else {
            float* r = sc.tmp.data();
            weight_row(out_.W, top[j], D_, r);
            for (int64_t d = 0; d < D_; d += 16) acc = simd::fmadd(simd::load(r + d), simd::load(x + d), acc);
          }
          lg[b * V_ + top[j]] = simd::reduce_add(acc);
        }
      }
    }
    if (B > kKeepScratchRows) release_scratch();  // a prompt's rows: do not keep ~40 KB per row resident
    return logits;
  }

 private:
  static constexpr int64_t kKeepScratchRows = 64;

  void release_scratch() {
    for (AlignedVector<float>* v : {&h_, &qkv_, &y_, &g_}) AlignedVector<float>().swap(*v);
    for (Scratch& sc : scratch_) {
      for (AlignedVector<float>* v : {&sc.xn, &sc.tmp, &sc.tmp2, &sc.scores, &sc.cs, &sc.scales, &sc.sums}) {
        AlignedVector<float>().swap(*v);
      }
      AlignedVector<int16_t>().swap(sc.q);
      AlignedVector<int16_t>().swap(sc.p);
      AlignedVector<int8_t>().swap(sc.amx);
    }
  }

  void check_f32(const at::Tensor& x, int64_t n, const char* what) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == n, "FusedDecoder: ", what,
                " must be ", n, " contiguous fp32 values");
  }

  Linear make_linear(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, int64_t N, int64_t K) {
    Linear L;
    L.N = N;
    L.K = K;
    const bool tiles = w.scalar_type() == at::kByte || a.dim() == 2;  // 4-bit, or int8 with group steps: whole row tiles
    const int64_t stored = tiles ? tile_padded(N) : N;
    TORCH_CHECK(w.is_contiguous() && a.is_contiguous() && w.dim() == 2 && w.size(0) == stored && K % 64 == 0,
                "FusedDecoder: a (", N, ", ", K, ") matrix was expected, got ", w.sizes());
    auto halves = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); };
    if (w.scalar_type() == at::kByte) {
      TORCH_CHECK(w.size(1) == K / 2 && a.scalar_type() == at::kHalf && b.scalar_type() == at::kHalf && b.is_contiguous() &&
                  a.numel() == stored * K / kGroup && b.numel() == stored * K / kGroup, "FusedDecoder: bad int4 matrix");
      L.W.fmt = Fmt::int4;
      L.W.w = w.data_ptr<uint8_t>();
      L.W.steps = halves(a);
      L.W.mins = halves(b);
    } else if (a.dim() == 2) {
      TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == K && a.scalar_type() == at::kHalf && a.size(0) == stored &&
                  a.size(1) == K / kGroup, "FusedDecoder: bad int8 matrix with group steps (row tiles)");
      L.W.fmt = Fmt::int8_groups;
      L.W.w = reinterpret_cast<const uint8_t*>(w.data_ptr<int8_t>());
      L.W.steps = halves(a);
    } else {
      TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == K && a.scalar_type() == at::kFloat && a.numel() == N,
                  "FusedDecoder: bad int8 matrix");
      L.W.fmt = Fmt::int8_rows;
      L.W.w = reinterpret_cast<const uint8_t*>(w.data_ptr<int8_t>());
      L.W.row_scales = a.data_ptr<float>();
    }
    return L;
  }

  int64_t H_, KH_, hd_;
  float eps_;
  int64_t k_;
  int64_t V_ = 0, D_ = 0, F_ = 0;
  const uint16_t* emb_ = nullptr;  // a bf16 table, or
  Linear table_;                   // a quantized one (4-bit, or int8 with group steps)
  const float* final_norm_ = nullptr;
  const float* inv_freq_ = nullptr;
  Linear out_;
  const uint16_t* out_rows_ = nullptr;  // bf16 rows to recompute the top logits from (null: out_'s own)
  std::vector<Layer> layers_;
  std::vector<uint16_t*> kc_, vc_;
  int64_t cache_rows_ = 0, cache_len_ = 0;
  std::vector<at::Tensor> keep_, caches_;  // what the raw pointers point into
  AlignedVector<float> h_, qkv_, y_, g_;
  std::vector<int64_t> top_;
  std::vector<Scratch> scratch_;
  std::unique_ptr<Counter[]> counters_;  // per step: each layer's attention units
  int64_t n_counters_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(inhouse, m) {
  m.class_<FusedDecoder>("FusedDecoder")
      .def(torch::init<int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, int64_t, int64_t>())
      .def("add_layer", &FusedDecoder::add_layer)
      .def("set_caches", &FusedDecoder::set_caches)
      .def("step", &FusedDecoder::step);
}
