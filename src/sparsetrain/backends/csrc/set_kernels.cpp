// Kernels of sparsetrain's active sets and scores (not of products), parallel with OpenMP;
// compiled into the same extension as csr_kernels.cpp, which registers them through
// register_set_kernels.
//
//   candidates_at_least  the entries of a block of grow scores at least a threshold
//   zero_inactive        the masked backend's tensor[~active] = 0
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

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

}  // namespace

#define ST_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

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

void register_set_kernels(pybind11::module& m) {
  m.def("zero_inactive", &zero_inactive, "tensor[~active] = 0, in place");
  m.def("candidates_at_least", &candidates_at_least, "entries of a score block at least a threshold");
}
