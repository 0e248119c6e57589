// clipforge C++ extension: declarations shared by the translation units in csrc/.
#pragma once

#include <torch/extension.h>

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

// The k largest entries of every row of a @ b^T without the full matrix: (values (n, k), indices (n, k)).
std::tuple<at::Tensor, at::Tensor> chunked_topk(
    const at::Tensor& a, const at::Tensor& b, int64_t k, int64_t row_chunk, int64_t col_chunk);

// Rows per chunk so that one chunk of logits (rows x cols floats) stays near `target_bytes`.
int64_t auto_chunk_rows(int64_t rows, int64_t cols, int64_t elem_size, int64_t target_bytes);

}  // namespace clipforge
