// Torch-free tile math for the compiled CPU backend.
//
// The binding (csrc/cpu_ops.cpp) streams over (row block × column block) tiles: it computes the
// similarity tile S = X_blk · Y_blkᵀ with a GEMM and hands the tile to the functions here, which
// do everything elementwise while the tile is hot: pair masks, online logsumexp merges,
// gradient tiles.  Semantics are those of fused_losses/kernels.py (the contract).
//
// Tiles are read in whole vectors (csrc/cpu/simd.h): every row of a tile, and every per-column
// array passed here, must be readable up to padded(cols); columns past `cols` are masked out.
//
// Included once per ISA build (csrc/cpu/kernels_*.cpp, which set FL_ISA and the target):
// everything is in namespace fl::FL_ISA, so the builds never share a symbol.
#pragma once

#include "cpu/tile_types.h"
#include "cpu/simd.h"

namespace fl {
namespace FL_ISA {

// cand/pos lane masks of one row (id rid, diagonal column d) over columns j0..j0+W.
template <typename T>
FL_INLINE void pair_masks(const TileMask<T>& m, LabelOf<T> rid, int64_t d, int64_t j0,
                          MaskOf<T>& cand, MaskOf<T>& pos) {
  using I = MaskOf<T>;
  const I jj = iota<I>(j0);
  cand = jj < splat<I>(m.cols);
  const I dm = jj == splat<I>(d);
  if (m.no_positives) {
    pos = splat<I>(0);
  } else if (m.row_ids) {
    pos = (jj < splat<I>(m.kend)) & (load<I>(m.key_ids + j0) == splat<I>(rid));
  } else {
    pos = dm;
  }
  if (m.exclude_diagonal) {
    pos &= ~dm;
    cand &= ~dm;
  }
  if (m.decoupled) cand &= ~pos;
}

// Forward of one tile (rows ≤ kMaxTileRows).  In: s (rows × cols, row stride ld).  z = scale·s;
// the row LSE over candidates of z + bias is merged into lse[i]; positive sums/counts of z added
// to pos_sum/pos_cnt; with col, this tile's column statistics of z (no bias); with second (no
// bias), the row LSE of ratio·z over the same candidates merged into second->lse[i] (its max is
// ratio times the row max: no sweep of its own).  s is overwritten with z where a candidate,
// -inf elsewhere.  Two sweeps: maxima (rows and columns), then every exponential sum from one
// read of the tile.
template <typename T>
void lse_fwd_tile(T* s, int64_t ld, int64_t rows, T scale, const T* bias,
                            const TileMask<T>& m, Lse<T>* lse, T* pos_sum, T* pos_cnt,
                            const ColStats<T>* col, const RowLse2<T>* second) {
  using V = VecOf<T>;
  using I = MaskOf<T>;
  constexpr int W = Simd<T>::W;
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t cw = padded<T>(m.cols);
  const V ninf = splat<V>(-inf), zero = splat<V>(T(0)), one = splat<V>(T(1));
  // Without labels the only positive of a row is its diagonal pair: summed by scalar code.
  const bool vector_pos = m.row_ids && !m.no_positives;
  T row_max[kMaxTileRows];
  if (col)
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      store(col->max + j0, ninf);
      store(col->sum + j0, zero);
    }
  for (int64_t i = 0; i < rows; ++i) {
    T* zi = s + i * ld;
    const int64_t d = m.diag(i);
    const LabelOf<T> rid = m.row_ids ? m.row_ids[i] : 0;
    V vmx = ninf, vps = zero, vpc = zero;
    I nan = splat<I>(0);
    // Read before the sweep overwrites it (a decoupled positive is not a candidate).
    const bool diag_pos = !vector_pos && !m.no_positives && !m.exclude_diagonal && d >= 0;
    const T zdiag = diag_pos ? zi[d] * scale : T(0);
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      I cand, pos;
      pair_masks(m, rid, d, j0, cand, pos);
      const V z = load<V>(zi + j0) * scale;
      const V zb = bias ? z + load<V>(bias + j0) : z;
      nan |= cand & (zb != zb);
      const V zc = cand ? z : ninf;
      store(zi + j0, zc);
      vmx = vmax(vmx, cand ? zb : ninf);
      if (col) store(col->max + j0, vmax(load<V>(col->max + j0), zc));
      if (vector_pos) {
        vps += pos ? z : zero;
        vpc += pos ? one : zero;
        if (col) {
          store(col->pos_sum + j0, load<V>(col->pos_sum + j0) + (pos ? z : zero));
          store(col->pos_cnt + j0, load<V>(col->pos_cnt + j0) + (pos ? one : zero));
        }
      }
    }
    if (vector_pos) {
      pos_sum[i] += hsum(vps);
      pos_cnt[i] += hsum(vpc);
    } else if (diag_pos) {
      pos_sum[i] += zdiag;
      pos_cnt[i] += T(1);
      if (col) {
        col->pos_sum[d] += zdiag;
        col->pos_cnt[d] += T(1);
      }
    }
    row_max[i] = any(nan) ? std::numeric_limits<T>::quiet_NaN() : hmax(vmx);
  }
  const T ratio = second ? second->ratio : T(0);
  const V r = splat<V>(ratio);
  for (int64_t i = 0; i < rows; ++i) {
    const T* zi = s + i * ld;
    const T mx = row_max[i];
    const bool row_on = mx == mx && mx != -inf;
    const V msafe = splat<V>(row_on ? mx : T(0));
    // the second LSE's exponent rounds ratio·z exactly as the backward's exp(ratio·z − lse2)
    const V rm = splat<V>(row_on ? ratio * mx : T(0));
    V vs = zero, vs2 = zero;
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      const V zc = load<V>(zi + j0);
      if (row_on) {
        vs += vexp((bias ? zc + load<V>(bias + j0) : zc) - msafe);
        // select, never multiply: ratio 0 times a masked −inf is NaN
        if (second) vs2 += zc == ninf ? zero : vexp(rounded_product(r, zc) - rm);
      }
      if (col) {
        const V cm = load<V>(col->max + j0);
        store(col->sum + j0, load<V>(col->sum + j0) + vexp(zc - (cm == ninf ? zero : cm)));
      }
    }
    if (mx != mx) {
      lse[i].merge(mx, T(1));
      if (second) second->lse[i].merge(mx, T(1));
    } else if (row_on) {
      lse[i].merge(mx, hsum(vs));
      if (second) second->lse[i].merge(ratio * mx, hsum(vs2));
    }
  }
}

// Backward of one tile (kernels.py contrastive_bwd): dZ from the similarity tile s, written as
// scale·dZ into ds (row stride ldd: what the dX/dY GEMMs take), columns up to padded(cols).
// Returns the tile's Σ dZ·s: that sum cancels (softmax weights minus positive weights), so it is
// formed per row as g·Σ p·s − g_pos·Σ_pos s (and the same with the column weights and the
// second LSE's) from fp32 partial sums combined in double.  Adds the row part of dZ to dbias.
// With second: dZ gains g2_i·exp(ratio·z − lse2_i) over the candidates.
template <typename T>
double lse_bwd_tile(const T* s, int64_t ld, int64_t rows, T scale, const T* bias,
                              const TileMask<T>& m, const T* row_lse, const T* g_row,
                              const T* g_rowpos, const ColGrad<T>* col,
                              const RowGrad2<T>* second, T* dbias, T* ds, int64_t ldd) {
  using V = VecOf<T>;
  using I = MaskOf<T>;
  constexpr int W = Simd<T>::W;
  const int64_t cw = padded<T>(m.cols);
  const V zero = splat<V>(T(0));
  const I kc = splat<I>(col ? col->kc : 0);
  const V r = splat<V>(second ? second->ratio : T(0));
  double total = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    T* dsi = ds + i * ldd;
    const int64_t d = m.diag(i);
    const LabelOf<T> rid = m.row_ids ? m.row_ids[i] : 0;
    const T gr = g_row[i], grp = g_rowpos[i], rl = row_lse[i];
    const T g2 = second ? second->g[i] : T(0);
    const V l2 = splat<V>(second ? second->lse[i] : T(0));
    V vps = zero, vpos = zero, vqs = zero, vqpos = zero, vp2s = zero;
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      I cand, pos;
      pair_masks(m, rid, d, j0, cand, pos);
      // Pairs that are neither read as 0: the buffer past cols may hold anything.
      const V sv = (cand | pos) ? load<V>(si + j0) : zero;
      const V z = sv * scale;
      const V p = cand ? vexp((bias ? z + load<V>(bias + j0) : z) - rl) : zero;
      V dz = gr * p - (pos ? grp + zero : zero);
      vps += p * sv;
      vpos += pos ? sv : zero;
      if (second) {
        // z as the forward stored it (scale·s rounded), then ratio·z rounded alike
        const V p2 = cand ? vexp(rounded_product(r, rounded_product(sv, splat<V>(scale))) - l2)
                          : zero;
        dz += g2 * p2;
        vp2s += p2 * sv;
      }
      if (dbias) store(dbias + j0, load<V>(dbias + j0) + gr * p);
      if (col) {
        const V q = (cand & (iota<I>(j0) < kc)) ? vexp(z - load<V>(col->lse + j0)) : zero;
        const V gq = load<V>(col->g + j0) * q;
        const V gpos = pos ? load<V>(col->g_pos + j0) : zero;
        dz += gq - gpos;
        vqs += gq * sv;
        vqpos += gpos * sv;
      }
      store(dsi + j0, dz * scale);
    }
    total += static_cast<double>(gr) * hsum(vps) - static_cast<double>(grp) * hsum(vpos);
    if (col) total += static_cast<double>(hsum(vqs)) - static_cast<double>(hsum(vqpos));
    if (second) total += static_cast<double>(g2) * hsum(vp2s);
  }
  return total;
}

// ------------------------------------------------------------------------ multi-similarity
template <typename T>
FL_INLINE void ms_masks(const MsMask<T>& m, int64_t i, int64_t j0, MaskOf<T>& pos,
                        MaskOf<T>& neg) {
  using I = MaskOf<T>;
  const I jj = iota<I>(j0);
  I ok = jj < splat<I>(m.cols);
  if (m.exclude_self) ok &= ~(jj == splat<I>(m.self0 + i));
  const I same = load<I>(m.ref_ids + j0) == splat<I>(m.row_ids[i]);
  pos = ok & same;
  neg = ok & ~same;
}

// Per row: min similarity over positives, max over negatives (merged into min_pos/max_neg).
template <typename T>
void ms_mine_tile(const T* s, int64_t ld, int64_t rows, const MsMask<T>& m,
                            T* min_pos, T* max_neg) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::W;
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t cw = padded<T>(m.cols);
  for (int64_t i = 0; i < rows; ++i) {
    V lo = splat<V>(inf), hi = splat<V>(-inf);
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      MaskOf<T> pos, neg;
      ms_masks(m, i, j0, pos, neg);
      const V v = load<V>(s + i * ld + j0);
      lo = vmin(lo, pos ? v : splat<V>(inf));
      hi = vmax(hi, neg ? v : splat<V>(-inf));
    }
    const T l = hmin(lo), h = hmax(hi);
    min_pos[i] = l < min_pos[i] ? l : min_pos[i];
    max_neg[i] = h > max_neg[i] ? h : max_neg[i];
  }
}

// Kept masks and the exponent u of each lane (u is the positive one where kp, else the negative).
template <typename T>
FL_INLINE VecOf<T> ms_exponent(const MsMask<T>& m, const MsParams<T>& p, int64_t i, int64_t j0,
                               VecOf<T> v, MaskOf<T>& kp, MaskOf<T>& kn) {
  using V = VecOf<T>;
  ms_masks(m, i, j0, kp, kn);
  if (p.mining) {
    kp &= (v - p.eps) < splat<V>(p.max_neg[i]);
    kn &= (v + p.eps) > splat<V>(p.min_pos[i]);
  }
  return kp ? (v - p.base) * -p.alpha : (v - p.base) * p.beta;
}

// Per row, Σ exp(u − shift) over the kept positives and over the kept negatives, added to
// sum_p/sum_n: one exponential per pair.  Shifts are finite (0 where a side keeps nothing).
template <typename T>
void ms_sums_rows(const T* s, int64_t ld, int64_t rows, const MsMask<T>& m,
                            const MsParams<T>& p, const T* shift_p, const T* shift_n, T* sum_p,
                            T* sum_n) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::W;
  const int64_t cw = padded<T>(m.cols);
  const V zero = splat<V>(T(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    const V shp = splat<V>(shift_p[i]), shn = splat<V>(shift_n[i]);
    V sp = zero, sn = zero;
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      MaskOf<T> kp, kn;
      const V u = ms_exponent(m, p, i, j0, load<V>(si + j0), kp, kn);
      const V e = vexp(u - (kp ? shp : shn));
      sp += kp ? e : zero;
      sn += kn ? e : zero;
    }
    sum_p[i] += hsum(sp);
    sum_n[i] += hsum(sn);
  }
}

// Per row, the online LSEs of the kept positive and negative exponents of one tile (merged into
// pos/neg): maxima first, then ms_sums_rows.
template <typename T>
void ms_fwd_tile(const T* s, int64_t ld, int64_t rows, const MsMask<T>& m,
                           const MsParams<T>& p, Lse<T>* pos, Lse<T>* neg) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::W;
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t cw = padded<T>(m.cols);
  const V ninf = splat<V>(-inf);
  T xp[kMaxTileRows], xn[kMaxTileRows], sp[kMaxTileRows], sn[kMaxTileRows];
  for (int64_t i = 0; i < rows; ++i) {
    V mp = ninf, mn = ninf;
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      MaskOf<T> kp, kn;
      const V u = ms_exponent(m, p, i, j0, load<V>(s + i * ld + j0), kp, kn);
      mp = vmax(mp, kp ? u : ninf);
      mn = vmax(mn, kn ? u : ninf);
    }
    xp[i] = hmax(mp);
    xn[i] = hmax(mn);
    sp[i] = sn[i] = T(0);
  }
  T shp[kMaxTileRows], shn[kMaxTileRows];
  for (int64_t i = 0; i < rows; ++i) {
    shp[i] = xp[i] == -inf ? T(0) : xp[i];
    shn[i] = xn[i] == -inf ? T(0) : xn[i];
  }
  ms_sums_rows(s, ld, rows, m, p, shp, shn, sp, sn);
  for (int64_t i = 0; i < rows; ++i) {
    pos[i].merge(xp[i], sp[i]);
    neg[i].merge(xn[i], sn[i]);
  }
}

// dS of one tile: g_i·(−exp(u⁺ − lse⁺_i) + exp(u⁻ − lse⁻_i)) over kept pairs, into ds.
template <typename T>
void ms_bwd_tile(const T* s, int64_t ld, int64_t rows, const MsMask<T>& m,
                           const MsParams<T>& p, const T* pos_lse, const T* neg_lse, const T* g,
                           T* ds, int64_t ldd) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::W;
  const int64_t cw = padded<T>(m.cols);
  const V zero = splat<V>(T(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    const V lp = splat<V>(pos_lse[i]), ln = splat<V>(neg_lse[i]);
    const V gp = splat<V>(-g[i]), gn = splat<V>(g[i]);
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      MaskOf<T> kp, kn;
      const V u = ms_exponent(m, p, i, j0, load<V>(si + j0), kp, kn);
      const V e = vexp(u - (kp ? lp : ln));
      store(ds + i * ldd + j0, kp ? gp * e : (kn ? gn * e : zero));
    }
  }
}

// ------------------------------------------------------------- softmax-weighted matmul

// One column tile of the online softmax of z = scale·s + bias per row: s is overwritten with
// exp(z − max_new) (zero past cols); running max/sum updated; rescale[i] = exp(max_old − max_new)
// is what the caller multiplies its accumulator row by.
template <typename T>
void softmax_rows_tile(T* s, int64_t ld, int64_t rows, int64_t cols, T scale,
                                 const T* bias, T* run_max, T* run_sum, T* rescale) {
  using V = VecOf<T>;
  using I = MaskOf<T>;
  constexpr int W = Simd<T>::W;
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t cw = padded<T>(cols);
  const V ninf = splat<V>(-inf), zero = splat<V>(T(0));
  for (int64_t i = 0; i < rows; ++i) {
    T* zi = s + i * ld;
    V vm = ninf;
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      const I ok = iota<I>(j0) < splat<I>(cols);
      V z = load<V>(zi + j0) * scale;
      if (bias) z += load<V>(bias + j0);
      z = ok ? z : ninf;
      store(zi + j0, z);
      vm = vmax(vm, z);
    }
    const T tmax = hmax(vm);
    const T mnew = tmax > run_max[i] ? tmax : run_max[i];
    const T msafe = mnew == -inf ? T(0) : mnew;
    V vs = zero;
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      const V e = vexp(load<V>(zi + j0) - msafe);
      store(zi + j0, e);
      vs += e;
    }
    rescale[i] = run_max[i] == -inf ? T(0) : exp_f(run_max[i] - msafe);
    run_sum[i] = run_sum[i] * rescale[i] + hsum(vs);
    run_max[i] = mnew;
  }
}

// P = exp(scale·s + bias − lse_i) of one tile into p (zero past cols).
template <typename T>
void softmax_probs_tile(const T* s, int64_t ld, int64_t rows, int64_t cols, T scale,
                                  const T* bias, const T* lse, T* p, int64_t ldp) {
  using V = VecOf<T>;
  using I = MaskOf<T>;
  constexpr int W = Simd<T>::W;
  const int64_t cw = padded<T>(cols);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      const I ok = iota<I>(j0) < splat<I>(cols);
      V z = load<V>(s + i * ld + j0) * scale;
      if (bias) z += load<V>(bias + j0);
      store(p + i * ldp + j0, ok ? vexp(z - lse[i]) : splat<V>(T(0)));
    }
  }
}

// dZ = P ∘ (dP − delta_i) of one tile, written as scale·dZ over P (in p); dbias += Σ_i dZ;
// returns Σ dZ·s.
template <typename T>
double softmax_grad_tile(const T* s, int64_t ld, int64_t rows, int64_t cols, T scale,
                                   const T* dp, int64_t lddp, const T* delta, T* p, int64_t ldp,
                                   T* dbias) {
  using V = VecOf<T>;
  constexpr int W = Simd<T>::W;
  const int64_t cw = padded<T>(cols);
  double total = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    V acc = splat<V>(T(0));
    for (int64_t j0 = 0; j0 < cw; j0 += W) {
      // Past cols the buffers may hold anything: dz is 0 there.
      const MaskOf<T> ok = iota<MaskOf<T>>(j0) < splat<MaskOf<T>>(cols);
      const V pv = load<V>(p + i * ldp + j0);
      const V dz = ok ? pv * (load<V>(dp + i * lddp + j0) - delta[i]) : splat<V>(T(0));
      acc += ok ? dz * load<V>(s + i * ld + j0) : splat<V>(T(0));
      if (dbias) store(dbias + j0, load<V>(dbias + j0) + dz);
      store(p + i * ldp + j0, dz * scale);
    }
    total += hsum(acc);
  }
  return total;
}

}  // namespace FL_ISA
}  // namespace fl
