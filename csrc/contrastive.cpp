// Chunked CLIP contrastive loss on CPU: the N x N logits never exist, only one chunk of rows at a time.
//
// logits l_ij = s <I_i, T_j>.  Forward walks row chunks once: one GEMM per chunk gives the chunk's
// logits, from which the row log-sum-exps are complete and the column (max, sum-exp) are merged online
// across chunks (and later across ranks). Backward recomputes each chunk (1 GEMM) and turns it into
// P_ij = exp(l_ij - r_i) + exp(l_ij - c_j) in place, then two GEMMs give dI and dT:
//   G = coef * (P - 2 delta),  dI = s G T,  dT = s G^T I,  ds = sum_ij G_ij <I_i, T_j>  (CLIP.md).
// Four GEMMs of 2*n*m*d FLOPs in all; memory: one chunk of logits plus a 16-row scratch, O((n+m) d).
//
// Threading: GEMMs through ATen (MKL uses every core; measured on the 2-core dev box at N = 8192,
// d = 512: 256-2048-row chunks run at 115-145 GFLOP/s, as fast as one big GEMM, so an OpenMP loop
// over chunks with single-threaded GEMMs would only add one logits buffer per thread). The elementwise
// work runs in ONE at::parallel_for per chunk over 16-row slices (ATen ops inside run on the calling
// thread), not as thousands of small internally-parallel ATen calls, each an OpenMP barrier that
// stalls when other processes share the cores (not a controlled comparison: the per-call version took
// 20-70 s instead of 2.5 s at N = 8192 while ~10 other processes loaded the 2 cores).
#include "clipforge.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace clipforge {
namespace {

// One chunk of logits is ~8 MiB: at N = 8192 that is 256 rows, still a full-speed GEMM, and keeps
// the loss's extra memory (besides the gradients themselves) far below the 64 MB budget.
constexpr int64_t kTargetChunkBytes = 8 << 20;
// Elementwise passes (exp, max, sums) run on 16-row slices of the chunk, which stay in L2 between
// passes instead of streaming the whole chunk from DRAM once per pass.
constexpr int64_t kSliceRows = 16;

void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "clipforge._C: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "clipforge._C: ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "clipforge._C: ", name, " must be 2-D (rows, dim), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "clipforge._C: ", name, " must be contiguous (call .contiguous())");
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  check_features(a, na);
  check_features(b, nb);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "clipforge._C: ", na, " and ", nb,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(1), "clipforge._C: ", na, " and ", nb,
              " must have the same feature dimension, got ", a.size(1), " and ", b.size(1));
}

void check_stat(const at::Tensor& t, const char* name, int64_t length, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "clipforge._C: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "clipforge._C: ", name, " must have the features' dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, "clipforge._C: ", name, " must have shape (", length,
              "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "clipforge._C: ", name, " must be contiguous");
}

int64_t resolve_chunk(int64_t chunk_size, int64_t rows, int64_t cols, int64_t elem_size) {
  TORCH_CHECK(chunk_size >= 0, "clipforge._C: chunk_size must be >= 0 (0 = automatic), got ", chunk_size);
  const int64_t chunk = chunk_size > 0 ? chunk_size : auto_chunk_rows(rows, cols, elem_size, kTargetChunkBytes);
  return std::max<int64_t>(1, std::min(chunk, rows));
}

// logits = scale * a @ b^T written into `out` (rows, m); beta = 0 so out's old contents are ignored.
inline void scaled_logits(at::Tensor& out, const at::Tensor& a, const at::Tensor& b_t, double scale) {
  at::addmm_out(out, out, a, b_t, /*beta=*/0, /*alpha=*/scale);
}

}  // namespace

int64_t auto_chunk_rows(int64_t rows, int64_t cols, int64_t elem_size, int64_t target_bytes) {
  TORCH_CHECK(rows >= 0 && cols >= 0 && elem_size > 0 && target_bytes > 0,
              "clipforge._C: auto_chunk_rows needs rows, cols >= 0 and elem_size, target_bytes > 0");
  int64_t chunk = target_bytes / std::max<int64_t>(1, cols * elem_size);
  if (chunk > 64) chunk -= chunk % 64;  // GEMM-friendly multiples of 64 rows
  return std::max<int64_t>(1, std::min(chunk, std::max<int64_t>(rows, 1)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& image, const at::Tensor& text, double scale, int64_t chunk_size) {
  check_pair(image, text, "image", "text");
  TORCH_CHECK(std::isfinite(scale), "clipforge._C: logit scale must be finite, got ", scale);
  at::NoGradGuard no_grad;
  const int64_t n = image.size(0), m = text.size(0);
  const auto opts = image.options();
  // Statistics in float64 whatever the features: a log-sum-exp is ~ the scale (up to 100), and in fp32
  // it would carry an absolute error of 100 * 6e-8, which the backward's exp(l - lse) turns into a
  // 6e-6 relative error of every probability (ClipLoss's log_softmax never forms lse alone).
  const auto stat_opts = opts.dtype(at::kDouble);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  auto row_lse = at::full({n}, neg_inf, stat_opts);
  auto col_max = at::full({m}, neg_inf, stat_opts);
  auto col_sum = at::zeros({m}, stat_opts);
  if (n == 0 || m == 0) return {row_lse, col_max, col_sum};

  const int64_t chunk = resolve_chunk(chunk_size, n, m, image.element_size());
  const auto text_t = text.t();
  auto logits_buf = at::empty({chunk, m}, opts);  // chunk x m: the only big buffer
  const int64_t threads = at::get_num_threads();
  auto scratch_buf = at::empty({threads, std::min(kSliceRows, chunk), m}, opts);  // 16 x m per thread
  auto col_parts = at::empty({threads, m}, stat_opts);                              // per-thread column sums

  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    auto logits = logits_buf.narrow(0, 0, rows);
    scaled_logits(logits, image.narrow(0, r0, rows), text_t, scale);  // GEMM: 2*rows*m*d FLOPs
    const auto row_max = at::amax(logits, {1});                         // (rows)
    const auto chunk_col_max = at::amax(logits, {0});                   // (m)
    auto row_sum = at::empty({rows}, stat_opts);
    col_parts.zero_();
    // One parallel region per chunk, the ATen ops inside run on the calling thread: thousands of small
    // parallel regions (one per op and slice) collapse when other processes share the cores.
    at::parallel_for(0, (rows + kSliceRows - 1) / kSliceRows, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      auto col_part = col_parts[tid];
      for (int64_t sl = begin; sl < end; ++sl) {
        const int64_t s0 = sl * kSliceRows, srows = std::min(kSliceRows, rows - s0);
        const auto slice = logits.narrow(0, s0, srows);
        auto scratch = scratch_buf[tid].narrow(0, 0, srows);
        at::sub_out(scratch, slice, row_max.narrow(0, s0, srows).unsqueeze(1)).exp_();
        row_sum.narrow(0, s0, srows).copy_(at::sum(scratch, {1}, false, at::kDouble));
        at::sub_out(scratch, slice, chunk_col_max.unsqueeze(0)).exp_();
        col_part.add_(at::sum(scratch, {0}, false, at::kDouble));
      }
    });
    const auto chunk_col_sum = col_parts.sum(0);
    row_lse.narrow(0, r0, rows).copy_(row_sum.log_().add_(row_max.to(at::kDouble)));
    // Online merge of the column statistics (the same rescaling as online softmax).
    const auto cmax = chunk_col_max.to(at::kDouble);
    const auto new_max = at::maximum(col_max, cmax);
    col_sum.mul_((col_max - new_max).exp_()).add_(chunk_col_sum * (cmax - new_max).exp_());
    col_max = new_max;
  }
  return {row_lse, col_max, col_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& image, const at::Tensor& text, double scale, const at::Tensor& row_lse,
    const at::Tensor& col_lse, int64_t row_offset, double coef, int64_t chunk_size) {
  check_pair(image, text, "image", "text");
  const int64_t n = image.size(0), m = text.size(0);
  check_stat(row_lse, "row_lse", n, at::kDouble);
  check_stat(col_lse, "col_lse", m, at::kDouble);
  TORCH_CHECK(row_offset >= 0 && row_offset + n <= m, "clipforge._C: the image rows [", row_offset, ", ",
              row_offset + n, ") must pair with text rows inside [0, ", m, ")");
  TORCH_CHECK(std::isfinite(scale) && std::isfinite(coef), "clipforge._C: scale and coef must be finite");
  at::NoGradGuard no_grad;
  const auto opts = image.options();
  auto d_image = at::zeros_like(image);
  auto d_text = at::zeros_like(text);
  if (n == 0 || m == 0) return {d_image, d_text, at::zeros({}, opts)};

  const int64_t chunk = resolve_chunk(chunk_size, n, m, image.element_size());
  const auto text_t = text.t();
  // float64 statistics as hi + lo in the features' dtype: (l - hi) is exact when l ~ hi (Sterbenz), so
  // (l - hi) - lo keeps the precision of the float64 lse without float64 elementwise passes.
  const auto row_hi = row_lse.to(image.scalar_type());
  const auto row_lo = (row_lse - row_hi.to(at::kDouble)).to(image.scalar_type());
  const auto col_hi = col_lse.to(image.scalar_type()).unsqueeze(0);
  const auto col_lo = (col_lse - col_lse.to(image.scalar_type()).to(at::kDouble)).to(image.scalar_type()).unsqueeze(0);
  auto logits_buf = at::empty({chunk, m}, opts);
  const int64_t threads = at::get_num_threads();
  auto scratch_buf = at::empty({threads, std::min(kSliceRows, chunk), m}, opts);

  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const auto image_c = image.narrow(0, r0, rows);
    auto p = logits_buf.narrow(0, 0, rows);
    scaled_logits(p, image_c, text_t, scale);  // recompute: 2*rows*m*d FLOPs
    at::parallel_for(0, (rows + kSliceRows - 1) / kSliceRows, 1, [&](int64_t begin, int64_t end) {
      auto scratch_t = scratch_buf[at::get_thread_num()];
      for (int64_t sl = begin; sl < end; ++sl) {
        const int64_t s0 = sl * kSliceRows, srows = std::min(kSliceRows, rows - s0);
        auto slice = p.narrow(0, s0, srows);
        auto scratch = scratch_t.narrow(0, 0, srows);
        at::sub_out(scratch, slice, row_hi.narrow(0, r0 + s0, srows).unsqueeze(1))
            .sub_(row_lo.narrow(0, r0 + s0, srows).unsqueeze(1))
            .exp_();                                           // softmax_row
        slice.sub_(col_hi).sub_(col_lo).exp_().add_(scratch);  // + softmax_col
      }
    });
    // p = P (without the diagonal term and coef).  G T for these rows, and this chunk's share of s G^T I.
    auto gi = d_image.narrow(0, r0, rows);
    at::addmm_out(gi, gi, p, text, /*beta=*/0, /*alpha=*/coef);  // 2*rows*m*d FLOPs
    d_text.addmm_(p.t(), image_c, /*beta=*/1, /*alpha=*/coef * scale);  // 2*rows*m*d FLOPs
  }
  // The -2*coef*delta term of G pairs image row i with text row row_offset + i.
  const auto text_diag = text.narrow(0, row_offset, n);
  d_image.sub_(text_diag, 2.0 * coef);                          // d_image = G T
  logits_buf.reset();                                           // free the chunk before the O(n d) tail
  scratch_buf.reset();
  auto d_scale = at::dot(image.view(-1), d_image.view(-1));     // sum_ij G_ij <I_i, T_j>, no (n, d) temporary
  d_image.mul_(scale);                                          // dI = s G T
  d_text.narrow(0, row_offset, n).sub_(image, 2.0 * coef * scale);
  return {d_image, d_text, d_scale};
}

}  // namespace clipforge
