// CUDA fused greedy step for the Gram form (SPEC §1): one launch applies score += 2δ for the last
// pick over the pool and leaves the next pick's pool position in device memory — no host sync.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dqk {
namespace cuda {

// Scratch for the cross-block argmax: one (value, position) pair per block plus a counter the
// last block uses to know it may reduce. Allocate with graphcut_step_scratch_bytes().
size_t graphcut_step_scratch_bytes(int64_t pool_size);

// score (r,) float64, pool (r,) int64 sample ids ascending, pool_norm (r,) float64 = n_x,
// gram (n×n) float32 row-major, pick_pos (1,) int64 in/out: on entry the pool position just
// picked, on exit the next pick (lowest position on ties). All pointers are device pointers.
cudaError_t graphcut_gram_step(const float* gram, int64_t n, const int64_t* pool,
                               const double* pool_norm, double* score, int64_t pool_size,
                               int64_t* pick_pos, void* scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace dqk
