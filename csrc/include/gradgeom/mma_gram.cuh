// Tensor-core Gram tiles for 16-bit LoRA factors (sm_80+): XᵀX over a split of X's rows, for
// X [m, r] with r <= 128, read in place through one of its two dense layouts:
//   kColumns: each column of X is contiguous (X = Aᵀ for a row-major A [r, k]);
//   kRows:    each row of X is contiguous (X = B, a row-major B [d, r]).
// A block streams chunks of X into shared memory through a ring of stages (cp.async 16-byte
// copies; 4-byte ones where X's lines are only 4-byte aligned, as for B [d, r] with even r not a
// multiple of 8; 2-byte loads and stores for odd line strides; zero-filled past the end of the
// split and past column r) and multiplies them with mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate: the products are exact; each chunk's sum is
// added to the running one with IEEE rounding). The r columns are padded to W in {16, 32, 64,
// 128}.
//  * Narrow (W <= 64): 8 warps, 4 stages, two blocks per SM. The warps form a grid over the
//    W x W result (each warp a (16·MT) x (8·NT) tile) and, where the grid has fewer than 8
//    cells, over the k16 steps of each chunk as well; those partial sums are added in a fixed
//    order at the end.
//  * Wide (W = 128): mma_gram_wide.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace gradgeom {
namespace mma_gram {

constexpr int kChunkElems = 8192;  // W * rows per chunk: 16 KB of 16-bit data
constexpr int kPad = 8;            // halfwords of padding per smem row: ldmatrix without conflicts

enum Layout : int { kColumns = 0, kRows = 1 };

// Block shape: warps, stages in the ring, and dynamic shared memory per block: stages x the
// largest stage of the widths the kernel serves (kRows at W = 16 for the narrow kernel, kColumns
// at W = 128 for the wide one; the wide kernel's mbarriers are static shared memory).
template <bool kWide>
struct Ring {
  static constexpr int kWarps = kWide ? 14 : 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStages = kWide ? 8 : 4;
  static constexpr int kStageHalfs =
      kWide ? 128 * (kChunkElems / 128 + kPad) : kChunkElems + (kChunkElems / 16) * kPad;
  static constexpr int kSmemBytes = kStages * kStageHalfs * 2;
};

struct Job {
  const uint16_t* data;
  int64_t row_begin;   // this split's rows of X
  int64_t row_end;
  int64_t row_stride;  // elements
  int64_t col_stride;
  int cols;            // r
  double* out;         // the r x r result goes to out[i * ld + j]
  int64_t ld;
  int copy_bytes = 16;  // 16: cp.async 16-byte copies; 4: 4-byte copies (lines 4-byte aligned); 2: loads
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// mbarriers (sm_80+) in shared memory, addressed by their shared-window address.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Arrives on bar once every cp.async this thread issued so far has landed (counts as the
// thread's arrival: .noinc).
__device__ __forceinline__ void cp_async_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Blocks until the phase of bar with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
#else
    asm volatile("{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
#endif
  }
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  if (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if (kBf16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Stage layout: kColumns keeps X column-major, smem[col][row] with pitch rows + kPad;
// kRows keeps it row-major, smem[row][col] with pitch W + kPad.
template <int kLayout, int W>
struct Stage {
  static constexpr int kRowsPerChunk = kChunkElems / W;
  static constexpr int kPitch = kLayout == kColumns ? kRowsPerChunk + kPad : W + kPad;
  static constexpr int kHalfs = kLayout == kColumns ? W * kPitch : kRowsPerChunk * kPitch;

  // Byte offset of element (row, col) of the chunk inside the stage.
  static __device__ __forceinline__ uint32_t offset(int row, int col) {
    return 2u * static_cast<uint32_t>(kLayout == kColumns ? col * kPitch + row : row * kPitch + col);
  }

  // This thread's part (tid of kThreads) of the chunk at row0: the 16-byte vectors v = tid,
  // tid + kThreads, ... (cp.async; one loop per copy size, so that the 16-byte one stays as lean
  // as it was alone), or with 2-byte loads and stores for lines that are not 4-byte aligned (then
  // the stage is written when this returns: no cp.async to wait for).
  template <int kThreads>
  static __device__ __forceinline__ void load(const Job& job, int64_t row0, uint32_t stage, int tid) {
    if (job.copy_bytes == 16)
      load_vectors<kThreads, false>(job, row0, stage, tid);
    else if (job.copy_bytes == 4)
      load_vectors<kThreads, true>(job, row0, stage, tid);
    else
      load_elements<kThreads>(job, row0, stage, tid);
  }

  // Elements e = tid, tid + kThreads, ... of the chunk, 16 loads in flight before their stores.
  template <int kThreads>
  static __device__ __forceinline__ void load_elements(const Job& job, int64_t row0, uint32_t stage, int tid) {
    constexpr int kBatch = 16;
    static_assert(kChunkElems % (kBatch * kThreads) == 0, "whole batches");
    for (int first = tid; first < kChunkElems; first += kBatch * kThreads) {
      uint16_t v[kBatch];
      uint32_t at[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int e = first + u * kThreads;
        int row, col;
        if (kLayout == kColumns) {  // consecutive threads walk down a column of X
          col = e / kRowsPerChunk;
          row = e - col * kRowsPerChunk;
        } else {  // consecutive threads walk along a row of X
          row = e / W;
          col = e - row * W;
        }
        at[u] = stage + offset(row, col);
        v[u] = 0;
        if (row0 + row < job.row_end && col < job.cols)
          v[u] = __ldg(reinterpret_cast<const unsigned short*>(job.data) + (row0 + row) * job.row_stride +
                       int64_t(col) * job.col_stride);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(at[u]), "h"(v[u]) : "memory");
    }
  }

  template <int kThreads, bool kCopy4>
  static __device__ __forceinline__ void load_vectors(const Job& job, int64_t row0, uint32_t stage, int tid) {
    constexpr int kVecs = kChunkElems / 8;
    for (int v = tid; v < kVecs; v += kThreads) {
      int row, col, bytes;
      const uint16_t* src = job.data;
      if (kLayout == kColumns) {  // 8 consecutive rows of one column
        col = v / (kRowsPerChunk / 8);
        row = (v - col * (kRowsPerChunk / 8)) * 8;
        const int64_t left = job.row_end - (row0 + row);
        bytes = col < job.cols && left > 0 ? 2 * static_cast<int>(left < 8 ? left : 8) : 0;
        if (bytes) src += (row0 + row) + int64_t(col) * job.col_stride;
      } else {  // 8 consecutive columns of one row
        row = v / (W / 8);
        col = (v - row * (W / 8)) * 8;
        const int left = job.cols - col;
        bytes = row0 + row < job.row_end && left > 0 ? 2 * (left < 8 ? left : 8) : 0;
        if (bytes) src += (row0 + row) * job.row_stride + col;
      }
      if (!kCopy4) {
        cp_async16(stage + offset(row, col), src, bytes);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int part = min(max(bytes - 4 * q, 0), 4);
          cp_async4(stage + offset(row, col) + 4 * q, part ? src + 2 * q : job.data, part);
        }
      }
    }
  }

  // A fragment of Xᵀ (16 Gram rows = X columns m0.., 16 X rows k0..) and B fragments of X for
  // two 8-wide Gram column tiles n0.. and n0 + 8...
  static __device__ __forceinline__ void frag_a(uint32_t stage, int m0, int k0, uint32_t (&a)[4]) {
    const int lane = threadIdx.x & 31;
    if (kLayout == kColumns)
      ldmatrix_x4<false>(stage + offset(k0 + (lane >> 4) * 8, m0 + (lane & 15)), a);
    else
      ldmatrix_x4<true>(stage + offset(k0 + (lane & 7) + (lane >> 4) * 8, m0 + ((lane >> 3) & 1) * 8), a);
  }
  static __device__ __forceinline__ void frag_b2(uint32_t stage, int n0, int k0, uint32_t (&b)[4]) {
    const int lane = threadIdx.x & 31;
    if (kLayout == kColumns)
      ldmatrix_x4<false>(stage + offset(k0 + ((lane >> 3) & 1) * 8, n0 + (lane & 7) + (lane >> 4) * 8), b);
    else
      ldmatrix_x4<true>(stage + offset(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + (lane >> 4) * 8), b);
  }
};

// The number of chunks of rows per split of job, for chunks of `rows_per_chunk` rows.
__device__ __forceinline__ int64_t chunk_count(const Job& job, int rows_per_chunk) {
  return (job.row_end - job.row_begin + rows_per_chunk - 1) / rows_per_chunk;
}

// acc += part entry by entry. The tensor cores' fp32 accumulation truncates when aligning addends
// (a bias that grows with the number of steps summed into one accumulator: 1.1e-5 relative over
// 2304 rows), so each chunk's steps are summed there into part and added here with IEEE rounding.
template <int MT, int NT>
__device__ __forceinline__ void add_chunk(float (&acc)[MT][NT][4], const float (&part)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] += part[mt][nt][e];
}

// The Gram of one split of X (W <= 64), summed over the block's warps, written as fp64 to
// job.out. A warp tile is MT m16 tiles by NT n8 tiles. smem holds Ring<false>::kSmemBytes.
template <int kLayout, int W, int MT, int NT, bool kBf16>
__device__ void gram_tile(const Job& job, unsigned char* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using S = Stage<kLayout, W>;
  constexpr int kWarps = Ring<false>::kWarps;
  constexpr int kThreads = Ring<false>::kThreads;
  constexpr int kStages = Ring<false>::kStages;
  constexpr int kStageHalfs = Ring<false>::kStageHalfs;
  constexpr int kGridM = W / (16 * MT);
  constexpr int kGridN = W / (8 * NT);
  constexpr int kSlices = kWarps / (kGridM * kGridN);
  constexpr int kStepsPerChunk = S::kRowsPerChunk / 16;
  static_assert(W <= 64, "W = 128 takes gram_wide");
  static_assert(kSlices >= 1 && kSlices * kGridM * kGridN == kWarps, "the warps tile the result exactly");
  static_assert(kStepsPerChunk % kSlices == 0, "every warp gets the same number of k16 steps");
  static_assert(NT % 2 == 0, "B fragments come in pairs of n8 tiles");
  static_assert(S::kHalfs <= kStageHalfs, "a chunk fits its stage");
  const int warp = threadIdx.x >> 5;
  const int mi = warp % kGridM, ni = (warp / kGridM) % kGridN;
  const int m_base = mi * 16 * MT;
  const int n_base = ni * 8 * NT;
  const int slice = warp / (kGridM * kGridN);
  const uint32_t base = smem_addr(smem);
  auto stage_addr = [&](int s) { return base + static_cast<uint32_t>(s * kStageHalfs * 2); };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;

  const int64_t chunks = chunk_count(job, S::kRowsPerChunk);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < chunks)
      S::template load<kThreads>(job, job.row_begin + int64_t(s) * S::kRowsPerChunk, stage_addr(s), threadIdx.x);
    cp_async_commit();
  }
  for (int64_t c = 0; c < chunks; ++c) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t next = c + kStages - 1;
    if (next < chunks) {
      const uint32_t into = stage_addr(static_cast<int>(next % kStages));
      S::template load<kThreads>(job, job.row_begin + next * S::kRowsPerChunk, into, threadIdx.x);
    }
    cp_async_commit();
    const uint32_t st = stage_addr(static_cast<int>(c % kStages));
    float part[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) part[mt][nt][0] = part[mt][nt][1] = part[mt][nt][2] = part[mt][nt][3] = 0.f;
#pragma unroll
    for (int s = 0; s < kStepsPerChunk / kSlices; ++s) {
      const int k0 = (s * kSlices + slice) * 16;
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) S::frag_a(st, m_base + 16 * mt, k0, a[mt]);
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        uint32_t b[4];
        S::frag_b2(st, n_base + 8 * nt, k0, b);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<kBf16>(part[mt][nt], a[mt], b[0], b[1]);
          mma16816<kBf16>(part[mt][nt + 1], a[mt], b[2], b[3]);
        }
      }
    }
    add_chunk(acc, part);
  }
  cp_async_wait<0>();
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int r = job.cols;
  float* red = reinterpret_cast<float*>(smem);  // [slice][W][W] when the rows were split
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = m_base + 16 * mt + (lane >> 2) + (e >> 1) * 8;
        const int j = n_base + 8 * nt + 2 * (lane & 3) + (e & 1);
        if (kSlices > 1)
          red[(slice * W + i) * W + j] = acc[mt][nt][e];
        else if (i < r && j < r)
          job.out[int64_t(i) * job.ld + j] = static_cast<double>(acc[mt][nt][e]);
      }
  if (kSlices == 1) return;
  __syncthreads();
  for (int e = threadIdx.x; e < W * W; e += kThreads) {
    const int i = e / W;
    const int j = e - i * W;
    if (i < r && j < r) {
      double v = 0.0;
#pragma unroll
      for (int s = 0; s < kSlices; ++s) v += static_cast<double>(red[s * W * W + e]);
      job.out[int64_t(i) * job.ld + j] = v;
    }
  }
#endif
}

// The Gram of one split of X for W <= 64 (two blocks of 8 warps per SM).
template <bool kBf16>
__device__ void gram_narrow(int layout, int width, const Job& job, unsigned char* smem) {
  if (layout == kColumns) {
    switch (width) {
      case 16: gram_tile<kColumns, 16, 1, 2, kBf16>(job, smem); break;
      case 32: gram_tile<kColumns, 32, 1, 4, kBf16>(job, smem); break;
      default: gram_tile<kColumns, 64, 2, 4, kBf16>(job, smem); break;
    }
  } else {
    switch (width) {
      case 16: gram_tile<kRows, 16, 1, 2, kBf16>(job, smem); break;
      case 32: gram_tile<kRows, 32, 1, 4, kBf16>(job, smem); break;
      default: gram_tile<kRows, 64, 2, 4, kBf16>(job, smem); break;
    }
  }
}

}  // namespace mma_gram
}  // namespace gradgeom
