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
#include "assignment.h"

#include <cstddef>
#include <limits>
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
    std::vector<int64_t> todo;      // columns not yet scanned by the current Dijkstra (m)
    std::vector<int64_t> seen_rows; // rows visited by the current Dijkstra (<= n)
    std::vector<int64_t> seen_cols; // columns scanned by the current Dijkstra (<= n)
    std::vector<int64_t> free_rows; // rows left free by the greedy seed (<= n)
    std::vector<int64_t> arg;       // argmin column of each row (n)
};

Scratch& scratch() {
    thread_local Scratch s;
    return s;
}

template <typename T>
std::vector<T>& min_buffer() {
    thread_local std::vector<T> b;
    return b;
}

template <typename T, bool Max>
inline T load(const T* p) {
    if constexpr (Max) {
        return -*p;
    } else {
        return *p;
    }
}

// Validation and row minima in one pass over the matrix, in the memory order that the strides favour.
// Fills best[i] = min_j A(i, j) and arg[i] = a column attaining it (0 when the row is all +inf).
// Returns false when an entry is NaN or -inf (after the sign flip for maximisation).
template <typename T, bool Max>
bool row_minima(const T* base, int64_t n, int64_t m, int64_t si, int64_t sj, T* best, int64_t* arg) {
    constexpr T inf = std::numeric_limits<T>::infinity();
    const int64_t asi = si < 0 ? -si : si;
    const int64_t asj = sj < 0 ? -sj : sj;
    if (asj <= asi) {
        // Rows are the outer loop: a min reduction along each row, then a search for the first minimum.
        for (int64_t i = 0; i < n; ++i) {
            const T* p = base + i * si;
            T mn = inf;
            bool bad = false;
            if (sj == 1) {
                for (int64_t j = 0; j < m; ++j) {
                    const T x = load<T, Max>(p + j);
                    bad |= !(x > -inf);
                    mn = x < mn ? x : mn;
                }
            } else {
                for (int64_t j = 0; j < m; ++j) {
                    const T x = load<T, Max>(p + j * sj);
                    bad |= !(x > -inf);
                    mn = x < mn ? x : mn;
                }
            }
            if (bad) return false;
            int64_t a = 0;
            if (mn < inf) {
                while (load<T, Max>(p + a * sj) != mn) ++a;
            }
            best[i] = mn;
            arg[i] = a;
        }
    } else {
        // Columns are the outer loop (the usual case for a tall row-major matrix read as its transpose):
        // a running elementwise min and argmin across the rows, unconditional stores so it vectorises.
        for (int64_t i = 0; i < n; ++i) {
            best[i] = inf;
            arg[i] = 0;
        }
        bool bad = false;
        for (int64_t j = 0; j < m; ++j) {
            const T* p = base + j * sj;
            if (si == 1) {
                for (int64_t i = 0; i < n; ++i) {
                    const T x = load<T, Max>(p + i);
                    bad |= !(x > -inf);
                    const T b = best[i];
                    const bool lt = x < b;
                    best[i] = lt ? x : b;
                    arg[i] = lt ? j : arg[i];
                }
            } else {
                for (int64_t i = 0; i < n; ++i) {
                    const T x = load<T, Max>(p + i * si);
                    bad |= !(x > -inf);
                    const T b = best[i];
                    const bool lt = x < b;
                    best[i] = lt ? x : b;
                    arg[i] = lt ? j : arg[i];
                }
            }
            if (bad) return false;
        }
    }
    return true;
}

template <typename T, bool Max>
LsaStatus solve_oriented(const T* base, int64_t n, int64_t m, int64_t si, int64_t sj, bool transposed,
                         int64_t* rows, int64_t* cols) {
    Scratch& s = scratch();
    std::vector<T>& best = min_buffer<T>();
    const std::size_t un = static_cast<std::size_t>(n), um = static_cast<std::size_t>(m);
    if (best.size() < un) best.resize(un);
    if (s.arg.size() < un) s.arg.resize(un);

    if (!row_minima<T, Max>(base, n, m, si, sj, best.data(), s.arg.data())) return LsaStatus::invalid;
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
    if (s.todo.size() < um) s.todo.resize(um);

    double* const u = s.u.data();
    double* const v = s.v.data();
    double* const dist = s.dist.data();
    int64_t* const path = s.path.data();
    int64_t* const col4row = s.col4row.data();
    int64_t* const row4col = s.row4col.data();
    int64_t* const todo = s.todo.data();
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

    // One shortest augmenting path per free row.
    for (int64_t f = 0; f < num_free; ++f) {
        const int64_t cur = free_rows[f];
        for (int64_t j = 0; j < m; ++j) {
            dist[j] = kInf;
            todo[j] = j;
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
            double lowest = kInf;
            int64_t lowest_k = 0;
            for (int64_t k = 0; k < num_todo; ++k) {
                const int64_t j = todo[k];
                // +inf cost -> +inf reduced cost: never improves dist, never chosen.
                const double r = offset + static_cast<double>(load<T, Max>(rp + j * sj)) - v[j];
                const double d0 = dist[j];
                const bool shorter = r < d0;
                const double d = shorter ? r : d0;
                dist[j] = d;
                path[j] = shorter ? i : path[j];
                // Ties prefer a free column: the search then ends at once.
                const bool better = d < lowest || (d == lowest && row4col[j] < 0);
                lowest = better ? d : lowest;
                lowest_k = better ? k : lowest_k;
            }
            if (!(lowest < kInf)) return LsaStatus::infeasible;  // no finite path to a free column
            min_val = lowest;
            const int64_t j = todo[lowest_k];
            todo[lowest_k] = todo[--num_todo];
            seen_cols[num_cols++] = j;
            if (row4col[j] < 0) {
                sink = j;
            } else {
                i = row4col[j];
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
