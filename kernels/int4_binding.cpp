// Torch bindings of the INT4 CUDA kernels: argument checks (errors name the bad value), allocation, launch.
// Python wrappers with dtype/shape/layout docs: megatron_tpcomp/kernels.py.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include "int4_core.h"

namespace tpcomp {
template <typename T>
void launch_int4_quantize(const T* x, int64_t numel, int g, uint8_t* payload, cudaStream_t stream);
template <typename T>
void launch_int4_dequantize_sum(const uint8_t* payloads, int n, int64_t nbytes, int64_t numel, int g, T* out,
                                cudaStream_t stream);
}  // namespace tpcomp

namespace {

void check_group(int64_t group) {
  TORCH_CHECK(group == 8 || group == 16 || group == 32 || group == 64 || group == 128 || group == 256,
              "int4 CUDA kernels support group sizes 8, 16, 32, 64, 128, 256; got ", group);
}

torch::Tensor int4_quantize(const torch::Tensor& x, int64_t group) {
  check_group(group);
  TORCH_CHECK(x.is_cuda(), "int4_quantize: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "int4_quantize: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const int64_t numel = xc.numel();
  auto payload = torch::zeros({tpcomp::int4_payload_nbytes(numel, static_cast<int>(group))},
                              xc.options().dtype(torch::kUInt8));
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  auto* out = payload.data_ptr<uint8_t>();
  const int g = static_cast<int>(group);
  switch (xc.scalar_type()) {
    case at::kFloat:
      tpcomp::launch_int4_quantize(xc.data_ptr<float>(), numel, g, out, stream);
      break;
    case at::kHalf:
      tpcomp::launch_int4_quantize(reinterpret_cast<const __half*>(xc.data_ptr<at::Half>()), numel, g, out, stream);
      break;
    default:
      tpcomp::launch_int4_quantize(reinterpret_cast<const __nv_bfloat16*>(xc.data_ptr<at::BFloat16>()), numel, g,
                                   out, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return payload;
}

// payloads: uint8 [N, nbytes] (one payload per rank, rank order); returns dtype [numel] = sum of the decodes.
torch::Tensor int4_dequantize_sum(const torch::Tensor& payloads, int64_t numel, int64_t group,
                                  c10::ScalarType dtype) {
  check_group(group);
  TORCH_CHECK(payloads.is_cuda(), "int4_dequantize_sum: payloads must be on CUDA, got ", payloads.device());
  TORCH_CHECK(payloads.scalar_type() == at::kByte, "int4_dequantize_sum: payloads must be uint8, got ",
              payloads.scalar_type());
  TORCH_CHECK(payloads.dim() == 2, "int4_dequantize_sum: payloads must be 2-D [ranks, nbytes], got ",
              payloads.dim(), "-D");
  TORCH_CHECK(numel >= 0, "int4_dequantize_sum: numel must be >= 0, got ", numel);
  const int64_t expected = tpcomp::int4_payload_nbytes(numel, static_cast<int>(group));
  TORCH_CHECK(payloads.size(1) == expected, "int4_dequantize_sum: payloads have ", payloads.size(1),
              " bytes per rank; ", numel, " values in groups of ", group, " need ", expected);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "int4_dequantize_sum: dtype must be float32, float16 or bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard guard(payloads.device());
  const auto pc = payloads.contiguous();
  auto out = torch::empty({numel}, pc.options().dtype(dtype));
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int n = static_cast<int>(pc.size(0));
  const int g = static_cast<int>(group);
  const auto* p = pc.data_ptr<uint8_t>();
  switch (dtype) {
    case at::kFloat:
      tpcomp::launch_int4_dequantize_sum(p, n, expected, numel, g, out.data_ptr<float>(), stream);
      break;
    case at::kHalf:
      tpcomp::launch_int4_dequantize_sum(p, n, expected, numel, g, reinterpret_cast<__half*>(out.data_ptr<at::Half>()),
                                         stream);
      break;
    default:
      tpcomp::launch_int4_dequantize_sum(p, n, expected, numel, g,
                                         reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_quantize", &int4_quantize, "INT4 group-wise quantize + pack (CUDA)", py::arg("x"), py::arg("group"));
  m.def("int4_dequantize_sum", &int4_dequantize_sum, "INT4 unpack + dequantize + sum over ranks (CUDA)",
        py::arg("payloads"), py::arg("numel"), py::arg("group"), py::arg("dtype"));
}
