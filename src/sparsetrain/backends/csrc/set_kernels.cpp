// Kernels of sparsetrain's active sets and scores (not of products), parallel with OpenMP;
// compiled into the same extension as csr_kernels.cpp, which registers them through
// register_set_kernels.
//
//   candidates_at_least  the entries of a block of grow scores at least a threshold
//   zero_inactive        the masked backend's tensor[~active] = 0
//   sorted_contains, sorted_match, merge_sorted, union_sorted
//                        sets of sorted, distinct int64 positions, each in linear time
//   gather_or_zero       out[j] = tensor[where[j]], 0 where where[j] < 0
//   kth_largest, indices_at_least   top-k selection: its k-th score, the entries at least it
//   top_per_row          the largest entries of every row of a matrix, as many as each row needs
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Candidates of one block of scores (the grow step): the entries at least `threshold`,
// skipping the sorted (block-relative) positions in `closed`, in position order. One pass over
// equal chunks, one per thread, each into its own list (candidates are few); the caller joins
// the lists in thread order. Without branches on the scores: each run of 64 entries is tested
// at once (most have no candidate where the threshold is high), then each of its entries is
// written at the list's end, which moves on only for a candidate; the closed ones are taken
// out of the (short) list afterwards.
template <typename T>
void candidates(const T* grad, int64_t n, double threshold, const int64_t* closed,
                int64_t n_closed, std::vector<std::vector<int64_t>>& index,
                std::vector<std::vector<T>>& score) {
  const int most = omp_get_max_threads();
  index.assign(most, {});
  score.assign(most, {});
#pragma omp parallel num_threads(most)
  {
    const int me = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t i0 = n * me / threads, i1 = n * (me + 1) / threads;
    std::vector<int64_t>& at = index[me];
    std::vector<T>& value = score[me];
    int64_t count = 0;
    for (int64_t run = i0; run < i1; run += 64) {
      const int64_t end = std::min(run + 64, i1);
      int hit = 0;
      for (int64_t i = run; i < end; ++i) hit |= static_cast<double>(grad[i]) >= threshold;
      if (!hit) continue;
      if (static_cast<int64_t>(at.size()) < count + 64) {
        at.resize(2 * (count + 64));
        value.resize(2 * (count + 64));
      }
      int64_t* a = at.data();
      T* v = value.data();
      for (int64_t i = run; i < end; ++i) {
        const T x = grad[i];
        a[count] = i;
        v[count] = x;
        count += static_cast<double>(x) >= threshold;
      }
    }
    int64_t kept = 0;
    int64_t c = std::lower_bound(closed, closed + n_closed, i0) - closed;
    for (int64_t k = 0; k < count; ++k) {
      while (c < n_closed && closed[c] < at[k]) ++c;
      if (c < n_closed && closed[c] == at[k]) continue;
      at[kept] = at[k];
      value[kept++] = value[k];
    }
    at.resize(kept);
    value.resize(kept);
  }
}

// Runs f(begin, end) on equal chunks of [0, n), one per thread where n is large enough to
// pay for starting them, else on the whole range in the calling thread.
template <typename F>
void in_chunks(int64_t n, F f) {
  if (n < (1 << 15)) return f(int64_t{0}, n);
#pragma omp parallel
  {
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    f(n * t / threads, n * (t + 1) / threads);
  }
}

// Index of the first of the sorted v[0, n) that is >= q, searched outwards from `hint` by
// doubling steps then bisection: O(log d) for an answer d places from the hint, so queries in
// sorted order, each starting at the last answer, cost O(n + m) in all; any order stays exact.
inline int64_t lower_bound_from(const int64_t* v, int64_t n, int64_t q, int64_t hint) {
  int64_t lo, hi, step = 1;
  if (hint < n && v[hint] < q) {  // after hint; v[lo - 1] < q throughout
    lo = hi = hint + 1;
    while (hi < n && v[hi] < q) { lo = hi + 1; hi += step; step <<= 1; }
    hi = std::min(hi, n);
  } else {  // at or before hint; hi == n or v[hi] >= q throughout
    hi = hint;
    lo = hi - 1;
    while (lo >= 0 && v[lo] >= q) { hi = lo; lo -= step; step <<= 1; }
    lo = std::max<int64_t>(lo + 1, 0);
  }
  return std::lower_bound(v + lo, v + hi, q) - v;
}

// lower_bound_from for the next of queries that mostly come in sorted order, h the last
// answer: a few single steps forward first (sets of positions interleave closely).
inline int64_t search_next(const int64_t* v, int64_t n, int64_t q, int64_t h) {
  if (h < n && v[h] < q) {
    for (int s = 0; s < 4; ++s) if (++h == n || v[h] >= q) return h;
  } else if (h == 0 || v[h - 1] < q) {
    return h;
  }
  return lower_bound_from(v, n, q, h);
}

// How many of a come first among the first d entries of the merge of the sorted a and b, in
// which b[j] comes before a[i] where they are equal (where torch.searchsorted(a, b) puts it).
inline int64_t merge_split(const int64_t* a, int64_t n, const int64_t* b, int64_t m, int64_t d) {
  int64_t lo = std::max<int64_t>(0, d - m), hi = std::min(d, n);
  while (lo < hi) {
    const int64_t i = lo + (hi - lo) / 2;
    if (a[i] < b[d - i - 1]) lo = i + 1; else hi = i;
  }
  return lo;
}

// Two passes over equal chunks of [0, n), one per thread where n is large enough: count(i0, i1)
// says how many outputs a chunk has, alloc(total) makes room for them all (once), and
// write(i0, i1, begin, end) writes a chunk's to [begin, end), so that they come in chunk order.
template <typename Count, typename Alloc, typename Write>
void count_alloc_write(int64_t n, Count count, Alloc alloc, Write write) {
  const int most = n < (1 << 15) ? 1 : omp_get_max_threads();
  std::vector<int64_t> offset(most + 1, 0);
#pragma omp parallel num_threads(most)
  {
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t i0 = n * t / threads, i1 = n * (t + 1) / threads;
    offset[t + 1] = count(i0, i1);
#pragma omp barrier
#pragma omp single
    {
      for (int u = 0; u < threads; ++u) offset[u + 1] += offset[u];
      alloc(offset[threads]);
    }
    write(i0, i1, offset[t], offset[t + 1]);
  }
}

// The merge of a[i, i1) and b[j, j1) (sorted; b[j] before an equal a[i]) in runs, places from
// d on: run(i, p, d) for a[i, p), one(j, d) for b[j]; each b found by search_next from the end of
// the last run, so that the cost goes with the number of b and runs copy at memcpy speed. With
// Unite, an a equal to the b before it is left out (also the first, for a b in the chunk
// before). Returns the place after the last.
template <bool Unite, typename Run, typename One>
int64_t merge_runs(const int64_t* a, int64_t i, int64_t i1, const int64_t* b, int64_t j,
                   int64_t j1, int64_t d, Run run, One one) {
  if (Unite && j > 0 && i < i1 && a[i] == b[j - 1]) ++i;
  for (; j < j1; ++j) {
    const int64_t p = search_next(a, i1, b[j], i);
    if (p > i) run(i, p, d);
    d += p - i;
    i = p;
    one(j, d++);
    if (Unite && i < i1 && a[i] == b[j]) ++i;
  }
  if (i1 > i) run(i, i1, d);
  return d + (i1 - i);
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
    std::vector<std::vector<int64_t>> index;
    std::vector<std::vector<scalar_t>> score;
    candidates<scalar_t>(grad.data_ptr<scalar_t>(), grad.numel(), threshold,
                         closed.data_ptr<int64_t>(), closed.numel(), index, score);
    std::vector<int64_t> offset(index.size() + 1, 0);
    for (size_t t = 0; t < index.size(); ++t) offset[t + 1] = offset[t] + index[t].size();
    auto values = torch::empty({offset.back()}, grad.options());
    auto where = torch::empty({offset.back()}, closed.options());
    for (size_t t = 0; t < index.size(); ++t) {
      std::copy(score[t].begin(), score[t].end(), values.data_ptr<scalar_t>() + offset[t]);
      std::copy(index[t].begin(), index[t].end(), where.data_ptr<int64_t>() + offset[t]);
    }
    result = {values, where};
  });
  return result;
}

// --- selection -------------------------------------------------------------------------------
template <typename T>
torch::Tensor indices_at_least_of(const torch::Tensor& scores, const torch::Tensor& threshold) {
  const T* x = scores.data_ptr<T>();
  const T t = threshold.cpu().item<T>();
  torch::Tensor out;
  count_alloc_write(scores.numel(), [&](int64_t i0, int64_t i1) {
    int64_t count = 0;
    for (int64_t i = i0; i < i1; ++i) count += x[i] >= t;
    return count;
  }, [&](int64_t total) { out = torch::empty({total}, scores.options().dtype(torch::kInt64)); },
  [&](int64_t i0, int64_t i1, int64_t begin, int64_t end) {
    int64_t *o = out.data_ptr<int64_t>() + begin, *last = out.data_ptr<int64_t>() + end;
    for (int64_t i = i0; i < i1 && o < last; ++i) {  // without a branch on the scores
      *o = i;
      o += x[i] >= t;
    }
  });
  return out;
}

static void check_scores(const torch::Tensor& scores, const char* what) {
  TORCH_CHECK(scores.dim() == 1 && scores.is_contiguous() && scores.device().is_cpu(), what,
              ": scores must be contiguous 1-D on the CPU");
}

// Unsigned keys in the order of the floats, with -0 taken as +0 (they compare equal).
template <typename T> struct OrderKey;
template <> struct OrderKey<float> { using type = uint32_t; };
template <> struct OrderKey<double> { using type = uint64_t; };

template <typename T, typename U = typename OrderKey<T>::type>
inline U order_key(T x) {
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  U u;
  std::memcpy(&u, &x, sizeof u);
  if (u == sign) u = 0;  // -0 as +0
  return (u & sign) ? ~u : (u | sign);
}

template <typename T, typename U = typename OrderKey<T>::type>
inline T from_order_key(U key) {
  constexpr U sign = U(1) << (8 * sizeof(U) - 1);
  const U u = (key & sign) ? (key & ~sign) : ~key;
  T x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// The k-th largest of x[0, n) (1 <= k <= n) by radix selection on the order keys, 11 bits at a
// time from the top: a histogram of the top digit (in parallel) names the bin of the k-th; the
// keys in that bin are gathered, and their next digits narrow it down. Returns false, doing
// nothing, where an entry is NaN (which has no place among the keys that torch would give it).
template <typename T>
bool radix_kth_largest(const T* x, int64_t n, int64_t k, T& kth) {
  using U = typename OrderKey<T>::type;
  constexpr int BITS = 8 * sizeof(U), DIGIT = 11, BINS = 1 << DIGIT;
  const int most = n < (1 << 15) ? 1 : omp_get_max_threads();
  std::vector<int64_t> hist(int64_t(most) * BINS, 0), nan(most, 0);
  std::vector<U> keys;
  int used = 1, top_bin = 0;
  int64_t rank = k;  // of the k-th among the keys still in play
#pragma omp parallel num_threads(most)
  {
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t i0 = n * t / threads, i1 = n * (t + 1) / threads;
    int64_t* h = hist.data() + int64_t(t) * BINS;
    int64_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      bad += x[i] != x[i];
      ++h[order_key(x[i]) >> (BITS - DIGIT)];
    }
    nan[t] = bad;
#pragma omp barrier
#pragma omp single
    {
      used = threads;
      int64_t above = 0;
      for (int b = BINS - 1; b >= 0; --b) {
        int64_t count = 0;
        for (int u = 0; u < threads; ++u) count += hist[int64_t(u) * BINS + b];
        if (above + count >= rank) { top_bin = b; break; }
        above += count;
      }
      rank -= above;
      int64_t total = 0;
      for (int u = 0; u < threads; ++u) {  // each thread's offset in keys, in place of its count
        const int64_t count = hist[int64_t(u) * BINS + top_bin];
        hist[int64_t(u) * BINS + top_bin] = total;
        total += count;
      }
      keys.resize(total);
    }
    U* out = keys.data() + h[top_bin];
    for (int64_t i = i0; i < i1; ++i) {
      const U key = order_key(x[i]);
      if (int(key >> (BITS - DIGIT)) == top_bin) *out++ = key;
    }
  }
  for (int t = 0; t < used; ++t) if (nan[t]) return false;
  U prefix = U(top_bin) << (BITS - DIGIT);
  for (int shift = BITS - DIGIT; shift > 0;) {  // the next digits, on the keys in play
    const int width = std::min(DIGIT, shift);
    shift -= width;
    const U mask = (U(1) << width) - 1;
    std::vector<int64_t> count(size_t(1) << width, 0);
    for (U key : keys) ++count[(key >> shift) & mask];
    U bin = mask;
    for (int64_t above = 0;; --bin) {
      if (above + count[bin] >= rank) { rank -= above; break; }
      above += count[bin];
    }
    prefix |= bin << shift;
    size_t kept = 0;
    for (U key : keys) if (((key >> shift) & mask) == bin) keys[kept++] = key;
    keys.resize(kept);
  }
  kth = from_order_key<T>(prefix);
  return true;
}

// The k-th largest of the float32 or float64 scores (1 <= k <= n) as a 0-dim tensor, or an
// empty tensor where a score is NaN. (A zero comes back as +0.)
torch::Tensor kth_largest(torch::Tensor scores, int64_t k) {
  check_scores(scores, "kth_largest");
  TORCH_CHECK(1 <= k && k <= scores.numel(), "kth_largest: k must be in [1, n]");
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "kth_largest", [&] {
    scalar_t kth;
    out = radix_kth_largest(scores.data_ptr<scalar_t>(), scores.numel(), k, kth)
              ? torch::full({}, kth, scores.options()) : torch::empty({0}, scores.options());
  });
  return out;
}

// Every row g of the (rows, width) `scores` keeps its need[g] largest entries: `chosen` marks
// those above the row's need[g]-th largest (its `kth`), and those equal to it where all of them
// fit; where more entries tie with the kth than places are left, none of the tied ones is
// marked and `short` holds the places left (the caller breaks those ties by its keys). A row
// with need 0 has kth +inf. Scores must not be NaN (-inf is fine). Rows in parallel; per row,
// O(width): for k = need[g] up to a quarter of the row, the row is cut into k runs, and the
// smallest of their maxima is a floor that at least k entries reach (one per run), so the
// k-th is found among the entries at least that floor (a few times k on most data), by
// std::nth_element on their order keys; for larger k, among all the entries.
template <typename T>
void top_rows(const T* x, int64_t rows, int64_t width, const int64_t* need, bool* chosen,
              T* kth, int64_t* short_) {
  using U = typename OrderKey<T>::type;
#pragma omp parallel if (rows * width > (1 << 15))
  {
    std::vector<U> keys(width);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < rows; ++g) {
      const T* row = x + g * width;
      bool* mark = chosen + g * width;
      const int64_t k = std::min<int64_t>(std::max<int64_t>(need[g], 0), width);
      if (k == 0) {
        std::fill(mark, mark + width, false);
        kth[g] = std::numeric_limits<T>::infinity();
        short_[g] = 0;
        continue;
      }
      for (int64_t i = 0; i < width; ++i) keys[i] = order_key(row[i]);
      int64_t n = width;
      if (4 * k <= width) {
        U floor = ~U(0);  // at least k keys reach it
        for (int64_t c = 0; c < k; ++c) {
          U most = 0;
          for (int64_t i = c * width / k, i1 = (c + 1) * width / k; i < i1; ++i)
            most = std::max(most, keys[i]);
          floor = std::min(floor, most);
        }
        n = 0;  // the keys at least the floor, in place, without branches
        for (int64_t i = 0; i < width; ++i) {
          const U key = keys[i];
          keys[n] = key;
          n += key >= floor;
        }
      }
      std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.begin() + n, std::greater<U>());
      const U at = keys[k - 1];
      int64_t above = 0, equal = 0;
      for (int64_t j = 0; j < n; ++j) {
        above += keys[j] > at;
        equal += keys[j] == at;
      }
      const bool all_tied_fit = above + equal == k;
      for (int64_t i = 0; i < width; ++i) {
        const U key = order_key(row[i]);
        mark[i] = key > at || (all_tied_fit && key == at);
      }
      kth[g] = from_order_key<T>(at);
      short_[g] = all_tied_fit ? 0 : k - above;
    }
  }
}

std::vector<torch::Tensor> top_per_row(torch::Tensor scores, torch::Tensor need) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() && scores.device().is_cpu(),
              "top_per_row: scores must be contiguous 2-D on the CPU");
  TORCH_CHECK(need.dim() == 1 && need.numel() == scores.size(0) && need.is_contiguous() &&
              need.scalar_type() == torch::kInt64, "top_per_row: need must be int64, one a row");
  const int64_t rows = scores.size(0), width = scores.size(1);
  auto chosen = torch::empty({rows, width}, scores.options().dtype(torch::kBool));
  auto kth = torch::empty({rows}, scores.options());
  auto short_ = torch::empty({rows}, need.options());
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "top_per_row", [&] {
    top_rows<scalar_t>(scores.data_ptr<scalar_t>(), rows, width, need.data_ptr<int64_t>(),
                       chosen.data_ptr<bool>(), kth.data_ptr<scalar_t>(),
                       short_.data_ptr<int64_t>());
  });
  return {chosen, kth, short_};
}

// The sorted indices of the scores (float32, float64 or int64) at least `threshold`, one entry
// of their dtype (compared exactly, also int64 beyond 2^53).
torch::Tensor indices_at_least(torch::Tensor scores, torch::Tensor threshold) {
  check_scores(scores, "indices_at_least");
  TORCH_CHECK(threshold.numel() == 1 && threshold.scalar_type() == scores.scalar_type(),
              "indices_at_least: the threshold must be one entry of the scores' dtype");
  torch::Tensor out;
  AT_DISPATCH_SWITCH(scores.scalar_type(), "indices_at_least",
      AT_DISPATCH_CASE(at::kFloat, [&] { out = indices_at_least_of<scalar_t>(scores, threshold); })
      AT_DISPATCH_CASE(at::kDouble, [&] { out = indices_at_least_of<scalar_t>(scores, threshold); })
      AT_DISPATCH_CASE(at::kLong, [&] { out = indices_at_least_of<scalar_t>(scores, threshold); }));
  return out;
}

// --- sets of sorted positions ---------------------------------------------------------------
static void check_positions(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.scalar_type() == torch::kInt64 &&
              t.device().is_cpu(), what, ": positions must be contiguous 1-D int64 on the CPU");
}

// Whether each of the queries is among the sorted values: linear in all for sorted queries,
// exact in any order.
torch::Tensor sorted_contains(torch::Tensor values, torch::Tensor queries) {
  check_positions(values, "sorted_contains");
  check_positions(queries, "sorted_contains");
  const int64_t *v = values.data_ptr<int64_t>(), *q = queries.data_ptr<int64_t>();
  const int64_t n = values.numel();
  auto out = torch::empty(queries.sizes(), queries.options().dtype(torch::kBool));
  bool* found = out.data_ptr<bool>();
  in_chunks(queries.numel(), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0, h = 0; i < i1; ++i) {
      h = search_next(v, n, q[i], h);
      found[i] = h < n && v[h] == q[i];
    }
  });
  return out;
}

// (where, missing) for the sorted values and the sorted queries: where[j] the index of
// queries[j] among the values, or -1; missing the queries that are not among them, in order.
std::vector<torch::Tensor> sorted_match(torch::Tensor values, torch::Tensor queries) {
  check_positions(values, "sorted_match");
  check_positions(queries, "sorted_match");
  const int64_t *v = values.data_ptr<int64_t>(), *q = queries.data_ptr<int64_t>();
  const int64_t n = values.numel();
  auto where = torch::empty_like(queries), missing = torch::empty({0}, queries.options());
  int64_t* at = where.data_ptr<int64_t>();
  count_alloc_write(queries.numel(), [&](int64_t i0, int64_t i1) {
    int64_t count = 0;
    for (int64_t i = i0, h = 0; i < i1; ++i) {
      h = search_next(v, n, q[i], h);
      const bool found = h < n && v[h] == q[i];
      at[i] = found ? h : -1;
      count += !found;
    }
    return count;
  }, [&](int64_t total) { missing = torch::empty({total}, queries.options()); },
  [&](int64_t i0, int64_t i1, int64_t out, int64_t) {
    int64_t* m = missing.data_ptr<int64_t>();
    for (int64_t i = i0; i < i1; ++i) if (at[i] < 0) m[out++] = q[i];
  });
  return {where, missing};
}

// (merged, a_at, b_at): the merge of the sorted a and b, and where each entry of a and of b is
// in it; an entry of b goes before an equal one of a (as positions.merge_sorted places it).
std::vector<torch::Tensor> merge_sorted(torch::Tensor a, torch::Tensor b) {
  check_positions(a, "merge_sorted");
  check_positions(b, "merge_sorted");
  const int64_t n = a.numel(), m = b.numel();
  auto merged = torch::empty({n + m}, a.options());
  auto a_at = torch::empty_like(a), b_at = torch::empty_like(b);
  const int64_t *pa = a.data_ptr<int64_t>(), *pb = b.data_ptr<int64_t>();
  int64_t *out = merged.data_ptr<int64_t>(), *at_a = a_at.data_ptr<int64_t>(),
          *at_b = b_at.data_ptr<int64_t>();
  in_chunks(n + m, [&](int64_t d0, int64_t d1) {  // equal chunks of the merge
    const int64_t i0 = merge_split(pa, n, pb, m, d0), i1 = merge_split(pa, n, pb, m, d1);
    merge_runs<false>(pa, i0, i1, pb, d0 - i0, d1 - i1, d0,
        [&](int64_t i, int64_t p, int64_t d) {
          std::memcpy(out + d, pa + i, (p - i) * sizeof(int64_t));
          for (int64_t r = i; r < p; ++r) at_a[r] = d + (r - i);
        },
        [&](int64_t j, int64_t d) { out[d] = pb[j]; at_b[j] = d; });
  });
  return {merged, a_at, b_at};
}

// The union of the sorted sets a and b (each without repeats), sorted.
torch::Tensor union_sorted(torch::Tensor a, torch::Tensor b) {
  check_positions(a, "union_sorted");
  check_positions(b, "union_sorted");
  const int64_t n = a.numel(), m = b.numel();
  const int64_t *pa = a.data_ptr<int64_t>(), *pb = b.data_ptr<int64_t>();
  // equal chunks of the merge, each writing the union of its entries
  auto unite = [&](int64_t d0, int64_t d1, int64_t begin, auto run, auto one) {
    const int64_t i0 = merge_split(pa, n, pb, m, d0), i1 = merge_split(pa, n, pb, m, d1);
    return merge_runs<true>(pa, i0, i1, pb, d0 - i0, d1 - i1, begin, run, one) - begin;
  };
  auto nothing = [](int64_t, int64_t, int64_t = 0) {};
  torch::Tensor result;
  count_alloc_write(n + m, [&](int64_t d0, int64_t d1) {
    return unite(d0, d1, 0, nothing, nothing);
  }, [&](int64_t total) { result = torch::empty({total}, a.options()); },
  [&](int64_t d0, int64_t d1, int64_t begin, int64_t) {
    int64_t* out = result.data_ptr<int64_t>();
    unite(d0, d1, begin,
          [&](int64_t i, int64_t p, int64_t d) {
            std::memcpy(out + d, pa + i, (p - i) * sizeof(int64_t));
          },
          [&](int64_t j, int64_t d) { out[d] = pb[j]; });
  });
  return result;
}

// out[j] = tensor[where[j]], or 0 where where[j] < 0 (a 1-D contiguous tensor of any dtype
// but complex).
torch::Tensor gather_or_zero(torch::Tensor tensor, torch::Tensor where) {
  check_positions(where, "gather_or_zero");
  TORCH_CHECK(tensor.dim() == 1 && tensor.is_contiguous() && tensor.device().is_cpu(),
              "gather_or_zero: the tensor must be contiguous 1-D on the CPU");
  auto out = torch::empty({where.numel()}, tensor.options());
  const int64_t* at = where.data_ptr<int64_t>();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, tensor.scalar_type(),
                             "gather_or_zero", [&] {
    const scalar_t* src = tensor.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    in_chunks(where.numel(), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) dst[j] = at[j] >= 0 ? src[at[j]] : scalar_t(0);
    });
  });
  return out;
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
  m.def("kth_largest", &kth_largest, "k-th largest of float scores (empty where one is NaN)");
  m.def("top_per_row", &top_per_row, "(chosen, kth, short): each row's largest, ties left");
  m.def("indices_at_least", &indices_at_least, "sorted indices of the scores at least a threshold");
  m.def("sorted_contains", &sorted_contains, "whether each query is among the sorted values");
  m.def("sorted_match", &sorted_match, "(index of each sorted query or -1, queries not found)");
  m.def("merge_sorted", &merge_sorted, "(merge of sorted a and b, where a went, where b went)");
  m.def("union_sorted", &union_sorted, "union of two sorted sets");
  m.def("gather_or_zero", &gather_or_zero, "tensor[where], 0 where where < 0");
}
