#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(DETRCORE_WITH_OPENMP)
#include <omp.h>
#endif

namespace detrcore {
namespace {

thread_local bool t_in_worker = false;

struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::exception_ptr error;
  std::mutex error_mutex;

  // Claims and runs chunks until none is left; returns after its last claimed chunk finishes.
  void run_chunks() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      try {
        (*fn)(chunk_begin(n, chunks, c), chunk_begin(n, chunks, c + 1));
      } catch (...) {
        std::lock_guard<std::mutex> g(error_mutex);
        if (!error) error = std::current_exception();
      }
      done.fetch_add(1);
    }
  }
};

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // Returns false (and runs nothing) when another thread is using the pool; the caller then runs serially.
  bool run(Job& job, int num_threads) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(num_threads - 1);
    {
      std::lock_guard<std::mutex> g(mutex_);
      job_ = &job;
      ++generation_;
    }
    wake_.notify_all();
    job.run_chunks();
    std::unique_lock<std::mutex> g(mutex_);
    finished_.wait(g, [&] { return job.done.load() == job.chunks && active_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void grow(int want) {
    while (static_cast<int>(workers_.size()) < want) workers_.emplace_back([this] { loop(); });
  }

  void loop() {
    t_in_worker = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> g(mutex_);
    for (;;) {
      wake_.wait(g, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      Job* job = job_;
      if (!job) continue;
      ++active_;
      g.unlock();
      job->run_chunks();
      g.lock();
      --active_;
      finished_.notify_all();
    }
  }

  std::mutex busy_;   // one parallel_for at a time
  std::mutex mutex_;  // guards everything below
  std::condition_variable wake_, finished_;
  std::vector<std::thread> workers_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0;
  bool stop_ = false;
};

std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_mutex;
// True in a process forked from the one that loaded us. GNU OpenMP's thread pool does not survive fork(): a
// parallel region in the child waits forever for the parent's threads (torch's own ops hang there the same
// way), so a forked child uses our pool instead.
std::atomic<bool> g_forked{false};

#if defined(__unix__) || defined(__APPLE__)
// After fork() the child has none of the parent's threads; abandon (leak) the parent's pool object, whose
// mutexes may be held, and let the child build its own on first use.
void after_fork_in_child() {
  g_pool.store(nullptr);
  g_forked.store(true);
}
// Registered when the library loads, not on first use: the parent may have run OpenMP regions (torch's) before
// it ever calls us.
const bool g_atfork_registered = (pthread_atfork(nullptr, nullptr, after_fork_in_child), true);
#endif

Pool& pool() {
  Pool* p = g_pool.load();
  if (p) return *p;
  std::lock_guard<std::mutex> g(g_pool_mutex);
  p = g_pool.load();
  if (!p) {
    p = new Pool();  // lives for the process; never destroyed (workers may outlive static destructors)
    g_pool.store(p);
  }
  return *p;
}

// Runs the job's chunks on up to `threads` threads. OpenMP first, where it is built in: in a process that also
// runs torch it is the same runtime (libgomp.so.1, loaded once) and the same threads torch's own ops use, so
// the two take turns on the cores instead of our workers competing with torch's spinning ones. Our pool
// otherwise; serially on the caller from inside a worker or an OpenMP region.
void run_job(Job& job, int threads) {
  if (threads > 1 && !t_in_worker) {
#if defined(DETRCORE_WITH_OPENMP)
    if (omp_in_parallel()) return job.run_chunks();
    if (!g_forked.load(std::memory_order_relaxed)) {
#pragma omp parallel num_threads(threads)
      {
        t_in_worker = true;
        job.run_chunks();
        t_in_worker = false;
      }
      return;
    }
#endif
    if (pool().run(job, threads)) return;
  }
  job.run_chunks();
}

}  // namespace

bool parallel_uses_openmp() {
#if defined(DETRCORE_WITH_OPENMP)
  return !g_forked.load();
#else
  return false;
#endif
}

int64_t parallel_chunks(int64_t n, int64_t grain, int num_threads) {
  if (n <= 0) return 0;
  grain = std::max<int64_t>(grain, 1);
  int64_t by_grain = (n + grain - 1) / grain;
  return std::max<int64_t>(1, std::min<int64_t>(by_grain, std::max(num_threads, 1)));
}

void parallel_for(int64_t n, int64_t grain, int num_threads, const std::function<void(int64_t, int64_t)>& fn) {
  int64_t chunks = parallel_chunks(n, grain, num_threads);
  if (chunks == 0) return;
  Job job;
  job.fn = &fn;
  job.n = n;
  job.chunks = chunks;
  run_job(job, static_cast<int>(chunks));
  if (job.error) std::rethrow_exception(job.error);
}

void parallel_for_each(int64_t n, int num_threads, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  const std::function<void(int64_t, int64_t)> each = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(i);
  };
  Job job;
  job.fn = &each;
  job.n = n;
  job.chunks = n;
  const int threads = static_cast<int>(std::min<int64_t>(n, std::max(num_threads, 1)));
  run_job(job, threads);
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace detrcore
