// Compiled CPU kernels of the Krause ops (krause/cpu/__init__.py builds and registers them).
//
// Per query i with candidate keys C_i (a causal window, or a CSR list for the 2-D grid):
//   dist_ij = max(0, (|q_i|^2 + |k_j|^2) - 2 q_i.k_j)          fp32
//   S_i     = the min(top_k, |C_i|) smallest dist_ij, ties to the lower key index j
//   p_ij    = softmax over S_i of -c_h dist_ij;   out_i = sum_j p_ij v_j
// The squared norms are computed here, each row by one function, so equal rows get equal
// norms (exact ties stay exact).
// NaN policy (krause/nonfinite.py): |q_i|^2 is not finite for a query with a NaN/inf entry,
// and |k_j|^2 is made NaN for such a key or value (nonfinite_probe: never for large finite
// values), so a candidate's distance is then not finite; a query with one such candidate
// gets an all-NaN output row and keeps nothing (its saved rows are empty: no gradient
// passes through it).
// The forward saves, per query, the kept keys (ascending index), their probabilities and
// distances in (B, H, Nq, Ks) tensors (Ks = most keys a query can keep; unused slots hold
// key -1 and zeros). The backward reads only those.
//
// Threads: at::parallel_for (torch's intra-op pool). Determinism: every output element is
// written by one task in a fixed order, and the partition into tasks depends on the shapes
// only, so the bits do not depend on the thread count. The forward splits over (batch,
// key/value head, query block); the causal backward over (batch, key/value head, query
// block) in two waves, the even blocks then the odd ones, so that a block adds straight into
// the dk/dv rows of its own positions and of the W - 1 keys before them (its predecessor's)
// while no other running task touches them; the listed backward over (batch, key/value
// head). dk/dv never need atomics.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

inline float hmin(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, v);
}

// Partial loads zero the lanes past `count` (at::vec's loadu contract), so tails add nothing.
inline float dot(const float* a, const float* b, int64_t d) {
  Vec acc0(0.f), acc1(0.f);
  int64_t x = 0;
  for (; x + 2 * kLanes <= d; x += 2 * kLanes) {
    acc0 = at::vec::fmadd(Vec::loadu(a + x), Vec::loadu(b + x), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + x + kLanes), Vec::loadu(b + x + kLanes), acc1);
  }
  for (; x < d; x += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, d - x);
    acc0 = at::vec::fmadd(Vec::loadu(a + x, c), Vec::loadu(b + x, c), acc0);
  }
  return hsum(acc0 + acc1);
}

// 0 when a[0, n) is finite, NaN when it holds a NaN or an infinity: x - x is 0 or NaN, and a
// sum of zeros cannot overflow (0 * sum(a) would turn large finite values into NaN).
inline float nonfinite_probe(const float* a, int64_t n) {
  Vec acc(0.f);
  for (int64_t x = 0; x < n; x += kLanes) {
    const Vec e = Vec::loadu(a + x, std::min<int64_t>(kLanes, n - x));
    acc = acc + (e - e);
  }
  return hsum(acc);
}

// |k|^2, poisoned (NaN) when k or v holds a NaN or an infinity.
inline float key_sq_norm(const float* k, const float* v, int64_t d) { return dot(k, k, d) + nonfinite_probe(v, d); }

// out = sum_m w[m] * rows[idx[m]] (rows of length d), accumulated in registers four vectors
// of d at a time, written once.
inline void weighted_rows(const float* rows, const int32_t* idx, const float* w, int64_t n, int64_t d, float* out) {
  int64_t x = 0;
  for (; x + 4 * kLanes <= d; x += 4 * kLanes) {
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    for (int64_t m = 0; m < n; ++m) {
      const float* r = rows + static_cast<int64_t>(idx[m]) * d + x;
      const Vec wm(w[m]);
      a0 = at::vec::fmadd(wm, Vec::loadu(r), a0);
      a1 = at::vec::fmadd(wm, Vec::loadu(r + kLanes), a1);
      a2 = at::vec::fmadd(wm, Vec::loadu(r + 2 * kLanes), a2);
      a3 = at::vec::fmadd(wm, Vec::loadu(r + 3 * kLanes), a3);
    }
    a0.store(out + x), a1.store(out + x + kLanes), a2.store(out + x + 2 * kLanes), a3.store(out + x + 3 * kLanes);
  }
  for (; x < d; x += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, d - x);
    Vec a(0.f);
    for (int64_t m = 0; m < n; ++m)
      a = at::vec::fmadd(Vec(w[m]), Vec::loadu(rows + static_cast<int64_t>(idx[m]) * d + x, c), a);
    a.store(out + x, c);
  }
}

// dots[m] = q . kT[:, lo + m] for m < n, kT a (D, ld) transposed key block: one broadcast
// of q[x] and one contiguous load per lane-width of keys (no horizontal sums). Two
// lane-widths of keys at a time, each summed over even and odd x separately: four
// independent FMA chains instead of one.
inline void window_dots(const float* q, const float* kT, int64_t ld, int64_t lo, int64_t n, int64_t d, float* dots) {
  for (int64_t m = 0; m < n; m += 2 * kLanes) {
    const int64_t c0 = std::min<int64_t>(kLanes, n - m), c1 = std::max<int64_t>(0, std::min<int64_t>(kLanes, n - m - kLanes));
    const float* base = kT + lo + m;
    Vec a0(0.f), a1(0.f), b0(0.f), b1(0.f);
    int64_t x = 0;
    for (; x + 1 < d; x += 2) {
      const Vec q0(q[x]), q1(q[x + 1]);
      a0 = at::vec::fmadd(q0, Vec::loadu(base + x * ld, c0), a0);
      b0 = at::vec::fmadd(q1, Vec::loadu(base + (x + 1) * ld, c0), b0);
      if (c1) {
        a1 = at::vec::fmadd(q0, Vec::loadu(base + x * ld + kLanes, c1), a1);
        b1 = at::vec::fmadd(q1, Vec::loadu(base + (x + 1) * ld + kLanes, c1), b1);
      }
    }
    if (x < d) {
      a0 = at::vec::fmadd(Vec(q[x]), Vec::loadu(base + x * ld, c0), a0);
      if (c1) a1 = at::vec::fmadd(Vec(q[x]), Vec::loadu(base + x * ld + kLanes, c1), a1);
    }
    (a0 + b0).store(dots + m, c0);
    if (c1) (a1 + b1).store(dots + m + kLanes, c1);
  }
}

// The kept candidates of one query: the min(top_k, cnt) smallest dist, ties to the lower
// key index, written in ascending key order (dist/key arrays are in ascending key order).
// Up to kRankCountMax candidates: rank counting, rank_m = #{j < m : d_j <= d_m} +
// #{j > m : d_j < d_m}, kept when < kk: cnt / lanes independent compares per candidate and
// a branch-free compaction. Beyond, the kk-th smallest distance by bisection
// (kth_smallest): ~30 rounds of cnt / lanes compares, but each round waits on the last, so
// it only pays once a candidate's compares outnumber a round's latency several times.
// (A comparison sort or nth_element takes a data-dependent branch per comparison, about
// half of them mispredicted on distances in random order.)
constexpr int64_t kRankCountMax = 8 * kLanes;

// r + 1 in the lanes where dj <= dm (kOrEqual) or dj < dm. AVX-512 compares into a mask
// register, and a masked add takes it as is (the portable form turns the mask into a vector
// and ANDs it with ones first: two more instructions per compare).
template <bool kOrEqual>
inline Vec count_if_closer(const Vec& r, const Vec& dj, const Vec& dm) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_add_ps(r, _mm512_cmp_ps_mask(dj, dm, kOrEqual ? _CMP_LE_OQ : _CMP_LT_OQ), r, _mm512_set1_ps(1.f));
#else
  return r + ((kOrEqual ? (dj <= dm) : (dj < dm)) & Vec(1.f));
#endif
}

// The same for the lanes' own group: closer, or as close and j below the lane's index.
inline Vec count_if_before(const Vec& r, const Vec& dj, const Vec& dm, const Vec& j, const Vec& index) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 tie_below = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(j, index, _CMP_LT_OQ), dj, dm, _CMP_EQ_OQ);
  return _mm512_mask_add_ps(r, _mm512_cmp_ps_mask(dj, dm, _CMP_LT_OQ) | tie_below, r, _mm512_set1_ps(1.f));
#else
  return r + (((dj < dm) | ((dj == dm) & (j < index))) & Vec(1.f));
#endif
}

// Keeps the candidates whose rank is below kk, in ascending key order; returns how many.
inline int64_t keep_ranked(const float* dist, const int32_t* key, int64_t cnt, int64_t kk, const float* rank,
                           float* kept_dist, int32_t* kept_key) {
  int64_t n = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // Sixteen candidates at a time: the kept lanes compressed in a register, then one masked
  // store each (compressing straight to memory is microcoded on some cores).
  const __m512 limit = _mm512_set1_ps(static_cast<float>(kk));
  for (int64_t m = 0; m < cnt; m += 16) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, cnt - m)) - 1);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, rank + m), limit, _CMP_LT_OQ);
    const int taken = _mm_popcnt_u32(keep);
    const __mmask16 first = static_cast<__mmask16>((1u << taken) - 1);
    _mm512_mask_storeu_ps(kept_dist + n, first, _mm512_maskz_compress_ps(keep, _mm512_maskz_loadu_ps(lanes, dist + m)));
    _mm512_mask_storeu_epi32(kept_key + n, first,
                             _mm512_maskz_compress_epi32(keep, _mm512_maskz_loadu_epi32(lanes, key + m)));
    n += taken;
  }
#else
  for (int64_t m = 0; m < cnt; ++m) {  // n <= m < cnt while writing: in bounds
    kept_dist[n] = dist[m];
    kept_key[n] = key[m];
    n += rank[m] < static_cast<float>(kk);
  }
#endif
  return n;
}

// First the strict ranks #{j : d_j < d_m} alone (two instructions a compare): they keep
// exactly kk candidates unless distances tie across the boundary, and only then are the ranks
// counted again with ties broken by index.
inline int64_t select_by_rank(const float* dist, const int32_t* key, int64_t cnt, int64_t kk, float* rank,
                              float* kept_dist, int32_t* kept_key) {
  for (int64_t mc = 0; mc < cnt; mc += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, cnt - mc);
    const Vec dm = Vec::loadu(dist + mc, c);
    Vec r(0.f);
    for (int64_t j = 0; j < cnt; ++j) r = count_if_closer<false>(r, Vec(dist[j]), dm);
    r.store(rank + mc, c);
  }
  const int64_t n = keep_ranked(dist, key, cnt, kk, rank, kept_dist, kept_key);
  if (n == kk) return n;
  for (int64_t mc = 0; mc < cnt; mc += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, cnt - mc);
    const Vec dm = Vec::loadu(dist + mc, c), index = Vec::arange(static_cast<float>(mc), 1.f);
    Vec r(0.f);
    for (int64_t j = 0; j < mc; ++j) r = count_if_closer<true>(r, Vec(dist[j]), dm);  // j below every lane's m
    for (int64_t j = mc; j < mc + c; ++j) r = count_if_before(r, Vec(dist[j]), dm, Vec(static_cast<float>(j)), index);
    for (int64_t j = mc + c; j < cnt; ++j) r = count_if_closer<false>(r, Vec(dist[j]), dm);  // j above every lane's m
    r.store(rank + mc, c);
  }
  return keep_ranked(dist, key, cnt, kk, rank, kept_dist, kept_key);
}

// #{m < n : dist[m] <= t}.
inline int64_t count_at_most(const float* dist, int64_t n, float t) {
  const Vec vt(t);
#if defined(CPU_CAPABILITY_AVX512)
  int64_t total = 0;
  for (int64_t m = 0; m < n; m += kLanes) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, n - m)) - 1);
    total += _mm_popcnt_u32(_mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, dist + m), vt, _CMP_LE_OQ));
  }
  return total;
#else
  Vec acc(0.f);
  for (int64_t m = 0; m < n; m += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, n - m);
    acc = acc + Vec::set(Vec(0.f), (Vec::loadu(dist + m, c) <= vt) & Vec(1.f), c);
  }
  return static_cast<int64_t>(hsum(acc));
#endif
}

// The kk-th smallest of n finite distances >= 0 (1 <= kk <= n), by bisection on bit patterns,
// which order non-negative floats as their values do: the smallest pattern u with
// #{d <= float(u)} >= kk is that distance. Each round counts with n / lanes compares, and the
// rounds (about log2 of the patterns between the smallest and largest distance, <= 31) are
// the only data-dependent branches.
inline float kth_smallest(const float* dist, int64_t n, int64_t kk) {
  Vec lowest(kInf), highest(0.f);
  for (int64_t m = 0; m < n; m += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, n - m);
    const Vec d = Vec::loadu(dist + m, c);
    lowest = at::vec::minimum(lowest, Vec::set(Vec(kInf), d, c));
    highest = at::vec::maximum(highest, d);
  }
  auto bits = [](float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; };
  auto value = [](uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; };
  const float low = hmin(lowest);
  uint32_t lo = low > 0.f ? bits(low) : 0u;  // -0.0 (a clamped distance) counts as +0.0
  uint32_t hi = bits(hmax(highest));
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (count_at_most(dist, n, value(mid)) >= kk)
      hi = mid;
    else
      lo = mid + 1;
  }
  return value(lo);
}

inline int64_t select_nearest(const float* dist, const int32_t* key, int64_t cnt, int64_t top_k, float* scratch,
                              float* kept_dist, int32_t* kept_key) {
  const int64_t kk = std::min<int64_t>(top_k, cnt);
  if (kk == cnt) {
    std::copy(dist, dist + cnt, kept_dist);
    std::copy(key, key + cnt, kept_key);
    return kk;
  }
  if (cnt <= kRankCountMax) return select_by_rank(dist, key, cnt, kk, scratch, kept_dist, kept_key);
  const float thr = kth_smallest(dist, cnt, kk);
  int64_t below = 0;
  for (int64_t m = 0; m < cnt; ++m) below += dist[m] < thr;
  int64_t ties = kk - below, n = 0;  // the lowest-index candidates at the threshold fill the rest
  for (int64_t m = 0; m < cnt; ++m) {
    if (dist[m] < thr || (dist[m] == thr && ties-- > 0)) {
      kept_dist[n] = dist[m];
      kept_key[n++] = key[m];
    }
  }
  return n;
}

// Softmax of -coef * dist over the n kept entries into probs, and out = sum probs v_key;
// the saved rows (probs, dist, key) are padded to ks with zeros / -1. dist_out null: nothing
// is saved (probs is then a scratch row).
inline void softmax_gather(const float* dist, const int32_t* key, int64_t n, int64_t ks, float coef,
                           const float* v_head, int64_t d, float* out, float* probs, float* dist_out,
                           int32_t* key_out) {
  // exp(coef (d_min - d_j)): the difference of distances, scaled. The logit form -coef d_j -
  // max(-coef d) lets the compiler fuse the multiply into the subtraction, rounding the two
  // products differently; beyond coef d ~ 1e9 that difference passes 88: exp overflows, NaN.
  const Vec vcoef(coef), zero(0.f), highest(kInf);
  Vec row_min = highest;  // a vector of minima, not one scalar chain: min is exact either way
  for (int64_t m = 0; m < n; m += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, n - m);
    row_min = at::vec::minimum(row_min, Vec::set(highest, Vec::loadu(dist + m, c), c));
  }
  const Vec vmin(hmin(row_min));
  Vec total(0.f);
  for (int64_t m = 0; m < n; m += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, n - m);
    const Vec e = Vec::set(zero, ((vmin - Vec::loadu(dist + m, c)) * vcoef).exp_u20(), c);
    e.store(probs + m, c);
    total = total + e;
  }
  const Vec inv(n ? 1.f / hsum(total) : 0.f);
  for (int64_t m = 0; m < n; m += kLanes) {
    const int64_t c = std::min<int64_t>(kLanes, n - m);
    (Vec::loadu(probs + m, c) * inv).store(probs + m, c);
  }
  weighted_rows(v_head, key, probs, n, d, out);
  if (dist_out == nullptr) return;  // inference: probs is scratch, nothing is saved
  std::copy(dist, dist + n, dist_out);
  std::copy(key, key + n, key_out);
  std::fill(probs + n, probs + ks, 0.f);
  std::fill(dist_out + n, dist_out + ks, 0.f);
  std::fill(key_out + n, key_out + ks, -1);
}

// The row of a query that sees a non-finite candidate distance: NaN output, nothing kept.
inline void nan_row(int64_t ks, int64_t d, float* out, float* probs, float* dist_out, int32_t* key_out) {
  std::fill(out, out + d, std::numeric_limits<float>::quiet_NaN());
  if (dist_out == nullptr) return;  // nothing saved
  std::fill(probs, probs + ks, 0.f);
  std::fill(dist_out, dist_out + ks, 0.f);
  std::fill(key_out, key_out + ks, -1);
}

// Per-thread buffers of one query's candidates.
struct Scratch {
  std::vector<float> dots, dist, tmp, kept_dist;
  std::vector<int32_t> key, kept_key;
  explicit Scratch(int64_t n)
      : dots(n + kLanes), dist(n + kLanes), tmp(n + kLanes), kept_dist(n), key(n), kept_key(n) {}
};

// Rows of one head whose steps run phase by phase (all distances, then all selections, then
// all softmaxes): each row's steps form one long dependency chain, and rows of a group are
// independent, so the core overlaps them instead of waiting on each chain.
constexpr int64_t kRowGroup = 8;

// Per-thread buffers of a group's candidates, kRowGroup rows of stride n + kLanes.
struct RowGroupScratch {
  int64_t stride;
  std::vector<float> dots_, dist_, kept_dist_, tmp;
  std::vector<int32_t> key_, kept_key_;
  int64_t count[kRowGroup], kept[kRowGroup];
  explicit RowGroupScratch(int64_t n)
      : stride(n + kLanes), dots_(kRowGroup * stride), dist_(kRowGroup * stride), kept_dist_(kRowGroup * stride),
        tmp(stride), key_(kRowGroup * stride), kept_key_(kRowGroup * stride) {}
  float* dots(int64_t r) { return dots_.data() + r * stride; }
  float* dist(int64_t r) { return dist_.data() + r * stride; }
  float* kept_dist(int64_t r) { return kept_dist_.data() + r * stride; }
  int32_t* key(int64_t r) { return key_.data() + r * stride; }
  int32_t* kept_key(int64_t r) { return kept_key_.data() + r * stride; }
};

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              name, ": expected a contiguous float32 tensor of ", dim, " dims");
}

// c_h = 1 / (2 sigma_h^2) = exp(-2 log_sigma_h) / 2 of a scalar or (H,) fp32 log sigma, here
// rather than in torch: three small ops fewer per call, which a decoding step feels.
std::vector<float> head_coefficients(const at::Tensor& log_sigma, int64_t H) {
  TORCH_CHECK(log_sigma.scalar_type() == at::kFloat && log_sigma.is_contiguous() &&
                  (log_sigma.numel() == 1 || log_sigma.numel() == H),
              "log_sigma: expected a contiguous float32 scalar or one value per head");
  const float* ls = log_sigma.data_ptr<float>();
  std::vector<float> coef(H);
  for (int64_t h = 0; h < H; ++h) coef[h] = 0.5f * std::exp(-2.f * ls[log_sigma.numel() == 1 ? 0 : h]);
  return coef;
}

// ksq[m] = |k_m|^2 of the n keys of a transposed tile kT (D, ld), a vector of keys at a time
// (x in order, so equal keys get equal norms), poisoned (NaN) where the key's value row v_m
// (rows of length d) is not finite; the values are checked with one reduction for the tile.
inline void tile_key_norms(const float* kT, int64_t ld, int64_t n, int64_t d, const float* v, float* ksq) {
  for (int64_t m = 0; m < n; m += kLanes) {
    Vec acc(0.f);
    for (int64_t x = 0; x < d; ++x) {
      const Vec kx = Vec::loadu(kT + x * ld + m);
      acc = at::vec::fmadd(kx, kx, acc);
    }
    acc.store(ksq + m);
  }
  if (std::isnan(nonfinite_probe(v, n * d)))  // some value is NaN or infinite: find the rows
    for (int64_t m = 0; m < n; ++m) ksq[m] += nonfinite_probe(v + m * d, d);
}

// Queries per causal task: a block of 4W queries reads 5W - 1 keys, so copying them costs
// about 1.25 key reads per query and candidate window.
int64_t causal_block(int64_t window) { return std::max<int64_t>(kLanes, 4 * window); }

}  // namespace

// q (B,H,Tq,D); k, v (B,Hkv,Tk,D); key_valid (B,Tk) bool or empty; log_sigma () or (H,). Query i sits
// at key position key_offset + i and sees keys p - window < j <= p. Returns out, probs,
// dist (B,H,Tq,ks) and kept (int32); with save false (inference) the last three are empty
// (B,H,Tq,0) and nothing of them is written.
// A task (batch, key/value head, block of queries) copies the keys its block can see,
// transposed, into a small buffer (so a query's distances are contiguous vector loads)
// with their squared norms, and runs the block for each query head of the group.
std::vector<at::Tensor> causal_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& key_valid, const at::Tensor& log_sigma, int64_t key_offset,
                                       int64_t window, int64_t top_k, int64_t ks, bool save) {
  check_f32(q, "q", 4), check_f32(k, "k", 4), check_f32(v, "v", 4);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2), G = H / Hkv;
  TORCH_CHECK(key_offset + Tq <= Tk && key_offset >= 0, "queries must be the last Tq positions of the keys");
  const bool padded = key_valid.numel() > 0;
  const int64_t saved_ks = save ? ks : 0;  // inference (save false): empty saved tensors
  auto out = at::empty_like(q);
  auto probs = at::empty({B, H, Tq, saved_ks}, q.options());
  auto dist = at::empty({B, H, Tq, saved_ks}, q.options());
  auto kept = at::empty({B, H, Tq, saved_ks}, q.options().dtype(at::kInt));
  const float *qp = q.data_ptr<float>(), *kp_ = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const std::vector<float> coef = head_coefficients(log_sigma, H);
  const float* cp = coef.data();
  const bool* valid = padded ? key_valid.data_ptr<bool>() : nullptr;
  float *op = out.data_ptr<float>(), *pp = probs.data_ptr<float>(), *dp = dist.data_ptr<float>();
  int32_t* kp = kept.data_ptr<int32_t>();
  const int64_t block = causal_block(window);
  const int64_t nblocks = (Tq + block - 1) / block;
  const int64_t ld = (std::min(block, Tq) + window - 1 + kLanes - 1) / kLanes * kLanes;

  at::parallel_for(0, B * Hkv * nblocks, grain_for(G * block * window * D), [&](int64_t begin, int64_t end) {
    RowGroupScratch sc(window);
    std::vector<float> kT(D * ld), ksq(ld + kLanes), row_probs(save ? 0 : ks);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t bk = tile / nblocks, blk = tile % nblocks, b = bk / Hkv, hkv = bk % Hkv;
      const int64_t i0 = blk * block, i1 = std::min(Tq, i0 + block);
      const int64_t span_lo = std::max<int64_t>(0, key_offset + i0 - window + 1), span_hi = key_offset + i1 - 1;
      const float *k_head = kp_ + bk * Tk * D, *v_head = vp + bk * Tk * D;
      const int64_t span = span_hi - span_lo + 1;
      at::vec::transpose_mxn<float>(k_head + span_lo * D, D, kT.data(), ld, span, D);
      tile_key_norms(kT.data(), ld, span, D, v_head + span_lo * D, ksq.data());
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hkv * G + g;
        for (int64_t r0 = i0; r0 < i1; r0 += kRowGroup) {
          const int64_t rows = std::min(kRowGroup, i1 - r0);
          for (int64_t r = 0; r < rows; ++r) {  // distances
            const int64_t i = r0 + r, row = (b * H + h) * Tq + i;
            const int64_t p = key_offset + i, lo = std::max<int64_t>(0, p - window + 1), n = p - lo + 1;
            const float* qi = qp + row * D;
            const float qsq = dot(qi, qi, D);
            float *dots = sc.dots(r), *dist_r = sc.dist(r);
            int32_t* key_r = sc.key(r);
            window_dots(qi, kT.data(), ld, lo - span_lo, n, D, dots);
            int64_t cnt = 0;
            bool finite = true;
            if (!padded) {  // every candidate counts: distances a vector at a time
              const Vec vq(qsq), two(2.f), zero(0.f);
              Vec worst(0.f);
              for (int64_t m = 0; m < n; m += kLanes) {
                const int64_t c = std::min<int64_t>(kLanes, n - m);
                const Vec dj = at::vec::maximum((vq + Vec::loadu(ksq.data() + lo - span_lo + m, c)) -
                                                two * Vec::loadu(dots + m, c), zero);  // NaN stays NaN
                dj.store(dist_r + m, c);
                worst = at::vec::maximum(worst, dj);
              }
              for (int64_t m = 0; m < n; ++m) key_r[m] = static_cast<int32_t>(lo + m);
              finite = hsum(worst * zero) == 0.f;  // 0 unless some distance is NaN or inf
              cnt = n;
            } else {
              for (int64_t m = 0; m < n; ++m) {
                const int64_t j = lo + m;
                if (!valid[b * Tk + j]) continue;
                const float dj = std::max((qsq + ksq[j - span_lo]) - 2.f * dots[m], 0.f);  // NaN stays NaN
                finite &= dj < kInf;
                dist_r[cnt] = dj;
                key_r[cnt++] = static_cast<int32_t>(j);
              }
            }
            sc.count[r] = finite ? cnt : -1;
          }
          for (int64_t r = 0; r < rows; ++r)  // selection
            if (sc.count[r] >= 0)
              sc.kept[r] = select_nearest(sc.dist(r), sc.key(r), sc.count[r], top_k, sc.tmp.data(), sc.kept_dist(r),
                                          sc.kept_key(r));
          for (int64_t r = 0; r < rows; ++r) {  // softmax and values
            const int64_t row = (b * H + h) * Tq + r0 + r;
            float* prow = save ? pp + row * ks : row_probs.data();
            float* drow = save ? dp + row * ks : nullptr;
            int32_t* krow = save ? kp + row * ks : nullptr;
            if (sc.count[r] < 0)
              nan_row(ks, D, op + row * D, prow, drow, krow);
            else
              softmax_gather(sc.kept_dist(r), sc.kept_key(r), sc.kept[r], ks, cp[h], v_head, D, op + row * D, prow,
                             drow, krow);
          }
        }
      }
    }
  });
  return {out, probs, dist, kept};
}

// The same over explicit candidate lists: query i sees keys cand_idx[cand_ptr[i]:cand_ptr[i+1]]
// (ascending). k (B,Hkv,N,D) row-major; no key padding.
std::vector<at::Tensor> listed_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& log_sigma, const at::Tensor& cand_ptr, const at::Tensor& cand_idx,
                                       int64_t top_k, int64_t ks) {
  check_f32(q, "q", 4), check_f32(k, "k", 4), check_f32(v, "v", 4);
  TORCH_CHECK(cand_ptr.scalar_type() == at::kLong && cand_idx.scalar_type() == at::kInt, "candidate lists: int64 / int32");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), G = H / Hkv;
  auto out = at::empty_like(q);
  auto probs = at::empty({B, H, Nq, ks}, q.options());
  auto dist = at::empty({B, H, Nq, ks}, q.options());
  auto kept = at::empty({B, H, Nq, ks}, q.options().dtype(at::kInt));
  auto key_sq = at::empty({B, Hkv, Nk}, q.options());
  const float *qp = q.data_ptr<float>(), *kp_ = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const std::vector<float> coef = head_coefficients(log_sigma, H);
  const float* cp = coef.data();
  const int64_t* ptr = cand_ptr.data_ptr<int64_t>();
  const int32_t* idx = cand_idx.data_ptr<int32_t>();
  float *op = out.data_ptr<float>(), *pp = probs.data_ptr<float>(), *dp = dist.data_ptr<float>();
  float* ksq = key_sq.data_ptr<float>();
  int32_t* kp = kept.data_ptr<int32_t>();
  int64_t widest = 0;
  for (int64_t i = 0; i < Nq; ++i) widest = std::max(widest, ptr[i + 1] - ptr[i]);

  at::parallel_for(0, B * Hkv * Nk, grain_for(2 * D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) ksq[r] = key_sq_norm(kp_ + r * D, vp + r * D, D);
  });
  const int64_t mean_width = std::max<int64_t>(1, ptr[Nq] / std::max<int64_t>(1, Nq));
  at::parallel_for(0, B * H * Nq, grain_for(mean_width * D), [&](int64_t begin, int64_t end) {
    Scratch sc(std::max<int64_t>(widest, 1));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / Nq, i = row % Nq, h = bh % H, hk = (bh / H) * Hkv + h / G;
      const float* qi = qp + row * D;
      const float* k_head = kp_ + hk * Nk * D;
      const float qsq = dot(qi, qi, D);
      int64_t cnt = 0;
      bool finite = true;
      for (int64_t e = ptr[i]; e < ptr[i + 1]; ++e) {
        const int32_t j = idx[e];
        const float dj = std::max((qsq + ksq[hk * Nk + j]) - 2.f * dot(qi, k_head + j * D, D), 0.f);
        finite &= dj < kInf;
        sc.dist[cnt] = dj;
        sc.key[cnt++] = j;
      }
      if (!finite) {
        nan_row(ks, D, op + row * D, pp + row * ks, dp + row * ks, kp + row * ks);
        continue;
      }
      const int64_t kk = select_nearest(sc.dist.data(), sc.key.data(), cnt, top_k, sc.tmp.data(),
                                        sc.kept_dist.data(), sc.kept_key.data());
      softmax_gather(sc.kept_dist.data(), sc.kept_key.data(), kk, ks, cp[h], vp + hk * Nk * D, D, op + row * D,
                     pp + row * ks, dp + row * ks, kp + row * ks);
    }
  });
  return {out, probs, dist, kept};
}

namespace {

struct BackwardArgs {
  const float *g, *q, *k, *v, *coef, *probs, *dist;
  const int32_t* kept;
  float *dq, *dk, *dv;
  int64_t H, Hkv, G, Nq, Nk, D, ks;
};

// One query row's share of the gradients, in one pass over its kept keys per P vectors of d
// from column x (q_i and g_i stay in registers, each k_j is loaded once):
//   dq_i  = sum_m w_m k_j + 2 rowsum q_i          (w_m = -2 ddist_m, rowsum = sum_m ddist_m)
//   dk_j += -w_m (k_j - q_i),   dv_j += p_m g_i
// P and kTail are compile-time so the vectors live in registers and the full columns use
// unmasked loads and stores; kTail (P = 1) is the last, partial vector of c lanes.
template <int P, bool kTail>
inline void row_grads_cols(const float* k_head, const int32_t* kk, const float* w, const float* p, int64_t n,
                           float rowsum, const float* qi, const float* go, float* dk_head, float* dv_head,
                           int64_t d, int64_t x, int64_t c, float* dqi) {
  static_assert(!kTail || P == 1, "a partial vector is handled alone");
  auto load = [c](const float* ptr) { return kTail ? Vec::loadu(ptr, c) : Vec::loadu(ptr); };
  auto store = [c](const Vec& v, float* ptr) { kTail ? v.store(ptr, c) : v.store(ptr); };
  const Vec two_rowsum(2.f * rowsum);
  Vec qv[P], gv[P], acc[P];
  for (int u = 0; u < P; ++u) {
    qv[u] = load(qi + x + u * kLanes);
    gv[u] = load(go + x + u * kLanes);
    acc[u] = two_rowsum * qv[u];
  }
  for (int64_t m = 0; m < n; ++m) {
    const int64_t j = kk[m];
    const float* kj = k_head + j * d + x;
    float *dk = dk_head + j * d + x, *dv = dv_head + j * d + x;
    const Vec wm(w[m]), am(-w[m]), pm(p[m]);
    for (int u = 0; u < P; ++u) {
      const int64_t o = u * kLanes;
      const Vec kv = load(kj + o);
      acc[u] = at::vec::fmadd(wm, kv, acc[u]);
      store(at::vec::fmadd(am, kv - qv[u], load(dk + o)), dk + o);
      store(at::vec::fmadd(pm, gv[u], load(dv + o)), dv + o);
    }
  }
  for (int u = 0; u < P; ++u) store(acc[u], dqi + x + u * kLanes);
}

inline void row_grads(const float* k_head, const int32_t* kk, const float* w, const float* p, int64_t n,
                      float rowsum, const float* qi, const float* go, float* dk_head, float* dv_head, int64_t d,
                      float* dqi) {
  int64_t x = 0;
  for (; x + 4 * kLanes <= d; x += 4 * kLanes)
    row_grads_cols<4, false>(k_head, kk, w, p, n, rowsum, qi, go, dk_head, dv_head, d, x, kLanes, dqi);
  for (; x + kLanes <= d; x += kLanes)
    row_grads_cols<1, false>(k_head, kk, w, p, n, rowsum, qi, go, dk_head, dv_head, d, x, kLanes, dqi);
  if (x < d) row_grads_cols<1, true>(k_head, kk, w, p, n, rowsum, qi, go, dk_head, dv_head, d, x, d - x, dqi);
}

#if defined(CPU_CAPABILITY_AVX512)
// Lane m of the result: the sum of v[m]'s lanes (sixteen horizontal sums in 45 instructions:
// pairs of vectors interleaved and added, then pairs of pairs, then the 128-bit quarters).
inline Vec hsum16(const __m512 (&v)[16]) {
  __m512 pair[8], quad[4], half[2];
  for (int i = 0; i < 8; ++i)  // per quarter: [a0+a2, b0+b2, a1+a3, b1+b3]
    pair[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per quarter, position p: a partial sum of v[4i + p]
    const __m512d c = _mm512_castps_pd(pair[2 * i]), d = _mm512_castps_pd(pair[2 * i + 1]);
    quad[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  for (int i = 0; i < 2; ++i)  // quarters 0+1 and 2+3 of quad[2i], then of quad[2i + 1]
    half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2 * i], quad[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_f32x4(quad[2 * i], quad[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(half[0], half[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(half[0], half[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

// out[m] = go . v_head[kk[m]] for m < n (rows of length d). With AVX-512, sixteen keys at a
// time: each key's products stay a vector, and one hsum16 finishes all sixteen.
inline void kept_dots(const float* go, const float* v_head, const int32_t* kk, int64_t n, int64_t d, float* out) {
  int64_t m = 0;
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kLanes == 16, "a group of keys is one vector of lanes");
  for (; m + kLanes <= n; m += kLanes) {
    __m512 acc[16];
    for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t x = 0; x < d; x += kLanes) {
      const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, d - x)) - 1);
      const __m512 gx = _mm512_maskz_loadu_ps(lanes, go + x);
      for (int u = 0; u < 16; ++u)
        acc[u] = _mm512_fmadd_ps(gx, _mm512_maskz_loadu_ps(lanes, v_head + static_cast<int64_t>(kk[m + u]) * d + x),
                                 acc[u]);
    }
    _mm512_storeu_ps(out + m, hsum16(acc));
  }
#endif
  for (; m < n; ++m) out[m] = dot(go, v_head + static_cast<int64_t>(kk[m]) * d, d);
}

// The backward of queries [i0, i1) of every head of key/value head (b, hkv): writes their dq
// rows, adds their dk/dv contributions into the rows of their kept keys, and returns
// -sum dlogit * dist per group head in dc[g].
void backward_rows(const BackwardArgs& a, int64_t b, int64_t hkv, int64_t i0, int64_t i1, double* dc, float* dl,
                   float* w) {
  const int64_t D = a.D, ks = a.ks, bk = b * a.Hkv + hkv;
  const float *k_head = a.k + bk * a.Nk * D, *v_head = a.v + bk * a.Nk * D;
  float *dk_head = a.dk + bk * a.Nk * D, *dv_head = a.dv + bk * a.Nk * D;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t h = hkv * a.G + g;
    const float c = a.coef[h];
    double acc = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = (b * a.H + h) * a.Nq + i;
      const float *go = a.g + row * D, *qi = a.q + row * D, *p = a.probs + row * ks, *dd = a.dist + row * ks;
      const int32_t* kk = a.kept + row * ks;
      float* dqi = a.dq + row * D;
      int64_t n = 0;
      while (n < ks && kk[n] >= 0) ++n;
      if (n == 0) {  // a row that kept nothing (padding, NaN) has dq 0
        std::fill(dqi, dqi + D, 0.f);
        continue;
      }
      kept_dots(go, v_head, kk, n, D, dl);
      Vec sv(0.f);
      for (int64_t m = 0; m < n; m += kLanes) {
        const int64_t lanes = std::min<int64_t>(kLanes, n - m);  // partial loads zero the other lanes
        sv = at::vec::fmadd(Vec::loadu(p + m, lanes), Vec::loadu(dl + m, lanes), sv);
      }
      const Vec vs(hsum(sv)), neg_c(-c), zero(0.f);
      Vec dc_row(0.f), rowsum_v(0.f);
      for (int64_t m = 0; m < n; m += kLanes) {
        const int64_t lanes = std::min<int64_t>(kLanes, n - m);
        const Vec dlogit = Vec::loadu(p + m, lanes) * (Vec::loadu(dl + m, lanes) - vs);
        const Vec dist_m = Vec::loadu(dd + m, lanes);
        dc_row = at::vec::fmadd(dlogit, dist_m, dc_row);
        const Vec ddist = Vec::blendv(zero, neg_c * dlogit, dist_m > zero);  // no gradient through the clamp
        rowsum_v = rowsum_v + ddist;
        (Vec(-2.f) * ddist).store(w + m, lanes);
      }
      acc -= static_cast<double>(hsum(dc_row));
      const float rowsum = hsum(rowsum_v);
      row_grads(k_head, kk, w, p, n, rowsum, qi, go, dk_head, dv_head, D, dqi);
    }
    dc[g] = acc;
  }
}

}  // namespace

// Backward of either forward from its saved rows. grad_out, q (B,H,Nq,D); k, v
// (B,Hkv,Nk,D); probs, dist (B,H,Nq,ks) fp32, kept int32. Returns dq, dk, dv and
// dcoef (B,H) (= -sum dlogit * dist per batch and head).
// window = 0 (candidate lists): one task per (batch, key/value head), owning its dk/dv.
// window > 0 (causal, end-aligned): tasks are (batch, key/value head, block of 4W queries).
// Block b's queries (positions offset + i) reach keys from offset + i0 - W + 1 to its last
// position: the dk/dv rows of its own positions (block 0: every row below too) and the W - 1
// rows below them, which block b - 1 owns. The even blocks run first, then the odd ones, so no
// two running tasks add to one row, and every row sums its terms in the same order whatever
// the thread count: a block zeroes the rows it writes first (its own and, if even, the W - 1
// below), an odd block all its own rows but the top W - 1, which its even successor zeroed.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& log_sigma, const at::Tensor& probs,
                                 const at::Tensor& dist, const at::Tensor& kept, int64_t window) {
  check_f32(grad_out, "grad_out", 4), check_f32(q, "q", 4), check_f32(k, "k", 4), check_f32(v, "v", 4);
  check_f32(probs, "probs", 4), check_f32(dist, "dist", 4);
  TORCH_CHECK(kept.scalar_type() == at::kInt && kept.is_contiguous(), "kept: contiguous int32");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), G = H / Hkv, ks = probs.size(3);
  TORCH_CHECK(window == 0 || Nq <= Nk, "causal backward: more queries than keys");
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  const std::vector<float> coef = head_coefficients(log_sigma, H);
  const BackwardArgs a{grad_out.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                       coef.data(), probs.data_ptr<float>(), dist.data_ptr<float>(),
                       kept.data_ptr<int32_t>(), dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
                       H, Hkv, G, Nq, Nk, D, ks};
  const int64_t block = window > 0 ? causal_block(window) : std::max<int64_t>(Nq, 1);  // >= W - 1
  const int64_t nblocks = std::max<int64_t>(1, (Nq + block - 1) / block);
  const int64_t offset = window > 0 ? Nk - Nq : 0, below = window > 0 ? window - 1 : 0;
  std::vector<double> dc(B * Hkv * nblocks * G);
  auto first_row = [&](int64_t blk) { return blk == 0 ? int64_t{0} : offset + blk * block; };
  auto end_row = [&](int64_t blk) { return blk == nblocks - 1 ? Nk : offset + (blk + 1) * block; };

  for (int64_t parity = 0; parity < std::min<int64_t>(2, nblocks); ++parity) {
    const int64_t per_head = (nblocks - parity + 1) / 2;  // blocks parity, parity + 2, ...
    at::parallel_for(0, B * Hkv * per_head, grain_for(G * std::min(block, Nq) * ks * D), [&](int64_t begin, int64_t end) {
      std::vector<float> dl(std::max<int64_t>(ks, 1)), w(std::max<int64_t>(ks, 1));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bk = t / per_head, blk = parity + 2 * (t % per_head);
        const int64_t own = first_row(blk), last = end_row(blk);
        const int64_t lo = parity == 0 ? std::max<int64_t>(0, own - below) : own;
        const int64_t hi = parity == 1 && blk + 1 < nblocks ? last - below : last;
        std::fill(a.dk + (bk * Nk + lo) * D, a.dk + (bk * Nk + hi) * D, 0.f);
        std::fill(a.dv + (bk * Nk + lo) * D, a.dv + (bk * Nk + hi) * D, 0.f);
        backward_rows(a, bk / Hkv, bk % Hkv, blk * block, std::min(Nq, (blk + 1) * block),
                      dc.data() + (bk * nblocks + blk) * G, dl.data(), w.data());
      }
    });
  }
  auto dcoef = at::empty({B, H}, q.options());
  float* dcp = dcoef.data_ptr<float>();
  for (int64_t bk = 0; bk < B * Hkv; ++bk)
    for (int64_t g = 0; g < G; ++g) {
      double total = 0.0;
      for (int64_t blk = 0; blk < nblocks; ++blk) total += dc[(bk * nblocks + blk) * G + g];
      dcp[(bk / Hkv) * H + (bk % Hkv) * G + g] = static_cast<float>(total);
    }
  return {dq, dk, dv, dcoef};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("causal_forward", &causal_forward, "Krause causal-window forward (CPU)");
  m.def("listed_forward", &listed_forward, "Krause forward over candidate lists (CPU)");
  m.def("backward", &backward, "Krause backward from the saved kept keys (CPU)");
}
