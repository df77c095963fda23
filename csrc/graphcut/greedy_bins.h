// GraphCut bin generation on the CPU (docs/method.md §1): greedy bins, one after another, from the pool of
// samples not yet binned. One running score per pool sample, in float64:
//   bin start:  score(x) = −λ·C2(x),  C2(x) = Σ_{p∈R} d(p,x)
//   after a pick x*:  score(x) += 2·δ(x),  δ(x) = n_x + n_x* − 2·k(x, x*)
// where k is the pair kernel (f_x·f_p, or (δ_x·δ_p)(1 + e_x·e_p) for gradient embeddings) and
// n_x = k(x, x). Each step is one fused pass over the pool (score update + argmax, lowest index
// on ties). The kernel row k(·, x*) comes from a precomputed Gram matrix (gram form) or from one
// pass over the pool's compacted features (streaming form: O(|R|·d) per step, no n×n memory).
//
// Compiled once per instruction set (engine_isa.cpp).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "engine.h"
#include "gram_syrk.h"

namespace dqk {
namespace DQK_ISA_NS {

constexpr double kTaken = -std::numeric_limits<double>::infinity();
constexpr int64_t kPairwiseC2MaxPool = 64;

template <typename T>
inline double dot_row(const T* __restrict a, const T* __restrict b, int64_t d) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) acc += a[k] * b[k];
  return static_cast<double>(acc);
}

// Features of one problem, as the step kernels read them.
template <typename T>
struct PairKernel {
  const T* x;      // (n, d): features, or δ of a gradient embedding
  int64_t d;
  const T* embed;  // (n, d_embed): e of a gradient embedding, or nullptr
  int64_t d_embed;

  double operator()(const T* xa, const T* ea, const T* xb, const T* eb) const {
    const double base = dot_row(xa, xb, d);
    return embed ? base * (1.0 + dot_row(ea, eb, d_embed)) : base;
  }
};

// The per-thread partial of a fused step: best score and its pool position.
struct ArgmaxPartial {
  double value;
  int64_t position;
  char pad[48];  // one cache line per thread
};

// Reduces per-thread partials (contiguous ascending chunks) to the pool position of the max,
// lowest position on ties.
inline int64_t reduce_argmax(const ArgmaxPartial* partials, int n_parts) {
  double best = kTaken;
  int64_t best_pos = -1;
  for (int t = 0; t < n_parts; ++t) {
    if (partials[t].position >= 0 && (best_pos < 0 || partials[t].value > best)) {
      best = partials[t].value;
      best_pos = partials[t].position;
    }
  }
  return best_pos;
}

// The lowest position in [lo, hi) whose score equals best (the range's max); -1 if all taken.
inline ArgmaxPartial first_at_value(const double* __restrict score, int64_t lo, int64_t hi,
                                    double best) {
  ArgmaxPartial out{best, -1, {}};
  if (best == kTaken) return out;
  for (int64_t i = lo; i < hi; ++i) {
    if (score[i] == best) {
      out.position = i;
      break;
    }
  }
  return out;
}

// Lowest position in [lo, hi) holding the max of score (ignoring taken slots); -1 if none.
inline ArgmaxPartial argmax_range(const double* __restrict score, int64_t lo, int64_t hi) {
  double best = kTaken;
#pragma omp simd reduction(max : best)
  for (int64_t i = lo; i < hi; ++i) best = std::max(best, score[i]);
  return first_at_value(score, lo, hi, best);
}

// dots[i] = Σ_k cols[k·r + i]·q[k] for i in [lo, hi), cols (d × r): k outermost, so the inner
// loop runs along the pool (vectorised, no horizontal sums) and every i accumulates in the same
// order; positions are blocked so the running dots stay in L1.
template <typename T>
inline void pool_dots(const T* __restrict cols, int64_t r, int64_t d, const T* __restrict q,
                      int64_t lo, int64_t hi, T* __restrict dots) {
  constexpr int64_t kBlock = 2048;
  for (int64_t start = lo; start < hi; start += kBlock) {
    const int64_t end = std::min(hi, start + kBlock);
    for (int64_t i = start; i < end; ++i) dots[i] = T(0);
    for (int64_t k = 0; k < d; ++k) {
      const T qk = q[k];
      const T* __restrict col = cols + k * r;
#pragma omp simd
      for (int64_t i = start; i < end; ++i) dots[i] += col[i] * qk;
    }
  }
}

// One greedy problem (a class, or the whole data set).
template <typename T>
class GreedyBins {
 public:
  GreedyBins(const ProblemView<T>& problem, bool use_gram, bool parallel_inside,
             ProgressCounter* progress)
      : p_(problem), kernel_{problem.x, problem.d, problem.embed, problem.d_embed},
        use_gram_(use_gram), parallel_inside_(parallel_inside), progress_(progress) {}

  void run() {
    const int64_t n = p_.n;
    norms_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const T* xi = p_.x + i * p_.d;
      const T* ei = p_.embed ? p_.embed + i * p_.d_embed : nullptr;
      norms_[i] = kernel_(xi, ei, xi, ei);
    }
    int64_t greedy_steps = 0;
    for (int64_t b = 0; b + 1 < p_.n_bins; ++b) greedy_steps += p_.bin_sizes[b];
    if (greedy_steps > 0 && use_gram_) build_gram();

    pool_.resize(n);
    for (int64_t i = 0; i < n; ++i) pool_[i] = i;
    int64_t written = 0;
    for (int64_t b = 0; b < p_.n_bins; ++b) {
      const int64_t size = p_.bin_sizes[b];
      if (b + 1 == p_.n_bins) {  // the last bin is the rest of the pool
        for (int64_t id : pool_) p_.order_out[written++] = id;
        break;
      }
      if (size == 0) continue;
      if (!run_bin(size, p_.order_out + written)) {
        // A score was NaN or no pool sample had a valid score: the output is marked invalid
        // (all −1) rather than filled with a wrong order; the caller checks it and raises.
        for (int64_t i = 0; i < n; ++i) p_.order_out[i] = -1;
        return;
      }
      written += size;
    }
  }

 private:
  void build_gram() {
    const int64_t n = p_.n;
    gram_ = GramMatrix<T>(n);  // every entry is written by the SYRK
    if (p_.embed) {
      gram_syrk(p_.embed, n, p_.d_embed, gram_, GramEpilogue::kStore);
      gram_syrk(p_.x, n, p_.d, gram_, GramEpilogue::kMulOnePlus);
    } else {
      gram_syrk(p_.x, n, p_.d, gram_, GramEpilogue::kStore);
    }
  }

  // C2(x) for every pool sample. Plain features: r·n_x − 2·f_x·F_R + Σ_R n_p with F_R = Σ_R f_p
  // (O(r·d), no drift). Gradient embeddings: the sum does not factorise through a d-vector, so
  // C2 is computed once (Gram row sums, or pairwise passes) and then kept running (C2 −= δ).
  void init_pool_c2(std::vector<double>& c2) {
    const int64_t r = static_cast<int64_t>(pool_.size());
    c2.assign(r, 0.0);
    double norm_sum = 0.0;
    for (int64_t id : pool_) norm_sum += norms_[id];
    if (r <= kPairwiseC2MaxPool) {
      // Small pools: sum the pairwise distances, which are exactly symmetric, so the true ties
      // of a tiny pool (two samples always tie) stay exact and go to the lowest index.
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < r; ++j)
          if (j != i)
            c2[i] += norms_[pool_[i]] + norms_[pool_[j]] - 2.0 * kernel_value(pool_[i], pool_[j]);
      return;
    }
    if (!p_.embed) {
      std::vector<double> pool_sum(p_.d, 0.0);
      for (int64_t id : pool_) {
        const T* xp = p_.x + id * p_.d;
        for (int64_t k = 0; k < p_.d; ++k) pool_sum[k] += static_cast<double>(xp[k]);
      }
#pragma omp parallel for schedule(static) if (parallel_inside_ && r * p_.d > (1 << 16))
      for (int64_t i = 0; i < r; ++i) {
        const T* xi = p_.x + pool_[i] * p_.d;
        double cross = 0.0;
        for (int64_t k = 0; k < p_.d; ++k) cross += static_cast<double>(xi[k]) * pool_sum[k];
        c2[i] = static_cast<double>(r) * norms_[pool_[i]] - 2.0 * cross + norm_sum;
      }
      return;
    }
    if (!running_c2_.empty()) {
      for (int64_t i = 0; i < r; ++i) c2[i] = running_c2_[pool_[i]];
      return;
    }
    // First greedy bin of a gradient problem: the pool is everything still unbinned.
#pragma omp parallel for schedule(dynamic, 16) if (parallel_inside_)
    for (int64_t i = 0; i < r; ++i) {
      const int64_t xi = pool_[i];
      double cross = 0.0;
      for (int64_t j = 0; j < r; ++j) cross += kernel_value(xi, pool_[j]);
      c2[i] = static_cast<double>(r) * norms_[xi] - 2.0 * cross + norm_sum;
    }
  }

  double kernel_value(int64_t a, int64_t b) const {
    if (gram_) return static_cast<double>(gram_.at(a, b));
    const T* ea = p_.embed ? p_.embed + a * p_.d_embed : nullptr;
    const T* eb = p_.embed ? p_.embed + b * p_.d_embed : nullptr;
    return kernel_(p_.x + a * p_.d, ea, p_.x + b * p_.d, eb);
  }

  // Compacts the pool's features, transposed (d × r), so a streaming step runs along the pool.
  void compact_pool_features() {
    const int64_t r = static_cast<int64_t>(pool_.size());
    transpose_rows(p_.x, p_.d, pool_xt_);
    if (p_.embed) transpose_rows(p_.embed, p_.d_embed, pool_et_);
    pool_dots_.resize(r);
    pool_dots_e_.resize(p_.embed ? r : 0);
  }

  // out (dims × r) = rows[pool]ᵀ for rows (n × dims).
  void transpose_rows(const T* rows, int64_t dims, std::vector<T>& out) const {
    const int64_t r = static_cast<int64_t>(pool_.size());
    out.resize(r * dims);
    for (int64_t i = 0; i < r; ++i) {
      const T* row = rows + pool_[i] * dims;
      for (int64_t k = 0; k < dims; ++k) out[k * r + i] = row[k];
    }
  }

  // score[i] += 2δ_i (and C2 −= δ_i) for pool positions [lo, hi) after picking sample `pick`;
  // returns the chunk's argmax. Taken slots hold −inf and stay there.
  ArgmaxPartial update_range(int64_t pick, int64_t lo, int64_t hi, double* __restrict score,
                             const double* __restrict pool_norm, double* __restrict c2) {
    const double pick_norm = norms_[pick];
    if (gram_) {
      const T* __restrict gram_row = gram_.row(pick);
      const int32_t* __restrict pool = pool32_.data();  // 32-bit indices: twice the gather width
      double best = kTaken;
      if (c2) {
#pragma omp simd reduction(max : best)
        for (int64_t i = lo; i < hi; ++i) {
          const double delta =
              pool_norm[i] + pick_norm - 2.0 * static_cast<double>(gram_row[pool[i]]);
          score[i] += 2.0 * delta;
          c2[i] -= delta;
          best = std::max(best, score[i]);
        }
      } else {
#pragma omp simd reduction(max : best)
        for (int64_t i = lo; i < hi; ++i) {
          const double delta =
              pool_norm[i] + pick_norm - 2.0 * static_cast<double>(gram_row[pool[i]]);
          score[i] += 2.0 * delta;
          best = std::max(best, score[i]);
        }
      }
      return first_at_value(score, lo, hi, best);
    }
    const int64_t r = static_cast<int64_t>(pool_.size());
    T* __restrict dots = pool_dots_.data();
    T* __restrict dots_e = pool_dots_e_.data();
    pool_dots(pool_xt_.data(), r, p_.d, p_.x + pick * p_.d, lo, hi, dots);
    if (p_.embed) pool_dots(pool_et_.data(), r, p_.d_embed, p_.embed + pick * p_.d_embed, lo, hi, dots_e);
    double best = kTaken;
    if (p_.embed) {  // gradient embeddings: k = (δ·δ*)(1 + e·e*), C2 runs across bins
#pragma omp simd reduction(max : best)
      for (int64_t i = lo; i < hi; ++i) {
        const double k_pick = static_cast<double>(dots[i]) * (1.0 + static_cast<double>(dots_e[i]));
        const double delta = pool_norm[i] + pick_norm - 2.0 * k_pick;
        score[i] += 2.0 * delta;
        c2[i] -= delta;
        best = std::max(best, score[i]);
      }
    } else {
#pragma omp simd reduction(max : best)
      for (int64_t i = lo; i < hi; ++i) {
        const double delta = pool_norm[i] + pick_norm - 2.0 * static_cast<double>(dots[i]);
        score[i] += 2.0 * delta;
        best = std::max(best, score[i]);
      }
    }
    return first_at_value(score, lo, hi, best);
  }

  // Picks one bin; false when the scores stopped being comparable (a NaN, or nothing to pick).
  bool run_bin(int64_t size, int64_t* picks_out) {
    const int64_t r = static_cast<int64_t>(pool_.size());
    std::vector<double> c2;
    init_pool_c2(c2);
    std::vector<double> score(r), pool_norm(r);
    for (int64_t i = 0; i < r; ++i) {
      score[i] = -p_.lam * c2[i];
      pool_norm[i] = norms_[pool_[i]];
    }
    if (gram_) {
      pool32_.assign(pool_.begin(), pool_.end());  // n² fits in memory, so n < 2³¹
    } else {
      compact_pool_features();
    }
    double* c2_running = p_.embed ? c2.data() : nullptr;
    // The last pick's δ still has to reach C2 when C2 runs across bins.
    const int64_t n_updates = c2_running ? size : size - 1;

    // Steps split across threads meet at a barrier every step. A Gram step (one row) is too short
    // for that to pay, and on a loaded machine a barrier can wait a whole scheduler time slice,
    // so only streaming steps over a large pool (~250k multiply-adds and up) run in parallel.
    const bool parallel = parallel_inside_ && !gram_ && omp_get_max_threads() > 1 &&
                          r * (p_.d + p_.d_embed) >= (1 << 18);
    const int n_threads = parallel ? omp_get_max_threads() : 1;
    // Partials are double-buffered by step parity, so one barrier per step suffices: a thread
    // cannot overwrite buffer k before every thread has passed the barrier of the step after it.
    std::vector<ArgmaxPartial> partials(2 * n_threads);
    const int64_t first_pos = argmax_range(score.data(), 0, r).position;
    if (first_pos < 0) return false;
    bool no_pick = false;
    int64_t reported = 0;  // steps of this bin already added to progress_ (thread 0 only)

#pragma omp parallel num_threads(n_threads) if (parallel)
    {
      const int tid = omp_get_thread_num();
      const int nt = omp_get_num_threads();
      const int64_t lo = r * tid / nt, hi = r * (tid + 1) / nt;
      int64_t pick_pos = first_pos;
      for (int64_t step = 0; step < size; ++step) {
        // Every thread reduces the same partials, so all of them leave here together.
        if (pick_pos < 0) {
          if (tid == 0) no_pick = true;
          break;
        }
        const int64_t pick = pool_[pick_pos];
        if (tid == 0) {
          picks_out[step] = pick;
          if (progress_ && (step + 1) % kProgressStride == 0) {
            progress_->fetch_add(kProgressStride, std::memory_order_relaxed);
            reported += kProgressStride;
          }
        }
        if (pick_pos >= lo && pick_pos < hi) score[pick_pos] = kTaken;
        if (step >= n_updates) break;
        ArgmaxPartial* step_partials = partials.data() + (step & 1) * nt;
        step_partials[tid] = update_range(pick, lo, hi, score.data(), pool_norm.data(), c2_running);
#pragma omp barrier
        pick_pos = reduce_argmax(step_partials, nt);
      }
    }
    if (no_pick) return false;
    if (progress_) progress_->fetch_add(size - reported, std::memory_order_relaxed);
    // A NaN score never wins a comparison, so it would be skipped silently: refuse instead.
    for (int64_t i = 0; i < r; ++i)
      if (std::isnan(score[i])) return false;
    if (c2_running) {
      running_c2_.resize(p_.n);
      for (int64_t i = 0; i < r; ++i) running_c2_[pool_[i]] = c2[i];
    }
    // Remove the bin's picks from the pool, keeping ascending order.
    int64_t kept = 0;
    for (int64_t i = 0; i < r; ++i)
      if (score[i] != kTaken) pool_[kept++] = pool_[i];
    pool_.resize(kept);
    return kept == r - size;
  }

  ProblemView<T> p_;
  PairKernel<T> kernel_;
  bool use_gram_;
  bool parallel_inside_;
  ProgressCounter* progress_;  // nullptr, or where greedy steps are counted
  std::vector<double> norms_;
  std::vector<int64_t> pool_;
  GramMatrix<T> gram_;  // (n, n) when the Gram form runs
  std::vector<int32_t> pool32_;  // the pool's sample ids, for the Gram form's row gathers
  std::vector<T> pool_xt_, pool_et_;        // streaming form: pool features, (dims × r)
  std::vector<T> pool_dots_, pool_dots_e_;  // streaming form: k(·, pick) over the pool
  std::vector<double> running_c2_;  // gradient embeddings only, indexed by sample
};

template <typename T>
void run_problems(const std::vector<ProblemView<T>>& problems, const std::vector<bool>& use_gram,
                  ProgressCounter* progress) {
  const int64_t n_problems = static_cast<int64_t>(problems.size());
  // Many problems: one per thread, each single-threaded. Few: one after another, each parallel.
  const bool across = n_problems >= 2 * omp_get_max_threads();
  if (across) {
    std::vector<int64_t> by_size(n_problems);
    for (int64_t i = 0; i < n_problems; ++i) by_size[i] = i;
    std::sort(by_size.begin(), by_size.end(),
              [&](int64_t a, int64_t b) { return problems[a].n > problems[b].n; });
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_problems; ++k) {
      const int64_t i = by_size[k];
      GreedyBins<T>(problems[i], use_gram[i], false, progress).run();
    }
  } else {
    for (int64_t i = 0; i < n_problems; ++i)
      GreedyBins<T>(problems[i], use_gram[i], true, progress).run();
  }
}

}  // namespace DQK_ISA_NS
}  // namespace dqk
