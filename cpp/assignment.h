// Linear sum assignment (the rectangular assignment problem), torch-free and Python-free.
//
// Contract: given a dense nr x nc cost matrix, addressed as cost[i * stride_r + j * stride_c] (strides in
// elements, any sign or layout), find k = min(nr, nc) pairs (rows[t], cols[t]) with distinct rows and
// distinct columns minimising (maximising when `maximize`) the sum of their costs. This is the problem and
// the result convention of scipy.optimize.linear_sum_assignment:
//   - rows are written in ascending order, cols[t] is the column assigned to rows[t];
//   - when nr > nc every column is assigned and rows lists the nc assigned rows (ascending);
//   - +inf (-inf when maximising) marks a forbidden pair;
//   - NaN, or -inf (+inf when maximising), anywhere in the matrix -> Status::invalid, outputs untouched;
//   - no full matching of size k avoiding forbidden pairs -> Status::infeasible;
//   - nr == 0 or nc == 0 -> Status::ok with nothing written.
// Algorithm: shortest augmenting path (Jonker-Volgenant family, Crouse's rectangular form) on the
// orientation with rows <= cols, seeded with a greedy dual-feasible assignment so that DETR's tall
// matrices (100-900 queries x 0-100 targets) need few augmentations. Costs are read in their own type and
// accumulated in double. Thread-safe: each call uses thread-local scratch space only.
#pragma once
#include <cstdint>

namespace detrcore {

enum class LsaStatus : int { ok = 0, invalid = 1, infeasible = 2 };

template <typename T>
LsaStatus solve_lsa(const T* cost, int64_t nr, int64_t nc, int64_t stride_r, int64_t stride_c, bool maximize,
                    int64_t* rows, int64_t* cols);

extern template LsaStatus solve_lsa<float>(const float*, int64_t, int64_t, int64_t, int64_t, bool, int64_t*,
                                           int64_t*);
extern template LsaStatus solve_lsa<double>(const double*, int64_t, int64_t, int64_t, int64_t, bool, int64_t*,
                                            int64_t*);

}  // namespace detrcore
