// C++ smoke test of the CMake build: the operators registered by libgradgeom are callable
// through the dispatcher, and group_moments gives the right numbers on a small input.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("gradgeom::group_moments", "")
                .typed<at::Tensor(at::TensorList, c10::IntArrayRef, int64_t)>();
  at::Tensor a = at::empty({4}, at::kFloat);
  const float a_values[4] = {1.0f, 2.0f, 3.0f, INFINITY};
  std::copy(a_values, a_values + 4, a.data_ptr<float>());
  at::Tensor b = at::empty({2}, at::kDouble);
  b.data_ptr<double>()[0] = -4.0;
  b.data_ptr<double>()[1] = 0.5;
  const std::vector<at::Tensor> tensors = {a, b};
  const std::vector<int64_t> groups = {0, 1};
  const at::Tensor out = op.call(tensors, groups, 2);
  const double expected[2][6] = {{3, 6, 14, 2, 3, 1}, {2, -3.5, 16.25, 10.125, 4, 0}};
  for (int g = 0; g < 2; ++g) {
    for (int c = 0; c < 6; ++c) {
      const double got = out.data_ptr<double>()[g * 6 + c];
      if (std::fabs(got - expected[g][c]) > 1e-12) {
        std::fprintf(stderr, "group_moments[%d][%d] = %g, expected %g\n", g, c, got, expected[g][c]);
        return 1;
      }
    }
  }
  std::printf("gradgeom C++ smoke test: 1 passed, 0 failed\n");
  return 0;
}
