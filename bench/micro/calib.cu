// Latency and throughput of a few primitives on the current GPU (clock64 cycles per dependent
// operation; device-wide operations per second).
//   nvcc -O3 -arch=sm_90 bench/micro/calib.cu -o build/calib && build/calib
#include <cuda_runtime.h>
#include <cstdio>

template <int KIND>
__global__ void lat(int iters, double a, double b, long long* cyc, double* sink) {
  __shared__ int chase[1024];
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) chase[i] = (i * 97 + 13) & 1023;
  __syncthreads();
  double x = a + threadIdx.x;
  float xf = float(x);
  int idx = threadIdx.x;
  const long long t0 = clock64();
#pragma unroll 8
  for (int it = 0; it < iters; ++it) {
    if (KIND == 0) x = fma(x, a, b);
    if (KIND == 1) x = b / x;
    if (KIND == 2) idx = chase[idx];
    if (KIND == 3) xf = fmaf(xf, float(a), float(b));
    if (KIND == 4) __syncthreads();
  }
  const long long t1 = clock64();
  if (threadIdx.x == 0) *cyc = t1 - t0;
  sink[threadIdx.x] = x + idx + xf;
}

template <bool F64>
__global__ void tput(int iters, double a, double b, double* sink) {
  double x0 = threadIdx.x, x1 = x0 + 1, x2 = x0 + 2, x3 = x0 + 3, x4 = x0 + 4, x5 = x0 + 5, x6 = x0 + 6, x7 = x0 + 7;
  float f0 = x0, f1 = x1, f2 = x2, f3 = x3, f4 = x4, f5 = x5, f6 = x6, f7 = x7;
  const float af = a, bf = b;
  for (int it = 0; it < iters; ++it) {
    if (F64) {
      x0 = fma(x0, a, b); x1 = fma(x1, a, b); x2 = fma(x2, a, b); x3 = fma(x3, a, b);
      x4 = fma(x4, a, b); x5 = fma(x5, a, b); x6 = fma(x6, a, b); x7 = fma(x7, a, b);
    } else {
      f0 = fmaf(f0, af, bf); f1 = fmaf(f1, af, bf); f2 = fmaf(f2, af, bf); f3 = fmaf(f3, af, bf);
      f4 = fmaf(f4, af, bf); f5 = fmaf(f5, af, bf); f6 = fmaf(f6, af, bf); f7 = fmaf(f7, af, bf);
    }
  }
  sink[blockIdx.x * blockDim.x + threadIdx.x] = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + f0 + f1 + f2 + f3 + f4 + f5 + f6 + f7;
}

int main() {
  long long* cyc;
  double* sink;
  cudaMalloc(&cyc, 8);
  cudaMalloc(&sink, 8 * 132 * 8 * 256);
  const char* names[] = {"dfma chain", "ddiv chain", "smem chase", "ffma chain", "syncthreads 256"};
  auto run = [&](auto kernel, int k, int threads) {
    const int iters = 8192;
    kernel<<<1, threads>>>(iters, 0.999999, 1e-7, cyc, sink);
    cudaDeviceSynchronize();
    kernel<<<1, threads>>>(iters, 0.999999, 1e-7, cyc, sink);
    long long c;
    cudaMemcpy(&c, cyc, 8, cudaMemcpyDeviceToHost);
    std::printf("%-18s %6.1f cycles/op\n", names[k], double(c) / iters);
  };
  run(lat<0>, 0, 32);
  run(lat<1>, 1, 32);
  run(lat<2>, 2, 32);
  run(lat<3>, 3, 32);
  run(lat<4>, 4, 256);
  for (int f64 = 1; f64 >= 0; --f64) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    const int iters = 4096, blocks = 132 * 8, threads = 256;
    auto k = f64 ? tput<true> : tput<false>;
    k<<<blocks, threads>>>(iters, 0.999999, 1e-7, sink);
    cudaEventRecord(a);
    k<<<blocks, threads>>>(iters, 0.999999, 1e-7, sink);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    const double flops = 2.0 * 8 * iters * double(blocks) * threads;
    std::printf("%s fma throughput: %.1f TFLOP/s\n", f64 ? "fp64" : "fp32", flops / (ms * 1e-3) / 1e12);
  }
  std::printf("%s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
