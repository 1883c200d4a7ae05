// Entry points of the kernels that other kernels call directly (one library; see build.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace incentive {

// [M, N1 + N2 + ...] = x W1^T | x W2^T | ... for a few rows of x (small_rows.cpp).
at::Tensor small_rows_linear(const at::Tensor& x, at::TensorList weights);

// q [rows, heads, dim], keys and values [cache rows, kv_heads, length, dim], allowed [rows, length] bool
// -> [rows, heads, dim]; row r attends to cache row c = cache_rows[r] (r itself where cache_rows is null, and
// then the cache has exactly `rows` rows), its first prefix_length positions read from cache row
// prefix_rows[c] where prefix_rows is not null: the rows of one prompt share one copy of it
// (decode_attention.cpp).
at::Tensor decode_attention_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                 const at::Tensor& allowed, double scale, const int64_t* cache_rows,
                                 const int64_t* prefix_rows, int64_t prefix_length);

// out[i] = silu(g[i]) * u[i] for i in [begin, end) (swiglu.cpp).
void swiglu_range(const float* g, const float* u, float* out, int64_t begin, int64_t end);

}  // namespace incentive
