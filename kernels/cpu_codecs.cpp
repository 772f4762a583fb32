// Fused CPU codecs: one pass over memory per direction, byte-identical to the torch reference codecs.
//
// Formats (wire layouts are defined in Python, megatron_tpcomp/codecs/*.py; the caller passes the offset of the
// scales section so that the layout lives in one place):
//   int<N>:g<G>[:se4m3]   symmetric N-bit integers, N in 4, 5, 6, 8 (codecs/intx.py; INT4 arithmetic:
//                         int4_core.h), fp16 or e4m3 scale per group of G values, codes bit-packed as in
//                         codecs/bitpack.py (cpu_bitpack.h)
//   fp8-e4m3:b<B>:sfp32   E4M3 "fn" codes, fp32 scale per block of B values (codecs/fp8.py; cpu_e4m3.h)
//   either one +had:b<H>  randomized Hadamard rotation of blocks of H values before quantization
//                         (codecs/hadamard.py: v -> fwht(v * signs) * c, c = fp32(1/sqrt(H)); inverse
//                         w -> fwht(w) * c * signs; fwht = the in-place butterfly below, stage h = 1, 2, 4, ...)
//   any of these +chscale static per-channel powers of two (codecs/chscale.py): encode multiplies each input
//                         value by 2^e_c of its channel (c = index mod h) as it loads the tile (exact, as the
//                         reference's fp32 product); decode-sum forms the inner codec's fp32 sum (its values
//                         clamped to fp32's range, as the reference decodes the inner codec to fp32), multiplies
//                         it by 2^-e_c and clamps it to the output dtype's range before rounding to it once.
//
// Encode works one super-block of 4096 values at a time (codecs/scales.py, "Second level"; G and H must divide
// 4096): it reads the tile's input values (fp32/bf16/fp16) into a float buffer, rotates them in place (+had),
// takes the largest magnitude of each block once (block_maxima), derives the super-block exponent k from the
// largest finite one, and quantizes the blocks (on AVX2: eight at a time) with 2^-k folded into each block's
// amax and reciprocal (integers; exact, see kIntFoldMin) or applied to the tile first (other cases, rare). It writes
// codes, scales and the int16 exponent: the input is read once and the payload written once. +had's pre-rotation
// normalization 2^-j needs no look at the input unless the rotated maximum says it might be nonzero.
// Decode-sum reads the codes of each of N payloads tile by tile and adds the decoded values in fp32 in payload
// order (the one-shot all-reduce, every rank the same bits): without a rotation each value is pow2_mul(q * s,
// k_r) (2^k_r folded into the block scale where exact) clamped to the output dtype's finite range before it is
// added; with a rotation the values are scaled by 2^(k_r - K), K = max_r k_r, the sum is rotated back once (the
// rotation is linear: the reference defines it this way too), scaled by 2^K (folded into the rotation's
// constant where exact) and clamped. Then the output dtype is written, rounding once. Tiles are split over
// `nthreads` OpenMP threads.
//
// Built by megatron_tpcomp/backends/cpu.py with g++ -O3 -ffp-contract=off (never -ffast-math): every multiply and
// add is rounded on its own, exactly as torch's elementwise kernels do, so the bytes match the reference.
#define TPC_PLAIN_HOST_OPS 1
#include <stdint.h>
#include <string.h>

#include "cpu_bitpack.h"
#include "cpu_e4m3.h"
#include "int4_core.h"

// AVX2 + F16C (every x86 CPU with AVX2 has F16C; -march=native defines both): the integer encoder and decoder and
// the FP8 encoder work on eight groups / blocks at once (int_quantize8, int_accumulate8, fp8_quantize8 below)
// and the bf16/fp16 output conversion is vectorized. Without them (other ISAs, a baseline build) the scalar
// paths run; they stay in use for leftover groups and other block sizes.
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define TPC_INT4_AVX2 1
#endif

// The eight-group integer kernels are instantiated per width, scale format and group size: kept out of line
// (one call per 8 groups), so that the tile loops that call them stay small enough for the compiler to inline
// their small helpers (measured: with everything inlined, GCC stopped inlining block_maxima, fp8_codes32 and
// the stores, and the plain fp8 and int4 encoders lost 5-10%).
#if defined(__GNUC__)
#define TPC_NOINLINE __attribute__((noinline))
#else
#define TPC_NOINLINE
#endif

namespace {

using tpcomp::bf16_bits_to_float;
using tpcomp::float_as_bits;
using tpcomp::float_to_bf16_bits;
using tpcomp::float_to_half_bits;
using tpcomp::half_bits_to_float;

using namespace tpcomp_cpu;

constexpr int kMaxTile = 4096;  // = tpcomp::kSuperValues: one tile is one super-block
constexpr float kMinNormal = 1.17549435e-38f;  // 2^-126: smallest fp32 scale whose reciprocal is finite

enum DType { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum Format { kInt = 0, kFp8E4m3 = 1 };
enum ScaleFmt { kScaleF16 = 0, kScaleE4m3 = 1 };  // integer group scales

// ---------------------------------------------------------------------------------------------- element I/O

inline float load(const void* p, int dt, int64_t i) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  const uint16_t b = static_cast<const uint16_t*>(p)[i];
  return dt == kBF16 ? bf16_bits_to_float(b) : half_bits_to_float(b);
}

// Load values [start, start + n) of `x` into buf[0, n); the rest of buf[0, len) is zero (codec padding).
void load_tile(const void* x, int dt, int64_t start, int64_t n, float* buf, int len) {
  if (dt == kF32) {
    const float* p = static_cast<const float*>(x) + start;
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  } else if (dt == kBF16) {
    const uint16_t* p = static_cast<const uint16_t*>(x) + start;
    int64_t i = 0;
#if defined(TPC_INT4_AVX2) && defined(__AVX512F__)
    // 16 at a time: zero-extend to 32 bits and shift into the high half (bf16_bits_to_float, lane for lane).
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(buf + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))), 16)));
#endif
    for (; i < n; ++i) buf[i] = bf16_bits_to_float(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = load(x, dt, start + i);
  }
  for (int64_t i = n; i < len; ++i) buf[i] = 0.0f;
}

// +chscale: buf[0, n), the values start .. start + n of the flattened tensor, times f[c] of their channel
// c = index mod h (f: 2^e_c at encode, 2^-e_c at decode; one fp32 product each, as the reference's).
void channel_scale(const float* f, int h, int64_t start, int64_t n, float* buf) {
  int64_t c0 = start % h;
  for (int64_t i = 0; i < n;) {
    const int64_t len = n - i < h - c0 ? n - i : h - c0;
    float* b = buf + i;
    const float* g = f + c0;
    for (int64_t j = 0; j < len; ++j) b[j] = b[j] * g[j];
    i += len;
    c0 = 0;
  }
}

#if defined(TPC_INT4_AVX2)
// Output conversion of decode-sum, floats -> bf16 (16 at a time) / fp16 (8 at a time), lane for lane what
// float_to_bf16_bits / float_to_half_bits return (checked over all 2^32 fp32 bit patterns):
//   bf16  the same integer rounding, (x + 0x7FFF + ((x >> 16) & 1)) >> 16, and every NaN -> 0x7FC0
//   fp16  vcvtps2ph with imm 0 rounds to nearest even, with overflow to inf and subnormal halves, like the
//         scalar code; only NaN differs (vcvtps2ph keeps payload bits), so NaN lanes get sign | 0x7E00 as c10.
inline __m256i nan_lanes(__m256i x) {
  return _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
}

inline __m256i bf16_bits8(__m256 f) {  // 8 results in the low 16 bits of each int32 lane
  const __m256i x = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), odd), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(tpcomp::kBf16NaN), nan_lanes(x));
}

#if defined(__AVX512BW__)
// 16 lanes at once: the same integer rounding and NaN rule, narrowed with vpmovdw (truncation: every result
// fits in 16 bits).
inline void store16_bf16(const float* v, uint16_t* p) {
  const __m512i x = _mm512_castps_si512(_mm512_loadu_ps(v));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), odd), 16);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(x, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  const __m512i bits = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(tpcomp::kBf16NaN));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}
#else
inline void store16_bf16(const float* v, uint16_t* p) {
  // packus works per 128-bit half: [a 0-3, b 0-3 | a 4-7, b 4-7]; permute 64-bit units 0, 2, 1, 3 into order.
  const __m256i packed = _mm256_packus_epi32(bf16_bits8(_mm256_loadu_ps(v)), bf16_bits8(_mm256_loadu_ps(v + 8)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}
#endif

inline void store8_f16(const float* v, uint16_t* p) {
  const __m256i x = _mm256_castps_si256(_mm256_loadu_ps(v));
  const __m128i h = _mm256_cvtps_ph(_mm256_castsi256_ps(x), _MM_FROUND_TO_NEAREST_INT);
  const __m256i nan_bits = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x8000)),
                                           _mm256_set1_epi32(tpcomp::kHalfNaN));
  const __m256i nan = nan_lanes(x);
  // Narrow the int32 lanes to 16 bits: signed saturation keeps the all-ones mask lanes all ones, unsigned
  // saturation keeps 0x7E00 and 0xFE00 intact.
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
  const __m128i bits16 = _mm_packus_epi32(_mm256_castsi256_si128(nan_bits), _mm256_extracti128_si256(nan_bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_blendv_epi8(h, bits16, nan16));
}
#endif

// Write buf[0, n) as dtype `dt` at out[start, start + n), each value clamped to [-top, top] first (+inf: no
// clamp; NaN stays NaN).
void store_tile(float* buf, int64_t n, int dt, int64_t start, void* out, float top) {
  if (top < tpcomp::bits_as_float(0x7F800000u))
    for (int64_t i = 0; i < n; ++i) buf[i] = tpcomp::clamp_abs(buf[i], top);
  if (dt == kF32) {
    memcpy(static_cast<float*>(out) + start, buf, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  uint16_t* p = static_cast<uint16_t*>(out) + start;
  int64_t i = 0;
  if (dt == kBF16) {
#if defined(TPC_INT4_AVX2)
    for (; i + 16 <= n; i += 16) store16_bf16(buf + i, p + i);
#endif
    for (; i < n; ++i) p[i] = float_to_bf16_bits(buf[i]);
  } else {
#if defined(TPC_INT4_AVX2)
    for (; i + 8 <= n; i += 8) store8_f16(buf + i, p + i);
#endif
    for (; i < n; ++i) p[i] = float_to_half_bits(buf[i]);
  }
}

// ------------------------------------------------------------------------------------------------ rotation

struct Rotation {
  int block;           // 0: none
  const float* signs;  // [block], +-1
  float scale;         // fp32(1 / sqrt(block))
};

// In-place fast Walsh-Hadamard transform of v[0, n), n a power of two: stage h pairs v[j] and v[j + h].
inline void fwht(float* v, int n) {
  for (int h = 1; h < n; h <<= 1)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

#if defined(__GNUC__) && !defined(__clang__)
// The same butterflies on 8-float vectors (GCC vector extensions: AVX or two SSE registers, NEON on ARM).
// Stages h = 1, 2, 4 pair lanes inside a vector: w = v with the pairs swapped, then lane j keeps v + w (= a + b)
// where it holds the pair's first value and w - v (= a - b) where it holds the second. Stages h >= 8 pair whole
// vectors. Every lane computes exactly a + b or a - b of the scalar version: the same bits.
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

inline v8f lane_stage(v8f v, v8i swap, v8i pick) {
  const v8f w = __builtin_shuffle(v, swap);
  return __builtin_shuffle(v + w, w - v, pick);
}

inline void fwht_vec(float* p, int n) {
  const int nv = n / 8;
  v8f r[kMaxTile / 8];
  memcpy(r, p, sizeof(float) * static_cast<size_t>(n));
  const v8i swap1 = {1, 0, 3, 2, 5, 4, 7, 6}, pick1 = {0, 9, 2, 11, 4, 13, 6, 15};
  const v8i swap2 = {2, 3, 0, 1, 6, 7, 4, 5}, pick2 = {0, 1, 10, 11, 4, 5, 14, 15};
  const v8i swap4 = {4, 5, 6, 7, 0, 1, 2, 3}, pick4 = {0, 1, 2, 3, 12, 13, 14, 15};
  for (int i = 0; i < nv; ++i) r[i] = lane_stage(lane_stage(lane_stage(r[i], swap1, pick1), swap2, pick2), swap4, pick4);
  for (int h = 1; h < nv; h <<= 1)
    for (int i = 0; i < nv; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const v8f a = r[j], b = r[j + h];
        r[j] = a + b;
        r[j + h] = a - b;
      }
  memcpy(p, r, sizeof(float) * static_cast<size_t>(n));
}

// Small blocks (int4:g32+had rotates blocks of 32) with N known at compile time: the block stays in registers
// from the sign flip to the final scaling (no runtime-sized memcpy through the stack, no loop overhead per
// stage). The same operations in the same order per lane as rotate_forward / rotate_backward below: the same bits.
template <typename V>
inline V loadv(const float* p) {
  V r;
  memcpy(&r, p, sizeof r);  // fixed size: one unaligned vector load
  return r;
}
template <typename V>
inline void storev(float* p, V v) {
  memcpy(p, &v, sizeof v);
}

// The stages h >= lanes of a register-resident block of NV vectors: whole vectors pair (vector j with j + h).
template <typename V, int NV>
inline void butterflies_across(V* r) {
#pragma GCC unroll 8
  for (int h = 1; h < NV; h <<= 1)
#pragma GCC unroll 8
    for (int i = 0; i < NV; i += 2 * h)
#pragma GCC unroll 8
      for (int j = i; j < i + h; ++j) {
        const V a = r[j], b = r[j + h];
        r[j] = a + b;
        r[j + h] = a - b;
      }
}

template <int N>
inline void fwht_regs(v8f* r) {
  const v8i swap1 = {1, 0, 3, 2, 5, 4, 7, 6}, pick1 = {0, 9, 2, 11, 4, 13, 6, 15};
  const v8i swap2 = {2, 3, 0, 1, 6, 7, 4, 5}, pick2 = {0, 1, 10, 11, 4, 5, 14, 15};
  const v8i swap4 = {4, 5, 6, 7, 0, 1, 2, 3}, pick4 = {0, 1, 2, 3, 12, 13, 14, 15};
  constexpr int nv = N / 8;
#pragma GCC unroll 8
  for (int i = 0; i < nv; ++i) r[i] = lane_stage(lane_stage(lane_stage(r[i], swap1, pick1), swap2, pick2), swap4, pick4);
  butterflies_across<v8f, nv>(r);
}

#if defined(__AVX512F__)
#include <immintrin.h>
// Blocks of 16 values or more on AVX-512 (int4:g32+had: two registers per block): stages h = 1, 2, 4, 8 pair
// lanes inside a 16-float vector, stages h >= 16 pair whole vectors; half the instructions of the 8-float path.
typedef float v16f __attribute__((vector_size(64)));

// Stage h = 1 << s inside a vector: w = v with the pairs swapped; every lane gets v + w (= a + b where it holds
// the pair's first value a), then the lanes holding the second value b get w - v (= a - b) instead, a masked
// subtraction: three instructions, exactly the scalar a + b and a - b (NaN payloads included).
template <int S>
inline v16f lane_stage16(v16f v) {
  const __m512 x = reinterpret_cast<__m512>(v);
  __m512 w;
  if constexpr (S == 0) w = _mm512_permute_ps(x, 0xB1);             // lanes 1 0 3 2 in every 4
  if constexpr (S == 1) w = _mm512_permute_ps(x, 0x4E);             // lanes 2 3 0 1 in every 4
  if constexpr (S == 2) w = _mm512_shuffle_f32x4(x, x, 0xB1);       // 128-bit quarters 1 0 3 2
  if constexpr (S == 3) w = _mm512_shuffle_f32x4(x, x, 0x4E);       // 128-bit quarters 2 3 0 1
  constexpr __mmask16 second = S == 0 ? 0xAAAA : S == 1 ? 0xCCCC : S == 2 ? 0xF0F0 : 0xFF00;
  return reinterpret_cast<v16f>(_mm512_mask_sub_ps(_mm512_add_ps(x, w), second, w, x));
}

template <int N>
inline void fwht_regs(v16f* r) {
  constexpr int nv = N / 16;
#pragma GCC unroll 8
  for (int i = 0; i < nv; ++i) {
    r[i] = lane_stage16<3>(lane_stage16<2>(lane_stage16<1>(lane_stage16<0>(r[i]))));
  }
  butterflies_across<v16f, nv>(r);
}
typedef v16f vwide;  // the vector type of blocks of 16 values or more
#else
typedef v8f vwide;
#endif

// v <- fwht(v * signs) * c for each block of N values in buf[0, len), in vectors V (8 or 16 floats).
template <typename V, int N>
inline void rotate_forward_regs(float* buf, int len, const float* signs, float scale) {
  constexpr int L = sizeof(V) / sizeof(float), nv = N / L;
  const V c = V{} + scale;
  for (int o = 0; o < len; o += N) {
    V r[nv];
#pragma GCC unroll 8
    for (int i = 0; i < nv; ++i) r[i] = loadv<V>(buf + o + L * i) * loadv<V>(signs + L * i);
    fwht_regs<N>(r);
#pragma GCC unroll 8
    for (int i = 0; i < nv; ++i) storev(buf + o + L * i, r[i] * c);
  }
}

// w <- fwht(w) * c * signs for each block of N values in buf[0, len), then each result clamped to [-top, top] in
// registers (top = +inf: unchanged; NaN stays NaN: its comparisons are false). (w * c) * s is computed as one
// product w * (c * s): c * s is +-c exactly, and rounding to nearest is symmetric, so w * (-c) = -(w * c) to the
// bit (zeros' signs included); a NaN w comes out unchanged either way.
template <typename V, int N>
inline void rotate_backward_regs(float* buf, int len, const float* signs, float scale, float top) {
  constexpr int L = sizeof(V) / sizeof(float), nv = N / L;
  V cs[nv];
  for (int i = 0; i < nv; ++i) cs[i] = loadv<V>(signs + L * i) * scale;
  const V hi = V{} + top;
  const V lo = -hi;
  for (int o = 0; o < len; o += N) {
    V r[nv];
#pragma GCC unroll 8
    for (int i = 0; i < nv; ++i) r[i] = loadv<V>(buf + o + L * i);
    fwht_regs<N>(r);
#pragma GCC unroll 8
    for (int i = 0; i < nv; ++i) {
      V v = r[i] * cs[i];
      v = v > hi ? hi : v;
      v = v < lo ? lo : v;
      storev(buf + o + L * i, v);
    }
  }
}
#define TPC_FIXED_ROTATIONS 1
#endif

inline void fwht_any(float* v, int n) {
#if defined(__GNUC__) && !defined(__clang__)
  if (n >= 8 && n <= kMaxTile) {
    fwht_vec(v, n);
    return;
  }
#endif
  fwht(v, n);
}

void rotate_forward(float* buf, int len, const Rotation& r) {
#if defined(TPC_FIXED_ROTATIONS)
  switch (r.block) {
    case 8: rotate_forward_regs<v8f, 8>(buf, len, r.signs, r.scale); return;
    case 16: rotate_forward_regs<vwide, 16>(buf, len, r.signs, r.scale); return;
    case 32: rotate_forward_regs<vwide, 32>(buf, len, r.signs, r.scale); return;
    case 64: rotate_forward_regs<vwide, 64>(buf, len, r.signs, r.scale); return;
    case 128: rotate_forward_regs<vwide, 128>(buf, len, r.signs, r.scale); return;
    default: break;
  }
#endif
  for (int o = 0; o < len; o += r.block) {
    float* v = buf + o;
    for (int i = 0; i < r.block; ++i) v[i] = v[i] * r.signs[i];
    fwht_any(v, r.block);
    for (int i = 0; i < r.block; ++i) v[i] = v[i] * r.scale;
  }
}

// w <- clamp(fwht(w) * c * signs, top) for each block of r.block values in buf[0, len).
void rotate_backward(float* buf, int len, const Rotation& r, float top) {
#if defined(TPC_FIXED_ROTATIONS)
  switch (r.block) {
    case 8: rotate_backward_regs<v8f, 8>(buf, len, r.signs, r.scale, top); return;
    case 16: rotate_backward_regs<vwide, 16>(buf, len, r.signs, r.scale, top); return;
    case 32: rotate_backward_regs<vwide, 32>(buf, len, r.signs, r.scale, top); return;
    case 64: rotate_backward_regs<vwide, 64>(buf, len, r.signs, r.scale, top); return;
    case 128: rotate_backward_regs<vwide, 128>(buf, len, r.signs, r.scale, top); return;
    default: break;
  }
#endif
  for (int o = 0; o < len; o += r.block) {
    float* v = buf + o;
    fwht_any(v, r.block);
    for (int i = 0; i < r.block; ++i) v[i] = tpcomp::clamp_abs(v[i] * r.scale * r.signs[i], top);  // (v*c)*s
  }
}

// ------------------------------------------------------------------------------------------- group quantizers

struct ChannelScale {
  int h;               // channels (the last dimension); 0: no +chscale
  const float* up;     // [h] fp32 2^e_c: the input is multiplied by it before the codec
  const float* down;   // [h] fp32 2^-e_c: the decoded sum is multiplied by it
};

struct Codec {
  int format;           // Format
  int bits;             // kInt: 4, 5, 6 or 8
  int scale_fmt;        // kInt: ScaleFmt of the group scales (FP8: fp32)
  int block;            // values per scale (G or B)
  float scale_cap;      // fp8: cap of the ideal scale (fp32 max / (2 * 448), rounded to fp32)
  float range_limit;    // top-binade limit of the super-block exponent (0: the wide window rule)
  int64_t scales_offset;  // byte offset of the scales section in a payload
  int64_t exps_offset;    // byte offset of the int16 super-block exponents
  Rotation rot;
  ChannelScale ch;

  int qmax() const { return (1 << (bits - 1)) - 1; }
  int64_t code_bytes(int64_t nvalues) const { return format == kInt ? nvalues * bits / 8 : nvalues; }
  int scale_bytes() const { return format == kInt ? (scale_fmt == kScaleE4m3 ? 1 : 2) : 4; }
};

// Largest |v[i]| and whether all are finite, in one integer max over the magnitude bits: for non-negative floats
// the bit patterns order like the values, and Inf/NaN patterns are >= 0x7F800000. (A float max with a ternary does
// not vectorize without -ffast-math.) Equal to the core's amax_update loop for finite groups.
inline float abs_max(const float* v, int n, bool* finite) {
  uint32_t m = 0;
  for (int i = 0; i < n; ++i) {
    const uint32_t b = float_as_bits(v[i]) & 0x7FFFFFFFu;
    m = b > m ? b : m;
  }
  *finite = m < 0x7F800000u;
  return tpcomp::bits_as_float(m);
}

// The super-block exponent folded into the integer quantizers: they read the raw values v and a factor f = 2^-k
// (k in [-103, 110], see kIntFoldMin/Max), and compute what the reference computes on y = v * 2^-k:
//   amax_y = amax * f            max |v * f| is (max |v|) * f: rounding is monotonic and odd
//   codes  = rint(v * (inv * f)) inv * f is exact (a power of two times inv, inv in [2^-16, 2^24] for fp16
//                                scales and in [2^-9, 2^9] for e4m3 ones, stays normal), so v * (inv * f)
//                                rounds the same real number as (v * f) * inv; where v * f would be subnormal
//                                (|v| < 2^-126 * 2^k) both products are below 2^-102 and round to 0.
// f = 1 (k = 0) is the plain codec.
constexpr int kIntFoldMin = -103, kIntFoldMax = 110;

// Stored bits of a group scale (intx.py: ideal = amax / qmax, scales.encode_scales): fp16: round to nearest even
// of min(ideal, 65504), NaN 0x7E00; e4m3: E4M3 bits of min(ideal, 448), NaN 0x7F (`finite` false: the group
// holds NaN/Inf). `amax` is already times f.
inline uint32_t int_scale_bits(const Codec& c, float amax, bool finite) {
  const bool e4m3 = c.scale_fmt == kScaleE4m3;
  if (!finite) return e4m3 ? 0x7Fu : tpcomp::kHalfNaN;
  float ideal = amax / static_cast<float>(c.qmax());  // a true division, as codecs.base.divide
  const float cap = e4m3 ? kE4m3Max : tpcomp::kHalfMax;
  if (ideal > cap) ideal = cap;
  return e4m3 ? float_to_e4m3_bits(ideal) : tpcomp::float_to_half_bits(ideal);
}

// fp32 value of stored scale bits (scales.decode_scales; exact).
inline float int_scale_value(const Codec& c, uint32_t bits) {
  return c.scale_fmt == kScaleE4m3 ? e4m3_bits_to_float(static_cast<uint8_t>(bits))
                                   : half_bits_to_float(static_cast<uint16_t>(bits));
}

inline void store_scale(uint8_t* p, uint32_t bits, int nbytes) {
  if (nbytes == 1) {
    *p = static_cast<uint8_t>(bits);
  } else {
    const uint16_t b = static_cast<uint16_t>(bits);
    memcpy(p, &b, 2);
  }
}

inline uint32_t load_scale(const uint8_t* p, int nbytes) {
  if (nbytes == 1) return *p;
  uint16_t b;
  memcpy(&b, p, 2);
  return b;
}

// One group of an integer codec (intx.py, symmetric): q = clamp(rint(y * inv), -qmax, qmax), code = q + 2^(N-1),
// packed in bitpack.py's order; the codes formed in one loop and packed in another (vectorizable). A group with
// NaN/Inf gets the NaN scale and zero codes (q = 0). `amax_bits`: the group's largest magnitude bits
// (block_maxima; >= 0x7F800000 for a NaN/Inf group).
template <int G>  // G > 0: the group size known at compile time (loops unroll); 0: runtime `g`
inline void int_quantize_g(const Codec& c, const float* v, int g_runtime, uint32_t amax_bits, float f,
                           uint8_t* codes, uint8_t* scale) {
  const int g = G > 0 ? G : g_runtime;
  const bool finite = amax_bits < 0x7F800000u;
  const uint32_t sb = int_scale_bits(c, tpcomp::bits_as_float(amax_bits) * f, finite);
  store_scale(scale, sb, c.scale_bytes());
  const int zero = 1 << (c.bits - 1);
  const float qmax = static_cast<float>(c.qmax());
  if (!finite) {
    fill_zero_codes(codes, g, c.bits);
    return;
  }
  uint8_t q[kMaxTile];
  {
    const float s = int_scale_value(c, sb);
    const float inv = (s == 0.0f ? 0.0f : 1.0f / s) * f;
    for (int i = 0; i < g; ++i) {
      float r = rintf(v[i] * inv);
      r = r < -qmax ? -qmax : (r > qmax ? qmax : r);
      q[i] = static_cast<uint8_t>(static_cast<int>(r) + zero);
    }
  }
  pack_codes(q, g, c.bits, codes);
}

inline void int_quantize(const Codec& c, const float* v, uint32_t amax, float f, uint8_t* codes, uint8_t* scale) {
  switch (c.block) {
    case 32: int_quantize_g<32>(c, v, c.block, amax, f, codes, scale); return;
    case 64: int_quantize_g<64>(c, v, c.block, amax, f, codes, scale); return;
    case 128: int_quantize_g<128>(c, v, c.block, amax, f, codes, scale); return;
    default: int_quantize_g<0>(c, v, c.block, amax, f, codes, scale);
  }
}

// Scaling of one payload in one tile: each decoded value v becomes (v * f1) * f2 (= pow2_mul(v, e)), then it is
// clamped to [-top, top] (top = +inf: no clamp). `fold`: the factor may be applied to the block scale instead
// (s * f2 is exact and q * (s * f2) rounds the same real number as (q * s) * f2; integers: q * s is exact (at
// most 7 + 11 significant bits), fp16 scales times 2^e with e in [-102, 111] stay normal, and so do e4m3 ones
// (2^-9 .. 448); FP8: e == 0 only), which costs nothing per value.
struct Shift {
  float f1, f2, top;
  bool fold;
};

constexpr int kIntDecodeFoldMin = -102, kIntDecodeFoldMax = 111;

// Decode one integer group and add it to acc[0, g) (first: overwrite): value = float(code - zero) * scale, then
// shifted and clamped as `sh` says. Unpacking first, so that the arithmetic loop vectorizes.
inline void int_accumulate(const Codec& c, const uint8_t* codes, const uint8_t* scale, const Shift& sh, bool first,
                           float* acc) {
  const int g = c.block;
  const float s = int_scale_value(c, load_scale(scale, c.scale_bytes()));
  const float f1 = sh.f1, f2 = sh.f2, top = sh.top;
  int8_t q[kMaxTile];
  unpack_codes(codes, g, c.bits, q);
  float v[kMaxTile];
  if (sh.fold) {
    const float sf = s * f2;
    for (int i = 0; i < g; ++i) v[i] = tpcomp::clamp_abs(static_cast<float>(q[i]) * sf, top);
  } else {
    for (int i = 0; i < g; ++i) v[i] = tpcomp::clamp_abs(static_cast<float>(q[i]) * s * f1 * f2, top);
  }
  if (first) {
    for (int i = 0; i < g; ++i) acc[i] = v[i];
  } else {
    for (int i = 0; i < g; ++i) acc[i] = acc[i] + v[i];
  }
}

#if defined(TPC_INT4_AVX2)
// Eight consecutive groups at once: the per-group scalar work (absmax reduction, amax / qmax, the scale rounding,
// 1 / scale) runs once per 8 groups in the lanes of one vector, and the quantize/pack loop has no branch.
// Every lane does what the scalar path (int_quantize_g) does, with instructions that round identically:
//   absmax     the same integer max over the magnitude bits as abs_max (also tells NaN/Inf: bits >= 0x7F800000)
//   amax/qmax  vdivps: an IEEE division, correctly rounded like the scalar divss (no reciprocal trick)
//   fp16       min 65504 (equal to `if (ideal > 65504) ideal = 65504` for the non-NaN ideals of finite groups),
//              then vcvtps2ph with imm 0: round to nearest even, subnormal halves and underflow to +0 included,
//              as float_to_half_bits (ideal is in [0, 65504]: no overflow or NaN case; checked over every amax)
//   e4m3       e4m3_bits8 (clamp to 448 and the integer rounding of float_to_e4m3_bits), decoded back exactly
//              by e4m3_values8
//   1 / scale  vdivps; 0 where the scale is 0, as the scalar path
//   codes      clamp(x * inv) to [-qmax, qmax], then vcvtps2dq: rounds in the current rounding mode, as rintf
//              does (round half to even by default); clamping before rounding gives the same integer, since qmax
//              is an integer and rounding is monotonic. x * inv is never NaN for a finite group
// A group with NaN/Inf gets the NaN scale and zero codes, written after the fact: such groups are rare, so the
// common path carries no mask.
// `g` (= G when G > 0) is a multiple of 8; v holds 8 * g floats, codes gets g * N bytes, scales 16 (fp16) or 8
// (e4m3) bytes.

// Per-lane maximum of the magnitude bits of one group's g values: 8 partial maxima.
inline __m256i int4_group_absmax_bits(const float* v, int g) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)), magnitude);
  for (int i = 8; i < g; i += 8)
    m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i)), magnitude));
  return m;
}

// Lane j of the result: the maximum of the 8 lanes of a[j] (a transpose-and-max tree, 7 max instead of 56).
// Magnitude bits are non-negative int32, so a signed integer max orders them like the floats.
inline __m256i hmax8x8(const __m256i a[8]) {
  __m256i u[2];
  for (int h = 0; h < 2; ++h) {
    const __m256i* p = a + 4 * h;
    // Within each 128-bit half: max of lanes (0, 2) and (1, 3) of p0 and p1 side by side, then of the two pairs.
    const __m256i t01 = _mm256_max_epi32(_mm256_unpacklo_epi32(p[0], p[1]), _mm256_unpackhi_epi32(p[0], p[1]));
    const __m256i t23 = _mm256_max_epi32(_mm256_unpacklo_epi32(p[2], p[3]), _mm256_unpackhi_epi32(p[2], p[3]));
    u[h] = _mm256_max_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
    // u[h] = [max of p0..p3 over lanes 0-3 | max of p0..p3 over lanes 4-7]
  }
  return _mm256_max_epi32(_mm256_permute2x128_si256(u[0], u[1], 0x20), _mm256_permute2x128_si256(u[0], u[1], 0x31));
}

// The largest magnitude bits of eight consecutive groups of g values (g a multiple of 8), lane j for group j.
// G > 0: g known at compile time (the loops unroll).
template <int G = 0>
inline __m256i absmax8(const float* v, int g_runtime) {
  const int g = G > 0 ? G : g_runtime;
  __m256i partial[8];
  for (int j = 0; j < 8; ++j) partial[j] = int4_group_absmax_bits(v + j * g, g);
  return hmax8x8(partial);
}

// absmax8 for runs of eight blocks of g values over v[0, 8 n g): amax[0, 8 n).
template <int G>
inline void absmax8_runs(const float* v, int g, int runs, uint32_t* amax) {
  for (int l = 0; l < runs; ++l)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(amax + 8 * l), absmax8<G>(v + 8 * l * g, g));
}

// The low bytes of eight int32 lanes, in order.
inline void store_bytes8(__m256i x, uint8_t* p) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}

inline __m256 e4m3_scales8(const uint8_t* p) {
#if defined(TPC_E4M3_VECTOR)
  const e4m3_v8f v = e4m3_values8(p);
  __m256 r;
  memcpy(&r, &v, sizeof r);
  return r;
#else
  alignas(32) float s[8];
  for (int j = 0; j < 8; ++j) s[j] = e4m3_bits_to_float(p[j]);
  return _mm256_load_ps(s);
#endif
}

// `amax_bits`: absmax8 of the eight groups (block_maxima computed it for the super-block's exponent).
template <int G, int N, bool E4M3>
TPC_NOINLINE void int_quantize8_g(const float* v, int g_runtime, __m256i amax_bits, float f, uint8_t* codes,
                            uint8_t* scales) {
  const int g = G > 0 ? G : g_runtime;
  constexpr int kQmax = (1 << (N - 1)) - 1;
  const __m256i bad = _mm256_cmpgt_epi32(amax_bits, _mm256_set1_epi32(0x7F7FFFFF));  // NaN/Inf in the group
  const __m256 vf = _mm256_set1_ps(f);  // 2^-k, folded in as int_quantize_g does

  const __m256 ideal = _mm256_div_ps(_mm256_mul_ps(_mm256_castsi256_ps(amax_bits), vf),
                                     _mm256_set1_ps(static_cast<float>(kQmax)));
  __m256 s;
  if constexpr (E4M3) {
    const __m256i sb = e4m3_bits8(ideal);
    alignas(8) uint8_t sbytes[8];
    store_bytes8(sb, sbytes);
    s = e4m3_scales8(sbytes);
    store_bytes8(_mm256_blendv_epi8(sb, _mm256_set1_epi32(0x7F), bad), scales);
  } else {
    const __m128i half = _mm256_cvtps_ph(_mm256_min_ps(ideal, _mm256_set1_ps(tpcomp::kHalfMax)),
                                         _MM_FROUND_TO_NEAREST_INT);
    const __m128i bad16 = _mm_packs_epi32(_mm256_castsi256_si128(bad), _mm256_extracti128_si256(bad, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(scales),
                     _mm_blendv_epi8(half, _mm_set1_epi16(static_cast<short>(tpcomp::kHalfNaN)), bad16));
    s = _mm256_cvtph_ps(half);
  }
  const __m256 nonzero = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_NEQ_OQ);
  alignas(32) float inv[8];
  _mm256_store_ps(inv, _mm256_mul_ps(_mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), s), nonzero), vf));

  const __m256 lo = _mm256_set1_ps(-static_cast<float>(kQmax)), hi = _mm256_set1_ps(static_cast<float>(kQmax));
  // 8 * g values = g vectors of 8, packed 4 vectors (32 values, 4N bytes) at a time; vector k is in group k / (g / 8).
  const int vecs_per_group = g / 8;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  // Groups of 16 values or more: 16-value vectors, each inside one group; per lane the same product, clamp and
  // conversion as the 8-lane loop below.
  if constexpr (G >= 16) {
    const __m512 lo16 = _mm512_set1_ps(-static_cast<float>(kQmax)), hi16 = _mm512_set1_ps(static_cast<float>(kQmax));
    for (int k = 0; k < g; k += 4) {
      const __m512 t0 = _mm512_mul_ps(_mm512_loadu_ps(v + 8 * k), _mm512_set1_ps(inv[k / vecs_per_group]));
      const __m512 t1 = _mm512_mul_ps(_mm512_loadu_ps(v + 8 * k + 16), _mm512_set1_ps(inv[(k + 2) / vecs_per_group]));
      store_codes32<N>(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t0, lo16), hi16)),
                       _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(t1, lo16), hi16)), codes + k * N);
    }
  } else
#endif
  for (int k = 0; k < g; k += 4) {
    __m256i q[4];
    for (int u = 0; u < 4; ++u) {
      const __m256 inv_k = _mm256_broadcast_ss(inv + (k + u) / vecs_per_group);
      const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(v + 8 * (k + u)), inv_k);
      q[u] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(t, lo), hi));
    }
    store_codes32<N>(q[0], q[1], q[2], q[3], codes + k * N);
  }
  for (int m = _mm256_movemask_ps(_mm256_castsi256_ps(bad)); m != 0; m &= m - 1)
    fill_zero_codes(codes + __builtin_ctz(m) * (g * N / 8), g, N);
}

template <int N, bool E4M3>
inline void int_quantize8_n(const float* v, int g, __m256i amax, float f, uint8_t* codes, uint8_t* scales) {
  switch (g) {
    case 32: int_quantize8_g<32, N, E4M3>(v, g, amax, f, codes, scales); return;
    case 64: int_quantize8_g<64, N, E4M3>(v, g, amax, f, codes, scales); return;
    case 128: int_quantize8_g<128, N, E4M3>(v, g, amax, f, codes, scales); return;
    default: int_quantize8_g<0, N, E4M3>(v, g, amax, f, codes, scales);
  }
}

// Quantize groups v[0, 8g) (g a multiple of 8) into codes[0, g N) and the eight scales.
inline void int_quantize8(const Codec& c, const float* v, __m256i amax, float f, uint8_t* codes, uint8_t* scales) {
  const int g = c.block;
  if (c.scale_fmt == kScaleE4m3) {
    switch (c.bits) {
      case 4: int_quantize8_n<4, true>(v, g, amax, f, codes, scales); return;
      case 5: int_quantize8_n<5, true>(v, g, amax, f, codes, scales); return;
      case 6: int_quantize8_n<6, true>(v, g, amax, f, codes, scales); return;
      default: int_quantize8_n<8, true>(v, g, amax, f, codes, scales); return;
    }
  }
  switch (c.bits) {
    case 4: int_quantize8_n<4, false>(v, g, amax, f, codes, scales); return;
    case 5: int_quantize8_n<5, false>(v, g, amax, f, codes, scales); return;
    case 6: int_quantize8_n<6, false>(v, g, amax, f, codes, scales); return;
    default: int_quantize8_n<8, false>(v, g, amax, f, codes, scales); return;
  }
}

// The eight group scales of a run at `scales` into s[8] (times sh.f2 where the shift folds into them), and
// whether int_accumulate8_g must clamp: where the shift does not fold, or where qmax * |scale| exceeds top (a NaN
// scale takes the clamping path, which keeps it; top = +inf, the rotated codecs' accumulation, never clamps).
template <int N, bool E4M3>
inline bool group_scales8(const uint8_t* scales, const Shift& sh, float* s) {
  constexpr int kQmax = (1 << (N - 1)) - 1;
  __m256 raw;
  if constexpr (E4M3) {
    raw = e4m3_scales8(scales);
  } else {
    raw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales)));
  }
  const __m256 scaled = sh.fold ? _mm256_mul_ps(raw, _mm256_set1_ps(sh.f2)) : raw;
  _mm256_store_ps(s, scaled);
  if (!sh.fold) return true;
  if (!(sh.top < tpcomp::bits_as_float(0x7F800000u))) return false;
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), scaled);
  const __m256 over = _mm256_cmp_ps(_mm256_mul_ps(magnitude, _mm256_set1_ps(static_cast<float>(kQmax))),
                                    _mm256_set1_ps(sh.top), _CMP_NLE_UQ);
  return _mm256_movemask_ps(over) != 0;
}

// Decode eight consecutive groups and add them to acc[0, 8g) (first: overwrite), as int_accumulate does group
// by group: per value acc = acc + float(code - zero) * scale (or acc = float(code - zero) * scale), the same two
// roundings in the same order. The 8 fp16 scales convert in one vcvtph2ps, exact like half_bits_to_float
// (a signalling-NaN scale comes out quieted; the product with it is the same quiet NaN either way); e4m3 scales
// with e4m3_values8. Codes unpack 32 values at a time (load_codes32: minus the zero code as int8), widened to
// int32 and converted exactly to float.
// The clamp to [-top, top] is min(top, v) then max(-top, .): minps/maxps return their second operand when one
// is NaN, so a NaN value stays NaN, as clamp_abs and torch.clamp keep it.
template <int G, int N, bool E4M3>
TPC_NOINLINE void int_accumulate8_g(const uint8_t* codes, const uint8_t* scales, int g_runtime, const Shift& sh, bool first,
                              float* acc) {
  const int g = G > 0 ? G : g_runtime;
  alignas(32) float s[8];
  const bool fold = sh.fold;
  const bool clamp = group_scales8<N, E4M3>(scales, sh, s);
  const __m256 f1 = _mm256_set1_ps(sh.f1), f2 = _mm256_set1_ps(sh.f2);
  const __m256 top = _mm256_set1_ps(sh.top), bottom = _mm256_set1_ps(-sh.top);
  const int vecs_per_group = g / 8;
  // 8g values = g vectors of 8; vector k is in group k / (g / 8). values(k, v): v[u] = q * scale of vectors
  // k .. k + 3. The three loops below are the cases of (clamp, first) with no branch inside.
  const auto values = [&](int k, __m256* v) {
    __m128i q01, q23;
    load_codes32<N>(codes + k * N, &q01, &q23);
    const __m128i q[4] = {q01, _mm_srli_si128(q01, 8), q23, _mm_srli_si128(q23, 8)};
    for (int u = 0; u < 4; ++u)
      v[u] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[u])), _mm256_broadcast_ss(s + (k + u) / vecs_per_group));
  };
  __m256 v[4];
  if (!clamp && first) {
    for (int k = 0; k < g; k += 4) {
      values(k, v);
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(acc + 8 * (k + u), v[u]);
    }
  } else if (!clamp) {
    for (int k = 0; k < g; k += 4) {
      values(k, v);
      for (int u = 0; u < 4; ++u) {
        float* a = acc + 8 * (k + u);
        _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), v[u]));
      }
    }
  } else {
    for (int k = 0; k < g; k += 4) {
      values(k, v);
      for (int u = 0; u < 4; ++u) {
        __m256 value = v[u];
        if (!fold) value = _mm256_mul_ps(_mm256_mul_ps(value, f1), f2);
        value = _mm256_max_ps(bottom, _mm256_min_ps(top, value));
        float* a = acc + 8 * (k + u);
        _mm256_storeu_ps(a, first ? value : _mm256_add_ps(_mm256_loadu_ps(a), value));
      }
    }
  }
}

#if defined(__AVX512F__)
constexpr int kFusedPayloads = 16;  // payloads whose sum the fused decode loops keep in registers

// Eight consecutive groups (G >= 16) of all `count` payloads at once, when no payload needs int_accumulate8_g's
// clamp (the common case): the sum stays in registers 128 values at a time and is stored once, instead of one
// load and store of acc per payload. Per value the same product q * s_r and the same adds in payload order as
// `count` int_accumulate8_g calls (first: the product itself). Payload r's codes start at
// payloads + r * nbytes + code_offset, its eight scales at ... + scale_offset. Returns false, touching nothing,
// when some payload needs the general path.
template <int G, int N, bool E4M3>
TPC_NOINLINE bool int_accumulate8_fused(const uint8_t* payloads, int count, int64_t nbytes, int64_t code_offset,
                                       int64_t scale_offset, const Shift* shifts, float* acc) {
  static_assert(G >= 16 && (G % 128 == 0 || 128 % G == 0), "pieces of 128 values must split into whole vectors");
  if (count < 1 || count > kFusedPayloads) return false;
  alignas(64) float s[kFusedPayloads][8];
  for (int r = 0; r < count; ++r)
    if (group_scales8<N, E4M3>(payloads + r * nbytes + scale_offset, shifts[r], s[r])) return false;
  constexpr int kPiece = 128;
  // Payload r's 128 values from offset o as 8 vectors: x[i] = q * s_r, values o + 16 i .. o + 16 i + 15.
  const auto values = [&](int r, int o, __m512* x) {
    const uint8_t* codes = payloads + r * nbytes + code_offset + o * N / 8;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m128i q01, q23;
      load_codes32<N>(codes + 4 * N * j, &q01, &q23);
      const int v = o + 32 * j;
      x[2 * j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q01)), _mm512_set1_ps(s[r][v / G]));
      x[2 * j + 1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q23)), _mm512_set1_ps(s[r][(v + 16) / G]));
    }
  };
  for (int o = 0; o < 8 * G; o += kPiece) {
    __m512 a[8], x[8];
    values(0, o, a);
    for (int r = 1; r < count; ++r) {
      values(r, o, x);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) a[i] = _mm512_add_ps(a[i], x[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) _mm512_storeu_ps(acc + o + 16 * i, a[i]);
  }
  return true;
}

template <int N, bool E4M3>
inline bool int_accumulate8_fused_g(int g, const uint8_t* payloads, int count, int64_t nbytes, int64_t code_offset,
                                    int64_t scale_offset, const Shift* shifts, float* acc) {
  switch (g) {
    case 32: return int_accumulate8_fused<32, N, E4M3>(payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
    case 64: return int_accumulate8_fused<64, N, E4M3>(payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
    case 128: return int_accumulate8_fused<128, N, E4M3>(payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
    default: return false;
  }
}

// int_accumulate8_fused for the codec's width, scale format and group size (false where it has none).
inline bool int_accumulate8_all(const Codec& c, const uint8_t* payloads, int count, int64_t nbytes, int64_t b,
                                const Shift* shifts, float* acc) {
  const int64_t code_offset = b * c.code_bytes(c.block), scale_offset = c.scales_offset + b * c.scale_bytes();
  const int g = c.block;
  if (c.scale_fmt == kScaleE4m3) {
    switch (c.bits) {
      case 4: return int_accumulate8_fused_g<4, true>(g, payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
      case 5: return int_accumulate8_fused_g<5, true>(g, payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
      case 6: return int_accumulate8_fused_g<6, true>(g, payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
      default: return int_accumulate8_fused_g<8, true>(g, payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
    }
  }
  switch (c.bits) {
    case 4: return int_accumulate8_fused_g<4, false>(g, payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
    case 5: return int_accumulate8_fused_g<5, false>(g, payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
    case 6: return int_accumulate8_fused_g<6, false>(g, payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
    default: return int_accumulate8_fused_g<8, false>(g, payloads, count, nbytes, code_offset, scale_offset, shifts, acc);
  }
}
#endif

template <int N, bool E4M3>
inline void int_accumulate8_n(const uint8_t* codes, const uint8_t* scales, int g, const Shift& sh, bool first,
                              float* acc) {
  switch (g) {
    case 32: int_accumulate8_g<32, N, E4M3>(codes, scales, g, sh, first, acc); return;
    case 64: int_accumulate8_g<64, N, E4M3>(codes, scales, g, sh, first, acc); return;
    case 128: int_accumulate8_g<128, N, E4M3>(codes, scales, g, sh, first, acc); return;
    default: int_accumulate8_g<0, N, E4M3>(codes, scales, g, sh, first, acc);
  }
}

inline void int_accumulate8(const Codec& c, const uint8_t* codes, const uint8_t* scales, const Shift& sh, bool first,
                            float* acc) {
  const int g = c.block;
  if (c.scale_fmt == kScaleE4m3) {
    switch (c.bits) {
      case 4: int_accumulate8_n<4, true>(codes, scales, g, sh, first, acc); return;
      case 5: int_accumulate8_n<5, true>(codes, scales, g, sh, first, acc); return;
      case 6: int_accumulate8_n<6, true>(codes, scales, g, sh, first, acc); return;
      default: int_accumulate8_n<8, true>(codes, scales, g, sh, first, acc); return;
    }
  }
  switch (c.bits) {
    case 4: int_accumulate8_n<4, false>(codes, scales, g, sh, first, acc); return;
    case 5: int_accumulate8_n<5, false>(codes, scales, g, sh, first, acc); return;
    case 6: int_accumulate8_n<6, false>(codes, scales, g, sh, first, acc); return;
    default: int_accumulate8_n<8, false>(codes, scales, g, sh, first, acc); return;
  }
}

// FP8 E4M3 element conversion, 8 lanes per vector (AVX2; the same macro as the integer paths). Per lane the
// operations of quantize_block's two scalar loops: t = v * inv, then e4m3_bits8 (clamp and round; t is never
// NaN for a finite block).

// E4M3 codes of v[0, n) scaled by inv, 32 at a time; returns how many were done (n rounded down to 32).
inline int fp8_codes32(const float* v, int n, float inv, uint8_t* codes) {
  int i = 0;
#if defined(TPC_E4M3_AVX512)
  // 16 lanes per conversion, narrowed to bytes by vpmovdb (values 0..255: truncation is exact).
  const __m512 winv = _mm512_set1_ps(inv);
  for (; i + 32 <= n; i += 32) {
    const __m512i r0 = e4m3_bits16(_mm512_mul_ps(_mm512_loadu_ps(v + i), winv));
    const __m512i r1 = e4m3_bits16(_mm512_mul_ps(_mm512_loadu_ps(v + i + 16), winv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(r0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i + 16), _mm512_cvtepi32_epi8(r1));
  }
#else
  const __m256 vinv = _mm256_set1_ps(inv);
  for (; i + 32 <= n; i += 32) {
    const __m256i r0 = e4m3_bits8(_mm256_mul_ps(_mm256_loadu_ps(v + i), vinv));
    const __m256i r1 = e4m3_bits8(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8), vinv));
    const __m256i r2 = e4m3_bits8(_mm256_mul_ps(_mm256_loadu_ps(v + i + 16), vinv));
    const __m256i r3 = e4m3_bits8(_mm256_mul_ps(_mm256_loadu_ps(v + i + 24), vinv));
    // packus per 128-bit half: [r0 0-3, r1 0-3, r2 0-3, r3 0-3 | r0 4-7, ...]; dword permute back to value order.
    const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(r0, r1), _mm256_packus_epi32(r2, r3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i),
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
#endif
  return i;
}

// Eight consecutive fp8 blocks of b values (b a multiple of 32) at once: the per-block scale work runs in the
// lanes of one vector, each lane as quantize_block does it:
//   absmax       the integer max over the magnitude bits (int4_group_absmax_bits, hmax8x8), NaN/Inf: >= 0x7F800000
//   amax / 448   vdivps, correctly rounded like divss
//   cap          `if (s > cap) s = cap` as a compare and blend
//   tiny         0 < s < 2^-126 -> 2^-126
//   1 / s        vdivps; 0 where s == 0
// Non-finite blocks get the NaN scale and zero codes, written after the fact as in int_quantize8_g.
inline void fp8_quantize8(const float* v, int b, __m256i amax_bits, float scale_cap, uint8_t* codes,
                          uint8_t* scales) {
  const __m256i bad = _mm256_cmpgt_epi32(amax_bits, _mm256_set1_epi32(0x7F7FFFFF));
  __m256 s = _mm256_div_ps(_mm256_castsi256_ps(amax_bits), _mm256_set1_ps(kE4m3Max));
  const __m256 cap = _mm256_set1_ps(scale_cap);
  s = _mm256_blendv_ps(s, cap, _mm256_cmp_ps(s, cap, _CMP_GT_OQ));
  const __m256 tiny = _mm256_and_ps(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ),
                                    _mm256_cmp_ps(s, _mm256_set1_ps(kMinNormal), _CMP_LT_OQ));
  s = _mm256_blendv_ps(s, _mm256_set1_ps(kMinNormal), tiny);
  const __m256 nonzero = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_NEQ_OQ);
  alignas(32) float inv[8];
  _mm256_store_ps(inv, _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), s), nonzero));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(scales),
                      _mm256_blendv_epi8(_mm256_castps_si256(s), _mm256_set1_epi32(static_cast<int>(kF32NaNBits)), bad));
  for (int j = 0; j < 8; ++j) fp8_codes32(v + j * b, b, inv[j], codes + j * b);
  for (int m = _mm256_movemask_ps(_mm256_castsi256_ps(bad)); m != 0; m &= m - 1)
    memset(codes + __builtin_ctz(m) * b, 0, static_cast<size_t>(b));
}
#endif

inline void quantize_block(const Codec& c, const float* v, uint32_t amax_bits, float f, uint8_t* codes,
                           uint8_t* scale) {
  if (c.format == kInt) {
    int_quantize(c, v, amax_bits, f, codes, scale);
    return;
  }
  const bool finite = amax_bits < 0x7F800000u;
  const float amax = tpcomp::bits_as_float(amax_bits);
  uint32_t stored_bits;
  float inv = 0.0f;
  if (!finite) {
    stored_bits = kF32NaNBits;
  } else {
    float s = amax / kE4m3Max;  // true division, as codecs.base.divide
    if (s > c.scale_cap) s = c.scale_cap;
    if (s > 0.0f && s < kMinNormal) s = kMinNormal;  // scales.py "tiny scales"
    stored_bits = float_as_bits(s);
    inv = s == 0.0f ? 0.0f : 1.0f / s;
  }
  memcpy(scale, &stored_bits, 4);
  if (!finite) {
    memset(codes, 0, static_cast<size_t>(c.block));
    return;
  }
  int done = 0;
#if defined(TPC_INT4_AVX2)
  done = fp8_codes32(v, c.block, inv, codes);
#endif
  float q[kMaxTile];  // two straight-line loops: the compiler vectorizes each (one fused loop it does not)
  const int n = c.block;  // a local bound: stores through uint8_t* may alias `c`, which blocks vectorizing
  for (int i = done; i < n; ++i) {
    const float t = v[i] * inv;
    const float lo = t < -kE4m3Max ? -kE4m3Max : t;
    q[i] = lo > kE4m3Max ? kE4m3Max : lo;
  }
  for (int i = done; i < n; ++i) codes[i] = float_to_e4m3_bits(q[i]);
}

// FP8 block: acc[0, B) = (first ? 0 : acc) + clamp(((e4m3(code) * s) * f1) * f2, top), eight codes at a time
// (bit operations, no table), the scalar conversion for a tail of fewer than 8.
inline void fp8_accumulate(const Codec& c, const uint8_t* codes, const uint8_t* scale, const Shift& sh, bool first,
                           float* acc) {
  float s;
  memcpy(&s, scale, 4);
  const float f1 = sh.f1, f2 = sh.f2, top = sh.top;
  const int n = c.block;
  const bool plain = sh.fold && 448.0f * tpcomp::abs_f(s) <= top;  // f1 = f2 = 1, no value can pass top
  int i = 0;
#if defined(TPC_INT4_AVX2)
  // e4m3_values8_scaled gives value * 2^-8; value * s = (that * 2^8) * s, and = that * (s * 2^8) where s * 2^8
  // is exact (always, unless it overflows: a power of two times a finite float, subnormals included; NaN and
  // Inf scales stay NaN and Inf): one multiply per value, as the table decode had.
  const float s8 = s * 256.0f;
  const bool fold8 = !(tpcomp::is_finite(s) && !tpcomp::is_finite(s8));
  const __m256 vs = _mm256_set1_ps(fold8 ? s8 : s), v256 = _mm256_set1_ps(fold8 ? 1.0f : 256.0f);
  const __m256 vf1 = _mm256_set1_ps(f1), vf2 = _mm256_set1_ps(f2);
  const __m256 hi = _mm256_set1_ps(top), lo = _mm256_set1_ps(-top);
  if (plain && fold8) {
#if defined(TPC_E4M3_AVX512)
    const __m512 ws = _mm512_set1_ps(s8);
    if (first) {
      for (; i + 16 <= n; i += 16) _mm512_storeu_ps(acc + i, _mm512_mul_ps(e4m3_values16_scaled(codes + i), ws));
    } else {
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i),
                                                _mm512_mul_ps(e4m3_values16_scaled(codes + i), ws)));
    }
#endif
    if (first) {
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_mul_ps(e4m3_values8_scaled(codes + i), vs));
    } else {
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i),
                                                _mm256_mul_ps(e4m3_values8_scaled(codes + i), vs)));
    }
  } else {
    for (; i + 8 <= n; i += 8) {
      __m256 v = e4m3_values8_scaled(codes + i);
      if (!fold8) v = _mm256_mul_ps(v, v256);
      v = _mm256_mul_ps(v, vs);
      if (!plain) {
        v = _mm256_mul_ps(_mm256_mul_ps(v, vf1), vf2);
        v = _mm256_max_ps(lo, _mm256_min_ps(hi, v));  // NaN stays NaN (minps/maxps return the second operand)
      }
      _mm256_storeu_ps(acc + i, first ? v : _mm256_add_ps(_mm256_loadu_ps(acc + i), v));
    }
  }
#elif defined(TPC_E4M3_VECTOR)
  const e4m3_v8f hi = {top, top, top, top, top, top, top, top};
  const e4m3_v8f lo = -hi;
  for (; i + 8 <= n; i += 8) {
    e4m3_v8f v = e4m3_values8(codes + i) * s;
    if (!plain) {
      v = v * f1 * f2;
      v = v > hi ? hi : v;  // NaN stays NaN: its comparisons are false
      v = v < lo ? lo : v;
    }
    if (!first) {
      e4m3_v8f a;
      memcpy(&a, acc + i, sizeof a);
      v = a + v;
    }
    memcpy(acc + i, &v, sizeof v);
  }
#endif
  for (; i < n; ++i) {
    float v = e4m3_bits_to_float(codes[i]) * s;
    if (!plain) v = tpcomp::clamp_abs(v * f1 * f2, top);
    acc[i] = first ? v : acc[i] + v;
  }
}

#if defined(TPC_E4M3_AVX512)
// FP8 block b of all `count` payloads at once, when every payload takes fp8_accumulate's plain, folded path (the
// common case): per value the same products (e4m3 * 2^-8) * (s_r * 2^8) and the same adds in payload order as
// `count` fp8_accumulate calls, with the running sum in a register instead of acc (one store per value instead of
// one load and store per payload). Returns false, touching nothing, when some payload needs the general path.
inline bool fp8_accumulate_fused(const Codec& c, const uint8_t* payloads, int count, int64_t nbytes, int64_t b,
                                 const Shift* shifts, float* acc) {
  if (count > kFusedPayloads || c.block % 16 != 0) return false;
  float s8[kFusedPayloads];
  for (int r = 0; r < count; ++r) {
    float s;
    memcpy(&s, payloads + r * nbytes + c.scales_offset + b * 4, 4);
    const Shift& sh = shifts[r];
    const bool plain = sh.fold && 448.0f * tpcomp::abs_f(s) <= sh.top;
    s8[r] = s * 256.0f;
    const bool fold8 = !(tpcomp::is_finite(s) && !tpcomp::is_finite(s8[r]));
    if (!plain || !fold8) return false;
  }
  const uint8_t* codes = payloads + b * c.block;
  for (int i = 0; i < c.block; i += 16) {
    __m512 v = _mm512_mul_ps(e4m3_values16_scaled(codes + i), _mm512_set1_ps(s8[0]));
    for (int r = 1; r < count; ++r)
      v = _mm512_add_ps(v, _mm512_mul_ps(e4m3_values16_scaled(codes + r * nbytes + i), _mm512_set1_ps(s8[r])));
    _mm512_storeu_ps(acc + i, v);
  }
  return true;
}
#endif

// acc[0, block) = (first ? 0 : acc) + decoded block (first copies, as the reference's decode-then-add does).
inline void accumulate_block(const Codec& c, const uint8_t* codes, const uint8_t* scale, const Shift& sh, bool first,
                             float* acc) {
  if (c.format == kInt) {
    int_accumulate(c, codes, scale, sh, first, acc);
    return;
  }
  fp8_accumulate(c, codes, scale, sh, first, acc);
}
int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// One super-block: lcm(block, rotation block, 4096); the library takes the formats where that is 4096.
int tile_values(const Codec& c) {
  const int br = c.rot.block ? c.block / gcd(c.block, c.rot.block) * c.rot.block : c.block;
  return br / gcd(br, kMaxTile) * kMaxTile;
}

// Values the quantizer sees: the input, zero-padded to the rotation block when there is one.
int64_t inner_numel(const Codec& c, int64_t numel) {
  return c.rot.block ? (numel + c.rot.block - 1) / c.rot.block * c.rot.block : numel;
}

int threads_for(int64_t numel, int nthreads) {
  // Below ~64K values a parallel region costs more than it saves.
  return numel < (1 << 16) || nthreads < 1 ? 1 : nthreads;
}

// Largest magnitude bits among the finite values of v[0, n) (non-finite values count as 0).
inline uint32_t finite_amax_bits(const float* v, int n) {
  uint32_t m = 0;
  for (int i = 0; i < n; ++i) {
    uint32_t b = float_as_bits(v[i]) & 0x7FFFFFFFu;
    b = b < 0x7F800000u ? b : 0u;
    m = b > m ? b : m;
  }
  return m;
}

// v[0, n) *= 2^e as scales.pow2_mul: (v * f1) * f2 (f1 = 1 is skipped: v * 1 is v).
inline void scale_by_pow2(float* v, int n, int e) {
  float f1, f2;
  tpcomp::pow2_factors(e, &f1, &f2);
  if (f1 != 1.0f)
    for (int i = 0; i < n; ++i) v[i] = v[i] * f1;
  for (int i = 0; i < n; ++i) v[i] = v[i] * f2;
}

// Largest finite value of an output dtype: what decoded values are clamped to.
inline float dtype_max(int dt) {
  if (dt == kF32) return 3.40282347e38f;
  return dt == kBF16 ? tpcomp::bf16_bits_to_float(0x7F7Fu) : tpcomp::kHalfMax;
}

inline Shift shift_of(const Codec& c, int e, float top) {
  Shift sh{1.0f, 1.0f, top, false};
  tpcomp::pow2_factors(e, &sh.f1, &sh.f2);
  sh.fold = c.format == kInt ? (e >= kIntDecodeFoldMin && e <= kIntDecodeFoldMax) : e == 0;
  return sh;
}

inline int16_t load_exponent(const uint8_t* payload, const Codec& c, int64_t t) {
  int16_t k;
  memcpy(&k, payload + c.exps_offset + 2 * t, 2);
  return k;
}

// Magnitude bits bounding the pre-rotation proxy of encode(): 2^-57 and 2^57.
constexpr uint32_t kProxyLow = (127u - 57u) << 23, kProxyHigh = (127u + 57u) << 23;

// amax[l] = the largest magnitude bits of block l of v (nbt blocks of c.block values; >= 0x7F800000 for a block
// with NaN/Inf, which sets *bad). Returns the largest among the finite blocks (scales.super_amax).
inline uint32_t block_maxima(const Codec& c, const float* v, int nbt, uint32_t* amax, bool* bad) {
  int l = 0;
#if defined(TPC_INT4_AVX2)
  if (c.block % 8 == 0) {
    const int runs = nbt / 8;
    switch (c.block) {
      case 32: absmax8_runs<32>(v, 32, runs, amax); break;
      case 64: absmax8_runs<64>(v, 64, runs, amax); break;
      case 128: absmax8_runs<128>(v, 128, runs, amax); break;
      default: absmax8_runs<0>(v, c.block, runs, amax);
    }
    l = 8 * runs;
  }
#endif
  for (; l < nbt; ++l) {
    bool finite;
    amax[l] = float_as_bits(abs_max(v + l * c.block, c.block, &finite));
  }
  uint32_t top = 0;
  bool any_bad = false;
  l = 0;
#if defined(TPC_INT4_AVX2)
  // Eight blocks at a time: the largest finite maximum (magnitude bits order like the values, as signed int32)
  // and whether any block holds NaN/Inf (bits >= 0x7F800000).
  {
    const __m256i inf = _mm256_set1_epi32(0x7F800000);
    __m256i best = _mm256_setzero_si256(), nonfinite = _mm256_setzero_si256();
    for (; l + 8 <= nbt; l += 8) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(amax + l));
      const __m256i finite = _mm256_cmpgt_epi32(inf, a);
      best = _mm256_max_epi32(best, _mm256_and_si256(a, finite));
      nonfinite = _mm256_or_si256(nonfinite, _mm256_andnot_si256(finite, _mm256_set1_epi32(-1)));
    }
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), best);
    for (int j = 0; j < 8; ++j) top = lanes[j] > top ? lanes[j] : top;
    any_bad = !_mm256_testz_si256(nonfinite, nonfinite);
  }
#endif
  for (; l < nbt; ++l) {
    const uint32_t a = amax[l];
    const bool finite = a < 0x7F800000u;
    any_bad |= !finite;
    top = finite && a > top ? a : top;
  }
  *bad = any_bad;
  return top;
}

// Tile of the encode loop: one super-block (tile_values), whose exponent must be known before its blocks are
// quantized. It holds a multiple of 8 integer groups or FP8 blocks for blocks up to 512 (int_quantize8 and
// fp8_quantize8 take 8 at a time).
int work_tile_values(const Codec& c) { return tile_values(c); }

// Tile of the decode loop: lcm(block, rotation block) (256 values at least), times the smallest factor that
// makes it hold 8 integer groups or FP8 blocks (int_accumulate8); it divides 4096, so a tile lies inside one
// super-block. Smaller than a super-block: the accumulator stays small in L1 (measured: 4096-value tiles
// decode about 15% slower). The tile only decides how the work is cut: the bits do not depend on it.
int decode_tile_values(const Codec& c) {
  const int base = c.rot.block ? c.block / gcd(c.block, c.rot.block) * c.rot.block
                               : (c.block < 256 ? 256 / c.block * c.block : c.block);
  const int eight = 8 * c.block;
  const int scaled = base / gcd(base, eight) * eight;
  return scaled <= kMaxTile ? scaled : base;
}

void encode(const Codec& c, const void* x, int dt, int64_t numel, uint8_t* payload, int nthreads) {
  const int64_t inner = inner_numel(c, numel);
  const int64_t nblocks = (inner + c.block - 1) / c.block;
  const int tile = work_tile_values(c);
  const int64_t ntiles = (nblocks * c.block + tile - 1) / tile;
  uint8_t* scales = payload + c.scales_offset;
#pragma omp parallel for schedule(static) num_threads(threads_for(numel, nthreads))
  for (int64_t t = 0; t < ntiles; ++t) {
    float buf[kMaxTile];
    const int64_t start = t * tile;
    const int64_t avail = numel - start < tile ? (numel - start > 0 ? numel - start : 0) : tile;
    // Values of this tile the quantizer sees: whole blocks up to the (padded) end of the input.
    const int64_t blocks_here = nblocks - start / c.block < tile / c.block ? nblocks - start / c.block : tile / c.block;
    const int used = static_cast<int>(blocks_here) * c.block;
    const int nbt = static_cast<int>(blocks_here);
    const int rot_len = static_cast<int>((avail + c.rot.block - 1) / (c.rot.block ? c.rot.block : 1) *
                                         (c.rot.block ? c.rot.block : 1));
    load_tile(x, dt, start, avail, buf, tile);
    if (c.ch.h) channel_scale(c.ch.up, c.ch.h, start, avail, buf);
    if (c.rot.block) {
      rotate_forward(buf, rot_len, c.rot);
      // Values past the rotated input are the inner codec's zero padding (+0: fp8 keeps the sign of a zero).
      for (int64_t i = inner - start > 0 ? inner - start : 0; i < tile; ++i) buf[i] = 0.0f;
    }
    // Per-block maxima, computed once: they give the super-block's exponent and then the blocks' scales.
    uint32_t amax[kMaxTile / 2];
    bool bad = false;
    uint32_t top = block_maxima(c, buf, nbt, amax, &bad);
    int j = 0;
    if (c.rot.block && (bad || (top != 0 && (top < kProxyLow || top >= kProxyHigh)))) {
      // Pre-rotation normalization (codecs/hadamard.py): j from the largest finite |x| of the super-block. The
      // common case needs no look at the input: with every rotated block finite and its largest value in
      // [2^-57, 2^57), the input's largest is within sqrt(H) <= 2^6 of it (|Rv|max <= |v|2 <= sqrt(H) |v|max
      // and |v|max <= |v|2 = |Rv|2 <= sqrt(H) |Rv|max), inside [2^-64, 2^64): j = 0. Otherwise redo the tile.
      load_tile(x, dt, start, avail, buf, tile);
      if (c.ch.h) channel_scale(c.ch.up, c.ch.h, start, avail, buf);
      j = tpcomp::range_exponent(tpcomp::bits_as_float(finite_amax_bits(buf, static_cast<int>(avail))), 0.0f);
      if (j != 0) scale_by_pow2(buf, rot_len, -j);
      rotate_forward(buf, rot_len, c.rot);
      for (int64_t i = inner - start > 0 ? inner - start : 0; i < tile; ++i) buf[i] = 0.0f;
      top = block_maxima(c, buf, nbt, amax, &bad);
    }
    const int k = tpcomp::range_exponent(tpcomp::bits_as_float(top), c.range_limit);
    float f = 1.0f;  // 2^-k folded into the INT4 quantizers; otherwise the tile is scaled first (exactly)
    if (k != 0) {
      if (c.format == kInt && k >= kIntFoldMin && k <= kIntFoldMax) {
        f = tpcomp::pow2_exact(-k);
      } else {
        scale_by_pow2(buf, used, -k);
        block_maxima(c, buf, nbt, amax, &bad);
      }
    }
    const int16_t stored = static_cast<int16_t>(k + j);
    memcpy(payload + c.exps_offset + 2 * t, &stored, 2);
    const int64_t b0 = start / c.block;
    for (int l = 0; l < nbt;) {
      const int64_t b = b0 + l;
      const int o = l * c.block;
#if defined(TPC_INT4_AVX2)
      if (c.format == kInt && c.block % 8 == 0 && l + 8 <= nbt) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(amax + l));
        int_quantize8(c, buf + o, a, f, payload + b * c.code_bytes(c.block), scales + b * c.scale_bytes());
        l += 8;
        continue;
      }
      if (c.format == kFp8E4m3 && c.block % 32 == 0 && l + 8 <= nbt) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(amax + l));
        fp8_quantize8(buf + o, c.block, a, c.scale_cap, payload + b * c.block, scales + b * 4);
        l += 8;
        continue;
      }
#endif
      quantize_block(c, buf + o, amax[l], f, payload + b * c.code_bytes(c.block), scales + b * c.scale_bytes());
      ++l;
    }
  }
}

constexpr int kMaxCount = 1 << 20;  // payloads per decode-sum (the collectives' world sizes are far below)

void decode_sum(const Codec& c, const uint8_t* payloads, int count, int64_t nbytes, int64_t numel, void* out, int dt,
                int nthreads) {
  const int64_t inner = inner_numel(c, numel);
  const int64_t nblocks = (inner + c.block - 1) / c.block;
  const int tile = decode_tile_values(c);
  const int64_t ntiles = (nblocks * c.block + tile - 1) / tile;
  const float inf = tpcomp::bits_as_float(0x7F800000u);
  // +chscale: the inner codec's sum is formed as its decode to fp32 (values clamped to fp32's range); the channel
  // scaling and the clamp to the output dtype's range follow.
  const float top = c.ch.h ? dtype_max(kF32) : dtype_max(dt);
  const float out_top = c.ch.h ? dtype_max(dt) : inf;
#pragma omp parallel for schedule(static) num_threads(threads_for(numel * count, nthreads))
  for (int64_t t = 0; t < ntiles; ++t) {
    float acc[kMaxTile];
    const int64_t start = t * tile;
    const int64_t super = start / kMaxTile;  // the super-block this tile lies in
    // Rotated codecs add the payloads at the common exponent K = max_r k_r and clamp the sum; the others clamp
    // each payload's values at its own exponent.
    int common = -32768, lowest = 32767;
    if (c.rot.block)
      for (int r = 0; r < count; ++r) {
        const int k = load_exponent(payloads + r * nbytes, c, super);
        common = k > common ? k : common;
        lowest = k < lowest ? k : lowest;
      }
#if defined(__AVX512F__)
    // Each payload's shift for this tile (its exponent is the super-block's), for the fused all-payload paths.
    const bool fusable = count <= kFusedPayloads;
    Shift shifts[kFusedPayloads];
    for (int r = 0; fusable && r < count; ++r) {
      const int k = load_exponent(payloads + r * nbytes, c, super);
      shifts[r] = c.rot.block ? shift_of(c, k - common, inf) : shift_of(c, k, top);
    }
#endif
    int len = 0;
    for (int o = 0; o < tile;) {
      const int64_t b = (start + o) / c.block;
      if (b >= nblocks) break;
#if defined(TPC_INT4_AVX2)
      // Eight groups at a time, payloads in order 0..count-1 for each: every value sees the same adds.
      if (c.format == kInt && c.block % 8 == 0 && o + 8 * c.block <= tile && b + 8 <= nblocks) {
#if defined(__AVX512F__)
        if (fusable && int_accumulate8_all(c, payloads, count, nbytes, b, shifts, acc + o)) {
          o += 8 * c.block;
          len = o;
          continue;
        }
#endif
        for (int r = 0; r < count; ++r) {
          const uint8_t* p = payloads + r * nbytes;
          const int k = load_exponent(p, c, super);
          const Shift sh = c.rot.block ? shift_of(c, k - common, inf) : shift_of(c, k, top);
          int_accumulate8(c, p + b * c.code_bytes(c.block), p + c.scales_offset + b * c.scale_bytes(), sh, r == 0,
                          acc + o);
        }
        o += 8 * c.block;
        len = o;
        continue;
      }
#endif
#if defined(TPC_E4M3_AVX512)
      if (c.format == kFp8E4m3 && fusable && fp8_accumulate_fused(c, payloads, count, nbytes, b, shifts, acc + o)) {
        o += c.block;
        len = o;
        continue;
      }
#endif
      for (int r = 0; r < count; ++r) {
        const uint8_t* p = payloads + r * nbytes;
        const int k = load_exponent(p, c, super);
        const Shift sh = c.rot.block ? shift_of(c, k - common, inf) : shift_of(c, k, top);
        accumulate_block(c, p + b * c.code_bytes(c.block), p + c.scales_offset + b * c.scale_bytes(), sh, r == 0,
                         acc + o);
      }
      o += c.block;
      len = o;
    }
    if (c.rot.block) {
      for (int i = len; i < tile; ++i) acc[i] = 0.0f;  // blocks past the payload: dropped below anyway
      const int64_t left = numel - start;
      const int rot_len = static_cast<int>(left < tile ? (left + c.rot.block - 1) / c.rot.block * c.rot.block : tile);
      // 2^K folded into the rotation's constant c where that is exact: c * 2^K is a power-of-two multiple of c,
      // and (fwht * (c * 2^K)) * sign rounds the same real number as the reference's ((fwht * c) * sign) * 2^K
      // unless fwht * c or the result is subnormal. With every payload's shift folded into its scales (exact
      // products), nonzero sums are multiples of m = 2^(lowest - K - 24) (fp16 scales are multiples of 2^-24),
      // so fwht * c >= m * 2^-6 (c >= 2^-6) and the result >= 2^(lowest - 30): both normal when lowest - K and
      // lowest are >= -96. FP8's fp32 scales have no such granularity: only K = k_r = 0 (the plain rotation).
      const bool fold = c.format == kInt ? (lowest - common >= -96 && lowest >= -96 && common <= 100)
                                          : (lowest == 0 && common == 0);
      if (fold) {
        Rotation r2 = c.rot;
        r2.scale = c.rot.scale * tpcomp::pow2_exact(common);
        rotate_backward(acc, rot_len, r2, top);  // the clamp of the rotated sum, in registers
      } else {
        rotate_backward(acc, rot_len, c.rot, inf);
        scale_by_pow2(acc, rot_len, common);
        for (int i = 0; i < rot_len; ++i) acc[i] = tpcomp::clamp_abs(acc[i], top);
      }
    }
    const int64_t n = numel - start < tile ? numel - start : tile;
    // The rotated sum is clamped above; the others clamped each payload's values already (+chscale: again after
    // the channel scaling, to the output dtype's range).
    if (n > 0) {
      if (c.ch.h) channel_scale(c.ch.down, c.ch.h, start, n, acc);
      store_tile(acc, n, dt, start, out, out_top);
    }
  }
}

bool valid(const Codec& c, int dt) {
  if (dt != kF32 && dt != kBF16 && dt != kF16) return false;
  if (c.block < 1 || c.block > kMaxTile) return false;
  if (c.format == kInt) {
    if (c.bits != 4 && c.bits != 5 && c.bits != 6 && c.bits != 8) return false;
    if (c.scale_fmt != kScaleF16 && c.scale_fmt != kScaleE4m3) return false;
    if (c.bits == 4 && (c.block & 1)) return false;            // two codes per byte: groups start on bytes
    if ((c.bits == 5 || c.bits == 6) && c.block % 8) return false;  // 8 codes per N bytes
  } else if (c.format != kFp8E4m3) {
    return false;
  }
  if (c.rot.block && (c.rot.block & (c.rot.block - 1))) return false;
  if (c.ch.h < 0 || (c.ch.h > 0 && (c.ch.up == nullptr || c.ch.down == nullptr))) return false;
  return tile_values(c) == kMaxTile;  // one super-block per tile: block and rotation block divide 4096
}

Codec make(int format, int bits, int scale_fmt, int block, float scale_cap, float range_limit, int64_t scales_offset,
           int64_t exps_offset, int rot_block, const float* signs, float rot_scale, int ch_h, const float* ch_up,
           const float* ch_down) {
  return Codec{format,        bits,        scale_fmt,
               block,         scale_cap,   range_limit,
               scales_offset, exps_offset, Rotation{rot_block, signs, rot_scale},
               ChannelScale{ch_h, ch_up, ch_down}};
}

}  // namespace

extern "C" {

// Largest tile (values) the library handles: lcm(block, rotation block) must not exceed it.
int tpc_cpu_max_tile() { return kMaxTile; }

// The codec arguments of both calls: format (0 integer, 1 fp8-e4m3), bits (integers: 4, 5, 6, 8), scale_fmt
// (integers: 0 fp16, 1 e4m3), block, scale_cap (fp8), range_limit, the byte offsets of the scales and exponents
// sections, the rotation (block, fp32 signs, fp32 constant; block 0: none), the channel scales (h, fp32 2^e
// and 2^-e per channel; h 0: none).
#define TPC_CODEC_PARAMS                                                                                      \
  int format, int bits, int scale_fmt, int block, float scale_cap, float range_limit, int64_t scales_offset, \
      int64_t exps_offset, int rot_block, const float *signs, float rot_scale, int ch_h, const float *ch_up,  \
      const float *ch_down
#define TPC_CODEC_ARGS                                                                                             \
  format, bits, scale_fmt, block, scale_cap, range_limit, scales_offset, exps_offset, rot_block, signs, rot_scale, \
      ch_h, ch_up, ch_down

// Encode `numel` values of dtype `dt` (0 fp32, 1 bf16, 2 fp16) at `x` into `payload` (all of the payload's
// code and scale bytes are written; the caller zeroes it so that alignment padding is zero). Returns 0, or -1
// for an unsupported configuration.
int tpc_cpu_encode(TPC_CODEC_PARAMS, const void* x, int dt, int64_t numel, uint8_t* payload, int nthreads) {
  const Codec c = make(TPC_CODEC_ARGS);
  if (!valid(c, dt) || (c.ch.h && numel % c.ch.h)) return -1;
  encode(c, x, dt, numel, payload, nthreads);
  return 0;
}

// Decode `count` payloads of `nbytes` each (laid end to end) of a `numel`-value tensor, add them in fp32 in
// order 0..count-1, rotate back once, write dtype `dt` to `out`. Returns 0, or -1 for an unsupported configuration.
int tpc_cpu_decode_sum(TPC_CODEC_PARAMS, const uint8_t* payloads, int count, int64_t nbytes, int64_t numel, void* out,
                       int dt, int nthreads) {
  const Codec c = make(TPC_CODEC_ARGS);
  if (!valid(c, dt) || count < 1 || count > kMaxCount || (c.ch.h && numel % c.ch.h)) return -1;
  decode_sum(c, payloads, count, nbytes, numel, out, dt, nthreads);
  return 0;
}

}  // extern "C"
