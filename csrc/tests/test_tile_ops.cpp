// C++ tests of the torch-free tile kernels (csrc/cpu) against naive double precision, for every
// ISA build this CPU can run (generic, and on x86 with GCC: AVX2, AVX-512).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/tile_types.h"
#include "cpu/simd.h"  // the generic build's scalar exp_f

static int failures = 0;
#define CHECK(cond, ...)                                \
  do {                                                  \
    if (!(cond)) {                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
      std::printf(__VA_ARGS__);                         \
      std::printf("\n");                                \
      ++failures;                                       \
    }                                                   \
  } while (0)

static bool close(double a, double b, double tol) {
  return std::fabs(a - b) <= tol * (1.0 + std::fabs(b));
}

// One tile: 7 rows × 13 columns (ld 16: rows padded to whole vectors; the pad holds NaN to
// prove it is masked), labels, two extra-negative columns, the diagonal excluded.
static void check_build(const fl::TileKernels<float>& k) {
  const int64_t rows = 7, cols = 13, ld = fl::padded<float>(cols), n_keys = 11;
  const float scale = 1.7f;
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> s(rows * ld, NAN);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) s[i * ld + j] = nd(rng);
  const std::vector<int32_t> row_ids = {0, 1, 0, 2, 1, 0, 3};
  std::vector<int32_t> key_ids(ld + 64, -1);
  for (int64_t j = 0; j < n_keys; ++j) key_ids[j] = static_cast<int32_t>(j % 3);
  fl::TileMask<float> m;
  m.row_ids = row_ids.data();
  m.key_ids = key_ids.data();
  m.cols = cols;
  m.kend = n_keys;
  m.diag0 = 0;
  m.exclude_diagonal = true;
  auto is_pos = [&](int64_t i, int64_t j) { return j < n_keys && j != i && row_ids[i] == key_ids[j]; };
  auto is_cand = [&](int64_t i, int64_t j) { return j != i || j >= n_keys; };

  // Forward: row LSE, positives, column LSE.
  std::vector<float> z = s, ps(rows, 0), pc(rows, 0);
  std::vector<float> cmax(ld), csum(ld), cps(ld, 0), cpc(ld, 0);
  std::vector<fl::Lse<float>> lse(rows);
  const fl::ColStats<float> cs{cmax.data(), csum.data(), cps.data(), cpc.data()};
  k.lse_fwd(z.data(), ld, rows, scale, nullptr, m, lse.data(), ps.data(), pc.data(), &cs,
            nullptr);
  std::vector<double> row_lse(rows), col_lse(n_keys);
  for (int64_t i = 0; i < rows; ++i) {
    double acc = 0, pos = 0, cnt = 0;
    for (int64_t j = 0; j < cols; ++j) {
      if (is_cand(i, j)) acc += std::exp(double(scale) * s[i * ld + j]);
      if (is_pos(i, j)) { pos += double(scale) * s[i * ld + j]; cnt += 1; }
    }
    row_lse[i] = std::log(acc);
    CHECK(close(lse[i].value(), row_lse[i], 1e-5), "%s row %ld lse %g vs %g", k.isa, long(i),
          double(lse[i].value()), row_lse[i]);
    CHECK(close(ps[i], pos, 1e-5), "%s row %ld pos sum", k.isa, long(i));
    CHECK(pc[i] == cnt, "%s row %ld pos count", k.isa, long(i));
  }
  for (int64_t j = 0; j < n_keys; ++j) {
    double acc = 0, pos = 0;
    for (int64_t i = 0; i < rows; ++i) {
      if (is_cand(i, j)) acc += std::exp(double(scale) * s[i * ld + j]);
      if (is_pos(i, j)) pos += double(scale) * s[i * ld + j];
    }
    col_lse[j] = std::log(acc);
    fl::Lse<float> l;
    l.merge(cmax[j], csum[j]);
    CHECK(close(l.value(), col_lse[j], 1e-5), "%s col %ld lse %g vs %g", k.isa, long(j),
          double(l.value()), col_lse[j]);
    CHECK(close(cps[j], pos, 1e-5), "%s col %ld pos sum", k.isa, long(j));
  }

  // Backward: dZ = g_r(p − pos·g_rp) + g_c(q − pos·g_cp), written as scale·dZ; Σ dZ·s.
  std::vector<float> rl(rows), gr(rows), grp(rows), cl(ld + 64, 0), gc(ld + 64, 0),
      gcp(ld + 64, 0), ds(rows * ld, NAN);
  for (int64_t i = 0; i < rows; ++i) {
    rl[i] = float(row_lse[i]);
    gr[i] = 0.3f + 0.1f * i;
    grp[i] = 0.05f * i;
  }
  for (int64_t j = 0; j < n_keys; ++j) {
    cl[j] = float(col_lse[j]);
    gc[j] = 0.2f + 0.01f * j;
    gcp[j] = 0.02f * j;
  }
  const fl::ColGrad<float> cg{cl.data(), gc.data(), gcp.data(), n_keys};
  const double total = k.lse_bwd(s.data(), ld, rows, scale, nullptr, m, rl.data(), gr.data(),
                                 grp.data(), &cg, nullptr, nullptr, ds.data(), ld);
  double want_total = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const double zz = double(scale) * s[i * ld + j];
      const bool c = is_cand(i, j), p = is_pos(i, j);
      double dz = (c ? gr[i] * std::exp(zz - row_lse[i]) : 0) - (p ? grp[i] : 0);
      if (j < n_keys) dz += (c ? gc[j] * std::exp(zz - col_lse[j]) : 0) - (p ? gcp[j] : 0);
      want_total += dz * s[i * ld + j];
      CHECK(close(ds[i * ld + j], scale * dz, 1e-5), "%s dz[%ld,%ld] %g vs %g", k.isa, long(i),
            long(j), double(ds[i * ld + j]), scale * dz);
    }
  CHECK(close(total, want_total, 1e-5), "%s dscale %g vs %g", k.isa, total, want_total);

  // A second row LSE at ratio·z over the decoupled candidates (hard-negative reweighting), in
  // the same sweep, and its gradient term; ratio 0 counts the candidates (LSE = log count).
  fl::TileMask<float> md = m;
  md.decoupled = true;
  auto is_neg = [&](int64_t i, int64_t j) { return is_cand(i, j) && !is_pos(i, j); };
  for (const float ratio : {0.6f, 0.0f}) {
    std::vector<float> z2 = s, ps2(rows, 0), pc2(rows, 0);
    std::vector<fl::Lse<float>> l1(rows), l2(rows);
    const fl::RowLse2<float> second{ratio, l2.data()};
    k.lse_fwd(z2.data(), ld, rows, scale, nullptr, md, l1.data(), ps2.data(), pc2.data(),
              nullptr, &second);
    std::vector<float> lse1(rows), lse2(rows), g1(rows), g2(rows), gp(rows);
    for (int64_t i = 0; i < rows; ++i) {
      double a1 = 0, a2 = 0;
      for (int64_t j = 0; j < cols; ++j)
        if (is_neg(i, j)) {
          a1 += std::exp(double(scale) * s[i * ld + j]);
          a2 += std::exp(double(ratio) * double(scale) * s[i * ld + j]);
        }
      CHECK(close(l1[i].value(), std::log(a1), 1e-5), "%s lse1 row %ld", k.isa, long(i));
      CHECK(close(l2[i].value(), std::log(a2), 1e-5), "%s lse2 row %ld ratio %g: %g vs %g",
            k.isa, long(i), double(ratio), double(l2[i].value()), std::log(a2));
      lse1[i] = l1[i].value();
      lse2[i] = l2[i].value();
      g1[i] = 0.4f - 0.1f * i;
      g2[i] = -0.3f + 0.07f * i;
      gp[i] = 0.05f * i;
    }
    const fl::RowGrad2<float> sg{ratio, lse2.data(), g2.data()};
    std::vector<float> ds2(rows * ld, NAN);
    const double tot2 = k.lse_bwd(s.data(), ld, rows, scale, nullptr, md, lse1.data(), g1.data(),
                                  gp.data(), nullptr, &sg, nullptr, ds2.data(), ld);
    double want2 = 0;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        const double zz = double(scale) * s[i * ld + j];
        const bool c = is_neg(i, j);
        const double dz = (c ? g1[i] * std::exp(zz - lse1[i]) : 0) - (is_pos(i, j) ? gp[i] : 0) +
                          (c ? g2[i] * std::exp(double(ratio) * zz - lse2[i]) : 0);
        want2 += dz * s[i * ld + j];
        CHECK(std::fabs(ds2[i * ld + j] - scale * dz) <= 1e-5 * (1 + std::fabs(scale * dz)),
              "%s second dz[%ld,%ld] %g vs %g", k.isa, long(i), long(j),
              double(ds2[i * ld + j]), scale * dz);
      }
    CHECK(close(tot2, want2, 1e-5), "%s second dscale %g vs %g", k.isa, tot2, want2);
  }

  // Multi-similarity: mining extremes, then the mined LSEs (self pairs excluded).
  std::vector<int32_t> ref_ids(ld + 64, -1);
  for (int64_t j = 0; j < cols; ++j) ref_ids[j] = static_cast<int32_t>(j % 3);
  const fl::MsMask<float> mm{row_ids.data(), ref_ids.data(), cols, 0, true};
  std::vector<float> min_pos(rows, INFINITY), max_neg(rows, -INFINITY);
  k.ms_mine(s.data(), ld, rows, mm, min_pos.data(), max_neg.data());
  const float alpha = 2.0f, beta = 5.0f, base = 0.5f, eps = 0.1f;
  const fl::MsParams<float> prm{alpha, beta, base, eps, true, min_pos.data(), max_neg.data()};
  std::vector<fl::Lse<float>> lp(rows), ln(rows);
  for (int64_t i = 0; i < rows; ++i) { lp[i].merge(0.0f, 1.0f); ln[i].merge(0.0f, 1.0f); }
  k.ms_fwd(s.data(), ld, rows, mm, prm, lp.data(), ln.data());
  for (int64_t i = 0; i < rows; ++i) {
    double lo = INFINITY, hi = -INFINITY, sp = 1, sn = 1;
    for (int64_t j = 0; j < cols; ++j) {
      if (j == i) continue;
      const float v = s[i * ld + j];
      if (ref_ids[j] == row_ids[i]) lo = std::fmin(lo, v); else hi = std::fmax(hi, v);
    }
    CHECK(min_pos[i] == lo && max_neg[i] == hi, "%s ms mine row %ld", k.isa, long(i));
    for (int64_t j = 0; j < cols; ++j) {
      if (j == i) continue;
      const float v = s[i * ld + j];
      if (ref_ids[j] == row_ids[i]) {
        if (v - eps < max_neg[i]) sp += std::exp(-double(alpha) * (v - base));
      } else if (v + eps > min_pos[i]) {
        sn += std::exp(double(beta) * (v - base));
      }
    }
    CHECK(close(lp[i].value(), std::log(sp), 1e-5), "%s ms pos lse row %ld", k.isa, long(i));
    CHECK(close(ln[i].value(), std::log(sn), 1e-5), "%s ms neg lse row %ld", k.isa, long(i));
  }
}

int main() {
  // exp_f: < 2 ulp over the normal range, exact specials, denormals kept.
  double worst = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.001f)
    worst = std::fmax(worst, std::fabs(fl::generic::exp_f(x) / std::exp(double(x)) - 1.0));
  CHECK(worst < 2.5e-7, "exp_f max rel err %g", worst);
  CHECK(fl::generic::exp_f(-INFINITY) == 0.0f, "exp(-inf)");
  CHECK(std::isinf(fl::generic::exp_f(100.0f)), "exp overflow");
  CHECK(std::isnan(fl::generic::exp_f(NAN)), "exp(nan)");
  CHECK(fl::generic::exp_f(-100.0f) > 0.0f, "exp keeps denormals");

  int builds = 0;
  check_build(*fl::generic::kernels(static_cast<float*>(nullptr)));
  ++builds;
#if FL_X86_BUILDS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    check_build(*fl::avx2::kernels(static_cast<float*>(nullptr)));
    ++builds;
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    check_build(*fl::avx512::kernels(static_cast<float*>(nullptr)));
    ++builds;
  }
#endif
  std::printf(failures ? "%d FAILURES\n" : "all tile kernel tests passed (%d builds)\n",
              failures ? failures : builds);
  return failures ? 1 : 0;
}
