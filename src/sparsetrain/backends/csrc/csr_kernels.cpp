// CSR kernels for sparsetrain's CSRLinear, parallel with OpenMP.
//
// Dense operands are "transposed" (features x batch, contiguous), so every inner loop runs over
// the batch with unit stride and vectorises. The batch is cut into tiles of BT columns: a tile's
// accumulators stay in vector registers, and the slice of the dense operand a tile reads
// (features x BT) stays in the core's L2 cache while every row is processed.
//
// The three products of a training step, for W (rows x cols) with non-zeros (r, col[k], v[k]):
//   csr_spmm      out[r, :]      = sum_k v[k] * dense[col[k], :]        (forward)
//   csr_spmm_t    out[col[k], :] += v[k] * dense[r, :]                   (input gradient)
//   csr_sampled   grad[k]        = dot(a[r, :], b[col[k], :])             (weight gradient)
// csr_spmm_t scatters: each thread owns a slice of the output rows (columns of W), found per
// row by binary search in its sorted column indices, so no two threads write the same row and
// no transposed copy of W is needed.
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>

namespace {

constexpr int kVectorBytes = 64;  // one cache line, one AVX-512 register

// Tile widths in elements: forward 4 registers, scatter 8, sampled 16.
template <typename T> constexpr int fwd_tile() { return 4 * kVectorBytes / sizeof(T); }
template <typename T> constexpr int scatter_tile() { return 8 * kVectorBytes / sizeof(T); }
template <typename T> constexpr int sampled_tile() { return 16 * kVectorBytes / sizeof(T); }

// One row of the forward product over one batch tile of (compile-time) width BT, or of run-time
// width `width` <= BT when BT is the tail case (FULL == false).
template <typename T, int BT, bool FULL>
inline void spmm_row(const int64_t* col, const T* values, int64_t k0, int64_t k1, const T* dense,
                     int64_t batch, int64_t b0, int width, T* out_row) {
  T acc[BT];
  const int n = FULL ? BT : width;
#pragma GCC unroll 64
  for (int b = 0; b < BT; ++b) acc[b] = 0;
  for (int64_t k = k0; k < k1; ++k) {
    const T v = values[k];
    const T* d = dense + col[k] * batch + b0;
    if (FULL) {
#pragma GCC unroll 64
      for (int b = 0; b < BT; ++b) acc[b] += v * d[b];
    } else {
#pragma omp simd
      for (int b = 0; b < n; ++b) acc[b] += v * d[b];
    }
  }
  for (int b = 0; b < n; ++b) out_row[b0 + b] = acc[b];
}

template <typename T>
void spmm(const int64_t* crow, const int64_t* col, const T* values, const T* dense, T* out,
          int64_t rows, int64_t batch) {
  constexpr int BT = fwd_tile<T>();
#pragma omp parallel
  for (int64_t b0 = 0; b0 < batch; b0 += BT) {
    const int width = static_cast<int>(std::min<int64_t>(BT, batch - b0));
#pragma omp for schedule(dynamic, 32) nowait
    for (int64_t r = 0; r < rows; ++r) {
      if (width == BT)
        spmm_row<T, BT, true>(col, values, crow[r], crow[r + 1], dense, batch, b0, BT,
                              out + r * batch);
      else
        spmm_row<T, BT, false>(col, values, crow[r], crow[r + 1], dense, batch, b0, width,
                               out + r * batch);
    }
  }
}

template <typename T, int BT, bool FULL>
inline void scatter_row(const int64_t* col, const T* values, int64_t k0, int64_t k1,
                        const T* dense_row, int64_t batch, int64_t b0, int width, T* out) {
  T src[BT];
  const int n = FULL ? BT : width;
  for (int b = 0; b < n; ++b) src[b] = dense_row[b0 + b];
  for (int64_t k = k0; k < k1; ++k) {
    const T v = values[k];
    T* o = out + col[k] * batch + b0;
    if (FULL) {
#pragma GCC unroll 64
      for (int b = 0; b < BT; ++b) o[b] += v * src[b];
    } else {
#pragma omp simd
      for (int b = 0; b < n; ++b) o[b] += v * src[b];
    }
  }
}

template <typename T>
void spmm_t(const int64_t* crow, const int64_t* col, const T* values, const T* dense, T* out,
            int64_t rows, int64_t cols, int64_t batch) {
  constexpr int BT = scatter_tile<T>();
#pragma omp parallel
  {
    const int threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t c0 = cols * me / threads, c1 = cols * (me + 1) / threads;
    std::fill(out + c0 * batch, out + c1 * batch, T(0));
    for (int64_t b0 = 0; b0 < batch; b0 += BT) {
      const int width = static_cast<int>(std::min<int64_t>(BT, batch - b0));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t* first = col + crow[r];
        const int64_t* last = col + crow[r + 1];
        const int64_t k0 = std::lower_bound(first, last, c0) - col;
        const int64_t k1 = std::lower_bound(first, last, c1) - col;
        if (k0 == k1) continue;
        if (width == BT)
          scatter_row<T, BT, true>(col, values, k0, k1, dense + r * batch, batch, b0, BT, out);
        else
          scatter_row<T, BT, false>(col, values, k0, k1, dense + r * batch, batch, b0, width,
                                    out);
      }
    }
  }
}

template <typename T>
void sampled(const int64_t* crow, const int64_t* col, const T* a, const T* bm, T* grad,
             int64_t rows, int64_t batch) {
  constexpr int BT = sampled_tile<T>();
  constexpr int kAhead = 2;  // prefetch the dense row this many non-zeros ahead
#pragma omp parallel
  for (int64_t b0 = 0; b0 < batch; b0 += BT) {
    const int width = static_cast<int>(std::min<int64_t>(BT, batch - b0));
    const bool first_tile = b0 == 0;
#pragma omp for schedule(dynamic, 32)
    for (int64_t r = 0; r < rows; ++r) {
      T ar[BT];
      for (int b = 0; b < width; ++b) ar[b] = a[r * batch + b0 + b];
      const int64_t end = crow[r + 1];
      for (int64_t k = crow[r]; k < end; ++k) {
        if (k + kAhead < end) {
          const char* p = reinterpret_cast<const char*>(bm + col[k + kAhead] * batch + b0);
          for (int64_t off = 0; off < int64_t(width * sizeof(T)); off += kVectorBytes)
            __builtin_prefetch(p + off);
        }
        const T* c = bm + col[k] * batch + b0;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int b = 0; b < width; ++b) acc += ar[b] * c[b];
        grad[k] = first_tile ? acc : grad[k] + acc;
      }
    }
  }
}

void check(const torch::Tensor& crow, const torch::Tensor& col, const torch::Tensor& dense,
           const char* what) {
  TORCH_CHECK(crow.scalar_type() == torch::kInt64 && col.scalar_type() == torch::kInt64,
              what, ": CSR indices must be int64");
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous() && dense.is_contiguous(), what,
              ": operands must be contiguous");
  TORCH_CHECK(dense.dim() == 2, what, ": the dense operand must be 2-D");
}

}  // namespace

// dense_t: (cols, batch); returns (rows, batch)
torch::Tensor csr_spmm(torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                       torch::Tensor dense_t, int64_t rows) {
  check(crow, col, dense_t, "csr_spmm");
  auto out = torch::empty({rows, dense_t.size(1)}, dense_t.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_spmm", [&] {
    spmm<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                   values.data_ptr<scalar_t>(), dense_t.data_ptr<scalar_t>(),
                   out.data_ptr<scalar_t>(), rows, dense_t.size(1));
  });
  return out;
}

// dense_t: (rows, batch); returns W^T dense_t, (cols, batch)
torch::Tensor csr_spmm_t(torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                         torch::Tensor dense_t, int64_t cols) {
  check(crow, col, dense_t, "csr_spmm_t");
  auto out = torch::empty({cols, dense_t.size(1)}, dense_t.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_spmm_t", [&] {
    spmm_t<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                     values.data_ptr<scalar_t>(), dense_t.data_ptr<scalar_t>(),
                     out.data_ptr<scalar_t>(), crow.size(0) - 1, cols, dense_t.size(1));
  });
  return out;
}

// a_t: (rows, batch), b_t: (cols, batch); returns the nnz-vector of a_t @ b_t^T at the pattern
torch::Tensor csr_sampled(torch::Tensor crow, torch::Tensor col, torch::Tensor a_t,
                          torch::Tensor b_t) {
  check(crow, col, a_t, "csr_sampled");
  check(crow, col, b_t, "csr_sampled");
  auto grad = torch::empty({col.size(0)}, a_t.options());
  AT_DISPATCH_FLOATING_TYPES(a_t.scalar_type(), "csr_sampled", [&] {
    sampled<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                      a_t.data_ptr<scalar_t>(), b_t.data_ptr<scalar_t>(),
                      grad.data_ptr<scalar_t>(), crow.size(0) - 1, a_t.size(1));
  });
  return grad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("csr_spmm", &csr_spmm, "CSR times dense (features x batch)");
  m.def("csr_spmm_t", &csr_spmm_t, "transposed CSR times dense, by scatter");
  m.def("csr_sampled", &csr_sampled, "sampled dense-dense product at a CSR pattern");
}
