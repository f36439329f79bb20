// fmjax's CPU kernels for what XLA:CPU's libraries do slowly (fmjax.native):
// XLA FFI handlers, built on first use with the machine's C++ compiler.
//
// FmjaxRowsGemm: out[M, N] = x[M, K] @ W, where W [K, N] is stored packed as
// panels [ceil(N / 32), K, 32] (column block p holds W[:, 32p : 32p + 32],
// the columns past N zero): each panel is one contiguous run of memory, read
// once for every 8 rows of x. For each k, a row's 32 outputs take one
// broadcast of x[m, k] and two fused multiply-adds of 16 lanes, so 8 rows
// keep 16 accumulators in registers and the weights stream through once,
// where a library product packs the weights again on every call (what
// bounded decoding at 2-8 rows: docs/benchmarks.md). Every output sums its
// K products in order of k, one rounding per multiply-add.
//
// FmjaxCacheScores, FmjaxCacheValues: decoding attention's two products
// over a KV cache. A training step's attention: attention.cc.
//
// Work is shared out to the threads of XLA's intra-op pool (ForEachN).
#include "common.h"

namespace ffi = xla::ffi;
using namespace fmjax_native;

namespace {

constexpr int64_t kPanel = 32;  // columns per panel
constexpr int64_t kRows = 8;    // rows per pass over a panel

template <int M>
void RowBlock(const float* x, const float* panel, float* out, int64_t K,
              int64_t N, int64_t n0) {
  v16 acc0[M], acc1[M];
  for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    v16 w0, w1;
    std::memcpy(&w0, panel + k * kPanel, sizeof(v16));
    std::memcpy(&w1, panel + k * kPanel + 16, sizeof(v16));
    for (int m = 0; m < M; ++m) {
      const float xv = x[m * K + k];
      acc0[m] += xv * w0;
      acc1[m] += xv * w1;
    }
  }
  const int64_t cols = std::min(kPanel, N - n0);
  for (int m = 0; m < M; ++m) {
    float row[kPanel];
    std::memcpy(row, &acc0[m], sizeof(v16));
    std::memcpy(row + 16, &acc1[m], sizeof(v16));
    std::memcpy(out + m * N + n0, row, cols * sizeof(float));
  }
}

using RowBlockFn = void (*)(const float*, const float*, float*, int64_t,
                            int64_t, int64_t);
constexpr RowBlockFn kRowBlocks[kRows + 1] = {
    nullptr,     RowBlock<1>, RowBlock<2>, RowBlock<3>, RowBlock<4>,
    RowBlock<5>, RowBlock<6>, RowBlock<7>, RowBlock<8>};

void Panels(const float* x, const float* w, float* out, int64_t M, int64_t K,
            int64_t N, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int64_t rows = std::min(kRows, M - m0);
      kRowBlocks[rows](x + m0 * K, w + p * K * kPanel, out + m0 * N, K, N,
                       p * kPanel);
    }
  }
}

ffi::Error RowsGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "rows_gemm: expected x [M, K], panels [P, K, 32], out [M, N]");
  }
  const int64_t M = xd[0], K = xd[1], P = wd[0], N = yd[1];
  if (wd[1] != K || wd[2] != kPanel || yd[0] != M ||
      (N + kPanel - 1) / kPanel != P) {
    return ffi::Error::InvalidArgument("rows_gemm: shapes do not match");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Several chunks per thread, so that one held up by the machine does not
  // hold up the product.
  const int64_t chunk = std::max<int64_t>(1, P / (threads * 16));
  const int64_t chunks = (P + chunk - 1) / chunk;
  return ForEachN(pool, chunks, [=](int64_t c) {
    Panels(xp, wp, yp, M, K, N, c * chunk, std::min(P, (c + 1) * chunk));
  });
}


// Decoding attention over a KV cache [N, S, K] (N = batch x key heads) for
// the R = L x Q queries of each n (one new token, Q query heads per key
// head): scores[n, r, s] = q[n, r, :] . keys[n, s, :] and
// out[n, r, :] = sum_s probs[n, r, s] values[n, s, :]. XLA:CPU runs these
// batched matrix-vector products on one thread; here the n are shared out.
ffi::Error CacheScores(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                       ffi::Buffer<ffi::F32> keys,
                       ffi::ResultBuffer<ffi::F32> scores) {
  const auto qd = q.dimensions(), kd = keys.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || qd[0] != kd[0] || qd[2] != kd[2] ||
      qd[2] % 16) {
    return ffi::Error::InvalidArgument(
        "cache_scores: expected q [N, R, K], keys [N, S, K], K % 16 == 0");
  }
  const int64_t N = qd[0], R = qd[1], S = kd[1], K = qd[2];
  const float* qp = q.typed_data();
  const float* kp = keys.typed_data();
  float* out = scores->typed_data();
  return ForEachN(pool, N, [=](int64_t n) {
    for (int64_t s = 0; s < S; ++s) {
      const float* key = kp + (n * S + s) * K;
      for (int64_t r = 0; r < R; ++r) {
        const float* query = qp + (n * R + r) * K;
        v16 acc{};
        for (int64_t k = 0; k < K; k += 16) {
          v16 a, b;
          std::memcpy(&a, query + k, sizeof(v16));
          std::memcpy(&b, key + k, sizeof(v16));
          acc += a * b;
        }
        out[(n * R + r) * S + s] = Sum(acc);
      }
    }
  });
}

ffi::Error CacheValues(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> probs,
                       ffi::Buffer<ffi::F32> values,
                       ffi::ResultBuffer<ffi::F32> out) {
  const auto pd = probs.dimensions(), vd = values.dimensions();
  if (pd.size() != 3 || vd.size() != 3 || pd[0] != vd[0] || pd[2] != vd[1] ||
      vd[2] % 16) {
    return ffi::Error::InvalidArgument(
        "cache_values: expected probs [N, R, S], values [N, S, K], K % 16 == 0");
  }
  const int64_t N = pd[0], R = pd[1], S = pd[2], K = vd[2];
  const float* pp = probs.typed_data();
  const float* vp = values.typed_data();
  float* op = out->typed_data();
  return ForEachN(pool, N, [=](int64_t n) {
    for (int64_t r = 0; r < R; ++r) {
      const float* p = pp + (n * R + r) * S;
      for (int64_t k0 = 0; k0 < K; k0 += 64) {  // 4 vectors of the row at once
        const int64_t width = std::min<int64_t>(64, K - k0) / 16;
        v16 acc[4] = {};
        for (int64_t s = 0; s < S; ++s) {
          const float* value = vp + (n * S + s) * K + k0;
          const float weight = p[s];
          for (int64_t j = 0; j < width; ++j) {
            v16 v;
            std::memcpy(&v, value + 16 * j, sizeof(v16));
            acc[j] += weight * v;
          }
        }
        std::memcpy(op + (n * R + r) * K + k0, acc, width * sizeof(v16));
      }
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxRowsGemm, RowsGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxCacheScores, CacheScores,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxCacheValues, CacheValues,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
