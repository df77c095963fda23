// Symmetric Gram matrix G = X·Xᵀ on the CPU, stored in square tiles: register-tiled micro-kernel,
// packed operands, OpenMP over the lower-triangle tiles.
//
// G is computed in kTile×kTile tiles, only those on or below the diagonal (ti >= tj), each into
// a local block that is then written twice into the row-major matrix — as itself and, transposed,
// as tile (tj, ti) — in row segments of whole cache lines. Rows stay contiguous for the greedy
// steps that read them. Every entry accumulates over k = 0..d-1 in the same order with
// the same instructions, so G is exactly symmetric and identical rows give bit-identical Gram
// rows (exact ties stay exact ties for the greedy argmax).
//
// This header is compiled once per instruction set (see engine_isa.cpp); the register tile is
// chosen from the target macros of that translation unit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace dqk {
namespace DQK_ISA_NS {

// Register tile: MR rows × (NV·VL) columns of accumulators, VL lanes per vector register.
// kTile is a multiple of every MR and NR below.
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

constexpr int64_t kTile = 96;

// What a tile writes into G: the product itself, or product·(1 + G) (factorised gradient
// kernel: G holds E·Eᵀ from a first pass, the second pass multiplies in Δ·Δᵀ).
enum class GramEpilogue { kStore, kMulOnePlus };

// Packs rows [p·R, p·R+R) of x (n×d) k-major: panel[k·R + r] = x[p·R + r][k]; rows past n are 0.
template <typename T>
void pack_row_panels(const T* x, int64_t n, int64_t n_padded, int64_t d, int R, T* packed) {
  const int64_t n_panels = n_padded / R;
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

// tile (MR × NR, row stride ld) = a_panel(MR × d)ᵀ-packed · b_panel(NR × d)ᵀ-packed.
template <typename T, int MR, int NV, int VL>
inline void syrk_micro_tile(int64_t d, const T* __restrict a_panel, const T* __restrict b_panel,
                            T* __restrict tile, int64_t ld) {
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
    for (int j = 0; j < NV; ++j) std::memcpy(tile + i * ld + j * VL, &acc[i][j], sizeof(vec));
}

// A symmetric n×n matrix, row-major with rows padded to a whole number of kTile tiles and
// aligned to 64 bytes, so every tile row segment is whole cache lines.
template <typename T>
class GramMatrix {
 public:
  GramMatrix() = default;
  explicit GramMatrix(int64_t n)
      : n_tiles_((n + kTile - 1) / kTile), stride_(n_tiles_ * kTile),
        data_(static_cast<T*>(::operator new[](sizeof(T) * stride_ * stride_, std::align_val_t(64)))) {}

  int64_t n_tiles() const { return n_tiles_; }
  explicit operator bool() const { return static_cast<bool>(data_); }
  T* row(int64_t a) { return data_.get() + a * stride_; }
  const T* row(int64_t a) const { return data_.get() + a * stride_; }
  T at(int64_t a, int64_t b) const { return row(a)[b]; }

 private:
  struct AlignedDelete {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  int64_t n_tiles_ = 0, stride_ = 0;
  std::unique_ptr<T, AlignedDelete> data_;
};

// gram ← epilogue(x·xᵀ) for x (n×d, row-major); gram must be GramMatrix(n).
template <typename T>
void gram_syrk(const T* x, int64_t n, int64_t d, GramMatrix<T>& gram, GramEpilogue epilogue) {
  constexpr int MR = SyrkTile<T>::MR, NV = SyrkTile<T>::NV, VL = SyrkTile<T>::VL;
  constexpr int NR = NV * VL;
  static_assert(kTile % MR == 0 && kTile % NR == 0, "kTile must hold whole register tiles");
  if (n == 0) return;
  const int64_t n_tiles = gram.n_tiles();
  const int64_t n_padded = n_tiles * kTile;
  std::vector<T> a_packed(n_padded * d), b_packed(n_padded * d);
  pack_row_panels(x, n, n_padded, d, MR, a_packed.data());
  pack_row_panels(x, n, n_padded, d, NR, b_packed.data());
  const int64_t n_tasks = n_tiles * (n_tiles + 1) / 2;  // tiles on and below the diagonal

#pragma omp parallel
  {
    std::vector<T> block(kTile * kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < n_tasks; ++task) {
      // task → (ti, tj), ti >= tj, row by row of the lower triangle.
      int64_t ti = 0;
      while ((ti + 1) * (ti + 2) / 2 <= task) ++ti;
      const int64_t tj = task - ti * (ti + 1) / 2;
      T* out = block.data();
      for (int64_t a = 0; a < kTile / MR; ++a) {  // the A panel stays in L1 across B panels
        const T* a_panel = a_packed.data() + (ti * kTile + a * MR) * d;
        for (int64_t b = 0; b < kTile / NR; ++b) {
          const T* b_panel = b_packed.data() + (tj * kTile + b * NR) * d;
          syrk_micro_tile<T, MR, NV, VL>(d, a_panel, b_panel, out + a * MR * kTile + b * NR, kTile);
        }
      }
      if (epilogue == GramEpilogue::kMulOnePlus) {
        for (int64_t i = 0; i < kTile; ++i) {
          const T* previous = gram.row(ti * kTile + i) + tj * kTile;
#pragma omp simd
          for (int64_t j = 0; j < kTile; ++j) out[i * kTile + j] *= T(1) + previous[j];
        }
      }
      for (int64_t i = 0; i < kTile; ++i)
        std::memcpy(gram.row(ti * kTile + i) + tj * kTile, out + i * kTile, sizeof(T) * kTile);
      if (ti != tj) {
        for (int64_t j = 0; j < kTile; ++j) {
          T* mirror = gram.row(tj * kTile + j) + ti * kTile;
#pragma omp simd
          for (int64_t i = 0; i < kTile; ++i) mirror[i] = out[i * kTile + j];
        }
      }
    }
  }
}

}  // namespace DQK_ISA_NS
}  // namespace dqk
