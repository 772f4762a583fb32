// FP8 E4M3 "fn" element conversions of the CPU codec library (kernels/cpu_codecs.cpp): fp32 -> bits (encode,
// round to nearest even) and bits -> fp32 (decode), scalar and eight lanes at a time. Every lane computes what
// the scalar function computes: the same bits. E4M3 "fn": bias 7, no Inf, 0x7F / 0xFF are NaN, largest 448.
#pragma once

#include <stdint.h>
#include <string.h>

#include "int4_core.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

namespace tpcomp_cpu {

constexpr float kE4m3Max = 448.0f;
constexpr uint32_t kF32NaNBits = 0x7FC00000u;  // what torch's masked_fill(nan) writes into an fp32 scale

// fp32 -> E4M3 "fn" bits, round to nearest even, for finite |f| <= 448 (the encoder clamps first). The sign of
// zero is kept, as torch's cast does.
inline uint8_t float_to_e4m3_bits(float f) {
  const uint32_t x = tpcomp::float_as_bits(f);
  const uint32_t sign = (x >> 24) & 0x80u;
  const uint32_t mag = x & 0x7FFFFFFFu;
  // >= 2^-6: normal; keep 3 of 23 mantissa bits, ties to even, rebias 127 -> 7 (wraps for subnormals: unused).
  const uint32_t normal = ((mag + 0x7FFFFu + ((mag >> 20) & 1u)) >> 20) - (120u << 3);
  // Subnormal: m * 2^-9, m = rint(|f| * 2^9) in 0..8 (8 is the smallest normal, whose bits are 0x08). Adding
  // 2^23 rounds a value in [0, 2^23) to an integer, half to even, and leaves it in the low mantissa bits: the
  // same result as rintf, without a call the vectorizer would not inline.
  const float shifted = tpcomp::bits_as_float(mag) * 512.0f + 8388608.0f;
  const uint32_t sub = tpcomp::float_as_bits(shifted) - 0x4B000000u;
  const uint32_t is_normal = 0u - static_cast<uint32_t>(mag >= 0x3C800000u);  // all ones or zero: a mask, not a branch
  return static_cast<uint8_t>(sign | (normal & is_normal) | (sub & ~is_normal));
}

// E4M3 bits -> fp32, exact: exponent field e and mantissa m; e > 0: (1 + m/8) 2^(e-7), rebuilt as fp32 bits
// (exponent e + 120, mantissa m << 20); e == 0: m * 2^-9 (m converted exactly, times a power of two); 0x7F/0xFF:
// NaN (0x7FC00000 with the code's sign). -0 for 0x80.
inline float e4m3_bits_to_float(uint8_t b) {
  const uint32_t mag = b & 0x7Fu;
  uint32_t bits;
  if (mag == 0x7Fu) {
    bits = kF32NaNBits;
  } else if (mag < 8u) {
    bits = tpcomp::float_as_bits(static_cast<float>(mag) * 0.001953125f);
  } else {
    bits = (mag << 20) + (120u << 23);
  }
  return tpcomp::bits_as_float(bits | (static_cast<uint32_t>(b & 0x80u) << 24));
}

#if defined(__GNUC__)
// Eight codes at once (GCC/Clang vector extensions: AVX on x86, two NEON registers on ARM), lane for lane the
// steps of e4m3_bits_to_float as selects instead of branches: no table, no per-byte lookup.
typedef float e4m3_v8f __attribute__((vector_size(32)));
typedef uint32_t e4m3_v8u __attribute__((vector_size(32)));
typedef int32_t e4m3_v8i __attribute__((vector_size(32)));
typedef uint8_t e4m3_v8b __attribute__((vector_size(8)));

inline e4m3_v8f e4m3_values8(const uint8_t* p) {
  e4m3_v8b raw;
  memcpy(&raw, p, sizeof raw);
  const e4m3_v8u b = __builtin_convertvector(raw, e4m3_v8u);
  const e4m3_v8u mag = b & 0x7Fu;
  const e4m3_v8u normal = (mag << 20) + (120u << 23);
  const e4m3_v8f sub = __builtin_convertvector((e4m3_v8i)mag, e4m3_v8f) * 0.001953125f;  // only used where mag < 8
  const e4m3_v8u nan = {kF32NaNBits, kF32NaNBits, kF32NaNBits, kF32NaNBits,
                        kF32NaNBits, kF32NaNBits, kF32NaNBits, kF32NaNBits};
  e4m3_v8u bits = mag < 8u ? (e4m3_v8u)sub : normal;
  bits = mag == 0x7Fu ? nan : bits;
  return (e4m3_v8f)(bits | ((b & 0x80u) << 24));
}
#define TPC_E4M3_VECTOR 1
#endif

#if defined(__AVX2__) && defined(__F16C__)
// Eight codes at once through fp16 (F16C): an E4M3 byte s eeee mmm placed as the fp16 bits s 0eeee mmm0000000 is
// the fp16 number (1 + m/8) 2^(e-15) (e > 0) or (m/8) 2^-14 (e == 0, an fp16 subnormal): the E4M3 value times
// 2^-8, exactly, for every byte but the NaN codes, whose exponent field is set to all ones (fp16 NaN, quiet
// after vcvtph2ps: 0x7FC00000 with the code's sign, as e4m3_bits_to_float). vcvtph2ps is exact; the caller
// multiplies by 2^8 (alone, or folded into the block scale where that product is exact).
inline __m256 e4m3_values8_scaled(const uint8_t* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i mag = _mm_and_si128(b, _mm_set1_epi16(0x7F));
  __m128i h = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
  h = _mm_or_si128(h, _mm_and_si128(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F)), _mm_set1_epi16(0x7C00)));
  return _mm256_cvtph_ps(h);
}

// E4M3 bits of 8 values t (int32 lanes, 0..255), after clamping t to [-448, 448]: max(t, -448) then min(., 448)
// (maxps/minps return the second operand unless the compare says otherwise, so -0 stays -0 as with the
// scalar ternaries; a NaN t becomes -448: callers overwrite such lanes). Then float_to_e4m3_bits with the same
// integer steps and the same separately rounded |t| * 512 + 2^23. Checked against the scalar code over all 2^32
// fp32 patterns of t.
inline __m256i e4m3_bits8(__m256 t) {
  const __m256i x = _mm256_castps_si256(_mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-kE4m3Max)), _mm256_set1_ps(kE4m3Max)));
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(x, 24), _mm256_set1_epi32(0x80));
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(mag, 20), _mm256_set1_epi32(1));
  const __m256i normal = _mm256_sub_epi32(
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32(0x7FFFF)), odd), 20),
      _mm256_set1_epi32(120 << 3));
  const __m256 shifted =
      _mm256_add_ps(_mm256_mul_ps(_mm256_castsi256_ps(mag), _mm256_set1_ps(512.0f)), _mm256_set1_ps(8388608.0f));
  const __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4B000000));
  const __m256i is_normal = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x3C7FFFFF));  // mag >= 2^-6 (mag >= 0)
  return _mm256_or_si256(sign, _mm256_blendv_epi8(sub, normal, is_normal));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// e4m3_bits8 on 16 lanes (AVX-512; the same operations, masks instead of vector blends): the FP8 encoder's
// element conversion on CPUs that have it.
inline __m512i e4m3_bits16(__m512 t) {
  const __m512i x =
      _mm512_castps_si512(_mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-kE4m3Max)), _mm512_set1_ps(kE4m3Max)));
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(x, 24), _mm512_set1_epi32(0x80));
  const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(mag, 20), _mm512_set1_epi32(1));
  const __m512i normal = _mm512_sub_epi32(
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(mag, _mm512_set1_epi32(0x7FFFF)), odd), 20),
      _mm512_set1_epi32(120 << 3));
  const __m512 shifted =
      _mm512_add_ps(_mm512_mul_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(512.0f)), _mm512_set1_ps(8388608.0f));
  const __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(0x4B000000));
  const __mmask16 is_normal = _mm512_cmpgt_epi32_mask(mag, _mm512_set1_epi32(0x3C7FFFFF));  // mag >= 2^-6
  return _mm512_or_si512(sign, _mm512_mask_blend_epi32(is_normal, sub, normal));
}

// e4m3_values8_scaled on 16 codes: the E4M3 values times 2^-8 in 16 fp32 lanes (vcvtph2ps on zmm, exact).
inline __m512 e4m3_values16_scaled(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi16(0x7F));
  __m256i h = _mm256_or_si256(_mm256_slli_epi16(mag, 7), _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
  h = _mm256_or_si256(h, _mm256_and_si256(_mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F)), _mm256_set1_epi16(0x7C00)));
  return _mm512_cvtph_ps(h);
}
#define TPC_E4M3_AVX512 1
#endif

}  // namespace tpcomp_cpu
