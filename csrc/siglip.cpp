// SigLIP's sigmoid loss on CPU, chunked: the n x m logits never exist, only one chunk of rows at a time.
//
// s_ij = t <x_i, y_j> + b, z_ij = +1 on the pair (j = i + row_offset), -1 elsewhere (Zhai et al. 2023):
//   value:     sum_ij softplus(-z_ij s_ij)           (N x the loss; kernels/siglip.py has the derivation)
//   gradients: G = coef (sigmoid(s) - delta),  dX = t G Y,  dY = t G^T X,  dt = <X, G Y>,  db = sum_ij G_ij.
// G needs nothing but its own logit (no statistic of other rows or columns, unlike the softmax loss), so
// `siglip_forward_backward` computes the value and every gradient in ONE walk over row chunks: one GEMM
// per chunk (the dot products <x_i, y_j>), one fused pass per row that forms s = t <x, y> + b, sums
// softplus, and turns the row in place into G / coef = sigmoid(s) - delta while summing it (db) and
// G_ij <x_i, y_j> (dt, from the dot products at hand), then two GEMMs: G Y for the chunk's rows of dX,
// G^T X accumulated into dY. Three GEMMs of 2*n*m*d FLOPs; the gradients scale linearly with coef, so
// the autograd function (engine/siglip_loss.py) runs this in its forward and only multiplies in its
// backward. `siglip_forward` is the value alone (one GEMM, the same arithmetic), for calls that need no
// gradient. Memory: one chunk of dot products (~16 MiB) plus O((n + m) d).
//
// Elementwise work, float32: one pass per logit, vectorised with GCC/Clang vector extensions
// (clipforge.h's SIMD helpers at 8 lanes; AVX-512 / AVX2 clones chosen at load time), one exp per logit:
//   softplus(x) = max(x, 0) + log1p(u), u = exp(-|x|), log1p(u) = 2 atanh(u / (2 + u)) as its odd series
//     (u in (0, 1]: q = u / (2 + u) <= 1/3, eight terms leave < 2e-9 relative; log(1 + u) would lose the
//     digits of small u, which is every well-separated negative at b = -10);
//   sigmoid(x) = 1 / (1 + u) for x >= 0, u / (1 + u) otherwise (relatively exact on both tails).
// The pair's terms fold z into the argument (softplus(-s), -sigmoid(-s)); never softplus(s) - s or
// sigmoid(s) - 1, which cancel to nothing once s >> 1. Unlike the softmax loss there is no range to
// check: both functions are stable for every finite x (exp clamps at e^-87 ~ 1.6e-38, an absolute error
// below anything the sums can see); NaN propagates. float64 features (and compilers without vector
// extensions) take the same formulas in scalar std:: arithmetic.
//
// Threading as in contrastive.cpp: GEMMs through ATen (MKL on every core), the elementwise pass in ONE
// at::parallel_for per chunk over 16-row slices (barriers stall badly when other processes share the
// cores), per-row sums in float64, added in row order (deterministic whatever the thread count).
#include "clipforge.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace clipforge {
namespace {

// One chunk of logits is ~16 MiB, as in contrastive.cpp (512 rows at N = 8192): the loss's extra memory
// stays well inside 64 MB there. But never fewer than 256 rows: every chunk reads and writes the whole
// (m, d) fp32 text gradient it accumulates into (8 m d bytes against 6 rows m d FLOPs of its three
// GEMMs), which at 64 rows (16 MiB at m = 65536) would add ~20 / rows = 30% at this machine's ~150
// GFLOP/s over ~10 GB/s; 256 rows bring it to ~8% for a 64 MiB chunk at m = 65536.
constexpr int64_t kTargetChunkBytes = 16 << 20;
constexpr int64_t kMinChunkRows = 256;
constexpr int64_t kSliceRows = 16;  // rows per task of the elementwise pass

template <typename T>
inline T softplus_scalar(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));  // std::max(NaN, 0) is NaN
}

template <typename T>
inline T sigmoid_scalar(T x) {
  const T e = std::exp(-std::abs(x));
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : e * r;
}

// sum_j softplus(-z_j s_j), s_j = t l_j + b (l: <x_i, y_j>, the GEMM's output; z = +1 at column jp only).
template <typename T>
double forward_row_scalar(const T* l, int64_t m, T t, T b, int64_t jp) {
  double total = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    const T x = t * l[j] + b;
    total += softplus_scalar(j == jp ? -x : x);
  }
  return total;
}

struct RowSums {
  double loss = 0.0;  // sum_j softplus(-z_j s_j)
  double g = 0.0;     // sum_j g_j, g_j = sigmoid(s_j) - delta_j
  double gl = 0.0;    // sum_j g_j <x_i, y_j>: this row's share of dt / coef
};

// In place l_j <- g_j = sigmoid(t l_j + b) - [j == jp] (the pair as -sigmoid(-s)), with the row's sums.
template <typename T>
RowSums both_row_scalar(T* l, int64_t m, T t, T b, int64_t jp) {
  RowSums sums;
  for (int64_t j = 0; j < m; ++j) {
    const T raw = l[j], s = t * raw + b;
    const T x = j == jp ? -s : s;  // -z s
    const T g = j == jp ? -sigmoid_scalar(x) : sigmoid_scalar(x);
    sums.loss += softplus_scalar(x);
    sums.g += g;
    sums.gl += g * raw;
    l[j] = g;
  }
  return sums;
}

#if CLIPFORGE_HAVE_SIMD
using namespace simd;
constexpr int64_t kLanes = lanes<f32x8>;  // clipforge.h: 8 lanes for softplus's polynomial

// softplus(x) from u = exp(-|x|) (shared with sigmoid8 in the fused pass).
__attribute__((always_inline)) inline f32x8 softplus8(f32x8 x, f32x8 u) {
  const f32x8 q = u / (2.0f + u);
  const f32x8 q2 = q * q;
  f32x8 p = q2 * (1.0f / 15.0f) + (1.0f / 13.0f);
  p = p * q2 + (1.0f / 11.0f);
  p = p * q2 + (1.0f / 9.0f);
  p = p * q2 + (1.0f / 7.0f);
  p = p * q2 + (1.0f / 5.0f);
  p = p * q2 + (1.0f / 3.0f);
  p = p * q2 + 1.0f;
  const f32x8 pos = x > 0.0f ? x : splat<f32x8>(0.0f);  // NaN: 0 here, NaN from u below
  return pos + 2.0f * q * p;
}

__attribute__((always_inline)) inline f32x8 softplus8(f32x8 x) { return softplus8(x, exp_nonpositive(-vabs(x))); }

// sigmoid(x) from u = exp(-|x|).
__attribute__((always_inline)) inline f32x8 sigmoid8(f32x8 x, f32x8 u) {
  const f32x8 r = 1.0f / (1.0f + u);
  return x >= 0.0f ? r : u * r;
}

// x with the pair's lane (if column jp falls in [j, j + 8)) negated: a compare and a blend, no branch and
// no indexed write (which makes GCC keep the vector in memory).
__attribute__((always_inline)) inline f32x8 flip_pair(f32x8 x, int64_t j, int64_t jp) {
  const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const int64_t k = jp - j;
  const int32_t at = k >= 0 && k < kLanes ? static_cast<int32_t>(k) : -1;
  return lane == at ? -x : x;
}

CLIPFORGE_SIMD_CLONES
double forward_row_f32(const float* l, int64_t m, float t, float b, int64_t jp) {
  const int64_t full = m - m % kLanes, tail = m - full;
  double total = 0.0;
  for (int64_t j0 = 0; j0 < full; j0 += 1024) {  // float partial sums of <= 1024 terms, added in float64
    const int64_t j1 = std::min(full, j0 + 1024);
    f32x8 acc = f32x8{};
    for (int64_t j = j0; j < j1; j += kLanes) {
      acc += softplus8(flip_pair(load<f32x8>(l + j) * t + b, j, jp));
    }
    total += hsum(acc);
  }
  if (tail) {
    const f32x8 v = softplus8(flip_pair(load_tail<f32x8>(l + full, tail, 0.0f) * t + b, full, jp));
    for (int64_t k = 0; k < tail; ++k) total += v[k];
  }
  return total;
}

// One vector of a row: raw = <x_i, y_j>, s = t raw + b, x = -z s; adds softplus(x), g = sigmoid(x)
// negated on the pair (-sigmoid(-s)) and g raw into the sums; returns g.
struct Sums8 {
  f32x8 loss = f32x8{}, g = f32x8{}, gl = f32x8{};
};

__attribute__((always_inline)) inline f32x8 both8(f32x8 raw, float t, float b, int64_t j, int64_t jp, Sums8& acc) {
  const f32x8 x = flip_pair(raw * t + b, j, jp);
  const f32x8 u = exp_nonpositive(-vabs(x));
  acc.loss += softplus8(x, u);
  const f32x8 g = flip_pair(sigmoid8(x, u), j, jp);
  acc.g += g;
  acc.gl += g * raw;
  return g;
}

CLIPFORGE_SIMD_CLONES
RowSums both_row_f32(float* l, int64_t m, float t, float b, int64_t jp) {
  const int64_t full = m - m % kLanes, tail = m - full;
  RowSums sums;
  for (int64_t j0 = 0; j0 < full; j0 += 1024) {  // float partial sums of <= 1024 terms, added in float64
    const int64_t j1 = std::min(full, j0 + 1024);
    Sums8 acc;
    for (int64_t j = j0; j < j1; j += kLanes) store(l + j, both8(load<f32x8>(l + j), t, b, j, jp, acc));
    sums.loss += hsum(acc.loss);
    sums.g += hsum(acc.g);
    sums.gl += hsum(acc.gl);
  }
  if (tail) {
    Sums8 acc;
    const f32x8 g = both8(load_tail<f32x8>(l + full, tail, 0.0f), t, b, full, jp, acc);
    for (int64_t k = 0; k < tail; ++k) {  // only the row's lanes
      l[full + k] = g[k];
      sums.loss += acc.loss[k];
      sums.g += acc.g[k];
      sums.gl += acc.gl[k];
    }
  }
  return sums;
}
#endif

double forward_row(const at::Tensor& dots, int64_t i, int64_t m, double t, double b, int64_t jp) {
  if (dots.scalar_type() == at::kDouble) return forward_row_scalar(dots.data_ptr<double>() + i * m, m, t, b, jp);
  const float tf = static_cast<float>(t), bf = static_cast<float>(b);
#if CLIPFORGE_HAVE_SIMD
  return forward_row_f32(dots.data_ptr<float>() + i * m, m, tf, bf, jp);
#else
  return forward_row_scalar(dots.data_ptr<float>() + i * m, m, tf, bf, jp);
#endif
}

RowSums both_row(at::Tensor& dots, int64_t i, int64_t m, double t, double b, int64_t jp) {
  if (dots.scalar_type() == at::kDouble) return both_row_scalar(dots.data_ptr<double>() + i * m, m, t, b, jp);
  const float tf = static_cast<float>(t), bf = static_cast<float>(b);
#if CLIPFORGE_HAVE_SIMD
  return both_row_f32(dots.data_ptr<float>() + i * m, m, tf, bf, jp);
#else
  return both_row_scalar(dots.data_ptr<float>() + i * m, m, tf, bf, jp);
#endif
}

// Runs `row(i)` for every row of a chunk, in 16-row slices under one parallel region, into sums[i]; returns
// their sum, added in row order (the same on any thread count).
template <typename S, typename F>
S sum_rows(int64_t rows, std::vector<S>& sums, const F& row) {
  at::parallel_for(0, (rows + kSliceRows - 1) / kSliceRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t sl = begin; sl < end; ++sl) {
      for (int64_t i = sl * kSliceRows; i < std::min(rows, (sl + 1) * kSliceRows); ++i) sums[i] = row(i);
    }
  });
  S total{};
  for (int64_t i = 0; i < rows; ++i) total += sums[i];
  return total;
}

RowSums& operator+=(RowSums& a, const RowSums& b) {
  a.loss += b.loss;
  a.g += b.g;
  a.gl += b.gl;
  return a;
}

void check_call(const at::Tensor& image, const at::Tensor& text, double scale, double bias, int64_t row_offset,
                int64_t chunk_size) {
  check_loss_pair(image, text, "image", "text");
  TORCH_CHECK(std::isfinite(scale) && std::isfinite(bias), "clipforge._C: logit scale and bias must be finite, got ",
              scale, " and ", bias);
  TORCH_CHECK(row_offset >= 0 && row_offset + image.size(0) <= text.size(0), "clipforge._C: the image rows [",
              row_offset, ", ", row_offset + image.size(0), ") must pair with text rows inside [0, ", text.size(0), ")");
  TORCH_CHECK(chunk_size >= 0, "clipforge._C: chunk_size must be >= 0 (0 = automatic), got ", chunk_size);
}

int64_t chunk_rows(int64_t chunk_size, int64_t n, int64_t m, int64_t elem_size) {
  const int64_t chunk =
      chunk_size > 0 ? chunk_size : std::max(kMinChunkRows, auto_chunk_rows(n, m, elem_size, kTargetChunkBytes));
  return std::max<int64_t>(1, std::min(chunk, n));
}

}  // namespace

at::Tensor siglip_forward(const at::Tensor& image, const at::Tensor& text, double scale, double bias,
                          int64_t row_offset, int64_t chunk_size) {
  check_call(image, text, scale, bias, row_offset, chunk_size);
  at::NoGradGuard no_grad;
  const int64_t n = image.size(0), m = text.size(0);
  const auto stat_opts = image.options().dtype(at::kDouble);
  if (n == 0 || m == 0) return at::zeros({}, stat_opts);
  const int64_t chunk = chunk_rows(chunk_size, n, m, image.element_size());
  const auto text_t = text.t();
  auto dots_buf = at::empty({chunk, m}, image.options());  // chunk x m: the only big buffer
  std::vector<double> sums(chunk);
  double total = 0.0;
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    auto dots = dots_buf.narrow(0, 0, rows);
    at::mm_out(dots, image.narrow(0, r0, rows), text_t);  // <x_i, y_j>: 2*rows*m*d FLOPs
    total += sum_rows(rows, sums, [&](int64_t i) { return forward_row(dots, i, m, scale, bias, row_offset + r0 + i); });
  }
  return at::full({}, total, stat_opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_forward_backward(
    const at::Tensor& image, const at::Tensor& text, double scale, double bias, int64_t row_offset, double coef,
    int64_t chunk_size) {
  check_call(image, text, scale, bias, row_offset, chunk_size);
  TORCH_CHECK(std::isfinite(coef), "clipforge._C: coef must be finite, got ", coef);
  at::NoGradGuard no_grad;
  const int64_t n = image.size(0), m = text.size(0);
  const auto stat_opts = image.options().dtype(at::kDouble);
  if (n == 0 || m == 0) {
    const auto zero = at::zeros({}, stat_opts);
    return {zero, at::zeros_like(image), at::zeros_like(text), zero.clone(), zero.clone()};
  }
  // Not zero-filled: every row of d_image is written by its chunk's GEMM (beta = 0), and d_text by the
  // first chunk's (beta = 0) before the others accumulate into it.
  auto d_image = at::empty_like(image);
  auto d_text = at::empty_like(text);
  const int64_t chunk = chunk_rows(chunk_size, n, m, image.element_size());
  const auto text_t = text.t();
  auto buf = at::empty({chunk, m}, image.options());
  std::vector<RowSums> sums(chunk);
  RowSums total;
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const auto image_c = image.narrow(0, r0, rows);
    auto p = buf.narrow(0, 0, rows);
    at::mm_out(p, image_c, text_t);  // <x_i, y_j>: 2*rows*m*d FLOPs
    // p <- G / coef, with the sums: the loss, db / coef, and dt / coef = sum G_ij <x_i, y_j> (from the
    // dot products at hand, instead of a pass over X and G Y)
    total += sum_rows(rows, sums, [&](int64_t i) { return both_row(p, i, m, scale, bias, row_offset + r0 + i); });
    // coef G Y for these rows (2*rows*m*d), t coef G^T X into d_text (2*rows*m*d)
    auto gi = d_image.narrow(0, r0, rows);
    at::addmm_out(gi, gi, p, text, /*beta=*/0, /*alpha=*/coef);
    d_text.addmm_(p.t(), image_c, /*beta=*/r0 == 0 ? 0 : 1, /*alpha=*/coef * scale);
  }
  d_image.mul_(scale);  // dX = t G Y
  return {at::full({}, total.loss, stat_opts), d_image, d_text, at::full({}, coef * total.gl, stat_opts),
          at::full({}, coef * total.g, stat_opts)};
}

}  // namespace clipforge
