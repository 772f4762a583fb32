// Host-side launchers of the INT4 CUDA kernels (int4_kernels.cu), called by the torch binding.
// Plain pointers and an element-type tag keep this header free of torch and of cuda_fp16/cuda_bf16.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace tpcomp {

// Element type of the tensor the kernels read (quantize) or write (dequantize): fp32, fp16 or bf16.
enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// True for the group sizes the kernels support: 8, 16, 32, 64, 128, 256 (G/8 lanes must tile a warp).
bool int4_cuda_group_supported(int64_t group);

// Quantize + pack `numel` values at `x` into `payload` (int4_payload_nbytes(numel, group) bytes; every byte,
// padding included, is written). Returns the launch error (cudaSuccess when nothing to do).
cudaError_t int4_quantize_launch(const void* x, ElemType type, int64_t numel, int group, uint8_t* payload,
                                 cudaStream_t stream);

// out[i] = sum over r = 0..n-1 (in that order, fp32) of decode(payload r)[i], rounded once to `type`.
// Payload r starts at payloads + r * nbytes (nbytes = int4_payload_nbytes(numel, group), 4-byte aligned base).
cudaError_t int4_dequantize_sum_launch(const uint8_t* payloads, int n, int64_t nbytes, int64_t numel, int group,
                                       ElemType type, void* out, cudaStream_t stream);

}  // namespace tpcomp
