// Shared by the CPU kernels: work split over XLA's intra-op thread pool.
#ifndef BATQUANT_JAX_CSRC_PARALLEL_H_
#define BATQUANT_JAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace batquant {

// Runs f(begin, end) over [0, n) in chunks of `grain`, on the calling thread and XLA's
// intra-op pool. Chunks are claimed from a shared counter, so the calling thread finishes the
// work alone when no pool thread is free; a pool task that starts late finds no chunk left.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t grain, const F& f) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(pool.num_threads(), chunks);
  if (threads <= 1) {
    f(int64_t{0}, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  const F* body = &f;  // only dereferenced for a claimed chunk, i.e. before this call returns
  auto work = [shared, body, n, grain, chunks]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      (*body)(c * grain, std::min(n, (c + 1) * grain));
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work]() { work(); });
  work();
  while (shared->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Rows (or blocks) of k elements per chunk: about 64k elements, so that small work stays on
// one thread.
inline int64_t grain_rows(int64_t k) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(k, 1));
}

}  // namespace batquant

#endif  // BATQUANT_JAX_CSRC_PARALLEL_H_
