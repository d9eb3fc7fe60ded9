// parallel_for / parallel_for_each: every index exactly once, exceptions reach the caller, nested calls run
// serially, concurrent callers are safe, and a forked child gets a working pool. Built twice by CI: with the
// std::thread pool and with OpenMP (-fopenmp -DDETRCORE_WITH_OPENMP=1), where calls from inside an OpenMP region
// run serially and a child forked after OpenMP regions ran (GNU OpenMP's pool is dead there) still works.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <thread>
#include <vector>
#if defined(DETRCORE_WITH_OPENMP)
#include <omp.h>
#endif

#include "parallel.h"

using detrcore::parallel_for;
using detrcore::parallel_for_each;

static int failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

static bool covers_once(int64_t n, int64_t grain, int threads) {
  std::vector<std::atomic<int>> hit(static_cast<size_t>(n));
  parallel_for(n, grain, threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hit[i]++;
  });
  for (auto& h : hit)
    if (h.load() != 1) return false;
  return true;
}

int main() {
  for (int rep = 0; rep < 300; ++rep) EXPECT(covers_once(1000 + rep, 7, 1 + rep % 5));
  EXPECT(covers_once(0, 1, 4));
  EXPECT(covers_once(1, 1, 4));
  EXPECT(detrcore::parallel_chunks(10, 3, 8) == 4);
  EXPECT(detrcore::parallel_chunks(10, 100, 8) == 1);

  bool threw = false;
  try {
    parallel_for(100, 1, 3, [](int64_t b, int64_t) {
      if (b > 50) throw std::runtime_error("boom");
    });
  } catch (const std::runtime_error&) {
    threw = true;
  }
  EXPECT(threw);

  std::atomic<int64_t> nested{0};
  parallel_for(8, 1, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      parallel_for(10, 1, 4, [&](int64_t b2, int64_t e2) { nested += e2 - b2; });
  });
  EXPECT(nested.load() == 80);

  std::atomic<int64_t> each{0};
  parallel_for_each(37, 3, [&](int64_t i) { each += i; });
  EXPECT(each.load() == 37 * 36 / 2);

  std::vector<std::thread> callers;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&] {
      for (int rep = 0; rep < 50; ++rep) ok += covers_once(500, 5, 3);
    });
  for (auto& t : callers) t.join();
  EXPECT(ok.load() == 200);

  // Work really is spread: with 2 chunks that each wait for the other, a serial run would never finish.
  std::atomic<int> arrived{0};
  bool spread = true;
  parallel_for(2, 1, 2, [&](int64_t, int64_t) {
    arrived++;
    for (int spin = 0; arrived.load() < 2; ++spin)
      if (spin > 200000000) {
        spread = false;
        break;
      }
  });
  EXPECT(spread);

#if defined(DETRCORE_WITH_OPENMP)
  std::atomic<int64_t> inside{0};
  std::atomic<int> outer_threads{0};
#pragma omp parallel num_threads(3)
  {
    outer_threads++;
    const int team = omp_get_num_threads();
    parallel_for(100, 1, 4, [&](int64_t b, int64_t e) {
      EXPECT(omp_get_num_threads() == team);  // still on the outer team: no nested region was opened
      inside += e - b;
    });
  }
  EXPECT(inside.load() == 100 * outer_threads.load());
#endif

  pid_t pid = fork();
  if (pid == 0) _exit(covers_once(1000, 1, 4) ? 0 : 1);
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  std::printf("test_parallel: %s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
