// Frozen (inference-mode) batch norm over NCHW, with the residual add and ReLU of a ResNet block fused in:
//   y = act(x * scale[c] + shift[c] + r)          act: ReLU or identity; r: a residual of x's shape, or none
// and its backward, from the output y (ReLU: y > 0 exactly where the pre-activation was positive):
//   grad_r = relu ? (y > 0 ? g : 0) : g,   grad_x = grad_r * scale[c]
// One pass over memory each way (torch: batch_norm, add, relu_ forward; threshold_backward and a multiply
// backward). x, r, y, g, grads: [N, C, HW] contiguous of T = float, double or BFloat16 (computed in float, rounded
// once); scale, shift: [C] in the compute type S (float for float and bfloat16, double for double).
#pragma once
#include <cstdint>

#include "elem.h"

namespace detrcore {

template <typename T>
void frozen_bn_cpu(const T* x, const T* r, const typename Elem<T>::C* scale, const typename Elem<T>::C* shift, T* y,
                   int64_t N, int64_t C, int64_t HW, bool relu, int num_threads);

// grad_r may be null (no residual); y is read only with relu.
template <typename T>
void frozen_bn_bwd_cpu(const T* grad, const T* y, const typename Elem<T>::C* scale, T* grad_x, T* grad_r, int64_t N,
                       int64_t C, int64_t HW, bool relu, int num_threads);

}  // namespace detrcore
