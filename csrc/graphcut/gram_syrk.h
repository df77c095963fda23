// Symmetric Gram matrix G = X·Xᵀ on the CPU: register-tiled, packed, OpenMP-parallel.
//
// Only tiles that touch the lower triangle are computed; each entry (i >= j) is written once to
// G[i][j] and once, mirrored, to G[j][i], so G is exactly symmetric. Every entry accumulates over
// k = 0..d-1 in the same order with the same instruction sequence, so identical rows give
// bit-identical Gram rows (exact ties stay exact ties for the greedy argmax).
//
// This header is compiled once per instruction set (see engine_isa.cpp); the register tile is
// chosen from the target macros of that translation unit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace dqk {
namespace DQK_ISA_NS {

// Register tile: MR rows × (NV·VL) columns of accumulators, VL lanes per vector register.
template <typename T> struct SyrkTile;
#if defined(__AVX512F__)
template <> struct SyrkTile<float>  { static constexpr int MR = 12, NV = 2, VL = 16; };
template <> struct SyrkTile<double> { static constexpr int MR = 12, NV = 2, VL = 8; };
#elif defined(__AVX2__)
template <> struct SyrkTile<float>  { static constexpr int MR = 6, NV = 2, VL = 8; };
template <> struct SyrkTile<double> { static constexpr int MR = 6, NV = 2, VL = 4; };
#else
template <> struct SyrkTile<float>  { static constexpr int MR = 4, NV = 2, VL = 4; };
template <> struct SyrkTile<double> { static constexpr int MR = 4, NV = 2, VL = 2; };
#endif

// What the tile writes into G: the product itself, or product·(1 + G) (factorised gradient
// kernel: G holds E·Eᵀ from a first pass, the second pass multiplies in Δ·Δᵀ).
enum class GramEpilogue { kStore, kMulOnePlus };

// Packs rows [p·R, p·R+R) of x (n×d) k-major: panel[k·R + r] = x[p·R + r][k]; rows past n are 0.
template <typename T>
void pack_row_panels(const T* x, int64_t n, int64_t d, int R, T* packed) {
  const int64_t n_panels = (n + R - 1) / R;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < n_panels; ++p) {
    T* panel = packed + p * R * d;
    for (int r = 0; r < R; ++r) {
      const int64_t row = p * R + r;
      if (row < n) {
        const T* src = x + row * d;
        for (int64_t k = 0; k < d; ++k) panel[k * R + r] = src[k];
      } else {
        for (int64_t k = 0; k < d; ++k) panel[k * R + r] = T(0);
      }
    }
  }
}

// tile (MR × NR, row-major) = a_panel(MR × d)ᵀ-packed · b_panel(NR × d)ᵀ-packed.
template <typename T, int MR, int NV, int VL>
inline void syrk_micro_tile(int64_t d, const T* __restrict a_panel, const T* __restrict b_panel,
                            T* __restrict tile) {
  typedef T vec __attribute__((vector_size(VL * sizeof(T))));
  constexpr int NR = NV * VL;
  vec acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = vec{};
  for (int64_t k = 0; k < d; ++k) {
    vec b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(&b[j], b_panel + k * NR + j * VL, sizeof(vec));
    const T* a = a_panel + k * MR;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * b[j];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(tile + i * NR + j * VL, &acc[i][j], sizeof(vec));
}

// Writes a tile that lies wholly below the diagonal: its rows contiguously, then its transpose.
template <typename T, int MR, int NR>
inline void store_tile_and_mirror(const T* __restrict tile, T* __restrict gram, int64_t n,
                                  int64_t row0, int64_t col0) {
  for (int i = 0; i < MR; ++i) std::memcpy(gram + (row0 + i) * n + col0, tile + i * NR, NR * sizeof(T));
  alignas(64) T transposed[NR * MR];
  for (int i = 0; i < MR; ++i)
#pragma omp simd
    for (int j = 0; j < NR; ++j) transposed[j * MR + i] = tile[i * NR + j];
  for (int j = 0; j < NR; ++j)
    std::memcpy(gram + (col0 + j) * n + row0, transposed + j * MR, MR * sizeof(T));
}

// gram (n×n, row-major) ← epilogue(x·xᵀ) for x (n×d, row-major).
template <typename T>
void gram_syrk(const T* x, int64_t n, int64_t d, T* gram, GramEpilogue epilogue) {
  constexpr int MR = SyrkTile<T>::MR, NV = SyrkTile<T>::NV, VL = SyrkTile<T>::VL;
  constexpr int NR = NV * VL;
  constexpr int64_t kBPanelsPerTask = 8;  // columns per task: 8·NR, kept hot in L2 across tasks
  if (n == 0) return;
  const int64_t n_a_panels = (n + MR - 1) / MR;
  const int64_t n_b_panels = (n + NR - 1) / NR;
  std::vector<T> a_packed(n_a_panels * MR * d), b_packed(n_b_panels * NR * d);
  pack_row_panels(x, n, d, MR, a_packed.data());
  pack_row_panels(x, n, d, NR, b_packed.data());
  // A task is a chunk of A panels × a group of B panels. Chunks span whole cache lines of the
  // mirrored writes, so two threads never share a line of G.
  constexpr int64_t kAPanelsPerTask = 16;
  const int64_t n_col_groups = (n_b_panels + kBPanelsPerTask - 1) / kBPanelsPerTask;
  const int64_t n_row_chunks = (n_a_panels + kAPanelsPerTask - 1) / kAPanelsPerTask;
  const int64_t n_tasks = n_col_groups * n_row_chunks;

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t group = task / n_row_chunks;
    const int64_t chunk = task % n_row_chunks;
    alignas(64) T tile[MR * NR];
    const int64_t a_end = std::min(n_a_panels, (chunk + 1) * kAPanelsPerTask);
    const int64_t b_end = std::min(n_b_panels, (group + 1) * kBPanelsPerTask);
    for (int64_t a_panel = chunk * kAPanelsPerTask; a_panel < a_end; ++a_panel) {
    const int64_t row0 = a_panel * MR;
    for (int64_t b_panel = group * kBPanelsPerTask; b_panel < b_end; ++b_panel) {
      const int64_t col0 = b_panel * NR;
      if (row0 + MR - 1 < col0) break;  // tile lies strictly above the diagonal
      syrk_micro_tile<T, MR, NV, VL>(d, a_packed.data() + a_panel * MR * d,
                                     b_packed.data() + b_panel * NR * d, tile);
      const bool interior = row0 + MR <= n && col0 + NR <= n && row0 >= col0 + NR - 1;
      if (interior && epilogue == GramEpilogue::kStore) {
        store_tile_and_mirror<T, MR, NR>(tile, gram, n, row0, col0);
        continue;
      }
      const int64_t i_end = std::min<int64_t>(MR, n - row0);
      for (int64_t i = 0; i < i_end; ++i) {
        const int64_t row = row0 + i;
        const int64_t j_end = std::min<int64_t>({NR, n - col0, row - col0 + 1});
        for (int64_t j = 0; j < j_end; ++j) {
          const int64_t col = col0 + j;
          T value = tile[i * NR + j];
          if (epilogue == GramEpilogue::kMulOnePlus) value *= T(1) + gram[row * n + col];
          gram[row * n + col] = value;
          gram[col * n + row] = value;
        }
      }
    }
    }
  }
}

}  // namespace DQK_ISA_NS
}  // namespace dqk
