// Host build of the INT4 core: a C ABI over whole payloads for the tests (loaded with ctypes), so that the
// exact arithmetic the CUDA kernels run is checked against the torch reference on machines without a GPU.
// Compiled by the tests with g++ (-O2, no fast math), never by setup.py. Functions return 0, or -1 for a bad
// group size (even, 2 .. kMaxGroup, dividing 4096).
#include <string.h>

#include "int4_core.h"

namespace {

constexpr int kMaxGroup = 4096;

// Even, and dividing the super-block (4096 values): the formats the kernels take.
bool bad_group(int g) { return g < 2 || g > kMaxGroup || (g & 1) != 0 || tpcomp::kSuperValues % g != 0; }

}  // namespace

extern "C" {

void tpc_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = tpcomp::float_to_half_bits(in[i]);
}

void tpc_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = tpcomp::half_bits_to_float(in[i]);
}

void tpc_float_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = tpcomp::float_to_bf16_bits(in[i]);
}

int64_t tpc_int4_payload_nbytes(int64_t numel, int g) { return tpcomp::int4_payload_nbytes(numel, g); }

int64_t tpc_int4_scales_offset(int64_t numel, int g) {
  return tpcomp::int4_scales_offset(tpcomp::int4_num_groups(numel, g), g);
}

// x: numel fp32 values; payload: int4_payload_nbytes(numel, g) bytes, fully written (padding zeroed).
// Per super-block of 4096 values: its exponent k from the largest amax of its finite groups, then the groups of
// the normalized values x * 2^-k.
int tpc_int4_quantize(const float* x, int64_t numel, int g, uint8_t* payload) {
  if (bad_group(g)) return -1;
  const int64_t ngroups = tpcomp::int4_num_groups(numel, g);
  memset(payload, 0, static_cast<size_t>(tpcomp::int4_payload_nbytes(numel, g)));
  uint8_t* scales = payload + tpcomp::int4_scales_offset(ngroups, g);
  uint8_t* exps = payload + tpcomp::int4_exps_offset(ngroups, g);
  const int64_t per_super = tpcomp::kSuperValues / g;
  static thread_local float buf[tpcomp::kSuperValues];
  for (int64_t sb = 0; sb * per_super < ngroups; ++sb) {
    const int64_t g0 = sb * per_super;
    const int64_t gn = ngroups - g0 < per_super ? ngroups - g0 : per_super;
    const int n = static_cast<int>(gn) * g;
    for (int i = 0; i < n; ++i) {
      const int64_t k = g0 * g + i;
      buf[i] = k < numel ? x[k] : 0.0f;  // zero padding of the last group, as the reference pads
    }
    const int k = tpcomp::range_exponent(tpcomp::int4_finite_amax(buf, n, g), tpcomp::kInt4Limit);
    for (int i = 0; i < n; ++i) buf[i] = tpcomp::pow2_mul(buf[i], -k);
    const int16_t stored = static_cast<int16_t>(k);
    memcpy(exps + 2 * sb, &stored, 2);
    for (int64_t gi = 0; gi < gn; ++gi) {
      const uint16_t s = tpcomp::int4_quantize_group(buf + gi * g, g, payload + (g0 + gi) * (g / 2));
      memcpy(scales + 2 * (g0 + gi), &s, 2);  // little-endian host, like the wire
    }
  }
  return 0;
}

// Sum of n_payloads payloads (laid end to end, nbytes apart) decoded in order 0..n-1, into out[numel] (fp32);
// each payload's values are clamped to [-top, top] (the output dtype's largest finite value) before the sum.
int tpc_int4_dequantize_sum(const uint8_t* payloads, int n_payloads, int64_t nbytes, int64_t numel, int g, float top,
                            float* out) {
  if (bad_group(g) || n_payloads < 1) return -1;
  const int64_t ngroups = tpcomp::int4_num_groups(numel, g);
  const int64_t scales_offset = tpcomp::int4_scales_offset(ngroups, g);
  const int64_t exps_offset = tpcomp::int4_exps_offset(ngroups, g);
  const int64_t per_super = tpcomp::kSuperValues / g;
  float acc[kMaxGroup];
  for (int64_t gi = 0; gi < ngroups; ++gi) {
    for (int r = 0; r < n_payloads; ++r) {
      const uint8_t* p = payloads + r * nbytes;
      uint16_t s;
      int16_t k;
      memcpy(&s, p + scales_offset + 2 * gi, 2);
      memcpy(&k, p + exps_offset + 2 * (gi / per_super), 2);
      tpcomp::int4_accumulate_group(p + gi * (g / 2), s, k, top, g, r == 0, acc);
    }
    for (int i = 0; i < g && gi * g + i < numel; ++i) out[gi * g + i] = acc[i];
  }
  return 0;
}

}  // extern "C"
