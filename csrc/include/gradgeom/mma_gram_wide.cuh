// Tensor-core Grams XᵀX with W = 128 (r in 65..128) for 16-bit factors; mma_gram.cuh has the
// layouts, stages, fragments and copies. One block of 14 warps per SM, a ring of 8 stages, no
// block-wide barrier in the loop: 4 producer warps stage chunks with cp.async and arrive on each
// stage's "full" mbarrier as their copies land; 10 consumer warps each own one 32 x 32 tile on or
// above the diagonal (the Gram is symmetric: tiles are mirrored on output; a diagonal tile skips
// its 16 x 16 block below the diagonal), wait for their stage and free it through its "empty"
// mbarrier. So a warp waits only for its data, never for the other warps' MMAs.
#pragma once

#include <cstdint>

#include "gradgeom/mma_gram.cuh"

namespace gradgeom {
namespace mma_gram {

// The wide kernel's warps. wide_role(w): bit 4 set for a consumer, whose 32 x 32 tile is
// (mi, ni) = (bits 0-1, bits 2-3) of the 4 x 4 grid; 0 for a producer. The SM's schedulers take
// warps w % 4: per k16 step the consumers issue 8 + 8 MMAs on schedulers 0 and 1 (which also run
// the 4 producers, warps 8, 9, 12, 13) and 8 + 6 + 6 on 2 and 3 (a diagonal tile does 6 of 8).
constexpr int kWideConsumers = 10;
constexpr int kWideProducers = 4;
static_assert(Ring<true>::kWarps == kWideConsumers + kWideProducers, "every wide warp has a role");
constexpr uint64_t tile_role(int mi, int ni) { return 16u | mi | ni << 2; }
constexpr uint64_t kWideRolesLo = tile_role(0, 1) | tile_role(1, 2) << 8 | tile_role(0, 2) << 16 |
                                  tile_role(1, 3) << 24 | tile_role(2, 3) << 32 | tile_role(0, 3) << 40 |
                                  tile_role(0, 0) << 48 | tile_role(2, 2) << 56;  // warps 0-7
constexpr uint64_t kWideRolesHi = tile_role(1, 1) << 16 | tile_role(3, 3) << 24;  // warps 8-13
__device__ __forceinline__ int wide_role(int warp) {
  return static_cast<int>(((warp < 8 ? kWideRolesLo : kWideRolesHi) >> (8 * (warp & 7))) & 0xff);
}

// B fragments of X for Gram columns n0 .. n0 + 15 at k0 (frag_b2), and the A fragment of Xᵀ for
// Gram rows n0 .. n0 + 15 that the same registers hold (Xᵀ's A layout is X's B layout, the two
// n8 halves interleaved).
__device__ __forceinline__ void a_from_b2(const uint32_t (&b)[4], uint32_t (&a)[4]) {
  a[0] = b[0];
  a[1] = b[2];
  a[2] = b[1];
  a[3] = b[3];
}

// One consumer warp's k16 steps over a chunk: tile (mi, ni) of 2 m16 x 4 n8 MMA tiles. A diagonal
// tile (kDiag) skips (mt 1, nt 0..1), the 16 x 16 block below the diagonal.
template <int kLayout, bool kBf16, bool kDiag>
__device__ __forceinline__ void wide_chunk(uint32_t st, int mi, int ni, float (&part)[2][4][4]) {
  using S = Stage<kLayout, 128>;
#pragma unroll
  for (int s = 0; s < S::kRowsPerChunk / 16; ++s) {
    const int k0 = 16 * s;
    uint32_t col_lo[4], col_hi[4], a[2][4];
    S::frag_b2(st, 32 * ni, k0, col_lo);
    S::frag_b2(st, 32 * ni + 16, k0, col_hi);
    if (kDiag) {
      a_from_b2(col_lo, a[0]);
      a_from_b2(col_hi, a[1]);
    } else {
      uint32_t row_lo[4], row_hi[4];
      S::frag_b2(st, 32 * mi, k0, row_lo);
      S::frag_b2(st, 32 * mi + 16, k0, row_hi);
      a_from_b2(row_lo, a[0]);
      a_from_b2(row_hi, a[1]);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      if (!kDiag || mt == 0) {
        mma16816<kBf16>(part[mt][0], a[mt], col_lo[0], col_lo[1]);
        mma16816<kBf16>(part[mt][1], a[mt], col_lo[2], col_lo[3]);
      }
      mma16816<kBf16>(part[mt][2], a[mt], col_hi[0], col_hi[1]);
      mma16816<kBf16>(part[mt][3], a[mt], col_hi[2], col_hi[3]);
    }
  }
}

// A consumer warp: every chunk of the split through its tile, then the tile (and its mirror) to
// job.out.
template <int kLayout, bool kBf16, bool kDiag>
__device__ void wide_consumer(const Job& job, uint32_t ring, uint32_t full, uint32_t empty, int64_t chunks, int mi,
                              int ni) {
  constexpr int kStages = Ring<true>::kStages;
  constexpr uint32_t kStageBytes = Ring<true>::kStageHalfs * 2;
  float acc[2][4][4] = {};
  for (int64_t c = 0; c < chunks; ++c) {
    const int s = static_cast<int>(c % kStages);
    mbar_wait(full + 8 * s, static_cast<uint32_t>(c / kStages) & 1);
    float part[2][4][4] = {};
    wide_chunk<kLayout, kBf16, kDiag>(ring + s * kStageBytes, mi, ni, part);
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(empty + 8 * s);
    add_chunk(acc, part);
  }
  const int lane = threadIdx.x & 31;
  const int r = job.cols;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      if (kDiag && mt == 1 && nt < 2) continue;  // written as the mirror of (mt 0, nt 2..3)
      const bool mirror = !kDiag || (mt == 0 && nt >= 2);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 32 * mi + 16 * mt + (lane >> 2) + (e >> 1) * 8;
        const int j = 32 * ni + 8 * nt + 2 * (lane & 3) + (e & 1);
        if (i < r && j < r) {
          job.out[int64_t(i) * job.ld + j] = static_cast<double>(acc[mt][nt][e]);
          if (mirror) job.out[int64_t(j) * job.ld + i] = static_cast<double>(acc[mt][nt][e]);
        }
      }
    }
}

// The Gram of one split of X with W = 128 (r in 65..128), written as fp64 to job.out: see the
// file comment. smem holds Ring<true>::kSmemBytes.
template <int kLayout, bool kBf16>
__device__ void gram_wide(const Job& job, unsigned char* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using S = Stage<kLayout, 128>;
  constexpr int kStages = Ring<true>::kStages;
  constexpr uint32_t kStageBytes = Ring<true>::kStageHalfs * 2;
  static_assert(S::kHalfs <= Ring<true>::kStageHalfs, "a chunk fits its stage");
  __shared__ __align__(8) uint64_t bars[2 * kStages];  // full[s] = bars[s], empty[s] = bars[kStages + s]
  const uint32_t full = smem_addr(bars);
  const uint32_t empty = full + 8 * kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full + 8 * s, 32 * kWideProducers);
      mbar_init(empty + 8 * s, kWideConsumers);
    }
  }
  __syncthreads();
  const uint32_t ring = smem_addr(smem);
  const int warp = threadIdx.x >> 5;
  const int role = wide_role(warp);
  const int64_t chunks = chunk_count(job, S::kRowsPerChunk);
  if (role == 0) {
    // Producer p of 4 (warps 8, 9, 12, 13): copies v = 32p + lane + 128i of every chunk.
    const int tid = 32 * ((warp & 1) + 2 * ((warp >> 2) & 1)) + (threadIdx.x & 31);
    for (int64_t c = 0; c < chunks; ++c) {
      const int s = static_cast<int>(c % kStages);
      if (c >= kStages) mbar_wait(empty + 8 * s, static_cast<uint32_t>(c / kStages - 1) & 1);
      S::template load<32 * kWideProducers>(job, job.row_begin + c * S::kRowsPerChunk, ring + s * kStageBytes, tid);
      if (job.copy_bytes == 2) {  // stored by this thread: order the stores before the arrival
        __threadfence_block();
        mbar_arrive(full + 8 * s);
      } else {
        cp_async_arrive(full + 8 * s);
      }
    }
    cp_async_wait<0>();
    return;
  }
  const int mi = role & 3, ni = (role >> 2) & 3;
  if (mi == ni)
    wide_consumer<kLayout, kBf16, true>(job, ring, full, empty, chunks, mi, ni);
  else
    wide_consumer<kLayout, kBf16, false>(job, ring, full, empty, chunks, mi, ni);
#endif
}

// The Gram of one split of X with W = 128.
template <bool kBf16>
__device__ void gram_wide_any(int layout, const Job& job, unsigned char* smem) {
  if (layout == kColumns)
    gram_wide<kColumns, kBf16>(job, smem);
  else
    gram_wide<kRows, kBf16>(job, smem);
}

}  // namespace mma_gram
}  // namespace gradgeom
