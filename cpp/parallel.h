// parallel_for over an index range: on OpenMP threads where the core is built with OpenMP, else on a persistent
// pool of std::threads.
//
// The caller passes the thread count (the Python layer passes torch.get_num_threads()), so the core follows
// torch's setting. OpenMP is GNU's libgomp.so.1, linked by soname: in a process that imported torch first it is
// torch's own copy, already loaded (one runtime, no second thread team), so our regions and torch's take turns on
// the same threads; a pool of our own would wake while torch's OpenMP threads still spin after each of its ops
// and fight them for the cores (measured with the AVX2 MSDA kernels, in-process A/B: the decoder's forward
// 1.5x and forward + backward 1.3x slower that way; the encoder, with more work per call, within 5 %). A process
// forked from one that loaded the core uses the pool (GNU OpenMP hangs in such a child), which starts fresh there.
// A parallel_for issued from inside a worker or an OpenMP region runs serially on that thread. An exception thrown
// by any chunk is rethrown on the caller.
#pragma once
#include <cstdint>
#include <functional>

namespace detrcore {

// Calls fn(begin, end) over disjoint chunks covering [0, n), with chunks of at least `grain` indices, on up
// to `num_threads` threads (the caller included). Chunk boundaries depend only on n, grain and num_threads.
void parallel_for(int64_t n, int64_t grain, int num_threads, const std::function<void(int64_t, int64_t)>& fn);

// Calls fn(i) for every i in [0, n) on up to `num_threads` threads, handing out one index at a time (for
// items of very different cost, such as the matrices of a batched assignment).
void parallel_for_each(int64_t n, int num_threads, const std::function<void(int64_t)>& fn);

// True when parallel_for runs on OpenMP threads in this process (built with OpenMP, not a forked child).
bool parallel_uses_openmp();

// The number of chunks parallel_for(n, grain, num_threads, ...) will use, and chunk c's [begin, end).
int64_t parallel_chunks(int64_t n, int64_t grain, int num_threads);
inline int64_t chunk_begin(int64_t n, int64_t chunks, int64_t c) { return n * c / chunks; }

}  // namespace detrcore
