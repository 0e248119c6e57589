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
// 8 or 16 floats as one value through GCC/Clang vector extensions, for the elementwise passes of the
// losses: a function marked CLIPFORGE_SIMD_CLONES is compiled once per ISA (AVX-512, AVX2, baseline) and
// picked at load time (GCC >= 12 on x86-64 glibc; elsewhere one baseline build of the same code). The
// helpers are templates over the vector type, always inlined into each clone. contrastive.cpp's exp
// passes use 16 lanes (one zmm on AVX-512, two ymm on AVX2); siglip.cpp's 8, one ymm register: with
// 16-lane values a polynomial like softplus's keeps more of them live than AVX2's 16 ymm registers hold,
// and the spills made it 5x slower on this development machine (AVX2, no AVX-512: 6.4-8 vs 1.5-1.6 ns
// per softplus, one thread).
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
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

template <typename V> struct IntOf;  // the int32 vector of a float vector's width
template <> struct IntOf<f32x8> { typedef i32x8 type; };
template <> struct IntOf<f32x16> { typedef i32x16 type; };
template <typename V> constexpr int64_t lanes = sizeof(V) / sizeof(float);

template <typename V>
__attribute__((always_inline)) inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
__attribute__((always_inline)) inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
template <typename V>
__attribute__((always_inline)) inline V splat(float x) { return V{} + x; }
// The first `count` lanes from p, the rest `fill`.
template <typename V>
__attribute__((always_inline)) inline V load_tail(const float* p, int64_t count, float fill) {
  float tmp[lanes<V>];
  for (int64_t k = 0; k < lanes<V>; ++k) tmp[k] = k < count ? p[k] : fill;
  return load<V>(tmp);
}
template <typename V>
__attribute__((always_inline)) inline V vabs(V x) { return x < 0.0f ? -x : x; }
template <typename V>
__attribute__((always_inline)) inline float hsum(V v) {
  float t = 0.0f;
  for (int64_t k = 0; k < lanes<V>; ++k) t += v[k];
  return t;
}

// exp(x) lane-wise for x <= ~0.3 (the callers pass logit - reference <= 0, or -|x|), relative error
// ~2 ulp (Cephes' expf polynomial after x = n ln2 + r); x below -87 is clamped there (~1.6e-38, never a
// denormal); NaN propagates (the clamp's comparison is false for NaN).
template <typename V>
__attribute__((always_inline)) inline V exp_nonpositive(V x) {
  typedef typename IntOf<V>::type I;
  const V floor_x = splat<V>(-87.0f);
  x = x < floor_x ? floor_x : x;
  const I n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, I);  // round(x / ln2)
  const V fn = __builtin_convertvector(n, V);
  const V r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;  // ln2 split in two parts
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I two_n = (n + 127) << 23;  // the bits of 2^n, n >= -126
  return p * (V)two_n;  // a vector cast reinterprets the bits
}

}  // namespace simd
#else
#define CLIPFORGE_HAVE_SIMD 0
#endif

}  // namespace clipforge
