// y = x W^T for a few rows of x (decode steps), AVX-512: W read once, in the row-major layout of nn.Linear.
//
// Each thread walks a contiguous range of W's rows (one sequential stream), four rows at a time, and asks for
// the group two ahead into L2 while it computes. Each group of four rows stays in L1 while every row of x
// (six at a time) is multiplied with it. Sums run in 16-lane partial sums over K and are reduced at the end
// in a fixed order: the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"
#include "vector_math.h"

namespace {

constexpr int64_t kGroupRows = 4;       // rows of W multiplied together
constexpr int64_t kTileRows = 6;        // rows of x multiplied together: 6 x 4 accumulators
constexpr int64_t kPrefetchGroups = 2;  // how far ahead of the current group W is prefetched
constexpr int64_t kLanes = 16;

// y[0:Rows, 0:Cols] = x[0:Rows, 0:k] . w[0:Cols, 0:k]^T; prefetches ahead[0:Cols, 0:k] unless it is null.
template <int64_t Rows, int64_t Cols>
__attribute__((target("avx512f"))) void tile(const float* x, const float* w, int64_t k, float* y, int64_t ldy,
                                             const float* ahead) {
  __m512 acc[Rows][Cols];
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t c = 0; c < Cols; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    __m512 wv[Cols];
    for (int64_t c = 0; c < Cols; ++c) wv[c] = _mm512_loadu_ps(w + c * k + i);
    if (ahead != nullptr)
      for (int64_t c = 0; c < Cols; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + c * k + i), _MM_HINT_T1);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * k + i);
      for (int64_t c = 0; c < Cols; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (i < k) {
    const __mmask16 tail = incentive::lanes(k - i);
    __m512 wv[Cols];
    for (int64_t c = 0; c < Cols; ++c) wv[c] = _mm512_maskz_loadu_ps(tail, w + c * k + i);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + r * k + i);
      for (int64_t c = 0; c < Cols; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < Rows; ++r)
    for (int64_t c = 0; c < Cols; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
}

// y[0:m, 0:Cols] = x[0:m, 0:k] . w[0:Cols, 0:k]^T, six rows of x at a time; the first tile prefetches.
template <int64_t Cols>
void group(const float* x, int64_t m, const float* w, int64_t k, float* y, int64_t ldy, const float* ahead) {
  int64_t r = 0;
  for (; r + kTileRows <= m; r += kTileRows)
    tile<kTileRows, Cols>(x + r * k, w, k, y + r * ldy, ldy, r == 0 ? ahead : nullptr);
  const float* xr = x + r * k;
  float* yr = y + r * ldy;
  const float* pf = r == 0 ? ahead : nullptr;
  switch (m - r) {
    case 5: tile<5, Cols>(xr, w, k, yr, ldy, pf); break;
    case 4: tile<4, Cols>(xr, w, k, yr, ldy, pf); break;
    case 3: tile<3, Cols>(xr, w, k, yr, ldy, pf); break;
    case 2: tile<2, Cols>(xr, w, k, yr, ldy, pf); break;
    case 1: tile<1, Cols>(xr, w, k, yr, ldy, pf); break;
    default: break;
  }
}

// One weight's rows [begin, end) as a part of the output's columns.
struct Part {
  const float* weight;
  int64_t rows;
  int64_t column;  // first output column
  int64_t first_group;
};

}  // namespace

namespace incentive {

// [M, N1 + N2 + ...] = x W1^T | x W2^T | ...: one pass over all weights in one parallel region, so that the
// projections of one input (q, k, v; gate, up) cost one call.
at::Tensor small_rows_linear(const at::Tensor& x, at::TensorList weights) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "small_rows_linear: x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(!weights.empty(), "small_rows_linear: no weights");
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "small_rows_linear: the CPU has no AVX-512");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  std::vector<at::Tensor> owned;
  std::vector<Part> parts;
  int64_t columns = 0, groups = 0;
  for (const at::Tensor& weight : weights) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k,
                "small_rows_linear: x [M, K] and weights [N, K] expected");
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
                "small_rows_linear: float32 CPU weights only");
    owned.push_back(weight.contiguous());
    parts.push_back({owned.back().data_ptr<float>(), weight.size(0), columns, groups});
    columns += weight.size(0);
    groups += (weight.size(0) + kGroupRows - 1) / kGroupRows;
  }
  at::Tensor y = at::empty({m, columns}, xc.options());
  if (m == 0 || columns == 0) return y;
  if (k == 0) return y.zero_();
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    size_t p = 0;
    for (int64_t g = begin; g < end; ++g) {
      while (p + 1 < parts.size() && parts[p + 1].first_group <= g) ++p;
      const Part& part = parts[p];
      const int64_t row = (g - part.first_group) * kGroupRows;
      const float* wp = part.weight;
      float* yb = yp + part.column + row;
      if (row + kGroupRows <= part.rows) {
        const int64_t next = row + kPrefetchGroups * kGroupRows;
        const float* ahead = next + kGroupRows <= part.rows ? wp + next * k : nullptr;
        group<kGroupRows>(xp, m, wp + row * k, k, yb, columns, ahead);
      } else {
        for (int64_t c = row; c < part.rows; ++c)
          group<1>(xp, m, wp + c * k, k, yb + (c - row), columns, nullptr);
      }
    }
  });
  return y;
}

}  // namespace incentive

TORCH_LIBRARY(incentive_kernels, lib) {
  lib.def("small_rows_linear(Tensor x, Tensor[] weights) -> Tensor", &incentive::small_rows_linear);
}
