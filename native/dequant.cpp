// Native CPU dequantization of ggml blocks as one MLX primitive (workbench.gguf._native).
//
// Each kernel performs the float32 operations of workbench/gguf/quants.py's pure-MLX
// decoder for the same type, in the same order, so the results are bit-identical to it and
// to gguf.quants.dequantize (tests/test_quants.py checks both paths):
//   F16   exact widening (F16C where present; a signalling NaN comes out quiet, as MLX's cast)
//   BF16  bits << 16
//   Q8_0  q * d
//   Q2_K  (d * sc) * q - dmin * m      (16 groups of 16)
//   Q4_K  (d * sc) * q - dmin * m      (8 groups of 32, 6-bit scales)
//   IQ2_XXS (d * (0.5 + s)) * 0.25 * signed_grid   (the signed-grid table is an input)
//   MXFP4 e8m0_half(e) * (2 * e2m1)   (ggml's half scale times the doubled E2M1 value)
// No step is contracted into a fused multiply-add (-ffp-contract=off; explicit mul/sub).
// Large outputs are split over a few threads by whole blocks.
//
// Two more primitives serve few-row products (decode) without materialising a float32 weight:
//   qmv:         x [m, in] @ W.T for W given as ggml blocks [out, row_bytes] (any type above),
//                an MLX array or, with qmv_mapped, a NumPy view read in place (a mapped file):
//                Q8_0, IQ2_XXS, Q2_K and Q4_K rows are dotted block by block with the scales
//                factored out, other types expanded into a small L1 buffer and dotted; x may
//                be [groups, m, in] (a block-diagonal product: output row o takes group
//                o / (out / groups)); output rows are split over the cores;
//   affine8_qmv: x [m, in] @ W.T for W in MLX affine 8-bit form (group 32): per group
//                scale * dot(q, x) + bias * sum(x).
// Their sums run in a fixed order of their own (float32 accumulators), like any matmul.
// scan_strings walks a GGUF string array's length fields and check_utf8 validates its items
// for the reader (Python over ~260k tokenizer strings dominates opening a small model otherwise).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define WB_AVX2 1
#endif

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

// ggml type ids (workbench/spec/ggml.py)
constexpr int F16 = 1, Q8_0 = 8, Q2_K = 10, Q4_K = 12, IQ2_XXS = 16, BF16 = 30, MXFP4 = 39;

struct Format {
  int block_bytes;
  int block_elems;
};

Format format_of(int type) {
  switch (type) {
    case F16: return {2, 1};
    case BF16: return {2, 1};
    case Q8_0: return {34, 32};
    case Q2_K: return {84, 256};
    case Q4_K: return {144, 256};
    case IQ2_XXS: return {66, 256};
    case MXFP4: return {17, 32};
    default: throw std::invalid_argument("workbench native dequantize: unsupported ggml type " + std::to_string(type));
  }
}

// f16 bits -> float32, exact; a NaN keeps its payload with the quiet bit set (as F16C does).
inline float half_to_float(uint16_t h) {
#ifdef WB_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 1024));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 1023) << 13;
    }
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t load_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// --- kernels over blocks [b0, b1) ------------------------------------------------------------

void f16_blocks(const uint8_t* in, float* out, size_t b0, size_t b1) {
  size_t i = b0;
#ifdef WB_AVX2
  for (; i + 8 <= b1; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i))));
#endif
  for (; i < b1; ++i) out[i] = half_to_float(load_u16(in + 2 * i));
}

void bf16_blocks(const uint8_t* in, float* out, size_t b0, size_t b1) {
  size_t i = b0;
#ifdef WB_AVX2
  for (; i + 8 <= b1; i += 8) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_slli_epi32(w, 16));
  }
#endif
  for (; i < b1; ++i) {
    uint32_t bits = uint32_t(load_u16(in + 2 * i)) << 16;
    std::memcpy(out + i, &bits, 4);
  }
}

#ifdef WB_AVX2
// 8 int8 / uint8 codes at p -> 8 floats (exact)
inline __m256 i8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
#endif

void q8_0_blocks(const uint8_t* in, float* out, size_t b0, size_t b1) {
  for (size_t b = b0; b < b1; ++b) {
    const uint8_t* blk = in + b * 34;
    float* o = out + b * 32;
    const float d = half_to_float(load_u16(blk));
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
#ifdef WB_AVX2
    const __m256 vd = _mm256_set1_ps(d);
    for (int j = 0; j < 32; j += 8) _mm256_storeu_ps(o + j, _mm256_mul_ps(i8x8(blk + 2 + j), vd));
#else
    for (int j = 0; j < 32; ++j) o[j] = float(q[j]) * d;
#endif
    (void)q;
  }
}

void q2_k_blocks(const uint8_t* in, float* out, size_t b0, size_t b1) {
  for (size_t b = b0; b < b1; ++b) {
    const uint8_t* blk = in + b * 84;
    const uint8_t* sc = blk;
    const uint8_t* qs = blk + 16;
    float* o = out + b * 256;
    const float d = half_to_float(load_u16(blk + 80));
    const float dmin = half_to_float(load_u16(blk + 82));
    // group g (16 elements): byte half g/8, bit pair (g%8)/2, bytes (g%2)*16 .. +16
    for (int g = 0; g < 16; ++g) {
      const float dl = d * float(sc[g] & 15);
      const float ml = dmin * float(sc[g] >> 4);
      const uint8_t* src = qs + (g / 8) * 32 + (g % 2) * 16;
      const int shift = 2 * ((g % 8) / 2);
      float* og = o + g * 16;
#ifdef WB_AVX2
      const __m128i codes = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)), shift),
                                          _mm_set1_epi8(3));
      const __m256 vdl = _mm256_set1_ps(dl), vml = _mm256_set1_ps(ml);
      _mm256_storeu_ps(og, _mm256_sub_ps(_mm256_mul_ps(vdl, u8x8(codes)), vml));
      _mm256_storeu_ps(og + 8, _mm256_sub_ps(_mm256_mul_ps(vdl, u8x8(_mm_srli_si128(codes, 8))), vml));
#else
      for (int t = 0; t < 16; ++t) og[t] = dl * float((src[t] >> shift) & 3) - ml;
#endif
    }
  }
}

void q4_k_blocks(const uint8_t* in, float* out, size_t b0, size_t b1) {
  for (size_t b = b0; b < b1; ++b) {
    const uint8_t* blk = in + b * 144;
    const uint8_t *lo = blk + 4, *mid = blk + 8, *hi = blk + 12, *qs = blk + 16;
    float* o = out + b * 256;
    const float d = half_to_float(load_u16(blk));
    const float dmin = half_to_float(load_u16(blk + 2));
    for (int s = 0; s < 8; ++s) {
      const int sc = s < 4 ? (lo[s] & 63) : ((hi[s - 4] & 15) | ((lo[s - 4] >> 6) << 4));
      const int mn = s < 4 ? (mid[s] & 63) : ((hi[s - 4] >> 4) | ((mid[s - 4] >> 6) << 4));
      const float ds = d * float(sc);
      const float dm = dmin * float(mn);
      const uint8_t* src = qs + (s / 2) * 32;
      const int shift = 4 * (s % 2);
      float* os = o + s * 32;
#ifdef WB_AVX2
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(raw, shift), _mm256_set1_epi8(15));
      const __m128i c0 = _mm256_castsi256_si128(codes), c1 = _mm256_extracti128_si256(codes, 1);
      const __m256 vds = _mm256_set1_ps(ds), vdm = _mm256_set1_ps(dm);
      _mm256_storeu_ps(os, _mm256_sub_ps(_mm256_mul_ps(vds, u8x8(c0)), vdm));
      _mm256_storeu_ps(os + 8, _mm256_sub_ps(_mm256_mul_ps(vds, u8x8(_mm_srli_si128(c0, 8))), vdm));
      _mm256_storeu_ps(os + 16, _mm256_sub_ps(_mm256_mul_ps(vds, u8x8(c1)), vdm));
      _mm256_storeu_ps(os + 24, _mm256_sub_ps(_mm256_mul_ps(vds, u8x8(_mm_srli_si128(c1, 8))), vdm));
#else
      for (int t = 0; t < 32; ++t) os[t] = ds * float((src[t] >> shift) & 15) - dm;
#endif
    }
  }
}

// IQ2_XXS's signed grid in two small tables (3 KiB, L1-resident) instead of the 256 KiB
// [grid * 128 + sign] one: the 256 magnitudes (sign index 0 negates nothing) and, per sign
// index, 8 bytes of +1 / -1 (read off grid entry 0, whose magnitudes are all 8), applied
// with a byte-wise sign; the same int8 values. Built once from the table the caller passes
// (its content is ggml's constant).
struct IQ2Small {
  alignas(64) uint64_t grid[256];
  uint64_t sign[128];
};

const IQ2Small& iq2_small(const uint64_t* table) {
  static const IQ2Small small = [table] {
    IQ2Small t;
    for (int i = 0; i < 256; ++i) t.grid[i] = table[i * 128];
    for (int k = 0; k < 128; ++k) {
      int8_t v[8], sg[8];
      std::memcpy(v, &table[k], 8);
      for (int j = 0; j < 8; ++j) sg[j] = v[j] < 0 ? -1 : 1;
      std::memcpy(&t.sign[k], sg, 8);
    }
    return t;
  }();
  return small;
}

#ifdef WB_AVX2
// The 8 signed int8 values of grid entry gi with sign index si, as 8 floats.
inline __m256 iq2_values(const IQ2Small& t, uint32_t gi, uint32_t si) {
  const __m128i g = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&t.grid[gi]));
  const __m128i sg = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&t.sign[si]));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_sign_epi8(g, sg)));
}
#endif

void iq2_xxs_blocks(const uint8_t* in, float* out, size_t b0, size_t b1, const uint64_t* table) {
#ifdef WB_AVX2
  const IQ2Small& small = iq2_small(table);
#endif
  for (size_t b = b0; b < b1; ++b) {
    const uint8_t* blk = in + b * 66;
    float* o = out + b * 256;
    const float d = half_to_float(load_u16(blk));
    for (int g = 0; g < 8; ++g) {
      const uint8_t* grp = blk + 2 + g * 8;
      const uint32_t a1 = load_u32(grp + 4);
      const float db = d * (0.5f + float(a1 >> 28)) * 0.25f;
#ifdef WB_AVX2
      const __m256 vdb = _mm256_set1_ps(db);
#endif
      for (int k = 0; k < 4; ++k) {
        float* ok = o + g * 32 + k * 8;
#ifdef WB_AVX2
        _mm256_storeu_ps(ok, _mm256_mul_ps(vdb, iq2_values(small, grp[k], (a1 >> (7 * k)) & 127)));
#else
        const uint64_t v = table[uint32_t(grp[k]) * 128 + ((a1 >> (7 * k)) & 127)];
        int8_t s8[8];
        std::memcpy(s8, &v, 8);
        for (int j = 0; j < 8; ++j) ok[j] = db * float(s8[j]);
#endif
      }
    }
  }
}

// MXFP4: byte 0 the E8M0 exponent e, then 16 bytes; byte j holds element j (low nibble) and
// element j + 16 (high nibble). The scale is ggml's e8m0_to_fp32_half: 2^(e-128) from its bits
// (0x00200000 << e for e < 2, (e - 1) << 23 otherwise); code 8 is +0.
void mxfp4_blocks(const uint8_t* in, float* out, size_t b0, size_t b1) {
  static const float kDoubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  for (size_t b = b0; b < b1; ++b) {
    const uint8_t* blk = in + b * 17;
    float* o = out + b * 32;
    const uint32_t e = blk[0];
    const uint32_t bits = e < 2 ? 0x00200000u << e : (e - 1) << 23;
    float d;
    std::memcpy(&d, &bits, 4);
    for (int j = 0; j < 16; ++j) {
      o[j] = d * kDoubled[blk[1 + j] & 15];
      o[j + 16] = d * kDoubled[blk[1 + j] >> 4];
    }
  }
}

// Expand `n` blocks of type `type` at `in` into `out` (float32).
inline void expand_blocks(int type, const uint8_t* in, float* out, size_t n, const uint64_t* table) {
  switch (type) {
    case F16: f16_blocks(in, out, 0, n); break;
    case BF16: bf16_blocks(in, out, 0, n); break;
    case Q8_0: q8_0_blocks(in, out, 0, n); break;
    case Q2_K: q2_k_blocks(in, out, 0, n); break;
    case Q4_K: q4_k_blocks(in, out, 0, n); break;
    case IQ2_XXS: iq2_xxs_blocks(in, out, 0, n, table); break;
    case MXFP4: mxfp4_blocks(in, out, 0, n); break;
  }
}

inline float dot(const float* a, const float* b, size_t n) {
  size_t i = 0;
  float tail = 0.0f;
#ifdef WB_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  tail = _mm_cvtss_f32(h);
#endif
  for (; i < n; ++i) tail += a[i] * b[i];
  return tail;
}

constexpr size_t kMaxRows = 64;  // rows of x a qmv call takes

// --- few-row products: fused per-block dots (no float32 weight written) ----------------------
//
// A block's dot with x factors its scale out: d * Σ q·x (Q8_0, IQ2_XXS: d·(0.5+s)·0.25 per 32),
// Σ_g (d·sc_g)·Σ q·x - Σ_g (dmin·m_g)·Σ x (Q2_K groups of 16, Q4_K of 32; the Σ x per 16
// inputs are taken once per call). Other types (and builds without AVX2) expand each row
// into an L1 buffer and dot it.

#ifdef WB_AVX2
inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// Independent accumulators (a chain of dependent multiply-adds would wait on each one's latency).
float q8_0_row_dot(const uint8_t* row, const float* x, const float*, size_t n_in, const uint64_t*) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (size_t b = 0; b < n_in / 32; ++b) {
    const uint8_t* blk = row + b * 34;
    const float* xb = x + b * 32;
    const __m256 p0 = _mm256_fmadd_ps(i8x8(blk + 10), _mm256_loadu_ps(xb + 8),
                                      _mm256_mul_ps(i8x8(blk + 2), _mm256_loadu_ps(xb)));
    const __m256 p1 = _mm256_fmadd_ps(i8x8(blk + 26), _mm256_loadu_ps(xb + 24),
                                      _mm256_mul_ps(i8x8(blk + 18), _mm256_loadu_ps(xb + 16)));
    acc[b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(load_u16(blk))), _mm256_add_ps(p0, p1), acc[b & 1]);
  }
  return hsum(_mm256_add_ps(acc[0], acc[1]));
}

float iq2_xxs_row_dot(const uint8_t* row, const float* x, const float*, size_t n_in, const uint64_t* table) {
  const IQ2Small& small = iq2_small(table);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (size_t b = 0; b < n_in / 256; ++b) {
    const uint8_t* blk = row + b * 66;
    const float d = half_to_float(load_u16(blk));
    for (int g = 0; g < 8; ++g) {
      const uint8_t* grp = blk + 2 + g * 8;
      const uint32_t a1 = load_u32(grp + 4);
      const float* xg = x + b * 256 + g * 32;
      __m256 v[4];
      for (int k = 0; k < 4; ++k) v[k] = iq2_values(small, grp[k], (a1 >> (7 * k)) & 127);
      const __m256 p0 = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xg + 8), _mm256_mul_ps(v[0], _mm256_loadu_ps(xg)));
      const __m256 p1 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xg + 24), _mm256_mul_ps(v[2], _mm256_loadu_ps(xg + 16)));
      acc[g & 1] = _mm256_fmadd_ps(_mm256_set1_ps(d * (0.5f + float(a1 >> 28)) * 0.25f), _mm256_add_ps(p0, p1),
                                   acc[g & 1]);
    }
  }
  return hsum(_mm256_add_ps(acc[0], acc[1]));
}

// xsum: Σ x per 16 inputs of this x row
float q2_k_row_dot(const uint8_t* row, const float* x, const float* xsum, size_t n_in, const uint64_t*) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 mins = _mm256_setzero_ps();
  for (size_t b = 0; b < n_in / 256; ++b) {
    const uint8_t* blk = row + b * 84;
    const uint8_t* qs = blk + 16;
    const __m256 d = _mm256_set1_ps(half_to_float(load_u16(blk + 80)));
    const __m256 dmin = _mm256_set1_ps(half_to_float(load_u16(blk + 82)));
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    const __m128i lo4 = _mm_and_si128(sc, _mm_set1_epi8(15));
    const __m128i hi4 = _mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(15));
    alignas(32) float dl[16];
    _mm256_store_ps(dl, _mm256_mul_ps(d, u8x8(lo4)));
    _mm256_store_ps(dl + 8, _mm256_mul_ps(d, u8x8(_mm_srli_si128(lo4, 8))));
    const float* xs = xsum + b * 16;
    mins = _mm256_fmadd_ps(_mm256_mul_ps(dmin, u8x8(hi4)), _mm256_loadu_ps(xs), mins);
    mins = _mm256_fmadd_ps(_mm256_mul_ps(dmin, u8x8(_mm_srli_si128(hi4, 8))), _mm256_loadu_ps(xs + 8), mins);
    for (int g = 0; g < 16; ++g) {
      const uint8_t* src = qs + (g / 8) * 32 + (g % 2) * 16;
      const int shift = 2 * ((g % 8) / 2);
      const __m128i codes = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)), shift),
                                          _mm_set1_epi8(3));
      const float* xg = x + b * 256 + g * 16;
      const __m256 p = _mm256_fmadd_ps(u8x8(_mm_srli_si128(codes, 8)), _mm256_loadu_ps(xg + 8),
                                       _mm256_mul_ps(u8x8(codes), _mm256_loadu_ps(xg)));
      acc[g & 3] = _mm256_fmadd_ps(_mm256_set1_ps(dl[g]), p, acc[g & 3]);
    }
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) - hsum(mins);
}

float q4_k_row_dot(const uint8_t* row, const float* x, const float* xsum, size_t n_in, const uint64_t*) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  float mins = 0.0f;
  for (size_t b = 0; b < n_in / 256; ++b) {
    const uint8_t* blk = row + b * 144;
    const uint8_t *lo = blk + 4, *mid = blk + 8, *hi = blk + 12, *qs = blk + 16;
    const float d = half_to_float(load_u16(blk));
    const float dmin = half_to_float(load_u16(blk + 2));
    for (int s = 0; s < 8; ++s) {
      const int sc = s < 4 ? (lo[s] & 63) : ((hi[s - 4] & 15) | ((lo[s - 4] >> 6) << 4));
      const int mn = s < 4 ? (mid[s] & 63) : ((hi[s - 4] >> 4) | ((mid[s - 4] >> 6) << 4));
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + (s / 2) * 32));
      const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (s % 2)), _mm256_set1_epi8(15));
      const __m128i c0 = _mm256_castsi256_si128(codes), c1 = _mm256_extracti128_si256(codes, 1);
      const float* xg = x + b * 256 + s * 32;
      const __m256 p0 = _mm256_fmadd_ps(u8x8(_mm_srli_si128(c0, 8)), _mm256_loadu_ps(xg + 8),
                                        _mm256_mul_ps(u8x8(c0), _mm256_loadu_ps(xg)));
      const __m256 p1 = _mm256_fmadd_ps(u8x8(_mm_srli_si128(c1, 8)), _mm256_loadu_ps(xg + 24),
                                        _mm256_mul_ps(u8x8(c1), _mm256_loadu_ps(xg + 16)));
      acc[s & 1] = _mm256_fmadd_ps(_mm256_set1_ps(d * float(sc)), _mm256_add_ps(p0, p1), acc[s & 1]);
      mins += dmin * float(mn) * (xsum[b * 16 + 2 * s] + xsum[b * 16 + 2 * s + 1]);
    }
  }
  return hsum(_mm256_add_ps(acc[0], acc[1])) - mins;
}

// The same dots for M rows of x at once (x rows n_in apart, their Σ x per 16 n_in / 16
// apart): each weight group is converted and scaled once and multiplied into every row's
// accumulator (so the sums round in another order than the one-row dots: like any matmul).
template <int M>
void q8_0_rows_dot(const uint8_t* row, const float* x, const float*, size_t n_in, const uint64_t*, float* res) {
  __m256 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
  for (size_t b = 0; b < n_in / 32; ++b) {
    const uint8_t* blk = row + b * 34;
    const __m256 d = _mm256_set1_ps(half_to_float(load_u16(blk)));
    const __m256 v0 = _mm256_mul_ps(d, i8x8(blk + 2)), v1 = _mm256_mul_ps(d, i8x8(blk + 10));
    const __m256 v2 = _mm256_mul_ps(d, i8x8(blk + 18)), v3 = _mm256_mul_ps(d, i8x8(blk + 26));
    for (int r = 0; r < M; ++r) {
      const float* xb = x + r * n_in + b * 32;
      acc[r] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xb), acc[r]);
      acc[r] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xb + 8), acc[r]);
      acc[r] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(xb + 16), acc[r]);
      acc[r] = _mm256_fmadd_ps(v3, _mm256_loadu_ps(xb + 24), acc[r]);
    }
  }
  for (int r = 0; r < M; ++r) res[r] = hsum(acc[r]);
}

template <int M>
void iq2_xxs_rows_dot(const uint8_t* row, const float* x, const float*, size_t n_in, const uint64_t* table,
                      float* res) {
  const IQ2Small& small = iq2_small(table);
  __m256 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
  for (size_t b = 0; b < n_in / 256; ++b) {
    const uint8_t* blk = row + b * 66;
    const float d = half_to_float(load_u16(blk));
    for (int g = 0; g < 8; ++g) {
      const uint8_t* grp = blk + 2 + g * 8;
      const uint32_t a1 = load_u32(grp + 4);
      const __m256 db = _mm256_set1_ps(d * (0.5f + float(a1 >> 28)) * 0.25f);
      __m256 v[4];
      for (int k = 0; k < 4; ++k) v[k] = _mm256_mul_ps(db, iq2_values(small, grp[k], (a1 >> (7 * k)) & 127));
      for (int r = 0; r < M; ++r) {
        const float* xg = x + r * n_in + b * 256 + g * 32;
        for (int k = 0; k < 4; ++k) acc[r] = _mm256_fmadd_ps(v[k], _mm256_loadu_ps(xg + 8 * k), acc[r]);
      }
    }
  }
  for (int r = 0; r < M; ++r) res[r] = hsum(acc[r]);
}

template <int M>
void q2_k_rows_dot(const uint8_t* row, const float* x, const float* xsum, size_t n_in, const uint64_t*, float* res) {
  __m256 acc[M], mins[M];
  for (int r = 0; r < M; ++r) acc[r] = mins[r] = _mm256_setzero_ps();
  for (size_t b = 0; b < n_in / 256; ++b) {
    const uint8_t* blk = row + b * 84;
    const uint8_t* qs = blk + 16;
    const __m256 d = _mm256_set1_ps(half_to_float(load_u16(blk + 80)));
    const __m256 dmin = _mm256_set1_ps(half_to_float(load_u16(blk + 82)));
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    const __m128i lo4 = _mm_and_si128(sc, _mm_set1_epi8(15));
    const __m128i hi4 = _mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(15));
    alignas(32) float dl[16];
    _mm256_store_ps(dl, _mm256_mul_ps(d, u8x8(lo4)));
    _mm256_store_ps(dl + 8, _mm256_mul_ps(d, u8x8(_mm_srli_si128(lo4, 8))));
    const __m256 ml0 = _mm256_mul_ps(dmin, u8x8(hi4)), ml1 = _mm256_mul_ps(dmin, u8x8(_mm_srli_si128(hi4, 8)));
    for (int r = 0; r < M; ++r) {
      const float* xs = xsum + r * (n_in / 16) + b * 16;
      mins[r] = _mm256_fmadd_ps(ml1, _mm256_loadu_ps(xs + 8), _mm256_fmadd_ps(ml0, _mm256_loadu_ps(xs), mins[r]));
    }
    for (int g = 0; g < 16; ++g) {
      const uint8_t* src = qs + (g / 8) * 32 + (g % 2) * 16;
      const int shift = 2 * ((g % 8) / 2);
      const __m128i codes = _mm_and_si128(_mm_srli_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)), shift),
                                          _mm_set1_epi8(3));
      const __m256 vdl = _mm256_set1_ps(dl[g]);
      const __m256 c0 = _mm256_mul_ps(vdl, u8x8(codes)), c1 = _mm256_mul_ps(vdl, u8x8(_mm_srli_si128(codes, 8)));
      for (int r = 0; r < M; ++r) {
        const float* xg = x + r * n_in + b * 256 + g * 16;
        acc[r] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xg + 8), _mm256_fmadd_ps(c0, _mm256_loadu_ps(xg), acc[r]));
      }
    }
  }
  for (int r = 0; r < M; ++r) res[r] = hsum(acc[r]) - hsum(mins[r]);
}

template <int M>
void q4_k_rows_dot(const uint8_t* row, const float* x, const float* xsum, size_t n_in, const uint64_t*, float* res) {
  __m256 acc[M];
  float mins[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps(), mins[r] = 0.0f;
  for (size_t b = 0; b < n_in / 256; ++b) {
    const uint8_t* blk = row + b * 144;
    const uint8_t *lo = blk + 4, *mid = blk + 8, *hi = blk + 12, *qs = blk + 16;
    const float d = half_to_float(load_u16(blk));
    const float dmin = half_to_float(load_u16(blk + 2));
    for (int s = 0; s < 8; ++s) {
      const int sc = s < 4 ? (lo[s] & 63) : ((hi[s - 4] & 15) | ((lo[s - 4] >> 6) << 4));
      const int mn = s < 4 ? (mid[s] & 63) : ((hi[s - 4] >> 4) | ((mid[s - 4] >> 6) << 4));
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + (s / 2) * 32));
      const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(raw, 4 * (s % 2)), _mm256_set1_epi8(15));
      const __m128i c0 = _mm256_castsi256_si128(codes), c1 = _mm256_extracti128_si256(codes, 1);
      const __m256 ds = _mm256_set1_ps(d * float(sc));
      const __m256 v0 = _mm256_mul_ps(ds, u8x8(c0)), v1 = _mm256_mul_ps(ds, u8x8(_mm_srli_si128(c0, 8)));
      const __m256 v2 = _mm256_mul_ps(ds, u8x8(c1)), v3 = _mm256_mul_ps(ds, u8x8(_mm_srli_si128(c1, 8)));
      const float dm = dmin * float(mn);
      for (int r = 0; r < M; ++r) {
        const float* xg = x + r * n_in + b * 256 + s * 32;
        acc[r] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xg + 8), _mm256_fmadd_ps(v0, _mm256_loadu_ps(xg), acc[r]));
        acc[r] = _mm256_fmadd_ps(v3, _mm256_loadu_ps(xg + 24), _mm256_fmadd_ps(v2, _mm256_loadu_ps(xg + 16), acc[r]));
        const float* xs = xsum + r * (n_in / 16) + b * 16 + 2 * s;
        mins[r] += dm * (xs[0] + xs[1]);
      }
    }
  }
  for (int r = 0; r < M; ++r) res[r] = hsum(acc[r]) - mins[r];
}
#endif

using RowDot = float (*)(const uint8_t*, const float*, const float*, size_t, const uint64_t*);
using RowsDot = void (*)(const uint8_t*, const float*, const float*, size_t, const uint64_t*, float*);

// The fused dots of `type`: one row (two accumulators), and 1-4 rows at once (nullptr: expand and dot).
struct FusedDots {
  RowDot one;
  RowsDot many[4];
};

FusedDots fused_dots_of(int type) {
#ifdef WB_AVX2
  switch (type) {
    case Q8_0: return {q8_0_row_dot, {q8_0_rows_dot<1>, q8_0_rows_dot<2>, q8_0_rows_dot<3>,
                              q8_0_rows_dot<4>}};
    case IQ2_XXS: return {iq2_xxs_row_dot, {iq2_xxs_rows_dot<1>, iq2_xxs_rows_dot<2>, iq2_xxs_rows_dot<3>,
                                 iq2_xxs_rows_dot<4>}};
    case Q2_K: return {q2_k_row_dot, {q2_k_rows_dot<1>, q2_k_rows_dot<2>, q2_k_rows_dot<3>,
                                 q2_k_rows_dot<4>}};
    case Q4_K: return {q4_k_row_dot, {q4_k_rows_dot<1>, q4_k_rows_dot<2>, q4_k_rows_dot<3>,
                                 q4_k_rows_dot<4>}};
  }
#endif
  (void)type;
  return {nullptr, {nullptr, nullptr, nullptr, nullptr}};
}

// Σ x per 16 inputs: xsum [rows, n_in / 16] for x [rows, n_in].
std::vector<float> sums16(const float* x, size_t rows, size_t n_in) {
  std::vector<float> out(rows * (n_in / 16));
  for (size_t i = 0; i < out.size(); ++i) {
    const float* p = x + (i / (n_in / 16)) * n_in + (i % (n_in / 16)) * 16;
    float s = 0.0f;
    for (int j = 0; j < 16; ++j) s += p[j];
    out[i] = s;
  }
  return out;
}

// out[r, o] for o in [o0, o1). Row o of W takes x group o / rows_per_group (x [groups, m, n_in]).
void qmv_rows(int type, const float* x, const float* xsum, size_t m, size_t n_in, size_t rows_per_group,
              const uint8_t* w, size_t row_bytes, float* out, size_t n_out, size_t o0, size_t o1,
              const uint64_t* table) {
  const Format f = format_of(type);
  const FusedDots fused = fused_dots_of(type);
  constexpr size_t kSpan = 4096;  // elements expanded at once (16 KiB, L1-resident)
  alignas(32) float buf[kSpan];
  for (size_t o = o0; o < o1; ++o) {
    const uint8_t* row = w + o * row_bytes;
    const size_t g = o / rows_per_group;
    const float* xg = x + g * m * n_in;
    if (fused.one) {
      const float* xs = xsum + g * m * (n_in / 16);
      if (m == 1) {
        out[o] = fused.one(row, xg, xs, n_in, table);
        continue;
      }
      float res[4];
      for (size_t r0 = 0; r0 < m; r0 += 4) {  // rows in fours
        const size_t k = std::min<size_t>(4, m - r0);
        fused.many[k - 1](row, xg + r0 * n_in, xs + r0 * (n_in / 16), n_in, table, res);
        for (size_t r = 0; r < k; ++r) out[(r0 + r) * n_out + o] = res[r];
      }
      continue;
    }
    float acc[kMaxRows] = {};
    for (size_t e0 = 0; e0 < n_in; e0 += kSpan) {
      const size_t n = std::min(kSpan, n_in - e0);
      expand_blocks(type, row + (e0 / f.block_elems) * f.block_bytes, buf, n / f.block_elems, table);
      for (size_t r = 0; r < m; ++r) acc[r] += dot(buf, xg + r * n_in + e0, n);
    }
    for (size_t r = 0; r < m; ++r) out[r * n_out + o] = acc[r];
  }
}

void affine8_rows(const float* x, const float* xsum, size_t m, size_t n_in, const uint8_t* wq, const float* scales,
                  const float* biases, float* out, size_t n_out, size_t o0, size_t o1) {
  const size_t groups = n_in / 32;
  for (size_t o = o0; o < o1; ++o) {
    const uint8_t* q = wq + o * n_in;
    const float* sc = scales + o * groups;
    const float* bi = biases + o * groups;
    for (size_t r = 0; r < m; ++r) {
      const float* xr = x + r * n_in;
      const float* xs = xsum + r * groups;
      float total = 0.0f;
#ifdef WB_AVX2
      __m256 acc = _mm256_setzero_ps();
      for (size_t g = 0; g < groups; ++g) {
        const uint8_t* qg = q + g * 32;
        const float* xg = xr + g * 32;
        __m256 d = _mm256_mul_ps(u8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qg))), _mm256_loadu_ps(xg));
        d = _mm256_fmadd_ps(u8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qg + 8))), _mm256_loadu_ps(xg + 8), d);
        d = _mm256_fmadd_ps(u8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qg + 16))), _mm256_loadu_ps(xg + 16), d);
        d = _mm256_fmadd_ps(u8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qg + 24))), _mm256_loadu_ps(xg + 24), d);
        acc = _mm256_fmadd_ps(d, _mm256_set1_ps(sc[g]), acc);
        total += bi[g] * xs[g];
      }
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      total += _mm_cvtss_f32(h);
#else
      for (size_t g = 0; g < groups; ++g) {
        float d = 0.0f;
        for (int j = 0; j < 32; ++j) d += float(q[g * 32 + j]) * xr[g * 32 + j];
        total += sc[g] * d + bi[g] * xs[g];
      }
#endif
      out[r * n_out + o] = total;
    }
  }
}

// Threads for `bytes` of work: 1 below 1 MiB; else every core, at most 4 for expansion
// (memory bound beyond that) and 8 for the compute-bound few-row products. On a machine
// whose cores are shared, more threads also take a fairer share of them: the heavier
// kernels (Q4_K, IQ2_XXS) fell to ~0.4 of a copy on one thread beside other work.
// WORKBENCH_DEQUANT_THREADS overrides both.
int threads_for(size_t bytes, bool compute_bound) {
  static const int hw = std::max(1, int(std::thread::hardware_concurrency()));
  static const char* env = std::getenv("WORKBENCH_DEQUANT_THREADS");
  if (bytes < (size_t(1) << 20)) return 1;
  if (env) return std::clamp(std::atoi(env), 1, 16);
  return std::min(hw, compute_bound ? 8 : 4);
}

template <class F>
void parallel_blocks(size_t n_blocks, size_t bytes, bool compute_bound, F&& body) {
  const int n_threads = int(std::min<size_t>(threads_for(bytes, compute_bound), std::max<size_t>(n_blocks, 1)));
  if (n_threads <= 1) {
    body(0, n_blocks);
    return;
  }
  std::vector<std::thread> pool;
  const size_t step = (n_blocks + n_threads - 1) / n_threads;
  for (int t = 1; t < n_threads; ++t) {
    const size_t b0 = std::min(n_blocks, t * step), b1 = std::min(n_blocks, (t + 1) * step);
    pool.emplace_back([&body, b0, b1] { body(b0, b1); });
  }
  body(0, std::min(n_blocks, step));
  for (auto& th : pool) th.join();
}

class Dequantize : public mx::UnaryPrimitive {
 public:
  Dequantize(mx::Stream stream, int type) : mx::UnaryPrimitive(stream), type_(type) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& blocks = inputs[0];
    if (!blocks.flags().row_contiguous) throw std::runtime_error("workbench native dequantize: input not contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const Format f = format_of(type_);
    const size_t n_blocks = blocks.size() / f.block_bytes;
    const uint8_t* src = blocks.data<uint8_t>();
    float* dst = out.data<float>();
    const uint64_t* table = inputs.size() > 1 ? inputs[1].data<uint64_t>() : nullptr;
    const size_t out_bytes = out.nbytes();
    const int type = type_;
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(blocks);
    encoder.set_output_array(out);
    encoder.dispatch([=]() {
      parallel_blocks(n_blocks, out_bytes, false, [&](size_t b0, size_t b1) {
        switch (type) {
          case F16: f16_blocks(src, dst, b0, b1); break;
          case BF16: bf16_blocks(src, dst, b0, b1); break;
          case Q8_0: q8_0_blocks(src, dst, b0, b1); break;
          case Q2_K: q2_k_blocks(src, dst, b0, b1); break;
          case Q4_K: q4_k_blocks(src, dst, b0, b1); break;
          case IQ2_XXS: iq2_xxs_blocks(src, dst, b0, b1, table); break;
          case MXFP4: mxfp4_blocks(src, dst, b0, b1); break;
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("workbench native dequantize runs on the CPU stream only");
  }

  const char* name() const override { return "WorkbenchDequantize"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return type_ == static_cast<const Dequantize&>(other).type_;
  }

 private:
  int type_;
};


// Weights a qmv reads in place: a C-contiguous uint8 NumPy array (e.g. a view of a memory-
// mapped GGUF file). The reference keeps the array, hence the mapping, alive while the
// primitive exists (nanobind takes the GIL itself when the last reference goes).
using MappedBytes = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// x [groups, m, in] float32 @ W.T, W ggml blocks uint8 [out, row_bytes] (+ IQ2_XXS table)
// -> [m, out]; output row o takes x group o / (out / groups). W is input 1, or `mapped`.
class QMatVec : public mx::UnaryPrimitive {
 public:
  QMatVec(mx::Stream stream, int type, std::optional<MappedBytes> mapped)
      : mx::UnaryPrimitive(stream), type_(type), mapped_(std::move(mapped)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const size_t groups = x.shape(0), m = x.shape(1), n_in = x.shape(2), n_out = out.shape(1);
    const size_t row_bytes = n_in / format_of(type_).block_elems * format_of(type_).block_bytes;
    const float* xp = x.data<float>();
    const uint8_t* wp = mapped_ ? mapped_->data() : inputs[1].data<uint8_t>();
    const size_t next = mapped_ ? 1 : 2;
    const uint64_t* table = inputs.size() > next ? inputs[next].data<uint64_t>() : nullptr;
    float* op = out.data<float>();
    const int type = type_;
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& in : inputs) encoder.set_input_array(in);
    encoder.set_output_array(out);
    encoder.dispatch([=]() {
      const std::vector<float> xsum = fused_dots_of(type).one ? sums16(xp, groups * m, n_in) : std::vector<float>();
      const float* xs = xsum.data();
      parallel_blocks(n_out, n_out * row_bytes, true, [&](size_t o0, size_t o1) {
        qmv_rows(type, xp, xs, m, n_in, n_out / groups, wp, row_bytes, op, n_out, o0, o1, table);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("workbench native qmv runs on the CPU stream only");
  }

  const char* name() const override { return "WorkbenchQMatVec"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QMatVec&>(other);
    return type_ == o.type_ && (mapped_ ? mapped_->data() : nullptr) == (o.mapped_ ? o.mapped_->data() : nullptr);
  }

 private:
  int type_;
  std::optional<MappedBytes> mapped_;
};

// x [m, in] float32 @ W.T, W affine 8-bit (wq uint32 [out, in/4], scales/biases [out, in/32])
class Affine8MatVec : public mx::UnaryPrimitive {
 public:
  explicit Affine8MatVec(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array &x = inputs[0], &wq = inputs[1], &sc = inputs[2], &bi = inputs[3];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const size_t m = x.shape(0), n_in = x.shape(1), n_out = wq.shape(0);
    const float* xp = x.data<float>();
    const uint8_t* wp = wq.data<uint8_t>();
    const float *sp = sc.data<float>(), *bp = bi.data<float>();
    float* op = out.data<float>();
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.dispatch([=]() {
      const size_t groups = n_in / 32;
      std::vector<float> xsum(m * groups);
      for (size_t r = 0; r < m; ++r)
        for (size_t g = 0; g < groups; ++g) {
          float acc = 0.0f;
          for (int j = 0; j < 32; ++j) acc += xp[r * n_in + g * 32 + j];
          xsum[r * groups + g] = acc;
        }
      const float* xs = xsum.data();
      parallel_blocks(n_out, n_out * n_in, true, [&](size_t o0, size_t o1) {
        affine8_rows(xp, xs, m, n_in, wp, sp, bp, op, n_out, o0, o1);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("workbench native affine8_qmv runs on the CPU stream only");
  }

  const char* name() const override { return "WorkbenchAffine8MatVec"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// x: float32 [m, in], or [groups, m, in] with out % groups == 0; W [out, row_bytes].
mx::array qmv_any(const mx::array& x, const mx::array* w, std::optional<MappedBytes> mapped, size_t n_out,
                  size_t row_bytes, int type, std::optional<mx::array> table) {
  const Format f = format_of(type);
  const bool grouped = x.ndim() == 3;
  const int rows = grouped ? x.shape(1) : x.shape(0);
  const size_t groups = grouped ? x.shape(0) : 1;
  if (x.dtype() != mx::float32 || (x.ndim() != 2 && x.ndim() != 3) || size_t(rows) > kMaxRows || rows < 1 ||
      groups < 1 || n_out % groups)
    throw std::invalid_argument("workbench native qmv: x must be float32 [m, in] or [groups, m, in] with "
                                "1 <= m <= 64 and groups dividing the output rows");
  const int n_in = x.shape(-1);
  if (n_in % f.block_elems || row_bytes != size_t(n_in) / f.block_elems * f.block_bytes)
    throw std::invalid_argument("workbench native qmv: w must be uint8 [out, in / block_elems * block_bytes]");
  const mx::Stream s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {mx::contiguous(grouped ? x : mx::expand_dims(x, 0, s), false, s)};
  if (w) inputs.push_back(mx::contiguous(*w, false, s));
  if (type == IQ2_XXS) {
    if (!table || table->dtype() != mx::uint64 || table->size() != 256 * 128)
      throw std::invalid_argument("workbench native qmv: IQ2_XXS needs the uint64 [32768] signed-grid table");
    inputs.push_back(mx::contiguous(*table, false, s));
  }
  return mx::array({rows, int(n_out)}, mx::float32, std::make_shared<QMatVec>(s, type, std::move(mapped)),
                   std::move(inputs));
}

mx::array qmv(const mx::array& x, const mx::array& w, int type, std::optional<mx::array> table) {
  if (w.dtype() != mx::uint8 || w.ndim() != 2)
    throw std::invalid_argument("workbench native qmv: w must be uint8 [out, in / block_elems * block_bytes]");
  return qmv_any(x, &w, std::nullopt, w.shape(0), w.shape(1), type, std::move(table));
}

mx::array qmv_mapped(const mx::array& x, MappedBytes w, int type, std::optional<mx::array> table) {
  const size_t n_out = w.shape(0), row_bytes = w.shape(1);
  return qmv_any(x, nullptr, std::move(w), n_out, row_bytes, type, std::move(table));
}

mx::array affine8_qmv(const mx::array& x, const mx::array& wq, const mx::array& scales, const mx::array& biases) {
  if (x.dtype() != mx::float32 || x.ndim() != 2 || size_t(x.shape(0)) > kMaxRows || x.shape(0) < 1 ||
      x.shape(1) % 32)
    throw std::invalid_argument("workbench native affine8_qmv: x must be float32 [m, in], 1 <= m <= 64, in % 32 == 0");
  if (wq.dtype() != mx::uint32 || wq.ndim() != 2 || wq.shape(1) * 4 != x.shape(1) ||
      scales.dtype() != mx::float32 || biases.dtype() != mx::float32 || scales.shape() != biases.shape() ||
      scales.ndim() != 2 || scales.shape(0) != wq.shape(0) || scales.shape(1) * 32 != x.shape(1))
    throw std::invalid_argument("workbench native affine8_qmv: wq uint32 [out, in/4], float32 scales/biases [out, in/32]");
  const mx::Stream s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {mx::contiguous(x, false, s), mx::contiguous(wq, false, s),
                                   mx::contiguous(scales, false, s), mx::contiguous(biases, false, s)};
  return mx::array({x.shape(0), wq.shape(0)}, mx::float32, std::make_shared<Affine8MatVec>(s), std::move(inputs));
}

// blocks: uint8 [n, block_bytes] -> float32 [n, block_elems]; table: IQ2_XXS's uint64 [32768].
mx::array dequantize(const mx::array& blocks, int type, std::optional<mx::array> table) {
  const Format f = format_of(type);
  if (blocks.dtype() != mx::uint8 || blocks.ndim() != 2 || blocks.shape(1) != f.block_bytes)
    throw std::invalid_argument("workbench native dequantize: blocks must be uint8 [n, " +
                                std::to_string(f.block_bytes) + "]");
  const mx::Stream s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {mx::contiguous(blocks, false, s)};
  if (type == IQ2_XXS) {
    if (!table || table->dtype() != mx::uint64 || table->size() != 256 * 128)
      throw std::invalid_argument("workbench native dequantize: IQ2_XXS needs the uint64 [32768] signed-grid table");
    inputs.push_back(mx::contiguous(*table, false, s));
  }
  return mx::array({blocks.shape(0), f.block_elems}, mx::float32, std::make_shared<Dequantize>(s, type),
                   std::move(inputs));
}

// GGUF string array scan (workbench/gguf/reader.py): item i's u64 length field is at
// offsets[i]; returns the byte after the last item, or -1 when a length runs past `size`.
int64_t scan_strings(nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> buf, int64_t start,
                     nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> offsets) {
  const uint8_t* p = buf.data();
  const uint64_t size = buf.shape(0);
  int64_t* out = offsets.data();
  uint64_t pos = uint64_t(start);
  for (size_t i = 0, n = offsets.shape(0); i < n; ++i) {
    if (pos > size || size - pos < 8) return -1;
    uint64_t len;
    std::memcpy(&len, p + pos, 8);
    out[i] = int64_t(pos);
    pos += 8;
    if (len > size - pos) return -1;
    pos += len;
  }
  return int64_t(pos);
}

// UTF-8 check of a GGUF string array's items (workbench/gguf/reader.py): item i is the bytes
// after its u64 length field at offsets[i] (relative to buf), up to the next field (the last:
// to the end of buf). Strict, as Python's decoder: no overlong forms, no surrogates, nothing
// above U+10FFFF. Returns the first invalid item, or -1.
int64_t check_utf8(nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> buf,
                   nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> offsets) {
  const uint8_t* p = buf.data();
  const int64_t size = buf.shape(0), n = offsets.shape(0);
  const int64_t* off = offsets.data();
  for (int64_t i = 0; i < n; ++i) {
    int64_t a = off[i] + 8;
    const int64_t b = i + 1 < n ? off[i + 1] : size;
    if (a > b || b > size) return i;
    while (a < b) {
      const uint8_t c = p[a];
      if (c < 0x80) {
        ++a;
        continue;
      }
      int len;
      uint32_t lo = 0x80, hi = 0xBF;  // bounds of the second byte
      if (c >= 0xC2 && c <= 0xDF) len = 2;
      else if (c == 0xE0) len = 3, lo = 0xA0;
      else if (c == 0xED) len = 3, hi = 0x9F;
      else if (c >= 0xE1 && c <= 0xEF) len = 3;
      else if (c == 0xF0) len = 4, lo = 0x90;
      else if (c == 0xF4) len = 4, hi = 0x8F;
      else if (c >= 0xF1 && c <= 0xF3) len = 4;
      else return i;
      if (b - a < len || p[a + 1] < lo || p[a + 1] > hi) return i;
      for (int k = 2; k < len; ++k)
        if ((p[a + k] & 0xC0) != 0x80) return i;
      a += len;
    }
  }
  return -1;
}

}  // namespace

NB_MODULE(_native, m) {
  using namespace nb::literals;
  m.doc() = "workbench native CPU kernels (see native/dequant.cpp)";
  m.attr("mlx_version") = WORKBENCH_MLX_VERSION;
  m.def("dequantize", &dequantize, "blocks"_a, "ggml_type"_a, "table"_a = nb::none(),
        "ggml blocks uint8 [n, block_bytes] -> float32 [n, block_elems] (F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS, MXFP4).");
  m.def("qmv", &qmv, "x"_a, "w"_a, "ggml_type"_a, "table"_a = nb::none(),
        "x float32 [m <= 64, in] (or [groups, m, in]: output row o takes group o / (out / groups)) @ W.T for W as "
        "ggml blocks uint8 [out, row_bytes] -> float32 [m, out].");
  m.def("qmv_mapped", &qmv_mapped, "x"_a, "w"_a.noconvert(), "ggml_type"_a, "table"_a = nb::none(),
        "qmv with W a C-contiguous uint8 NumPy array [out, row_bytes] read in place (no copy; kept alive).");
  m.def("affine8_qmv", &affine8_qmv, "x"_a, "wq"_a, "scales"_a, "biases"_a,
        "x float32 [m <= 64, in] @ W.T for W in MLX affine 8-bit form (group 32) -> float32 [m, out].");
  m.def("check_utf8", &check_utf8, "buf"_a, "offsets"_a.noconvert(),
        "First GGUF string-array item (u64 length field at offsets[i] of buf) that is not valid UTF-8, or -1.");
  m.def("scan_strings", &scan_strings, "buf"_a, "start"_a, "offsets"_a.noconvert(),
        "Offsets of a GGUF string array's length fields into offsets (int64 [count]); the end, or -1 if truncated.");
}
