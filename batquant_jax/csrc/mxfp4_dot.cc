// Fused MXFP4 matrix products for the CPU, registered with XLA through its FFI.
//
// Both handlers compute y[m, n] = sum_k x[m, k] * W[n, k] for a weight W kept as its MXFP4
// codes (uint8 [N, K/2], element 2i in the low nibble of byte i) and E8M0 scales (uint8
// [N, K/32], bias 127, 0xFF = NaN), without ever materialising a float weight matrix:
//
//   bq_mxfp4_dot_f32: x float32 [M, K]                      (any activation: W4A16, W4A8)
//   bq_mxfp4_dot_q:   x as MXFP4 codes [M, K/2] + scales [M, K/32]          (W4A4)
//
// An E2M1 element times two is an integer in [-12, 12], so a 16-entry int8 table decodes the
// nibbles. In the W4A4 product the 32 products of a block are then summed exactly in integers
// and scaled once by 2^(ea + ew - 256); the float32 path multiplies the decoded weights by x in
// float32. Either way only the summation order differs from the dequantize-then-dot path, so
// the results agree to float32 rounding. Rows of W are shared out over XLA's intra-op threads.
//
// AVX2 (and AVX-VNNI / AVX512-VNNI where the compiler targets them) is used when available;
// otherwise plain loops that the compiler vectorises as it can.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BQ_AVX2 1
#endif

namespace ffi = xla::ffi;
using batquant::grain_rows;
using batquant::parallel_for;

namespace {

constexpr int kBlock = 32;
constexpr int kTile = 8;  // activation rows that share one decoded weight block

// Twice the E2M1 value of each code (sign bit 3).
alignas(16) constexpr int8_t kE2M1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12,
                                            0, -1, -2, -3, -4, -6, -8, -12};

// Half the E8M0 scale of each byte: 2^(e - 128); 0xFF is NaN. Built once, exactly (ldexp).
struct HalfScales {
  float v[256];
  HalfScales() {
    for (int e = 0; e < 255; ++e) v[e] = std::ldexp(1.0f, e - 128);
    v[255] = NAN;
  }
};
const HalfScales kHalf;

// 16 bytes of codes -> the 32 elements' doubled values (int8), in element order.
inline void decode_block(const uint8_t* codes, int8_t* out) {
  for (int i = 0; i < kBlock / 2; ++i) {
    out[2 * i] = kE2M1x2[codes[i] & 0xF];
    out[2 * i + 1] = kE2M1x2[codes[i] >> 4];
  }
}

#if BQ_AVX2
inline __m256i decode_block_avx2(const uint8_t* codes) {
  const __m128i lut = _mm_load_si128(reinterpret_cast<const __m128i*>(kE2M1x2));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i lo = _mm_and_si128(c, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(c, 4), mask);
  const __m128i a = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));  // elements 0..15
  const __m128i b = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));  // elements 16..31
  return _mm256_set_m128i(b, a);
}

// Eight int32 partial sums of the products of two blocks of 32 int8 values in [-12, 12].
inline __m256i block_dot_i8(__m256i w, __m256i x) {
  const __m256i ax = _mm256_sign_epi8(x, x);  // |x| as unsigned bytes
  const __m256i sw = _mm256_sign_epi8(w, x);  // w * sign(x)
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw);
#else
  const __m256i p16 = _mm256_maddubs_epi16(ax, sw);  // |pair sums| <= 288
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if BQ_AVX2 && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define BQ_AVX512 1
// Twice the E2M1 value plus 12 (so that it is unsigned, 0..24): the AVX-512 path multiplies
// these unsigned bytes by the signed activations (vpdpbusd) and removes 12 * sum(x) through the
// accumulator's initial value.
alignas(16) constexpr uint8_t kE2M1x2p12[16] = {12, 13, 14, 15, 16, 18, 20, 24,
                                                12, 11, 10, 9, 8, 6, 4, 0};

// 32 bytes of codes (two blocks) -> their 64 elements' (2v + 12), in element order.
inline __m512i decode_pair_avx512(const uint8_t* codes) {
  const __m256i lut = _mm256_broadcastsi128_si256(
      _mm_load_si128(reinterpret_cast<const __m128i*>(kE2M1x2p12)));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i lo = _mm256_and_si256(c, mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), mask);
  // per 128-bit lane: unpacklo = elements [0..15 | 32..47], unpackhi = [16..31 | 48..63]
  const __m256i a = _mm256_shuffle_epi8(lut, _mm256_unpacklo_epi8(lo, hi));
  const __m256i b = _mm256_shuffle_epi8(lut, _mm256_unpackhi_epi8(lo, hi));
  const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);  // [a0 a1 b0 b1]
  return _mm512_shuffle_i64x2(ab, ab, _MM_SHUFFLE(3, 1, 2, 0));            // [a0 b0 a1 b1]
}
#endif


// The loop of both products without SIMD intrinsics (compilers vectorise the inner sums):
// y[t * ldy] = sum over blocks j of block_sum(t, j, decoded weight block j) * weight scale j,
// for the T activation rows of one weight row.
template <int T, typename BlockSum>
void portable_rows(const uint8_t* codes, const uint8_t* scales, int64_t nb, float* y,
                   int64_t ldy, const BlockSum& block_sum) {
  float acc[T] = {};
  int8_t w[kBlock];
  for (int64_t j = 0; j < nb; ++j) {
    decode_block(codes + j * (kBlock / 2), w);
    const float sw = kHalf.v[scales[j]];
    for (int t = 0; t < T; ++t) acc[t] += block_sum(t, j, w) * sw;
  }
  for (int t = 0; t < T; ++t) y[t * ldy] = acc[t];
}

// ---------------------------------------------------------------------------- W4A4 (int8 dot)

// T activation rows (decoded: xq [T][K] doubled values, xs [T][K/32] half scales) times weight
// rows [n0, n1).
// The decoded activations of one call: xq [M][K] doubled values, xs [M][K/32] half scales and,
// for the AVX-512 path, corr [M][K/4] = -12 * (sums of 4 consecutive xq).
struct Activations {
  const int8_t* xq;
  const float* xs;
  const int32_t* corr;
};

template <int T>
void dot_q_rows(const Activations& a, int64_t k, const uint8_t* wc, const uint8_t* ws,
                int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t nb = k / kBlock;
  const int8_t* xq = a.xq;
  const float* xs = a.xs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = wc + n * (k / 2);
    const uint8_t* scales = ws + n * nb;
#if BQ_AVX2
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    int64_t j = 0;
#if BQ_AVX512
    __m512 acc2[T];
    for (int t = 0; t < T; ++t) acc2[t] = _mm512_setzero_ps();
    for (; j + 1 < nb; j += 2) {
      const __m512i w = decode_pair_avx512(codes + j * (kBlock / 2));
      const __m512 sw = _mm512_insertf32x8(_mm512_set1_ps(kHalf.v[scales[j]]),
                                           _mm256_set1_ps(kHalf.v[scales[j + 1]]), 1);
      for (int t = 0; t < T; ++t) {
        const __m512i x = _mm512_loadu_si512(xq + t * k + j * kBlock);
        const __m512i c = _mm512_loadu_si512(a.corr + t * (k / 4) + j * (kBlock / 4));
        const __m512 p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, w, x));
        const __m512 sx = _mm512_insertf32x8(_mm512_set1_ps(xs[t * nb + j]),
                                             _mm256_set1_ps(xs[t * nb + j + 1]), 1);
        acc2[t] = _mm512_fmadd_ps(_mm512_mul_ps(p, sx), sw, acc2[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_add_ps(_mm512_castps512_ps256(acc2[t]),
                             _mm512_extractf32x8_ps(acc2[t], 1));
    }
#endif
    for (; j < nb; ++j) {
      const __m256i w = decode_block_avx2(codes + j * (kBlock / 2));
      const float sw = kHalf.v[scales[j]];
      for (int t = 0; t < T; ++t) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * k + j * kBlock));
        const __m256 p = _mm256_cvtepi32_ps(block_dot_i8(w, x));
        acc[t] = _mm256_fmadd_ps(p, _mm256_set1_ps(sw * xs[t * nb + j]), acc[t]);
      }
    }
    for (int t = 0; t < T; ++t) y[t * ldy + n] = hsum(acc[t]);
#else
    portable_rows<T>(codes, scales, nb, y + n, ldy, [&](int t, int64_t j, const int8_t* w) {
      const int8_t* x = xq + t * k + j * kBlock;
      int32_t s = 0;
      for (int i = 0; i < kBlock; ++i) s += int32_t(w[i]) * int32_t(x[i]);
      return float(s) * xs[t * nb + j];
    });
#endif
  }
}

template <typename Rows>
void dispatch_tiles(int64_t m, const Rows& rows) {
  for (int64_t m0 = 0; m0 < m; m0 += kTile) {
    switch (std::min<int64_t>(kTile, m - m0)) {
      case 1: rows(std::integral_constant<int, 1>{}, m0); break;
      case 2: rows(std::integral_constant<int, 2>{}, m0); break;
      case 3: rows(std::integral_constant<int, 3>{}, m0); break;
      case 4: rows(std::integral_constant<int, 4>{}, m0); break;
      case 5: rows(std::integral_constant<int, 5>{}, m0); break;
      case 6: rows(std::integral_constant<int, 6>{}, m0); break;
      case 7: rows(std::integral_constant<int, 7>{}, m0); break;
      default: rows(std::integral_constant<int, 8>{}, m0); break;
    }
  }
}

ffi::Error check_operands(int64_t k, int64_t n, ffi::Buffer<ffi::U8>& wc,
                          ffi::Buffer<ffi::U8>& ws) {
  if (k % kBlock != 0) {
    return ffi::Error::InvalidArgument("the reduced dimension must be a multiple of 32");
  }
  auto cd = wc.dimensions();
  auto sd = ws.dimensions();
  if (cd.size() != 2 || sd.size() != 2 || cd[0] != n || cd[1] != k / 2 || sd[0] != n ||
      sd[1] != k / kBlock) {
    return ffi::Error::InvalidArgument("weight codes must be [N, K/2] and scales [N, K/32]");
  }
  return ffi::Error::Success();
}

ffi::Error DotQImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> xc, ffi::Buffer<ffi::U8> xsc,
                    ffi::Buffer<ffi::U8> wc, ffi::Buffer<ffi::U8> ws,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = xc.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("activation codes must be [M, K/2] and the result [M, N]");
  }
  const int64_t m = xd[0], k = 2 * xd[1], n = yd[1];
  if (ffi::Error e = check_operands(k, n, wc, ws); e.failure()) return e;
  const int64_t nb = k / kBlock;
  // Decode the activations once: doubled element values and half scales.
  std::vector<int8_t> xq(m * k);
  std::vector<float> xs(m * nb);
  std::vector<int32_t> corr(m * k / 4);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < nb; ++j) {
      decode_block(xc.typed_data() + r * (k / 2) + j * (kBlock / 2), xq.data() + r * k + j * kBlock);
      xs[r * nb + j] = kHalf.v[xsc.typed_data()[r * nb + j]];
    }
    for (int64_t i = 0; i < k / 4; ++i) {
      const int8_t* q = xq.data() + r * k + 4 * i;
      corr[r * (k / 4) + i] = -12 * (int32_t(q[0]) + q[1] + q[2] + q[3]);
    }
  }
  const Activations act{xq.data(), xs.data(), corr.data()};
  const uint8_t* wcd = wc.typed_data();
  const uint8_t* wsd = ws.typed_data();
  float* out = y->typed_data();
  parallel_for(pool, n, grain_rows(k), [&](int64_t n0, int64_t n1) {
    dispatch_tiles(m, [&](auto tile, int64_t m0) {
      const Activations rows{act.xq + m0 * k, act.xs + m0 * nb, act.corr + m0 * (k / 4)};
      dot_q_rows<decltype(tile)::value>(rows, k, wcd, wsd, n0, n1, out + m0 * n, n);
    });
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------- float activations

template <int T>
void dot_f32_rows(const float* x, int64_t k, const uint8_t* wc, const uint8_t* ws, int64_t n0,
                  int64_t n1, float* y, int64_t ldy) {
  const int64_t nb = k / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = wc + n * (k / 2);
    const uint8_t* scales = ws + n * nb;
#if BQ_AVX2
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; ++j) {
      const __m256i w8 = decode_block_avx2(codes + j * (kBlock / 2));
      const __m128i lo = _mm256_castsi256_si128(w8), hi = _mm256_extracti128_si256(w8, 1);
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
      const __m256 sw = _mm256_set1_ps(kHalf.v[scales[j]]);
      for (int t = 0; t < T; ++t) {
        const float* xb = x + t * k + j * kBlock;
        __m256 b = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
        b = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), b);
        b = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), b);
        b = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), b);
        acc[t] = _mm256_fmadd_ps(b, sw, acc[t]);
      }
    }
    for (int t = 0; t < T; ++t) y[t * ldy + n] = hsum(acc[t]);
#else
    portable_rows<T>(codes, scales, nb, y + n, ldy, [&](int t, int64_t j, const int8_t* w) {
      const float* xb = x + t * k + j * kBlock;
      float b = 0.0f;
      for (int i = 0; i < kBlock; ++i) b += float(w[i]) * xb[i];
      return b;
    });
#endif
  }
}

ffi::Error DotF32Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> wc,
                      ffi::Buffer<ffi::U8> ws, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("x must be [M, K] and the result [M, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  if (ffi::Error e = check_operands(k, n, wc, ws); e.failure()) return e;
  const float* xp = x.typed_data();
  const uint8_t* wcd = wc.typed_data();
  const uint8_t* wsd = ws.typed_data();
  float* out = y->typed_data();
  parallel_for(pool, n, grain_rows(k), [&](int64_t n0, int64_t n1) {
    dispatch_tiles(m, [&](auto tile, int64_t m0) {
      dot_f32_rows<decltype(tile)::value>(xp + m0 * k, k, wcd, wsd, n0, n1, out + m0 * n, n);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqMxfp4DotQ, DotQImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqMxfp4DotF32, DotF32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
