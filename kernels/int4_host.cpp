// Host build of the INT4 core: a C ABI over whole payloads, used by the tests (ctypes) to check the exact
// arithmetic of the CUDA kernels against the torch reference. Compiled with g++, never by setup.py.
#include <string.h>

#include "int4_core.h"

extern "C" {

void tpc_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = tpcomp::float_to_half_bits(in[i]);
}

void tpc_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = tpcomp::half_bits_to_float(in[i]);
}

int64_t tpc_int4_payload_nbytes(int64_t numel, int g) { return tpcomp::int4_payload_nbytes(numel, g); }

// x: numel fp32 values; payload: int4_payload_nbytes(numel, g) bytes (zeroed here first).
void tpc_int4_quantize(const float* x, int64_t numel, int g, uint8_t* payload) {
  const int64_t ngroups = (numel + g - 1) / g;
  memset(payload, 0, static_cast<size_t>(tpcomp::int4_payload_nbytes(numel, g)));
  uint16_t* scales = reinterpret_cast<uint16_t*>(payload + tpcomp::int4_scales_offset(ngroups, g));
  float buf[4096];
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    for (int i = 0; i < g; ++i) {
      const int64_t k = gi * g + i;
      buf[i] = k < numel ? x[k] : 0.0f;  // zero padding of the last group, as the reference pads
    }
    tpcomp::int4_quantize_group(buf, g, payload + gi * g / 2, &scales[gi]);
  }
}

// Sum of n_payloads payloads (laid end to end, nbytes each) decoded in order, into out[numel] (fp32).
void tpc_int4_dequantize_sum(const uint8_t* payloads, int n_payloads, int64_t nbytes, int64_t numel, int g,
                             float* out) {
  const int64_t ngroups = (numel + g - 1) / g;
  float buf[4096];
  for (int64_t i = 0; i < numel; ++i) out[i] = 0.0f;
  for (int r = 0; r < n_payloads; ++r) {
    const uint8_t* p = payloads + r * nbytes;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(p + tpcomp::int4_scales_offset(ngroups, g));
    for (int64_t gi = 0; gi < ngroups; ++gi) {
      tpcomp::int4_dequantize_group(p + gi * g / 2, scales[gi], g, buf);
      for (int i = 0; i < g && gi * g + i < numel; ++i) {
        // The reference starts from rank 0's decoded values (0 + v == v exactly except for -0, and decoded
        // values are never -0 unless the scale is; 0 + -0 = +0 would differ, so copy for the first rank).
        out[gi * g + i] = r == 0 ? buf[i] : tpcomp::add_rn(out[gi * g + i], buf[i]);
      }
    }
  }
}

}  // extern "C"
