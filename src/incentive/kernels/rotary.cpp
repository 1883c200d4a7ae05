// Rotary position embedding of queries and keys laid out [tokens, heads, head_dim], and its gradient, in one
// pass each (AVX-512).
//
// transformers computes x * cos + rotate_half(x) * sin as five element-wise ops each way (two products, a
// negation, a concatenation and a sum; ~2.8 ms forward and backward for 611 tokens of 9 + 3 heads of 64).
// With x = [x1, x2] and the halves of cos and sin likewise:
//   forward:  [x1 c1 - x2 s1, x2 c2 + x1 s2]
//   backward: [g1 c1 + g2 s2, g2 c2 - g1 s1]
// each product rounded before the sum, as PyTorch's separate ops do, so both agree with them bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <tuple>

#include "vector_math.h"

namespace {

// No fused multiply-adds (GCC contracts these intrinsics by default): each product is rounded, as in PyTorch.
__attribute__((target("avx512f"), optimize("fp-contract=off"))) void rotate_token(const float* x, float* out, const float* c,
                                                     const float* s, int64_t heads, int64_t half,
                                                     bool backward) {
  for (int64_t h = 0; h < heads; ++h) {
    const float* xh = x + h * 2 * half;
    float* oh = out + h * 2 * half;
    for (int64_t i = 0; i < half; i += 16) {
      const __mmask16 m = incentive::lanes(half - i);
      const __m512 x1 = _mm512_maskz_loadu_ps(m, xh + i), x2 = _mm512_maskz_loadu_ps(m, xh + half + i);
      const __m512 c1 = _mm512_maskz_loadu_ps(m, c + i), c2 = _mm512_maskz_loadu_ps(m, c + half + i);
      const __m512 s1 = _mm512_maskz_loadu_ps(m, s + i), s2 = _mm512_maskz_loadu_ps(m, s + half + i);
      __m512 first, second;
      if (backward) {
        first = _mm512_add_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(x2, s2));
        second = _mm512_sub_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s1));
      } else {
        first = _mm512_sub_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(x2, s1));
        second = _mm512_add_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s2));
      }
      _mm512_mask_storeu_ps(oh + i, m, first);
      _mm512_mask_storeu_ps(oh + half + i, m, second);
    }
  }
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  TORCH_CHECK(x.dim() == 3, "rotary: x must be [tokens, heads, head_dim], got ", x.sizes());
  TORCH_CHECK(x.size(2) % 2 == 0, "rotary: odd head_dim ", x.size(2));
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2),
              "rotary: cos and sin must be [tokens, head_dim] = [", x.size(0), ", ", x.size(2), "], got ",
              cos.sizes(), " and ", sin.sizes());
  for (const at::Tensor* t : {&x, &cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "rotary: float32 CPU tensors only");
  }
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "rotary: the CPU has no AVX-512");
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t heads = xc.size(1), dim = xc.size(2);
  const float* xp = xc.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, xc.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      rotate_token(xp + n * heads * dim, op + n * heads * dim, cp + n * dim, sp + n * dim, heads, dim / 2,
                   backward);
    }
  });
  return out;
}

at::Tensor rotary_forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rotate(x, cos, sin, false);
}

at::Tensor rotary_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin) {
  return rotate(grad, cos, sin, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(incentive_kernels, lib) {
  lib.def("rotary_forward(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rotary_forward);
  lib.def("rotary_backward(Tensor grad, Tensor cos, Tensor sin) -> Tensor", &rotary_backward);
}
