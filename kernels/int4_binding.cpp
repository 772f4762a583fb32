// Torch bindings of the INT4 CUDA kernels: argument checks (errors name the bad value), allocation, launch on
// the current stream. Python wrappers with dtype/shape/layout docs: megatron_tpcomp/backends/cuda_int4.py.
//
// Only the headers that are needed (not torch/extension.h): the binding compiles several times faster, which
// matters for the compile check CI runs on every change (scripts/check_cuda.sh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "int4_core.h"
#include "int4_kernels.h"

namespace {

tpcomp::ElemType elem_type(c10::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat:
      return tpcomp::ElemType::kFloat32;
    case at::kHalf:
      return tpcomp::ElemType::kFloat16;
    case at::kBFloat16:
      return tpcomp::ElemType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t);
  return tpcomp::ElemType::kFloat32;  // not reached
}

void check_group(int64_t group, const char* op) {
  TORCH_CHECK(tpcomp::int4_cuda_group_supported(group), op,
              ": group must be one of 8, 16, 32, 64, 128, 256 for the CUDA kernels, got ", group);
}

// Shared checks of a payload tensor (1-D: one payload; 2-D: one per rank).
void check_payloads(const at::Tensor& p, int64_t numel, int64_t group, const char* op) {
  TORCH_CHECK(p.is_cuda(), op, ": payload must be a CUDA tensor, got device ", p.device());
  TORCH_CHECK(p.scalar_type() == at::kByte, op, ": payload must be uint8, got ", p.scalar_type());
  TORCH_CHECK(p.is_contiguous(), op, ": payload must be contiguous, got strides ", p.strides());
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  const int64_t expected = tpcomp::int4_payload_nbytes(numel, static_cast<int>(group));
  const int64_t got = p.dim() == 0 ? 0 : p.size(p.dim() - 1);
  TORCH_CHECK(got == expected, op, ": payload has ", got, " bytes (shape ", p.sizes(), "); ", numel,
              " values in groups of ", group, " need ", expected, " (payload of another codec or shape?)");
  // The kernels read the codes as 32-bit words (payload starts and nbytes are multiples of 16 otherwise).
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p.data_ptr()) % 4 == 0, op, ": payload data must be 4-byte aligned, got "
              "address ", p.data_ptr(), " (storage offset ", p.storage_offset(), ")");
}

at::Tensor dequantize_sum_impl(const at::Tensor& payloads, int64_t n, int64_t numel, int64_t group,
                               c10::ScalarType dtype, const char* op) {
  const auto type = elem_type(dtype, op, "dtype");
  const c10::cuda::CUDAGuard guard(payloads.device());
  auto out = at::empty({numel}, payloads.options().dtype(dtype));
  const int64_t nbytes = tpcomp::int4_payload_nbytes(numel, static_cast<int>(group));
  C10_CUDA_CHECK(tpcomp::int4_dequantize_sum_launch(payloads.data_ptr<uint8_t>(), static_cast<int>(n), nbytes,
                                                    numel, static_cast<int>(group), type, out.data_ptr(),
                                                    c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// x: CUDA fp32/fp16/bf16, any shape and strides (read row-major). Returns the uint8 payload (1-D).
at::Tensor int4_quantize(const at::Tensor& x, int64_t group) {
  constexpr const char* op = "int4_quantize";
  check_group(group, op);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  const auto type = elem_type(x.scalar_type(), op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();  // a copy only for strided views (the reference accepts them too)
  const int64_t numel = xc.numel();
  // empty, not zeros: the kernel writes every byte, padding included.
  auto payload = at::empty({tpcomp::int4_payload_nbytes(numel, static_cast<int>(group))},
                           xc.options().dtype(at::kByte));
  C10_CUDA_CHECK(tpcomp::int4_quantize_launch(xc.data_ptr(), type, numel, static_cast<int>(group),
                                              payload.data_ptr<uint8_t>(),
                                              c10::cuda::getCurrentCUDAStream().stream()));
  return payload;
}

// payload: uint8 [nbytes]. Returns dtype [numel].
at::Tensor int4_dequantize(const at::Tensor& payload, int64_t numel, int64_t group, c10::ScalarType dtype) {
  constexpr const char* op = "int4_dequantize";
  check_group(group, op);
  TORCH_CHECK(payload.dim() == 1, op, ": payload must be 1-D, got shape ", payload.sizes());
  check_payloads(payload, numel, group, op);
  return dequantize_sum_impl(payload, 1, numel, group, dtype, op);
}

// payloads: uint8 [N, nbytes], one payload per rank in rank order. Returns dtype [numel] = the fp32 sum of the
// N decodes (added in rank order), rounded once.
at::Tensor int4_dequantize_sum(const at::Tensor& payloads, int64_t numel, int64_t group, c10::ScalarType dtype) {
  constexpr const char* op = "int4_dequantize_sum";
  check_group(group, op);
  TORCH_CHECK(payloads.dim() == 2, op, ": payloads must be 2-D [ranks, nbytes], got shape ", payloads.sizes());
  TORCH_CHECK(payloads.size(0) >= 1 && payloads.size(0) <= (1 << 20), op,
              ": payloads must hold 1 .. 2^20 ranks, got ", payloads.size(0));
  check_payloads(payloads, numel, group, op);
  return dequantize_sum_impl(payloads, payloads.size(0), numel, group, dtype, op);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "INT4 group-wise codec (int4:g<G>, fp16 scales) CUDA kernels; see megatron_tpcomp/backends/cuda_int4.py";
  m.def("int4_quantize", &int4_quantize, "INT4 quantize + pack (CUDA)", pybind11::arg("x"), pybind11::arg("group"));
  m.def("int4_dequantize", &int4_dequantize, "INT4 unpack + dequantize (CUDA)", pybind11::arg("payload"),
        pybind11::arg("numel"), pybind11::arg("group"), pybind11::arg("dtype"));
  m.def("int4_dequantize_sum", &int4_dequantize_sum, "INT4 unpack + dequantize + sum over ranks (CUDA)",
        pybind11::arg("payloads"), pybind11::arg("numel"), pybind11::arg("group"), pybind11::arg("dtype"));
}
