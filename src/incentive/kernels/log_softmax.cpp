// Log-softmax at given tokens over rows of a vocabulary-wide logits chunk, and its gradient made in place
// (AVX-512), for the fused LM head (lm_head.py).
//
// PyTorch's logsumexp, the subtraction, exp and products of the backward pass each allocate or sweep a
// [positions, vocabulary] tensor (50 MB for 256 positions of a 49k vocabulary); here the forward pass reads
// each row twice (max, then the sum of exponentials) and the backward pass rewrites the logits into their
// gradient in one sweep. Each row is summed in a fixed order by one thread: deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "vector_math.h"

namespace {

void check(const at::Tensor& logits, const at::Tensor& tokens, double scale, const char* what) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), what, ": contiguous [rows, vocabulary] logits");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.device().is_cpu(), what,
              ": float32 CPU logits only");
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == logits.size(0) && tokens.scalar_type() == at::kLong,
              what, ": one int64 token per row");
  TORCH_CHECK(scale > 0, what, ": the scale (1 / temperature) must be positive");
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), what, ": the CPU has no AVX-512");
  const int64_t vocabulary = logits.size(1);
  const at::Tensor t = tokens.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(0 <= tp[i] && tp[i] < vocabulary, what, ": token ", tp[i], " of row ", i,
                " is outside the vocabulary of ", vocabulary);
  }
}

// log sum_j exp(scale x_j): the largest scaled logit m first, then sum_j exp(scale x_j - m) (arguments <= 0),
// in four vector accumulators added in a fixed order.
__attribute__((target("avx512f"))) float row_logsumexp(const float* x, int64_t n, float scale) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = incentive::lanes(n - j);
    top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, x + j));
  }
  const float largest = _mm512_reduce_max_ps(top) * scale;
  const __m512 s = _mm512_set1_ps(scale), shift = _mm512_set1_ps(largest);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    for (int a = 0; a < 4; ++a) {
      const __m512 v = _mm512_fmsub_ps(_mm512_loadu_ps(x + j + 16 * a), s, shift);
      acc[a] = _mm512_add_ps(acc[a], incentive::exp_nonpositive(_mm512_min_ps(v, _mm512_setzero_ps())));
    }
  }
  for (; j < n; j += 16) {
    const __mmask16 m = incentive::lanes(n - j);
    const __m512 v = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, x + j), s, shift);
    acc[0] = _mm512_mask_add_ps(acc[0], m, acc[0],
                                incentive::exp_nonpositive(_mm512_min_ps(v, _mm512_setzero_ps())));
  }
  const __m512 total = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
  return largest + std::log(_mm512_reduce_add_ps(total));
}

// Row i of logits becomes -g_i s softmax(s x_i), plus g_i s at the row's token: the gradient of
// g_i log_softmax(s x_i)[token_i] with respect to x_i.
__attribute__((target("avx512f"))) void row_gradient(float* x, int64_t n, float scale, float lse, float g,
                                                     int64_t token) {
  const __m512 s = _mm512_set1_ps(scale), shift = _mm512_set1_ps(lse), factor = _mm512_set1_ps(-g * scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = incentive::lanes(n - j);
    const __m512 v = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, x + j), s, shift);
    const __m512 p = incentive::exp_nonpositive(_mm512_min_ps(v, _mm512_setzero_ps()));
    _mm512_mask_storeu_ps(x + j, m, _mm512_mul_ps(p, factor));
  }
  x[token] += g * scale;
}

std::tuple<at::Tensor, at::Tensor> target_log_softmax(const at::Tensor& logits, const at::Tensor& tokens,
                                                      double scale) {
  check(logits, tokens, scale, "target_log_softmax");
  const int64_t rows = logits.size(0), vocabulary = logits.size(1);
  at::Tensor logp = at::empty({rows}, logits.options()), lse = at::empty({rows}, logits.options());
  const at::Tensor t = tokens.contiguous();
  const float* xp = logits.data_ptr<float>();
  const int64_t* tp = t.data_ptr<int64_t>();
  float* lp = logp.data_ptr<float>();
  float* sp = lse.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * vocabulary;
      sp[i] = row_logsumexp(row, vocabulary, s);
      lp[i] = row[tp[i]] * s - sp[i];
    }
  });
  return {logp, lse};
}

void log_softmax_backward_(at::Tensor& logits, const at::Tensor& lse, const at::Tensor& tokens,
                           const at::Tensor& grad, double scale) {
  check(logits, tokens, scale, "log_softmax_backward_");
  const int64_t rows = logits.size(0), vocabulary = logits.size(1);
  TORCH_CHECK(lse.numel() == rows && grad.numel() == rows && lse.scalar_type() == at::kFloat &&
                  grad.scalar_type() == at::kFloat,
              "log_softmax_backward_: one float32 log-sum-exp and one gradient per row");
  const at::Tensor t = tokens.contiguous(), l = lse.contiguous(), g = grad.contiguous();
  float* xp = logits.data_ptr<float>();
  const int64_t* tp = t.data_ptr<int64_t>();
  const float* lp = l.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      row_gradient(xp + i * vocabulary, vocabulary, s, lp[i], gp[i], tp[i]);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(incentive_kernels, lib) {
  lib.def("target_log_softmax(Tensor logits, Tensor tokens, float scale) -> (Tensor, Tensor)",
          &target_log_softmax);
  lib.def(
      "log_softmax_backward_(Tensor(a!) logits, Tensor lse, Tensor tokens, Tensor grad, float scale) -> ()",
      &log_softmax_backward_);
}
