// Linear sum assignment: shortest augmenting path (Crouse's rectangular Jonker-Volgenant) with a greedy
// dual-feasible seed. See assignment.h for the contract.
//
// Working frame: an n x m view A(i, j) = base[i * si + j * sj] with n <= m (a tall input is read as its
// transpose by swapping strides, without a copy). Costs are read in their own type T; when maximising they
// are negated on read (a template flag, so the hot loops carry no branch for it).
//
// Dual problem of the rectangular assignment (every row matched, each column at most once):
//   max sum u_i + sum v_j  s.t.  u_i + v_j <= A(i, j),  v_j <= 0,  and v_j < 0 only on matched columns.
// Seed: u_i = min_j A(i, j), v = 0 is feasible; row i takes its argmin column when that column is still free
// (reduced cost 0, so complementary slackness holds). Each remaining free row is then added by one Dijkstra
// over reduced costs (early exit at the first free column reached), which keeps all the conditions above:
// it lowers v only on scanned columns, and those end matched.
//
// Cost: one validation + row-minima pass over the matrix (vectorised; AVX2 picked at run time on x86-64),
// then for DETR's tall matrices only a handful of Dijkstras, each a few branch-free scans over the unscanned
// columns, kept compact in position order.
#include "assignment.h"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace detrcore {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Scratch space reused across calls on the same thread (the batched solver calls from many threads).
struct Scratch {
    std::vector<double> u;          // row duals (n)
    std::vector<double> v;          // column duals (m)
    std::vector<double> dist;       // shortest-path distance to each column (m)
    std::vector<int64_t> path;      // predecessor row of each column on the shortest-path tree (m)
    std::vector<int64_t> col4row;   // column matched to each row, -1 if free (n)
    std::vector<int64_t> row4col;   // row matched to each column, -1 if free (m)
    // Position-ordered copies for the current Dijkstra; positions [0, num_todo) are the unscanned columns.
    std::vector<int64_t> t_col;     // column at each position (m)
    std::vector<double> t_v;        // its dual (m)
    std::vector<double> t_dist;     // its shortest-path distance (m)
    std::vector<int64_t> t_path;    // its predecessor row (m)
    std::vector<int64_t> t_row;     // the row matched to it, -1 if free (m)
    std::vector<int64_t> seen_rows; // rows visited by the current Dijkstra (<= n)
    std::vector<int64_t> seen_cols; // columns scanned by the current Dijkstra (<= n)
    std::vector<int64_t> free_rows; // rows left free by the greedy seed (<= n)
    std::vector<int64_t> arg;       // argmin column of each row (n)
    std::vector<int64_t> lane_arg64; // 64-bit lanes of row_minima for float with > 2^31 columns
    std::vector<int64_t> lane_bad64;
};

Scratch& scratch() {
    thread_local Scratch s;
    return s;
}

constexpr int64_t kLanes = 16;  // lanes of the row-reduction path of row_minima

// Integer lane type as wide as T, so that value and index lanes line up in vector registers.
template <typename T>
using lane_int_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
struct TypedScratch {
    std::vector<T> best;                     // row minima (n)
    std::vector<T> lane_best;                // lane minima of the row-reduction path (kLanes)
    std::vector<lane_int_t<T>> lane_arg;     // lane argmins (max(n, kLanes))
    std::vector<lane_int_t<T>> lane_bad;     // lane NaN/-inf flags (max(n, kLanes))
};

template <typename T>
TypedScratch<T>& typed_scratch() {
    thread_local TypedScratch<T> s;
    return s;
}

template <typename T, bool Max>
inline T load(const T* p) {
    if constexpr (Max) {
        return -*p;
    } else {
        return *p;
    }
}

#if defined(__GNUC__)
#define DETRCORE_LSA_INLINE inline __attribute__((always_inline))
#else
#define DETRCORE_LSA_INLINE inline
#endif

// R steps of an elementwise running min/argmin over lanes i in [0, n): step r reads x = p[r * step + i *
// stride] and lane i keeps (best[i], arg[i]) = (x, tag + r) when x < best[i]; bad[i] records NaN or -inf.
// Written with integer masks (I: an integer as wide as T, so value and index lanes line up) so that it
// vectorises without -ffast-math; R > 1 keeps a lane in registers across R values.
template <typename T, typename I, bool Max, int R>
DETRCORE_LSA_INLINE void min_steps(const T* p, int64_t step, int64_t stride, int64_t n, I tag,
                                   T* __restrict best, I* __restrict arg, I* __restrict bad) {
    constexpr T inf = std::numeric_limits<T>::infinity();
    const T* q[R];
    for (int r = 0; r < R; ++r) q[r] = p + r * step;
#define DETRCORE_LSA_LANE(OFF)                                                   \
    {                                                                            \
        T b = best[i];                                                           \
        I a = arg[i];                                                            \
        I bd = bad[i];                                                           \
        for (int r = 0; r < R; ++r) {                                            \
            const T x = load<T, Max>(q[r] + (OFF));                              \
            bd |= static_cast<I>(!(x > -inf));                                   \
            const bool lt = x < b;                                               \
            const I mask = -static_cast<I>(lt);                                  \
            b = lt ? x : b;                                                      \
            a = (a & ~mask) | (static_cast<I>(tag + r) & mask);                  \
        }                                                                        \
        best[i] = b;                                                             \
        arg[i] = a;                                                              \
        bad[i] = bd;                                                             \
    }
    if (stride == 1) {
        for (int64_t i = 0; i < n; ++i) DETRCORE_LSA_LANE(i)
    } else {
        for (int64_t i = 0; i < n; ++i) DETRCORE_LSA_LANE(i * stride)
    }
#undef DETRCORE_LSA_LANE
}

// Validation and row minima in one pass over the matrix, in the memory order that the strides favour.
// Fills best[i] = min_j A(i, j) and arg[i] = the first column attaining it (0 when the row is all +inf).
// Returns false when an entry is NaN or -inf (after the sign flip for maximisation). Scratch: lane_best
// has kLanes elements, lane_arg and lane_bad max(n, kLanes).
template <typename T, typename I, bool Max>
DETRCORE_LSA_INLINE bool row_minima_impl(const T* base, int64_t n, int64_t m, int64_t si, int64_t sj,
                                         T* __restrict best, int64_t* __restrict arg, T* __restrict lane_best,
                                         I* __restrict lane_arg, I* __restrict lane_bad) {
    constexpr T inf = std::numeric_limits<T>::infinity();
    constexpr int R = 4;
    const int64_t asi = si < 0 ? -si : si;
    const int64_t asj = sj < 0 ? -sj : sj;
    if (asj <= asi) {
        // Rows are the outer loop: each row is reduced as blocks of L lanes (lane k of block b is column
        // b * L + k), then the lanes and the tail are combined.
        constexpr int64_t L = kLanes;
        const int64_t blocks = m / L;
        for (int64_t i = 0; i < n; ++i) {
            const T* p = base + i * si;
            for (int64_t k = 0; k < L; ++k) {
                lane_best[k] = inf;
                lane_arg[k] = 0;
                lane_bad[k] = 0;
            }
            int64_t b = 0;
            for (; b + R <= blocks; b += R) {
                min_steps<T, I, Max, R>(p + b * L * sj, L * sj, sj, L, static_cast<I>(b), lane_best, lane_arg,
                                        lane_bad);
            }
            for (; b < blocks; ++b) {
                min_steps<T, I, Max, 1>(p + b * L * sj, 0, sj, L, static_cast<I>(b), lane_best, lane_arg,
                                        lane_bad);
            }
            T mn = inf;
            int64_t a = 0;
            I bad = 0;
            for (int64_t k = 0; k < L; ++k) {
                bad |= lane_bad[k];
                const int64_t col = static_cast<int64_t>(lane_arg[k]) * L + k;
                if (lane_best[k] < mn || (lane_best[k] == mn && col < a)) {
                    mn = lane_best[k];
                    a = col;
                }
            }
            for (int64_t j = blocks * L; j < m; ++j) {  // tail: columns above every lane's
                const T x = load<T, Max>(p + j * sj);
                bad |= static_cast<I>(!(x > -inf));
                if (x < mn) {
                    mn = x;
                    a = j;
                }
            }
            if (bad) return false;
            best[i] = mn;
            arg[i] = mn < inf ? a : 0;
        }
    } else {
        // Columns are the outer loop (the usual case: a tall row-major matrix read as its transpose): one
        // elementwise step per column, over all rows.
        for (int64_t i = 0; i < n; ++i) {
            best[i] = inf;
            lane_arg[i] = 0;
            lane_bad[i] = 0;
        }
        int64_t j = 0;
        for (; j + R <= m; j += R) {
            min_steps<T, I, Max, R>(base + j * sj, sj, si, n, static_cast<I>(j), best, lane_arg, lane_bad);
        }
        for (; j < m; ++j) {
            min_steps<T, I, Max, 1>(base + j * sj, 0, si, n, static_cast<I>(j), best, lane_arg, lane_bad);
        }
        I bad = 0;
        for (int64_t i = 0; i < n; ++i) bad |= lane_bad[i];
        if (bad) return false;
        for (int64_t i = 0; i < n; ++i) arg[i] = static_cast<int64_t>(lane_arg[i]);
    }
    return true;
}

// The minima pass is the one part that vectorises well; on x86-64 with GCC or Clang (and a baseline build
// without AVX2) it is compiled a second time for AVX2 and picked at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__AVX2__) && !defined(DETRCORE_LSA_NO_DISPATCH)
#define DETRCORE_LSA_AVX2 1
template <typename T, typename I, bool Max>
__attribute__((target("avx2"))) bool row_minima_avx2(const T* base, int64_t n, int64_t m, int64_t si, int64_t sj,
                                                     T* best, int64_t* arg, T* lane_best, I* lane_arg, I* lane_bad) {
    return row_minima_impl<T, I, Max>(base, n, m, si, sj, best, arg, lane_best, lane_arg, lane_bad);
}

bool have_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
}
#endif

template <typename T, typename I, bool Max>
bool row_minima(const T* base, int64_t n, int64_t m, int64_t si, int64_t sj, T* best, int64_t* arg, T* lane_best,
                I* lane_arg, I* lane_bad) {
#ifdef DETRCORE_LSA_AVX2
    if (have_avx2()) return row_minima_avx2<T, I, Max>(base, n, m, si, sj, best, arg, lane_best, lane_arg, lane_bad);
#endif
    return row_minima_impl<T, I, Max>(base, n, m, si, sj, best, arg, lane_best, lane_arg, lane_bad);
}

// The position of the first entry of dist[0, num) equal to `lowest`, or of a free one (row[k] < 0) among
// those if there is one: ties prefer a free column, which ends the Dijkstra at once. Blocks of four with no
// hit cost one well-predicted branch.
inline int64_t find_lowest(const double* dist, const int64_t* row, int64_t num, double lowest) {
    int64_t pick = -1;
    int64_t k = 0;
    for (; k + 4 <= num; k += 4) {
        const bool hit = (dist[k] == lowest) | (dist[k + 1] == lowest) | (dist[k + 2] == lowest) |
                         (dist[k + 3] == lowest);
        if (!hit) continue;
        for (int64_t l = k; l < k + 4; ++l) {
            if (dist[l] == lowest) {
                if (row[l] < 0) return l;
                if (pick < 0) pick = l;
            }
        }
    }
    for (; k < num; ++k) {
        if (dist[k] == lowest) {
            if (row[k] < 0) return k;
            if (pick < 0) pick = k;
        }
    }
    return pick;
}

template <typename T, bool Max>
LsaStatus solve_oriented(const T* base, int64_t n, int64_t m, int64_t si, int64_t sj, bool transposed,
                         int64_t* rows, int64_t* cols) {
    Scratch& s = scratch();
    TypedScratch<T>& ts = typed_scratch<T>();
    const std::size_t un = static_cast<std::size_t>(n), um = static_cast<std::size_t>(m);
    const std::size_t ul = un < kLanes ? kLanes : un;
    if (ts.best.size() < un) ts.best.resize(un);
    if (ts.lane_best.size() < kLanes) ts.lane_best.resize(kLanes);
    if (s.arg.size() < un) s.arg.resize(un);
    T* const best = ts.best.data();

    bool valid;
    using I = lane_int_t<T>;
    if (m < static_cast<int64_t>(std::numeric_limits<I>::max())) {
        if (ts.lane_arg.size() < ul) ts.lane_arg.resize(ul);
        if (ts.lane_bad.size() < ul) ts.lane_bad.resize(ul);
        valid = row_minima<T, I, Max>(base, n, m, si, sj, best, s.arg.data(), ts.lane_best.data(),
                                      ts.lane_arg.data(), ts.lane_bad.data());
    } else {  // float lanes with more than 2^31 columns: 64-bit indices
        if (s.lane_arg64.size() < ul) s.lane_arg64.resize(ul);
        if (s.lane_bad64.size() < ul) s.lane_bad64.resize(ul);
        valid = row_minima<T, int64_t, Max>(base, n, m, si, sj, best, s.arg.data(), ts.lane_best.data(),
                                            s.lane_arg64.data(), s.lane_bad64.data());
    }
    if (!valid) return LsaStatus::invalid;
    for (int64_t i = 0; i < n; ++i) {
        if (!(best[i] < std::numeric_limits<T>::infinity())) return LsaStatus::infeasible;
    }

    if (s.u.size() < un) s.u.resize(un);
    if (s.col4row.size() < un) s.col4row.resize(un);
    if (s.seen_rows.size() < un) s.seen_rows.resize(un);
    if (s.seen_cols.size() < un) s.seen_cols.resize(un);
    if (s.free_rows.size() < un) s.free_rows.resize(un);
    if (s.v.size() < um) s.v.resize(um);
    if (s.dist.size() < um) s.dist.resize(um);
    if (s.path.size() < um) s.path.resize(um);
    if (s.row4col.size() < um) s.row4col.resize(um);
    if (s.t_col.size() < um) s.t_col.resize(um);
    if (s.t_v.size() < um) s.t_v.resize(um);
    if (s.t_dist.size() < um) s.t_dist.resize(um);
    if (s.t_path.size() < um) s.t_path.resize(um);
    if (s.t_row.size() < um) s.t_row.resize(um);

    double* const u = s.u.data();
    double* const v = s.v.data();
    double* const dist = s.dist.data();
    int64_t* const path = s.path.data();
    int64_t* const col4row = s.col4row.data();
    int64_t* const row4col = s.row4col.data();
    int64_t* const t_col = s.t_col.data();
    double* const t_v = s.t_v.data();
    double* const t_dist = s.t_dist.data();
    int64_t* const t_path = s.t_path.data();
    int64_t* const t_row = s.t_row.data();
    int64_t* const seen_rows = s.seen_rows.data();
    int64_t* const seen_cols = s.seen_cols.data();
    int64_t* const free_rows = s.free_rows.data();
    const int64_t* const arg = s.arg.data();

    // Greedy seed: u = row minima, v = 0, each row takes its argmin column if still free.
    for (int64_t j = 0; j < m; ++j) {
        v[j] = 0.0;
        row4col[j] = -1;
    }
    int64_t num_free = 0;
    for (int64_t i = 0; i < n; ++i) {
        u[i] = static_cast<double>(best[i]);
        const int64_t j = arg[i];
        if (row4col[j] < 0) {
            row4col[j] = i;
            col4row[i] = j;
        } else {
            col4row[i] = -1;
            free_rows[num_free++] = i;
        }
    }

    // One shortest augmenting path (a Dijkstra over reduced costs) per free row. The columns not yet
    // scanned are kept compact at positions [0, num_todo) of the position-ordered arrays t_*, so that the
    // scan of a row is a branch-free pass over contiguous data with no loop-carried dependency but a few
    // independent running minima; the argmin is found afterwards by a short search.
    for (int64_t f = 0; f < num_free; ++f) {
        const int64_t cur = free_rows[f];
        for (int64_t j = 0; j < m; ++j) {
            t_col[j] = j;
            t_v[j] = v[j];
            t_dist[j] = kInf;
            t_row[j] = row4col[j];
        }
        int64_t num_todo = m;
        int64_t num_rows = 0, num_cols = 0;
        double min_val = 0.0;
        int64_t i = cur;
        int64_t sink = -1;
        while (sink < 0) {
            seen_rows[num_rows++] = i;
            const T* const rp = base + i * si;
            const double offset = min_val - u[i];
            // Relax every unscanned column through row i. A +inf cost gives a +inf reduced cost, which
            // never improves a distance. Four running minima break the dependency chain.
            constexpr int64_t U = 4;
            double lo[U] = {kInf, kInf, kInf, kInf};
            int64_t k = 0;
            for (; k + U <= num_todo; k += U) {
                for (int64_t l = 0; l < U; ++l) {
                    const double a = static_cast<double>(load<T, Max>(rp + t_col[k + l] * sj));
                    const double r = offset + a - t_v[k + l];
                    const double d0 = t_dist[k + l];
                    const bool shorter = r < d0;
                    const double d = shorter ? r : d0;
                    const int64_t mask = -static_cast<int64_t>(shorter);
                    t_dist[k + l] = d;
                    t_path[k + l] = (t_path[k + l] & ~mask) | (i & mask);
                    lo[l] = d < lo[l] ? d : lo[l];
                }
            }
            for (; k < num_todo; ++k) {
                const double r = offset + static_cast<double>(load<T, Max>(rp + t_col[k] * sj)) - t_v[k];
                const double d0 = t_dist[k];
                const bool shorter = r < d0;
                const double d = shorter ? r : d0;
                const int64_t mask = -static_cast<int64_t>(shorter);
                t_dist[k] = d;
                t_path[k] = (t_path[k] & ~mask) | (i & mask);
                lo[0] = d < lo[0] ? d : lo[0];
            }
            const double lowest = std::min(std::min(lo[0], lo[1]), std::min(lo[2], lo[3]));
            if (!(lowest < kInf)) return LsaStatus::infeasible;  // no finite path to a free column
            const int64_t pick = find_lowest(t_dist, t_row, num_todo, lowest);
            min_val = lowest;
            const int64_t j = t_col[pick];
            const int64_t next = t_row[pick];
            dist[j] = lowest;
            path[j] = t_path[pick];
            seen_cols[num_cols++] = j;
            --num_todo;
            t_col[pick] = t_col[num_todo];
            t_v[pick] = t_v[num_todo];
            t_dist[pick] = t_dist[num_todo];
            t_path[pick] = t_path[num_todo];
            t_row[pick] = t_row[num_todo];
            if (next < 0) {
                sink = j;
            } else {
                i = next;
            }
        }

        // Dual update (before the matching changes): keeps feasibility and complementary slackness.
        u[cur] += min_val;
        for (int64_t t = 1; t < num_rows; ++t) {
            const int64_t r = seen_rows[t];
            u[r] += min_val - dist[col4row[r]];
        }
        for (int64_t t = 0; t < num_cols; ++t) {
            const int64_t c = seen_cols[t];
            v[c] -= min_val - dist[c];
        }

        // Augment along the path back from the sink.
        int64_t j = sink;
        for (;;) {
            const int64_t r = path[j];
            row4col[j] = r;
            std::swap(col4row[r], j);
            if (r == cur) break;
        }
    }

    // Back to scipy's convention: rows ascending in the caller's frame.
    if (!transposed) {
        for (int64_t i = 0; i < n; ++i) {
            rows[i] = i;
            cols[i] = col4row[i];
        }
    } else {
        int64_t t = 0;
        for (int64_t j = 0; j < m; ++j) {
            if (row4col[j] >= 0) {
                rows[t] = j;
                cols[t] = row4col[j];
                ++t;
            }
        }
    }
    return LsaStatus::ok;
}

}  // namespace

template <typename T>
LsaStatus solve_lsa(const T* cost, int64_t nr, int64_t nc, int64_t stride_r, int64_t stride_c, bool maximize,
                    int64_t* rows, int64_t* cols) {
    if (nr < 0 || nc < 0) return LsaStatus::invalid;
    if (nr == 0 || nc == 0) return LsaStatus::ok;
    const bool transposed = nr > nc;
    const int64_t n = transposed ? nc : nr;
    const int64_t m = transposed ? nr : nc;
    const int64_t si = transposed ? stride_c : stride_r;
    const int64_t sj = transposed ? stride_r : stride_c;
    return maximize ? solve_oriented<T, true>(cost, n, m, si, sj, transposed, rows, cols)
                    : solve_oriented<T, false>(cost, n, m, si, sj, transposed, rows, cols);
}

template LsaStatus solve_lsa<float>(const float*, int64_t, int64_t, int64_t, int64_t, bool, int64_t*, int64_t*);
template LsaStatus solve_lsa<double>(const double*, int64_t, int64_t, int64_t, int64_t, bool, int64_t*,
                                     int64_t*);

}  // namespace detrcore
