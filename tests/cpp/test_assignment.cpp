// Standalone test of detrcore::solve_lsa against exhaustive search (and, for larger matrices, an independent
// textbook Hungarian). Build and run:
//   g++ -O2 -std=c++17 -fsanitize=address,undefined -Icpp tests/cpp/test_assignment.cpp cpp/assignment.cpp
//       -o /tmp/test_lsa && /tmp/test_lsa
#include "assignment.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

using detrcore::LsaStatus;
using detrcore::solve_lsa;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
int g_checks = 0;
int g_failures = 0;
int g_infeasible = 0;  // checks that expected Status::infeasible
int g_invalid = 0;     // checks that expected Status::invalid

void fail(const std::string& what) {
    ++g_failures;
    if (g_failures <= 20) std::printf("FAIL: %s\n", what.c_str());
}

// A matrix as a view into a buffer: element (i, j) at buf[off + i * sr + j * sc].
template <typename T>
struct View {
    std::vector<T> buf;
    int64_t off = 0, nr = 0, nc = 0, sr = 0, sc = 0;
    const T* ptr() const { return buf.data() + off; }
    T at(int64_t i, int64_t j) const { return buf[static_cast<size_t>(off + i * sr + j * sc)]; }
};

enum class Layout { row_major, transposed, strided, negative };
const char* layout_name(Layout l) {
    switch (l) {
        case Layout::row_major: return "row_major";
        case Layout::transposed: return "transposed";
        case Layout::strided: return "strided";
        case Layout::negative: return "negative";
    }
    return "?";
}

// Lays out the logical nr x nc matrix m (row-major doubles) in the given layout, filling the gaps with NaN so
// that a solver reading outside the view is caught as invalid.
template <typename T>
View<T> make_view(const std::vector<double>& m, int64_t nr, int64_t nc, Layout layout) {
    View<T> v;
    v.nr = nr;
    v.nc = nc;
    const T nan = std::numeric_limits<T>::quiet_NaN();
    switch (layout) {
        case Layout::row_major:
            v.buf.assign(static_cast<size_t>(nr * nc), nan);
            v.sr = nc;
            v.sc = 1;
            break;
        case Layout::transposed:  // the transpose of a contiguous nc x nr array
            v.buf.assign(static_cast<size_t>(nr * nc), nan);
            v.sr = 1;
            v.sc = nr;
            break;
        case Layout::strided: {  // every 2nd row and 3rd column of a (2nr+1) x (3nc+2) array, offset (1, 2)
            const int64_t ld = 3 * nc + 2;
            v.buf.assign(static_cast<size_t>((2 * nr + 1) * ld), nan);
            v.off = 1 * ld + 2;
            v.sr = 2 * ld;
            v.sc = 3;
            break;
        }
        case Layout::negative: {  // rows and columns reversed (negative strides), column-major storage
            v.buf.assign(static_cast<size_t>(nr * nc), nan);
            v.sr = -1;
            v.sc = -nr;
            v.off = (nr - 1) + (nc - 1) * nr;
            break;
        }
    }
    for (int64_t i = 0; i < nr; ++i)
        for (int64_t j = 0; j < nc; ++j)
            v.buf[static_cast<size_t>(v.off + i * v.sr + j * v.sc)] = static_cast<T>(m[static_cast<size_t>(i * nc + j)]);
    return v;
}

struct Brute {
    bool feasible = false;
    double best = 0.0;
};

void brute_rec(const std::vector<double>& a, int64_t n, int64_t m, int64_t i, double acc, std::vector<char>& used,
               double& best) {
    if (i == n) {
        best = std::min(best, acc);
        return;
    }
    for (int64_t j = 0; j < m; ++j) {
        const double x = a[static_cast<size_t>(i * m + j)];
        if (used[static_cast<size_t>(j)] || x == kInf) continue;  // +inf: forbidden
        used[static_cast<size_t>(j)] = 1;
        brute_rec(a, n, m, i + 1, acc + x, used, best);
        used[static_cast<size_t>(j)] = 0;
    }
}

// Exhaustive search over all matchings of size min(nr, nc), on the values as the solver sees them (type T).
template <typename T>
Brute brute_force(const View<T>& v, bool maximize) {
    const bool tr = v.nr > v.nc;
    const int64_t n = tr ? v.nc : v.nr, m = tr ? v.nr : v.nc;
    std::vector<double> a(static_cast<size_t>(n * m));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < m; ++j) {
            const double x = tr ? static_cast<double>(v.at(j, i)) : static_cast<double>(v.at(i, j));
            a[static_cast<size_t>(i * m + j)] = maximize ? -x : x;
        }
    std::vector<char> used(static_cast<size_t>(m), 0);
    double best = kInf;
    brute_rec(a, n, m, 0, 0.0, used, best);
    Brute b;
    b.feasible = best < kInf;
    b.best = maximize ? -best : best;
    return b;
}

// Independent O(n^2 m) Hungarian (potentials, n <= m, finite costs) for larger cross-checks.
double hungarian_reference(const std::vector<double>& c, int64_t n, int64_t m) {
    std::vector<double> u(static_cast<size_t>(n + 1), 0.0), v(static_cast<size_t>(m + 1), 0.0);
    std::vector<int64_t> p(static_cast<size_t>(m + 1), 0), way(static_cast<size_t>(m + 1), 0);
    for (int64_t i = 1; i <= n; ++i) {
        p[0] = i;
        int64_t j0 = 0;
        std::vector<double> minv(static_cast<size_t>(m + 1), kInf);
        std::vector<char> used(static_cast<size_t>(m + 1), 0);
        do {
            used[static_cast<size_t>(j0)] = 1;
            const int64_t i0 = p[static_cast<size_t>(j0)];
            double delta = kInf;
            int64_t j1 = 0;
            for (int64_t j = 1; j <= m; ++j) {
                if (used[static_cast<size_t>(j)]) continue;
                const double cur = c[static_cast<size_t>((i0 - 1) * m + (j - 1))] - u[static_cast<size_t>(i0)] -
                                   v[static_cast<size_t>(j)];
                if (cur < minv[static_cast<size_t>(j)]) {
                    minv[static_cast<size_t>(j)] = cur;
                    way[static_cast<size_t>(j)] = j0;
                }
                if (minv[static_cast<size_t>(j)] < delta) {
                    delta = minv[static_cast<size_t>(j)];
                    j1 = j;
                }
            }
            for (int64_t j = 0; j <= m; ++j) {
                if (used[static_cast<size_t>(j)]) {
                    u[static_cast<size_t>(p[static_cast<size_t>(j)])] += delta;
                    v[static_cast<size_t>(j)] -= delta;
                } else {
                    minv[static_cast<size_t>(j)] -= delta;
                }
            }
            j0 = j1;
        } while (p[static_cast<size_t>(j0)] != 0);
        do {
            const int64_t j1 = way[static_cast<size_t>(j0)];
            p[static_cast<size_t>(j0)] = p[static_cast<size_t>(j1)];
            j0 = j1;
        } while (j0);
    }
    double total = 0.0;
    for (int64_t j = 1; j <= m; ++j)
        if (p[static_cast<size_t>(j)]) total += c[static_cast<size_t>((p[static_cast<size_t>(j)] - 1) * m + (j - 1))];
    return total;
}

std::string describe(const char* type, int64_t nr, int64_t nc, Layout l, bool maximize, const char* kind) {
    char b[200];
    std::snprintf(b, sizeof b, "%s %lldx%lld %s max=%d %s", type, static_cast<long long>(nr),
                  static_cast<long long>(nc), layout_name(l), static_cast<int>(maximize), kind);
    return b;
}

// Runs the solver and checks the structure of the result; returns its total (NaN on structural failure).
template <typename T>
double run_and_check(const View<T>& v, bool maximize, LsaStatus expect_status, const std::string& what) {
    ++g_checks;
    g_infeasible += expect_status == LsaStatus::infeasible;
    g_invalid += expect_status == LsaStatus::invalid;
    const int64_t k = std::min(v.nr, v.nc);
    const int64_t sentinel = -7777;
    std::vector<int64_t> rows(static_cast<size_t>(k + 1), sentinel), cols(static_cast<size_t>(k + 1), sentinel);
    const LsaStatus st = solve_lsa<T>(v.ptr(), v.nr, v.nc, v.sr, v.sc, maximize, rows.data(), cols.data());
    if (st != expect_status) {
        fail(what + ": status " + std::to_string(static_cast<int>(st)) + " expected " +
             std::to_string(static_cast<int>(expect_status)));
        return std::nan("");
    }
    if (rows[static_cast<size_t>(k)] != sentinel || cols[static_cast<size_t>(k)] != sentinel) {
        fail(what + ": wrote past k outputs");
        return std::nan("");
    }
    if (st != LsaStatus::ok) {
        if (st == LsaStatus::invalid) {
            for (int64_t t = 0; t <= k; ++t)
                if (rows[static_cast<size_t>(t)] != sentinel || cols[static_cast<size_t>(t)] != sentinel) {
                    fail(what + ": invalid but outputs written");
                    break;
                }
        }
        return 0.0;
    }
    std::vector<char> rused(static_cast<size_t>(v.nr), 0), cused(static_cast<size_t>(v.nc), 0);
    double total = 0.0;
    for (int64_t t = 0; t < k; ++t) {
        const int64_t r = rows[static_cast<size_t>(t)], c = cols[static_cast<size_t>(t)];
        if (r < 0 || r >= v.nr || c < 0 || c >= v.nc) {
            fail(what + ": index out of range");
            return std::nan("");
        }
        if (t > 0 && !(rows[static_cast<size_t>(t - 1)] < r)) {
            fail(what + ": rows not strictly ascending");
            return std::nan("");
        }
        if (rused[static_cast<size_t>(r)]++ || cused[static_cast<size_t>(c)]++) {
            fail(what + ": repeated row or column");
            return std::nan("");
        }
        const double x = static_cast<double>(v.at(r, c));
        if (x == (maximize ? -kInf : kInf)) {
            fail(what + ": chose a forbidden pair");
            return std::nan("");
        }
        total += x;
    }
    if (v.nr <= v.nc) {
        for (int64_t t = 0; t < k; ++t)
            if (rows[static_cast<size_t>(t)] != t) {
                fail(what + ": rows should be 0..nr-1");
                break;
            }
    }
    return total;
}

bool close(double a, double b, double scale) { return std::fabs(a - b) <= 1e-9 * (1.0 + scale); }

enum class Kind { uniform, integer_ties, negative, inf_sprinkled, huge, all_equal };
const char* kind_name(Kind k) {
    switch (k) {
        case Kind::uniform: return "uniform";
        case Kind::integer_ties: return "integer_ties";
        case Kind::negative: return "negative";
        case Kind::inf_sprinkled: return "inf_sprinkled";
        case Kind::huge: return "huge";
        case Kind::all_equal: return "all_equal";
    }
    return "?";
}

std::vector<double> random_matrix(std::mt19937_64& rng, int64_t nr, int64_t nc, Kind kind, bool maximize,
                                  bool is_float) {
    std::uniform_real_distribution<double> unif(0.0, 1.0);
    std::vector<double> m(static_cast<size_t>(nr * nc));
    const double forbid = maximize ? -kInf : kInf;
    const double inf_prob = 0.1 + 0.4 * unif(rng);
    for (auto& x : m) {
        switch (kind) {
            case Kind::uniform: x = unif(rng); break;
            case Kind::integer_ties: x = std::floor(unif(rng) * 4.0); break;
            case Kind::negative: x = std::floor((unif(rng) - 0.7) * 20.0) + (unif(rng) < 0.5 ? 0.25 : 0.0); break;
            case Kind::inf_sprinkled: x = unif(rng) < inf_prob ? forbid : std::floor(unif(rng) * 10.0); break;
            case Kind::huge:
                // Integers times a huge (float-representable) scale, plus some entries near the type's max.
                x = std::floor(unif(rng) * 8.0) * (is_float ? 1e30 : 1e300);
                if (unif(rng) < 0.1) x = -x;
                break;
            case Kind::all_equal: x = 3.5; break;
        }
    }
    return m;
}

template <typename T>
void small_exhaustive(std::mt19937_64& rng, const char* tname) {
    const bool is_float = sizeof(T) == 4;
    const Layout layouts[] = {Layout::row_major, Layout::transposed, Layout::strided, Layout::negative};
    const Kind kinds[] = {Kind::uniform, Kind::integer_ties, Kind::negative, Kind::inf_sprinkled, Kind::huge,
                          Kind::all_equal};
    for (int64_t nr = 1; nr <= 7; ++nr) {
        for (int64_t nc = 1; nc <= 7; ++nc) {
            for (Kind kind : kinds) {
                const int reps = (kind == Kind::all_equal) ? 1 : (nr * nc <= 16 ? 12 : 4);
                for (int rep = 0; rep < reps; ++rep) {
                    for (bool maximize : {false, true}) {
                        const std::vector<double> m = random_matrix(rng, nr, nc, kind, maximize, is_float);
                        for (Layout l : layouts) {
                            const View<T> v = make_view<T>(m, nr, nc, l);
                            const std::string what =
                                describe(tname, nr, nc, l, maximize, kind_name(kind));
                            const Brute b = brute_force(v, maximize);
                            const double got = run_and_check(
                                v, maximize, b.feasible ? LsaStatus::ok : LsaStatus::infeasible, what);
                            if (b.feasible && !std::isnan(got)) {
                                double scale = 0.0;
                                for (double x : m)
                                    if (std::isfinite(x)) scale = std::max(scale, std::fabs(x));
                                if (!close(got, b.best, scale * static_cast<double>(std::min(nr, nc)))) {
                                    char buf[120];
                                    std::snprintf(buf, sizeof buf, ": total %.17g, brute force %.17g", got, b.best);
                                    fail(what + buf);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

template <typename T>
void invalid_and_edge_cases(std::mt19937_64& rng, const char* tname) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    const T inf = std::numeric_limits<T>::infinity();
    std::uniform_real_distribution<double> unif(0.0, 1.0);
    // NaN anywhere, -inf when minimising, +inf when maximising -> invalid (outputs untouched).
    for (int64_t nr : {1, 2, 5, 30}) {
        for (int64_t nc : {1, 3, 5, 40}) {
            for (Layout l : {Layout::row_major, Layout::transposed, Layout::strided, Layout::negative}) {
                for (int which = 0; which < 4; ++which) {
                    std::vector<double> m(static_cast<size_t>(nr * nc));
                    for (auto& x : m) x = unif(rng);
                    const int64_t pos = static_cast<int64_t>(unif(rng) * static_cast<double>(nr * nc));
                    bool maximize = false;
                    const char* kind = "";
                    switch (which) {
                        case 0: m[static_cast<size_t>(pos)] = static_cast<double>(nan); kind = "nan"; break;
                        case 1: m[static_cast<size_t>(pos)] = -static_cast<double>(inf); kind = "-inf"; break;
                        case 2:
                            m[static_cast<size_t>(pos)] = static_cast<double>(inf);
                            maximize = true;
                            kind = "+inf max";
                            break;
                        case 3:
                            m[static_cast<size_t>(pos)] = static_cast<double>(nan);
                            maximize = true;
                            kind = "nan max";
                            break;
                    }
                    // A forbidden entry elsewhere must not hide the invalid one.
                    if (nr > 1 && nc > 1) m[static_cast<size_t>(((pos / nc + 1) % nr) * nc)] = maximize ? -kInf : kInf;
                    const View<T> v = make_view<T>(m, nr, nc, l);
                    run_and_check(v, maximize, LsaStatus::invalid, describe(tname, nr, nc, l, maximize, kind));
                }
            }
        }
    }
    // A fully forbidden row (in the short orientation) or column -> infeasible; also in the long orientation
    // when too many lines are forbidden.
    for (bool maximize : {false, true}) {
        const double forbid = maximize ? -kInf : kInf;
        for (int64_t nr : {1, 3, 8, 50}) {
            for (int64_t nc : {1, 4, 8, 60}) {
                for (Layout l : {Layout::row_major, Layout::transposed}) {
                    std::vector<double> m(static_cast<size_t>(nr * nc));
                    for (auto& x : m) x = unif(rng);
                    if (nr <= nc) {
                        for (int64_t j = 0; j < nc; ++j) m[static_cast<size_t>((nr / 2) * nc + j)] = forbid;
                    } else {
                        for (int64_t i = 0; i < nr; ++i) m[static_cast<size_t>(i * nc + nc / 2)] = forbid;
                    }
                    run_and_check(make_view<T>(m, nr, nc, l), maximize, LsaStatus::infeasible,
                                  describe(tname, nr, nc, l, maximize, "forbidden line"));
                    // Hall violation: all but one long-side line forbidden for two short-side lines.
                    if (std::min(nr, nc) >= 2) {
                        for (auto& x : m) x = unif(rng);
                        for (int64_t t = 0; t < std::max(nr, nc) - 1; ++t) {
                            for (int64_t s = 0; s < 2; ++s) {
                                const int64_t i = nr <= nc ? s : t, j = nr <= nc ? t : s;
                                m[static_cast<size_t>(i * nc + j)] = forbid;
                            }
                        }
                        run_and_check(make_view<T>(m, nr, nc, l), maximize, LsaStatus::infeasible,
                                      describe(tname, nr, nc, l, maximize, "hall violation"));
                    }
                }
            }
        }
    }
    // Empty matrices: ok, nothing written.
    for (auto dims : {std::pair<int64_t, int64_t>{0, 0}, {0, 5}, {5, 0}}) {
        ++g_checks;
        int64_t r = -1, c = -1;
        T dummy = 0;
        const LsaStatus st = solve_lsa<T>(&dummy, dims.first, dims.second, dims.second, 1, false, &r, &c);
        if (st != LsaStatus::ok || r != -1 || c != -1) fail(std::string(tname) + " empty matrix");
    }
    // 1x1 and a single huge value.
    {
        ++g_checks;
        T one = static_cast<T>(-2.5);
        int64_t r = -1, c = -1;
        if (solve_lsa<T>(&one, 1, 1, 1, 1, false, &r, &c) != LsaStatus::ok || r != 0 || c != 0)
            fail(std::string(tname) + " 1x1");
        ++g_checks;
        T big = std::numeric_limits<T>::max();
        r = c = -1;
        if (solve_lsa<T>(&big, 1, 1, 1, 1, true, &r, &c) != LsaStatus::ok || r != 0 || c != 0)
            fail(std::string(tname) + " 1x1 max value");
        ++g_checks;
        r = c = -1;
        if (solve_lsa<T>(&inf, 1, 1, 1, 1, false, &r, &c) != LsaStatus::infeasible || r != -1 || c != -1)
            fail(std::string(tname) + " 1x1 inf");
    }
}

// Larger matrices (DETR-like shapes, square, wide) against the independent Hungarian. Forbidden (+inf) entries
// are given to the reference as a cost too big for any optimum that avoids them, so that a reference total
// that large means infeasible.
template <typename T>
void larger_vs_reference(std::mt19937_64& rng, const char* tname) {
    std::uniform_real_distribution<double> unif(0.0, 1.0);
    const std::pair<int64_t, int64_t> shapes[] = {{100, 5}, {300, 20}, {300, 50}, {60, 60}, {90, 100}, {20, 300},
                                                  {1, 40},  {40, 1},   {33, 17},  {17, 33}, {16, 64}, {64, 16},
                                                  {31, 47}, {47, 31},  {128, 128}};
    const Layout layouts[] = {Layout::row_major, Layout::transposed, Layout::strided, Layout::negative};
    const double big = 1e7;
    for (auto [nr, nc] : shapes) {
        for (int rep = 0; rep < 4; ++rep) {
            for (int kind = 0; kind < 5; ++kind) {
                for (bool maximize : {false, true}) {
                    const double forbid = maximize ? -kInf : kInf;
                    const double inf_prob = kind == 3 ? 0.3 : kind == 4 ? 0.9 : 0.0;
                    std::vector<double> m(static_cast<size_t>(nr * nc));
                    for (auto& x : m) {
                        if (kind == 0) x = unif(rng);
                        else if (kind == 1) x = std::floor(unif(rng) * 5.0);
                        else if (kind == 2) x = std::floor((unif(rng) - 0.5) * 1000.0) / 8.0;
                        else x = unif(rng) < inf_prob ? forbid : std::floor(unif(rng) * 10.0);
                    }
                    const Layout l = layouts[rep];
                    const View<T> v = make_view<T>(m, nr, nc, l);
                    // Reference on the values as stored in T, oriented n <= m, negated for maximisation.
                    const bool tr = nr > nc;
                    const int64_t n = tr ? nc : nr, mm = tr ? nr : nc;
                    std::vector<double> c(static_cast<size_t>(n * mm));
                    for (int64_t i = 0; i < n; ++i)
                        for (int64_t j = 0; j < mm; ++j) {
                            double x = static_cast<double>(tr ? v.at(j, i) : v.at(i, j));
                            x = maximize ? -x : x;
                            c[static_cast<size_t>(i * mm + j)] = x == kInf ? big : x;
                        }
                    double ref = hungarian_reference(c, n, mm);
                    const bool feasible = ref < big / 2;
                    if (maximize) ref = -ref;
                    const std::string what = describe(tname, nr, nc, l, maximize, "vs hungarian");
                    const double got =
                        run_and_check(v, maximize, feasible ? LsaStatus::ok : LsaStatus::infeasible, what);
                    if (feasible && !std::isnan(got) && !close(got, ref, 1000.0 * static_cast<double>(n))) {
                        char buf[120];
                        std::snprintf(buf, sizeof buf, ": total %.17g, reference %.17g", got, ref);
                        fail(what + buf);
                    }
                }
            }
        }
    }
}

// Invalid entries at the start, end and middle of medium matrices (the vectorised minima pass: lane blocks
// and tails, both loop orders).
template <typename T>
void invalid_positions(std::mt19937_64& rng, const char* tname) {
    std::uniform_real_distribution<double> unif(0.0, 1.0);
    const std::pair<int64_t, int64_t> shapes[] = {{20, 64}, {64, 20}, {40, 100}, {100, 40}, {5, 200}, {200, 5},
                                                  {17, 17}};
    for (auto [nr, nc] : shapes) {
        for (Layout l : {Layout::row_major, Layout::transposed, Layout::strided, Layout::negative}) {
            for (int64_t pos : {int64_t{0}, nr * nc - 1, nr * nc / 2 + 3, nc - 1, (nr - 1) * nc}) {
                for (int which = 0; which < 3; ++which) {
                    std::vector<double> m(static_cast<size_t>(nr * nc));
                    for (auto& x : m) x = unif(rng);
                    const bool maximize = which == 2;
                    m[static_cast<size_t>(pos)] = which == 0 ? std::nan("") : which == 1 ? -kInf : kInf;
                    run_and_check(make_view<T>(m, nr, nc, l), maximize, LsaStatus::invalid,
                                  describe(tname, nr, nc, l, maximize, "invalid position"));
                }
            }
        }
    }
}

// The same matrices solved from several threads at once give the single-threaded results.
template <typename T>
void threads_agree(std::mt19937_64& rng, const char* tname) {
    std::uniform_real_distribution<double> unif(0.0, 1.0);
    struct Case {
        int64_t nr, nc;
        std::vector<T> c;
        std::vector<int64_t> rows, cols;
    };
    std::vector<Case> cases;
    for (int t = 0; t < 48; ++t) {
        Case cs;
        cs.nr = 1 + static_cast<int64_t>(unif(rng) * 150);
        cs.nc = 1 + static_cast<int64_t>(unif(rng) * 150);
        cs.c.resize(static_cast<size_t>(cs.nr * cs.nc));
        for (auto& x : cs.c) x = static_cast<T>(unif(rng));
        const int64_t k = std::min(cs.nr, cs.nc);
        cs.rows.resize(static_cast<size_t>(k));
        cs.cols.resize(static_cast<size_t>(k));
        solve_lsa<T>(cs.c.data(), cs.nr, cs.nc, cs.nc, 1, false, cs.rows.data(), cs.cols.data());
        cases.push_back(std::move(cs));
    }
    std::atomic<int> mismatches{0};
    std::vector<std::thread> pool;
    for (int w = 0; w < 4; ++w) {
        pool.emplace_back([&, w] {
            for (int rep = 0; rep < 5; ++rep) {
                for (size_t t = static_cast<size_t>(w); t < cases.size() * 2; t += 3) {
                    const Case& cs = cases[t % cases.size()];
                    const int64_t k = std::min(cs.nr, cs.nc);
                    std::vector<int64_t> r(static_cast<size_t>(k)), c(static_cast<size_t>(k));
                    solve_lsa<T>(cs.c.data(), cs.nr, cs.nc, cs.nc, 1, false, r.data(), c.data());
                    if (r != cs.rows || c != cs.cols) ++mismatches;
                }
            }
        });
    }
    for (auto& th : pool) th.join();
    ++g_checks;
    if (mismatches.load() != 0) fail(std::string(tname) + ": threaded results differ");
}

}  // namespace

int main() {
    std::mt19937_64 rng(20240607);
    small_exhaustive<double>(rng, "double");
    small_exhaustive<float>(rng, "float");
    invalid_and_edge_cases<double>(rng, "double");
    invalid_and_edge_cases<float>(rng, "float");
    larger_vs_reference<double>(rng, "double");
    larger_vs_reference<float>(rng, "float");
    invalid_positions<double>(rng, "double");
    invalid_positions<float>(rng, "float");
    threads_agree<double>(rng, "double");
    threads_agree<float>(rng, "float");
    std::printf("test_assignment: %d checks (%d expecting infeasible, %d invalid), %d failures\n", g_checks,
                g_infeasible, g_invalid, g_failures);
    return g_failures == 0 ? 0 : 1;
}
