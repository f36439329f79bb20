// Shared by fmjax.native's kernels (kernels.cc, attention.cc, pointwise.cc): 16-lane
// float vectors and the loop that shares work out to XLA's intra-op threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace fmjax_native {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));
typedef int vi16 __attribute__((vector_size(64)));

inline v16 Load(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof(v16));
  return x;
}
inline void Store(float* p, v16 x) { std::memcpy(p, &x, sizeof(v16)); }

// The first n <= 16 lanes of p (the others 0), and their store back.
inline v16 LoadN(const float* p, int64_t n) {
  if (n >= 16) return Load(p);
  v16 x{};
  std::memcpy(&x, p, n * sizeof(float));
  return x;
}
// x with the lanes from n on zeroed.
inline v16 Lanes(v16 x, int64_t n) {
  if (n >= 16) return x;
  const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane < static_cast<float>(n) ? x : v16{};
}
inline void StoreN(float* p, v16 x, int64_t n) {
  if (n >= 16) return Store(p, x);
  std::memcpy(p, &x, n * sizeof(float));
}

// The sum of the 16 lanes, halving the vector each step (four dependent
// adds, not sixteen).
inline float Sum(v16 a) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 lo8, hi8;
  std::memcpy(&lo8, &a, sizeof(v8));
  std::memcpy(&hi8, reinterpret_cast<const char*>(&a) + sizeof(v8), sizeof(v8));
  const v8 s8 = lo8 + hi8;
  v4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof(v4));
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof(v4), sizeof(v4));
  const v4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// exp(x) for 16 lanes: x = n ln2 + r, n rounded to nearest by adding
// 1.5 * 2^23 (its low bits then hold n), Cephes' degree-6 polynomial for
// expf on r (about 1 ulp), 2^n made from n's bits; below -87.3 it gives 0.
inline v16 Exp(v16 x) {
  const v16 hi = v16{} + 88.3762626647949f, lo = v16{} - 87.3365447504f;
  x = x > hi ? hi : x;
  const vi16 under = x < lo;
  x = x < lo ? lo : x;
  const v16 shifted = x * 1.44269504088896341f + 12582912.0f;
  const v16 nf = shifted - 12582912.0f;
  x = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  v16 y = v16{} + 1.9875691500E-4f;
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.0f;
  vi16 bits;
  std::memcpy(&bits, &shifted, sizeof(v16));
  bits = (bits - 0x4B400000 + 127) << 23;  // 0x4B400000: 1.5 * 2^23's bits
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(v16));
  return under ? v16{} : y * scale;
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// one(i) for i in [0, count), shared out to the threads of XLA's pool;
// helpers that start after the last i was taken find nothing to do, and
// the shared counters outlive this call for them.
template <typename F>
ffi::Error ForEachN(ffi::ThreadPool& pool, int64_t n_total, F&& one) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads == 1 || n_total == 1) {
    for (int64_t n = 0; n < n_total; ++n) one(n);
    return ffi::Error::Success();
  }
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    for (int64_t n; (n = progress->next.fetch_add(1)) < n_total;) {
      one(n);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min(threads, n_total) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < n_total) Pause();
  return ffi::Error::Success();
}

}  // namespace fmjax_native
