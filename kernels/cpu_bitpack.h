// Packing of N-bit integer codes (N in 4, 5, 6, 8) for the CPU codec library (kernels/cpu_codecs.cpp), in the bit
// order of megatron_tpcomp/codecs/bitpack.py: code i occupies bits [i N, (i + 1) N) of a little-endian bit stream
// (int4: byte k = code 2k | code 2k+1 << 4; int8: the bytes are the codes; int5/int6: 8 codes make N bytes).
// Groups start on byte boundaries (G N / 8 bytes per group; the library takes G even for int4, G a multiple of
// 8 for int5/int6).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__BMI2__)
#include <immintrin.h>
#endif

namespace tpcomp_cpu {

// Mask of the low N bits of each of 8 bytes: pext with it gathers 8 byte-held codes into an 8N-bit word in
// stream order, pdep scatters them back.
constexpr uint64_t byte_code_mask(int bits) { return 0x0101010101010101ull * ((1ull << bits) - 1ull); }

// 8 codes (one per byte of `w`, each < 2^N) -> their 8N-bit stream word, and back.
template <int N>
inline uint64_t gather8(uint64_t w) {
#if defined(__BMI2__)
  return _pext_u64(w, byte_code_mask(N));
#else
  uint64_t r = 0;
  for (int u = 0; u < 8; ++u) r |= ((w >> (8 * u)) & ((1ull << N) - 1ull)) << (N * u);
  return r;
#endif
}

template <int N>
inline uint64_t scatter8(uint64_t w) {
#if defined(__BMI2__)
  return _pdep_u64(w, byte_code_mask(N));
#else
  uint64_t r = 0;
  for (int u = 0; u < 8; ++u) r |= ((w >> (N * u)) & ((1ull << N) - 1ull)) << (8 * u);
  return r;
#endif
}

// Unsigned codes q[0, n) -> packed bytes out[0, n N / 8) (n even for N = 4, a multiple of 8 for N = 5, 6).
inline void pack_codes(const uint8_t* q, int n, int bits, uint8_t* out) {
  if (bits == 8) {
    memcpy(out, q, static_cast<size_t>(n));
  } else if (bits == 4) {
    for (int i = 0; i < n / 2; ++i) out[i] = static_cast<uint8_t>(q[2 * i] | (q[2 * i + 1] << 4));
  } else {
    for (int j = 0; j < n / 8; ++j) {
      uint64_t w;
      memcpy(&w, q + 8 * j, 8);
      w = bits == 5 ? gather8<5>(w) : gather8<6>(w);
      memcpy(out + j * bits, &w, static_cast<size_t>(bits));  // little-endian: the low N bytes
    }
  }
}

// The packed codes of g zero values (code 2^(N-1)), g as for pack_codes: what a NaN/Inf group gets. No buffer
// of g codes (a large stack frame in a hot function costs a stack probe per call).
inline void fill_zero_codes(uint8_t* out, int g, int bits) {
  const int zero = 1 << (bits - 1);
  if (bits == 8) {
    memset(out, zero, static_cast<size_t>(g));
  } else if (bits == 4) {
    memset(out, zero | (zero << 4), static_cast<size_t>(g / 2));
  } else {
    uint8_t eight[8];
    memset(eight, zero, 8);
    uint8_t packed[8];
    pack_codes(eight, 8, bits, packed);
    for (int j = 0; j < g / 8; ++j) memcpy(out + j * bits, packed, static_cast<size_t>(bits));
  }
}

// Packed bytes -> signed values code - zero in q[0, n) (the inverse of pack_codes).
inline void unpack_codes(const uint8_t* in, int n, int bits, int8_t* q) {
  const int zero = 1 << (bits - 1);
  if (bits == 8) {
    for (int i = 0; i < n; ++i) q[i] = static_cast<int8_t>(in[i] - zero);
  } else if (bits == 4) {
    for (int i = 0; i < n / 2; ++i) {
      q[2 * i] = static_cast<int8_t>((in[i] & 0xF) - zero);
      q[2 * i + 1] = static_cast<int8_t>((in[i] >> 4) - zero);
    }
  } else {
    for (int j = 0; j < n / 8; ++j) {
      uint64_t w = 0;
      memcpy(&w, in + j * bits, static_cast<size_t>(bits));
      w = bits == 5 ? scatter8<5>(w) : scatter8<6>(w);
      for (int u = 0; u < 8; ++u) q[8 * j + u] = static_cast<int8_t>(static_cast<int>((w >> (8 * u)) & 0xFF) - zero);
    }
  }
}

#if defined(__AVX2__) && defined(__F16C__)
// Pairs of adjacent int8 q in [-7, 7] -> the int16 (q_even + 8) | (q_odd + 8) << 4, in 0..255: q_even * 1 +
// q_odd * 16 in each int16, + 0x88.
inline __m256i int4_pair_bytes(__m256i b) {
  return _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_set1_epi16(0x1001), b), _mm256_set1_epi16(0x88));
}

// 32 int8 q in value order (N = 5, 6, 8) -> 4N bytes at `out`: + zero as bytes (int8 q + 2^(N-1) wraps to the
// unsigned code), then the bytes themselves (N = 8) or 8 codes per N bytes.
template <int N>
inline void store_code_bytes32(__m256i ordered, uint8_t* out) {
  const __m256i codes = _mm256_add_epi8(ordered, _mm256_set1_epi8(static_cast<char>(1 << (N - 1))));
  if constexpr (N == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), codes);
    return;
  }
  const uint64_t w[4] = {gather8<N>(static_cast<uint64_t>(_mm256_extract_epi64(codes, 0))),
                         gather8<N>(static_cast<uint64_t>(_mm256_extract_epi64(codes, 1))),
                         gather8<N>(static_cast<uint64_t>(_mm256_extract_epi64(codes, 2))),
                         gather8<N>(static_cast<uint64_t>(_mm256_extract_epi64(codes, 3)))};
  // 8-byte stores, each overwritten past its N bytes by the next; the last one writes exactly N bytes (what follows
  // may be another thread's group).
  for (int j = 0; j < 3; ++j) memcpy(out + j * N, &w[j], 8);
  memcpy(out + 3 * N, &w[3], N);
}

// 32 codes (four vectors of int32 q in [-qmax, qmax], in value order) -> 4N bytes at `out`.
template <int N>
inline void store_codes32(__m256i q0, __m256i q1, __m256i q2, __m256i q3, uint8_t* out) {
  // Narrowing packs work per 128-bit half: b = [q0 0-3, q1 0-3, q2 0-3, q3 0-3 | the same for lanes 4-7], as int8.
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
  if constexpr (N == 4) {
    const __m256i w = int4_pair_bytes(b);
    const __m256i bytes = _mm256_packus_epi16(w, w);  // per half: its 8 bytes, twice
    // Low half: bytes of q0-q3 lanes 0-3 (two bytes each), high half: lanes 4-7: interleave 16-bit units.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm_unpacklo_epi16(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1)));
    return;
  }
  // Dword permute back to value order.
  store_code_bytes32<N>(_mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)), out);
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// The same 4N bytes from two vectors of 16 int32 q in [-qmax, qmax] (values 0-15 and 16-31, in order): vpmovdb
// narrows them in order (truncation; every q fits in int8), then the bytes pack as store_codes32 packs them.
template <int N>
inline void store_codes32(__m512i q0, __m512i q1, uint8_t* out) {
  const __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(q0)), _mm512_cvtepi32_epi8(q1), 1);
  if constexpr (N == 4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtepi16_epi8(int4_pair_bytes(b)));  // vpmovwb: in order
    return;
  }
  store_code_bytes32<N>(b, out);
}
#endif

// 4N packed bytes at `in` -> the signed values (code - zero) of 32 codes as int8: values 0-15 in *lo, 16-31 in *hi.
// N = 5, 6 read up to 3 bytes past the 4N (see below).
template <int N>
inline void load_codes32(const uint8_t* in, __m128i* lo, __m128i* hi) {
  if constexpr (N == 4) {
    const __m128i nibble = _mm_set1_epi8(0x0F), zero_code = _mm_set1_epi8(8);
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
    const __m128i l = _mm_and_si128(b, nibble), h = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
    *lo = _mm_sub_epi8(_mm_unpacklo_epi8(l, h), zero_code);
    *hi = _mm_sub_epi8(_mm_unpackhi_epi8(l, h), zero_code);
    return;
  }
  const __m128i zero = _mm_set1_epi8(static_cast<char>(1 << (N - 1)));
  if constexpr (N == 8) {
    *lo = _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)), zero);
    *hi = _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 16)), zero);
    return;
  }
  // One 8-byte load per 8 codes (N bytes): the last one reads 8 - N <= 3 bytes past the 4N. Callers decode runs of
  // 8 whole groups, and a payload's scales section (at least one byte per group) follows its codes: those bytes
  // are inside the payload (scatter8 drops them).
  uint64_t w[4];
  for (int j = 0; j < 4; ++j) memcpy(&w[j], in + j * N, 8);
  *lo = _mm_sub_epi8(_mm_set_epi64x(static_cast<long long>(scatter8<N>(w[1])), static_cast<long long>(scatter8<N>(w[0]))), zero);
  *hi = _mm_sub_epi8(_mm_set_epi64x(static_cast<long long>(scatter8<N>(w[3])), static_cast<long long>(scatter8<N>(w[2]))), zero);
}
#endif

}  // namespace tpcomp_cpu
