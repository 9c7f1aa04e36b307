// lora_cross_gram on the CPU: B1ᵢᵀ·B2ᵢ in float64 with ATen, one batched product per group of
// pairs of equal shapes (the CUDA kernel is csrc/cuda/lora_cross_gram.cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "gradgeom/lora_gram_plan.h"

namespace gradgeom {
namespace {

at::Tensor lora_cross_gram_cpu(at::TensorList B1s, at::TensorList B2s) {
  const CrossGramPlan plan = make_cross_gram_plan(B1s, B2s);
  const int64_t n = static_cast<int64_t>(B1s.size());
  const int64_t R = plan.max_rank;
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  if (n == 0) return at::empty({0, 0, 0}, opts);
  bool one_shape = B1s[0].size(1) == R;
  for (int64_t i = 0; i < n; ++i) one_shape = one_shape && B1s[i].sizes() == B1s[0].sizes() && B2s[i].sizes() == B1s[0].sizes();
  if (one_shape) return at::matmul(at::stack(B1s).to(at::kDouble).mT(), at::stack(B2s).to(at::kDouble));
  at::Tensor out = at::zeros({n, R, R}, opts);
  std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> keys;  // (shape of B1, shape of B2)
  std::vector<std::vector<int64_t>> members;
  for (int64_t i = 0; i < n; ++i) {
    std::pair<std::vector<int64_t>, std::vector<int64_t>> key{B1s[i].sizes().vec(), B2s[i].sizes().vec()};
    const auto it = std::find(keys.begin(), keys.end(), key);
    if (it == keys.end()) {
      keys.push_back(std::move(key));
      members.push_back({i});
    } else {
      members[it - keys.begin()].push_back(i);
    }
  }
  for (size_t g = 0; g < keys.size(); ++g) {
    std::vector<at::Tensor> xs, ys;
    for (const int64_t i : members[g]) {
      xs.push_back(B1s[i]);
      ys.push_back(B2s[i]);
    }
    const at::Tensor prod = at::matmul(at::stack(xs).to(at::kDouble).mT(), at::stack(ys).to(at::kDouble));
    const at::Tensor idx = at::from_blob(members[g].data(), {static_cast<int64_t>(members[g].size())},
                                         at::TensorOptions().dtype(at::kLong));
    out.narrow(1, 0, keys[g].first[1]).narrow(2, 0, keys[g].second[1]).index_copy_(0, idx, prod);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradgeom, CPU, m) { m.impl("lora_cross_gram", &lora_cross_gram_cpu); }

}  // namespace gradgeom
