// Chunked top-k over a @ b^T (retrieval): the k best columns of every row without the full matrix.
// Each (row chunk, column chunk) block is one GEMM followed by a top-k; the running best k of a row
// chunk are merged with each block's best k (a top-k over 2k candidates), so memory stays
// O(row_chunk * col_chunk + n * k).
#include "clipforge.h"

#include <algorithm>

namespace clipforge {

std::tuple<at::Tensor, at::Tensor> chunked_topk(
    const at::Tensor& a, const at::Tensor& b, int64_t k, int64_t row_chunk, int64_t col_chunk) {
  for (const auto* p : {&a, &b}) {
    const char* name = p == &a ? "a" : "b";
    TORCH_CHECK(p->device().is_cpu(), "clipforge._C.chunked_topk: ", name, " must be a CPU tensor");
    TORCH_CHECK(p->scalar_type() == at::kFloat || p->scalar_type() == at::kDouble,
                "clipforge._C.chunked_topk: ", name, " must be float32 or float64, got ", p->scalar_type());
    TORCH_CHECK(p->dim() == 2, "clipforge._C.chunked_topk: ", name, " must be 2-D, got shape ", p->sizes());
    TORCH_CHECK(p->is_contiguous(), "clipforge._C.chunked_topk: ", name, " must be contiguous");
  }
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "clipforge._C.chunked_topk: a and b must share a dtype");
  TORCH_CHECK(a.size(1) == b.size(1), "clipforge._C.chunked_topk: a and b must have the same feature dimension, got ",
              a.size(1), " and ", b.size(1));
  const int64_t n = a.size(0), m = b.size(0);
  TORCH_CHECK(k >= 1 && k <= m, "clipforge._C.chunked_topk: k must be in [1, ", m, "], got ", k);
  TORCH_CHECK(row_chunk >= 0 && col_chunk >= 0, "clipforge._C.chunked_topk: chunk sizes must be >= 0 (0 = automatic)");
  at::NoGradGuard no_grad;
  auto values = at::empty({n, k}, a.options());
  auto indices = at::empty({n, k}, a.options().dtype(at::kLong));
  if (n == 0) return {values, indices};

  const int64_t cc = std::min(m, col_chunk > 0 ? col_chunk : int64_t(16384));
  const int64_t rc = std::min(n, row_chunk > 0 ? row_chunk : auto_chunk_rows(n, cc, a.element_size(), 8 << 20));
  auto block_buf = at::empty({rc, cc}, a.options());
  for (int64_t r0 = 0; r0 < n; r0 += rc) {
    const int64_t rows = std::min(rc, n - r0);
    const auto a_c = a.narrow(0, r0, rows);
    at::Tensor best_v, best_i;
    for (int64_t c0 = 0; c0 < m; c0 += cc) {
      const int64_t cols = std::min(cc, m - c0);
      auto block = block_buf.narrow(0, 0, rows).narrow(1, 0, cols);
      at::mm_out(block, a_c, b.narrow(0, c0, cols).t());
      auto [v, i] = at::topk(block, std::min(k, cols), /*dim=*/1, /*largest=*/true, /*sorted=*/true);
      i.add_(c0);
      if (!best_v.defined()) {
        best_v = v;
        best_i = i;
      } else {
        const auto cand_v = at::cat({best_v, v}, 1);
        const auto cand_i = at::cat({best_i, i}, 1);
        auto [mv, pos] = at::topk(cand_v, std::min(k, cand_v.size(1)), 1, true, true);
        best_v = mv;
        best_i = cand_i.gather(1, pos);
      }
    }
    values.narrow(0, r0, rows).copy_(best_v);
    indices.narrow(0, r0, rows).copy_(best_i);
  }
  return {values, indices};
}

}  // namespace clipforge
