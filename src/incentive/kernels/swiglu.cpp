// silu(gate) * up, the activation of Llama-family MLPs, and its gradients, in one pass each way (AVX-512).
//
// PyTorch runs it as silu, then a product, and the backward pass as two products and silu's backward: five
// passes over [tokens, intermediate] tensors and one more saved activation. The sigmoid comes from
// e = exp(-|g|): 1 / (1 + e) for g >= 0, e / (1 + e) below, so exp never overflows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <tuple>

#include "kernels.h"
#include "vector_math.h"

namespace {

constexpr int64_t kGrain = 16384;

__attribute__((target("avx512f"))) __m512 sigmoid(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = incentive::exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 inverse = _mm512_div_ps(one, _mm512_add_ps(one, e));
  const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_mul_ps(inverse, negative, e, inverse);
}

}  // namespace

namespace incentive {

__attribute__((target("avx512f"))) void swiglu_range(const float* g, const float* u, float* out,
                                                     int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 m = incentive::lanes(end - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 uv = _mm512_maskz_loadu_ps(m, u + i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid(gv)), uv));
  }
}

}  // namespace incentive

namespace {

void check(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes(), what, ": tensors of different shapes");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.device().is_cpu() &&
                  b.device().is_cpu(),
              what, ": float32 CPU tensors only");
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), what, ": the CPU has no AVX-512");
}

__attribute__((target("avx512f"))) void backward_range(const float* d, const float* g, const float* u,
                                                       float* dg, float* du, int64_t begin, int64_t end) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = begin; i < end; i += 16) {
    const __mmask16 m = incentive::lanes(end - i);
    const __m512 dv = _mm512_maskz_loadu_ps(m, d + i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 uv = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 s = sigmoid(gv);
    const __m512 silu = _mm512_mul_ps(gv, s);
    // d silu / dg = s (1 + g (1 - s))
    const __m512 slope = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
    _mm512_mask_storeu_ps(dg + i, m, _mm512_mul_ps(_mm512_mul_ps(dv, uv), slope));
    _mm512_mask_storeu_ps(du + i, m, _mm512_mul_ps(dv, silu));
  }
}

at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check(gate, up, "swiglu_forward");
  const at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, g.numel(), kGrain,
                   [&](int64_t begin, int64_t end) { incentive::swiglu_range(gp, upp, op, begin, end); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check(gate, up, "swiglu_backward");
  check(grad, gate, "swiglu_backward");
  const at::Tensor d = grad.contiguous(), g = gate.contiguous(), u = up.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
  const float* dp = d.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* dgp = dg.data_ptr<float>();
  float* dup = du.data_ptr<float>();
  at::parallel_for(0, g.numel(), kGrain,
                   [&](int64_t begin, int64_t end) { backward_range(dp, gp, upp, dgp, dup, begin, end); });
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(incentive_kernels, lib) {
  lib.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor", &swiglu_forward);
  lib.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)", &swiglu_backward);
}
