// Shared by fmjax.native's kernels (kernels.cc, attention.cc): 16-lane
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

inline v16 Load(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof(v16));
  return x;
}
inline void Store(float* p, v16 x) { std::memcpy(p, &x, sizeof(v16)); }

inline float Sum(v16 a) {
  float lanes[16];
  std::memcpy(lanes, &a, sizeof(v16));
  float total = 0.0f;
  for (int i = 0; i < 16; ++i) total += lanes[i];
  return total;
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
