// fmjax.native.layer_norm and fmjax.native.activation: a training step's
// layer norms and MLP activations with their gradients, one op each way
// (XLA FFI handlers, built with kernels.cc into one library). XLA:CPU runs
// these as several small fusions each (a norm's statistics, its scale and
// shift, its parameters' gradients reduced down columns; an exact GELU's
// erf and its product, its gradient's exp), most on one thread.
#include <cmath>

#include "common.h"

namespace ffi = xla::ffi;
using namespace fmjax_native;

namespace {

constexpr int64_t kChunk = 16384;  // elements of one work item

// Rows per work item: a whole number of rows near kChunk elements. It
// depends on the shape only, so the parameters' gradients, summed per item
// and then over items in order, are the same however threads share items.
int64_t RowsPerItem(int64_t D) { return std::max<int64_t>(1, kChunk / D); }

// y = (x - mean) / sqrt(var + epsilon) * scale + bias over each row of x
// [R, D] (var the biased variance); mean and rstd [R] kept for the backward.
ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            float epsilon, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd) {
  const auto dims = x.dimensions();
  const int64_t R = dims[0], D = dims[1], per = RowsPerItem(D);
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  return ForEachN(pool, (R + per - 1) / per, [=](int64_t item) {
    for (int64_t r = item * per; r < std::min(R, (item + 1) * per); ++r) {
      const float* row = xp + r * D;
      v16 total{};
      for (int64_t i = 0; i < D; i += 16) total += LoadN(row + i, D - i);
      const float mu = Sum(total) / D;
      v16 squares{};
      for (int64_t i = 0; i < D; i += 16) {
        const v16 c = Lanes(LoadN(row + i, D - i) - mu, D - i);
        squares += c * c;
      }
      const float r_std = 1.0f / std::sqrt(Sum(squares) / D + epsilon);
      for (int64_t i = 0; i < D; i += 16) {
        const v16 c = (LoadN(row + i, D - i) - mu) * r_std;
        StoreN(yp + r * D + i, c * LoadN(sp + i, D - i) + LoadN(bp + i, D - i), D - i);
      }
      mp[r] = mu;
      rp[r] = r_std;
    }
  });
}

// dx, dscale, dbias of LayerNormForward given dy: with h = (x - mean) rstd
// and g = dy scale, dx = rstd (g - mean(g) - h mean(g h)); dscale and dbias
// sum dy h and dy over rows (per work item, then the items in order).
ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                             ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dbias) {
  const auto dims = x.dimensions();
  const int64_t R = dims[0], D = dims[1], per = RowsPerItem(D);
  const int64_t items = (R + per - 1) / per, Dp = (D + 15) / 16 * 16;
  const float *xp = x.typed_data(), *sp = scale.typed_data();
  const float *mp = mean.typed_data(), *rp = rstd.typed_data(), *gp = dy.typed_data();
  float* dxp = dx->typed_data();
  std::vector<float> partial(items * 2 * Dp, 0.0f);  // [item, (dscale, dbias), Dp]
  float* pp = partial.data();
  ffi::Error error = ForEachN(pool, items, [=](int64_t item) {
    float* dscale_part = pp + item * 2 * Dp;
    float* dbias_part = dscale_part + Dp;
    for (int64_t r = item * per; r < std::min(R, (item + 1) * per); ++r) {
      const float *row = xp + r * D, *g_row = gp + r * D;
      const float mu = mp[r], r_std = rp[r];
      v16 g_total{}, gh_total{};
      for (int64_t i = 0; i < D; i += 16) {
        const v16 h = (LoadN(row + i, D - i) - mu) * r_std;
        const v16 g_out = LoadN(g_row + i, D - i);
        const v16 g = g_out * LoadN(sp + i, D - i);  // 0 in the padding
        g_total += g;
        gh_total += g * h;
        Store(dscale_part + i, Load(dscale_part + i) + g_out * h);
        Store(dbias_part + i, Load(dbias_part + i) + g_out);
      }
      const float g_mean = Sum(g_total) / D, gh_mean = Sum(gh_total) / D;
      for (int64_t i = 0; i < D; i += 16) {
        const v16 h = (LoadN(row + i, D - i) - mu) * r_std;
        const v16 g = LoadN(g_row + i, D - i) * LoadN(sp + i, D - i);
        StoreN(dxp + r * D + i, (g - g_mean - h * gh_mean) * r_std, D - i);
      }
    }
  });
  if (error.failure()) return error;
  float *dsp = dscale->typed_data(), *dbp = dbias->typed_data();
  for (int64_t i = 0; i < D; ++i) dsp[i] = dbp[i] = 0.0f;
  for (int64_t item = 0; item < items; ++item)
    for (int64_t i = 0; i < D; ++i) {
      dsp[i] += pp[item * 2 * Dp + i];
      dbp[i] += pp[item * 2 * Dp + Dp + i];
    }
  return ffi::Error::Success();
}

enum Kind { kGelu = 0, kGeluTanh = 1, kQuickGelu = 2 };

// The activation y(x) and, where `slope` is given, y'(x) there too.
// Exact GELU, x Phi(x): Phi from erf as Abramowitz and Stegun's 7.1.26
// (|error| <= 1.5e-7), whose exp(-x^2 / 2) is also the density phi(x) in
// y' = Phi(x) + x phi(x); for x < 0, Phi is the small term itself, so no
// digits cancel in the tail.
template <int kind>
inline v16 Activation(v16 x, v16* slope) {
  if (kind == kGelu) {
    const v16 z = (x < 0.0f ? -x : x) * 0.70710678118654752f;
    const v16 t = 1.0f / (1.0f + 0.3275911f * z);
    v16 poly = t * 1.061405429f - 1.453152027f;
    poly = (poly * t + 1.421413741f) * t - 0.284496736f;
    poly = (poly * t + 0.254829592f) * t;
    const v16 e = Exp(-0.5f * x * x);
    const v16 tail = 0.5f * poly * e;  // Phi(-|x|)
    const v16 cdf = x < 0.0f ? tail : 1.0f - tail;
    if (slope) *slope = cdf + x * 0.39894228040143268f * e;
    return x * cdf;
  }
  if (kind == kGeluTanh) {  // x (1 + tanh(u)) / 2, u = c (x + 0.044715 x^3)
    const v16 u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    const v16 th = 1.0f - 2.0f / (Exp(2.0f * u) + 1.0f);
    if (slope) {
      const v16 du = 0.79788456080286536f * (1.0f + 0.134145f * x * x);
      *slope = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
    }
    return 0.5f * x * (1.0f + th);
  }
  const v16 s = 1.0f / (1.0f + Exp(-1.702f * x));  // x sigmoid(1.702 x)
  if (slope) *slope = s + 1.702f * x * s * (1.0f - s);
  return x * s;
}

template <int kind>
ffi::Error Pointwise(ffi::ThreadPool& pool, const float* x, float* y,
                     float* slope, int64_t n) {
  return ForEachN(pool, (n + kChunk - 1) / kChunk, [=](int64_t item) {
    for (int64_t i = item * kChunk; i < std::min(n, (item + 1) * kChunk); i += 16) {
      v16 d;
      StoreN(y + i, Activation<kind>(LoadN(x + i, n - i), slope ? &d : nullptr), n - i);
      if (slope) StoreN(slope + i, d, n - i);
    }
  });
}

ffi::Error Dispatch(ffi::ThreadPool& pool, int32_t kind, const float* x, float* y,
                    float* slope, int64_t n) {
  if (kind == kGelu) return Pointwise<kGelu>(pool, x, y, slope, n);
  if (kind == kGeluTanh) return Pointwise<kGeluTanh>(pool, x, y, slope, n);
  if (kind == kQuickGelu) return Pointwise<kQuickGelu>(pool, x, y, slope, n);
  return ffi::Error::InvalidArgument("activation: expected kind 0, 1 or 2");
}

// y = activation(x).
ffi::Error ActivationForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             int32_t kind, ffi::ResultBuffer<ffi::F32> y) {
  return Dispatch(pool, kind, x.typed_data(), y->typed_data(), nullptr,
                  x.element_count());
}

// y and its slope y'(x), which is all the backward pass needs (dx = dy y').
ffi::Error ActivationSlope(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           int32_t kind, ffi::ResultBuffer<ffi::F32> y,
                           ffi::ResultBuffer<ffi::F32> slope) {
  return Dispatch(pool, kind, x.typed_data(), y->typed_data(), slope->typed_data(),
                  x.element_count());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxActivationForward, ActivationForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("kind")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmjaxActivationSlope, ActivationSlope,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("kind")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
