// Chunked CLIP contrastive loss on CPU: the N x N logits never exist, only one chunk of rows at a time.
//
// logits l_ij = s <I_i, T_j>.  Forward walks row chunks once: one GEMM per chunk gives the chunk's
// logits, from which the row log-sum-exps are complete and the column (max, sum-exp) are merged online
// across chunks (and later across ranks). Backward recomputes each chunk (1 GEMM) and turns it into
// P_ij = exp(l_ij - r_i) + exp(l_ij - c_j) in place, then two GEMMs give dI and dT:
//   G = coef * (P - 2 delta),  dI = s G T,  dT = s G^T I,  ds = sum_ij G_ij <I_i, T_j>  (docs/DESIGN.md).
// Four GEMMs of 2*n*m*d FLOPs in all; memory: one chunk of logits plus a 16-row scratch, O((n+m) d).
//
// Elementwise work, float32 (the training case): one exp per logit in each pass, written with GCC/Clang
// vector extensions (AVX-512 / AVX2 clones chosen at load time with GCC >= 12 on x86-64 glibc, the
// baseline ISA elsewhere), instead of two exps and ~7 ATen passes.
//   forward:  exp(l_ij - M) with M the max of a slice of rows gives both the row sums (rescaled by
//             exp(M - ...) per row) and the column sums (folded into float64 with one scalar per slice);
//   backward: exp(l_ij - r_i) + exp(l_ij - c_j) = exp(l_ij - R) * (exp(R - r_i) + exp(R - c_j)) with
//             R the largest log-sum-exp: one exp and one multiply-add per logit.
// Both hold only while the numbers they factor stay in float32's range. They are checked, never assumed:
// a row or column whose sum falls below 1e-25 of its reference (a logit spread beyond ~57), or
// log-sum-exps that span more than 50, take the exact two-exp path below (float64 always does).
// Precision: l - M and l - R are rounded in float32, so a probability whose logit sits 30-60 below its
// reference carries up to ~2e-6 relative error (the hi/lo split of the exact path avoids that), and
// row sums add 64-term float partials: both well inside the loss's 1e-5 budget, tested against float64.
// Why the fast path: the four GEMMs are the loss's floor; two exps per logit in ATen passes added a large
// share on top of them, one vectorised exp per logit adds a small one (docs/BENCHMARKS.md, "Contrastive
// loss").
//
// Threading: GEMMs through ATen (MKL uses every core; row chunks of a few hundred rows already run as fast
// as one big GEMM, so an OpenMP loop over chunks with single-threaded GEMMs would only add one logits
// buffer per thread). The elementwise work runs in ONE at::parallel_for per chunk over 16-row slices
// (ATen ops inside run on the calling thread), not as thousands of small internally-parallel ATen calls:
// each of those is an OpenMP barrier, and barriers stall badly when other processes share the cores.
#include "clipforge.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace clipforge {
namespace {

// One chunk of logits is ~16 MiB (512 rows at N = 8192): large enough to keep the passes of the d_text
// accumulation over its (m, d) buffer few, small enough that the loss's extra memory stays within the
// 64 MB target at N = 8192 (figures: docs/BENCHMARKS.md, "Contrastive loss").
constexpr int64_t kTargetChunkBytes = 16 << 20;
// Elementwise passes (exp, max, sums) run on 16-row slices of the chunk, which stay in L2 between
// passes instead of streaming the whole chunk from DRAM once per pass.
constexpr int64_t kSliceRows = 16;
// Fast paths: a row (column) sum below this, relative to its reference, means logits ~57 below the
// slice maximum dominate it; every exp below e^-87 is clamped to ~1.6e-38, so a sum >= 1e-25 is exact to
// ~1e-9 relative even with 8192 clamped terms. Backward: log-sum-exps within 50 of each other keep every
// factor exp(R - lse) below e^50 and every exp(l - R) that matters above e^-80 (a normal float).
constexpr double kMinFastSum = 1e-25;
constexpr double kMaxFastSpan = 50.0;
constexpr int64_t kModeAuto = 0, kModeExact = 1, kModeFast = 2;

// The fast path is written with clipforge.h's SIMD helpers (GCC/Clang vector extensions, AVX-512 / AVX2 /
// baseline clones chosen at load time); other compilers use the exact path only.
constexpr bool kHaveFastPath = CLIPFORGE_HAVE_SIMD;

#if CLIPFORGE_HAVE_SIMD
// 16 floats as one value: each target clone below compiles the same code to its own ISA (one zmm on
// AVX-512, two ymm on AVX2, four xmm otherwise).
using namespace simd;
constexpr int64_t kLanes = lanes<f32x16>;

// One slice of `rows` logit rows (row stride m): returns the slice max M; row_sum[i] = sum_j
// exp(l_ij - M) (float64), col_part[j] += sum_i exp(l_ij - M) (float32, 16 rows at most).
CLIPFORGE_SIMD_CLONES
float forward_slice_f32(const float* logits, int64_t rows, int64_t m, double* row_sum, float* col_part) {
  const int64_t full = m - m % kLanes, tail = m - full;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  f32x16 vmax = splat<f32x16>(neg_inf);
  for (int64_t i = 0; i < rows; ++i) {
    const float* l = logits + i * m;
    for (int64_t j = 0; j < full; j += kLanes) {
      const f32x16 x = load<f32x16>(l + j);
      vmax = x > vmax ? x : vmax;
    }
    if (tail) {
      const f32x16 x = load_tail<f32x16>(l + full, tail, neg_inf);
      vmax = x > vmax ? x : vmax;
    }
  }
  float mx = neg_inf;
  for (int64_t k = 0; k < kLanes; ++k) mx = std::max(mx, vmax[k]);
  const f32x16 vm = splat<f32x16>(mx);
  for (int64_t i = 0; i < rows; ++i) {
    const float* l = logits + i * m;
    double total = 0.0;
    for (int64_t j0 = 0; j0 < full; j0 += 1024) {  // float partial sums of <= 1024 terms, added in float64
      const int64_t j1 = std::min(full, j0 + 1024);
      f32x16 acc = f32x16{};
      for (int64_t j = j0; j < j1; j += kLanes) {
        const f32x16 e = exp_nonpositive(load<f32x16>(l + j) - vm);
        acc += e;
        store(col_part + j, load<f32x16>(col_part + j) + e);
      }
      total += hsum(acc);
    }
    if (tail) {
      const f32x16 e = exp_nonpositive(load_tail<f32x16>(l + full, tail, neg_inf) - vm);  // exp(-inf): ~1e-38
      for (int64_t k = 0; k < tail; ++k) {
        total += e[k];
        col_part[full + k] += e[k];
      }
    }
    row_sum[i] = total;
  }
  return mx;
}

// In place: p_ij = exp(l_ij - R) * (u_i + v_j), u_i = exp(R - r_i), v_j = exp(R - c_j).
CLIPFORGE_SIMD_CLONES
void backward_slice_f32(float* p, int64_t rows, int64_t m, float R, const float* u, const float* v) {
  const int64_t full = m - m % kLanes, tail = m - full;
  const f32x16 vr = splat<f32x16>(R);
  for (int64_t i = 0; i < rows; ++i) {
    float* l = p + i * m;
    const f32x16 ui = splat<f32x16>(u[i]);
    for (int64_t j = 0; j < full; j += kLanes) {
      store(l + j, exp_nonpositive(load<f32x16>(l + j) - vr) * (ui + load<f32x16>(v + j)));
    }
    if (tail) {
      const f32x16 e = exp_nonpositive(load_tail<f32x16>(l + full, tail, 0.0f) - vr) *
                       (ui + load_tail<f32x16>(v + full, tail, 0.0f));
      for (int64_t k = 0; k < tail; ++k) l[full + k] = e[k];
    }
  }
}
#else
float forward_slice_f32(const float*, int64_t, int64_t, double*, float*) {
  TORCH_CHECK(false, "clipforge._C: the float32 fast path needs GCC or Clang");
}
void backward_slice_f32(float*, int64_t, int64_t, float, const float*, const float*) {
  TORCH_CHECK(false, "clipforge._C: the float32 fast path needs GCC or Clang");
}
#endif

// log(sum_j exp(l_j)) of one row, exactly (its own max as reference).
double row_lse_exact(const float* l, int64_t m) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < m; ++j) mx = std::max(mx, l[j]);
  double total = 0.0;
  for (int64_t j = 0; j < m; ++j) total += std::exp(static_cast<double>(l[j]) - mx);
  return mx + std::log(total);
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

namespace {

void check_mode(int64_t mode) {
  TORCH_CHECK(mode == kModeAuto || mode == kModeExact || mode == kModeFast, "clipforge._C: mode must be 0 (auto), ",
              "1 (exact two-exp path) or 2 (fast path, error if the inputs leave its range), got ", mode);
}

// The fast float32 statistics of one chunk of logits (rows x m): complete row log-sum-exps into
// row_lse, and the chunk's column log-sum-exps into chunk_col_lse. Returns false (nothing usable
// in chunk_col_lse) when a column sum left the fast path's range; the caller redoes the chunk exactly.
bool forward_chunk_fast(const at::Tensor& logits, double* row_lse, double* chunk_col_lse, float* col_part_buf,
                        double* col_acc_buf, std::vector<double>& thread_ref) {
  const int64_t rows = logits.size(0), m = logits.size(1);
  const float* base = logits.data_ptr<float>();
  const int64_t slice = std::max<int64_t>(4, std::min<int64_t>(kSliceRows, 65536 / std::max<int64_t>(m, 1)));
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const int64_t tasks = static_cast<int64_t>(thread_ref.size());
  const int64_t slices = (rows + slice - 1) / slice;
  std::fill(thread_ref.begin(), thread_ref.end(), neg_inf);
  std::fill(col_acc_buf, col_acc_buf + tasks * m, 0.0);
  std::atomic<bool> usable{true};
  // Buffers belong to tasks, not to OpenMP thread ids: task t owns buffer t and slices t, t + tasks, ...
  // (safe whatever thread runs it, and whatever OpenMP runtime this extension was built against).
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    double sums[kSliceRows];
    for (int64_t t = t0; t < t1; ++t) {
      float* part = col_part_buf + t * m;
      double* acc = col_acc_buf + t * m;
      double& ref = thread_ref[t];
      for (int64_t sl = t; sl < slices; sl += tasks) {
        const int64_t s0 = sl * slice, srows = std::min(slice, rows - s0);
        const float* l = base + s0 * m;
        std::fill(part, part + m, 0.0f);
        const double mx = forward_slice_f32(l, srows, m, sums, part);
        if (!(mx > neg_inf)) {  // NaN or -inf logits in every lane: let the exact path propagate them
          usable = false;
          return;
        }
        for (int64_t i = 0; i < srows; ++i) {
          row_lse[s0 + i] = sums[i] >= kMinFastSum ? mx + std::log(sums[i]) : row_lse_exact(l + i * m, m);
        }
        // fold this slice's column sums (reference mx) into the task's float64 sums (reference ref);
        // NaN logits reach `part` (the vector max skips NaN lanes), so they turn the sums NaN, never hidden
        if (mx > ref) {
          if (ref > neg_inf) {
            const double down = std::exp(ref - mx);
            for (int64_t j = 0; j < m; ++j) acc[j] *= down;
          }
          ref = mx;
        }
        const double f = std::exp(mx - ref);
        for (int64_t j = 0; j < m; ++j) acc[j] += f * part[j];
      }
    }
  });
  if (!usable) return false;
  double top = neg_inf;
  for (double r : thread_ref) top = std::max(top, r);
  if (!(top > neg_inf)) return false;
  for (int64_t j = 0; j < m; ++j) chunk_col_lse[j] = 0.0;
  for (int64_t t = 0; t < tasks; ++t) {
    if (!(thread_ref[t] > neg_inf)) continue;
    const double f = std::exp(thread_ref[t] - top);
    const double* acc = col_acc_buf + t * m;
    for (int64_t j = 0; j < m; ++j) chunk_col_lse[j] += f * acc[j];
  }
  for (int64_t j = 0; j < m; ++j) {
    if (!(chunk_col_lse[j] >= kMinFastSum)) return false;
    chunk_col_lse[j] = top + std::log(chunk_col_lse[j]);
  }
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& image, const at::Tensor& text, double scale, int64_t chunk_size, int64_t mode) {
  check_loss_pair(image, text, "image", "text");
  check_mode(mode);
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
  TORCH_CHECK(mode != kModeFast || image.scalar_type() == at::kFloat,
              "clipforge._C: the fast path (mode 2) is float32 only, got ", image.scalar_type());
  if (n == 0 || m == 0) return {row_lse, col_max, col_sum};

  const int64_t chunk = resolve_chunk(chunk_size, n, m, image.element_size());
  const auto text_t = text.t();
  auto logits_buf = at::empty({chunk, m}, opts);  // chunk x m: the only big buffer
  const int64_t threads = at::get_num_threads();
  at::Tensor scratch_buf, col_parts;  // the exact path's: 16 x m scratch and column sums per thread, made on first use
  bool try_fast = kHaveFastPath && image.scalar_type() == at::kFloat && mode != kModeExact;
  at::Tensor fast_part, fast_acc, chunk_lse;
  std::vector<double> thread_ref(threads);
  if (try_fast) {
    fast_part = at::empty({threads, m}, opts);
    fast_acc = at::empty({threads, m}, stat_opts);
    chunk_lse = at::empty({m}, stat_opts);
  }

  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    auto logits = logits_buf.narrow(0, 0, rows);
    scaled_logits(logits, image.narrow(0, r0, rows), text_t, scale);  // GEMM: 2*rows*m*d FLOPs
    if (try_fast && forward_chunk_fast(logits, row_lse.data_ptr<double>() + r0, chunk_lse.data_ptr<double>(),
                                       fast_part.data_ptr<float>(), fast_acc.data_ptr<double>(), thread_ref)) {
      // the chunk's column log-sum-exps are its (reference, sum = 1) statistics
      const auto new_max = at::maximum(col_max, chunk_lse);
      col_sum.mul_((col_max - new_max).exp_()).add_((chunk_lse - new_max).exp_());
      col_max = new_max;
      continue;
    }
    TORCH_CHECK(mode != kModeFast, "clipforge._C: the fast path cannot represent these logits (a column's "
                "logits spread beyond ~57 below the chunk's maximum, or non-finite logits); use mode 0 or 1");
    // inputs that failed the check once (a wide spread of logits) tend to fail it again: do not pay
    // for a fast pass that is thrown away on every chunk
    try_fast = false;
    if (!scratch_buf.defined()) {
      scratch_buf = at::empty({threads, std::min(kSliceRows, chunk), m}, opts);
      col_parts = at::empty({threads, m}, stat_opts);
    }
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
    const at::Tensor& col_lse, int64_t row_offset, double coef, int64_t chunk_size, int64_t mode) {
  check_loss_pair(image, text, "image", "text");
  check_mode(mode);
  const int64_t n = image.size(0), m = text.size(0);
  check_stat(row_lse, "row_lse", n, at::kDouble);
  check_stat(col_lse, "col_lse", m, at::kDouble);
  TORCH_CHECK(row_offset >= 0 && row_offset + n <= m, "clipforge._C: the image rows [", row_offset, ", ",
              row_offset + n, ") must pair with text rows inside [0, ", m, ")");
  TORCH_CHECK(std::isfinite(scale) && std::isfinite(coef), "clipforge._C: scale and coef must be finite");
  at::NoGradGuard no_grad;
  const auto opts = image.options();
  TORCH_CHECK(mode != kModeFast || image.scalar_type() == at::kFloat,
              "clipforge._C: the fast path (mode 2) is float32 only, got ", image.scalar_type());
  if (n == 0 || m == 0) return {at::zeros_like(image), at::zeros_like(text), at::zeros({}, opts)};
  // Not zero-filled: every row of d_image is written by its chunk's GEMM (beta = 0), and d_text by the
  // first chunk's (beta = 0) before the others accumulate into it.
  auto d_image = at::empty_like(image);
  auto d_text = at::empty_like(text);

  const int64_t chunk = resolve_chunk(chunk_size, n, m, image.element_size());
  const auto text_t = text.t();
  auto logits_buf = at::empty({chunk, m}, opts);

  // The fast path: one reference R (the largest log-sum-exp) and per-row / per-column factors.
  bool fast = false;
  float R = 0.0f;
  at::Tensor u, v;
  if (kHaveFastPath && image.scalar_type() == at::kFloat && mode != kModeExact) {
    const double top = std::max(row_lse.max().item<double>(), col_lse.max().item<double>());
    const double low = std::min(row_lse.min().item<double>(), col_lse.min().item<double>());
    fast = std::isfinite(top) && std::isfinite(low) && top - low <= kMaxFastSpan;
    if (fast) {
      R = static_cast<float>(top);
      u = (static_cast<double>(R) - row_lse).exp_().to(at::kFloat);  // <= e^50: no overflow
      v = (static_cast<double>(R) - col_lse).exp_().to(at::kFloat);
    }
  }
  TORCH_CHECK(fast || mode != kModeFast, "clipforge._C: the fast path needs float32 features and log-sum-exps "
              "within ", kMaxFastSpan, " of each other; use mode 0 or 1");
  // The exact path: float64 statistics as hi + lo in the features' dtype: (l - hi) is exact when l ~ hi
  // (Sterbenz), so (l - hi) - lo keeps the precision of the float64 lse without float64 elementwise passes.
  at::Tensor row_hi, row_lo, col_hi, col_lo, scratch_buf;
  if (!fast) {
    const auto dtype = image.scalar_type();
    row_hi = row_lse.to(dtype);
    row_lo = (row_lse - row_hi.to(at::kDouble)).to(dtype);
    col_hi = col_lse.to(dtype).unsqueeze(0);
    col_lo = (col_lse - col_hi.squeeze(0).to(at::kDouble)).to(dtype).unsqueeze(0);
    scratch_buf = at::empty({at::get_num_threads(), std::min(kSliceRows, chunk), m}, opts);
  }

  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    const auto image_c = image.narrow(0, r0, rows);
    auto p = logits_buf.narrow(0, 0, rows);
    scaled_logits(p, image_c, text_t, scale);  // recompute: 2*rows*m*d FLOPs
    if (fast) {
      float* base = p.data_ptr<float>();
      const float* uf = u.data_ptr<float>() + r0;
      const float* vf = v.data_ptr<float>();
      at::parallel_for(0, (rows + kSliceRows - 1) / kSliceRows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t sl = begin; sl < end; ++sl) {
          const int64_t s0 = sl * kSliceRows, srows = std::min(kSliceRows, rows - s0);
          backward_slice_f32(base + s0 * m, srows, m, R, uf + s0, vf);
        }
      });
    } else {
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
    }
    // p = P (without the diagonal term and coef).  G T for these rows, and this chunk's share of s G^T I.
    auto gi = d_image.narrow(0, r0, rows);
    at::addmm_out(gi, gi, p, text, /*beta=*/0, /*alpha=*/coef);  // 2*rows*m*d FLOPs
    d_text.addmm_(p.t(), image_c, /*beta=*/r0 == 0 ? 0 : 1, /*alpha=*/coef * scale);  // 2*rows*m*d FLOPs
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
