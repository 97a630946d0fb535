// Small, optional hot loops for megatron_longctx. Each function has a numpy twin in
// megatron_longctx/native.py, and tests check both give identical results.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <utility>

namespace py = pybind11;

// Count documents and sum their tokens per bin [edges[i], edges[i+1]).
// Lengths below edges[0] or at/above edges[-1] raise: the caller picks edges covering all lengths.
static std::pair<py::array_t<int64_t>, py::array_t<int64_t>> length_histogram(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> edges) {
  auto len = lengths.unchecked<1>();
  auto edg = edges.unchecked<1>();
  const py::ssize_t n_edges = edg.shape(0);
  if (n_edges < 2) throw std::invalid_argument("need at least two bin edges");
  const int64_t *e_begin = edges.data();
  const int64_t *e_end = e_begin + n_edges;
  py::array_t<int64_t> counts(n_edges - 1);
  py::array_t<int64_t> tokens(n_edges - 1);
  auto c = counts.mutable_unchecked<1>();
  auto t = tokens.mutable_unchecked<1>();
  for (py::ssize_t i = 0; i < n_edges - 1; ++i) {
    c(i) = 0;
    t(i) = 0;
  }
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < len.shape(0); ++i) {
      const int64_t v = len(i);
      if (v < e_begin[0] || v >= e_end[-1]) {
        py::gil_scoped_acquire acquire;
        throw std::out_of_range("length outside the histogram edges");
      }
      // upper_bound gives the first edge > v; the bin is the one before it.
      const py::ssize_t b = std::upper_bound(e_begin, e_end, v) - e_begin - 1;
      c(b) += 1;
      t(b) += v;
    }
  }
  return {counts, tokens};
}

PYBIND11_MODULE(_csrc, m) {
  m.doc() = "megatron_longctx hot loops (optional; numpy fallbacks in megatron_longctx.native)";
  m.def("length_histogram", &length_histogram, py::arg("lengths"), py::arg("edges"),
        "Documents and token sums per length bin [edges[i], edges[i+1]).");
}
