// CUDA kernels for the INT4 group-wise codec (wire format: megatron_tpcomp/codecs/intx.py, spec int4:g<G>).
//
// Work split: each thread owns 8 consecutive values (4 payload bytes); a group of G values is handled by
// G/8 neighbouring lanes that reduce their absolute maxima with warp shuffles, so loads and stores are
// coalesced and the whole quantization is one pass over memory. G must be 8, 16, 32, 64, 128 or 256.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "int4_core.h"

namespace tpcomp {

template <typename T>
__device__ __forceinline__ float load_as_float(const T* p);
template <>
__device__ __forceinline__ float load_as_float<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_as_float<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_as_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T>
__device__ __forceinline__ void store_from_float(T* p, float v);
template <>
__device__ __forceinline__ void store_from_float<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store_from_float<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <>
__device__ __forceinline__ void store_from_float<__nv_bfloat16>(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

constexpr int kValuesPerThread = 8;

// Quantize + pack. x: numel values; payload: int4_payload_nbytes(numel, g) bytes (padding bytes pre-zeroed).
template <typename T>
__global__ void int4_quantize_kernel(const T* __restrict__ x, int64_t numel, int g, uint8_t* __restrict__ payload) {
  const int lanes_per_group = g / kValuesPerThread;
  const int64_t ngroups = (numel + g - 1) / g;
  const int64_t nthreads = ngroups * lanes_per_group;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Threads past the end still take part in the shuffles of their warp (values 0, finite).
  const bool active = tid < nthreads;
  const int64_t first = tid * kValuesPerThread;
  float v[kValuesPerThread];
  float amax = 0.0f;
  bool finite = true;
#pragma unroll
  for (int i = 0; i < kValuesPerThread; ++i) {
    const int64_t k = first + i;
    v[i] = (active && k < numel) ? load_as_float(x + k) : 0.0f;
    finite = finite && is_finite(v[i]);
    const float a = abs_f(v[i]);
    amax = a > amax ? a : amax;
  }
  // Reduce over the lanes of this group (lanes_per_group is a power of two <= 32, groups never straddle warps).
  for (int offset = lanes_per_group / 2; offset > 0; offset /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
    finite = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(finite), offset) && finite;
  }
  if (!active) return;
  const uint16_t scale_bits = int4_scale_bits(amax, finite);
  const float inv = finite ? int4_inverse_scale(scale_bits) : 0.0f;
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < kValuesPerThread; ++i) {
    const uint32_t code = finite ? int4_code(v[i], inv) : static_cast<uint32_t>(kInt4Zero);
    packed |= code << (4 * i);
  }
  reinterpret_cast<uint32_t*>(payload)[tid] = packed;  // 4 bytes = 8 codes, even index in the low nibble
  if (tid % lanes_per_group == 0) {
    uint16_t* scales = reinterpret_cast<uint16_t*>(payload + int4_scales_offset(ngroups, g));
    scales[tid / lanes_per_group] = scale_bits;
  }
}

// Sum of n payloads (rank order, fp32) -> out (n == 1: plain dequantize).
template <typename T>
__global__ void int4_dequantize_sum_kernel(const uint8_t* __restrict__ payloads, int n, int64_t nbytes,
                                           int64_t numel, int g, T* __restrict__ out) {
  const int lanes_per_group = g / kValuesPerThread;
  const int64_t ngroups = (numel + g - 1) / g;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= ngroups * lanes_per_group) return;
  const int64_t group = tid / lanes_per_group;
  const int64_t scales_offset = int4_scales_offset(ngroups, g);
  float acc[kValuesPerThread];
  for (int r = 0; r < n; ++r) {
    const uint8_t* p = payloads + r * nbytes;
    const uint32_t packed = reinterpret_cast<const uint32_t*>(p)[tid];
    const float s = half_bits_to_float(reinterpret_cast<const uint16_t*>(p + scales_offset)[group]);
#pragma unroll
    for (int i = 0; i < kValuesPerThread; ++i) {
      const float value = int4_value(static_cast<uint8_t>((packed >> (4 * i)) & 0xFu), s);
      acc[i] = r == 0 ? value : add_rn(acc[i], value);  // same order and roundings as the reference
    }
  }
  const int64_t first = tid * kValuesPerThread;
#pragma unroll
  for (int i = 0; i < kValuesPerThread; ++i) {
    if (first + i < numel) store_from_float(out + first + i, acc[i]);
  }
}

// Host-side launchers (called from the torch binding).
template <typename T>
void launch_int4_quantize(const T* x, int64_t numel, int g, uint8_t* payload, cudaStream_t stream) {
  const int64_t nthreads = (numel + g - 1) / g * (g / kValuesPerThread);
  if (nthreads == 0) return;
  const int block = 256;
  const int64_t grid = (nthreads + block - 1) / block;
  int4_quantize_kernel<T><<<static_cast<unsigned>(grid), block, 0, stream>>>(x, numel, g, payload);
}

template <typename T>
void launch_int4_dequantize_sum(const uint8_t* payloads, int n, int64_t nbytes, int64_t numel, int g, T* out,
                                cudaStream_t stream) {
  const int64_t nthreads = (numel + g - 1) / g * (g / kValuesPerThread);
  if (nthreads == 0) return;
  const int block = 256;
  const int64_t grid = (nthreads + block - 1) / block;
  int4_dequantize_sum_kernel<T><<<static_cast<unsigned>(grid), block, 0, stream>>>(payloads, n, nbytes, numel, g,
                                                                                   out);
}

template void launch_int4_quantize<float>(const float*, int64_t, int, uint8_t*, cudaStream_t);
template void launch_int4_quantize<__half>(const __half*, int64_t, int, uint8_t*, cudaStream_t);
template void launch_int4_quantize<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int, uint8_t*, cudaStream_t);
template void launch_int4_dequantize_sum<float>(const uint8_t*, int, int64_t, int64_t, int, float*, cudaStream_t);
template void launch_int4_dequantize_sum<__half>(const uint8_t*, int, int64_t, int64_t, int, __half*, cudaStream_t);
template void launch_int4_dequantize_sum<__nv_bfloat16>(const uint8_t*, int, int64_t, int64_t, int, __nv_bfloat16*,
                                                        cudaStream_t);

}  // namespace tpcomp
