// The count-sketch used by sketch_moments, shared by the CPU and CUDA kernels (and mirrored
// bit for bit by gradgeom/reference.py), so sketch state moves between devices.
//
// A "rotated fold": element i of a group (its index in the concatenation of the group's
// tensors, each tensor in row-major order) lies in fold j = i / k at position p = i % k. Its
// bucket is (p + rot(j)) % k, where rot(j) = 8 * r(j) is a hashed multiple of 8; its sign is
// the top bit of a multiply-add-shift hash of i. Every bucket is hit exactly once per fold (no
// atomics needed), buckets keep p % 8 (so 8 consecutive elements land in 8 consecutive buckets:
// vector loads stay vector stores), and a fixed pattern such as a weight column is spread over
// k / 8 buckets by the per-fold rotation.
//
// Hashes (x split into 32-bit halves, all arithmetic mod 2^64):
//   sign word  s(i) = a_lo * lo(i) + a_hi * hi(i) + a_add;  sigma(i) = top bit ? -1 : +1
//   rotation   r(j) = (c_lo * lo(j) + c_hi * hi(j) + c_add) >> (64 - log2(k / 8))
// Both are Dietzfelbinger's multiply-add-shift family on 32-bit words, which is strongly
// universal: the signs are pairwise independent and two folds' rotations collide with
// probability 8 / k. The six coefficients come from splitmix64 of the seed.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GG_SKETCH_HD __host__ __device__ __forceinline__
#else
#define GG_SKETCH_HD inline
#endif

namespace gradgeom {

constexpr int64_t kSketchMinDim = 8;
constexpr int64_t kSketchMaxDim = 8192;
// Elements of group-index space per work chunk (a multiple of every allowed sketch_dim).
constexpr int64_t kSketchChunkElems = int64_t(1) << 18;

struct SketchHash {
  uint64_t a_lo, a_hi, a_add;  // sign hash
  uint64_t c_lo, c_hi, c_add;  // fold rotation hash
};

GG_SKETCH_HD uint64_t splitmix64_next(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

GG_SKETCH_HD SketchHash make_sketch_hash(uint64_t seed) {
  uint64_t s = seed;
  SketchHash h;
  h.a_lo = splitmix64_next(s);
  h.a_hi = splitmix64_next(s);
  h.a_add = splitmix64_next(s);
  h.c_lo = splitmix64_next(s);
  h.c_hi = splitmix64_next(s);
  h.c_add = splitmix64_next(s);
  return h;
}

// s(i); the sign of element i is negative when the top bit is set. For i a multiple of 8 and
// e < 8, s(i + e) = s(i) + e * a_lo (lo(i) + e does not carry into hi).
GG_SKETCH_HD uint64_t sign_word(const SketchHash& h, uint64_t i) {
  return h.a_lo * (i & 0xFFFFFFFFull) + h.a_hi * (i >> 32) + h.a_add;
}

// r(j) in [0, k / 8); `g8_log2` = log2(k / 8).
GG_SKETCH_HD uint64_t fold_rotation_groups(const SketchHash& h, uint64_t j, int g8_log2) {
  if (g8_log2 == 0) return 0;
  const uint64_t w = h.c_lo * (j & 0xFFFFFFFFull) + h.c_hi * (j >> 32) + h.c_add;
  return w >> (64 - g8_log2);
}

inline int sketch_log2(int64_t k) {
  int l = 0;
  while ((int64_t(1) << l) < k) ++l;
  return l;
}

}  // namespace gradgeom
