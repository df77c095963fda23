// Public interface of the CPU GraphCut engine: independent binning problems (one per class, or
// one for the whole set), run in parallel with OpenMP, dispatched at run time to the widest
// instruction set the processor has (AVX-512, AVX2+FMA, or the baseline).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace dqk {

// One independent greedy problem: n samples with local ids 0..n-1.
template <typename T>
struct ProblemView {
  const T* x;            // (n, d) row-major: features, or δ of a gradient embedding
  int64_t n;
  int64_t d;
  const T* embed;        // (n, d_embed) row-major: e of a gradient embedding, or nullptr
  int64_t d_embed;
  const int64_t* bin_sizes;  // (n_bins,), summing to n; the last bin is the rest of the pool
  int64_t n_bins;
  double lam;            // λ > 0
  int64_t* order_out;    // (n,) local ids in pick order, bin after bin
};

// Progress of a run: greedy steps done (picks in every bin but the last), summed over problems.
// Updated with relaxed atomic adds, a few per bin (every kProgressStride steps and at the bin's
// end), so another thread may poll it while the engine runs.
using ProgressCounter = std::atomic<int64_t>;
constexpr int64_t kProgressStride = 256;

// Runs every problem. use_gram[i] selects the Gram form (n_i² · sizeof(T) bytes) for problem i,
// else the streaming form. n_threads <= 0 keeps the OpenMP default. progress: nullptr, or a
// counter the engine adds its greedy steps to.
void run_graphcut(const std::vector<ProblemView<float>>& problems,
                  const std::vector<bool>& use_gram, int n_threads,
                  ProgressCounter* progress = nullptr);
void run_graphcut(const std::vector<ProblemView<double>>& problems,
                  const std::vector<bool>& use_gram, int n_threads,
                  ProgressCounter* progress = nullptr);

// gram (n×n) = x·xᵀ with the dispatched SYRK kernel (exposed for tests and benchmarks).
void gram_matrix(const float* x, int64_t n, int64_t d, float* gram, int n_threads);
void gram_matrix(const double* x, int64_t n, int64_t d, double* gram, int n_threads);

// Name of the instruction set the dispatcher selects on this processor.
std::string cpu_isa();

}  // namespace dqk
