// fmjax.native.attention: a training step's attention (scores, masked
// softmax, values) in one op, and its gradients in another (an XLA FFI
// handler each, built with kernels.cc into one library).
#include "common.h"

namespace ffi = xla::ffi;
using namespace fmjax_native;

namespace {

// Attention of a training step over projected keys and values (no cache):
// q [B, L, H, K] (scaled), k, v [B, S, G, K], mask [B, L, S] (uint8: 1
// keeps a key), H = G * Q, K = 16 KV (KV <= 4). One work item per (b, g),
// its Q query heads' L rows, so the gradients of (b, g)'s keys and values
// are one item's. Scores are made 16 keys at a time from a transposed copy
// of the item's keys; a row of outputs is held in KV vector registers.
constexpr float kMasked = -3.4028234663852886e+38f;  // float32's lowest

struct AttentionDims {
  int64_t B, L, H, K, S, G, Q;
  int64_t Sp() const { return (S + 15) / 16 * 16; }  // keys, padded
};


// t [K, Sp] = the item's rows [S, K] of x (stride G K), transposed, zero-padded.
void Transpose(const float* x, int64_t stride, const AttentionDims& d, float* t) {
  const int64_t sp = d.Sp();
  std::fill(t, t + d.K * sp, 0.0f);
  for (int64_t k = 0; k < d.K; ++k)  // t written in order, x read down columns
    for (int64_t s = 0; s < d.S; ++s) t[k * sp + s] = x[s * stride + k];
}

// rows[r, 0:Sp] = a[r, 0:K] . t[:, s] for every s (t from Transpose) and
// each of `n` rows r (a's rows `a_stride` apart, the results `row_stride`):
// blocks of RB rows and SV vectors of keys keep RB x SV accumulators.
template <int RB, int SV>
void ScoresBlock(const float* a, int64_t a_stride, const float* t, int64_t K,
                 int64_t sp, int64_t s, float* rows, int64_t row_stride) {
  v16 acc[RB][SV] = {};
  for (int64_t k = 0; k < K; ++k) {
    v16 tk[SV];
    for (int j = 0; j < SV; ++j) tk[j] = Load(t + k * sp + s + 16 * j);
    for (int r = 0; r < RB; ++r) {
      const float ark = a[r * a_stride + k];
      for (int j = 0; j < SV; ++j) acc[r][j] += ark * tk[j];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < SV; ++j) Store(rows + r * row_stride + s + 16 * j, acc[r][j]);
}

template <int RB>
void ScoresRows(const float* a, int64_t a_stride, const float* t, int64_t K,
                int64_t sp, float* rows, int64_t row_stride) {
  int64_t s = 0;
  for (; s + 32 <= sp; s += 32)
    ScoresBlock<RB, 2>(a, a_stride, t, K, sp, s, rows, row_stride);
  if (s < sp) ScoresBlock<RB, 1>(a, a_stride, t, K, sp, s, rows, row_stride);
}

void Scores(const float* a, int64_t a_stride, int64_t n, const float* t,
            int64_t K, int64_t sp, float* rows, int64_t row_stride) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4)
    ScoresRows<4>(a + r * a_stride, a_stride, t, K, sp, rows + r * row_stride,
                  row_stride);
  for (; r < n; ++r)
    ScoresRows<1>(a + r * a_stride, a_stride, t, K, sp, rows + r * row_stride,
                  row_stride);
}

// out[o, 0:K] (+)= sum_i w[o * wo + i * wi] x[i * xs : + K] for each of
// `m` outputs o (`out_stride` apart) and n terms i: blocks of RB outputs
// and the K / 16 = KV vectors of a row keep RB x KV accumulators.
template <int RB, int KV>
void WeightedBlock(const float* w, int64_t wo, int64_t wi, const float* x,
                   int64_t xs, int64_t n, float* out, int64_t out_stride,
                   bool add) {
  v16 acc[RB][KV] = {};
  if (add)
    for (int o = 0; o < RB; ++o)
      for (int j = 0; j < KV; ++j) acc[o][j] = Load(out + o * out_stride + 16 * j);
  for (int64_t i = 0; i < n; ++i) {
    v16 xi[KV];
    for (int j = 0; j < KV; ++j) xi[j] = Load(x + i * xs + 16 * j);
    for (int o = 0; o < RB; ++o) {
      const float weight = w[o * wo + i * wi];
      for (int j = 0; j < KV; ++j) acc[o][j] += weight * xi[j];
    }
  }
  for (int o = 0; o < RB; ++o)
    for (int j = 0; j < KV; ++j) Store(out + o * out_stride + 16 * j, acc[o][j]);
}

template <int KV>
void WeightedOf(const float* w, int64_t wo, int64_t wi, const float* x,
                int64_t xs, int64_t n, float* out, int64_t out_stride,
                int64_t m, bool add) {
  int64_t o = 0;
  for (; o + 4 <= m; o += 4)
    WeightedBlock<4, KV>(w + o * wo, wo, wi, x, xs, n, out + o * out_stride,
                         out_stride, add);
  for (; o < m; ++o)
    WeightedBlock<1, KV>(w + o * wo, wo, wi, x, xs, n, out + o * out_stride,
                         out_stride, add);
}

using WeightedFn = void (*)(const float*, int64_t, int64_t, const float*,
                            int64_t, int64_t, float*, int64_t, int64_t, bool);
constexpr WeightedFn kWeighted[5] = {nullptr, WeightedOf<1>, WeightedOf<2>,
                                     WeightedOf<3>, WeightedOf<4>};

// p[0:S] = softmax of the row's scores (masked ones kMasked), as
// fmjax.models.attention.softmax computes it: exp(x - max) / sum.
void Softmax(float* p, const uint8_t* keep, const AttentionDims& d) {
  typedef uint8_t vu8 __attribute__((vector_size(16)));
  const int64_t sp = d.Sp();
  v16 top = v16{} + kMasked;
  for (int64_t s = 0; s < sp; s += 16) {
    vu8 k8{};
    std::memcpy(&k8, keep + s, std::min<int64_t>(16, d.S - s));
    const vi16 kept = __builtin_convertvector(k8, vi16) != 0;
    const v16 x = kept ? Load(p + s) : v16{} + kMasked;  // the padding too
    Store(p + s, x);
    top = top > x ? top : x;
  }
  float most = kMasked;
  for (int i = 0; i < 16; ++i) most = std::max(most, top[i]);
  v16 total{};
  for (int64_t s = 0; s < sp; s += 16) {
    const v16 x = Lanes(Exp(Load(p + s) - most), d.S - s);  // 0 in the padding
    total += x;
    Store(p + s, x);
  }
  const v16 sum = v16{} + Sum(total);
  for (int64_t s = 0; s < sp; s += 16) Store(p + s, Load(p + s) / sum);
}

AttentionDims Dims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  return {qd[0], qd[1], qd[2], qd[3], kd[1], kd[2], qd[2] / kd[2]};
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::U8> mask,
                            ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> probs) {
  const AttentionDims d = Dims(q, k);
  if (d.K % 16 || d.K > 64 || d.H % d.G) {
    return ffi::Error::InvalidArgument("attention: expected K = 16, 32, 48 or 64");
  }
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const uint8_t* mp = mask.typed_data();
  float *op = out->typed_data(), *pp = probs->typed_data();
  const WeightedFn weighted = kWeighted[d.K / 16];
  return ForEachN(pool, d.B * d.G, [=](int64_t item) {
    const int64_t b = item / d.G, g = item % d.G, sp = d.Sp();
    thread_local std::vector<float> keys_t, rows;
    keys_t.resize(d.K * sp);
    rows.resize(d.L * sp);
    const float* values = vp + (b * d.S * d.G + g) * d.K;
    Transpose(kp + (b * d.S * d.G + g) * d.K, d.G * d.K, d, keys_t.data());
    for (int64_t h = g * d.Q; h < (g + 1) * d.Q; ++h) {
      const int64_t at = b * d.L * d.H + h;  // (b, l = 0, h); l is H K apart
      Scores(qp + at * d.K, d.H * d.K, d.L, keys_t.data(), d.K, sp, rows.data(), sp);
      for (int64_t l = 0; l < d.L; ++l) {
        Softmax(rows.data() + l * sp, mp + (b * d.L + l) * d.S, d);
        std::memcpy(pp + ((b * d.H + h) * d.L + l) * d.S, rows.data() + l * sp,
                    d.S * sizeof(float));
      }
      weighted(rows.data(), sp, 1, values, d.G * d.K, d.S, op + at * d.K,
               d.H * d.K, d.L, false);
    }
  });
}

ffi::Error AttentionBackward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> mask,
    ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> dout,
    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
    ffi::ResultBuffer<ffi::F32> dv) {
  const AttentionDims d = Dims(q, k);
  if (d.K % 16 || d.K > 64 || d.H % d.G) {
    return ffi::Error::InvalidArgument("attention: expected K = 16, 32, 48 or 64");
  }
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *pp = probs.typed_data(), *gp = dout.typed_data();
  const uint8_t* mp = mask.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const WeightedFn weighted = kWeighted[d.K / 16];
  return ForEachN(pool, d.B * d.G, [=](int64_t item) {
    const int64_t b = item / d.G, g = item % d.G, sp = d.Sp();
    const int64_t kv = d.G * d.K, qk = d.H * d.K;
    thread_local std::vector<float> values_t, dscores;
    values_t.resize(d.K * sp);
    dscores.resize(d.L * sp);
    const float* keys = kp + (b * d.S * d.G + g) * d.K;
    float* dkeys = dkp + (b * d.S * d.G + g) * d.K;
    float* dvalues = dvp + (b * d.S * d.G + g) * d.K;
    Transpose(vp + (b * d.S * d.G + g) * d.K, kv, d, values_t.data());
    for (int64_t h = g * d.Q; h < (g + 1) * d.Q; ++h) {
      const int64_t at = b * d.L * d.H + h;  // (b, l = 0, h); l is H K apart
      const float* probs_h = pp + (b * d.H + h) * d.L * d.S;  // [L, S]
      // dprobs = dout . values, then the scores' gradient in place
      Scores(gp + at * d.K, qk, d.L, values_t.data(), d.K, sp, dscores.data(), sp);
      for (int64_t l = 0; l < d.L; ++l) {
        const float* p = probs_h + l * d.S;
        const uint8_t* keep = mp + (b * d.L + l) * d.S;
        float* ds = dscores.data() + l * sp;
        float weighted_sum = 0.0f;  // the softmax's own term: sum_s p dp
        for (int64_t s = 0; s < d.S; ++s) weighted_sum += p[s] * ds[s];
        for (int64_t s = 0; s < d.S; ++s)  // a masked score is a constant
          ds[s] = keep[s] ? p[s] * (ds[s] - weighted_sum) : 0.0f;
      }
      const bool add = h > g * d.Q;  // the group's later heads add theirs
      weighted(dscores.data(), sp, 1, keys, kv, d.S, dqp + at * d.K, qk, d.L, false);
      weighted(dscores.data(), 1, sp, qp + at * d.K, qk, d.L, dkeys, kv, d.S, add);
      weighted(probs_h, 1, d.S, gp + at * d.K, qk, d.L, dvalues, kv, d.S, add);
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
