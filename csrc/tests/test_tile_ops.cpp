// C++ tests of the torch-free tile math (csrc/cpu/tile_ops.h) against naive double precision.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/tile_ops.h"

static int failures = 0;
#define CHECK(cond, ...)                         \
  do {                                           \
    if (!(cond)) {                               \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                  \
      std::printf("\n");                         \
      ++failures;                                \
    }                                            \
  } while (0)

int main() {
  // exp_f: < 2 ulp over the normal range, exact specials.
  double worst = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.001f)
    worst = std::fmax(worst, std::fabs(fl::exp_f(x) / std::exp(double(x)) - 1.0));
  CHECK(worst < 2.5e-7, "exp_f max rel err %g", worst);
  CHECK(fl::exp_f(-INFINITY) == 0.0f, "exp(-inf)");
  CHECK(std::isinf(fl::exp_f(100.0f)), "exp overflow");
  CHECK(std::isnan(fl::exp_f(NAN)), "exp(nan)");
  CHECK(fl::exp_f(-100.0f) > 0.0f, "exp keeps denormals");

  // Forward tile: row LSE, positives, column LSE vs naive double.
  const int64_t rows = 7, cols = 13;
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> s(rows * cols), z(rows * cols), scratch(cols), ps(rows, 0), pc(rows, 0);
  for (auto& v : s) v = nd(rng);
  z = s;
  std::vector<int64_t> labels = {0, 1, 0, 2, 1, 0, 3}, keys(cols);
  for (int64_t j = 0; j < cols; ++j) keys[j] = j % 3;
  fl::PairMask m;
  m.labels = labels.data();
  m.key_labels = keys.data();
  m.n_keys = 11;  // two extra-negative columns
  m.exclude_diagonal = true;
  std::vector<uint8_t> flags(rows * cols);
  fl::tile_flags(m, 0, rows, 0, cols, flags.data(), cols);
  std::vector<fl::Lse<float>> lse(rows);
  std::vector<float> cmax(cols), csum(cols), cps(cols, 0), cpc(cols, 0);
  const float scale = 1.7f;
  fl::fwd_tile<float>(z.data(), cols, rows, cols, scale, nullptr, flags.data(), cols,
                      scratch.data(), lse.data(), ps.data(), pc.data(), 11, cmax.data(),
                      csum.data(), cps.data(), cpc.data());
  for (int64_t i = 0; i < rows; ++i) {
    double acc = 0, pos = 0, cnt = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const bool diag = j == i;
      const bool is_key = j < 11;
      const bool p = is_key && labels[i] == keys[j] && !diag;
      if (!diag) acc += std::exp(double(scale) * s[i * cols + j]);
      if (p) { pos += double(scale) * s[i * cols + j]; cnt += 1; }
    }
    CHECK(std::fabs(lse[i].value() - std::log(acc)) < 1e-5 * std::fabs(std::log(acc)) + 1e-5,
          "row %ld lse %g vs %g", long(i), double(lse[i].value()), std::log(acc));
    CHECK(std::fabs(ps[i] - pos) < 1e-4, "row %ld pos sum", long(i));
    CHECK(pc[i] == cnt, "row %ld pos count", long(i));
  }
  for (int64_t j = 0; j < 11; ++j) {
    double acc = 0;
    for (int64_t i = 0; i < rows; ++i)
      if (i != j) acc += std::exp(double(scale) * s[i * cols + j]);
    fl::Lse<float> l;
    l.merge(cmax[j], csum[j]);
    CHECK(std::fabs(l.value() - std::log(acc)) < 1e-5 * std::fabs(std::log(acc)) + 1e-5,
          "col %ld lse", long(j));
  }
  std::printf(failures ? "%d FAILURES\n" : "all tile_ops tests passed\n", failures);
  return failures ? 1 : 0;
}
