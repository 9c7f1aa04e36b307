// Host-side plan for a multi-tensor reduction over a list of tensors split into groups.
//
// Every tensor is cut into chunks of kChunkElems elements; chunks are numbered globally, with
// the tensors ordered by group (stable), so the chunks of one group form one contiguous range.
// A kernel computes one partial per chunk; a second pass merges each group's partials in chunk
// order, which makes the result deterministic whatever the thread or block count.
//
// The CPU and CUDA kernels share this layout. On CUDA the first chunk of a tensor also covers
// a scalar "head" of up to 15 bytes, so that every other access is an aligned 16-byte vector.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>
#include "gradgeom/check.h"

namespace gradgeom {

constexpr int64_t kChunkElems = 65536;

enum class ElemType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline ElemType elem_type_of(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return ElemType::kFloat32;
    case c10::ScalarType::Double: return ElemType::kFloat64;
    case c10::ScalarType::Half: return ElemType::kFloat16;
    case c10::ScalarType::BFloat16: return ElemType::kBFloat16;
    default: GG_CHECK(false, "gradgeom: unsupported dtype ", t);
  }
}

inline bool is_supported_float(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Double ||
         t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

// Argument checks shared by every tensor-list op. `op` names the op in messages.
inline void check_tensor_list(const char* op, const at::TensorList& tensors,
                              c10::IntArrayRef group_ids, int64_t num_groups) {
  GG_CHECK_VALUE(num_groups >= 1, op, ": num_groups must be >= 1, got ", num_groups);
  GG_CHECK_VALUE(static_cast<int64_t>(group_ids.size()) == static_cast<int64_t>(tensors.size()),
                    op, ": group_ids must have one entry per tensor: got ", group_ids.size(),
                    " group ids for ", tensors.size(), " tensors");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    GG_CHECK_VALUE(t.defined(), op, ": tensors[", i, "] is undefined (None)");
    GG_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": tensors[", i, "] has dtype ",
                     t.scalar_type(), "; expected float32, float64, float16 or bfloat16");
    GG_CHECK_VALUE(t.device() == tensors[0].device(), op, ": all tensors must be on one device: tensors[",
                      i, "] is on ", t.device(), " but tensors[0] is on ", tensors[0].device());
    GG_CHECK_VALUE(group_ids[i] >= 0 && group_ids[i] < num_groups, op, ": group_ids[", i,
                      "] = ", group_ids[i], " is outside [0, num_groups=", num_groups, ")");
  }
}

struct PlannedTensor {
  const void* data = nullptr;
  int64_t numel = 0;
  int64_t chunk_begin = 0;  // global index of this tensor's first chunk
  int32_t head = 0;         // leading elements handled one by one (CUDA alignment)
  ElemType type = ElemType::kFloat32;
  int64_t group = 0;
};

struct TensorListPlan {
  std::vector<at::Tensor> keep_alive;      // contiguous copies of gapped views
  std::vector<PlannedTensor> tensors;      // ordered by group, stable
  std::vector<int64_t> group_chunk_begin;  // num_groups + 1 entries
  int64_t num_chunks = 0;
};

inline int64_t elem_size(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return 4;
    case ElemType::kFloat64: return 8;
    default: return 2;
  }
}

inline int64_t chunks_for(int64_t numel, int32_t head) {
  if (numel == 0) return 0;
  const int64_t body = numel - head;
  return std::max<int64_t>(1, (body + kChunkElems - 1) / kChunkElems);
}

// Moments are independent of element order, so a view that is non-overlapping and dense
// (a transpose, a permute) is read straight from memory; only gapped views are copied.
inline TensorListPlan make_plan(const at::TensorList& tensors, c10::IntArrayRef group_ids,
                                int64_t num_groups, bool align_head) {
  TensorListPlan plan;
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return group_ids[a] < group_ids[b]; });

  plan.group_chunk_begin.assign(num_groups + 1, 0);
  plan.tensors.reserve(tensors.size());
  int64_t next_chunk = 0;
  int64_t current_group = 0;
  for (size_t idx : order) {
    const int64_t g = group_ids[idx];
    while (current_group < g) plan.group_chunk_begin[++current_group] = next_chunk;
    at::Tensor t = tensors[idx];
    if (t.numel() == 0) continue;
    if (!t.is_non_overlapping_and_dense()) {
      t = t.contiguous();
      plan.keep_alive.push_back(t);
    }
    PlannedTensor p;
    p.data = t.data_ptr();
    p.numel = t.numel();
    p.type = elem_type_of(t.scalar_type());
    p.group = g;
    if (align_head) {
      const int64_t esize = elem_size(p.type);
      const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.data) % 16);
      const int64_t head = misalign == 0 ? 0 : (16 - misalign) / esize;
      p.head = static_cast<int32_t>(std::min<int64_t>(head, p.numel));
    }
    p.chunk_begin = next_chunk;
    next_chunk += chunks_for(p.numel, p.head);
    plan.tensors.push_back(p);
  }
  while (current_group < num_groups) plan.group_chunk_begin[++current_group] = next_chunk;
  plan.num_chunks = next_chunk;
  return plan;
}

}  // namespace gradgeom
