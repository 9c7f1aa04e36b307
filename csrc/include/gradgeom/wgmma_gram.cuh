// Hopper (sm_90a) tensor-core Grams XᵀX for 16-bit LoRA factors with 64 < r <= 128 whose lines
// are 16-byte aligned, on wgmma (the asynchronous warpgroup MMA, both operands read from shared
// memory). Same jobs, chunks and sums as mma_gram_wide.cuh, so the same fp64 Gram bit for bit;
// on the H100 (224 bf16 adapters 4096 x 4096 at r = 128, 448 jobs) 214 µs against 235 µs.
//
// A block of four warpgroups, warp-specialised:
//  * warpgroup 3 stages 64-row chunks of X (16 KB) into a ring of kStages stages with 16-byte
//    cp.async copies and arrives on the stage's "full" mbarrier as they land (zero-filled past
//    the split's rows and past column r);
//  * warpgroups 0-2 each own one 64 x 64 quadrant of the Gram, (0,0), (1,0) and (1,1) (the
//    fourth is the mirror of (1,0)), issue a chunk's four m64n64k16 steps, wait for them, add the
//    chunk's sum to the running one with IEEE rounding (as mma_gram.cuh does: the tensor cores'
//    own accumulation truncates), and free the stage through its "empty" mbarrier.
// Stages use wgmma's 128-byte swizzle, written by the copies themselves:
//  * kRows (X = B row-major, MN-major operands, imm-trans 1): column half h, row k of the chunk,
//    16-byte piece c (columns 8c .. 8c + 7 of the half) at h·8192 + (k/8)·1024 + (k%8)·128 +
//    ((c ^ k) % 8)·16; descriptors with LBO 8192 (64-column halves), SBO 1024 (8-row groups);
//  * kColumns (X = Aᵀ of a row-major A, K-major operands): X's column m, piece c (rows 8c ..
//    8c + 7 of the chunk) at m·128 + ((c ^ m) % 8)·16; SBO 1024, each k16 step 32 bytes on.
// Registers: 84 a thread, one block of 512 threads per SM.
#pragma once

#include <cstdint>

#include "gradgeom/mma_gram.cuh"

namespace gradgeom {
namespace wgmma_gram {

constexpr int kThreads = 512;
constexpr int kStages = 8;
constexpr int kChunkRows = 64;
constexpr uint32_t kStageBytes = kChunkRows * 128 * 2;
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + room to align the ring to 1024 bytes
static_assert(kChunkRows * 128 == mma_gram::kChunkElems, "the chunks of mma_gram_wide.cuh");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Shared-memory matrix descriptor with the 128-byte swizzle.
__device__ __forceinline__ uint64_t descriptor(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}

// One m64n64k16 step into d (%0-%31) from descriptors %A, %B; SCALE: "zero" starts a sum.
#define GG_WGMMA_STEP(DT, A, B, SCALE)                                                            \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." DT "." DT " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %" A ", %" B ", " SCALE ", 1, 1, %40, %40;\n"
#define GG_WGMMA_CHUNK(DT)                                                                         \
  asm volatile("{\n"                                                                             \
               ".reg .pred zero, one;\n"                                                          \
               "setp.ne.b32 zero, 0, 0;\n"                                                        \
               "setp.eq.b32 one, 0, 0;\n"                                                         \
               "wgmma.fence.sync.aligned;\n" GG_WGMMA_STEP(DT, "32", "36", "zero")               \
                   GG_WGMMA_STEP(DT, "33", "37", "one") GG_WGMMA_STEP(DT, "34", "38", "one")      \
                       GG_WGMMA_STEP(DT, "35", "39", "one") "wgmma.commit_group.sync.aligned;\n"  \
               "}\n"                                                                             \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                  \
               : "l"(da[0]), "l"(da[1]), "l"(da[2]), "l"(da[3]), "l"(db[0]), "l"(db[1]), "l"(db[2]), \
                 "l"(db[3]), "n"(kTrans)                                                          \
               : "memory")

// d = Σ over 4 k16 steps of A_s·B_s (descriptors da[s], db[s]), f32 m64n64k16, issued and
// committed as one group; wgmma_wait_all() completes it.
template <bool kBf16, int kTrans>
__device__ __forceinline__ void chunk_mma(float (&d)[32], const uint64_t (&da)[4], const uint64_t (&db)[4]) {
  if constexpr (kBf16)
    GG_WGMMA_CHUNK("bf16");
  else
    GG_WGMMA_CHUNK("f16");
}
#undef GG_WGMMA_CHUNK
#undef GG_WGMMA_STEP

__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Stage chunk rows row0 .. row0 + 63 of the split; thread tid of the 128 copying threads.
template <int kLayout>
__device__ __forceinline__ void load_chunk(const mma_gram::Job& job, int64_t row0, uint32_t stage, int tid) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int v = tid + 128 * i;
    const uint16_t* src = job.data;
    int bytes;
    uint32_t dst;
    if (kLayout == mma_gram::kRows) {  // row k, piece c of 16
      const int k = v >> 4, c = v & 15;
      const int left = job.cols - 8 * c;
      bytes = (row0 + k < job.row_end && left > 0) ? 2 * (left < 8 ? left : 8) : 0;
      if (bytes) src += (row0 + k) * job.row_stride + 8 * c;
      dst = stage + (c >> 3) * 8192 + (k >> 3) * 1024 + (k & 7) * 128 + (((c & 7) ^ (k & 7)) << 4);
    } else {  // column m, piece c of 8
      const int m = v >> 3, c = v & 7;
      const int64_t left = job.row_end - (row0 + 8 * c);
      bytes = (m < job.cols && left > 0) ? 2 * static_cast<int>(left < 8 ? left : 8) : 0;
      if (bytes) src += (row0 + 8 * c) + int64_t(m) * job.col_stride;
      dst = stage + m * 128 + ((c ^ (m & 7)) << 4);
    }
    mma_gram::cp_async16(dst, src, bytes);
  }
}

// The Gram of one split of X (64 < r <= 128, copy_bytes 16), written as fp64 to job.out.
// blockDim.x == kThreads; smem: kSmemBytes.
template <int kLayout, bool kBf16>
__device__ void gram(const mma_gram::Job& job, unsigned char* smem) {
  __shared__ __align__(8) uint64_t bars[2 * kStages];  // full[s] = bars[s], empty[s] = bars[kStages + s]
  const uint32_t ring = (mma_gram::smem_addr(smem) + 1023u) & ~1023u;
  const uint32_t full = mma_gram::smem_addr(bars), empty = full + 8 * kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mma_gram::mbar_init(full + 8 * s, 128);  // the copying warpgroup's threads
      mma_gram::mbar_init(empty + 8 * s, 12);  // the computing warps
    }
  }
  __syncthreads();
  const int wg = threadIdx.x >> 7;
  const int64_t chunks = mma_gram::chunk_count(job, kChunkRows);
  if (wg == 3) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int s = static_cast<int>(c % kStages);
      if (c >= kStages) mma_gram::mbar_wait(empty + 8 * s, static_cast<uint32_t>(c / kStages - 1) & 1);
      load_chunk<kLayout>(job, job.row_begin + c * kChunkRows, ring + s * kStageBytes, threadIdx.x & 127);
      mma_gram::cp_async_arrive(full + 8 * s);
    }
    mma_gram::cp_async_wait<0>();
    return;
  }
  const int qa = wg == 0 ? 0 : 1, qb = wg == 2 ? 1 : 0;  // Gram rows 64·qa + .., columns 64·qb + ..
  constexpr int kTrans = kLayout == mma_gram::kRows ? 1 : 0;
  float acc[32], part[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    const int s = static_cast<int>(c % kStages);
    mma_gram::mbar_wait(full + 8 * s, static_cast<uint32_t>(c / kStages) & 1);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async writes, then wgmma reads
    const uint32_t st = ring + s * kStageBytes;
    uint64_t da[4], db[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (kLayout == mma_gram::kRows) {
        da[k] = descriptor(st + qa * 8192 + k * 2048, 8192, 1024);
        db[k] = descriptor(st + qb * 8192 + k * 2048, 8192, 1024);
      } else {
        da[k] = descriptor(st + qa * 8192 + k * 32, 16, 1024);
        db[k] = descriptor(st + qb * 8192 + k * 32, 16, 1024);
      }
    }
    chunk_mma<kBf16, kTrans>(part, da, db);
    wgmma_wait_all();
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      asm volatile("" : "+f"(part[i])::"memory");  // read only after the wait
      acc[i] += part[i];
    }
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mma_gram::mbar_arrive(empty + 8 * s);
  }
  // Accumulator fragment of m64nNk16: register i of thread t holds row 16·(t/32) + (t%32)/4 +
  // 8·((i/2)%2), column 8·(i/4) + 2·(t%4) + i%2 of the quadrant. A diagonal quadrant writes its
  // entries on or above the diagonal and their mirrors, the off-diagonal one all of its entries
  // and their mirrors: the result is exactly symmetric.
  const int t = threadIdx.x & 127;
  const int r = job.cols;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int row = 64 * qa + 16 * (t / 32) + (t % 32) / 4 + 8 * ((i / 2) % 2);
    const int col = 64 * qb + 8 * (i / 4) + 2 * (t % 4) + i % 2;
    if (row < r && col < r && (qa != qb || col >= row)) {
      job.out[int64_t(row) * job.ld + col] = static_cast<double>(acc[i]);
      job.out[int64_t(col) * job.ld + row] = static_cast<double>(acc[i]);
    }
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace wgmma_gram
}  // namespace gradgeom
