// A symmetric matrix held in the registers of one CUDA block, for the r x r solvers at
// 32 < n <= 64 (tridiag_tile.cuh).
//
// The matrix is zero-padded to NP x NP and spread block-cyclically over a TR x TC grid of threads:
// thread (r, c) = (tid / TC, tid % TC) owns rows r + TR·a (a < NP/TR) and columns c + TC·b
// (b < NP/TC), both triangles. The TC threads of one row group are consecutive lanes of one
// warp, so a row sum is a shuffle reduction. Every access to x[a][b] must use compile-time
// indices (loops over a and b unrolled; a run-time index, or a select chain the compiler turns
// into one, moves the array to local memory). Against the packed shared-memory solvers this
// removes the packed-index arithmetic and the shared-memory round trip of every entry, which is
// what a step of those costs: at these sizes a step is bound by instructions issued, not by
// arithmetic (bench/micro/rxr_micro.cu, H100).
#pragma once

#include <cstdint>

namespace gradgeom {
namespace tile {

template <int NP_, int TR_, int TC_>
struct Matrix {
  static constexpr int NP = NP_;
  static constexpr int TR = TR_;
  static constexpr int TC = TC_;
  static constexpr int kThreads = TR * TC;
  static constexpr int RI = NP / TR;  // rows per thread
  static constexpr int CJ = NP / TC;  // columns per thread
  static_assert(NP % TR == 0 && NP % TC == 0, "the grid must divide the padded size");
  static_assert(TC <= 32 && 32 % TC == 0, "a row group must sit inside one warp");
  static_assert(kThreads % 32 == 0, "whole warps");
  // Blocks per SM for __launch_bounds__: tiles of 256 threads or fewer keep two (<= 128 registers).
  static constexpr int kMinBlocks = kThreads <= 256 ? 2 : 1;

  double x[RI][CJ];
  int r, c;

  __device__ __forceinline__ explicit Matrix(int tid) : r(tid / TC), c(tid % TC) {}
  __device__ __forceinline__ int row(int a) const { return r + TR * a; }
  __device__ __forceinline__ int col(int b) const { return c + TC * b; }

  // Loads the symmetric n x n matrix whose lower triangle is in the row-major src (n <= NP).
  __device__ __forceinline__ void load_lower(const double* src, int n) {
#pragma unroll
    for (int a = 0; a < RI; ++a) {
#pragma unroll
      for (int b = 0; b < CJ; ++b) {
        const int i = row(a), j = col(b);
        double v = 0.0;
        if (i < n && j < n) v = i >= j ? src[int64_t(i) * n + j] : src[int64_t(j) * n + i];
        x[a][b] = v;
      }
    }
  }
};

// The shape the r x r ops use: n <= 64.
using Matrix64 = Matrix<64, 16, 16>;

}  // namespace tile
}  // namespace gradgeom
