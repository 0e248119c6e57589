// clipforge C++ extension: declarations shared by the translation units in csrc/.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <tuple>

namespace clipforge {

// Rows `image` (n, d) against every row of `text` (m, d), logits = scale * image @ text^T, one chunk of
// `chunk_size` image rows at a time (0 = auto). Returns (row_lse (n), col_ref (m), col_sumexp (m)), all
// float64: complete log-sum-exps of this block's rows, and the column statistics of this block's rows
// only (sum of exp(logit - col_ref)), ready to be merged with other blocks (other ranks). col_ref is a
// per-column reference near the column's maximum: the maximum itself on the exact path, a chunk's
// log-sum-exp on the fast one. mode: 0 auto (fast float32 path where its range checks pass, else
// exact), 1 exact two-exp path only, 2 fast path or an error (for tests and benchmarks).
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& image, const at::Tensor& text, double scale, int64_t chunk_size, int64_t mode);

// Gradients of  coef * sum_i,j [exp(l_ij - row_lse_i) + exp(l_ij - col_lse_j)] - 2 coef * sum_i l_{i, i+row_offset}
// i.e. of the CLIP loss with coef = grad_output / (2 N). Returns (d_image (n, d), d_text (m, d),
// d_scale (0-d)); row_lse and col_lse are float64; mode as for the forward. d_text holds this block's contribution only (sum it over blocks/ranks).
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& image, const at::Tensor& text, double scale, const at::Tensor& row_lse,
    const at::Tensor& col_lse, int64_t row_offset, double coef, int64_t chunk_size, int64_t mode);

// SigLIP's sigmoid loss (siglip.cpp): s = scale * image @ text^T + bias, z = +1 on (i, i + row_offset), -1
// elsewhere. siglip_forward returns sum_ij softplus(-z_ij s_ij) over this block's rows (0-d float64: N x
// the loss, partial across ranks), one GEMM. siglip_forward_backward returns, in one pass of three GEMMs,
// (that sum, d_image (n, d), d_text (m, d) partial, d_scale, d_bias (0-d float64, partial)), the
// gradients of coef * the sum, i.e. with G = coef (sigmoid(s) - delta): t G Y, t G^T X, <X, G Y>, sum G.
// chunk_size: image rows per chunk of logits (0 = ~16 MiB chunks, at least 256 rows).
at::Tensor siglip_forward(const at::Tensor& image, const at::Tensor& text, double scale, double bias,
                          int64_t row_offset, int64_t chunk_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_forward_backward(
    const at::Tensor& image, const at::Tensor& text, double scale, double bias, int64_t row_offset, double coef,
    int64_t chunk_size);

// The k largest entries of every row of a @ b^T without the full matrix: (values (n, k), indices (n, k)).
std::tuple<at::Tensor, at::Tensor> chunked_topk(
    const at::Tensor& a, const at::Tensor& b, int64_t k, int64_t row_chunk, int64_t col_chunk);

// Rows per chunk so that one chunk of logits (rows x cols floats) stays near `target_bytes`.
int64_t auto_chunk_rows(int64_t rows, int64_t cols, int64_t elem_size, int64_t target_bytes);

// ------------------------------------------------------------------------ boundary checks of the losses
// Features: CPU, float32 / float64, 2-D, contiguous; a pair of them: one dtype, one feature dimension.
inline void check_loss_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "clipforge._C: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "clipforge._C: ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "clipforge._C: ", name, " must be 2-D (rows, dim), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "clipforge._C: ", name, " must be contiguous (call .contiguous())");
}

inline void check_loss_pair(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  check_loss_features(a, na);
  check_loss_features(b, nb);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "clipforge._C: ", na, " and ", nb,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(1), "clipforge._C: ", na, " and ", nb,
              " must have the same feature dimension, got ", a.size(1), " and ", b.size(1));
}

// ------------------------------------------------------------------------------------ SIMD helpers
// 8 floats as one value through GCC/Clang vector extensions, for the elementwise passes of the losses:
// a function marked CLIPFORGE_SIMD_CLONES is compiled once per ISA (AVX-512, AVX2, baseline) and picked
// at load time (GCC >= 12 on x86-64 glibc; elsewhere one baseline build of the same code). The helpers
// are always inlined into each clone. 8 lanes, one ymm register: with 16-lane values a polynomial like
// softplus's keeps more of them live than AVX2's 16 ymm registers hold, and the spills made it 5x
// slower on this development machine (AVX2, no AVX-512: 6.4-8 vs 1.5-1.6 ns per softplus, one thread).
// (contrastive.cpp still carries its own 16-lane helpers and feature checks from before this header
// had them.)
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define CLIPFORGE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLIPFORGE_SIMD_CLONES
#endif

#if defined(__GNUC__)
#define CLIPFORGE_HAVE_SIMD 1
#pragma GCC diagnostic ignored "-Wpsabi"  // the vector helpers are internal and always inlined
namespace simd {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

__attribute__((always_inline)) inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }
__attribute__((always_inline)) inline f32x8 splat(float x) { return f32x8{} + x; }
// The first `count` lanes from p, the rest `fill`.
__attribute__((always_inline)) inline f32x8 load_tail(const float* p, int64_t count, float fill) {
  float tmp[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) tmp[k] = k < count ? p[k] : fill;
  return load8(tmp);
}
__attribute__((always_inline)) inline f32x8 abs8(f32x8 x) { return x < 0.0f ? -x : x; }
__attribute__((always_inline)) inline float hsum(f32x8 v) {
  float t = 0.0f;
  for (int64_t k = 0; k < kLanes; ++k) t += v[k];
  return t;
}

// exp(x) lane-wise for x <= ~0.3, relative error ~2 ulp (Cephes' expf polynomial after x = n ln2 + r);
// x below -87 is clamped there (~1.6e-38, never a denormal); NaN propagates.
__attribute__((always_inline)) inline f32x8 exp_nonpositive(f32x8 x) {
  const f32x8 floor_x = splat(-87.0f);
  x = x < floor_x ? floor_x : x;
  const i32x8 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x8);  // round(x / ln2)
  const f32x8 fn = __builtin_convertvector(n, f32x8);
  const f32x8 r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;  // ln2 split in two parts
  f32x8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x8 two_n = (n + 127) << 23;  // the bits of 2^n, n >= -126
  return p * (f32x8)two_n;  // a vector cast reinterprets the bits
}

}  // namespace simd
#else
#define CLIPFORGE_HAVE_SIMD 0
#endif

}  // namespace clipforge
