// CSR kernels for sparsetrain's CSRLinear, parallel with OpenMP.
//
// W is rows x cols with non-zeros (r, col[k], values[k]), r given by the row pointers crow.
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
// gathering product runs several times faster than scattering into the gradient).
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
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

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

// (batch, feat) row-major -> (tiles, feat, BT), zero-padded
template <typename T>
void to_tiles(const T* x, T* tiles, int64_t batch, int64_t feat) {
  constexpr int BT = tile_width<T>();
  const int64_t nt = n_tiles(batch, BT), nf = (feat + FB - 1) / FB;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t fb = 0; fb < nf; ++fb) {
      const int width = static_cast<int>(std::min<int64_t>(BT, batch - t * BT));
      const int64_t f0 = fb * FB, f1 = std::min(feat, f0 + FB);
      T* out = tiles + t * feat * BT;
      for (int b = 0; b < width; ++b) {
        const T* in = x + (t * BT + b) * feat;
        for (int64_t f = f0; f < f1; ++f) out[f * BT + b] = in[f];
      }
      for (int64_t f = f0; f < f1; ++f) std::fill(out + f * BT + width, out + (f + 1) * BT, T(0));
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
      for (int b = 0; b < width; ++b) {
        Out* out = x + (t * BT + b) * feat;
        for (int64_t f = f0; f < f1; ++f) out[f] = static_cast<Out>(in[f * BT + b]);
      }
    }
  }
}

// The forward product's frame: rows in chunks of RC, each row's BT sums (row_sums(tile, r,
// sums)) kept in a small buffer, and the chunk written into y (batch, rows) row-major at once.
constexpr int RC = 16;

template <typename T, typename RowSums>
void forward_rows(const T* x_tiles, T* y, int64_t rows, int64_t cols, int64_t batch,
                  RowSums row_sums) {
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
        for (int b = 0; b < width; ++b) {
          T* out = y + (t * BT + b) * rows + r0;
          for (int i = 0; i < n; ++i) out[i] = static_cast<T>(sums[i][b]);
        }
      }
    }
  }
}

template <typename T>
void forward(const int64_t* crow, const int64_t* col, const acc_t<T>* values, const T* x_tiles,
             T* y, int64_t rows, int64_t cols, int64_t batch) {
  using A = acc_t<T>;
  constexpr int BT = tile_width<T>();
  forward_rows<T>(x_tiles, y, rows, cols, batch, [&](const T* tile, int64_t r, A* sums) {
    A acc[BT];
#pragma GCC unroll 64
    for (int b = 0; b < BT; ++b) acc[b] = 0;
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
      const A v = values[k];
      const T* d = tile + col[k] * BT;
#pragma GCC unroll 64
      for (int b = 0; b < BT; ++b) acc[b] += v * static_cast<A>(d[b]);
    }
#pragma GCC unroll 64
    for (int b = 0; b < BT; ++b) sums[b] = acc[b];
  });
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

// forward for the 16-bit types: each non-zero's 64 inputs widened and multiplied in float32.
template <typename T>
void forward16_widen(const float* values, const T* tile, int64_t k0, int64_t k1,
                     const int64_t* col, __m512 a[4]) {
  for (int64_t k = k0; k < k1; ++k) {
    const __m512 v = _mm512_set1_ps(values[k]);
    const T* d = tile + col[k] * 64;
    for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(v, load16(d + 16 * i), a[i]);
  }
}

#if defined(__AVX512BF16__)
// One pair of non-zeros (k, k + 1) into the accumulators acc (lo0, hi0, lo1, hi1).
inline void bf16_pair(const uint16_t* v16, const at::BFloat16* tile, const int64_t* col,
                      int64_t k, __m512 acc[4]) {
  const __m512bh v = (__m512bh)_mm512_set1_epi32(static_cast<int>(
      static_cast<uint32_t>(v16[k]) | (static_cast<uint32_t>(v16[k + 1]) << 16)));
  const at::BFloat16* p = tile + col[k] * 64;
  const at::BFloat16* q = tile + col[k + 1] * 64;
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
                               int64_t k1, const int64_t* col, __m512 a[4]) {
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
    const at::BFloat16* d = tile + col[k] * 64;
    for (int i = 0; i < 4; ++i) a[i] = _mm512_fmadd_ps(v, load16(d + 16 * i), a[i]);
  }
}
#endif

template <typename T>
void forward16(const int64_t* crow, const int64_t* col, const float* values, const T* values16,
               const T* x_tiles, T* y, int64_t rows, int64_t cols, int64_t batch) {
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
  });
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
void weight_grad_avx512(const int64_t* crow, const int64_t* col, const T* gy_tiles,
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
          const T* c = x_tile + col[k0 + j] * BT;
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
void weight_grad(const int64_t* crow, const int64_t* col, const T* gy_tiles, const T* x_tiles,
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

// The forward and weight gradient kernels of dtype T: AVX-512 where built with it (the 16-bit
// types, and float32 for the weight gradient), the portable loops otherwise.
template <typename T>
void forward_any(const int64_t* crow, const int64_t* col, const acc_t<T>* values,
                 const T* values16, const T* x_tiles, T* y, int64_t rows, int64_t cols,
                 int64_t batch) {
#if defined(__AVX512F__)
  if constexpr (is16<T>()) {
    forward16<T>(crow, col, values, values16, x_tiles, y, rows, cols, batch);
    return;
  }
#endif
  (void)values16;
  forward<T>(crow, col, values, x_tiles, y, rows, cols, batch);
}

template <typename T>
void weight_grad_any(const int64_t* crow, const int64_t* col, const T* gy_tiles,
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

// Candidates of one block of scores (the grow step): the entries at least `threshold`,
// skipping the sorted (block-relative) positions in `closed`, in position order.
// Two passes over equal chunks, one per thread: count, then write at each chunk's offset.
template <typename T>
void candidates(const T* grad, int64_t n, double threshold, const int64_t* closed,
                int64_t n_closed, std::vector<int64_t>& index, std::vector<T>& score) {
  const int threads = omp_get_max_threads();
  std::vector<int64_t> counts(threads + 1, 0);
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
    const int64_t i0 = n * me / threads, i1 = n * (me + 1) / threads;
    int64_t c = std::lower_bound(closed, closed + n_closed, i0) - closed;
    int64_t count = 0;
    for (int64_t i = i0; i < i1; ++i) {
      if (c < n_closed && closed[c] == i) { ++c; continue; }
      count += static_cast<double>(grad[i]) >= threshold;
    }
    counts[me + 1] = count;
#pragma omp barrier
#pragma omp single
    {
      for (int t = 0; t < threads; ++t) counts[t + 1] += counts[t];
      index.resize(counts[threads]);
      score.resize(counts[threads]);
    }
    int64_t out = counts[me];
    c = std::lower_bound(closed, closed + n_closed, i0) - closed;
    for (int64_t i = i0; i < i1; ++i) {
      if (c < n_closed && closed[c] == i) { ++c; continue; }
      const T a = grad[i];
      if (static_cast<double>(a) >= threshold) { index[out] = i; score[out] = a; ++out; }
    }
  }
}


void check_indices(const torch::Tensor& crow, const torch::Tensor& col, const char* what) {
  TORCH_CHECK(crow.scalar_type() == torch::kInt64 && col.scalar_type() == torch::kInt64,
              what, ": CSR indices must be int64");
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

// returns y = x W^T, (batch, rows)
torch::Tensor csr_forward(torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                          torch::Tensor x_tiles, int64_t rows, int64_t cols, int64_t batch) {
  check_indices(crow, col, "csr_forward");
  check_tiles(x_tiles, cols, "csr_forward");
  check_same(values, x_tiles, "csr_forward");
  values = values.contiguous();
  const auto acc_values = values.to(acc_type(values.scalar_type()));
  auto y = torch::empty({batch, rows}, x_tiles.options());
  ST_DISPATCH(values.scalar_type(), "csr_forward", [&] {
    forward_any<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                          acc_values.data_ptr<acc_t<scalar_t>>(), values.data_ptr<scalar_t>(),
                          x_tiles.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, cols,
                          batch);
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
    weight_grad_any<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                              gy_tiles.data_ptr<scalar_t>(), x_tiles.data_ptr<scalar_t>(),
                              grad.data_ptr<acc_t<scalar_t>>(), rows, cols, batch);
  });
  return grad.scalar_type() == type ? grad : grad.to(type);
}

// scores: a contiguous block of scores; closed: sorted block-relative positions to skip.
// Returns (scores >= threshold, their block-relative positions), in position order.
std::vector<torch::Tensor> candidates_at_least(torch::Tensor grad, double threshold,
                                           torch::Tensor closed) {
  TORCH_CHECK(grad.is_contiguous() && closed.is_contiguous() &&
              closed.scalar_type() == torch::kInt64, "candidates_at_least: bad operands");
  std::vector<torch::Tensor> result;
  ST_DISPATCH(grad.scalar_type(), "candidates_at_least", [&] {
    std::vector<int64_t> index;
    std::vector<scalar_t> score;
    candidates<scalar_t>(grad.data_ptr<scalar_t>(), grad.numel(), threshold,
                         closed.data_ptr<int64_t>(), closed.numel(), index, score);
    auto n = static_cast<int64_t>(index.size());
    result.push_back(torch::from_blob(score.data(), {n}, grad.options()).clone());
    result.push_back(torch::from_blob(index.data(), {n}, closed.options()).clone());
  });
  return result;
}

// The masked backend's hot path: tensor[i] = 0 wherever active[i] is false (NaN included),
// one pass reading a byte of mask per entry. (torch's own multiply by a bool mask converts
// each byte on the fly, about 25x slower on a 4096 x 4096 weight.)
// On the bits, so that the loop vectorises: the entry ANDed with all ones or with zero.
template <typename T>
void zero_where_false(T* data, const bool* keep, int64_t n) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t,
               std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(Bits) == sizeof(T), "zero_where_false: unsupported type");
  Bits* bits = reinterpret_cast<Bits*>(data);
  const uint8_t* flag = reinterpret_cast<const uint8_t*>(keep);
  // threads only where there is enough work to pay for starting them
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) bits[i] &= static_cast<Bits>(0) - static_cast<Bits>(flag[i]);
}

void zero_inactive(torch::Tensor tensor, torch::Tensor active) {
  TORCH_CHECK(tensor.is_contiguous() && active.is_contiguous() &&
              active.scalar_type() == torch::kBool && active.numel() == tensor.numel(),
              "zero_inactive: bad operands");
  const int64_t n = tensor.numel();
  const bool* keep = active.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensor.scalar_type(),
                                  "zero_inactive", [&] {
    zero_where_false<scalar_t>(tensor.data_ptr<scalar_t>(), keep, n);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_rows", &pack_rows, "(batch, features) -> (tiles, features, width)");
  m.def("unpack_rows", &unpack_rows, "(tiles, features, width) -> (batch, features)");
  m.def("csr_forward", &csr_forward, "x W^T for a CSR W, x packed");
  m.def("csr_weight_grad", &csr_weight_grad, "grad_y^T x at the non-zeros of W, both packed");
  m.def("zero_inactive", &zero_inactive, "tensor[~active] = 0, in place");
  m.def("candidates_at_least", &candidates_at_least, "entries of a score block at least a threshold");
}
