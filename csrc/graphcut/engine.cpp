// Run-time dispatch of the CPU engine to the widest instruction set this processor supports.
#include "engine.h"

#include <omp.h>

namespace dqk {

#define DQK_DECLARE_ISA(ns)                                                              \
  namespace ns {                                                                         \
  template <typename T>                                                                  \
  void run_graphcut_isa(const std::vector<ProblemView<T>>&, const std::vector<bool>&,     \
                        ProgressCounter*);                                               \
  template <typename T>                                                                  \
  void gram_matrix_isa(const T*, int64_t, int64_t, T*);                                 \
  }
DQK_DECLARE_ISA(baseline)
#if DQK_HAVE_X86_ISAS
DQK_DECLARE_ISA(avx2)
DQK_DECLARE_ISA(avx512)
#endif
#undef DQK_DECLARE_ISA

namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa detect_isa() {
#if DQK_HAVE_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

const Isa kIsa = detect_isa();

// Sets the OpenMP thread count for one call and restores it afterwards.
class ThreadScope {
 public:
  explicit ThreadScope(int n_threads) : saved_(omp_get_max_threads()) {
    if (n_threads > 0) omp_set_num_threads(n_threads);
  }
  ~ThreadScope() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

template <typename T>
void run_dispatch(const std::vector<ProblemView<T>>& problems, const std::vector<bool>& use_gram,
                  int n_threads, ProgressCounter* progress) {
  ThreadScope scope(n_threads);
  switch (kIsa) {
#if DQK_HAVE_X86_ISAS
    case Isa::kAvx512: return avx512::run_graphcut_isa(problems, use_gram, progress);
    case Isa::kAvx2: return avx2::run_graphcut_isa(problems, use_gram, progress);
#endif
    default: return baseline::run_graphcut_isa(problems, use_gram, progress);
  }
}

template <typename T>
void gram_dispatch(const T* x, int64_t n, int64_t d, T* gram, int n_threads) {
  ThreadScope scope(n_threads);
  switch (kIsa) {
#if DQK_HAVE_X86_ISAS
    case Isa::kAvx512: return avx512::gram_matrix_isa(x, n, d, gram);
    case Isa::kAvx2: return avx2::gram_matrix_isa(x, n, d, gram);
#endif
    default: return baseline::gram_matrix_isa(x, n, d, gram);
  }
}

}  // namespace

void run_graphcut(const std::vector<ProblemView<float>>& problems,
                  const std::vector<bool>& use_gram, int n_threads, ProgressCounter* progress) {
  run_dispatch(problems, use_gram, n_threads, progress);
}
void run_graphcut(const std::vector<ProblemView<double>>& problems,
                  const std::vector<bool>& use_gram, int n_threads, ProgressCounter* progress) {
  run_dispatch(problems, use_gram, n_threads, progress);
}
void gram_matrix(const float* x, int64_t n, int64_t d, float* gram, int n_threads) {
  gram_dispatch(x, n, d, gram, n_threads);
}
void gram_matrix(const double* x, int64_t n, int64_t d, double* gram, int n_threads) {
  gram_dispatch(x, n, d, gram, n_threads);
}

std::string cpu_isa() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace dqk
