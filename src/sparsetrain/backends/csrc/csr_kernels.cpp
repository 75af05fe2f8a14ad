// CSR kernels for sparsetrain's CSRLinear, parallel with OpenMP.
//
// W is rows x cols with non-zeros (r, col[k], values[k]), r given by the row pointers crow.
// Every index array (crow, col, the structure of W^T, the block metadata) is int32, 4 bytes a
// non-zero: dimensions and numbers of non-zeros stay below 2^31 (CSRLinear checks), and
// offsets computed from them are int64.
// Dense operands are packed "tile-major": (tiles, features, BT), the batch cut into tiles of BT
// examples (zero-padded), each tile one contiguous block. A kernel works through one tile at a
// time: the BT accumulators of a row stay in vector registers, and the tile's block of the
// dense operand (features x BT, about 1 MB for 4096 features) stays in the core's L2 cache.
// (Reading BT-wide slices of a features x batch array instead strides through memory and uses
// only part of the cache's sets: the forward product ran at half the speed.)
//
//   csr_forward      y[b, r]         = sum_k values[k] x[b, col[k]]
//   csr_weight_grad  grad[k]         = sum_b gy[b, r] x[b, col[k]]      (at the non-zeros)
// The input gradient grad_y W is csr_forward of W^T, whose structure the caller keeps (a
// gathering product runs several times faster than scattering into the gradient); csr_transpose
// builds it in O(nnz + cols) by a stable counting sort of the non-zeros by column.
//   csr_spmv         y[b, r]         = sum_k values[k] x[b, col[k]]      (x not packed)
// is the forward product for inference at small batches, where a tile of 64 examples would be
// mostly padding: x in torch's layout, each row's non-zeros gathered from it (see "Sparse
// matrix-vector products" below).
// Weights in aligned blocks of R x C have kernels of their own (block_forward,
// block_input_grad(_rows), block_weight_grad: see "Block-sparse products" below), which reuse
// each loaded slice of activations or gradients for the rows or columns of a block.
// A ReLU fused into the layer (CSRLinear.activation): the forward products take max(0, .) of
// each sum, after the bias, as write_rows writes y; pack_masked packs the output gradient zeroed
// where y <= 0 (relu's gradient, 0 at the kink) and sums it over the batch for the bias on the
// way, so that every backward product reads the masked gradient without a pass of its own.
// Activations and their gradients come and go in torch's own layout, (batch, features)
// row-major: packing into tiles and back transposes in blocks of 16 features (in L1), and the
// forward product collects 16 output rows before writing them out, so that no strided copy is
// left to torch (in a transformer the layers around a CSR layer want that layout anyway).
//
// bfloat16 and float16 (autocast, or weights stored in 16 bits): the operands stay 16-bit in
// memory (half the traffic of float32), products are summed in float32 and each result is
// rounded once, to nearest even, as torch's own bfloat16/float16 matmuls do. With AVX-512 the
// 16-bit numbers are widened to float32 in registers; with AVX512-BF16, bfloat16 products go
// two at a time through the dot-product instruction (vdpbf16ps, half the instructions).
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// The type of every index array (row pointers, column indices, W^T's structure, block metadata).
using idx_t = int32_t;

// Batch tile: 4 AVX-512 registers (64 floats, 32 doubles); 64 for 16-bit types, whose sums
// are float32.
template <typename T> constexpr int tile_width() { return sizeof(T) == 2 ? 64 : 256 / sizeof(T); }

// The type products are summed in: float for the 16-bit types.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<at::BFloat16> { using type = float; };
template <> struct Acc<at::Half> { using type = float; };
template <typename T> using acc_t = typename Acc<T>::type;
template <typename T> constexpr bool is16() { return sizeof(T) == 2; }

int64_t n_tiles(int64_t batch, int bt) { return (batch + bt - 1) / bt; }

// Packing and unpacking go through blocks of FB features x BT examples, small enough for L1.
constexpr int FB = 16;

#if defined(__AVX512F__)
// 16 x 16 floats: row k of `in` (k = 0..15, `in_stride` apart) becomes column k of `out`
// (rows `out_stride` apart), through registers; with `keep` (laid out as `in`), zero where
// keep <= 0 (relu's gradient rule: kept where keep is NaN, as torch's threshold_backward).
inline void transpose16(const float* in, int64_t in_stride, float* out, int64_t out_stride,
                        const float* keep = nullptr) {
  __m512 r[16], t[16];
  for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(in + k * in_stride);
  if (keep != nullptr)
    for (int k = 0; k < 16; ++k)
      r[k] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(keep + k * in_stride),
                                                    _mm512_setzero_ps(), _CMP_NLE_UQ), r[k]);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + j], 128-bit lane l: rows 4i .. 4i+3 of column 4l + j
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44);
    const __m512 b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 d = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    _mm512_storeu_ps(out + j * out_stride, _mm512_shuffle_f32x4(a, c, 0x88));
    _mm512_storeu_ps(out + (4 + j) * out_stride, _mm512_shuffle_f32x4(a, c, 0xDD));
    _mm512_storeu_ps(out + (8 + j) * out_stride, _mm512_shuffle_f32x4(b, d, 0x88));
    _mm512_storeu_ps(out + (12 + j) * out_stride, _mm512_shuffle_f32x4(b, d, 0xDD));
  }
}
#endif

// (batch, feat) row-major -> (tiles, feat, BT), zero-padded. With `keep` ((batch, feat) too,
// the output of a fused ReLU), an output gradient masked as it is packed: zero where keep <= 0
// (kept where it is NaN, as torch's threshold_backward does); with `sums` (tiles, feat), each
// tile's sums over its examples too, read back from the block just written (still in L1).
template <typename T>
void to_tiles(const T* x, T* tiles, int64_t batch, int64_t feat, const T* keep = nullptr,
              acc_t<T>* sums = nullptr) {
  constexpr int BT = tile_width<T>();
  const int64_t nt = n_tiles(batch, BT), nf = (feat + FB - 1) / FB;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t fb = 0; fb < nf; ++fb) {
      const int width = static_cast<int>(std::min<int64_t>(BT, batch - t * BT));
      const int64_t f0 = fb * FB, f1 = std::min(feat, f0 + FB);
      T* out = tiles + t * feat * BT;
      int b = 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {  // whole 16 x 16 squares through registers
        if (f1 - f0 == 16)
          for (; b + 16 <= width; b += 16) {
            const int64_t at = (t * BT + b) * feat + f0;
            transpose16(x + at, feat, out + f0 * BT + b, BT, keep ? keep + at : nullptr);
          }
      }
#endif
      for (; b < width; ++b) {
        const T* in = x + (t * BT + b) * feat;
        if (keep == nullptr) {
          for (int64_t f = f0; f < f1; ++f) out[f * BT + b] = in[f];
        } else {
          const T* k = keep + (t * BT + b) * feat;
          for (int64_t f = f0; f < f1; ++f)
            out[f * BT + b] = static_cast<acc_t<T>>(k[f]) <= 0 ? T(0) : in[f];
        }
      }
      for (int64_t f = f0; f < f1; ++f) std::fill(out + f * BT + width, out + (f + 1) * BT, T(0));
      if (sums != nullptr)
        for (int64_t f = f0; f < f1; ++f) {
          acc_t<T> s = 0;
#pragma omp simd reduction(+ : s)
          for (int i = 0; i < BT; ++i) s += static_cast<acc_t<T>>(out[f * BT + i]);
          sums[t * feat + f] = s;
        }
    }
  }
}

// (tiles, feat, BT) -> (batch, feat) row-major, converted (rounded to nearest even) to Out
template <typename In, typename Out>
void from_tiles(const In* tiles, Out* x, int64_t batch, int64_t feat) {
  constexpr int BT = tile_width<Out>();
  const int64_t nt = n_tiles(batch, BT), nf = (feat + FB - 1) / FB;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t fb = 0; fb < nf; ++fb) {
      const int width = static_cast<int>(std::min<int64_t>(BT, batch - t * BT));
      const int64_t f0 = fb * FB, f1 = std::min(feat, f0 + FB);
      const In* in = tiles + t * feat * BT;
      int b = 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<In, float> && std::is_same_v<Out, float>) {
        if (f1 - f0 == 16)
          for (; b + 16 <= width; b += 16)
            transpose16(in + f0 * BT + b, BT, x + (t * BT + b) * feat + f0, feat);
      }
#endif
      for (; b < width; ++b) {
        Out* out = x + (t * BT + b) * feat;
        for (int64_t f = f0; f < f1; ++f) out[f] = static_cast<Out>(in[f * BT + b]);
      }
    }
  }
}

// The sums of n rows (row i at sums[i * BT .. + width]), plus bias[i] where bias is given,
// then max(0, .) with `relu` (NaN stays NaN, as in torch.relu), written into y, whose rows (one
// a batch example) are `rows` apart: 16 x 16 squares through register transposes for float32.
template <typename T, typename A>
inline void write_rows(A* sums, int n, int width, T* y, int64_t rows, const A* bias = nullptr,
                       bool relu = false) {
  constexpr int BT = tile_width<T>();
  if (bias != nullptr)
    for (int i = 0; i < n; ++i)
      for (int b = 0; b < width; ++b) sums[i * BT + b] += bias[i];
  if (relu)
    for (int i = 0; i < n; ++i)
      for (int b = 0; b < width; ++b) sums[i * BT + b] = std::max(sums[i * BT + b], A(0));
  int i0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    for (; i0 + 16 <= n; i0 += 16) {
      int b = 0;
      for (; b + 16 <= width; b += 16)
        transpose16(sums + i0 * BT + b, BT, y + b * rows + i0, rows);
      for (; b < width; ++b)
        for (int i = i0; i < i0 + 16; ++i) y[b * rows + i] = sums[i * BT + b];
    }
  }
#endif
  for (int b = 0; b < width; ++b)
    for (int i = i0; i < n; ++i) y[b * rows + i] = static_cast<T>(sums[i * BT + b]);
}

// The forward product's frame: rows in chunks of RC, each row's BT sums (row_sums(tile, r,
// sums)) kept in a small buffer, and the chunk written into y (batch, rows) row-major at once,
// plus the bias where one is given, then max(0, .) with `relu` (write_rows).
constexpr int RC = 16;

template <typename T, typename RowSums>
void forward_rows(const T* x_tiles, T* y, int64_t rows, int64_t cols, int64_t batch,
                  RowSums row_sums, const acc_t<T>* bias, bool relu) {
  using A = acc_t<T>;
  constexpr int BT = tile_width<T>();
  const int64_t nt = n_tiles(batch, BT), nc = (rows + RC - 1) / RC;
#pragma omp parallel
  {
    alignas(64) A sums[RC][BT];
    for (int64_t t = 0; t < nt; ++t) {
      const T* tile = x_tiles + t * cols * BT;
      const int width = static_cast<int>(std::min<int64_t>(BT, batch - t * BT));
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t r0 = c * RC;
        const int n = static_cast<int>(std::min<int64_t>(RC, rows - r0));
        for (int i = 0; i < n; ++i) row_sums(tile, r0 + i, sums[i]);
        write_rows<T, A>(&sums[0][0], n, width, y + t * BT * rows + r0, rows,
                         bias == nullptr ? nullptr : bias + r0, relu);
      }
    }
  }
}

template <typename T>
void forward(const idx_t* crow, const idx_t* col, const acc_t<T>* values, const T* x_tiles,
             T* y, int64_t rows, int64_t cols, int64_t batch, const acc_t<T>* bias, bool relu) {
  using A = acc_t<T>;
  constexpr int BT = tile_width<T>();
  forward_rows<T>(x_tiles, y, rows, cols, batch, [&](const T* tile, int64_t r, A* sums) {
    A acc[BT];
#pragma GCC unroll 64
    for (int b = 0; b < BT; ++b) acc[b] = 0;
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
      const A v = values[k];
      const T* d = tile + int64_t(col[k]) * BT;
#pragma GCC unroll 64
      for (int b = 0; b < BT; ++b) acc[b] += v * static_cast<A>(d[b]);
    }
#pragma GCC unroll 64
    for (int b = 0; b < BT; ++b) sums[b] = acc[b];
  }, bias, relu);
}

#if defined(__AVX512F__)
// float32 with AVX-512: tile by tile (the tile's block of x stays in L2), 16 non-zeros at a
// time. Each non-zero's 64 products are summed into one 16-lane register; the 16 registers are
// then reduced together by a transposing tree of shuffles (about 3 instructions a non-zero
// instead of a full horizontal sum each), and the 16 sums added to the gradient at once.
inline __m512 sum16(__m512 s[16]) {
  __m512 u[8], v[4];
  for (int i = 0; i < 8; ++i)  // 8 partial sums of s[2i] (lanes 0-7) and s[2i+1] (8-15)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane q: 4 partial sums of s[4i+q]
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  const __m512 w0 = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
  const __m512 w1 = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
  // lane q, element i: the sum of s[4i+q]
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w0, w1, 0x44), _mm512_shuffle_ps(w0, w1, 0xEE));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

// 16 numbers at p, widened to float32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// forward for float32 and the 16-bit types: each non-zero's 64 inputs multiplied in float32.
template <typename T>
void forward16_widen(const float* values, const T* tile, int64_t k0, int64_t k1,
                     const idx_t* col, __m512 a[4]) {
  for (int64_t k = k0; k < k1; ++k) {
    const __m512 v = _mm512_set1_ps(values[k]);
    const T* d = tile + int64_t(col[k]) * 64;
    for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(v, load16(d + 16 * i), a[i]);
  }
}

#if defined(__AVX512BF16__)
// One pair of non-zeros (k, k + 1) into the accumulators acc (lo0, hi0, lo1, hi1).
inline void bf16_pair(const uint16_t* v16, const at::BFloat16* tile, const idx_t* col,
                      int64_t k, __m512 acc[4]) {
  const __m512bh v = (__m512bh)_mm512_set1_epi32(static_cast<int>(
      static_cast<uint32_t>(v16[k]) | (static_cast<uint32_t>(v16[k + 1]) << 16)));
  const at::BFloat16* p = tile + int64_t(col[k]) * 64;
  const at::BFloat16* q = tile + int64_t(col[k + 1]) * 64;
  const __m512i p0 = _mm512_loadu_si512(p), p1 = _mm512_loadu_si512(p + 32);
  const __m512i q0 = _mm512_loadu_si512(q), q1 = _mm512_loadu_si512(q + 32);
  acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_unpacklo_epi16(p0, q0), v);
  acc[1] = _mm512_dpbf16_ps(acc[1], (__m512bh)_mm512_unpackhi_epi16(p0, q0), v);
  acc[2] = _mm512_dpbf16_ps(acc[2], (__m512bh)_mm512_unpacklo_epi16(p1, q1), v);
  acc[3] = _mm512_dpbf16_ps(acc[3], (__m512bh)_mm512_unpackhi_epi16(p1, q1), v);
}

// bfloat16 forward by dot products of pairs: the inputs of two non-zeros interleaved
// (unpacklo/hi within 128-bit lanes) against their two values. The interleaving permutes the
// batch the same way for every pair, and the order is restored once per row.
inline void forward_bf16_pairs(const at::BFloat16* values, const at::BFloat16* tile, int64_t k0,
                               int64_t k1, const idx_t* col, __m512 a[4]) {
  __m512 acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
  const uint16_t* v16 = reinterpret_cast<const uint16_t*>(values);
  int64_t k = k0;
  for (; k + 1 < k1; k += 2) bf16_pair(v16, tile, col, k, acc);
  const __m512 lo0 = acc[0], hi0 = acc[1], lo1 = acc[2], hi1 = acc[3];
  // lo lane i holds batch (i / 4) * 8 + i % 4, hi lane i batch (i / 4) * 8 + 4 + i % 4
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  a[0] = _mm512_permutex2var_ps(lo0, first, hi0);
  a[1] = _mm512_permutex2var_ps(lo0, second, hi0);
  a[2] = _mm512_permutex2var_ps(lo1, first, hi1);
  a[3] = _mm512_permutex2var_ps(lo1, second, hi1);
  if (k < k1) {  // an odd last non-zero
    const __m512 v = _mm512_set1_ps(static_cast<float>(values[k]));
    const at::BFloat16* d = tile + int64_t(col[k]) * 64;
    for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(v, load16(d + 16 * i), a[i]);
  }
}
#endif

template <typename T>
void forward16(const idx_t* crow, const idx_t* col, const float* values, const T* values16,
               const T* x_tiles, T* y, int64_t rows, int64_t cols, int64_t batch,
               const float* bias, bool relu) {
  forward_rows<T>(x_tiles, y, rows, cols, batch, [&](const T* tile, int64_t r, float* sums) {
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      forward_bf16_pairs(values16, tile, crow[r], crow[r + 1], col, a);
    } else {
      forward16_widen(values, tile, crow[r], crow[r + 1], col, a);
    }
#else
    (void)values16;
    forward16_widen(values, tile, crow[r], crow[r + 1], col, a);
#endif
    for (int i = 0; i < 4; ++i) _mm512_store_ps(sums + 16 * i, a[i]);
  }, bias, relu);
}

// 64 products of a non-zero (gradient row a, input column c) summed into 16 lanes.
inline __m512 products64(const __m512 a[4], const float* c) {
  __m512 acc = _mm512_mul_ps(a[0], _mm512_loadu_ps(c));
  acc = _mm512_fmadd_ps(a[1], _mm512_loadu_ps(c + 16), acc);
  acc = _mm512_fmadd_ps(a[2], _mm512_loadu_ps(c + 32), acc);
  return _mm512_fmadd_ps(a[3], _mm512_loadu_ps(c + 48), acc);
}
template <typename T>
inline __m512 products64(const __m512 a[4], const T* c) {
  __m512 acc = _mm512_mul_ps(a[0], load16(c));
  for (int i = 1; i < 4; ++i) acc = _mm512_fmadd_ps(a[i], load16(c + 16 * i), acc);
  return acc;
}

// float32, bfloat16 and float16 with AVX-512 (sums in float32): tile by tile (the tile's block
// of x stays in L2), 16 non-zeros at a time. Each non-zero's 64 products are summed into one
// 16-lane register; the 16 registers are then reduced together by a transposing tree of
// shuffles (about 3 instructions a non-zero instead of a full horizontal sum each), and the 16
// sums added to the gradient at once. bfloat16 with AVX512-BF16 takes the products in pairs.
template <typename T>
void weight_grad_avx512(const idx_t* crow, const idx_t* col, const T* gy_tiles,
                        const T* x_tiles, float* grad, int64_t rows, int64_t cols,
                        int64_t batch) {
  constexpr int BT = 64;
  const int64_t nt = n_tiles(batch, BT);
#pragma omp parallel
  for (int64_t t = 0; t < nt; ++t) {
    const T* x_tile = x_tiles + t * cols * BT;
    const T* g_tile = gy_tiles + t * rows * BT;
    // static: every tile gives a thread the same rows, so it alone adds to their sums, and the
    // threads need not wait for each other between tiles
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
      const T* g = g_tile + r * BT;
      __m512 a[4];
      for (int i = 0; i < 4; ++i) a[i] = load16(g + 16 * i);
#if defined(__AVX512BF16__)
      __m512bh gb0, gb1;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        gb0 = (__m512bh)_mm512_loadu_si512(g);
        gb1 = (__m512bh)_mm512_loadu_si512(g + 32);
      }
#endif
      for (int64_t k0 = crow[r]; k0 < crow[r + 1]; k0 += 16) {
        const int m = static_cast<int>(std::min<int64_t>(16, crow[r + 1] - k0));
        __m512 s[16];
        for (int j = 0; j < 16; ++j) {
          if (j >= m) { s[j] = _mm512_setzero_ps(); continue; }
          const T* c = x_tile + int64_t(col[k0 + j]) * BT;
#if defined(__AVX512BF16__)
          if constexpr (std::is_same_v<T, at::BFloat16>) {
            const __m512 z = _mm512_setzero_ps();
            s[j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(z, gb0, (__m512bh)_mm512_loadu_si512(c)),
                                    gb1, (__m512bh)_mm512_loadu_si512(c + 32));
            continue;
          }
#endif
          s[j] = products64(a, c);
        }
        const __mmask16 lanes = static_cast<__mmask16>((1u << m) - 1u);
        __m512 sums = sum16(s);
        if (t > 0) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(lanes, grad + k0));
        _mm512_mask_storeu_ps(grad + k0, lanes, sums);
      }
    }
  }
}
#endif

// Every tile of a non-zero's column in one pass, the BT partial sums kept in registers and
// reduced once per non-zero (reducing per tile cost more than the tiles' cache locality won).
template <typename T>
void weight_grad(const idx_t* crow, const idx_t* col, const T* gy_tiles, const T* x_tiles,
                 acc_t<T>* grad, int64_t rows, int64_t cols, int64_t batch) {
  using A = acc_t<T>;
  constexpr int BT = tile_width<T>();
  constexpr int64_t kAhead = 2;
  const int64_t nt = n_tiles(batch, BT);
#pragma omp parallel
  {
    std::vector<A> a(nt * BT);
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t t = 0; t < nt; ++t)
        for (int b = 0; b < BT; ++b)
          a[t * BT + b] = static_cast<A>(gy_tiles[(t * rows + r) * BT + b]);
      const int64_t end = crow[r + 1];
      for (int64_t k = crow[r]; k < end; ++k) {
        if (k + kAhead < end) {  // the column's lines, from every tile, a few non-zeros ahead
          for (int64_t t = 0; t < nt; ++t) {
            const char* p =
                reinterpret_cast<const char*>(x_tiles + (t * cols + col[k + kAhead]) * BT);
            for (int off = 0; off < BT * int(sizeof(T)); off += 64) __builtin_prefetch(p + off);
          }
        }
        A acc[BT];
#pragma GCC unroll 64
        for (int b = 0; b < BT; ++b) acc[b] = 0;
        for (int64_t t = 0; t < nt; ++t) {
          const T* c = x_tiles + (t * cols + col[k]) * BT;
          const A* at = a.data() + t * BT;
#pragma GCC unroll 64
          for (int b = 0; b < BT; ++b) acc[b] += at[b] * static_cast<A>(c[b]);
        }
        A sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int b = 0; b < BT; ++b) sum += acc[b];
        grad[k] = sum;
      }
    }
  }
}

// The forward and weight gradient kernels of dtype T: AVX-512 where built with it (float32 and
// the 16-bit types), the portable loops otherwise (float64). The float32 forward takes the
// explicit AVX-512 path too: GCC 12 with -march=native turned the portable loop into scalar
// shuffles on some Intel CPUs (16x slower at batch 256 on a 4096 x 4096 layer).
template <typename T>
void forward_any(const idx_t* crow, const idx_t* col, const acc_t<T>* values,
                 const T* values16, const T* x_tiles, T* y, int64_t rows, int64_t cols,
                 int64_t batch, const acc_t<T>* bias, bool relu) {
#if defined(__AVX512F__)
  if constexpr (is16<T>() || std::is_same_v<T, float>) {
    forward16<T>(crow, col, values, values16, x_tiles, y, rows, cols, batch, bias, relu);
    return;
  }
#endif
  (void)values16;
  forward<T>(crow, col, values, x_tiles, y, rows, cols, batch, bias, relu);
}

template <typename T>
void weight_grad_any(const idx_t* crow, const idx_t* col, const T* gy_tiles,
                     const T* x_tiles, acc_t<T>* grad, int64_t rows, int64_t cols,
                     int64_t batch) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t<T>, float>) {
    weight_grad_avx512<T>(crow, col, gy_tiles, x_tiles, grad, rows, cols, batch);
    return;
  }
#endif
  weight_grad<T>(crow, col, gy_tiles, x_tiles, grad, rows, cols, batch);
}

// ---- Block-sparse products -----------------------------------------------------------------
// W in aligned blocks of R outputs x C inputs, its values in the CSR order (row-major): block
// row br (rows br*R .. br*R+R-1) holds blocks b_ptr[br] .. b_ptr[br+1]-1, at block columns
// b_col[k] (inputs b_col[k]*C .. +C-1), and value (br, local block j, local row i, local col c)
// sits at R*C*b_ptr[br] + i*nb*C + j*C + c, nb the block row's number of blocks.
// W^T is block-sparse too (C x R blocks); its blocks, by block column of W, are t_ptr, their
// block rows of W t_brow and their ordinals among W's blocks t_blk.
//
//   block_forward      y = x W^T      one load of an input slice serves the R rows of a block
//   block_input_grad   gx = gy W      the forward product of W^T (its values gathered once into
//                                     its block order): one gradient slice serves C rows
//   block_weight_grad  grad_y^T x     per block row: groups of rows x columns (16 sums), each
//                                     summed over every tile before the lanes are reduced
//
// The batch of a tile (4 vectors) is cut into parts so that a group of rows keeps at most 16
// vectors of sums in registers: 1-4 rows take the whole tile, 8 rows halves, 16 rows quarters
// (every line of a slice is still read once per block row).

// One vector of sums: 16 floats or 8 doubles (GCC vector extensions: AVX-512 where built
// with it, narrower vectors otherwise).
typedef float vf __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));
template <typename A> struct VecOf;
template <> struct VecOf<float> { using type = vf; };
template <> struct VecOf<double> { using type = vd; };
template <typename T> using vec_t = typename VecOf<acc_t<T>>::type;
template <typename T> constexpr int lanes() { return 64 / sizeof(acc_t<T>); }

// lanes<T>() numbers at p, widened to the sum type
template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  if constexpr (!is16<T>()) {
    std::memcpy(&v, p, sizeof(v));
  } else {
#if defined(__AVX512F__)
    v = (vf)load16(p);
#else
    for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(p[l]);
#endif
  }
  return v;
}

// Where a block's values are: value (local row i, local col c) at base + i * si + c. Layout W:
// W's own CSR order (block row ob's k-th block at ro*ci*ptr[ob] + (k - ptr[ob])*ci, rows
// nb*ci apart); layout BSR: blocks stored whole, row-major (W^T's values, gathered so once per
// backward pass, so that the input gradient reads them in order instead of one line a value).
enum class Layout { W, BSR };

struct BlockAddr {
  int64_t base, col0, si;
};

template <Layout LY>
inline BlockAddr block_addr(const idx_t* ptr, const idx_t* idx, int64_t ob, int64_t k,
                            int ro, int ci) {
  if constexpr (LY == Layout::W) {
    const int64_t nb = ptr[ob + 1] - ptr[ob];
    return {int64_t(ro) * ci * ptr[ob] + (k - ptr[ob]) * ci, int64_t(idx[k]) * ci, nb * ci};
  } else {
    return {k * ro * ci, int64_t(idx[k]) * ci, ci};
  }
}

// Sums of RG rows (i0 .. i0+RG-1 of output block row ob) over batch part `part` (NV vectors)
// of a tile, for ro x ci blocks (CI = ci known when compiled, or 0).
template <typename T, int RG, int NV, int CI, Layout LY>
void block_group(const T* tile, const acc_t<T>* vals, const idx_t* ptr, const idx_t* idx,
                 int64_t ob, int i0, int part, int ro, int ci, acc_t<T>* sums) {
  using V = vec_t<T>;
  constexpr int L = lanes<T>(), BT = tile_width<T>();
  const int nc = CI > 0 ? CI : ci;
  V acc[RG][NV];
  for (int i = 0; i < RG; ++i)
    for (int n = 0; n < NV; ++n) acc[i][n] = V{};
  for (int64_t k = ptr[ob]; k < ptr[ob + 1]; ++k) {
    const BlockAddr a = block_addr<LY>(ptr, idx, ob, k, ro, ci);
    const acc_t<T>* v = vals + a.base + i0 * a.si;
    const T* x = tile + a.col0 * BT + part * NV * L;
#pragma GCC unroll 16
    for (int c = 0; c < nc; ++c) {
      V xv[NV];
#pragma GCC unroll 4
      for (int n = 0; n < NV; ++n) xv[n] = vload(x + c * BT + n * L);
#pragma GCC unroll 16
      for (int i = 0; i < RG; ++i) {
        const acc_t<T> w = v[i * a.si + c];
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) acc[i][n] += w * xv[n];
      }
    }
  }
  for (int i = 0; i < RG; ++i)
    for (int n = 0; n < NV; ++n)
      std::memcpy(sums + i * BT + part * NV * L + n * L, &acc[i][n], sizeof(V));
}

// Calls f(std::integral_constant<int, G>) for G = 16, 8, 4, 2 and 1 in turn: the kernels take
// rows in groups of the largest of these sizes that still fits, then the smaller ones.
template <typename F>
void for_group_sizes(F f) {
  f(std::integral_constant<int, 16>{});
  f(std::integral_constant<int, 8>{});
  f(std::integral_constant<int, 4>{});
  f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

// All rows of output block row ob: groups of 16, 8, 4, 2 and 1 rows, each over the parts of
// the tile its registers allow.
template <typename T, int CI, Layout LY>
void block_row_sums(const T* tile, const acc_t<T>* vals, const idx_t* ptr, const idx_t* idx,
                    int64_t ob, int ro, int ci, acc_t<T>* sums) {
  constexpr int BT = tile_width<T>(), NT = BT / lanes<T>();  // vectors per tile row
  int i0 = 0;
  auto run = [&](auto rg_tag) {
    constexpr int RG = decltype(rg_tag)::value;
    constexpr int NV = std::max(1, std::min(NT, 16 / RG));
    while (ro - i0 >= RG) {
      for (int part = 0; part < NT / NV; ++part)
        block_group<T, RG, NV, CI, LY>(tile, vals, ptr, idx, ob, i0, part, ro, ci,
                                       sums + i0 * BT);
      i0 += RG;
    }
  };
  for_group_sizes(run);
}

// Calls f(std::integral_constant<int, N>) with N = n for the common sizes, 0 otherwise.
template <typename F>
void with_size(int n, F f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// y (batch, n_ob * ro) = the product of the block matrix (ro x ci blocks, output block rows
// ptr, block columns idx) with the packed operand x_tiles (tiles, cols, BT); output block rows
// in chunks of at least 16 rows, written out together (as forward_rows does, with the bias and
// the ReLU where asked).
template <typename T, Layout LY>
void block_forward_impl(const idx_t* ptr, const idx_t* idx, const acc_t<T>* vals,
                        const T* x_tiles, T* y, int64_t n_ob, int ro, int ci, int64_t cols,
                        int64_t batch, const acc_t<T>* bias = nullptr, bool relu = false) {
  using A = acc_t<T>;
  constexpr int BT = tile_width<T>();
  const int64_t rows = n_ob * ro, nt = n_tiles(batch, BT);
  const int64_t per = std::max<int64_t>(1, (16 + ro - 1) / ro);  // block rows per chunk
  const int64_t nc = (n_ob + per - 1) / per;
  with_size(ci, [&](auto ci_tag) {
    constexpr int CI = decltype(ci_tag)::value;
#pragma omp parallel
    {
      std::vector<A> buffer(per * ro * BT);
      A* sums = buffer.data();
      for (int64_t t = 0; t < nt; ++t) {
        const T* tile = x_tiles + t * cols * BT;
        const int width = static_cast<int>(std::min<int64_t>(BT, batch - t * BT));
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t ob0 = c * per, ob1 = std::min(n_ob, ob0 + per);
          for (int64_t ob = ob0; ob < ob1; ++ob)
            block_row_sums<T, CI, LY>(tile, vals, ptr, idx, ob, ro, ci,
                                      sums + (ob - ob0) * ro * BT);
          const int64_t r0 = ob0 * ro;
          const int n = static_cast<int>((ob1 - ob0) * ro);
          write_rows<T, A>(sums, n, width, y + t * BT * rows + r0, rows,
                           bias == nullptr ? nullptr : bias + r0, relu);
        }
      }
    }
  });
}

// The input gradient grad_x = grad_y W by scattering along W's rows: a group of RG rows of a
// block row keeps its RG gradient slices (part of a tile) in registers, and every block adds
// their weighted sum to the C slices of grad_x it touches (one load and one store of a grad_x
// slice for RG multiply-adds; W's values read in their own order). Work items are (tile, range
// of block columns), so that no two threads add to one slice; grad_x is summed in the sum type,
// tile-major, and unpacked (rounded once) at the end.
template <typename T, int RG, int NV, int CI>
void scatter_group(const T* g_tile, const acc_t<T>* vals, const idx_t* b_ptr,
                   const idx_t* b_col, int64_t br, int i0, int part, int R, int C, int64_t k0,
                   int64_t k1, acc_t<T>* gx_tile) {
  using V = vec_t<T>;
  constexpr int L = lanes<T>(), BT = tile_width<T>();
  const int nc = CI > 0 ? CI : C;
  V gv[RG][NV];
  for (int i = 0; i < RG; ++i)
    for (int n = 0; n < NV; ++n)
      gv[i][n] = vload(g_tile + (br * R + i0 + i) * BT + part * NV * L + n * L);
  const int64_t nb = b_ptr[br + 1] - b_ptr[br], si = nb * C;
  const acc_t<T>* v0 = vals + int64_t(R) * C * b_ptr[br] + i0 * si;
  for (int64_t k = k0; k < k1; ++k) {
    const acc_t<T>* v = v0 + (k - b_ptr[br]) * C;
    acc_t<T>* o = gx_tile + int64_t(b_col[k]) * C * BT + part * NV * L;
#pragma GCC unroll 16
    for (int c = 0; c < nc; ++c) {
      V acc[NV];
      for (int n = 0; n < NV; ++n) std::memcpy(&acc[n], o + c * BT + n * L, sizeof(V));
#pragma GCC unroll 16
      for (int i = 0; i < RG; ++i) {
        const acc_t<T> w = v[i * si + c];
#pragma GCC unroll 4
        for (int n = 0; n < NV; ++n) acc[n] += w * gv[i][n];
      }
      for (int n = 0; n < NV; ++n) std::memcpy(o + c * BT + n * L, &acc[n], sizeof(V));
    }
  }
}

template <typename T>
void block_input_grad_impl(const idx_t* b_ptr, const idx_t* b_col, const acc_t<T>* vals,
                           const T* gy_tiles, acc_t<T>* gx_tiles, int64_t nbr, int R, int C,
                           int64_t cols, int64_t batch) {
  using A = acc_t<T>;
  constexpr int BT = tile_width<T>(), NT = BT / lanes<T>();
  const int64_t rows = nbr * R, nt = n_tiles(batch, BT), nbc = cols / C;
  if (nt == 0 || nbc == 0) return;
  const int64_t ranges = std::min<int64_t>(
      nbc, std::max<int64_t>(1, (2 * omp_get_max_threads() + nt - 1) / nt));
  with_size(C, [&](auto c_tag) {
    constexpr int CI = decltype(c_tag)::value;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < nt * ranges; ++item) {
      const int64_t t = item / ranges, range = item % ranges;
      const int64_t bc0 = nbc * range / ranges, bc1 = nbc * (range + 1) / ranges;
      const T* g_tile = gy_tiles + t * rows * BT;
      A* gx_tile = gx_tiles + t * cols * BT;
      std::fill(gx_tile + bc0 * C * BT, gx_tile + bc1 * C * BT, A(0));
      for (int64_t br = 0; br < nbr; ++br) {
        const idx_t* first = b_col + b_ptr[br];
        const idx_t* last = b_col + b_ptr[br + 1];
        const int64_t k0 = std::lower_bound(first, last, bc0) - b_col;
        const int64_t k1 = std::lower_bound(b_col + k0, last, bc1) - b_col;
        if (k0 == k1) continue;
        int i0 = 0;
        auto run = [&](auto rg_tag) {
          constexpr int RG = decltype(rg_tag)::value;
          constexpr int NV = std::max(1, std::min(NT, 16 / RG));
          for (; R - i0 >= RG; i0 += RG)
            for (int part = 0; part < NT / NV; ++part)
              scatter_group<T, RG, NV, CI>(g_tile, vals, b_ptr, b_col, br, i0, part, R, C, k0,
                                           k1, gx_tile);
        };
        for_group_sizes(run);
      }
    }
  });
}

// W's values in W^T's block order, each C x R block of W^T whole and row-major.
template <typename A>
void gather_transposed(const A* vals, const idx_t* b_ptr, const idx_t* t_brow,
                       const idx_t* t_blk, int64_t n_blocks, int R, int C, A* out) {
#pragma omp parallel for schedule(static)
  for (int64_t kt = 0; kt < n_blocks; ++kt) {
    const int64_t br = t_brow[kt], nb = b_ptr[br + 1] - b_ptr[br];
    const A* v = vals + int64_t(R) * C * b_ptr[br] + int64_t(t_blk[kt] - b_ptr[br]) * C;
    A* o = out + kt * R * C;
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) o[c * R + i] = v[i * nb * C + c];
  }
}

// The sums of up to 16 vectors s[q] (their lanes), into out[0 .. 15].
template <typename V, typename A>
inline void reduce_lanes(V* s, A* out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float>) {
    __m512 w[16];
    for (int q = 0; q < 16; ++q) w[q] = (__m512)s[q];
    _mm512_storeu_ps(out, sum16(w));
    return;
  }
#endif
  for (int q = 0; q < 16; ++q) {
    A total = 0;
    for (int l = 0; l < int(sizeof(V) / sizeof(A)); ++l) total += s[q][l];
    out[q] = total;
  }
}

// Weight gradient of rows i0 .. i0+RG-1 of block row br at its columns m0 .. m0+m-1 (m <= Q,
// in the block row's order): RG*Q <= 16 sums, each over every tile in registers, then the lanes
// of all reduced at once. One load of an input slice serves RG rows, one of a gradient slice
// Q columns.
template <typename T, int RG, int Q>
void weight_grad_group(const T* gy_tiles, const T* x_tiles, const int64_t* col_of, int m,
                       const int64_t* next, int n_next,
                       int64_t r0, int64_t rows, int64_t cols, int64_t nt, acc_t<T>* grad,
                       int64_t row_stride) {
  using A = acc_t<T>;
  using V = vec_t<T>;
  constexpr int BT = tile_width<T>(), L = lanes<T>(), NT = BT / L;
  V s[16];
  for (int q = 0; q < 16; ++q) s[q] = V{};
  int64_t xc[Q];
  for (int q = 0; q < Q; ++q) xc[q] = col_of[q < m ? q : 0] * BT;  // spares repeat column 0
  for (int q = 0; q < n_next; ++q)  // the next group's input slices, from every tile
    for (int64_t t = 0; t < nt; ++t) {
      const char* p = reinterpret_cast<const char*>(x_tiles + t * cols * BT + next[q] * BT);
      for (int off = 0; off < BT * int(sizeof(T)); off += 64) __builtin_prefetch(p + off);
    }
  for (int64_t t = 0; t < nt; ++t) {
    const T* g = gy_tiles + (t * rows + r0) * BT;
    const T* x = x_tiles + t * cols * BT;
#pragma GCC unroll 4
    for (int n = 0; n < NT; ++n) {
      V xv[Q];
#pragma GCC unroll 16
      for (int q = 0; q < Q; ++q) xv[q] = vload(x + xc[q] + n * L);
#pragma GCC unroll 16
      for (int i = 0; i < RG; ++i) {
        const V gv = vload(g + i * BT + n * L);
#pragma GCC unroll 16
        for (int q = 0; q < Q; ++q) s[i * Q + q] += gv * xv[q];
      }
    }
  }
  A out[16];
  reduce_lanes<V, A>(s, out);
  for (int i = 0; i < RG; ++i)
    for (int q = 0; q < m; ++q) grad[i * row_stride + q] = out[i * Q + q];
}

// grad (in W's value order) = grad_y^T x at the active blocks, block row by block row: its
// R rows share one list of columns, taken in groups of 16 / RG for groups of RG rows.
template <typename T>
void block_weight_grad_impl(const idx_t* b_ptr, const idx_t* b_col, const T* gy_tiles,
                            const T* x_tiles, acc_t<T>* grad, int64_t nbr, int R, int C,
                            int64_t cols, int64_t batch) {
  constexpr int BT = tile_width<T>();
  const int64_t rows = nbr * R, nt = n_tiles(batch, BT);
#pragma omp parallel
  {
    std::vector<int64_t> col_of;
#pragma omp for schedule(dynamic, 1)
    for (int64_t br = 0; br < nbr; ++br) {
      const int64_t nb = b_ptr[br + 1] - b_ptr[br], n = nb * C;
      col_of.resize(n + 16);
      for (int64_t j = 0; j < nb; ++j)
        for (int c = 0; c < C; ++c) col_of[j * C + c] = int64_t(b_col[b_ptr[br] + j]) * C + c;
      acc_t<T>* g0 = grad + int64_t(R) * C * b_ptr[br];
      int i0 = 0;
      auto run = [&](auto rg_tag) {
        constexpr int RG = decltype(rg_tag)::value, Q = 16 / RG;
        for (; R - i0 >= RG; i0 += RG)
          for (int64_t m0 = 0; m0 < n; m0 += Q)
            weight_grad_group<T, RG, Q>(gy_tiles, x_tiles, col_of.data() + m0,
                                        static_cast<int>(std::min<int64_t>(Q, n - m0)),
                                        col_of.data() + m0 + Q,
                                        static_cast<int>(std::clamp<int64_t>(n - m0 - Q, 0, Q)),
                                        br * R + i0, rows, cols, nt, g0 + i0 * n + m0, n);
      };
      for_group_sizes(run);
    }
  }
}

// ---- Sparse matrix-vector products (inference at small batches) ---------------------------
// csr_spmv: y[b, r] = bias[r] + sum_k values[k] x[b, col[k]] (then max(0, .) with relu) for x
// in torch's own layout, (batch, cols) row-major, not packed: at batch 1 a tile kernel would
// multiply a whole tile of 64 examples for each non-zero, of which one lane is used. Each row
// takes its non-zeros once for a group of up to SB examples (their sums in registers; larger
// batches take the row again for each further group, its values and columns then in L1).
// float32 with AVX-512 (and the 16-bit types, whose x is widened to float32 first and whose
// values are widened 16 at a time): 16 non-zeros at a time, their inputs gathered
// (vgatherdps, an example's x, 16 KB at 4096 features, stays in L1) and multiplied by the
// 16 values, the last partial group masked, each example's 16 lanes reduced once per row
// (on a 4096 x 4096 layer at density 0.05, one thread: 1.7 to 2 times the speed of the scalar
// loop at batch 1 to 16). float64, and every type without AVX-512: the scalar loop, with
// several partial sums for a single example so that additions do not wait for each other.
// The rows are cut into one contiguous run a thread, runs of about equal work (non-zeros plus
// a fixed cost a row; as fast as dynamic scheduling, and no shared counter); products too
// small to share run on one thread (below about 4000 non-zeros x examples, two threads gained
// nothing on a layer of LeNet-300-100).
constexpr int SB = 8;                    // examples whose sums a row keeps in registers (<= 8)
constexpr int64_t kSpmvRowCost = 8;      // the work of a row beside its non-zeros
constexpr int64_t kSpmvGrain = 1 << 11;  // the least work (non-zeros x examples) a thread takes

// The NB sums of row non-zeros k0 .. k1 - 1 against examples x, x + cols, ... (in A)
template <typename T, int NB>
inline void spmv_row_scalar(const idx_t* col, const T* values, int64_t k0, int64_t k1,
                            const acc_t<T>* x, int64_t cols, acc_t<T>* out) {
  using A = acc_t<T>;
  constexpr int U = NB >= 4 ? 1 : 4 / NB;  // independent partial sums an example
  A acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = 0;
  int64_t k = k0;
  for (; k + U <= k1; k += U)
    for (int u = 0; u < U; ++u) {
      const A v = static_cast<A>(values[k + u]);
      const A* xc = x + col[k + u];
      for (int b = 0; b < NB; ++b) acc[u][b] += v * xc[b * cols];
    }
  for (; k < k1; ++k) {
    const A v = static_cast<A>(values[k]);
    const A* xc = x + col[k];
    for (int b = 0; b < NB; ++b) acc[0][b] += v * xc[b * cols];
  }
  for (int b = 0; b < NB; ++b) {
    A s = acc[0][b];
    for (int u = 1; u < U; ++u) s += acc[u][b];
    out[b] = s;
  }
}

#if defined(__AVX512F__)
template <typename T, int NB>
inline void spmv_row_gather(const idx_t* col, const T* values, int64_t k0, int64_t k1,
                            const float* x, int64_t cols, float* out) {
  constexpr int U = NB == 1 ? 2 : 1;  // two chains of sums for a single example
  __m512 acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 16 * U <= k1; k += 16 * U)
    for (int u = 0; u < U; ++u) {
      const __m512i idx = _mm512_loadu_si512(col + k + 16 * u);
      const __m512 v = load16(values + k + 16 * u);
      for (int b = 0; b < NB; ++b)
        acc[u][b] = _mm512_fmadd_ps(v, _mm512_i32gather_ps(idx, x + b * cols, 4), acc[u][b]);
    }
  for (; k < k1; k += 16) {  // the last (up to 16 * U - 1) non-zeros, masked
    const int m = static_cast<int>(std::min<int64_t>(16, k1 - k));
    const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1u);
    const __m512i idx = _mm512_maskz_loadu_epi32(mask, col + k);
    alignas(64) float vt[16] = {0};
    for (int j = 0; j < m; ++j) vt[j] = static_cast<float>(values[k + j]);
    const __m512 v = _mm512_load_ps(vt);
    for (int b = 0; b < NB; ++b)
      acc[0][b] = _mm512_fmadd_ps(
          v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, x + b * cols, 4),
          acc[0][b]);
  }
  for (int b = 0; b < NB; ++b) {
    __m512 s = acc[0][b];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][b]);
    out[b] = _mm512_reduce_add_ps(s);
  }
}
#endif

// Rows r0 .. r1 - 1 of y for examples b0 .. b0 + NB - 1 (x: the examples in the sum type)
template <typename T, int NB>
void spmv_rows(const idx_t* crow, const idx_t* col, const T* values, const acc_t<T>* x, T* y,
               int64_t rows, int64_t cols, int64_t b0, int64_t r0, int64_t r1,
               const acc_t<T>* bias, bool relu) {
  using A = acc_t<T>;
  const A* xb = x + b0 * cols;
  for (int64_t r = r0; r < r1; ++r) {
    A s[NB];
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<A, float>)
      spmv_row_gather<T, NB>(col, values, crow[r], crow[r + 1], xb, cols, s);
    else
#endif
      spmv_row_scalar<T, NB>(col, values, crow[r], crow[r + 1], xb, cols, s);
    for (int b = 0; b < NB; ++b) {
      A v = bias == nullptr ? s[b] : s[b] + bias[r];
      if (relu) v = std::max(v, A(0));  // NaN stays NaN, as in torch.relu
      y[(b0 + b) * rows + r] = static_cast<T>(v);
    }
  }
}

template <typename T>
void spmv(const idx_t* crow, const idx_t* col, const T* values, const acc_t<T>* x, T* y,
          int64_t rows, int64_t cols, int64_t batch, const acc_t<T>* bias, bool relu) {
  const int64_t work = crow[rows] + kSpmvRowCost * rows;
  const int threads = static_cast<int>(std::clamp<int64_t>(
      work * batch / kSpmvGrain, 1, omp_get_max_threads()));
  // the first row of thread t's run of n: where the work before it reaches t / n of the whole
  auto first_row = [&](int t, int n) -> int64_t {
    if (t >= n) return rows;
    const int64_t target = work * t / n;
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (crow[mid] + kSpmvRowCost * mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const int n = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t r0 = first_row(t, n), r1 = first_row(t + 1, n);
    for (int64_t b0 = 0; b0 < batch; b0 += SB) {
      const int nb = static_cast<int>(std::min<int64_t>(SB, batch - b0));
      switch (nb) {
#define ST_SPMV_ROWS(N)                                                                     \
  case N:                                                                                   \
    spmv_rows<T, N>(crow, col, values, x, y, rows, cols, b0, r0, r1, bias, relu);           \
    break;
        ST_SPMV_ROWS(1) ST_SPMV_ROWS(2) ST_SPMV_ROWS(3) ST_SPMV_ROWS(4)
        ST_SPMV_ROWS(5) ST_SPMV_ROWS(6) ST_SPMV_ROWS(7) ST_SPMV_ROWS(8)
#undef ST_SPMV_ROWS
      }
    }
  }
}

void check_blocks(const torch::Tensor& ptr, const torch::Tensor& idx, const char* what) {
  TORCH_CHECK(ptr.scalar_type() == torch::kInt32 && idx.scalar_type() == torch::kInt32 &&
              ptr.is_contiguous() && idx.is_contiguous() && ptr.dim() == 1 && ptr.numel() >= 1,
              what, ": block indices must be contiguous 1-D int32 tensors");
}

void check_indices(const torch::Tensor& crow, const torch::Tensor& col, const char* what) {
  TORCH_CHECK(crow.scalar_type() == torch::kInt32 && col.scalar_type() == torch::kInt32,
              what, ": CSR indices must be int32");
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous(), what, ": indices must be contiguous");
}

void check_tiles(const torch::Tensor& tiles, int64_t feat, const char* what) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.is_contiguous() && tiles.size(1) == feat, what,
              ": expected packed (tiles, ", feat, ", width) operands");
}

}  // namespace

#define ST_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

int64_t tile_width_for(torch::Tensor like) {
  int64_t width = 0;
  ST_DISPATCH(like.scalar_type(), "tile_width", [&] { width = tile_width<scalar_t>(); });
  return width;
}

// The dtype products are summed in: float32 for the 16-bit types.
at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": operands of one dtype expected, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

// x: (batch, feat) -> (tiles, feat, width)
torch::Tensor pack_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2, "pack_rows: expected a 2-D tensor");
  x = x.contiguous();
  const int64_t width = tile_width_for(x), batch = x.size(0), feat = x.size(1);
  auto tiles = torch::empty({n_tiles(batch, width), feat, width}, x.options());
  ST_DISPATCH(x.scalar_type(), "pack_rows", [&] {
    to_tiles<scalar_t>(x.data_ptr<scalar_t>(), tiles.data_ptr<scalar_t>(), batch, feat);
  });
  return tiles;
}

// grad_y (batch, feat) -> (tiles, feat, width), zero where y (the output of a fused ReLU, same
// shape and dtype) is <= 0; with `sums`, also the masked grad_y summed over the batch (the bias
// gradient, summed in the sum type while packing), else an empty tensor
std::vector<torch::Tensor> pack_masked(torch::Tensor grad_y, torch::Tensor y, bool sums) {
  TORCH_CHECK(grad_y.dim() == 2 && y.sizes() == grad_y.sizes(),
              "pack_masked: a 2-D gradient and an output of its shape expected");
  check_same(grad_y, y, "pack_masked");
  grad_y = grad_y.contiguous();
  y = y.contiguous();
  const int64_t width = tile_width_for(grad_y), batch = grad_y.size(0), feat = grad_y.size(1);
  const int64_t nt = n_tiles(batch, width);
  auto tiles = torch::empty({nt, feat, width}, grad_y.options());
  const auto type = grad_y.scalar_type();
  auto partial = sums ? torch::empty({nt, feat}, grad_y.options().dtype(acc_type(type)))
                      : torch::Tensor();
  ST_DISPATCH(type, "pack_masked", [&] {
    to_tiles<scalar_t>(grad_y.data_ptr<scalar_t>(), tiles.data_ptr<scalar_t>(), batch, feat,
                       y.data_ptr<scalar_t>(),
                       sums ? partial.data_ptr<acc_t<scalar_t>>() : nullptr);
  });
  return {tiles, sums ? partial.sum(0).to(type) : grad_y.new_empty({0})};
}

// tiles: (tiles, feat, width) -> (batch, feat)
torch::Tensor unpack_rows(torch::Tensor tiles, int64_t batch) {
  TORCH_CHECK(tiles.dim() == 3 && tiles.is_contiguous(), "unpack_rows: expected packed tiles");
  auto x = torch::empty({batch, tiles.size(1)}, tiles.options());
  ST_DISPATCH(tiles.scalar_type(), "unpack_rows", [&] {
    from_tiles<scalar_t, scalar_t>(tiles.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), batch,
                                   tiles.size(1));
  });
  return x;
}

// The bias of a forward product, checked and in the sum type (undefined where there is none).
torch::Tensor sum_bias(const c10::optional<torch::Tensor>& bias, int64_t rows,
                       at::ScalarType acc, const char* what) {
  if (!bias.has_value() || !bias->defined()) return torch::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == rows, what, ": bias of ", rows,
              " outputs expected");
  return bias->contiguous().to(acc);
}

// returns y = x W^T (+ bias), (batch, rows); with relu, max(0, y)
torch::Tensor csr_forward(torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                          torch::Tensor x_tiles, int64_t rows, int64_t cols, int64_t batch,
                          c10::optional<torch::Tensor> bias, bool relu) {
  check_indices(crow, col, "csr_forward");
  check_tiles(x_tiles, cols, "csr_forward");
  check_same(values, x_tiles, "csr_forward");
  values = values.contiguous();
  const auto acc_values = values.to(acc_type(values.scalar_type()));
  const auto acc_bias = sum_bias(bias, rows, acc_values.scalar_type(), "csr_forward");
  auto y = torch::empty({batch, rows}, x_tiles.options());
  ST_DISPATCH(values.scalar_type(), "csr_forward", [&] {
    using A = acc_t<scalar_t>;
    forward_any<scalar_t>(crow.data_ptr<idx_t>(), col.data_ptr<idx_t>(),
                          acc_values.data_ptr<A>(), values.data_ptr<scalar_t>(),
                          x_tiles.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, cols,
                          batch, acc_bias.defined() ? acc_bias.data_ptr<A>() : nullptr, relu);
  });
  return y;
}

// grad[k] = sum_b gy[b, r] x[b, col[k]], in the operands' dtype (summed in float32 for 16 bits)
torch::Tensor csr_weight_grad(torch::Tensor crow, torch::Tensor col, torch::Tensor gy_tiles,
                              torch::Tensor x_tiles, int64_t cols, int64_t batch) {
  check_indices(crow, col, "csr_weight_grad");
  const int64_t rows = crow.size(0) - 1;
  check_tiles(gy_tiles, rows, "csr_weight_grad");
  check_tiles(x_tiles, cols, "csr_weight_grad");
  check_same(gy_tiles, x_tiles, "csr_weight_grad");
  const auto type = gy_tiles.scalar_type();
  auto grad = torch::empty({col.size(0)}, gy_tiles.options().dtype(acc_type(type)));
  ST_DISPATCH(type, "csr_weight_grad", [&] {
    weight_grad_any<scalar_t>(crow.data_ptr<idx_t>(), col.data_ptr<idx_t>(),
                              gy_tiles.data_ptr<scalar_t>(), x_tiles.data_ptr<scalar_t>(),
                              grad.data_ptr<acc_t<scalar_t>>(), rows, cols, batch);
  });
  return grad.scalar_type() == type ? grad : grad.to(type);
}

// The structure of W^T, (t_crow, t_row, t_perm): row pointers, the row of W of each non-zero and
// its place in W's order, non-zeros by column and rows in order within one (a stable counting
// sort). Each thread counts the columns of a run of rows of about equal non-zeros; a prefix sum
// over columns, then threads, gives each thread its first slot in every column, and each
// scatters its rows in order.
std::vector<torch::Tensor> csr_transpose(torch::Tensor crow, torch::Tensor col, int64_t cols) {
  check_indices(crow, col, "csr_transpose");
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && col.dim() == 1 && cols >= 0,
              "csr_transpose: expected 1-D row pointers and column indices");
  const int64_t rows = crow.numel() - 1, nnz = col.numel();
  auto t_crow = torch::empty({cols + 1}, crow.options());
  auto t_row = torch::empty({nnz}, crow.options()), t_perm = torch::empty({nnz}, crow.options());
  const idx_t *cp = crow.data_ptr<idx_t>(), *cl = col.data_ptr<idx_t>();
  idx_t *tc = t_crow.data_ptr<idx_t>(), *tr = t_row.data_ptr<idx_t>();
  idx_t* tp = t_perm.data_ptr<idx_t>();
  // a thread's counts (cols of them) are worth it only beside enough non-zeros of its own
  const int threads = static_cast<int>(std::clamp<int64_t>(
      nnz / std::max<int64_t>(cols, 1 << 16), 1, omp_get_max_threads()));
  std::vector<idx_t> next(threads * cols, 0);
#pragma omp parallel num_threads(threads)
  {
    const int n = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t r0 = std::lower_bound(cp, cp + rows, nnz * t / n) - cp;
    const int64_t r1 = t + 1 == n ? rows : std::lower_bound(cp, cp + rows, nnz * (t + 1) / n) - cp;
    idx_t* mine = next.data() + t * cols;
    for (int64_t k = cp[r0]; k < cp[r1]; ++k) ++mine[cl[k]];
#pragma omp barrier
#pragma omp single
    {
      int64_t slot = 0;
      for (int64_t c = 0; c < cols; ++c) {
        tc[c] = static_cast<idx_t>(slot);
        for (int u = 0; u < n; ++u) {
          const idx_t count = next[u * cols + c];
          next[u * cols + c] = static_cast<idx_t>(slot);
          slot += count;
        }
      }
      tc[cols] = static_cast<idx_t>(slot);
    }
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = cp[r]; k < cp[r + 1]; ++k) {
        const idx_t s = mine[cl[k]]++;
        tr[s] = static_cast<idx_t>(r);
        tp[s] = static_cast<idx_t>(k);
      }
  }
  return {t_crow, t_row, t_perm};
}

// The values of a block-sparse weight, widened to the sum type, after checking their number.
torch::Tensor block_values(torch::Tensor values, const torch::Tensor& b_ptr, int64_t R, int64_t C,
                           const char* what) {
  TORCH_CHECK(R >= 1 && C >= 1, what, ": block shape must be positive");
  const int64_t nb = b_ptr[-1].item<int64_t>();
  TORCH_CHECK(values.dim() == 1 && values.numel() == nb * R * C, what, ": ", values.numel(),
              " values for ", nb, " blocks of ", R, "x", C);
  return values.contiguous().to(acc_type(values.scalar_type()));
}

// y = x W^T (+ bias), (batch, rows), for W in R x C blocks (b_ptr, b_col), x packed; with relu,
// max(0, y)
torch::Tensor block_forward(torch::Tensor b_ptr, torch::Tensor b_col, torch::Tensor values,
                            torch::Tensor x_tiles, int64_t R, int64_t C, int64_t cols,
                            int64_t batch, c10::optional<torch::Tensor> bias, bool relu) {
  check_blocks(b_ptr, b_col, "block_forward");
  check_tiles(x_tiles, cols, "block_forward");
  check_same(values, x_tiles, "block_forward");
  TORCH_CHECK(cols % C == 0, "block_forward: ", cols, " inputs do not hold blocks ", C, " wide");
  const auto acc_values = block_values(values, b_ptr, R, C, "block_forward");
  const int64_t nbr = b_ptr.numel() - 1;
  const auto acc_bias = sum_bias(bias, nbr * R, acc_values.scalar_type(), "block_forward");
  auto y = torch::empty({batch, nbr * R}, x_tiles.options());
  ST_DISPATCH(values.scalar_type(), "block_forward", [&] {
    using A = acc_t<scalar_t>;
    block_forward_impl<scalar_t, Layout::W>(
        b_ptr.data_ptr<idx_t>(), b_col.data_ptr<idx_t>(), acc_values.data_ptr<A>(),
        x_tiles.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), nbr, R, C, cols, batch,
        acc_bias.defined() ? acc_bias.data_ptr<A>() : nullptr, relu);
  });
  return y;
}

// grad_x = grad_y W, (batch, cols): the product of W^T (block columns t_ptr of W, their block
// rows t_brow and block ordinals t_blk), W's values gathered into W^T's block order; grad_y
// packed
torch::Tensor block_input_grad(torch::Tensor t_ptr, torch::Tensor t_brow, torch::Tensor t_blk,
                               torch::Tensor b_ptr, torch::Tensor values, torch::Tensor gy_tiles,
                               int64_t R, int64_t C, int64_t batch) {
  check_blocks(t_ptr, t_brow, "block_input_grad");
  check_blocks(b_ptr, t_blk, "block_input_grad");
  const int64_t nbr = b_ptr.numel() - 1, nbc = t_ptr.numel() - 1;
  check_tiles(gy_tiles, nbr * R, "block_input_grad");
  check_same(values, gy_tiles, "block_input_grad");
  TORCH_CHECK(t_brow.numel() == t_blk.numel(), "block_input_grad: t_brow and t_blk differ");
  const auto acc_values = block_values(values, b_ptr, R, C, "block_input_grad");
  auto gx = torch::empty({batch, nbc * C}, gy_tiles.options());
  auto values_t = torch::empty_like(acc_values);
  ST_DISPATCH(values.scalar_type(), "block_input_grad", [&] {
    using A = acc_t<scalar_t>;
    gather_transposed<A>(acc_values.data_ptr<A>(), b_ptr.data_ptr<idx_t>(),
                         t_brow.data_ptr<idx_t>(), t_blk.data_ptr<idx_t>(), t_blk.numel(), R,
                         C, values_t.data_ptr<A>());
    block_forward_impl<scalar_t, Layout::BSR>(t_ptr.data_ptr<idx_t>(),
                                              t_brow.data_ptr<idx_t>(), values_t.data_ptr<A>(),
                                              gy_tiles.data_ptr<scalar_t>(),
                                              gx.data_ptr<scalar_t>(), nbc, C, R, nbr * R, batch);
  });
  return gx;
}

// grad_x = grad_y W by scattering along W's rows, (batch, cols); grad_y packed
torch::Tensor block_input_grad_rows(torch::Tensor b_ptr, torch::Tensor b_col,
                                    torch::Tensor values, torch::Tensor gy_tiles, int64_t R,
                                    int64_t C, int64_t cols, int64_t batch) {
  check_blocks(b_ptr, b_col, "block_input_grad_rows");
  const int64_t nbr = b_ptr.numel() - 1;
  check_tiles(gy_tiles, nbr * R, "block_input_grad_rows");
  check_same(values, gy_tiles, "block_input_grad_rows");
  TORCH_CHECK(cols % C == 0, "block_input_grad_rows: ", cols, " inputs, blocks ", C, " wide");
  const auto acc_values = block_values(values, b_ptr, R, C, "block_input_grad_rows");
  auto gx_tiles = torch::empty({gy_tiles.size(0), cols, gy_tiles.size(2)},
                               gy_tiles.options().dtype(acc_values.scalar_type()));
  auto gx = torch::empty({batch, cols}, gy_tiles.options());
  ST_DISPATCH(values.scalar_type(), "block_input_grad_rows", [&] {
    using A = acc_t<scalar_t>;
    block_input_grad_impl<scalar_t>(b_ptr.data_ptr<idx_t>(), b_col.data_ptr<idx_t>(),
                                    acc_values.data_ptr<A>(), gy_tiles.data_ptr<scalar_t>(),
                                    gx_tiles.data_ptr<A>(), nbr, R, C, cols, batch);
    from_tiles<A, scalar_t>(gx_tiles.data_ptr<A>(), gx.data_ptr<scalar_t>(), batch, cols);
  });
  return gx;
}

// grad_y^T x at W's active blocks, in W's value order; both operands packed
torch::Tensor block_weight_grad(torch::Tensor b_ptr, torch::Tensor b_col, torch::Tensor gy_tiles,
                                torch::Tensor x_tiles, int64_t R, int64_t C, int64_t cols,
                                int64_t batch) {
  check_blocks(b_ptr, b_col, "block_weight_grad");
  TORCH_CHECK(R >= 1 && C >= 1, "block_weight_grad: block shape must be positive");
  const int64_t nbr = b_ptr.numel() - 1;
  check_tiles(gy_tiles, nbr * R, "block_weight_grad");
  check_tiles(x_tiles, cols, "block_weight_grad");
  check_same(gy_tiles, x_tiles, "block_weight_grad");
  const auto type = gy_tiles.scalar_type();
  auto grad = torch::empty({b_col.numel() * R * C}, gy_tiles.options().dtype(acc_type(type)));
  ST_DISPATCH(type, "block_weight_grad", [&] {
    block_weight_grad_impl<scalar_t>(b_ptr.data_ptr<idx_t>(), b_col.data_ptr<idx_t>(),
                                     gy_tiles.data_ptr<scalar_t>(), x_tiles.data_ptr<scalar_t>(),
                                     grad.data_ptr<acc_t<scalar_t>>(), nbr, R, C, cols, batch);
  });
  return grad.scalar_type() == type ? grad : grad.to(type);
}

// y = x W^T (+ bias), (batch, rows), for a CSR W and x (batch, cols) unpacked: the product for
// small batches (see csr_spmv above); with relu, max(0, y)
torch::Tensor csr_spmv(torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                       torch::Tensor x, c10::optional<torch::Tensor> bias, bool relu) {
  check_indices(crow, col, "csr_spmv");
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && col.dim() == 1,
              "csr_spmv: expected 1-D row pointers and column indices");
  TORCH_CHECK(x.dim() == 2, "csr_spmv: expected inputs of shape (batch, features), got ",
              x.dim(), " dimensions");
  TORCH_CHECK(crow.device().is_cpu() && col.device().is_cpu() && values.device().is_cpu() &&
              x.device().is_cpu(), "csr_spmv: the operands must be on the CPU");
  check_same(values, x, "csr_spmv");
  const int64_t rows = crow.numel() - 1, cols = x.size(1), batch = x.size(0);
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel() &&
              crow.data_ptr<idx_t>()[rows] == col.numel(),
              "csr_spmv: ", values.numel(), " values and ", col.numel(), " columns for ",
              crow.data_ptr<idx_t>()[rows], " non-zeros");
  values = values.contiguous();
  const auto type = values.scalar_type(), acc = acc_type(type);
  const auto xs = x.to(acc).contiguous();  // the 16-bit types widened (batch x cols, small)
  const auto acc_bias = sum_bias(bias, rows, acc, "csr_spmv");
  auto y = torch::empty({batch, rows}, x.options());
  ST_DISPATCH(type, "csr_spmv", [&] {
    using A = acc_t<scalar_t>;
    spmv<scalar_t>(crow.data_ptr<idx_t>(), col.data_ptr<idx_t>(), values.data_ptr<scalar_t>(),
                   xs.data_ptr<A>(), y.data_ptr<scalar_t>(), rows, cols, batch,
                   acc_bias.defined() ? acc_bias.data_ptr<A>() : nullptr, relu);
  });
  return y;
}

// The kernels of active sets and scores, in set_kernels.cpp.
void register_set_kernels(pybind11::module& m);
// The kernels of link prediction (CH3-L3), in graph_kernels.cpp.
void register_graph_kernels(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_rows", &pack_rows, "(batch, features) -> (tiles, features, width)");
  m.def("pack_masked", &pack_masked, "grad_y packed, zero where y <= 0 (and its batch sums)",
        py::arg("grad_y"), py::arg("y"), py::arg("sums") = false);
  m.def("unpack_rows", &unpack_rows, "(tiles, features, width) -> (batch, features)");
  m.def("csr_forward", &csr_forward, "x W^T (+ bias) for a CSR W, x packed", py::arg("crow"),
        py::arg("col"), py::arg("values"), py::arg("x_tiles"), py::arg("rows"), py::arg("cols"),
        py::arg("batch"), py::arg("bias") = py::none(), py::arg("relu") = false);
  m.def("csr_spmv", &csr_spmv, "x W^T (+ bias) for a CSR W, x (batch, features) not packed "
        "(small batches)", py::arg("crow"), py::arg("col"), py::arg("values"), py::arg("x"),
        py::arg("bias") = py::none(), py::arg("relu") = false);
  m.def("csr_weight_grad", &csr_weight_grad, "grad_y^T x at the non-zeros of W, both packed");
  m.def("csr_transpose", &csr_transpose, "(t_crow, t_row, t_perm): the structure of W^T");
  m.def("block_forward", &block_forward, "x W^T (+ bias) for W in R x C blocks, x packed",
        py::arg("b_ptr"), py::arg("b_col"), py::arg("values"), py::arg("x_tiles"), py::arg("R"),
        py::arg("C"), py::arg("cols"), py::arg("batch"), py::arg("bias") = py::none(),
        py::arg("relu") = false);
  m.def("block_input_grad", &block_input_grad, "grad_y W for W in R x C blocks, grad_y packed");
  m.def("block_input_grad_rows", &block_input_grad_rows, "grad_y W for W in blocks, by rows");
  m.def("block_weight_grad", &block_weight_grad, "grad_y^T x at W's blocks, both packed");
  register_set_kernels(m);  // set_kernels.cpp
  register_graph_kernels(m);  // graph_kernels.cpp
}
