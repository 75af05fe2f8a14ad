// CSR kernels for sparsetrain's CSRLinear, with OpenMP over rows or non-zeros.
// Layout: dense operands are "transposed" (features x batch, contiguous), so every inner loop
// runs over the batch with unit stride and vectorises.
#include <torch/extension.h>
#include <omp.h>

namespace {

// out[r, :] = sum_{k in row r} values[k] * dense[col[k], :]   (out: rows x batch)
template <typename scalar_t>
void spmm_rows(const int64_t* crow, const int64_t* col, const scalar_t* values,
               const scalar_t* dense, scalar_t* out, int64_t rows, int64_t batch) {
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* o = out + r * batch;
    for (int64_t b = 0; b < batch; ++b) o[b] = 0;
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
      const scalar_t v = values[k];
      const scalar_t* d = dense + col[k] * batch;
#pragma omp simd
      for (int64_t b = 0; b < batch; ++b) o[b] += v * d[b];
    }
  }
}

// grad[k] = dot(a[row(k), :], b[col[k], :])   for every non-zero k
template <typename scalar_t>
void sampled_dot(const int64_t* crow, const int64_t* col, const scalar_t* a, const scalar_t* bm,
                 scalar_t* grad, int64_t rows, int64_t batch) {
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* ar = a + r * batch;
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
      const scalar_t* bc = bm + col[k] * batch;
      scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t b = 0; b < batch; ++b) acc += ar[b] * bc[b];
      grad[k] = acc;
    }
  }
}

}  // namespace

// dense_t: (in, batch) contiguous; returns (rows, batch)
torch::Tensor csr_spmm(torch::Tensor crow, torch::Tensor col, torch::Tensor values,
                       torch::Tensor dense_t, int64_t rows) {
  auto out = torch::empty({rows, dense_t.size(1)}, dense_t.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_spmm", [&] {
    spmm_rows<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                        values.data_ptr<scalar_t>(), dense_t.data_ptr<scalar_t>(),
                        out.data_ptr<scalar_t>(), rows, dense_t.size(1));
  });
  return out;
}

// a_t: (rows, batch), b_t: (cols, batch); returns the nnz-vector of a_t @ b_t^T at the pattern
torch::Tensor csr_sampled(torch::Tensor crow, torch::Tensor col, torch::Tensor a_t,
                          torch::Tensor b_t) {
  auto grad = torch::empty({col.size(0)}, a_t.options());
  AT_DISPATCH_FLOATING_TYPES(a_t.scalar_type(), "csr_sampled", [&] {
    sampled_dot<scalar_t>(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                          a_t.data_ptr<scalar_t>(), b_t.data_ptr<scalar_t>(),
                          grad.data_ptr<scalar_t>(), crow.size(0) - 1, a_t.size(1));
  });
  return grad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("csr_spmm", &csr_spmm, "CSR times dense (features x batch)");
  m.def("csr_sampled", &csr_sampled, "sampled dense-dense product at a CSR pattern");
}
