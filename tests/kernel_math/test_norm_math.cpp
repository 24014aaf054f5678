// Host emulation of the instance-norm CUDA kernels (include/stunet/cuda/norm.cuh):
// the (plane, chunk) blocks, each thread's 16-byte groups, the per-block
// partials and the per-plane combination of norm_math.hpp, run in the
// kernels' order in float and double, against cpu/norm.hpp (which works in
// double). CUB's block tree is stood in for by a fixed pairwise tree, so sums
// are compared with tolerances. tests/cuda/test_norm_cuda.cu runs the kernels.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../testing.hpp"
#include "stunet/core/tensor.hpp"
#include "stunet/cpu/norm.hpp"
#include "stunet/cuda/norm_math.hpp"

using stunet::DType;
using stunet::Shape;
using stunet::Tensor;
namespace sc = stunet::cuda;

namespace {

template <class A> A tree_sum(std::vector<A> v) {
  while (v.size() > 1) {
    std::vector<A> next((v.size() + 1) / 2);
    for (std::size_t i = 0; i < next.size(); ++i) next[i] = v[2 * i] + (2 * i + 1 < v.size() ? v[2 * i + 1] : A(0));
    v.swap(next);
  }
  return v.empty() ? A(0) : v[0];
}

/// The elements thread t of the block for chunk k visits, in its order
/// (the kernels' loop over 16-byte groups).
template <class T, class F> void visit_thread(std::int64_t S, std::int64_t k, int t, F&& f) {
  constexpr int V = sc::kNormVec<T>;
  const std::int64_t end = sc::norm_chunk_end(S, k);
  for (std::int64_t j = sc::norm_chunk_begin(k) / V + t; j * V < end; j += sc::kNormThreads) {
    const std::int64_t i0 = j * V;
    const int n = sc::norm_group_size(i0, end, V);
    for (int e = 0; e < n; ++e) f(i0 + e);
  }
}

/// A (plane, chunk) partial kernel: per-thread sums of term(i), then the block tree.
template <class A, class T, class Term> std::vector<A> emulate_partials(std::int64_t planes, std::int64_t S, Term term) {
  const std::int64_t nch = sc::norm_chunks(S);
  std::vector<A> partial(static_cast<std::size_t>(planes * nch));
  for (std::int64_t b = 0; b < planes * nch; ++b) {
    const std::int64_t p = b / nch, k = b % nch;
    std::vector<A> per_thread(sc::kNormThreads, A(0));
    for (int t = 0; t < sc::kNormThreads; ++t)
      visit_thread<T>(S, k, t, [&](std::int64_t i) { per_thread[static_cast<std::size_t>(t)] += term(p, i); });
    partial[static_cast<std::size_t>(b)] = tree_sum(per_thread);
  }
  return partial;
}

/// plane_total: thread t adds chunks t, t + kNormThreads, ... then the tree.
template <class A> A emulate_plane_total(const std::vector<A>& partial, std::int64_t p, std::int64_t nch) {
  std::vector<A> per_thread(sc::kNormThreads, A(0));
  for (int t = 0; t < sc::kNormThreads; ++t)
    for (std::int64_t k = t; k < nch; k += sc::kNormThreads)
      per_thread[static_cast<std::size_t>(t)] += partial[static_cast<std::size_t>(p * nch + k)];
  return tree_sum(per_thread);
}

/// Everything the four entries compute, emulated in A (acc_t<T>).
template <class T> struct Emulated {
  std::vector<T> mean, rstd, y, sum_g, sum_gx, dx, dw, db;
};

template <class T>
Emulated<T> emulate_norm(const T* x, const T* g, const T* w, const T* bias, std::int64_t N, std::int64_t C,
                         std::int64_t S, double eps) {
  using A = T;  // host emulation for float and double: acc_t<T> is T
  const std::int64_t planes = N * C, nch = sc::norm_chunks(S);
  Emulated<T> r;
  r.mean.resize(static_cast<std::size_t>(planes));
  r.rstd.resize(static_cast<std::size_t>(planes));
  // instance_norm_stats: partials of x, mean, partials of (x - mean)^2, rstd.
  auto sums = emulate_partials<A, T>(planes, S, [&](std::int64_t p, std::int64_t i) { return A(x[p * S + i]); });
  for (std::int64_t p = 0; p < planes; ++p)
    r.mean[static_cast<std::size_t>(p)] = sc::norm_mean<A>(emulate_plane_total(sums, p, nch), S);
  auto sq = emulate_partials<A, T>(planes, S, [&](std::int64_t p, std::int64_t i) {
    return sc::norm_centred_square<A>(A(x[p * S + i]), r.mean[static_cast<std::size_t>(p)]);
  });
  for (std::int64_t p = 0; p < planes; ++p)
    r.rstd[static_cast<std::size_t>(p)] = sc::norm_rstd<A>(emulate_plane_total(sq, p, nch), S, eps);
  // instance_norm_forward: any order (no reduction).
  r.y.resize(static_cast<std::size_t>(planes * S));
  for (std::int64_t p = 0; p < planes; ++p) {
    const std::int64_t c = p % C;
    const A scale = r.rstd[static_cast<std::size_t>(p)] * (w ? w[c] : A(1));
    const A shift = bias ? bias[c] : A(0);
    for (std::int64_t i = 0; i < S; ++i)
      r.y[static_cast<std::size_t>(p * S + i)] =
          sc::norm_forward_value<A>(x[p * S + i], r.mean[static_cast<std::size_t>(p)], scale, shift);
  }
  // instance_norm_backward_sums.
  auto pg = emulate_partials<A, T>(planes, S, [&](std::int64_t p, std::int64_t i) { return A(g[p * S + i]); });
  auto pgx = emulate_partials<A, T>(planes, S, [&](std::int64_t p, std::int64_t i) {
    return sc::norm_gx_term<A>(g[p * S + i], x[p * S + i], r.mean[static_cast<std::size_t>(p)]);
  });
  r.sum_g.resize(static_cast<std::size_t>(planes));
  r.sum_gx.resize(static_cast<std::size_t>(planes));
  for (std::int64_t p = 0; p < planes; ++p) {
    r.sum_g[static_cast<std::size_t>(p)] = emulate_plane_total(pg, p, nch);
    r.sum_gx[static_cast<std::size_t>(p)] = emulate_plane_total(pgx, p, nch) * r.rstd[static_cast<std::size_t>(p)];
  }
  // instance_norm_backward_input.
  r.dx.resize(static_cast<std::size_t>(planes * S));
  for (std::int64_t p = 0; p < planes; ++p) {
    const auto k = sc::norm_backward_coef<A>(r.rstd[static_cast<std::size_t>(p)], w ? w[p % C] : A(1),
                                             r.sum_g[static_cast<std::size_t>(p)],
                                             r.sum_gx[static_cast<std::size_t>(p)], S);
    for (std::int64_t i = 0; i < S; ++i)
      r.dx[static_cast<std::size_t>(p * S + i)] =
          sc::norm_backward_value<A>(x[p * S + i], g[p * S + i], r.mean[static_cast<std::size_t>(p)], k);
  }
  // sum_planes_over_batch, in order n = 0, 1, ...
  r.dw.assign(static_cast<std::size_t>(C), A(0));
  r.db.assign(static_cast<std::size_t>(C), A(0));
  for (std::int64_t c = 0; c < C; ++c)
    for (std::int64_t n = 0; n < N; ++n) {
      r.dw[static_cast<std::size_t>(c)] += r.sum_gx[static_cast<std::size_t>(n * C + c)];
      r.db[static_cast<std::size_t>(c)] += r.sum_g[static_cast<std::size_t>(n * C + c)];
    }
  return r;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

/// max |a - b| / max |b|.
template <class T> double rel_err(const std::vector<T>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m / std::max(max_abs(b), 1e-300);
}

template <class T> void check_norm(std::int64_t N, std::int64_t C, std::int64_t S, bool affine, double tol) {
  const std::string what = "N " + std::to_string(N) + " C " + std::to_string(C) + " S " + std::to_string(S) +
                           (affine ? " affine" : " plain");
  CAPTURE(what);
  const DType dt = stunet::dtype_of<T>;
  const std::int64_t planes = N * C;
  // An offset (mean 3, spread 1) so that a one-pass variance would show.
  const Tensor x = stunet::testing::random_tensor(Shape{planes, S}, dt, 61, 2.0, 4.0);
  const Tensor g = stunet::testing::random_tensor(Shape{planes, S}, dt, 62);
  const Tensor w = stunet::testing::random_tensor(Shape{C}, dt, 63, 0.5, 1.5);
  const Tensor b = stunet::testing::random_tensor(Shape{C}, dt, 64);
  const T* wp = affine ? w.data<T>() : nullptr;
  const T* bp = affine ? b.data<T>() : nullptr;
  const double eps = 1e-5;

  std::vector<double> mean(static_cast<std::size_t>(planes)), rstd(mean.size());
  stunet::cpu::instance_norm_stats(x.data<T>(), planes, S, eps, mean.data(), rstd.data());
  Tensor y = Tensor::empty(x.shape(), dt);
  stunet::cpu::instance_norm_forward(x.data<T>(), mean.data(), rstd.data(), wp, bp, y.data<T>(), planes, C, S);
  std::vector<double> sum_g(mean.size()), sum_gx(mean.size());
  stunet::cpu::instance_norm_backward_sums(x.data<T>(), g.data<T>(), mean.data(), rstd.data(), planes, S,
                                           sum_g.data(), sum_gx.data());
  Tensor dx = Tensor::empty(x.shape(), dt);
  stunet::cpu::instance_norm_backward_input(x.data<T>(), g.data<T>(), mean.data(), rstd.data(), wp, sum_g.data(),
                                            sum_gx.data(), dx.data<T>(), planes, C, S);
  std::vector<double> dw(static_cast<std::size_t>(C), 0.0), db(dw.size(), 0.0);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c) {
      dw[static_cast<std::size_t>(c)] += sum_gx[static_cast<std::size_t>(n * C + c)];
      db[static_cast<std::size_t>(c)] += sum_g[static_cast<std::size_t>(n * C + c)];
    }

  // Scales of the sums: sum |g| and sum |g * xhat| per plane (and over the batch).
  std::vector<double> abs_g(mean.size(), 0.0), abs_gx(mean.size(), 0.0);
  for (std::int64_t p = 0; p < planes; ++p)
    for (std::int64_t i = 0; i < S; ++i) {
      const double gi = static_cast<double>(g.data<T>()[p * S + i]), xi = static_cast<double>(x.data<T>()[p * S + i]);
      abs_g[static_cast<std::size_t>(p)] += std::abs(gi);
      abs_gx[static_cast<std::size_t>(p)] +=
          std::abs(gi * (xi - mean[static_cast<std::size_t>(p)]) * rstd[static_cast<std::size_t>(p)]);
    }

  const Emulated<T> e = emulate_norm<T>(x.data<T>(), g.data<T>(), wp, bp, N, C, S, eps);
  CHECK(rel_err(e.mean, mean) <= tol);
  CHECK(rel_err(e.rstd, rstd) <= tol);
  CHECK(rel_err(e.y, y.to_vector<double>()) <= tol);
  // Sums (which may cancel) against the sum of their terms' magnitudes.
  bool sums_ok = true;
  for (std::size_t p = 0; p < mean.size(); ++p) {
    sums_ok &= std::abs(static_cast<double>(e.sum_g[p]) - sum_g[p]) <= tol * abs_g[p];
    sums_ok &= std::abs(static_cast<double>(e.sum_gx[p]) - sum_gx[p]) <= tol * abs_gx[p];
  }
  CHECK(sums_ok);
  bool wb_ok = true;
  for (std::int64_t c = 0; c < C; ++c) {
    double sw = 0, sb = 0;
    for (std::int64_t n = 0; n < N; ++n) {
      sw += abs_gx[static_cast<std::size_t>(n * C + c)];
      sb += abs_g[static_cast<std::size_t>(n * C + c)];
    }
    wb_ok &= std::abs(static_cast<double>(e.dw[static_cast<std::size_t>(c)]) - dw[static_cast<std::size_t>(c)]) <= tol * sw;
    wb_ok &= std::abs(static_cast<double>(e.db[static_cast<std::size_t>(c)]) - db[static_cast<std::size_t>(c)]) <= tol * sb;
  }
  CHECK(wb_ok);
  // dx = a * (g - mg - xhat * cx): the sums' errors enter divided by S.
  CHECK(rel_err(e.dx, dx.to_vector<double>()) <= 4 * tol);
}

}  // namespace

TEST_CASE("cuda norm math: chunks and 16-byte groups cover every voxel exactly once") {
  for (std::int64_t S : {std::int64_t{1}, std::int64_t{3}, std::int64_t{64}, std::int64_t{315},
                         std::int64_t{8192}, std::int64_t{8193}, std::int64_t{2 * 8192 + 37}}) {
    CAPTURE(S);
    auto cover = [&]<class T>() {
      std::vector<int> hits(static_cast<std::size_t>(S), 0);
      for (std::int64_t k = 0; k < sc::norm_chunks(S); ++k)
        for (int t = 0; t < sc::kNormThreads; ++t)
          visit_thread<T>(S, k, t, [&](std::int64_t i) { ++hits[static_cast<std::size_t>(i)]; });
      bool once = true;
      for (int h : hits) once &= h == 1;
      CHECK(once);
    };
    cover.operator()<float>();
    cover.operator()<double>();
    cover.operator()<std::uint16_t>();  // the 16-bit types' group of 8
  }
  CHECK(sc::norm_chunks(0) == 0);
  CHECK(sc::norm_chunks(128 * 128 * 128) == 256);
  CHECK(sc::kNormChunk % 8 == 0);  // chunks start on a group boundary for every type
}

TEST_CASE("cuda norm math: stats, forward, backward sums and input gradient match cpu/norm.hpp") {
  // double: the emulation in double against the CPU's double, differing only in summation order.
  check_norm<double>(2, 3, 5 * 7 * 9, true, 1e-12);
  check_norm<double>(2, 3, 5 * 7 * 9, false, 1e-12);
  check_norm<double>(1, 2, 2 * 8192 + 37, true, 1e-12);  // several chunks, a partial last group
  check_norm<double>(2, 64, 64, true, 1e-12);             // many small planes
  // float: accumulation in float vs the CPU's double: about 1e-7 per operation,
  // a few hundred operations deep at most.
  check_norm<float>(2, 3, 5 * 7 * 9, true, 2e-6);
  check_norm<float>(2, 3, 5 * 7 * 9, false, 2e-6);
  check_norm<float>(1, 2, 2 * 8192 + 37, true, 2e-6);
  check_norm<float>(2, 64, 64, true, 2e-6);
  check_norm<float>(1, 1, 3, true, 2e-6);
}
