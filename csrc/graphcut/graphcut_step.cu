#include <cfloat>
#include <cmath>

#include "graphcut_step.cuh"

namespace dqk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 8;

struct Best {
  double value;
  int64_t position;
};

__device__ __forceinline__ Best better(Best a, Best b) {
  if (b.position < 0) return a;
  if (a.position < 0) return b;
  if (b.value > a.value || (b.value == a.value && b.position < a.position)) return b;
  return a;
}

__device__ Best block_argmax(Best mine) {
  __shared__ Best warp_best[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    Best other;
    other.value = __shfl_down_sync(0xffffffffu, mine.value, offset);
    other.position = __shfl_down_sync(0xffffffffu, mine.position, offset);
    mine = better(mine, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_best[warp] = mine;
  __syncthreads();
  if (warp == 0) {
    mine = lane < kThreads / 32 ? warp_best[lane] : Best{-INFINITY, -1};
    for (int offset = 16; offset > 0; offset >>= 1) {
      Best other;
      other.value = __shfl_down_sync(0xffffffffu, mine.value, offset);
      other.position = __shfl_down_sync(0xffffffffu, mine.position, offset);
      mine = better(mine, other);
    }
  }
  return mine;  // valid in thread 0
}

__global__ void gram_step_kernel(const float* __restrict__ gram, int64_t n,
                                 const int64_t* __restrict__ pool,
                                 const double* __restrict__ pool_norm, double* __restrict__ score,
                                 int64_t pool_size, int64_t* __restrict__ pick_pos,
                                 Best* __restrict__ block_best,
                                 unsigned int* __restrict__ blocks_done) {
  const int64_t taken = *pick_pos;
  const int64_t pick = pool[taken];
  const double pick_norm = pool_norm[taken];
  const float* gram_row = gram + pick * n;
  Best mine{-INFINITY, -1};
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kItemsPerThread;
  for (int item = 0; item < kItemsPerThread; ++item) {
    const int64_t i = base + item * kThreads + threadIdx.x;
    if (i >= pool_size) break;
    double s = score[i];
    if (i == taken) s = -INFINITY;
    if (s != -INFINITY) {
      const double delta = pool_norm[i] + pick_norm - 2.0 * static_cast<double>(gram_row[pool[i]]);
      s += 2.0 * delta;
      mine = better(mine, Best{s, i});
    }
    score[i] = s;
  }
  mine = block_argmax(mine);
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    block_best[blockIdx.x] = mine;
    __threadfence();
    is_last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  // The last block to finish reduces every block's partial.
  Best total{-INFINITY, -1};
  for (int64_t b = threadIdx.x; b < gridDim.x; b += kThreads) {
    const volatile Best* slot = block_best + b;
    total = better(total, Best{slot->value, slot->position});
  }
  total = block_argmax(total);
  if (threadIdx.x == 0) {
    *pick_pos = total.position;
    *blocks_done = 0u;
  }
}

int64_t n_blocks(int64_t pool_size) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kItemsPerThread;
  return (pool_size + per_block - 1) / per_block;
}

}  // namespace

size_t graphcut_step_scratch_bytes(int64_t pool_size) {
  return sizeof(unsigned int) * 2 + sizeof(Best) * static_cast<size_t>(n_blocks(pool_size));
}

cudaError_t graphcut_gram_step(const float* gram, int64_t n, const int64_t* pool,
                               const double* pool_norm, double* score, int64_t pool_size,
                               int64_t* pick_pos, void* scratch, cudaStream_t stream) {
  const int64_t blocks = n_blocks(pool_size);
  if (blocks == 0) return cudaSuccess;
  auto* blocks_done = static_cast<unsigned int*>(scratch);
  auto* block_best = reinterpret_cast<Best*>(static_cast<char*>(scratch) + 2 * sizeof(unsigned int));
  gram_step_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      gram, n, pool, pool_norm, score, pool_size, pick_pos, block_best, blocks_done);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dqk
