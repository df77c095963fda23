// pybind11 glue for the CPU engine: converts buffers, checks shapes, releases the GIL.
// Validation of user input (NaN, labels, sizes) happens in dqkernels/api.py before this point.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "graphcut/engine.h"

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;
using Int64Array = py::array_t<int64_t, py::array::c_style>;

// The engine adds to the caller's int64 with relaxed atomic adds while another Python thread
// reads it. C++17 has no std::atomic_ref, so the 8-byte int64 is used in place as a
// std::atomic<int64_t>: sound only where that type is lock-free and laid out as a plain int64,
// which is checked at compile time, and where the element is aligned, checked here.
static_assert(std::atomic<int64_t>::is_always_lock_free, "progress counter needs lock-free int64 atomics");
static_assert(sizeof(std::atomic<int64_t>) == sizeof(int64_t) &&
                  alignof(std::atomic<int64_t>) == alignof(int64_t),
              "progress counter needs std::atomic<int64_t> laid out as int64_t");

dqk::ProgressCounter* progress_counter(const py::object& progress) {
  if (progress.is_none()) return nullptr;
  if (!py::isinstance<py::array>(progress))
    throw py::type_error("progress must be None or a 1-element int64 numpy array");
  py::array arr = progress.cast<py::array>();
  if (!arr.dtype().is(py::dtype::of<int64_t>()) || arr.size() != 1 || !arr.writeable())
    throw std::invalid_argument("progress must be a writeable 1-element int64 numpy array");
  void* data = arr.mutable_data();
  if (reinterpret_cast<std::uintptr_t>(data) % alignof(dqk::ProgressCounter) != 0)
    throw std::invalid_argument("progress must be an aligned int64 array");
  return reinterpret_cast<dqk::ProgressCounter*>(data);
}

template <typename T>
Int64Array run_typed(const CArray<T>& x, const py::object& embed_obj, const Int64Array& offsets,
                     const Int64Array& bin_sizes, double lam,
                     const py::array_t<bool, py::array::c_style>& use_gram, int n_threads,
                     dqk::ProgressCounter* progress) {
  if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D");
  const int64_t m = x.shape(0), d = x.shape(1);
  const T* embed = nullptr;
  int64_t d_embed = 0;
  CArray<T> embed_arr;
  if (!embed_obj.is_none()) {
    embed_arr = embed_obj.cast<CArray<T>>();
    if (embed_arr.ndim() != 2 || embed_arr.shape(0) != m)
      throw std::invalid_argument("embed must be (M, D) with the rows of x");
    embed = embed_arr.data();
    d_embed = embed_arr.shape(1);
  }
  const int64_t n_problems = offsets.size() - 1;
  if (n_problems < 1 || bin_sizes.ndim() != 2 || bin_sizes.shape(0) != n_problems ||
      use_gram.size() != n_problems)
    throw std::invalid_argument("offsets, bin_sizes and use_gram disagree on the problem count");
  const int64_t n_bins = bin_sizes.shape(1);
  const int64_t* off = offsets.data();
  if (off[0] != 0 || off[n_problems] != m)
    throw std::invalid_argument("offsets must run from 0 to M");
  Int64Array order(m);
  std::vector<dqk::ProblemView<T>> problems;
  std::vector<bool> gram_flags;
  for (int64_t p = 0; p < n_problems; ++p) {
    const int64_t n = off[p + 1] - off[p];
    const int64_t* sizes = bin_sizes.data() + p * n_bins;
    int64_t total = 0;
    for (int64_t b = 0; b < n_bins; ++b) {
      if (sizes[b] < 0) throw std::invalid_argument("bin sizes must be >= 0");
      total += sizes[b];
    }
    if (n < 0 || total != n) throw std::invalid_argument("bin sizes must sum to the problem size");
    problems.push_back({x.data() + off[p] * d, n, d, embed ? embed + off[p] * d_embed : nullptr,
                        d_embed, sizes, n_bins, lam, order.mutable_data() + off[p]});
    gram_flags.push_back(use_gram.data()[p]);
  }
  {
    py::gil_scoped_release release;
    dqk::run_graphcut(problems, gram_flags, n_threads, progress);
  }
  return order;
}

py::array graphcut_cpu(const py::array& x, const py::object& embed, const Int64Array& offsets,
                       const Int64Array& bin_sizes, double lam,
                       const py::array_t<bool, py::array::c_style>& use_gram, int n_threads,
                       const py::object& progress) {
  dqk::ProgressCounter* counter = progress_counter(progress);
  if (x.dtype().is(py::dtype::of<float>()))
    return run_typed<float>(x.cast<CArray<float>>(), embed, offsets, bin_sizes, lam, use_gram,
                            n_threads, counter);
  if (x.dtype().is(py::dtype::of<double>()))
    return run_typed<double>(x.cast<CArray<double>>(), embed, offsets, bin_sizes, lam, use_gram,
                             n_threads, counter);
  throw py::type_error("x must be float32 or float64");
}

template <typename T>
CArray<T> gram_typed(const CArray<T>& x, int n_threads) {
  if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D");
  const int64_t n = x.shape(0), d = x.shape(1);
  CArray<T> gram({n, n});
  {
    py::gil_scoped_release release;
    dqk::gram_matrix(x.data(), n, d, gram.mutable_data(), n_threads);
  }
  return gram;
}

py::array gram_cpu(const py::array& x, int n_threads) {
  if (x.dtype().is(py::dtype::of<float>())) return gram_typed<float>(x.cast<CArray<float>>(), n_threads);
  if (x.dtype().is(py::dtype::of<double>())) return gram_typed<double>(x.cast<CArray<double>>(), n_threads);
  throw py::type_error("x must be float32 or float64");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dqkernels CPU engine: GraphCut bin generation (docs/method.md §1).";
  m.def("graphcut_cpu", &graphcut_cpu, py::arg("x"), py::arg("embed"), py::arg("offsets"),
        py::arg("bin_sizes"), py::arg("lam"), py::arg("use_gram"), py::arg("n_threads") = 0, py::arg("progress") = py::none(),
        "Greedy GraphCut bins for independent problems.\n\n"
        "x: (M, d) float32/float64 C-contiguous, rows grouped by problem; embed: None or (M, D)\n"
        "(then x is δ of a gradient embedding); offsets: (P+1,) int64 row offsets of the\n"
        "problems; bin_sizes: (P, N) int64; use_gram: (P,) bool. Returns (M,) int64 local ids\n"
        "in pick order per problem, at the problem's row offset. progress: None or a 1-element\n"
        "int64 array the engine adds its greedy steps to (picks in every bin but the last) with\n"
        "relaxed atomic adds while it runs without the GIL, so another thread may poll it.");
  m.def("gram_cpu", &gram_cpu, py::arg("x"), py::arg("n_threads") = 0,
        "x·xᵀ for x (n, d) float32/float64 with the engine's SYRK kernel; returns (n, n).");
  m.def("cpu_isa", &dqk::cpu_isa, "Instruction set the CPU engine dispatches to.");
}
