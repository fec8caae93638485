// Host test of the CUDA backend's per-element and per-line math (csrc/cuda/tile_math.h), built
// with the host compiler by scripts/check_cuda_compile.sh (`make cuda-check`).  The GPU kernels
// cannot run on the CI machine; this runs the very functions they call, composed the way the
// kernels compose them (quads of 4 lanes × 16 tile positions, tile by tile), against direct
// float64 formulas of kernels.py's contract.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/tile_math.h"

using namespace flcuda;

static int failures = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      ++failures;                                         \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
    }                                                     \
  } while (0)

static double lse64(const std::vector<double>& v) {
  double m = -INFINITY;
  for (double a : v) m = std::fmax(m, a);
  if (m == -INFINITY) return m;
  double s = 0;
  for (double a : v) s += std::exp(a - m);
  return m + std::log(s);
}

// The kernels' LSE of one line: tiles of 64 positions, 4 quad lanes visiting k = q + 4t;
// per tile nan_max per lane, quad combine (order of the xor butterfly), shift, Σ exp, merge.
static float line_lse(const std::vector<float>& v, const std::vector<bool>& sel, Lse run) {
  const size_t n = v.size();
  for (size_t t0 = 0; t0 < n; t0 += 64) {
    float mx[4], sm[4];
    for (int q = 0; q < 4; ++q) {
      mx[q] = neg_inf();
      for (int t = 0; t < 16; ++t) {
        const size_t j = t0 + q + 4 * t;
        if (j < n && sel[j]) mx[q] = nan_max(mx[q], v[j]);
      }
    }
    float a = nan_max(nan_max(mx[0], mx[1]), nan_max(mx[2], mx[3]));
    const float shift = lse_shift(a);
    for (int q = 0; q < 4; ++q) {
      sm[q] = 0.f;
      for (int t = 0; t < 16; ++t) {
        const size_t j = t0 + q + 4 * t;
        if (j < n && sel[j]) sm[q] += expf(v[j] - shift);
      }
    }
    run.merge(a, (sm[0] + sm[1]) + (sm[2] + sm[3]));
  }
  return run.value();
}

static void test_lse() {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int n : {1, 2, 17, 63, 64, 65, 200, 1000}) {
    for (float scale : {1.f, 30.f, 1e4f}) {
      std::vector<float> v(n);
      std::vector<bool> sel(n);
      std::vector<double> kept;
      for (int j = 0; j < n; ++j) {
        v[j] = scale * nd(rng);
        sel[j] = (rng() % 4) != 0;
        if (sel[j]) kept.push_back(v[j]);
      }
      const double ref = lse64(kept);
      const float got = line_lse(v, sel, Lse::empty());
      if (kept.empty()) {
        CHECK(got == neg_inf(), "empty line must give -inf, got %g", got);
      } else {
        CHECK(std::fabs(got - ref) <= 2e-6 * std::fmax(1.0, std::fabs(ref)),
              "lse n=%d scale=%g: %.9g vs %.9g", n, scale, got, ref);
      }
      // seeded with 0: log(1 + Σ exp)
      kept.push_back(0.0);
      const double ref1 = lse64(kept);
      const float got1 = line_lse(v, sel, Lse::seeded_zero());
      CHECK(std::fabs(got1 - ref1) <= 2e-6 * std::fmax(1.0, std::fabs(ref1)),
            "seeded lse n=%d: %.9g vs %.9g", n, got1, ref1);
    }
  }
  // NaN in a selected entry propagates; in an unselected one it does not.
  std::vector<float> v(130, 1.f);
  std::vector<bool> sel(130, true);
  v[97] = qnan();
  CHECK(is_nan(line_lse(v, sel, Lse::empty())), "selected NaN must propagate");
  sel[97] = false;
  const float ok = line_lse(v, sel, Lse::empty());
  CHECK(!is_nan(ok) && std::fabs(ok - (1.0 + std::log(129.0))) < 1e-5, "masked NaN: %g", ok);
  // NaN first, then finite tiles: stays NaN.
  Lse r = Lse::empty();
  r.merge(qnan(), 1.f);
  r.merge(3.f, 2.f);
  CHECK(is_nan(r.value()), "NaN must stick");
  // Large logits (|z| = 1e4) without overflow.
  std::vector<float> big = {1e4f, 1e4f - 1.f, -1e4f};
  const float gb = line_lse(big, {true, true, true}, Lse::empty());
  CHECK(std::fabs(gb - (1e4 + std::log(1 + std::exp(-1.0)))) < 1e-2, "big: %.6f", gb);
  // All -inf (a bias of log 0): -inf, not NaN.
  std::vector<float> ninf(5, neg_inf());
  CHECK(line_lse(ninf, std::vector<bool>(5, true), Lse::empty()) == neg_inf(), "-inf line");
  // merge is symmetric bit for bit (the quad butterfly relies on it).
  for (int k = 0; k < 1000; ++k) {
    const float m1 = 10 * nd(rng), m2 = 10 * nd(rng), s1 = 1 + std::fabs(nd(rng)),
                s2 = 1 + std::fabs(nd(rng));
    Lse a{m1, s1}, b{m2, s2};
    a.merge(m2, s2);
    b.merge(m1, s1);
    CHECK(a.m == b.m && a.s == b.s, "merge not symmetric");
  }
}

// PairMask of kernels.py, restated as sets (the test's independent formulation).
static void test_pair_mask() {
  const int64_t labels[] = {0, 1, 0, 2, 1};
  const int64_t key_labels[] = {1, 0, 0, 2, 3, 1};
  for (int labelled = 0; labelled < 2; ++labelled)
    for (int excl = 0; excl < 2; ++excl)
      for (int dec = 0; dec < 2; ++dec)
        for (int nopos = 0; nopos < 2; ++nopos)
          for (int64_t offset : {0, 1, -2}) {
            PairMaskArgs m;
            m.labels = labelled ? labels : nullptr;
            m.key_labels = labelled ? key_labels : nullptr;
            m.n_keys = 6;
            m.offset = offset;
            m.exclude_diagonal = excl;
            m.decoupled = dec;
            m.no_positives = nopos;
            for (int64_t i = 0; i < 5; ++i)
              for (int64_t j = 0; j < 9; ++j) {  // j >= 6: extra negatives
                const int64_t li = labels[i], lj = j < 6 ? key_labels[j] : -1;
                bool pos, cand;
                pair_mask(m, i, j, li, lj, pos, cand);
                const bool key = j < 6, self = key && j == i + offset;
                bool P = !nopos && key && (labelled ? li == lj : self);
                if (excl && self) P = false;
                bool C = !(excl && self);
                if (dec && P) C = false;
                CHECK(pos == P && cand == C, "pair_mask i=%ld j=%ld lab=%d ex=%d dec=%d np=%d",
                      (long)i, (long)j, labelled, excl, dec, nopos);
                if (!key) CHECK(cand && !pos, "extra negatives are candidates only");
              }
          }
}

// Contrastive forward + dZ of a small problem composed from the kernel functions, against a
// float64 evaluation of the contract.
static void test_contrastive_compose() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int n = 70, m = 75, nk = 70;  // 5 extra negatives; more than one 64-wide tile
  std::vector<float> s(n * m);
  for (auto& v : s) v = nd(rng);
  std::vector<int64_t> lab(n), klab(nk);
  for (auto& l : lab) l = rng() % 5;
  for (auto& l : klab) l = rng() % 5;
  PairMaskArgs mk;
  mk.labels = lab.data();
  mk.key_labels = klab.data();
  mk.n_keys = nk;
  mk.exclude_diagonal = true;
  const float scale = 14.3f;
  std::vector<float> bias(m);
  for (auto& b : bias) b = 0.3f * nd(rng);
  for (int i = 0; i < n; ++i) {
    std::vector<float> zb(m);
    std::vector<bool> cand(m);
    std::vector<double> ref;
    double psum = 0, pcnt = 0, psum_ref = 0;
    for (int j = 0; j < m; ++j) {
      bool pos, c;
      pair_mask(mk, i, j, lab[i], j < nk ? klab[j] : -1, pos, c);
      const float z = scale * s[i * m + j];
      zb[j] = z + bias[j];
      cand[j] = c;
      if (c) ref.push_back(double(scale) * s[i * m + j] + bias[j]);
      if (pos) {
        psum += z;
        pcnt += 1;
      }
      if (j < nk && j != i && lab[i] == klab[j]) psum_ref += double(scale) * s[i * m + j];
    }
    const float got = line_lse(zb, cand, Lse::empty());
    const double want = lse64(ref);
    CHECK(std::fabs(got - want) < 1e-5 * std::fmax(1.0, std::fabs(want)), "row %d lse", i);
    CHECK(std::fabs(psum - psum_ref) < 1e-4 * std::fmax(1.0, std::fabs(psum_ref)), "psum %d", i);
    // dZ row: softmax weights over candidates minus g_pos on positives; Σ_j row part = g_row.
    const float g_row = 0.7f, g_rowpos = pcnt > 0 ? g_row / float(pcnt) : 0.f;
    double sum_rp = 0, sum_dz = 0;
    for (int j = 0; j < m; ++j) {
      bool pos, c;
      pair_mask(mk, i, j, lab[i], j < nk ? klab[j] : -1, pos, c);
      float rp;
      const float dz = contrastive_dz(pos, c, scale * s[i * m + j], zb[j], got, g_row, g_rowpos,
                                      false, 0.f, 0.f, 0.f, rp);
      sum_rp += rp;
      sum_dz += dz;
    }
    CHECK(std::fabs(sum_rp - g_row) < 1e-5, "row %d: softmax weights sum %g", i, sum_rp);
    CHECK(std::fabs(sum_dz - (pcnt > 0 ? 0.0 : g_row)) < 1e-5, "row %d: dZ sum %g", i, sum_dz);
  }
}

static void test_multi_similarity() {
  MsArgs a;
  const int64_t lab[] = {0, 0, 1};
  a.labels = lab;
  a.ref_labels = lab;
  a.exclude_self = true;
  bool p, q;
  ms_classes(a, 1, 1, 0, 0, p, q);
  CHECK(!p && !q, "self pair is neither");
  ms_classes(a, 0, 1, 0, 0, p, q);
  CHECK(p && !q, "same label: positive");
  ms_classes(a, 0, 2, 0, 1, p, q);
  CHECK(!p && q, "different label: negative");
  // Planted at the threshold: s − ε == max_neg is not kept (strict), one ulp below is.
  a.eps = 0.25f;
  const float max_neg = 0.5f, min_pos = 0.75f;
  bool kp = true, kn = false;
  ms_kept(a, 0.75f, min_pos, max_neg, kp, kn);
  CHECK(!kp, "s - eps == max_neg: positive not kept");
  kp = true;
  ms_kept(a, std::nextafter(0.75f, 0.f), min_pos, max_neg, kp, kn);
  CHECK(kp, "just below: kept");
  kp = false;
  kn = true;
  ms_kept(a, 0.5f, min_pos, max_neg, kp, kn);
  CHECK(!kn, "s + eps == min_pos: negative not kept");
  a.mining = false;
  kp = kn = true;
  ms_kept(a, 100.f, min_pos, max_neg, kp, kn);
  CHECK(kp && kn, "no mining keeps all");
  // Gradient of log(1 + Σ exp(u)) terms against finite differences of the float64 loss.
  a.alpha = 2.f;
  a.beta = 50.f;
  a.base = 0.5f;
  const double sp = 0.3, sn = 0.6;
  auto loss = [&](double xp, double xn) {
    return std::log1p(std::exp(-2.0 * (xp - 0.5))) / 2.0 + std::log1p(std::exp(50.0 * (xn - 0.5))) / 50.0;
  };
  const float pl = std::log1p(std::exp(-2.f * (float(sp) - 0.5f)));
  const float nl = std::log1p(std::exp(50.f * (float(sn) - 0.5f)));
  const double h = 1e-6;
  const double dp = (loss(sp + h, sn) - loss(sp - h, sn)) / (2 * h);
  const double dn = (loss(sp, sn + h) - loss(sp, sn - h)) / (2 * h);
  // ms_grad carries the 1/α, 1/β of the loss through the LSE derivative: d/ds (1/α)log(1+e^u)
  // = (1/α)·u'·softmax = −softmax for positives (u' = −α), +softmax for negatives.
  CHECK(std::fabs(ms_grad(a, float(sp), true, false, pl, 0.f, 1.f) - dp) < 1e-4, "pos grad");
  CHECK(std::fabs(ms_grad(a, float(sn), false, true, 0.f, nl, 1.f) - dn) < 1e-4, "neg grad");
}

// The tensor-core tile product of TileAcc (tile_loop.cuh), emulated warp by warp on the host:
// registers are gathered from a stage buffer with the kernel's coordinate functions
// (mma_a_row ... warp_col0), then "executed" by an mma whose operand/result layouts are
// transcribed separately from the PTX ISA tables (element-indexed, as the ISA states them), and
// stored with the kernel's functions.  The 64×64 result must be X·Yᵀ, every entry written once,
// no padding read.
static void test_mma_fragments() {
  constexpr int kTile = 64, BK = 32, LD = 40;  // Cfg<half>: 32 features per stage, 8 padding
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> small(-8, 8);
  std::vector<float> st(2 * kTile * LD, NAN);  // padding stays NaN: reading it would show
  for (int r = 0; r < 2 * kTile; ++r)
    for (int k = 0; k < BK; ++k) st[r * LD + k] = float(small(rng));
  // PTX ISA, mma.m16n8k16 .f16/.bf16: a_i (i = 0..7) and b_i (i = 0..3) are the 16-bit elements
  // (two per register), c_i (i = 0..3) the fp32 accumulators.
  auto isa_a_row = [](int g, int i) { return (i < 2 || (i >= 4 && i < 6)) ? g : g + 8; };
  auto isa_a_col = [](int t, int i) { return t * 2 + (i & 1) + (i >= 4 ? 8 : 0); };
  auto isa_b_row = [](int t, int i) { return t * 2 + (i & 1) + (i >= 2 ? 8 : 0); };
  auto isa_c_row = [](int g, int i) { return i < 2 ? g : g + 8; };
  auto isa_c_col = [](int t, int i) { return t * 2 + (i & 1); };
  std::vector<float> dst(kTile * kTile, NAN);
  std::vector<int> writes(kTile * kTile, 0);
  for (int warp = 0; warp < 8; ++warp) {
    float c[32][4][4] = {};
    for (int ks = 0; ks < BK; ks += 16) {
      float a[32][8], b[32][4][4];
      for (int lane = 0; lane < 32; ++lane) {
        for (int r = 0; r < 4; ++r)
          for (int h = 0; h < 2; ++h)
            a[lane][2 * r + h] =
                st[(warp_row0(warp) + mma_a_row(lane, r)) * LD + ks + mma_a_k(lane, r) + h];
        for (int nt = 0; nt < 4; ++nt)
          for (int r = 0; r < 2; ++r)
            for (int h = 0; h < 2; ++h)
              b[lane][nt][2 * r + h] =
                  st[(kTile + warp_col0(warp) + nt * 8 + mma_b_n(lane)) * LD + ks +
                     mma_b_k(lane, r) + h];
      }
      for (int nt = 0; nt < 4; ++nt) {  // the "hardware": one mma per n-tile
        float A[16][16], B[16][8];
        int seen_a[16][16] = {}, seen_b[16][8] = {};
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, t = lane & 3;
          for (int i = 0; i < 8; ++i) {
            A[isa_a_row(g, i)][isa_a_col(t, i)] = a[lane][i];
            ++seen_a[isa_a_row(g, i)][isa_a_col(t, i)];
          }
          for (int i = 0; i < 4; ++i) {
            B[isa_b_row(t, i)][g] = b[lane][nt][i];
            ++seen_b[isa_b_row(t, i)][g];
          }
        }
        for (int r = 0; r < 16; ++r)
          for (int k = 0; k < 16; ++k) CHECK(seen_a[r][k] == 1, "A fragment coverage");
        for (int k = 0; k < 16; ++k)
          for (int n = 0; n < 8; ++n) CHECK(seen_b[k][n] == 1, "B fragment coverage");
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, t = lane & 3;
          for (int i = 0; i < 4; ++i) {
            float acc = 0.f;
            for (int k = 0; k < 16; ++k) acc += A[isa_c_row(g, i)][k] * B[k][isa_c_col(t, i)];
            c[lane][nt][i] += acc;
          }
        }
      }
    }
    for (int lane = 0; lane < 32; ++lane)  // TileAcc::store
      for (int nt = 0; nt < 4; ++nt)
        for (int i = 0; i < 4; ++i) {
          const int r = warp_row0(warp) + mma_c_row(lane, i);
          const int col = warp_col0(warp) + nt * 8 + mma_c_col(lane, i);
          dst[r * kTile + col] = c[lane][nt][i];
          ++writes[r * kTile + col];
        }
  }
  int bad = 0;
  for (int r = 0; r < kTile; ++r)
    for (int col = 0; col < kTile; ++col) {
      float want = 0.f;
      for (int k = 0; k < BK; ++k) want += st[r * LD + k] * st[(kTile + col) * LD + k];
      if (writes[r * kTile + col] != 1 || dst[r * kTile + col] != want) ++bad;
    }
  CHECK(bad == 0, "mma tile emulation: %d of 4096 entries wrong or not written once", bad);
}

int main() {
  test_lse();
  test_pair_mask();
  test_contrastive_compose();
  test_multi_similarity();
  test_mma_fragments();
  if (failures) {
    std::printf("test_tile_math: %d FAILED\n", failures);
    return 1;
  }
  std::printf("test_tile_math: all passed\n");
  return 0;
}
