// Host-side plan for sketch_moments, shared by the CPU and CUDA kernels.
//
// Work is cut into chunks aligned to multiples of kSketchChunkElems in *group-index* space (the
// element's offset in its group's concatenation), so a fold of the sketch is never split between
// chunks except where a tensor starts or ends. Chunks are numbered globally with the tensors
// ordered by group (stable); each chunk yields one partial (moments + k sketch buckets) and a
// second pass sums each group's partials in chunk order: deterministic for any thread count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "gradgeom/sketch_hash.h"
#include "gradgeom/tensor_list_plan.h"
#include "gradgeom/check.h"

namespace gradgeom {

struct SketchPlannedTensor {
  const void* data = nullptr;
  int64_t numel = 0;
  int64_t offset = 0;       // group index of element 0
  int64_t chunk_begin = 0;  // global index of this tensor's first chunk
  int32_t type = 0;         // ElemType
  int32_t aligned = 0;      // 1 when elements whose group index is a multiple of 8 sit at 16-byte addresses
  int64_t group = 0;
};

struct SketchPlan {
  std::vector<at::Tensor> keep_alive;  // contiguous copies of non-contiguous inputs
  std::vector<SketchPlannedTensor> tensors;
  std::vector<int64_t> group_chunk_begin;  // num_groups + 1 entries
  int64_t num_chunks = 0;
};

inline void check_sketch_args(const char* op, const at::TensorList& tensors, c10::IntArrayRef group_ids,
                              c10::IntArrayRef offsets, int64_t num_groups, int64_t sketch_dim) {
  check_tensor_list(op, tensors, group_ids, num_groups);
  GG_CHECK_VALUE(offsets.size() == tensors.size(), op, ": offsets must have one entry per tensor: got ",
                    offsets.size(), " offsets for ", tensors.size(), " tensors");
  for (size_t i = 0; i < offsets.size(); ++i) {
    GG_CHECK_VALUE(offsets[i] >= 0, op, ": offsets[", i, "] = ", offsets[i], " must be >= 0");
  }
  GG_CHECK_VALUE(sketch_dim >= kSketchMinDim && sketch_dim <= kSketchMaxDim && (sketch_dim & (sketch_dim - 1)) == 0,
                    op, ": sketch_dim must be a power of two in [", kSketchMinDim, ", ", kSketchMaxDim, "], got ",
                    sketch_dim);
}

inline int64_t sketch_chunks_for(int64_t offset, int64_t numel) {
  if (numel == 0) return 0;
  return (offset + numel - 1) / kSketchChunkElems - offset / kSketchChunkElems + 1;
}

// Group-index range [begin, end) of local chunk `c` of a tensor.
inline void sketch_chunk_range(int64_t offset, int64_t numel, int64_t c, int64_t& begin, int64_t& end) {
  const int64_t block = offset / kSketchChunkElems + c;
  begin = std::max(offset, block * kSketchChunkElems);
  end = std::min(offset + numel, (block + 1) * kSketchChunkElems);
}

inline SketchPlan make_sketch_plan(const at::TensorList& tensors, c10::IntArrayRef group_ids,
                                   c10::IntArrayRef offsets, int64_t num_groups) {
  SketchPlan plan;
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return group_ids[a] < group_ids[b]; });

  plan.group_chunk_begin.assign(num_groups + 1, 0);
  plan.tensors.reserve(tensors.size());
  int64_t next_chunk = 0;
  int64_t current_group = 0;
  for (size_t idx : order) {
    const int64_t g = group_ids[idx];
    while (current_group < g) plan.group_chunk_begin[++current_group] = next_chunk;
    at::Tensor t = tensors[idx];
    if (t.numel() == 0) continue;
    // The sketch depends on element order: read in logical (row-major) order.
    if (!t.is_contiguous()) {
      t = t.contiguous();
      plan.keep_alive.push_back(t);
    }
    SketchPlannedTensor p;
    p.data = t.data_ptr();
    p.numel = t.numel();
    p.offset = offsets[idx];
    p.type = static_cast<int32_t>(elem_type_of(t.scalar_type()));
    p.group = g;
    const int64_t esize = elem_size(static_cast<ElemType>(p.type));
    const uint64_t addr_of_index0 =
        reinterpret_cast<uint64_t>(p.data) - static_cast<uint64_t>(p.offset) * static_cast<uint64_t>(esize);
    p.aligned = (addr_of_index0 % 16 == 0) ? 1 : 0;
    p.chunk_begin = next_chunk;
    next_chunk += sketch_chunks_for(p.offset, p.numel);
    plan.tensors.push_back(p);
  }
  while (current_group < num_groups) plan.group_chunk_begin[++current_group] = next_chunk;
  plan.num_chunks = next_chunk;
  return plan;
}

}  // namespace gradgeom
