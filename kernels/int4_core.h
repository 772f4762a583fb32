// Bit-level core of the INT4 codec, shared by the CUDA kernels and the host tests.
//
// Everything here is `TPC_HD` (host + device) so that the exact arithmetic of the kernels can be compiled with
// g++ and checked byte for byte against the torch reference (megatron_tpcomp/codecs/intx.py, spec int4:g<G>):
//
//   scale  = fp16_rne(min(amax / 7, 65504))           stored as fp16 bits; NaN (0x7E00) if the group is non-finite
//   inv    = scale == 0 ? 0 : 1 / scale               fp32, IEEE division
//   q      = clamp(rint(x * inv), -7, 7)              rint = round half to even
//   code   = q + 8                                    two codes per byte, even index in the low nibble
//   value  = (code - 8) * scale                       fp32; one-shot sums add values in rank order from 0
//
// Multiplies and adds go through mul_rn/add_rn so that nvcc never contracts them into an FMA (one rounding
// instead of two would change the bits relative to the reference).
#pragma once

#include <stdint.h>

#include <math.h>

#if defined(__CUDACC__)
#define TPC_HD __host__ __device__ __forceinline__
#else
#define TPC_HD inline
#endif

namespace tpcomp {

constexpr int kInt4Qmax = 7;
constexpr int kInt4Zero = 8;
constexpr uint16_t kHalfNaN = 0x7E00;  // torch's canonical fp16 NaN
constexpr float kHalfMax = 65504.0f;

TPC_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

TPC_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

TPC_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;  // volatile: no contraction with a neighbouring add on hosts with FMA
  return r;
#endif
}

TPC_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}

TPC_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  volatile float r = a / b;
  return r;
#endif
}

// fp32 -> fp16 bits, round to nearest even, like torch's float -> float16 conversion (NaN -> 0x7E00 | sign).
TPC_HD uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_as_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t mag = x & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint16_t>(sign | kHalfNaN);
  if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (mag >= 0x38800000u) {                                             // normal half: >= 2^-14
    uint32_t r = (mag - 0x38000000u) >> 13;                             // rebias exponent 127 -> 15
    const uint32_t rem = mag & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;              // may carry into the exponent: fine
    return static_cast<uint16_t>(sign | r);
  }
  if (mag < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 (2^-25 itself ties to even: 0)
  // Subnormal half: value / 2^-24 = m * 2^(e - 126), rounded half to even.
  const uint32_t e = mag >> 23;
  const uint32_t m = (mag & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 .. 24
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

TPC_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_as_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_as_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_as_float(sign);
  // Subnormal: man * 2^-24, exact in fp32.
  float v = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -v : v;
}

TPC_HD bool is_finite(float v) { return (float_as_bits(v) & 0x7F800000u) != 0x7F800000u; }

TPC_HD float abs_f(float v) { return bits_as_float(float_as_bits(v) & 0x7FFFFFFFu); }

// Scale bits for a group with absolute maximum `amax` (`finite` false: the group holds NaN/Inf).
TPC_HD uint16_t int4_scale_bits(float amax, bool finite) {
  if (!finite) return kHalfNaN;
  float ideal = div_rn(amax, static_cast<float>(kInt4Qmax));
  if (ideal > kHalfMax) ideal = kHalfMax;
  return float_to_half_bits(ideal);
}

// 1 / scale, or 0 for a zero scale (an all-zero group: every code becomes the zero code, no NaN).
TPC_HD float int4_inverse_scale(uint16_t scale_bits) {
  const float s = half_bits_to_float(scale_bits);
  if (!(s == s)) return 0.0f;  // NaN scale: codes are written as zero, the scale carries the NaN
  return s == 0.0f ? 0.0f : div_rn(1.0f, s);
}

// Unsigned 4-bit code of one value (x already known finite when inv != 0).
TPC_HD uint8_t int4_code(float x, float inv) {
  float q = rintf(mul_rn(x, inv));
  q = q < -kInt4Qmax ? -kInt4Qmax : (q > kInt4Qmax ? kInt4Qmax : q);
  return static_cast<uint8_t>(static_cast<int>(q) + kInt4Zero);
}

TPC_HD float int4_value(uint8_t code, float scale) {
  return mul_rn(static_cast<float>(static_cast<int>(code) - kInt4Zero), scale);
}

// Quantize one group of `g` values (g even). Writes g/2 bytes to `codes` and the scale bits to `*scale`.
TPC_HD void int4_quantize_group(const float* x, int g, uint8_t* codes, uint16_t* scale) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < g; ++i) {
    finite = finite && is_finite(x[i]);
    const float a = abs_f(x[i]);
    amax = a > amax ? a : amax;
  }
  *scale = int4_scale_bits(amax, finite);
  const float inv = finite ? int4_inverse_scale(*scale) : 0.0f;
  for (int i = 0; i < g; i += 2) {
    const uint8_t lo = finite ? int4_code(x[i], inv) : kInt4Zero;
    const uint8_t hi = finite ? int4_code(x[i + 1], inv) : kInt4Zero;
    codes[i / 2] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

// Decode one group: out[i] = value(code_i, scale).
TPC_HD void int4_dequantize_group(const uint8_t* codes, uint16_t scale_bits, int g, float* out) {
  const float s = half_bits_to_float(scale_bits);
  for (int i = 0; i < g; i += 2) {
    out[i] = int4_value(codes[i / 2] & 0xF, s);
    out[i + 1] = int4_value(codes[i / 2] >> 4, s);
  }
}

// Byte offset of the scales section in a payload of `ngroups` groups of `g` values (16-byte aligned).
TPC_HD int64_t int4_scales_offset(int64_t ngroups, int g) { return ((ngroups * g / 2) + 15) / 16 * 16; }

// Total payload bytes (16-byte aligned end), identical to PayloadLayout in codecs/base.py.
TPC_HD int64_t int4_payload_nbytes(int64_t numel, int g) {
  const int64_t ngroups = (numel + g - 1) / g;
  if (ngroups == 0) return 0;
  return (int4_scales_offset(ngroups, g) + 2 * ngroups + 15) / 16 * 16;
}

}  // namespace tpcomp
