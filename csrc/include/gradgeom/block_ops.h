// Pieces shared by the one-block-per-matrix solvers (tridiag_eig.h, psd_cholesky.h): lane
// reductions within a warp and packed storage of a symmetric matrix's lower triangle.
//
// Thread convention (as in jacobi.h): a solver runs on nthreads threads, tid in [0, nthreads);
// nthreads is 1 (the CPU) or a multiple of 32 (a CUDA block). On the CPU a warp is one lane and
// the lane reductions below return their argument.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GG_BLOCK_FN __host__ __device__ __forceinline__
#else
#define GG_BLOCK_FN inline
#endif

namespace gradgeom {
namespace block {

constexpr int kMaxWarps = 32;

GG_BLOCK_FN int warp_lanes(int nthreads) { return nthreads < 32 ? nthreads : 32; }

GG_BLOCK_FN void warp_sync() {
#if defined(__CUDA_ARCH__)
  __syncwarp();
#endif
}

// Sum over each aligned group of `width` lanes (a power of two <= 32); every lane of the group
// gets the same bits. All 32 lanes of the warp must call it.
GG_BLOCK_FN double group_sum(double x, int width) {
#if defined(__CUDA_ARCH__)
  for (int off = width >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
#else
  (void)width;
#endif
  return x;
}

GG_BLOCK_FN double warp_max(double x, int width) {
#if defined(__CUDA_ARCH__)
  for (int off = width >> 1; off > 0; off >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, off));
#else
  (void)width;
#endif
  return x;
}

// Value of `x` in lane `src` of this lane's aligned group of `width` lanes (width <= 32). Only
// the lanes of the group need to call it.
GG_BLOCK_FN int group_get(int x, int src, int width, int tid) {
#if defined(__CUDA_ARCH__)
  const int lane = tid & 31;
  const int base = lane & ~(width - 1);
  const unsigned mask = (width == 32 ? 0xffffffffu : ((1u << width) - 1u)) << base;
  return __shfl_sync(mask, x, base + src);
#else
  (void)src;
  (void)width;
  (void)tid;
  return x;
#endif
}

GG_BLOCK_FN int64_t packed_size(int64_t n) { return n * (n + 1) / 2; }

// Lower triangle of a symmetric n x n matrix, row by row (row i holds columns 0..i). Rows below
// `split` start at `head`, the others at `tail` (the GPU keeps the tail in shared memory and the
// head, when the whole matrix does not fit, in global memory). Indices stay below 2^20 (n <= 1024).
struct PackedLower {
  double* head;
  double* tail;
  int split;

  GG_BLOCK_FN double* row(int i) const {
    const int start = i * (i + 1) / 2;
    return i < split ? head + start : tail + (start - split * (split + 1) / 2);
  }
  GG_BLOCK_FN double& at(int i, int j) const { return i >= j ? row(i)[j] : row(j)[i]; }
};

// Copies the lower triangle of the row-major n x n matrix src into a (rows over warps).
GG_BLOCK_FN void load_lower(const double* src, int n, PackedLower a, int tid, int nthreads) {
  const int lanes = warp_lanes(nthreads);
  const int warp = tid / lanes, lane = tid - warp * lanes, nwarps = nthreads / lanes;
  for (int i = warp; i < n; i += nwarps) {
    double* r = a.row(i);
    const double* s = src + int64_t(i) * n;
    for (int j = lane; j <= i; j += lanes) r[j] = s[j];
  }
}

}  // namespace block
}  // namespace gradgeom
