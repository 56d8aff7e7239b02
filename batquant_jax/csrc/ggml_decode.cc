// Decoders of the GGML block encodings (the weights of a GGUF file) to float32 for the CPU,
// registered with XLA through its FFI as bq_ggml_decode, and the product of float activations
// with a weight held in such blocks that never writes the float weight out (bq_ggml_dot: for
// decoding, where one token's product would otherwise decode the whole matrix into memory).
//
// Input: uint8 [..., bytes] holding whole blocks of one kind; result: float32 [..., elements].
// Every element is computed with the float32 operations, in the order, of the XLA decoders in
// models/stored.py (which equal the gguf package's numpy dequantizer), so the two paths give
// the same bits: d * scale products first, then one multiply and at most one add per element,
// never fused (the build keeps -ffp-contract=off). The XLA decoders need several passes over
// the weight (nibble splits, concatenations, reshapes); this is one pass, blocks shared out
// over XLA's intra-op threads.

#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using batquant::grain_rows;
using batquant::parallel_for;

namespace {

// The kinds, numbered as stored.py's KERNEL_KINDS.
enum Kind : int32_t { kQ4_0 = 0, kQ4_1, kQ5_0, kQ8_0, kQ4_K, kQ5_K, kQ6_K };

struct Layout {
  int64_t elements, bytes;
};
constexpr Layout kLayouts[] = {{32, 18}, {32, 20}, {32, 22}, {32, 34},
                               {256, 144}, {256, 176}, {256, 210}};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The little-endian float16 at p, widened exactly (subnormals, infinities and NaNs included).
inline float f16(const uint8_t* p) {
  const uint32_t h = uint32_t(p[0]) | (uint32_t(p[1]) << 8);
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    exp = 113;  // 127 - 15 + 1, lowered once per shift that normalizes the mantissa
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    return bits_to_float(sign | (exp << 23) | ((mant & 0x3FFu) << 13));
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

// 16 bytes of 4-bit codes -> 32 values: the low nibbles, then the high ones.
inline void nibbles16(const uint8_t* q, uint8_t* out) {
  for (int i = 0; i < 16; ++i) {
    out[i] = q[i] & 0x0F;
    out[i + 16] = q[i] >> 4;
  }
}

void q4_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  uint8_t q[32];
  nibbles16(b + 2, q);
  for (int i = 0; i < 32; ++i) y[i] = d * float(int(q[i]) - 8);
}

void q4_1(const uint8_t* b, float* y) {
  const float d = f16(b), m = f16(b + 2);
  uint8_t q[32];
  nibbles16(b + 4, q);
  for (int i = 0; i < 32; ++i) y[i] = d * float(q[i]) + m;
}

void q5_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  const uint32_t qh = uint32_t(b[2]) | (uint32_t(b[3]) << 8) | (uint32_t(b[4]) << 16) |
                      (uint32_t(b[5]) << 24);
  uint8_t q[32];
  nibbles16(b + 6, q);
  for (int i = 0; i < 32; ++i) y[i] = d * float(int(q[i] | (((qh >> i) & 1u) << 4)) - 16);
}

void q8_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  for (int i = 0; i < 32; ++i) y[i] = float(int8_t(b[2 + i])) * d;
}

// The 8 sub-block scales and mins of a Q4_K / Q5_K super-block (6 bits each, 12 bytes).
inline void k_scale_min(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 0x3F;
    mn[j] = s[4 + j] & 0x3F;
    sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
    mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
  }
}

// Q4_K (hbits == nullptr) and Q5_K: 8 sub-blocks of 32, y = (d * sc) * q - (dmin * mn).
void k_quant_4_5(const uint8_t* b, const uint8_t* hbits, const uint8_t* qs, float* y) {
  const float d = f16(b), dmin = f16(b + 2);
  uint8_t sc[8], mn[8];
  k_scale_min(b + 4, sc, mn);
  for (int j = 0; j < 8; ++j) {
    const float dl = d * float(sc[j]), dm = dmin * float(mn[j]);
    const uint8_t* q = qs + (j / 2) * 32;
    const int shift = (j % 2) * 4;
    float* out = y + j * 32;
    for (int i = 0; i < 32; ++i) {
      uint32_t v = (q[i] >> shift) & 0x0F;
      if (hbits) v |= ((hbits[i] >> j) & 1u) << 4;
      out[i] = dl * float(v) - dm;
    }
  }
}

void q4_k(const uint8_t* b, float* y) { k_quant_4_5(b, nullptr, b + 16, y); }
void q5_k(const uint8_t* b, float* y) { k_quant_4_5(b, b + 16, b + 48, y); }

// Q6_K: 16 sub-blocks of 16 with int8 scales, y = (d * scale) * (q - 32); element
// g * 128 + s * 32 + i takes its low 4 bits from ql[g * 64 + (s % 2) * 32 + i] (the low nibble
// for s < 2, else the high one) and its top 2 bits from qh[g * 32 + i] >> (2 * s).
void q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16(b + 208);
  float ds[16];
  for (int j = 0; j < 16; ++j) ds[j] = d * float(scales[j]);
  for (int g = 0; g < 2; ++g) {
    for (int s = 0; s < 4; ++s) {
      const uint8_t* l = ql + g * 64 + (s % 2) * 32;
      const int lshift = (s / 2) * 4;
      float* out = y + g * 128 + s * 32;
      const float d0 = ds[(g * 128 + s * 32) / 16], d1 = ds[(g * 128 + s * 32) / 16 + 1];
      for (int i = 0; i < 32; ++i) {
        const int q = int(((l[i] >> lshift) & 0x0F) | (((qh[g * 32 + i] >> (2 * s)) & 3) << 4));
        out[i] = (i < 16 ? d0 : d1) * float(int8_t(q - 32));
      }
    }
  }
}

using DecodeFn = void (*)(const uint8_t*, float*);
constexpr DecodeFn kDecoders[] = {q4_0, q4_1, q5_0, q8_0, q4_k, q5_k, q6_k};

ffi::Error DecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> x,
                      ffi::ResultBuffer<ffi::F32> y, int32_t kind) {
  if (kind < 0 || kind > kQ6_K) return ffi::Error::InvalidArgument("unknown GGML block kind");
  const Layout layout = kLayouts[kind];
  const int64_t nbytes = x.element_count(), nout = y->element_count();
  if (nbytes % layout.bytes || nbytes / layout.bytes * layout.elements != nout) {
    return ffi::Error::InvalidArgument("the input is not whole blocks of the result's size");
  }
  const int64_t blocks = nbytes / layout.bytes;
  const DecodeFn decode = kDecoders[kind];
  const uint8_t* in = x.typed_data();
  float* out = y->typed_data();
  parallel_for(pool, blocks, grain_rows(layout.elements), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) decode(in + i * layout.bytes, out + i * layout.elements);
  });
  return ffi::Error::Success();
}

// sum_i a[i] * b[i] over k (a multiple of 32) in 16 running sums (vectorised), then added up.
inline float dot_rows(const float* a, const float* b, int64_t k) {
  constexpr int kLanes = 16;
  float s[kLanes] = {};
  for (int64_t i = 0; i < k; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) s[l] += a[i + l] * b[i + l];
  }
  float t = 0.0f;
  for (int l = 0; l < kLanes; ++l) t += s[l];
  return t;
}

// y[m, n] = sum_k x[m, k] * W[n, k], W [N, K] as rows of blocks of `kind`: each weight row is
// decoded (as bq_ggml_decode does) into a buffer of K floats, then multiplied by every row of x.
// Only the order of the sums differs from x @ decode(W)^T.
ffi::Error DotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                   ffi::ResultBuffer<ffi::F32> y, int32_t kind) {
  if (kind < 0 || kind > kQ6_K) return ffi::Error::InvalidArgument("unknown GGML block kind");
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0]) {
    return ffi::Error::InvalidArgument("x must be [M, K] and the result [M, N]");
  }
  const Layout layout = kLayouts[kind];
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  const int64_t row_bytes = k / layout.elements * layout.bytes;
  if (k % layout.elements || w.element_count() != n * row_bytes) {
    return ffi::Error::InvalidArgument("the weight is not N rows of K elements in whole blocks");
  }
  const DecodeFn decode = kDecoders[kind];
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  float* out = y->typed_data();
  parallel_for(pool, n, grain_rows(k), [&](int64_t n0, int64_t n1) {
    std::vector<float> row(k);
    for (int64_t r = n0; r < n1; ++r) {
      const uint8_t* blocks = wp + r * row_bytes;
      for (int64_t j = 0; j < k / layout.elements; ++j) {
        decode(blocks + j * layout.bytes, row.data() + j * layout.elements);
      }
      for (int64_t i = 0; i < m; ++i) out[i * n + r] = dot_rows(row.data(), xp + i * k, k);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqGgmlDot, DotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("kind"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqGgmlDecode, DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("kind"));
