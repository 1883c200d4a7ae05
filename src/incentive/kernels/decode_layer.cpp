// One decoder layer of a Llama-family model for one new token per row (decode steps), as one op.
//
// Called op by op from Python, a layer is ~15 ops (norms, rotary halves and products, cache writes, residual
// adds, the activation) between its four products, and each costs far more inside the decode loop than alone
// (removing one element-wise op on the hidden states from every layer saved ~60 us per layer, 2-core Xeon).
// Here they are plain loops over a few rows between direct calls of the product, attention and activation
// kernels: RMSNorm, rotary embedding of q and k (rotate_half convention), the new key and value written into
// the preallocated cache at `length`, attention, o projection plus residual, RMSNorm, gate/up, SwiGLU, down
// projection plus residual.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>

#include "kernels.h"
#include "vector_math.h"

namespace {

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight for each of `rows` rows of d floats.
__attribute__((target("avx512f"))) void rms_norm_rows(const float* x, const float* weight, float eps,
                                                      int64_t rows, int64_t d, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(incentive::lanes(d - j), xr + j);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / d + eps));
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 m = incentive::lanes(d - j);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + j), inverse);
      _mm512_mask_storeu_ps(out + r * d + j, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, weight + j)));
    }
  }
}

// dst = src * cos + rotate_half(src) * sin, rotate_half(s) = [-s[half:], s[:half]].
void rotate(const float* src, const float* cos, const float* sin, int64_t dim, float* dst) {
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < half; ++j) dst[j] = src[j] * cos[j] + -src[j + half] * sin[j];
  for (int64_t j = half; j < dim; ++j) dst[j] = src[j] * cos[j] + src[j - half] * sin[j];
}

void add_into(float* out, const float* residual, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = residual[i] + out[i];
}

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "decode_layer: ", what,
              " must be float32 on the CPU");
}

}  // namespace

namespace incentive {

// hidden [rows, d] -> the layer's output [rows, d]; writes the rows' new key and value at position `length`
// of key_buffer / value_buffer [cache rows, kv_heads, capacity, head_dim], row r in cache row cache_rows[r]
// (r itself without cache_rows: rows that finished leave the batch without copying the cache); attention reads
// the first prefix_length positions of cache row c from cache row prefix_rows[c] where prefix_rows is given (the
// rows of one prompt share one copy of it); allowed [rows, length + 1] bool covers the cache and the new token;
// cos, sin [rows, head_dim].
at::Tensor decode_layer(const at::Tensor& hidden, const at::Tensor& input_norm, const at::Tensor& post_norm,
                        double eps, at::TensorList qkv, const at::Tensor& o, at::TensorList gate_up,
                        const at::Tensor& down, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& key_buffer, at::Tensor& value_buffer,
                        const std::optional<at::Tensor>& cache_rows,
                        const std::optional<at::Tensor>& prefix_rows, int64_t prefix_length, int64_t length,
                        const at::Tensor& allowed, double scale, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "decode_layer: the CPU has no AVX-512");
  TORCH_CHECK(hidden.dim() == 2, "decode_layer: hidden must be [rows, d]");
  for (const at::Tensor& t : {hidden, input_norm, post_norm, cos, sin, key_buffer, value_buffer})
    check_float(t, "every tensor");
  const int64_t rows = hidden.size(0), d = hidden.size(1), dim = cos.size(-1);
  TORCH_CHECK(input_norm.numel() == d && post_norm.numel() == d, "decode_layer: norm weights of size d");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == rows && sin.sizes() == cos.sizes() && dim % 2 == 0,
              "decode_layer: cos and sin [rows, head_dim] expected");
  const at::Tensor picked = cache_rows.has_value() ? cache_rows->contiguous() : at::Tensor();
  TORCH_CHECK(!picked.defined() || (picked.scalar_type() == at::kLong && picked.dim() == 1 &&
                                    picked.size(0) == rows && picked.device().is_cpu()),
              "decode_layer: cache_rows must be one int64 cache row per row");
  const int64_t* index = picked.defined() ? picked.data_ptr<int64_t>() : nullptr;
  const at::Tensor sources = prefix_rows.has_value() ? prefix_rows->contiguous() : at::Tensor();
  TORCH_CHECK(!sources.defined() || (sources.scalar_type() == at::kLong && sources.dim() == 1 &&
                                     sources.size(0) == key_buffer.size(0) && sources.device().is_cpu()),
              "decode_layer: prefix_rows must be one int64 cache row per cache row");
  const int64_t* shared = sources.defined() ? sources.data_ptr<int64_t>() : nullptr;
  TORCH_CHECK(key_buffer.dim() == 4 && (index != nullptr || key_buffer.size(0) == rows) &&
                  key_buffer.size(1) == kv_heads &&
                  key_buffer.size(3) == dim && value_buffer.sizes() == key_buffer.sizes() &&
                  key_buffer.stride(3) == 1 && value_buffer.stride(3) == 1,
              "decode_layer: key and value buffers [rows, kv_heads, capacity, head_dim] expected");
  TORCH_CHECK(0 <= length && length < key_buffer.size(2), "decode_layer: KV cache full: ", length + 1,
              " positions, capacity ", key_buffer.size(2));
  for (int64_t r = 0; index != nullptr && r < rows; ++r)
    TORCH_CHECK(0 <= index[r] && index[r] < key_buffer.size(0), "decode_layer: cache row ", index[r], " of row ",
                r, " is outside the cache's ", key_buffer.size(0), " rows");
  TORCH_CHECK(gate_up.size() == 2 && gate_up[0].sizes() == gate_up[1].sizes(),
              "decode_layer: gate and up weights of one shape expected");
  const at::Tensor h = hidden.contiguous();
  const at::Tensor in_w = input_norm.contiguous(), post_w = post_norm.contiguous();
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  const float epsilon = static_cast<float>(eps);

  at::Tensor x = at::empty_like(h);
  rms_norm_rows(h.data_ptr<float>(), in_w.data_ptr<float>(), epsilon, rows, d, x.data_ptr<float>());
  const at::Tensor projected = small_rows_linear(x, qkv);
  TORCH_CHECK(projected.size(1) == (heads + 2 * kv_heads) * dim,
              "decode_layer: q, k, v widths do not match the heads");
  at::Tensor q = at::empty({rows, heads, dim}, h.options());
  const float* pp = projected.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* kp = key_buffer.data_ptr<float>();
  float* vp = value_buffer.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = pp + r * projected.size(1);
    const int64_t cache_row = index != nullptr ? index[r] : r;
    for (int64_t head = 0; head < heads; ++head)
      rotate(row + head * dim, cp + r * dim, sp + r * dim, dim,
             q.data_ptr<float>() + (r * heads + head) * dim);
    for (int64_t head = 0; head < kv_heads; ++head) {
      float* key =
          kp + cache_row * key_buffer.stride(0) + head * key_buffer.stride(1) + length * key_buffer.stride(2);
      float* value =
          vp + cache_row * value_buffer.stride(0) + head * value_buffer.stride(1) + length * value_buffer.stride(2);
      rotate(row + (heads + head) * dim, cp + r * dim, sp + r * dim, dim, key);
      std::memcpy(value, row + (heads + kv_heads + head) * dim, sizeof(float) * dim);
    }
  }
  const at::Tensor attended =
      decode_attention_rows(q, key_buffer.narrow(2, 0, length + 1), value_buffer.narrow(2, 0, length + 1), allowed,
                            scale, index, shared, prefix_length);

  at::Tensor mid = small_rows_linear(attended.view({rows, heads * dim}), {o});
  TORCH_CHECK(mid.size(1) == d, "decode_layer: the o projection must return d features");
  add_into(mid.data_ptr<float>(), h.data_ptr<float>(), rows * d);
  rms_norm_rows(mid.data_ptr<float>(), post_w.data_ptr<float>(), epsilon, rows, d, x.data_ptr<float>());
  const at::Tensor gu = small_rows_linear(x, gate_up);
  const int64_t inner = gate_up[0].size(0);
  at::Tensor act = at::empty({rows, inner}, h.options());
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gu.data_ptr<float>() + r * 2 * inner;
    swiglu_range(g, g + inner, act.data_ptr<float>() + r * inner, 0, inner);
  }
  at::Tensor out = small_rows_linear(act, {down});
  TORCH_CHECK(out.size(1) == d, "decode_layer: the down projection must return d features");
  add_into(out.data_ptr<float>(), mid.data_ptr<float>(), rows * d);
  return out;
}

}  // namespace incentive

TORCH_LIBRARY_FRAGMENT(incentive_kernels, lib) {
  lib.def(
      "decode_layer(Tensor hidden, Tensor input_norm, Tensor post_norm, float eps, Tensor[] qkv, Tensor o, "
      "Tensor[] gate_up, Tensor down, Tensor cos, Tensor sin, Tensor(a!) key_buffer, "
      "Tensor(b!) value_buffer, Tensor? cache_rows, Tensor? prefix_rows, int prefix_length, int length, "
      "Tensor allowed, float scale, int heads, "
      "int kv_heads) -> Tensor",
      &incentive::decode_layer);
}
