// Kernels of the CH3-L3 link prediction of a sparse layer (sparsity/link_prediction.py), parallel
// with OpenMP; compiled into the same extension as csr_kernels.cpp, which registers them through
// register_graph_kernels. The layer is a bipartite graph: its rows and its columns are the
// nodes, its active weights the links, held as the CSR structure (crow, col) and the structure
// of its transpose (t_crow, t_row: the rows of each column, in order), all int32. A path of
// length 3 from row r to column c is r - z2 - z1 - c: z2 a column of r, z1 a row of z2, c a
// column of z1.
//
//   ch3_common_columns  cc[a, b] = |N(a) & N(b)|, the rows that columns a and b share (int32)
//   l3_rows             for rows r0..r1 - 1 and every column c: the sum over the paths r - z2 -
//                       z1 - c of wc[z2] * wr[z1] (int64 weights per node), as
//                       (A diag(wc) A^T diag(wr) A)[r, c]
//   ch3_l3_pairs        for each given pair (r, c), not a link: the sum over its paths of
//                       g[(deg z1 - |N(z1) & N(r)|) * (deg z2 - cc[z2, c])] (g: the caller's
//                       int64 table of round(2^E / sqrt(m))); the pairs of a row share its
//                       wedges r - z2 - z1, built once
// All sums are of integers, so they do not depend on the order of the terms: the torch
// versions in link_prediction.py give the same numbers.
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// Pairs of one row whose factors deg(z2) - |N(z2) & N(c)| are gathered at once.
constexpr int64_t kPairChunk = 256;

void check_structure(const torch::Tensor& ptr, const torch::Tensor& idx, const char* what) {
  TORCH_CHECK(ptr.scalar_type() == torch::kInt32 && idx.scalar_type() == torch::kInt32, what,
              ": the graph's indices must be int32");
  TORCH_CHECK(ptr.dim() == 1 && idx.dim() == 1 && ptr.numel() >= 1 && ptr.is_contiguous() &&
                  idx.is_contiguous() && !ptr.is_cuda() && !idx.is_cuda(),
              what, ": expected contiguous 1-D CPU pointers and indices");
}

void check_int64(const torch::Tensor& t, int64_t n, const char* what, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kInt64 && t.is_contiguous() && t.dim() == 1 &&
                  !t.is_cuda() && (n < 0 || t.numel() == n),
              what, ": ", name, " must be a contiguous 1-D int64 CPU tensor of the right size");
}

torch::Tensor ch3_common_columns(torch::Tensor crow, torch::Tensor col, torch::Tensor t_crow,
                                 torch::Tensor t_row) {
  check_structure(crow, col, "ch3_common_columns");
  check_structure(t_crow, t_row, "ch3_common_columns");
  const int64_t cols = t_crow.numel() - 1;
  auto cc = torch::zeros({cols, cols}, crow.options());
  const int32_t *cp = crow.data_ptr<int32_t>(), *cl = col.data_ptr<int32_t>();
  const int32_t *tp = t_crow.data_ptr<int32_t>(), *tr = t_row.data_ptr<int32_t>();
  int32_t* out = cc.data_ptr<int32_t>();
  // one row of the table at a time (in cache): each row r of column a adds one to its columns
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t a = 0; a < cols; ++a) {
    int32_t* line = out + a * cols;
    for (int32_t j = tp[a]; j < tp[a + 1]; ++j) {
      const int32_t r = tr[j];
      for (int32_t k = cp[r]; k < cp[r + 1]; ++k) line[cl[k]] += 1;
    }
  }
  return cc;
}

torch::Tensor l3_rows(torch::Tensor crow, torch::Tensor col, torch::Tensor t_crow,
                      torch::Tensor t_row, torch::Tensor wr, torch::Tensor wc, int64_t r0,
                      int64_t r1) {
  check_structure(crow, col, "l3_rows");
  check_structure(t_crow, t_row, "l3_rows");
  const int64_t rows = crow.numel() - 1, cols = t_crow.numel() - 1;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= rows, "l3_rows: rows out of range");
  check_int64(wr, rows, "l3_rows", "wr");
  check_int64(wc, cols, "l3_rows", "wc");
  auto out = torch::zeros({r1 - r0, cols}, wr.options());
  const int32_t *cp = crow.data_ptr<int32_t>(), *cl = col.data_ptr<int32_t>();
  const int32_t *tp = t_crow.data_ptr<int32_t>(), *tr = t_row.data_ptr<int32_t>();
  const int64_t *w_row = wr.data_ptr<int64_t>(), *w_col = wc.data_ptr<int64_t>();
  int64_t* scores = out.data_ptr<int64_t>();
#pragma omp parallel
  {
    std::vector<int64_t> through(rows, 0);  // sum of wc[z2] over the columns z2 of r and z1
    std::vector<int32_t> touched;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = r0; r < r1; ++r) {
      touched.clear();
      for (int32_t k = cp[r]; k < cp[r + 1]; ++k) {
        const int32_t z2 = cl[k];
        const int64_t w = w_col[z2];
        for (int32_t j = tp[z2]; j < tp[z2 + 1]; ++j) {
          const int32_t z1 = tr[j];
          if (through[z1] == 0) touched.push_back(z1);
          through[z1] += w;
        }
      }
      int64_t* line = scores + (r - r0) * cols;
      for (const int32_t z1 : touched) {
        const int64_t w = through[z1] * w_row[z1];
        through[z1] = 0;
        for (int32_t i = cp[z1]; i < cp[z1 + 1]; ++i) line[cl[i]] += w;
      }
    }
  }
  return out;
}

torch::Tensor ch3_l3_pairs(torch::Tensor crow, torch::Tensor col, torch::Tensor t_crow,
                           torch::Tensor t_row, torch::Tensor cc, torch::Tensor g,
                           torch::Tensor positions) {
  check_structure(crow, col, "ch3_l3_pairs");
  check_structure(t_crow, t_row, "ch3_l3_pairs");
  const int64_t rows = crow.numel() - 1, cols = t_crow.numel() - 1;
  TORCH_CHECK(cc.scalar_type() == torch::kInt32 && cc.is_contiguous() && cc.dim() == 2 &&
                  cc.size(0) == cols && cc.size(1) == cols,
              "ch3_l3_pairs: cc must be the contiguous int32 (cols, cols) table");
  check_int64(g, -1, "ch3_l3_pairs", "g");
  check_int64(positions, -1, "ch3_l3_pairs", "positions");
  const int64_t n = positions.numel(), n_table = g.numel();
  auto out = torch::zeros({n}, g.options());
  const int32_t *cp = crow.data_ptr<int32_t>(), *cl = col.data_ptr<int32_t>();
  const int32_t *tp = t_crow.data_ptr<int32_t>(), *tr = t_row.data_ptr<int32_t>();
  const int32_t* common = cc.data_ptr<int32_t>();
  const int64_t *table = g.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  int64_t* scores = out.data_ptr<int64_t>();
  // g[a * b] as a table of rows a: the terms of one row z1 (one a) are then read from one
  // short row (in cache) rather than from all over g
  int32_t top_r = 0, top_c = 0;
  for (int64_t r = 0; r < rows; ++r) top_r = std::max(top_r, cp[r + 1] - cp[r]);
  for (int64_t c = 0; c < cols; ++c) top_c = std::max(top_c, tp[c + 1] - tp[c]);
  const int64_t width = top_c + 1;
  std::vector<int64_t> by_a((top_r + 1) * width, 0);
  for (int64_t a = 1; a <= top_r; ++a)
    for (int64_t b = 1; b <= top_c && a * b < n_table; ++b) by_a[a * width + b] = table[a * b];
  TORCH_CHECK(static_cast<int64_t>(top_r) * top_c < n_table || n == 0,
              "ch3_l3_pairs: the table g is too short for the graph's degrees");
  // the pairs of each row: [starts[i], starts[i + 1]) (the positions are sorted)
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < rows * cols && (i == 0 || pos[i] > pos[i - 1]),
                "ch3_l3_pairs: positions must be sorted, distinct and inside the layer");
    if (i == 0 || pos[i] / cols != pos[i - 1] / cols) starts.push_back(i);
  }
  starts.push_back(n);
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  bool bad = false;
#pragma omp parallel
  {
    std::vector<int32_t> shared(rows, 0), first(rows, 0), fill(rows, 0), touched, wedge, b;
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < groups; ++q) {
      const int64_t r = pos[starts[q]] / cols;
      const int32_t k0 = cp[r], degree = cp[r + 1] - cp[r];
      // the wedges r - z2 - z1: for every row z1, the columns of r it shares (as their
      // index k in the columns of r)
      touched.clear();
      for (int32_t k = k0; k < k0 + degree; ++k) {
        const int32_t z2 = cl[k];
        for (int32_t j = tp[z2]; j < tp[z2 + 1]; ++j) {
          const int32_t z1 = tr[j];
          if (shared[z1]++ == 0) touched.push_back(z1);
        }
      }
      int32_t total = 0;
      for (const int32_t z1 : touched) {
        first[z1] = total;
        total += shared[z1];
      }
      wedge.resize(total);
      for (int32_t k = 0; k < degree; ++k) {
        const int32_t z2 = cl[k0 + k];
        for (int32_t j = tp[z2]; j < tp[z2 + 1]; ++j) {
          const int32_t z1 = tr[j];
          wedge[first[z1] + fill[z1]++] = k;
        }
      }
      // the pairs of row r, a chunk at a time: b[i][k] = deg(z2) - |N(z2) & N(c_i)| for the
      // k-th column z2 of r, read along the rows of cc (in order of c) rather than across
      for (int64_t i0 = starts[q]; i0 < starts[q + 1]; i0 += kPairChunk) {
        const int64_t i1 = std::min(starts[q + 1], i0 + kPairChunk);
        b.resize((i1 - i0) * degree);
        for (int32_t k = 0; k < degree; ++k) {
          const int32_t z2 = cl[k0 + k];
          const int32_t deg2 = tp[z2 + 1] - tp[z2];
          const int32_t* common2 = common + static_cast<int64_t>(z2) * cols;
          for (int64_t i = i0; i < i1; ++i)
            b[(i - i0) * degree + k] = deg2 - common2[pos[i] - r * cols];
        }
        for (int64_t i = i0; i < i1; ++i) {
          const int32_t c = static_cast<int32_t>(pos[i] - r * cols);
          const int32_t* bc = b.data() + (i - i0) * degree;
          int64_t sum = 0;
          // an unlinked pair: no row z1 of c is r, and no column of r is c
          for (int32_t j = tp[c]; j < tp[c + 1]; ++j) {
            const int32_t z1 = tr[j];
            const int32_t through = shared[z1];
            if (through == 0) continue;
            const int32_t a = cp[z1 + 1] - cp[z1] - through;
            const int64_t* g_a = by_a.data() + static_cast<int64_t>(a) * width;
            const int32_t* w = wedge.data() + first[z1];
            int32_t low = a;  // a, and every b, are at least 1 for an unlinked pair
            for (int32_t e = 0; e < through; ++e) {
              const int32_t factor = bc[w[e]];
              low = std::min(low, factor);
              sum += g_a[factor];
            }
            if (low <= 0) bad = true;  // only ever set: no lost update
          }
          scores[i] = sum;
        }
      }
      for (const int32_t z1 : touched) shared[z1] = fill[z1] = 0;
    }
  }
  TORCH_CHECK(!bad, "ch3_l3_pairs: a pair is a link");
  return out;
}

}  // namespace

void register_graph_kernels(pybind11::module& m) {
  m.def("ch3_common_columns", &ch3_common_columns, "rows shared by every two columns (int32)");
  m.def("l3_rows", &l3_rows, "(A diag(wc) A^T diag(wr) A)[r0:r1] of a bipartite graph (int64)");
  m.def("ch3_l3_pairs", &ch3_l3_pairs, "integer CH3-L3 scores of the given unlinked pairs");
}
