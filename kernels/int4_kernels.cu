// CUDA kernels for the INT4 group-wise codec (wire format: megatron_tpcomp/codecs/intx.py, spec int4:g<G>).
//
// Work split: each thread owns 8 consecutive values (4 payload bytes, one 32-bit store). A group of G values is
// handled by G/8 neighbouring lanes that combine their absolute maxima with warp shuffles; a thread block of 512
// threads is one super-block of 4096 values, whose exponent k (the largest finite group amax, int4_core.h
// range_exponent) comes from a block-wide max through shared memory. Quantization stays one pass over memory:
// load (16- or 32-byte vector loads when aligned), amax, k, scale in registers, packed codes, the scale and k
// out. All arithmetic is the host-testable core in int4_core.h (tests/backends/test_cuda_int4_host.py).
#include <stdint.h>

#include "int4_core.h"
#include "int4_kernels.h"

namespace tpcomp {
namespace {

constexpr int kValuesPerThread = 8;
constexpr int kBlock = kSuperValues / kValuesPerThread;  // 512 threads: one thread block per super-block
constexpr int kWarps = kBlock / 32;

// Element access for the three tensor types. 16-bit types are handled as raw bits and converted with the core
// functions, so the rounding and the NaN bits of the outputs match torch's CPU conversions exactly.
struct F32 {
  using T = float;
  __device__ static float load(const T* p) { return *p; }
  __device__ static void store(T* p, float v) { *p = v; }
  __device__ static void load8(const T* p, float* v) {  // p 32-byte aligned (16 suffices for float4)
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
  __device__ static void store8(T* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
struct Bits16 {
  using T = uint16_t;
  __device__ static float load(const T* p) { return ToFloat(*p); }
  __device__ static void store(T* p, float v) { *p = FromFloat(v); }
  __device__ static void load8(const T* p, float* v) {  // p 16-byte aligned
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = ToFloat(static_cast<uint16_t>(words[i] & 0xFFFFu));
      v[2 * i + 1] = ToFloat(static_cast<uint16_t>(words[i] >> 16));
    }
  }
  __device__ static void store8(T* p, const float* v) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      words[i] = static_cast<uint32_t>(FromFloat(v[2 * i])) | (static_cast<uint32_t>(FromFloat(v[2 * i + 1])) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
  }
};

using F16 = Bits16<half_bits_to_float, float_to_half_bits>;
using BF16 = Bits16<bf16_bits_to_float, float_to_bf16_bits>;

// Quantize + pack. `vec`: x is 16-byte aligned, so every thread's 8 values can be read with vector loads.
template <typename Io>
__global__ void __launch_bounds__(kBlock)
    int4_quantize_kernel(const typename Io::T* __restrict__ x, int64_t numel, int g, bool vec,
                         uint8_t* __restrict__ payload) {
  const int lanes = g / kValuesPerThread;  // power of two <= 32: a group never straddles a warp
  const int lanes_log2 = __ffs(lanes) - 1;  // shifts instead of 64-bit divisions below
  const int64_t ngroups = (numel + g - 1) >> (lanes_log2 + 3);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Threads past the end still take part in their warp's shuffles (with zeros, which are finite).
  const bool active = tid < ngroups * lanes;
  const int64_t first = tid * kValuesPerThread;
  float v[kValuesPerThread];
  if (active && vec && first + kValuesPerThread <= numel) {
    Io::load8(x + first, v);
  } else {
#pragma unroll
    for (int i = 0; i < kValuesPerThread; ++i) v[i] = (active && first + i < numel) ? Io::load(x + first + i) : 0.0f;
  }
  float amax = 0.0f;
  bool finite = true;
#pragma unroll
  for (int i = 0; i < kValuesPerThread; ++i) {
    finite = finite && is_finite(v[i]);
    amax = amax_update(amax, v[i]);
  }
  // The maximum is exact, so the order of these reductions cannot change any bit.
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
    finite = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(finite), offset) && finite;
  }
  // Super-block amax: the largest amax of the finite groups, over the whole thread block.
  __shared__ float warp_max[kWarps];
  float top = finite ? amax : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(0xFFFFFFFFu, top, offset));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = top;
  __syncthreads();
  top = warp_max[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) top = fmaxf(top, warp_max[w]);
  if (!active) return;
  const int k = range_exponent(top, kInt4Limit);
  const int64_t scales_offset = int4_scales_offset(ngroups, g);
  const int64_t exps_offset = int4_exps_offset(ngroups, g);
  if (tid == 0) {
    // The payload comes from torch.empty: zero the (< 16 byte) padding after each section here instead of a
    // separate memset, which would cost a launch and a pass over the payload.
    for (int64_t b = ngroups * (g / 2); b < scales_offset; ++b) payload[b] = 0;
    const int64_t nbytes = int4_payload_nbytes(numel, g);
    for (int64_t b = exps_offset + 2 * int4_num_supers(numel); b < nbytes; ++b) payload[b] = 0;
  }
  if (threadIdx.x == 0) reinterpret_cast<int16_t*>(payload + exps_offset)[blockIdx.x] = static_cast<int16_t>(k);
#pragma unroll
  for (int i = 0; i < kValuesPerThread; ++i) v[i] = pow2_mul(v[i], -k);
  // pow2_mul is monotonic and odd: the group's normalized amax is the normalized amax (what the reference
  // computes from the normalized values).
  const uint16_t scale_bits = int4_scale_bits(pow2_mul(amax, -k), finite);
  const float inv = int4_inverse_scale(scale_bits);
  uint32_t packed = 0;
#pragma unroll
  for (int i = 0; i < kValuesPerThread / 2; ++i) {
    packed |= static_cast<uint32_t>(int4_pack_pair(v[2 * i], v[2 * i + 1], inv, finite)) << (8 * i);
  }
  reinterpret_cast<uint32_t*>(payload)[tid] = packed;  // little-endian: byte i holds values 2i (low), 2i+1
  if ((tid & (lanes - 1)) == 0) reinterpret_cast<uint16_t*>(payload + scales_offset)[tid >> lanes_log2] = scale_bits;
}

// Sum of n payloads (rank order, fp32; each payload's values clamped to [-top, top], the output dtype's largest
// finite value) rounded once into out; n == 1 is a plain dequantize.
// `vec`: out is 16-byte aligned, so every thread's 8 values can be written with vector stores.
template <typename Io>
__global__ void __launch_bounds__(kBlock)
    int4_dequantize_sum_kernel(const uint8_t* __restrict__ payloads, int n, int64_t nbytes, int64_t numel, int g,
                               float top, bool vec, typename Io::T* __restrict__ out) {
  const int lanes = g / kValuesPerThread;
  const int lanes_log2 = __ffs(lanes) - 1;
  const int64_t ngroups = (numel + g - 1) >> (lanes_log2 + 3);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= ngroups * lanes) return;
  const int64_t group = tid >> lanes_log2;
  const int64_t super = tid / kBlock;  // 4096 values per super-block, 8 per thread
  const int64_t scales_offset = int4_scales_offset(ngroups, g);
  const int64_t exps_offset = int4_exps_offset(ngroups, g);
  float acc[kValuesPerThread];
  for (int r = 0; r < n; ++r) {
    const uint8_t* p = payloads + r * nbytes;
    const uint32_t packed = __ldg(reinterpret_cast<const uint32_t*>(p) + tid);
    const uint16_t bits = __ldg(reinterpret_cast<const unsigned short*>(p + scales_offset) + group);
    const Pow2 scale_k = pow2_of(__ldg(reinterpret_cast<const short*>(p + exps_offset) + super));
    const float s = half_bits_to_float(bits);
#pragma unroll
    for (int i = 0; i < kValuesPerThread / 2; ++i) {
      int4_accumulate_byte(static_cast<uint8_t>(packed >> (8 * i)), s, scale_k, top, r == 0, acc + 2 * i);
    }
  }
  const int64_t first = tid * kValuesPerThread;
  if (vec && first + kValuesPerThread <= numel) {
    Io::store8(out + first, acc);
  } else {
#pragma unroll
    for (int i = 0; i < kValuesPerThread; ++i) {
      if (first + i < numel) Io::store(out + first + i, acc[i]);
    }
  }
}

unsigned grid_for(int64_t numel, int g) {
  const int64_t nthreads = int4_num_groups(numel, g) * (g / kValuesPerThread);
  return static_cast<unsigned>((nthreads + kBlock - 1) / kBlock);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename Io>
void quantize_as(const void* x, int64_t numel, int g, uint8_t* payload, cudaStream_t stream) {
  const auto* xt = static_cast<const typename Io::T*>(x);
  int4_quantize_kernel<Io><<<grid_for(numel, g), kBlock, 0, stream>>>(xt, numel, g, aligned16(x), payload);
}

template <typename Io>
void dequantize_sum_as(const uint8_t* payloads, int n, int64_t nbytes, int64_t numel, int g, float top, void* out,
                       cudaStream_t stream) {
  auto* ot = static_cast<typename Io::T*>(out);
  int4_dequantize_sum_kernel<Io>
      <<<grid_for(numel, g), kBlock, 0, stream>>>(payloads, n, nbytes, numel, g, top, aligned16(out), ot);
}

}  // namespace

bool int4_cuda_group_supported(int64_t group) {
  return group == 8 || group == 16 || group == 32 || group == 64 || group == 128 || group == 256;
}

cudaError_t int4_quantize_launch(const void* x, ElemType type, int64_t numel, int group, uint8_t* payload,
                                 cudaStream_t stream) {
  if (!int4_cuda_group_supported(group) || numel < 0) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  switch (type) {
    case ElemType::kFloat32:
      quantize_as<F32>(x, numel, group, payload, stream);
      break;
    case ElemType::kFloat16:
      quantize_as<F16>(x, numel, group, payload, stream);
      break;
    case ElemType::kBFloat16:
      quantize_as<BF16>(x, numel, group, payload, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t int4_dequantize_sum_launch(const uint8_t* payloads, int n, int64_t nbytes, int64_t numel, int group,
                                       ElemType type, void* out, cudaStream_t stream) {
  if (!int4_cuda_group_supported(group) || numel < 0 || n < 1) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  switch (type) {
    case ElemType::kFloat32:
      dequantize_sum_as<F32>(payloads, n, nbytes, numel, group, 3.40282347e38f, out, stream);
      break;
    case ElemType::kFloat16:
      dequantize_sum_as<F16>(payloads, n, nbytes, numel, group, kHalfMax, out, stream);
      break;
    case ElemType::kBFloat16:
      dequantize_sum_as<BF16>(payloads, n, nbytes, numel, group, bf16_bits_to_float(0x7F7Fu), out, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace tpcomp
