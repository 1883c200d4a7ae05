// One sampled token per row from vocabulary-wide logits at a temperature, by inverse CDF (AVX-512).
//
// The decode loop's PyTorch sampler makes the scaled logits, their log-softmax, its exp, a float64 cumulative
// sum and a search: five sweeps and four allocations of [rows, vocabulary] per step (~1.4 ms at 16 rows of a
// 49k vocabulary). Here each row is read three times in one task: its maximum, the sum of exponentials (the
// log-sum-exp), then the probabilities (kept in a scratch row) and their float64 total; the token is the first
// whose running float64 sum exceeds uniform * total, found block by block. Rows run in parallel, each summed in
// a fixed order: deterministic and independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "vector_math.h"

namespace {

constexpr int64_t kLanes = 16;

__attribute__((target("avx512f"))) double sum_as_double(__m512 v) {
  const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm512_reduce_add_pd(_mm512_add_pd(low, high));
}

// The first i whose running float64 sum of probs[0:i+1] exceeds target, skipping whole blocks of kLanes while
// their sum stays at or below it; n - 1 if rounding leaves the total short of it.
__attribute__((target("avx512f"))) int64_t first_past(const float* probs, int64_t n, double target) {
  double running = 0.0;
  for (int64_t j = 0; j < n; j += kLanes) {
    const double block = sum_as_double(_mm512_loadu_ps(probs + j));
    if (running + block <= target) {
      running += block;
      continue;
    }
    for (int64_t i = j; i < std::min(n, j + kLanes); ++i) {
      running += probs[i];
      if (running > target) return i;
    }
  }
  return n - 1;
}

// The token drawn from row x[0:n] with scale = 1 / temperature and a uniform in [0, 1); its logprob into *logprob.
__attribute__((target("avx512f"))) int64_t sample_row(const float* x, int64_t n, float scale, double uniform,
                                                      float* probs, float* logprob) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += kLanes)
    top = _mm512_mask_max_ps(top, incentive::lanes(n - j), top, _mm512_loadu_ps(x + j));
  const float m = _mm512_reduce_max_ps(top) * scale;
  const __m512 sv = _mm512_set1_ps(scale), mv = _mm512_set1_ps(m);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += kLanes) {
    const __m512 xv = _mm512_maskz_loadu_ps(incentive::lanes(n - j), x + j);
    const __mmask16 live = _mm512_mask_cmp_ps_mask(incentive::lanes(n - j), xv, minus_inf, _CMP_NEQ_OQ);
    const __m512 e = incentive::exp_nonpositive(_mm512_min_ps(_mm512_fmsub_ps(xv, sv, mv), _mm512_setzero_ps()));
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
  }
  const float lse = m + std::log(_mm512_reduce_add_ps(total));
  const __m512 lv = _mm512_set1_ps(lse);
  double mass = 0.0;
  for (int64_t j = 0; j < n; j += kLanes) {
    const __m512 xv = _mm512_maskz_loadu_ps(incentive::lanes(n - j), x + j);
    const __mmask16 live = _mm512_mask_cmp_ps_mask(incentive::lanes(n - j), xv, minus_inf, _CMP_NEQ_OQ);
    const __m512 p = _mm512_maskz_mov_ps(
        live, incentive::exp_nonpositive(_mm512_min_ps(_mm512_fmsub_ps(xv, sv, lv), _mm512_setzero_ps())));
    _mm512_storeu_ps(probs + j, p);  // zero past n and for -inf logits: never drawn
    mass += sum_as_double(p);
  }
  const int64_t token = first_past(probs, n, uniform * mass);
  *logprob = x[token] * scale - lse;
  return token;
}

// logits [rows, vocabulary] float32, uniforms [rows] float64 in [0, 1) -> (tokens [rows] int64, logprobs [rows]
// float32 at the temperature).
std::tuple<at::Tensor, at::Tensor> sample_tokens(const at::Tensor& logits, double temperature,
                                                 const at::Tensor& uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.scalar_type() == at::kFloat &&
                  logits.device().is_cpu(),
              "sample_tokens: float32 CPU logits [rows, vocabulary] expected");
  TORCH_CHECK(uniforms.dim() == 1 && uniforms.size(0) == logits.size(0) &&
                  uniforms.scalar_type() == at::kDouble,
              "sample_tokens: one float64 uniform per row expected");
  TORCH_CHECK(temperature > 0, "sample_tokens: the temperature must be positive (0 is greedy, not sampled)");
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "sample_tokens: the CPU has no AVX-512");
  const at::Tensor x = logits.contiguous(), u = uniforms.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor tokens = at::empty({rows}, x.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({rows}, x.options());
  const float* xp = x.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  const float scale = static_cast<float>(1.0 / temperature);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(static_cast<size_t>((n + kLanes - 1) / kLanes * kLanes));
    for (int64_t r = begin; r < end; ++r) tp[r] = sample_row(xp + r * n, n, scale, up[r], probs.data(), lp + r);
  });
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(incentive_kernels, lib) {
  lib.def("sample_tokens(Tensor logits, float temperature, Tensor uniforms) -> (Tensor, Tensor)", &sample_tokens);
}
