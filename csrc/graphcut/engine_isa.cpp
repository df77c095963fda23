// Instantiates the CPU engine for one instruction set. CMake compiles this file once per ISA with
// DQK_ISA_NS set to avx512 / avx2 / baseline and the matching -m flags.
#include "greedy_bins.h"

namespace dqk {
namespace DQK_ISA_NS {

template <typename T>
void run_graphcut_isa(const std::vector<ProblemView<T>>& problems,
                      const std::vector<bool>& use_gram, ProgressCounter* progress) {
  run_problems(problems, use_gram, progress);
}

template <typename T>
void gram_matrix_isa(const T* x, int64_t n, int64_t d, T* gram) {
  GramMatrix<T> padded(n);
  gram_syrk(x, n, d, padded, GramEpilogue::kStore);
  for (int64_t a = 0; a < n; ++a) std::copy_n(padded.row(a), n, gram + a * n);
}

template void run_graphcut_isa<float>(const std::vector<ProblemView<float>>&,
                                      const std::vector<bool>&, ProgressCounter*);
template void run_graphcut_isa<double>(const std::vector<ProblemView<double>>&,
                                       const std::vector<bool>&, ProgressCounter*);
template void gram_matrix_isa<float>(const float*, int64_t, int64_t, float*);
template void gram_matrix_isa<double>(const double*, int64_t, int64_t, double*);

}  // namespace DQK_ISA_NS
}  // namespace dqk
