// Attention of one new query token per row over its cached keys and values (decode steps), AVX-512.
//
// One task per (row, key/value head) computes the G = heads / kv_heads queries that share the head, reading
// each key and value once for all of them: scaled dot products with every allowed key, an exact softmax (max
// subtracted, vectorised exp), and the weighted sum of the values. Disallowed positions get weight 0. Every
// sum runs in a fixed order: the result does not depend on the thread count.
//
// Rows sampled from one prompt hold the same keys and values for its positions. Given, for each cache row, the
// cache row whose copy of the prompt to read (prefix_rows) and the prompt's length, every row of a group reads
// that one copy, and tasks run head by head over consecutive rows, so a group's rows find its prompt's keys
// and values in the cache instead of each streaming its own copy from memory. The values read are the same.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "vector_math.h"

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kAhead = 8;  // positions ahead whose key and value rows are prefetched (pages end streams)

// One key/value head of one row: positions before `prefix` are read from the prefix_* rows (a shared copy of
// the prompt), the others from the row's own keys / values; all four point at position 0 of their rows.
struct Head {
  const float* keys;
  const float* values;
  const float* prefix_keys;
  const float* prefix_values;
  int64_t prefix;
  int64_t key_stride;
  int64_t value_stride;

  const float* key(int64_t l) const { return (l < prefix ? prefix_keys : keys) + l * key_stride; }
  const float* value(int64_t l) const { return (l < prefix ? prefix_values : values) + l * value_stride; }
};

// out[g, 0:dim] = softmax(scale * q[g] . K^T over allowed positions) . V for the G queries q[0:G] (rows of
// dim floats) that share one key/value head: each key and value row is read once for all G.
template <int64_t G>
__attribute__((target("avx512f"))) void attend_group(const float* q, const Head& head, const bool* allowed,
                                                     int64_t length, int64_t dim, float scale, float* weights,
                                                     float* out) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  float top[G];
  for (int64_t g = 0; g < G; ++g) top[g] = minus_inf;
  for (int64_t l = 0; l < length; ++l) {
    if (!allowed[l]) {
      for (int64_t g = 0; g < G; ++g) weights[g * length + l] = minus_inf;
      continue;
    }
    const float* k = head.key(l);
    if (l + kAhead < length) {
      const float* ahead = head.key(l + kAhead);
      for (int64_t d = 0; d < dim; d += kLanes)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + d), _MM_HINT_T0);
    }
    __m512 acc[G];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += kLanes) {
      const __mmask16 m = incentive::lanes(dim - d);
      const __m512 kv = _mm512_maskz_loadu_ps(m, k + d);
      for (int64_t g = 0; g < G; ++g)
        acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + g * dim + d), kv, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) {
      const float score = _mm512_reduce_add_ps(acc[g]) * scale;
      weights[g * length + l] = score;
      top[g] = std::max(top[g], score);
    }
  }
  float inverse[G];
  for (int64_t g = 0; g < G; ++g) {
    float* w = weights + g * length;
    if (top[g] == minus_inf) {  // nothing allowed: zeros (SDPA would give NaN)
      for (int64_t l = 0; l < length; ++l) w[l] = 0.0f;
      inverse[g] = 0.0f;
      continue;
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < length; l += kLanes) {
      const __mmask16 m = incentive::lanes(length - l);
      const __m512 s = _mm512_maskz_loadu_ps(m, w + l);
      const __mmask16 live = _mm512_mask_cmp_ps_mask(m, s, _mm512_set1_ps(minus_inf), _CMP_NEQ_OQ);
      const __m512 e = incentive::exp_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(top[g])));
      const __m512 p = _mm512_maskz_mov_ps(live, e);
      _mm512_mask_storeu_ps(w + l, m, p);
      total = _mm512_add_ps(total, p);
    }
    inverse[g] = 1.0f / _mm512_reduce_add_ps(total);
  }
  for (int64_t d = 0; d < dim; d += kLanes) {
    const __mmask16 m = incentive::lanes(dim - d);
    __m512 acc[G];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t l = 0; l < length; ++l) {
      if (d == 0 && l + kAhead < length) {
        const float* ahead = head.value(l + kAhead);
        for (int64_t e = 0; e < dim; e += kLanes)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + e), _MM_HINT_T0);
      }
      if (!allowed[l]) continue;
      const __m512 vv = _mm512_maskz_loadu_ps(m, head.value(l) + d);
      for (int64_t g = 0; g < G; ++g)
        acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(weights[g * length + l]), vv, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g)
      _mm512_mask_storeu_ps(out + g * dim + d, m, _mm512_mul_ps(acc[g], _mm512_set1_ps(inverse[g])));
  }
}

// The G queries of one key/value head; groups of up to 8 in one pass over the keys and values.
void attend_head(const float* q, const Head& head, const bool* allowed, int64_t length, int64_t dim, float scale,
                 int64_t group, float* weights, float* out) {
  int64_t g = 0;
  for (; g + 8 <= group; g += 8)
    attend_group<8>(q + g * dim, head, allowed, length, dim, scale, weights, out + g * dim);
  const float* qg = q + g * dim;
  float* og = out + g * dim;
  switch (group - g) {
#define INCENTIVE_GROUP(n)                                                    \
  case n:                                                                     \
    attend_group<n>(qg, head, allowed, length, dim, scale, weights, og); \
    break;
    INCENTIVE_GROUP(7)
    INCENTIVE_GROUP(6)
    INCENTIVE_GROUP(5)
    INCENTIVE_GROUP(4)
    INCENTIVE_GROUP(3)
    INCENTIVE_GROUP(2)
    INCENTIVE_GROUP(1)
#undef INCENTIVE_GROUP
    default:
      break;
  }
}

}  // namespace

namespace incentive {

// q [rows, heads, dim]; keys, values [cache rows, kv_heads, length, dim] (any strides, unit stride along dim);
// allowed [rows, length] bool -> [rows, heads, dim]; row r reads cache row c = cache_rows[r] (or r), and its
// first prefix_length positions from cache row prefix_rows[c] (where prefix_rows is not null).
at::Tensor decode_attention_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                 const at::Tensor& allowed, double scale, const int64_t* cache_rows,
                                 const int64_t* prefix_rows, int64_t prefix_length) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "decode_attention: q [rows, heads, dim] and keys, values [rows, kv_heads, length, dim] "
              "expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat && q.device().is_cpu() && keys.device().is_cpu() &&
                  values.device().is_cpu(),
              "decode_attention: float32 CPU tensors only");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), length = keys.size(2);
  TORCH_CHECK((cache_rows != nullptr || keys.size(0) == rows) && keys.size(3) == dim && kv_heads > 0 &&
                  heads % kv_heads == 0,
              "decode_attention: shapes of q and keys do not match");
  for (int64_t r = 0; cache_rows != nullptr && r < rows; ++r)
    TORCH_CHECK(0 <= cache_rows[r] && cache_rows[r] < keys.size(0), "decode_attention: cache row ", cache_rows[r],
                " of row ", r, " is outside the cache's ", keys.size(0), " rows");
  TORCH_CHECK(prefix_rows == nullptr || (0 <= prefix_length && prefix_length <= length),
              "decode_attention: a shared prefix of ", prefix_length, " positions in a cache of ", length);
  for (int64_t c = 0; prefix_rows != nullptr && c < keys.size(0); ++c)
    TORCH_CHECK(0 <= prefix_rows[c] && prefix_rows[c] < keys.size(0), "decode_attention: prefix row ",
                prefix_rows[c], " of cache row ", c, " is outside the cache's ", keys.size(0), " rows");
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.dim() == 2 && allowed.size(0) == rows &&
                  allowed.size(1) == length,
              "decode_attention: allowed must be a [rows, length] bool tensor");
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "decode_attention: the CPU has no AVX-512");
  const at::Tensor qc = q.contiguous();
  const at::Tensor kc = keys.stride(3) == 1 ? keys : keys.contiguous();
  const at::Tensor vc = values.stride(3) == 1 ? values : values.contiguous();
  const at::Tensor mask = allowed.contiguous();
  at::Tensor out = at::empty({rows, heads, dim}, qc.options());
  const int64_t group = heads / kv_heads;
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(static_cast<size_t>(8 * length));
    for (int64_t task = begin; task < end; ++task) {  // head by head: a group's rows follow one another
      const int64_t head = task / rows, row = task % rows;
      const int64_t cache_row = cache_rows != nullptr ? cache_rows[row] : row;
      const int64_t source = prefix_rows != nullptr ? prefix_rows[cache_row] : cache_row;
      const Head h{kp + cache_row * kc.stride(0) + head * kc.stride(1),
                   vp + cache_row * vc.stride(0) + head * vc.stride(1),
                   kp + source * kc.stride(0) + head * kc.stride(1),
                   vp + source * vc.stride(0) + head * vc.stride(1),
                   prefix_rows != nullptr ? prefix_length : 0,
                   kc.stride(2),
                   vc.stride(2)};
      const int64_t first = row * heads + head * group;
      attend_head(qp + first * dim, h, mp + row * length, length, dim, static_cast<float>(scale), group,
                  weights.data(), op + first * dim);
    }
  });
  return out;
}

}  // namespace incentive

namespace {

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& allowed, double scale) {
  return incentive::decode_attention_rows(q, keys, values, allowed, scale, nullptr, nullptr, 0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(incentive_kernels, lib) {
  lib.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor allowed, float scale) -> Tensor",
          &decode_attention);
}
