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
//   csr_input_grad   gx[b, col[k]]  += values[k] gy[b, r]               (a scatter)
//   csr_weight_grad  grad[k]         = sum_b gy[b, r] x[b, col[k]]      (at the non-zeros)
// Between layers the activations and their gradients are "transposed", features x batch
// (returned to torch as transposed views, so one CSR layer feeds the next with no copy); the
// packing into tiles and back is a block copy.
// csr_input_grad scatters: each thread owns a slice of the columns of W, found per row by
// binary search in its sorted column indices, so no two threads write the same place and no
// transposed copy of W is needed.
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

// Batch tile: 4 AVX-512 registers (64 floats, 32 doubles).
template <typename T> constexpr int tile_width() { return 256 / sizeof(T); }

int64_t n_tiles(int64_t batch, int bt) { return (batch + bt - 1) / bt; }

// (feat, batch) -> (tiles, feat, BT), zero-padded: a block copy of BT-wide row slices
template <typename T>
void pack(const T* x_t, T* tiles, int64_t batch, int64_t feat) {
  constexpr int BT = tile_width<T>();
  const int64_t nt = n_tiles(batch, BT);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t f = 0; f < feat; ++f) {
      const int width = static_cast<int>(std::min<int64_t>(BT, batch - t * BT));
      const T* in = x_t + f * batch + t * BT;
      T* out = tiles + (t * feat + f) * BT;
      std::copy(in, in + width, out);
      std::fill(out + width, out + BT, T(0));
    }
  }
}

// (tiles, feat, BT) -> (feat, batch)
template <typename T>
void unpack(const T* tiles, T* x_t, int64_t batch, int64_t feat) {
  constexpr int BT = tile_width<T>();
  const int64_t nt = n_tiles(batch, BT);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t f = 0; f < feat; ++f) {
    for (int64_t t = 0; t < nt; ++t) {
      const int width = static_cast<int>(std::min<int64_t>(BT, batch - t * BT));
      const T* in = tiles + (t * feat + f) * BT;
      std::copy(in, in + width, x_t + f * batch + t * BT);
    }
  }
}

template <typename T>
void forward(const int64_t* crow, const int64_t* col, const T* values, const T* x_tiles, T* y_t,
             int64_t rows, int64_t cols, int64_t batch) {
  constexpr int BT = tile_width<T>();
  const int64_t nt = n_tiles(batch, BT);
#pragma omp parallel
  for (int64_t t = 0; t < nt; ++t) {
    const T* tile = x_tiles + t * cols * BT;
    const int width = static_cast<int>(std::min<int64_t>(BT, batch - t * BT));
#pragma omp for schedule(dynamic, 16) nowait
    for (int64_t r = 0; r < rows; ++r) {
      T acc[BT];
#pragma GCC unroll 64
      for (int b = 0; b < BT; ++b) acc[b] = 0;
      for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
        const T v = values[k];
        const T* d = tile + col[k] * BT;
#pragma GCC unroll 64
        for (int b = 0; b < BT; ++b) acc[b] += v * d[b];
      }
      T* out = y_t + r * batch + t * BT;
      for (int b = 0; b < width; ++b) out[b] = acc[b];
    }
  }
}

template <typename T>
void input_grad(const int64_t* crow, const int64_t* col, const T* values, const T* gy_tiles,
                T* out_tiles, int64_t rows, int64_t cols, int64_t batch) {
  constexpr int BT = tile_width<T>();
  const int64_t nt = n_tiles(batch, BT);
#pragma omp parallel
  {
    const int threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t c0 = cols * me / threads, c1 = cols * (me + 1) / threads;
    std::vector<int64_t> k0(rows), k1(rows);  // this thread's slice of every row
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* first = col + crow[r];
      const int64_t* last = col + crow[r + 1];
      k0[r] = std::lower_bound(first, last, c0) - col;
      k1[r] = std::lower_bound(first, last, c1) - col;
    }
    for (int64_t t = 0; t < nt; ++t) {
      T* out = out_tiles + t * cols * BT;
      std::fill(out + c0 * BT, out + c1 * BT, T(0));
      const T* src_tile = gy_tiles + t * rows * BT;
      for (int64_t r = 0; r < rows; ++r) {
        if (k0[r] == k1[r]) continue;
        T src[BT];
#pragma GCC unroll 64
        for (int b = 0; b < BT; ++b) src[b] = src_tile[r * BT + b];
        for (int64_t k = k0[r]; k < k1[r]; ++k) {
          const T v = values[k];
          T* __restrict__ o = out + col[k] * BT;
#pragma omp simd
          for (int b = 0; b < BT; ++b) o[b] += v * src[b];
        }
      }
    }
  }
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

void weight_grad_avx512(const int64_t* crow, const int64_t* col, const float* gy_tiles,
                        const float* x_tiles, float* grad, int64_t rows, int64_t cols,
                        int64_t batch) {
  constexpr int BT = 64;
  const int64_t nt = n_tiles(batch, BT);
#pragma omp parallel
  for (int64_t t = 0; t < nt; ++t) {
    const float* x_tile = x_tiles + t * cols * BT;
    const float* g_tile = gy_tiles + t * rows * BT;
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      const float* g = g_tile + r * BT;
      const __m512 a0 = _mm512_loadu_ps(g), a1 = _mm512_loadu_ps(g + 16),
                   a2 = _mm512_loadu_ps(g + 32), a3 = _mm512_loadu_ps(g + 48);
      for (int64_t k0 = crow[r]; k0 < crow[r + 1]; k0 += 16) {
        const int m = static_cast<int>(std::min<int64_t>(16, crow[r + 1] - k0));
        __m512 s[16];
        for (int j = 0; j < 16; ++j) {
          if (j >= m) { s[j] = _mm512_setzero_ps(); continue; }
          const float* c = x_tile + col[k0 + j] * BT;
          __m512 acc = _mm512_mul_ps(a0, _mm512_loadu_ps(c));
          acc = _mm512_fmadd_ps(a1, _mm512_loadu_ps(c + 16), acc);
          acc = _mm512_fmadd_ps(a2, _mm512_loadu_ps(c + 32), acc);
          s[j] = _mm512_fmadd_ps(a3, _mm512_loadu_ps(c + 48), acc);
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
                 T* grad, int64_t rows, int64_t cols, int64_t batch) {
  constexpr int BT = tile_width<T>();
  constexpr int64_t kAhead = 2;
  const int64_t nt = n_tiles(batch, BT);
#pragma omp parallel
  {
    std::vector<T> a(nt * BT);
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t t = 0; t < nt; ++t)
        std::copy(gy_tiles + (t * rows + r) * BT, gy_tiles + (t * rows + r + 1) * BT,
                  a.data() + t * BT);
      const int64_t end = crow[r + 1];
      for (int64_t k = crow[r]; k < end; ++k) {
        if (k + kAhead < end) {  // the column's lines, from every tile, a few non-zeros ahead
          for (int64_t t = 0; t < nt; ++t) {
            const char* p =
                reinterpret_cast<const char*>(x_tiles + (t * cols + col[k + kAhead]) * BT);
            for (int off = 0; off < BT * int(sizeof(T)); off += 64) __builtin_prefetch(p + off);
          }
        }
        T acc[BT];
#pragma GCC unroll 64
        for (int b = 0; b < BT; ++b) acc[b] = 0;
        for (int64_t t = 0; t < nt; ++t) {
          const T* c = x_tiles + (t * cols + col[k]) * BT;
          const T* at = a.data() + t * BT;
#pragma GCC unroll 64
          for (int b = 0; b < BT; ++b) acc[b] += at[b] * c[b];
        }
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int b = 0; b < BT; ++b) sum += acc[b];
        grad[k] = sum;
      }
    }
  }
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

int64_t tile_width_for(torch::Tensor like) {
  int64_t width = 0;
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "tile_width", [&] {
    width = tile_width<scalar_t>();
  });
  return width;
}

// x_t: (feat, batch) -> (tiles, feat, width)
torch::Tensor pack_tiles(torch::Tensor x_t) {
  x_t = x_t.contiguous();
  TORCH_CHECK(x_t.dim() == 2, "pack_tiles: expected a 2-D tensor");
  const int64_t width = tile_width_for(x_t), batch = x_t.size(1);
  auto tiles = torch::empty({n_tiles(batch, width), x_t.size(0), width}, x_t.options());
  AT_DISPATCH_FLOATING_TYPES(x_t.scalar_type(), "pack_tiles", [&] {
    pack<scalar_t>(x_t.data_ptr<scalar_t>(), tiles.data_ptr<scalar_t>(), batch, x_t.size(0));
  });
  return tiles;
}

// tiles: (tiles, feat, width) -> (feat, batch)
torch::Tensor unpack_tiles(torch::Tensor tiles, int64_t batch) {
  auto x_t = torch::empty({tiles.size(1), batch}, tiles.options());
  AT_DISPATCH_FLOATING_TYPES(tiles.scalar_type(), "unpack_tiles", [&] {
    unpack<scalar_t>(tiles.data_ptr<scalar_t>(), x_t.data_ptr<scalar_t>(), batch,
                     tiles.size(1));
  });
  return x_t;
}

// returns y^T = W x^T, (rows, batch)
torch::Tensor csr_forward(torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                          torch::Tensor x_tiles, int64_t rows, int64_t cols, int64_t batch) {
  check_indices(crow, col, "csr_forward");
  check_tiles(x_tiles, cols, "csr_forward");
  auto y_t = torch::empty({rows, batch}, x_tiles.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_forward", [&] {
    forward<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                      values.data_ptr<scalar_t>(), x_tiles.data_ptr<scalar_t>(),
                      y_t.data_ptr<scalar_t>(), rows, cols, batch);
  });
  return y_t;
}

// returns grad_x^T = W^T grad_y^T, (cols, batch)
torch::Tensor csr_input_grad(torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                             torch::Tensor gy_tiles, int64_t cols, int64_t batch) {
  check_indices(crow, col, "csr_input_grad");
  const int64_t rows = crow.size(0) - 1;
  check_tiles(gy_tiles, rows, "csr_input_grad");
  auto out = torch::empty({gy_tiles.size(0), cols, gy_tiles.size(2)}, gy_tiles.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_input_grad", [&] {
    input_grad<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                         values.data_ptr<scalar_t>(), gy_tiles.data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), rows, cols, batch);
  });
  return unpack_tiles(out, batch);
}

torch::Tensor csr_weight_grad(torch::Tensor crow, torch::Tensor col, torch::Tensor gy_tiles,
                              torch::Tensor x_tiles, int64_t cols, int64_t batch) {
  check_indices(crow, col, "csr_weight_grad");
  const int64_t rows = crow.size(0) - 1;
  check_tiles(gy_tiles, rows, "csr_weight_grad");
  check_tiles(x_tiles, cols, "csr_weight_grad");
  auto grad = torch::empty({col.size(0)}, gy_tiles.options());
#if defined(__AVX512F__)
  if (gy_tiles.scalar_type() == torch::kFloat32) {
    weight_grad_avx512(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                       gy_tiles.data_ptr<float>(), x_tiles.data_ptr<float>(),
                       grad.data_ptr<float>(), rows, cols, batch);
    return grad;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(gy_tiles.scalar_type(), "csr_weight_grad", [&] {
    weight_grad<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                          gy_tiles.data_ptr<scalar_t>(), x_tiles.data_ptr<scalar_t>(),
                          grad.data_ptr<scalar_t>(), rows, cols, batch);
  });
  return grad;
}

// scores: a contiguous block of scores; closed: sorted block-relative positions to skip.
// Returns (scores >= threshold, their block-relative positions), in position order.
std::vector<torch::Tensor> candidates_at_least(torch::Tensor grad, double threshold,
                                           torch::Tensor closed) {
  TORCH_CHECK(grad.is_contiguous() && closed.is_contiguous() &&
              closed.scalar_type() == torch::kInt64, "candidates_at_least: bad operands");
  std::vector<torch::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "candidates_at_least", [&] {
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
  m.def("pack_tiles", &pack_tiles, "(features, batch) -> (tiles, features, width)");
  m.def("unpack_tiles", &unpack_tiles, "(tiles, features, width) -> (features, batch)");
  m.def("csr_forward", &csr_forward, "x W^T for a CSR W, x packed");
  m.def("csr_input_grad", &csr_input_grad, "grad_y W for a CSR W, grad_y packed");
  m.def("csr_weight_grad", &csr_weight_grad, "grad_y^T x at the non-zeros of W, both packed");
  m.def("zero_inactive", &zero_inactive, "tensor[~active] = 0, in place");
  m.def("candidates_at_least", &candidates_at_least, "entries of a score block at least a threshold");
}
