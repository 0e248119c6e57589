// pybind11 surface of clipforge._C. The heavy lifting lives in contrastive.cpp, siglip.cpp and topk.cpp.
#include "clipforge.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clipforge C++ extension: chunked similarity, log-sum-exp statistics, the sigmoid loss, top-k";
  m.def("contrastive_forward", &clipforge::contrastive_forward,
        "Row log-sum-exps and partial column (reference, sum-exp) of scale*image@text^T, chunked (CPU).",
        py::arg("image"), py::arg("text"), py::arg("scale"), py::arg("chunk_size") = 0, py::arg("mode") = 0);
  m.def("contrastive_backward", &clipforge::contrastive_backward,
        "Gradients (d_image, d_text partial, d_scale partial) of the CLIP loss from saved statistics (CPU).",
        py::arg("image"), py::arg("text"), py::arg("scale"), py::arg("row_lse"), py::arg("col_lse"),
        py::arg("row_offset"), py::arg("coef"), py::arg("chunk_size") = 0, py::arg("mode") = 0);
  m.def("siglip_forward", &clipforge::siglip_forward,
        "Sum of softplus(-z*s), s = scale*image@text^T + bias, over this block's rows, chunked (CPU, 0-d float64).",
        py::arg("image"), py::arg("text"), py::arg("scale"), py::arg("bias"), py::arg("row_offset") = 0,
        py::arg("chunk_size") = 0);
  m.def("siglip_forward_backward", &clipforge::siglip_forward_backward,
        "The SigLIP sum and the gradients of coef * it (sum, d_image, d_text partial, d_scale, d_bias), one pass (CPU).",
        py::arg("image"), py::arg("text"), py::arg("scale"), py::arg("bias"), py::arg("row_offset"),
        py::arg("coef"), py::arg("chunk_size") = 0);
  m.def("chunked_topk", &clipforge::chunked_topk,
        "Top-k columns per row of a@b^T without the full matrix: (values, int64 indices) (CPU).",
        py::arg("a"), py::arg("b"), py::arg("k"), py::arg("row_chunk") = 0, py::arg("col_chunk") = 0);
  m.def("auto_chunk_rows", &clipforge::auto_chunk_rows,
        "Rows per chunk keeping a rows x cols block near target_bytes.", py::arg("rows"), py::arg("cols"),
        py::arg("elem_size") = 4, py::arg("target_bytes") = 16 << 20);
}
