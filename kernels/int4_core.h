// Bit-level core of the INT4 codec, shared by the CUDA kernels, the host test shim and any CPU build.
//
// Everything here is `TPC_HD` (host + device) so that the exact arithmetic of the kernels can be compiled with
// g++ and checked byte for byte against the torch reference (megatron_tpcomp/codecs/intx.py, spec int4:g<G>):
//
// Range (megatron_tpcomp/codecs/scales.py, "Second level"): every super-block of 4096 values (one CUDA block,
// one CPU tile) is normalized first. amax_super = the largest amax of its finite groups;
//   k      = range_exponent(amax_super, 7 * 65504)  the smallest k with amax_super <= 458528 * 2^k (0 for 0)
//   y      = pow2_mul(x, -k)                        exact power-of-two scaling (two steps where 2^-k is not
//                                                  one fp32 normal number); the rest runs on y
//   exps   int16 k per super-block, right after the scales (2-byte aligned)
//   decode value = pow2_mul((code - 8) * scale, k), clamped to the output dtype's finite range before it is
//                  added to the sum (a finite fp16 65504 stays finite; a true overflow of the sum stays Inf).
//                  Scaling the value, not the scale: s * 2^k may round past fp32's maximum, a value cannot
//                  unless the input was there, and a zero code stays 0 (never 0 * Inf)
//
//   scale  = fp16_rne(min(amax / 7, 65504))        stored as fp16 bits; NaN (0x7E00) if the group is non-finite;
//                                                  amax / 7 is a true fp32 division, as torch does it on the CPU
//                                                  (torch on CUDA multiplies by 1/7: about 1 scale in 20000 is
//                                                  then one fp16 ulp off; the CPU reference is the contract)
//   inv    = scale == 0 ? 0 : 1 / scale            fp32, IEEE division
//   q      = clamp(rint(x * inv), -7, 7)           rint = round half to even
//   code   = q + 8                                 two codes per byte, even index in the low nibble
//   value  = clamp(pow2_mul((code - 8) * scale, k)) fp32
//   sum    = value_0 + value_1 + ... + value_{N-1} fp32, rank order (the one-shot all-reduce; every rank gets
//                                                  the same bits because every rank adds in the same order)
//
// G is any even group size dividing 4096 here (the CUDA kernels take 8, 16, 32, 64, 128 or 256).
// Wire layout of a payload for `numel` values, ng = ceil(numel / G) groups (the last one zero-padded),
// ns = ceil(numel / 4096) super-blocks:
//   [0, ng*G/2)                      codes
//   [align16(ng*G/2), + 2*ng)        fp16 scales (little-endian)
//   [scales end, + 2*ns)             int16 super-block exponents k (little-endian)
//   total size aligned up to 16; padding bytes are zero.
//
// Multiplies, divides and adds go through mul_rn/div_rn/add_rn so that no compiler contracts `acc + c * s`
// into an FMA (one rounding instead of two would change the bits relative to the reference).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define TPC_HD __host__ __device__ __forceinline__
#else
#define TPC_HD inline
#endif

// -ffast-math lets the host compiler reassociate and flush subnormals: the payload bits would change.
#if defined(__FAST_MATH__) && !defined(__CUDA_ARCH__)
#error "int4_core.h must not be compiled with -ffast-math (the INT4 payload must match the reference bit for bit)"
#endif

namespace tpcomp {

constexpr int kInt4Qmax = 7;
constexpr int kInt4Zero = 8;
// NaN bits: the scale of a non-finite group is 0x7E00, as the reference writes it (masked_fill of an fp16 tensor
// with NaN). For decoded outputs only NaN-ness is part of the contract: torch itself writes different NaN bits
// on different paths (c10::Half keeps the sign and writes 0x7E00, c10::BFloat16 0x7FC0, its vectorized CPU
// kernels keep payload bits or write 0xFFFF); the core writes the c10 scalar ones.
constexpr uint16_t kHalfNaN = 0x7E00;
constexpr uint16_t kBf16NaN = 0x7FC0;
constexpr float kHalfMax = 65504.0f;
constexpr int kSuperValues = 4096;        // values per super-block (one int16 exponent each)
constexpr float kInt4Limit = 458528.0f;  // 7 * 65504: the top-binade limit of int4 with fp16 scales

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

// On the device the _rn intrinsics are never contracted or approximated (not even under --use_fast_math).
// On the host a volatile result forces the rounding of each operation on its own, whatever -ffp-contract says.
// TPC_PLAIN_HOST_OPS (the CPU codec library, kernels/cpu_codecs.cpp, always built with -ffp-contract=off) uses
// plain operators instead, which round one by one under that flag and, unlike volatile, let loops vectorize.
TPC_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#elif defined(TPC_PLAIN_HOST_OPS)
  return a * b;
#else
  volatile float r = a * b;
  return r;
#endif
}

TPC_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#elif defined(TPC_PLAIN_HOST_OPS)
  return a + b;
#else
  volatile float r = a + b;
  return r;
#endif
}

TPC_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#elif defined(TPC_PLAIN_HOST_OPS)
  return a / b;
#else
  volatile float r = a / b;
  return r;
#endif
}

// 2^e for e in [-126, 127], from its bits (exact).
TPC_HD float pow2_exact(int e) { return bits_as_float(static_cast<uint32_t>(e + 127) << 23); }

// Factors f1, f2 with (v * f1) * f2 = v * 2^e rounded once (scales.py pow2_mul): one fp32 power of two where
// it exists, else 2^127 then 2^(e-127), or 2^(e+126) then 2^-126 (only the last product can leave the normal
// range). e is clamped to [-252, 254].
TPC_HD void pow2_factors(int e, float* f1, float* f2) {
  e = e < -252 ? -252 : (e > 254 ? 254 : e);
  if (e > 127) {
    *f1 = pow2_exact(127);
    *f2 = pow2_exact(e - 127);
  } else if (e < -126) {
    *f1 = pow2_exact(e + 126);
    *f2 = pow2_exact(-126);
  } else {
    *f1 = 1.0f;
    *f2 = pow2_exact(e);
  }
}

struct Pow2 {
  float f1, f2;
};

TPC_HD Pow2 pow2_of(int e) {
  Pow2 p;
  pow2_factors(e, &p.f1, &p.f2);
  return p;
}

TPC_HD float pow2_apply(float v, Pow2 p) { return mul_rn(mul_rn(v, p.f1), p.f2); }

TPC_HD float pow2_mul(float v, int e) { return pow2_apply(v, pow2_of(e)); }

// Super-block exponent of scales.py choose_exponents: limit > 0 (narrow scale formats): the smallest k with
// amax <= limit * 2^k; limit <= 0 (wide formats): 0 for amax in [2^-64, 2^64), else floor(log2 amax). 0 for
// amax == 0. frexpf is exact on host and device.
TPC_HD int range_exponent(float amax, float limit) {
  if (!(amax > 0.0f)) return 0;
  int e;
  const float m = frexpf(amax, &e);
  if (limit <= 0.0f) return (amax >= 0x1p-64f && amax < 0x1p64f) ? 0 : e - 1;
  int le;
  const float lm = frexpf(limit, &le);
  return e - le + (m > lm ? 1 : 0);
}

// v clamped to [-top, top]; NaN stays NaN (the comparisons are false for it).
TPC_HD float clamp_abs(float v, float top) {
  v = v > top ? top : v;
  return v < -top ? -top : v;
}

// Round half to even under the default rounding mode (rintf is exact for that on host and device).
TPC_HD float rint_even(float v) { return rintf(v); }

// fp32 -> fp16 bits, round to nearest even, overflow to inf, like torch's float -> float16 conversion (NaN ->
// 0x7E00 with the input's sign, as c10::Half). Own bit manipulation so that host and device agree.
TPC_HD uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_as_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t mag = x & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint16_t>(sign | kHalfNaN);
  if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf (and inf)
  if (mag >= 0x38800000u) {                                             // normal half: >= 2^-14
    uint32_t r = (mag - 0x38000000u) >> 13;                             // rebias exponent 127 -> 15
    const uint32_t rem = mag & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is the right result
    return static_cast<uint16_t>(sign | r);
  }
  if (mag < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25 (2^-25 itself ties to even: 0)
  // Subnormal half: value / 2^-24 = m * 2^(e - 126) with the implicit bit in m, rounded half to even.
  const uint32_t e = mag >> 23;
  const uint32_t m = (mag & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14 .. 24
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;  // r == 0x400 is the smallest normal: correct bits
  return static_cast<uint16_t>(sign | r);
}

// fp16 bits -> fp32 (exact for every fp16 value).
TPC_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_as_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_as_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_as_float(sign);
  // Subnormal: man * 2^-24, exact in fp32 (10-bit integer times a power of two).
  const float v = mul_rn(static_cast<float>(man), 5.9604644775390625e-08f);
  return sign ? -v : v;
}

// fp32 -> bf16 bits, round to nearest even, like torch's float -> bfloat16 (every NaN -> 0x7FC0, as c10).
TPC_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = float_as_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return kBf16NaN;
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

TPC_HD float bf16_bits_to_float(uint16_t b) { return bits_as_float(static_cast<uint32_t>(b) << 16); }

TPC_HD bool is_finite(float v) { return (float_as_bits(v) & 0x7F800000u) != 0x7F800000u; }

TPC_HD float abs_f(float v) { return bits_as_float(float_as_bits(v) & 0x7FFFFFFFu); }

// Larger of a running maximum and |v| (NaN never wins: non-finite groups are flagged separately).
TPC_HD float amax_update(float amax, float v) {
  const float a = abs_f(v);
  return a > amax ? a : amax;
}

// Scale bits for a group with absolute maximum `amax` (`finite` false: the group holds NaN/Inf).
TPC_HD uint16_t int4_scale_bits(float amax, bool finite) {
  if (!finite) return kHalfNaN;
  float ideal = div_rn(amax, static_cast<float>(kInt4Qmax));
  if (ideal > kHalfMax) ideal = kHalfMax;
  return float_to_half_bits(ideal);
}

// 1 / scale, or 0 for a zero or NaN scale (all codes then become the zero code).
TPC_HD float int4_inverse_scale(uint16_t scale_bits) {
  const float s = half_bits_to_float(scale_bits);
  if (!(s == s) || s == 0.0f) return 0.0f;
  return div_rn(1.0f, s);
}

// Unsigned 4-bit code of one finite value.
TPC_HD uint32_t int4_code(float x, float inv) {
  float q = rint_even(mul_rn(x, inv));
  q = q < -kInt4Qmax ? static_cast<float>(-kInt4Qmax) : (q > kInt4Qmax ? static_cast<float>(kInt4Qmax) : q);
  return static_cast<uint32_t>(static_cast<int>(q) + kInt4Zero);
}

// Codes of two neighbours packed into one byte (even index in the low nibble); zero codes for a bad group.
TPC_HD uint8_t int4_pack_pair(float even, float odd, float inv, bool finite) {
  if (!finite) return static_cast<uint8_t>(kInt4Zero | (kInt4Zero << 4));
  return static_cast<uint8_t>(int4_code(even, inv) | (int4_code(odd, inv) << 4));
}

TPC_HD float int4_value(uint32_t code, float scale) {
  return mul_rn(static_cast<float>(static_cast<int>(code) - kInt4Zero), scale);
}

// Decode one payload byte (two values, scaled by 2^k of their super-block: `p`) and add it to a running sum:
// acc = first ? value : acc + value, each value clamped to [-top, top] first (top: the output dtype's largest
// finite value).
// Copying the first rank's values (instead of 0 + value) is what the torch collective does; for payloads our
// encoder writes the two agree bit for bit anyway (a decoded value is -0 only for a negative code with a zero
// scale, which the encoder never writes).
TPC_HD void int4_accumulate_byte(uint8_t byte, float scale, Pow2 p, float top, bool first, float* acc) {
  const float lo = clamp_abs(pow2_apply(int4_value(byte & 0xFu, scale), p), top);
  const float hi = clamp_abs(pow2_apply(int4_value(byte >> 4, scale), p), top);
  acc[0] = first ? lo : add_rn(acc[0], lo);
  acc[1] = first ? hi : add_rn(acc[1], hi);
}

// Largest amax of the finite groups of g values in x[0, n) (n a multiple of g): the super-block's amax.
TPC_HD float int4_finite_amax(const float* x, int n, int g) {
  float top = 0.0f;
  for (int o = 0; o < n; o += g) {
    float amax = 0.0f;
    bool finite = true;
    for (int i = o; i < o + g; ++i) {
      finite &= is_finite(x[i]);
      amax = amax_update(amax, x[i]);
    }
    if (finite && amax > top) top = amax;
  }
  return top;
}

// Quantize one group of `g` already normalized values (g even). Writes g/2 bytes to `codes` and returns the
// scale bits.
TPC_HD uint16_t int4_quantize_group(const float* x, int g, uint8_t* codes) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < g; ++i) {  // no early exit and `&`, not `&&`: the loop stays vectorizable on a CPU
    finite &= is_finite(x[i]);
    amax = amax_update(amax, x[i]);
  }
  const uint16_t scale = int4_scale_bits(amax, finite);
  const float inv = int4_inverse_scale(scale);
  for (int i = 0; i < g; i += 2) codes[i / 2] = int4_pack_pair(x[i], x[i + 1], inv, finite);
  return scale;
}

// Decode one group of `g` values (super-block exponent k) and add it to `acc` (first: overwrite), as
// int4_accumulate_byte.
TPC_HD void int4_accumulate_group(const uint8_t* codes, uint16_t scale_bits, int k, float top, int g, bool first,
                                  float* acc) {
  const float s = half_bits_to_float(scale_bits);
  const Pow2 p = pow2_of(k);
  for (int i = 0; i < g; i += 2) int4_accumulate_byte(codes[i / 2], s, p, top, first, acc + i);
}

TPC_HD int64_t int4_num_groups(int64_t numel, int g) { return (numel + g - 1) / g; }

TPC_HD int64_t int4_num_supers(int64_t numel) { return (numel + kSuperValues - 1) / kSuperValues; }

// Byte offset of the scales section (16-byte aligned, as PayloadLayout in codecs/base.py).
TPC_HD int64_t int4_scales_offset(int64_t ngroups, int g) { return (ngroups * (g / 2) + 15) / 16 * 16; }

// Byte offset of the exponents section: right after the scales (2-byte aligned, which they already are).
TPC_HD int64_t int4_exps_offset(int64_t ngroups, int g) { return int4_scales_offset(ngroups, g) + 2 * ngroups; }

// Total payload bytes (16-byte aligned end; 0 for an empty tensor), identical to PayloadLayout.nbytes.
TPC_HD int64_t int4_payload_nbytes(int64_t numel, int g) {
  const int64_t ngroups = int4_num_groups(numel, g);
  if (ngroups == 0) return 0;
  return (int4_exps_offset(ngroups, g) + 2 * int4_num_supers(numel) + 15) / 16 * 16;
}

}  // namespace tpcomp
