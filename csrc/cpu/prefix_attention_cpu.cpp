// Fused prefix attention on the CPU, forward and backward.
//
// Maths (per batch row b, query head h, kv head hk = h / (Hq / Hkv), task t = prefix_index[b]):
//   keys K' = [prefix_k[t, hk, :plen_t] ; k[b, hk]], values V' likewise (never materialised),
//   s = scale * q K'^T + mask,  out = softmax(s) V',  lse = log sum exp s.
// Forward: tiled online softmax in base 2 (tiles of BQ queries x BK keys; no [L, P + S] matrix exists).
// Backward (delta_i = dout_i . out_i - dlse_i, p = exp(s - lse), ds = p (dout V'^T - delta)):
//   phase 1, one task per (b, hk): dq over all keys and the sequence dk/dv of that row;
//   phase 2, one task per (t, hk, prefix key tile): the prefix dk/dv summed over the rows of task t,
//   so the bank gradient is reduced per task with no per-row buffer and in a fixed order (deterministic
//   for any thread count). Tasks run in parallel through at::parallel_for (OpenMP).
// All arithmetic is fp32; fp16/bf16 inputs are widened when a tile is loaded. Attention dropout comes from a
// counter-based hash (DropoutStream), replayed in backward.

#include "../prefix_attention_params.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace ptv2_fast {
namespace cpu {
namespace {

constexpr int64_t BQ = 32;  // query rows per tile
constexpr int64_t BK = 128;  // keys per tile; the transposed key tile has this fixed pitch
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Scratch memory that is written before it is read: no zero fill on allocation (at tiny shapes, filling
// fixed-size tiles cost more than the maths).
struct Scratch {
  std::unique_ptr<float[]> buf;
  explicit Scratch(int64_t n) : buf(new float[static_cast<size_t>(std::max<int64_t>(n, 1))]) {}
  float* data() { return buf.get(); }
  const float* data() const { return buf.get(); }
  float& operator[](int64_t i) { return buf[static_cast<size_t>(i)]; }
};

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return static_cast<float>(x); }
inline float widen(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T narrow(float x) { return static_cast<T>(x); }

inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return std::min(std::max(x, lo), hi); }

// max and sum over n (a multiple of 16) floats, in 16 lanes: an fp reduction in one accumulator would not
// vectorise without -ffast-math (reassociation).
// A NaN score may or may not survive this max (it does when a row is all NaN, e.g. a NaN query); where it does
// not, exp2 of the NaN score still makes the row's sum NaN. The caller turns a NaN max into a NaN row.
inline float max16(const float* __restrict x, int64_t n) {
  float lane[16];
  for (int w = 0; w < 16; ++w) lane[w] = x[w];
  for (int64_t j = 16; j < n; j += 16)
    for (int w = 0; w < 16; ++w) lane[w] = lane[w] > x[j + w] ? lane[w] : x[j + w];
  float m = lane[0];
  for (int w = 1; w < 16; ++w) m = m > lane[w] ? m : lane[w];
  return m;
}

inline float sum16(const float* __restrict x, int64_t n) {
  float lane[16] = {};
  for (int64_t j = 0; j < n; j += 16)
    for (int w = 0; w < 16; ++w) lane[w] += x[j + w];
  float s = 0.0f;
  for (int w = 0; w < 16; ++w) s += lane[w];
  return s;
}

// x <- 2^x over a block, written so that the compiler vectorises it (libm's exp2f is a scalar call):
// round to nearest with the 1.5 * 2^23 trick, 2^n from exponent bits, 2^f for |f| <= 1/2 from its Taylor
// series to degree 8 (truncation below 1e-9 relative). Inputs below -126 (including -inf) give 0.
inline void exp2_inplace(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float t = std::min(std::max(xi, -126.0f), 127.0f);
    const float r = (t + 12582912.0f) - 12582912.0f;
    const float f = (t - r) * LN2;
    const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 +
                    f * (1.0f / 720 + f * (1.0f / 5040 + f * (1.0f / 40320))))))));
    const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    x[i] = xi < -126.0f ? 0.0f : p * two_n;
  }
}

// dst[r, :D] = float(src[r * rs + c * cs]) for r < rows, dst[r, D:ld] = 0; dst pitch ld >= D.
template <typename T>
void load_rows(float* __restrict dst, int64_t ld, const T* src, int64_t rows, int64_t rs, int64_t cs, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    float* d = dst + r * ld;
    if (cs == 1) {
      for (int64_t c = 0; c < D; ++c) d[c] = widen(s[c]);
    } else {
      for (int64_t c = 0; c < D; ++c) d[c] = widen(s[c * cs]);
    }
    for (int64_t c = D; c < ld; ++c) d[c] = 0.0f;  // pad columns (the tiles' D is a multiple of 16)
  }
}

inline int64_t padded(int64_t D) { return (D + 15) / 16 * 16; }

// dst[r * rs + c * cs] = scale * src[r, c] for r < rows, c < D (src pitch ld; dst any strides).
template <typename T>
void store_rows(T* dst, int64_t rs, int64_t cs, const float* src, int64_t rows, int64_t D, int64_t ld, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * rs;
    if (cs == 1) {
      for (int64_t c = 0; c < D; ++c) d[c] = narrow<T>(src[r * ld + c] * scale);
    } else {
      for (int64_t c = 0; c < D; ++c) d[c * cs] = narrow<T>(src[r * ld + c] * scale);
    }
  }
}

// dst[r * rs + c * cs] += scale * src[r, c]: store_rows for a destination that already holds a partial sum.
template <typename T>
void add_rows(T* dst, int64_t rs, int64_t cs, const float* src, int64_t rows, int64_t D, int64_t ld, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * rs;
    for (int64_t c = 0; c < D; ++c) d[c * cs] = narrow<T>(widen(d[c * cs]) + src[r * ld + c] * scale);
  }
}

// kt[c, j] = k[j, c] for j < nk, 0 for the padded columns the products read (a padded key scores 0 and is
// masked after): up to width16(nk), or the whole tile past 96 keys, where gemm_a_bt uses the full width.
void transpose_tile(float* __restrict kt, const float* __restrict k, int64_t nk, int64_t D) {
  const int64_t w16 = (nk + 15) / 16 * 16;
  const int64_t nw = w16 > 96 ? BK : w16;  // gemm_a_bt runs 97..128 keys at the full tile width
  for (int64_t c = 0; c < D; ++c) {
    float* row = kt + c * BK;
    for (int64_t j = 0; j < nk; ++j) row[j] = k[j * D + c];
    for (int64_t j = nk; j < nw; ++j) row[j] = 0.0f;
  }
}

// The products below keep register tiles of MR rows x (BK or W columns) while they sweep the reduction
// axis, so each loaded row of the shared operand feeds MR independent FMA chains. W is a compile-time width
// dividing D (the tiles pad D to a multiple of 16). Rows past M (or keys past nk) are handled by a
// one-row remainder loop.
constexpr int MR = 4;

// s[m, 0:N] = alpha * a[m, :D] . bt[:D, 0:N]   (a pitch D, bt pitch BK, s pitch BK); N = the tile's key
// count rounded up to 16, so a short tile (a prefix of 32, a padded row's last keys) costs what it holds.
template <int R, int N>
inline void gemm_a_bt_rows(float* __restrict s, const float* __restrict a, const float* __restrict bt, int64_t D,
                           float alpha) {
  float acc[R][N] = {};
  for (int64_t c = 0; c < D; ++c) {
    const float* b = bt + c * BK;
    for (int r = 0; r < R; ++r) {
      const float x = a[r * D + c];
#pragma omp simd  // over the N key columns: without it GCC vectorises across c and shuffles every step
      for (int j = 0; j < N; ++j) acc[r][j] += x * b[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < N; ++j) s[r * BK + j] = alpha * acc[r][j];
}

template <int N>
void gemm_a_bt_n(float* s, const float* a, const float* bt, int64_t M, int64_t D, float alpha) {
  constexpr int R = N > 64 ? 2 : MR;  // R x N accumulators stay within the 32 vector registers
  int64_t m = 0;
  for (; m + R <= M; m += R) gemm_a_bt_rows<R, N>(s + m * BK, a + m * D, bt, D, alpha);
  for (; m < M; ++m) gemm_a_bt_rows<1, N>(s + m * BK, a + m * D, bt, D, alpha);
}

inline int64_t width16(int64_t nk) { return (nk + 15) / 16 * 16; }

void gemm_a_bt(float* s, const float* a, const float* bt, int64_t M, int64_t D, float alpha, int64_t nw) {
  switch (nw) {
    case 16: return gemm_a_bt_n<16>(s, a, bt, M, D, alpha);
    case 32: return gemm_a_bt_n<32>(s, a, bt, M, D, alpha);
    case 48: return gemm_a_bt_n<48>(s, a, bt, M, D, alpha);
    case 64: return gemm_a_bt_n<64>(s, a, bt, M, D, alpha);
    case 80: return gemm_a_bt_n<80>(s, a, bt, M, D, alpha);
    case 96: return gemm_a_bt_n<96>(s, a, bt, M, D, alpha);
    default: return gemm_a_bt_n<BK>(s, a, bt, M, D, alpha);
  }
}

// c[m, :D] += sum_j p[m, j] * x[j, :D] for j < nk   (p pitch BK, x and c pitch D)
template <int W, int R>
inline void gemm_p_x_rows(float* __restrict c, const float* __restrict p, const float* __restrict x, int64_t nk,
                          int64_t D) {
  for (int64_t d0 = 0; d0 < D; d0 += W) {
    float acc[R][W];
    for (int r = 0; r < R; ++r)
      for (int w = 0; w < W; ++w) acc[r][w] = c[r * D + d0 + w];
    for (int64_t j = 0; j < nk; ++j) {
      const float* xj = x + j * D + d0;
      for (int r = 0; r < R; ++r) {
        const float pj = p[r * BK + j];
        for (int w = 0; w < W; ++w) acc[r][w] += pj * xj[w];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int w = 0; w < W; ++w) c[r * D + d0 + w] = acc[r][w];
  }
}

template <int W>
void gemm_p_x_w(float* c, const float* p, const float* x, int64_t M, int64_t nk, int64_t D) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) gemm_p_x_rows<W, MR>(c + m * D, p + m * BK, x, nk, D);
  for (; m < M; ++m) gemm_p_x_rows<W, 1>(c + m * D, p + m * BK, x, nk, D);
}

// c[j, :D] += sum_m p[m, j] * x[m, :D] for j < nk   (p pitch BK, x and c pitch D)
template <int W, int R>
inline void gemm_pt_x_rows(float* __restrict c, const float* __restrict p, const float* __restrict x, int64_t M,
                           int64_t D) {
  for (int64_t d0 = 0; d0 < D; d0 += W) {
    float acc[R][W];
    for (int r = 0; r < R; ++r)
      for (int w = 0; w < W; ++w) acc[r][w] = c[r * D + d0 + w];
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * D + d0;
      for (int r = 0; r < R; ++r) {
        const float pmj = p[m * BK + r];
        if constexpr (W <= 16) {  // one vector: GCC's own choice (across m) shuffles; wider W vectorise well
#pragma omp simd
          for (int w = 0; w < W; ++w) acc[r][w] += pmj * xm[w];
        } else {
          for (int w = 0; w < W; ++w) acc[r][w] += pmj * xm[w];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int w = 0; w < W; ++w) c[r * D + d0 + w] = acc[r][w];
  }
}

template <int W>
void gemm_pt_x_w(float* c, const float* p, const float* x, int64_t M, int64_t nk, int64_t D) {
  int64_t j = 0;
  for (; j + MR <= nk; j += MR) gemm_pt_x_rows<W, MR>(c + j * D, p + j, x, M, D);
  for (; j < nk; ++j) gemm_pt_x_rows<W, 1>(c + j * D, p + j, x, M, D);
}

void gemm_p_x(float* c, const float* p, const float* x, int64_t M, int64_t nk, int64_t D) {
  if (D % 64 == 0) return gemm_p_x_w<64>(c, p, x, M, nk, D);
  if (D % 32 == 0) return gemm_p_x_w<32>(c, p, x, M, nk, D);
  gemm_p_x_w<16>(c, p, x, M, nk, D);
}

void gemm_pt_x(float* c, const float* p, const float* x, int64_t M, int64_t nk, int64_t D) {
  if (D % 64 == 0) return gemm_pt_x_w<64>(c, p, x, M, nk, D);
  if (D % 32 == 0) return gemm_pt_x_w<32>(c, p, x, M, nk, D);
  gemm_pt_x_w<16>(c, p, x, M, nk, D);
}

// Which keys of a tile a query sees. Prefix keys: j < plen. Sequence keys: j < kv_len, the padding mask,
// and (causal) j <= i + S - L.
struct TileMask {
  bool prefix;
  int64_t j0, nk;
  const bool* kpm;  // row b of the key padding mask (sequence tiles), or nullptr
  int64_t kpm_stride;
  bool causal;
  int64_t shift;  // S - L

  // Set s[r, j] = -inf where query i0 + r does not see key j0 + j; also the padded columns nk <= j < nw.
  void apply(float* s, int64_t i0, int64_t M, int64_t nw) const {
    for (int64_t r = 0; r < M; ++r) {
      float* sr = s + r * BK;
      int64_t vis_end = nk;  // visible columns are a prefix [0, vis_end) before the padding mask
      if (!prefix && causal) vis_end = clamp64(i0 + r + shift - j0 + 1, 0, nk);
      for (int64_t j = vis_end; j < nw; ++j) sr[j] = NEG_INF;
      if (!prefix && kpm != nullptr) {
        for (int64_t j = 0; j < vis_end; ++j)
          if (!kpm[(j0 + j) * kpm_stride]) sr[j] = NEG_INF;
      }
    }
  }
  // True when no query of rows [i0, i0 + M) sees any key of the tile (causal tiles past the diagonal).
  bool all_hidden(int64_t i0, int64_t M) const {
    return !prefix && causal && j0 > i0 + M - 1 + shift;
  }
  // The keys of the tile that rows [i0, i0 + M) can see at all: [0, used) (a causal tile on the diagonal
  // is cut at the last row's limit, so its hidden corner is never computed).
  int64_t used(int64_t i0, int64_t M) const {
    return (prefix || !causal) ? nk : clamp64(i0 + M - 1 + shift - j0 + 1, 0, nk);
  }
};

// Attention dropout: keep(b, h, i, col) is a pure function of (seed, offset, b * Hq + h, i, col), col being
// the column of the concatenated key axis (prefix columns 0..P-1, sequence columns P..P+S-1), so backward
// replays forward's mask without storing it. A keep has weight 1 / (1 - p). The hash is a 32-bit
// multiply-xorshift mixer (vectorisable); keep iff hash >= p * 2^32.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct DropoutStream {
  bool active = false;
  float inv_keep = 1.0f;
  uint32_t threshold = 0, base = 0;
  int64_t L = 0;

  DropoutStream(const PrefixAttentionFwdParams& p) : L(p.L) {
    active = p.dropout_p > 0.0f;
    if (!active) return;
    inv_keep = 1.0f / (1.0f - p.dropout_p);
    threshold = static_cast<uint32_t>(std::min(static_cast<double>(p.dropout_p) * 4294967296.0, 4294967295.0));
    base = mix32(static_cast<uint32_t>(p.seed) ^ mix32(static_cast<uint32_t>(p.seed >> 32) ^
                 mix32(static_cast<uint32_t>(p.offset) ^ mix32(static_cast<uint32_t>(p.offset >> 32)))));
  }
  uint32_t row_key(int64_t bh, int64_t i) const { return mix32(base ^ mix32(static_cast<uint32_t>(bh * L + i))); }
  // w[j] = weight of column col0 + j (1 / (1 - p) kept, 0 dropped), j < n
  void weights(float* __restrict w, uint32_t key, int64_t col0, int64_t n) const {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t h = mix32(key + static_cast<uint32_t>(col0 + j) * 0x9E3779B9U);
      w[j] = h >= threshold ? inv_keep : 0.0f;
    }
  }
};

struct RowInfo {
  int64_t task, plen, seq_end;
};

RowInfo row_info(const PrefixAttentionFwdParams& p, int64_t b) {
  RowInfo r;
  r.task = p.prefix_index ? clamp64(p.prefix_index[b], 0, p.T - 1) : 0;
  r.plen = p.prefix_lens ? clamp64(p.prefix_lens[r.task], 0, p.P) : p.P;
  r.seq_end = p.kv_lens ? clamp64(p.kv_lens[b], 0, p.S) : p.S;
  return r;
}

// Scratch of one key tile: rows, transpose, values, transposed values.
struct KeyTile {
  Scratch k, kt, v, vt;
  explicit KeyTile(int64_t D) : k(BK * D), kt(D * BK), v(BK * D), vt(D * BK) {}
};

template <typename T>
void load_key_tile(KeyTile& kt, const PrefixAttentionFwdParams& p, bool prefix, int64_t b_or_t, int64_t hk,
                   int64_t j0, int64_t nk, bool want_vt) {
  const int64_t D = p.D, Dp = padded(D);
  const T* kb = prefix ? static_cast<const T*>(p.pk) + b_or_t * p.pk_s[0] + hk * p.pk_s[1] + j0 * p.pk_s[2]
                       : static_cast<const T*>(p.k) + b_or_t * p.k_s[0] + hk * p.k_s[1] + j0 * p.k_s[2];
  const T* vb = prefix ? static_cast<const T*>(p.pv) + b_or_t * p.pv_s[0] + hk * p.pv_s[1] + j0 * p.pv_s[2]
                       : static_cast<const T*>(p.v) + b_or_t * p.v_s[0] + hk * p.v_s[1] + j0 * p.v_s[2];
  const int64_t* ks = prefix ? p.pk_s : p.k_s;
  const int64_t* vs = prefix ? p.pv_s : p.v_s;
  load_rows(kt.k.data(), Dp, kb, nk, ks[2], ks[3], D);
  load_rows(kt.v.data(), Dp, vb, nk, vs[2], vs[3], D);
  if (!prefix && p.kpm != nullptr) {
    // A hidden key's probability is 0, but 0 * NaN is NaN: a key the padding mask hides must not reach the
    // result through its (possibly NaN or inf) values, forward or backward.
    const bool* row = p.kpm + b_or_t * p.kpm_s[0];
    for (int64_t j = 0; j < nk; ++j)
      if (!row[(j0 + j) * p.kpm_s[1]]) {
        std::fill(kt.k.data() + j * Dp, kt.k.data() + (j + 1) * Dp, 0.0f);
        std::fill(kt.v.data() + j * Dp, kt.v.data() + (j + 1) * Dp, 0.0f);
      }
  }
  transpose_tile(kt.kt.data(), kt.k.data(), nk, Dp);
  if (want_vt) transpose_tile(kt.vt.data(), kt.v.data(), nk, Dp);
}

// ---------------------------------------------------------------------------------------------------------
// forward

// Merge mode: the online-softmax state of queries [c0, c0 + MC) of (b, h) after the sequence keys, from the
// sequence part's normalised output o and log-sum-exp: m = lse (base 2), l = 1, acc = o, which is exactly the
// state the sequence stage would leave (acc / l = o, m + log2 l = lse). Rows that see no sequence key (padding,
// or bottom-right causal before the first key) stay empty: vendor kernels write 0 (even lse = 0) or NaN there.
template <typename T>
void init_from_sequence_part(const PrefixAttentionFwdParams& p, const RowInfo& ri, int64_t b, int64_t h, int64_t c0,
                             int64_t MC, float* acc, float* m, float* l) {
  const int64_t Dp = padded(p.D);
  int64_t first = 0;  // the first sequence key the padding leaves visible
  if (p.kpm != nullptr) {
    const bool* row = p.kpm + b * p.kpm_s[0];
    while (first < ri.seq_end && !row[first * p.kpm_s[1]]) ++first;
  }
  const T* o = static_cast<const T*>(p.out) + b * p.out_s[0] + h * p.out_s[1];
  const float* lse = p.seq_lse + b * p.seq_lse_s[0] + h * p.seq_lse_s[1];
  for (int64_t r = 0; r < MC; ++r) {
    const int64_t i = c0 + r;
    const bool sees = first < ri.seq_end && (!p.causal || first <= i + p.S - p.L);
    if (!sees) continue;
    load_rows(acc + r * Dp, Dp, o + i * p.out_s[2], 1, 0, p.out_s[3], p.D);
    m[r] = lse[i * p.seq_lse_s[2]] * LOG2E;
    l[r] = 1.0f;
  }
}

// One task per (b, h, chunk of QC queries): each key tile is loaded (and widened, transposed) once per chunk
// and used by all of its BQ-row query tiles.
constexpr int64_t QC = 256;

template <typename T>
void forward_impl(const PrefixAttentionFwdParams& p) {
  const int64_t D = p.D, Dp = padded(D), G = p.Hq / p.Hkv, n_qc = (p.L + QC - 1) / QC;
  const float qk_scale = p.scale * LOG2E;  // scores in base 2
  const DropoutStream drop(p);
  const int64_t QCL = std::min(QC, p.L);  // scratch rows: a short query block needs no 256-row buffers
  at::parallel_for(0, p.B * p.Hq * n_qc, 1, [&](int64_t begin, int64_t end) {
    Scratch q(QCL * Dp), s(BQ * BK), acc(QCL * Dp), m(QCL), l(QCL);
    float w[BK];
    KeyTile tile(Dp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qc = task % n_qc, h = (task / n_qc) % p.Hq, b = task / (n_qc * p.Hq);
      const int64_t hk = h / G, c0 = qc * QC, MC = std::min(QC, p.L - c0);
      const RowInfo ri = row_info(p, b);
      load_rows(q.data(), Dp, static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1] + c0 * p.q_s[2], MC,
                p.q_s[2], p.q_s[3], D);
      std::fill(acc.data(), acc.data() + MC * Dp, 0.0f);
      std::fill(m.data(), m.data() + MC, NEG_INF);
      std::fill(l.data(), l.data() + MC, 0.0f);
      if (p.merge) init_from_sequence_part<T>(p, ri, b, h, c0, MC, acc.data(), m.data(), l.data());

      auto run_tile = [&](bool prefix, int64_t j0, int64_t nk) {
        TileMask mask{prefix, j0, nk, p.kpm ? p.kpm + b * p.kpm_s[0] : nullptr, p.kpm_s[1], p.causal, p.S - p.L};
        if (mask.all_hidden(c0, MC)) return;
        load_key_tile<T>(tile, p, prefix, prefix ? ri.task : b, hk, j0, nk, false);
        for (int64_t t0 = 0; t0 < MC; t0 += BQ) {
          const int64_t i0 = c0 + t0, M = std::min(BQ, MC - t0);
          if (mask.all_hidden(i0, M)) continue;
          float* acc_t = acc.data() + t0 * Dp;
          const int64_t nu = mask.used(i0, M), nw = width16(nu);
          gemm_a_bt(s.data(), q.data() + t0 * Dp, tile.kt.data(), M, Dp, qk_scale, nw);
          mask.apply(s.data(), i0, M, nw);
          for (int64_t r = 0; r < M; ++r) {
            float* sr = s.data() + r * BK;
            const float mx = max16(sr, nw);
            const float m_old = m[t0 + r], m_new = std::max(m_old, mx);
            // NaN in, NaN out (not a "fully masked" 0): a NaN max, or a -inf max hiding NaN scores (the compare in
            // max16 can drop a NaN); a NaN that max16 drops beside finite scores turns the sum NaN below.
            bool nan_row = std::isnan(mx) || std::isnan(m_old);
            if (!nan_row && m_new == NEG_INF)
              for (int64_t j = 0; j < nw; ++j) nan_row |= std::isnan(sr[j]);
            if (nan_row) {
              m[t0 + r] = l[t0 + r] = std::numeric_limits<float>::quiet_NaN();
              std::fill(sr, sr + nw, 0.0f);
              continue;
            }
            if (m_new == NEG_INF) {  // nothing visible yet: keep the state, contribute nothing
              std::fill(sr, sr + nw, 0.0f);
              continue;
            }
            for (int64_t j = 0; j < nw; ++j) sr[j] -= m_new;
            exp2_inplace(sr, nw);
            const float sum = sum16(sr, nw);  // the normaliser counts every key, dropped or not
            if (drop.active) {
              drop.weights(w, drop.row_key(b * p.Hq + h, i0 + r), prefix ? j0 : p.P + j0, nw);
              for (int64_t j = 0; j < nw; ++j) sr[j] *= w[j];
            }
            float alpha = m_old - m_new;
            exp2_inplace(&alpha, 1);
            l[t0 + r] = l[t0 + r] * alpha + sum;
            m[t0 + r] = m_new;
            if (alpha != 1.0f) {
              float* ar = acc_t + r * Dp;
              for (int64_t d = 0; d < Dp; ++d) ar[d] *= alpha;
            }
          }
          gemm_p_x(acc_t, s.data(), tile.v.data(), M, nu, Dp);
        }
      };
      for (int64_t j0 = 0; j0 < ri.plen; j0 += BK) run_tile(true, j0, std::min(BK, ri.plen - j0));
      if (!p.merge)
        for (int64_t j0 = 0; j0 < ri.seq_end; j0 += BK) run_tile(false, j0, std::min(BK, ri.seq_end - j0));

      T* out = static_cast<T*>(p.out) + b * p.out_s[0] + h * p.out_s[1] + c0 * p.out_s[2];
      float* lse = p.lse + (b * p.Hq + h) * p.L + c0;
      for (int64_t r = 0; r < MC; ++r) {
        const bool empty = l[r] == 0.0f;
        const float inv = empty ? 0.0f : 1.0f / l[r];
        store_rows(out + r * p.out_s[2], 0, p.out_s[3], acc.data() + r * Dp, 1, D, Dp, inv);
        lse[r] = empty ? NEG_INF : (m[r] + std::log2(l[r])) * LN2;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// backward

// The part of backward shared by both phases, for one tile of M queries against one key tile:
// probabilities pr = exp(s - lse) (0 where hidden) and ds = pr * (dout . v - delta), both [M, nw]
// (nw = the tile's key count rounded up to 16; pitch BK).
struct BwdTileMath {
  Scratch pr, ds;
  float w[BK];
  BwdTileMath() : pr(BQ * BK), ds(BQ * BK) {}

  // With dropout, pr leaves as the dropped probabilities (weights applied: dV's operand) and
  // ds = p * (dropped(dout . v) - delta). bh = b * Hq + h; col0 = the tile's first column of [prefix ; seq].
  void run(const float* q, const float* dout, const float* lse2, const float* delta, const KeyTile& kt,
           const TileMask& mask, int64_t i0, int64_t M, int64_t D, float qk_scale, const DropoutStream& drop,
           int64_t bh, int64_t col0) {
    const int64_t nw = width16(mask.used(i0, M));
    gemm_a_bt(pr.data(), q, kt.kt.data(), M, D, qk_scale, nw);  // D: the padded width
    mask.apply(pr.data(), i0, M, nw);
    for (int64_t r = 0; r < M; ++r) {
      float* pr_r = pr.data() + r * BK;
      if (lse2[r] == NEG_INF) {  // the row sees no key at all: no gradient through it
        std::fill(pr_r, pr_r + nw, 0.0f);
        continue;
      }
      if (std::isnan(lse2[r])) {  // a NaN row's gradient is NaN (exp2_inplace would clamp NaN to a number)
        std::fill(pr_r, pr_r + nw, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      for (int64_t j = 0; j < nw; ++j) pr_r[j] -= lse2[r];
      exp2_inplace(pr_r, nw);
    }
    gemm_a_bt(ds.data(), dout, kt.vt.data(), M, D, 1.0f, nw);
    for (int64_t r = 0; r < M; ++r) {
      float* dr = ds.data() + r * BK;
      float* pr_r = pr.data() + r * BK;
      if (drop.active) {
        drop.weights(w, drop.row_key(bh, i0 + r), col0, nw);
        for (int64_t j = 0; j < nw; ++j) {
          dr[j] = pr_r[j] * (dr[j] * w[j] - delta[r]);
          pr_r[j] *= w[j];
        }
      } else {
        for (int64_t j = 0; j < nw; ++j) dr[j] = pr_r[j] * (dr[j] - delta[r]);
      }
    }
  }
};

template <typename T>
void backward_impl(const PrefixAttentionBwdParams& p) {
  const int64_t D = p.D, Dp = padded(D), G = p.Hq / p.Hkv, L = p.L;
  const float qk_scale = p.scale * LOG2E;
  const DropoutStream drop(p);
  // delta and lse (base 2) of every query row, filled by phase 1 and read by phase 2.
  std::vector<float> delta_all(p.B * p.Hq * L), lse2_all(p.B * p.Hq * L);

  // Phase 1: one task per (b, hk): dq of the G query heads over all keys, and dk/dv of row b's sequence.
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    Scratch q(G * L * Dp), dout(G * L * Dp), dq(G * L * Dp), dk(BK * Dp), dv(BK * Dp), o(D);
    KeyTile tile(Dp);
    BwdTileMath math;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.Hkv, hk = task % p.Hkv;
      const RowInfo ri = row_info(p, b);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g, row0 = (b * p.Hq + h) * L;
        load_rows(q.data() + g * L * Dp, Dp, static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1], L,
                  p.q_s[2], p.q_s[3], D);
        load_rows(dout.data() + g * L * Dp, Dp, static_cast<const T*>(p.dout) + b * p.dout_s[0] + h * p.dout_s[1],
                  L, p.dout_s[2], p.dout_s[3], D);
        for (int64_t i = 0; i < L; ++i) {
          load_rows(o.data(), D, static_cast<const T*>(p.out) + b * p.out_s[0] + h * p.out_s[1] + i * p.out_s[2], 1,
                    0, p.out_s[3], D);
          const float* dor = dout.data() + (g * L + i) * Dp;
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += dor[d] * o[d];
          const float lse = p.lse[row0 + i];
          const bool empty = lse == NEG_INF;
          delta_all[row0 + i] = dot - (p.dlse != nullptr && !empty ? p.dlse[row0 + i] : 0.0f);
          lse2_all[row0 + i] = empty ? NEG_INF : lse * LOG2E;
        }
      }
      std::fill(dq.data(), dq.data() + G * L * Dp, 0.0f);

      auto run_tile = [&](bool prefix, int64_t j0, int64_t nk) {
        TileMask mask{prefix, j0, nk, p.kpm ? p.kpm + b * p.kpm_s[0] : nullptr, p.kpm_s[1], p.causal, p.S - L};
        load_key_tile<T>(tile, p, prefix, prefix ? ri.task : b, hk, j0, nk, true);
        if (!prefix) {
          std::fill(dk.data(), dk.data() + nk * Dp, 0.0f);
          std::fill(dv.data(), dv.data() + nk * Dp, 0.0f);
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row0 = (b * p.Hq + hk * G + g) * L;
          for (int64_t i0 = 0; i0 < L; i0 += BQ) {
            const int64_t M = std::min(BQ, L - i0);
            if (mask.all_hidden(i0, M)) continue;
            const float* qg = q.data() + (g * L + i0) * Dp;
            const float* dog = dout.data() + (g * L + i0) * Dp;
            math.run(qg, dog, lse2_all.data() + row0 + i0, delta_all.data() + row0 + i0, tile, mask, i0, M, Dp,
                     qk_scale, drop, b * p.Hq + hk * G + g, prefix ? j0 : p.P + j0);
            const int64_t nu = mask.used(i0, M);
            gemm_p_x(dq.data() + (g * L + i0) * Dp, math.ds.data(), tile.k.data(), M, nu, Dp);
            if (!prefix) {
              gemm_pt_x(dv.data(), math.pr.data(), dog, M, nu, Dp);
              gemm_pt_x(dk.data(), math.ds.data(), qg, M, nu, Dp);
            }
          }
        }
        if (!prefix) {
          T* dkb = static_cast<T*>(p.dk) + b * p.dk_s[0] + hk * p.dk_s[1] + j0 * p.dk_s[2];
          T* dvb = static_cast<T*>(p.dv) + b * p.dv_s[0] + hk * p.dv_s[1] + j0 * p.dv_s[2];
          store_rows(dkb, p.dk_s[2], p.dk_s[3], dk.data(), nk, D, Dp, p.scale);
          store_rows(dvb, p.dv_s[2], p.dv_s[3], dv.data(), nk, D, Dp, 1.0f);
        }
      };
      for (int64_t j0 = 0; j0 < ri.plen; j0 += BK) run_tile(true, j0, std::min(BK, ri.plen - j0));
      if (!p.merge)
        for (int64_t j0 = 0; j0 < ri.seq_end; j0 += BK) run_tile(false, j0, std::min(BK, ri.seq_end - j0));
      for (int64_t g = 0; g < G; ++g) {
        T* dqb = static_cast<T*>(p.dq) + b * p.dq_s[0] + (hk * G + g) * p.dq_s[1];
        if (p.merge)
          add_rows(dqb, p.dq_s[2], p.dq_s[3], dq.data() + g * L * Dp, L, D, Dp, p.scale);
        else
          store_rows(dqb, p.dq_s[2], p.dq_s[3], dq.data() + g * L * Dp, L, D, Dp, p.scale);
      }
    }
  });

  if (p.P == 0) return;
  // Phase 2: one task per (t, hk, prefix key tile), summing over the rows of task t in batch order.
  std::vector<std::vector<int64_t>> rows(p.T);
  for (int64_t b = 0; b < p.B; ++b) rows[row_info(p, b).task].push_back(b);
  const int64_t n_kt = (p.P + BK - 1) / BK;
  at::parallel_for(0, p.T * p.Hkv * n_kt, 1, [&](int64_t begin, int64_t end) {
    Scratch q(BQ * Dp), dout(BQ * Dp), dk(BK * Dp), dv(BK * Dp);
    KeyTile tile(Dp);
    BwdTileMath math;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kt = task % n_kt, hk = (task / n_kt) % p.Hkv, t = task / (n_kt * p.Hkv);
      const int64_t plen = p.prefix_lens ? clamp64(p.prefix_lens[t], 0, p.P) : p.P, j0 = kt * BK;
      if (rows[t].empty() || j0 >= plen) continue;  // unused rows and hidden columns keep their zeros
      const int64_t nk = std::min(BK, plen - j0);
      const TileMask mask{true, j0, nk, nullptr, 0, false, 0};
      load_key_tile<T>(tile, p, true, t, hk, j0, nk, true);
      std::fill(dk.data(), dk.data() + nk * Dp, 0.0f);
      std::fill(dv.data(), dv.data() + nk * Dp, 0.0f);
      for (int64_t b : rows[t]) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g, row0 = (b * p.Hq + h) * L;
          for (int64_t i0 = 0; i0 < L; i0 += BQ) {
            const int64_t M = std::min(BQ, L - i0);
            load_rows(q.data(), Dp, static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1] + i0 * p.q_s[2], M,
                      p.q_s[2], p.q_s[3], D);
            load_rows(dout.data(), Dp,
                      static_cast<const T*>(p.dout) + b * p.dout_s[0] + h * p.dout_s[1] + i0 * p.dout_s[2], M,
                      p.dout_s[2], p.dout_s[3], D);
            math.run(q.data(), dout.data(), lse2_all.data() + row0 + i0, delta_all.data() + row0 + i0, tile, mask,
                     i0, M, Dp, qk_scale, drop, b * p.Hq + h, j0);
            gemm_pt_x(dv.data(), math.pr.data(), dout.data(), M, nk, Dp);
            gemm_pt_x(dk.data(), math.ds.data(), q.data(), M, nk, Dp);
          }
        }
      }
      T* dkb = static_cast<T*>(p.dpk) + t * p.dpk_s[0] + hk * p.dpk_s[1] + j0 * p.dpk_s[2];
      T* dvb = static_cast<T*>(p.dpv) + t * p.dpv_s[0] + hk * p.dpv_s[1] + j0 * p.dpv_s[2];
      store_rows(dkb, p.dpk_s[2], p.dpk_s[3], dk.data(), nk, D, Dp, p.scale);
      store_rows(dvb, p.dpv_s[2], p.dpv_s[3], dv.data(), nk, D, Dp, 1.0f);
    }
  });
}

}  // namespace

void dropout_keep_mask_cpu(const PrefixAttentionFwdParams& p, bool* keep) {
  const DropoutStream drop(p);
  const int64_t N = p.P + p.S;
  std::vector<float> w(N);
  for (int64_t bh = 0; bh < p.B * p.Hq; ++bh)
    for (int64_t i = 0; i < p.L; ++i) {
      drop.weights(w.data(), drop.row_key(bh, i), 0, N);
      for (int64_t j = 0; j < N; ++j) keep[(bh * p.L + i) * N + j] = w[j] != 0.0f;
    }
}

void prefix_attention_fwd_cpu_float(const PrefixAttentionFwdParams& p) { forward_impl<float>(p); }
void prefix_attention_fwd_cpu_bf16(const PrefixAttentionFwdParams& p) { forward_impl<c10::BFloat16>(p); }
void prefix_attention_fwd_cpu_half(const PrefixAttentionFwdParams& p) { forward_impl<c10::Half>(p); }
void prefix_attention_bwd_cpu_float(const PrefixAttentionBwdParams& p) { backward_impl<float>(p); }
void prefix_attention_bwd_cpu_bf16(const PrefixAttentionBwdParams& p) { backward_impl<c10::BFloat16>(p); }
void prefix_attention_bwd_cpu_half(const PrefixAttentionBwdParams& p) { backward_impl<c10::Half>(p); }

}  // namespace cpu
}  // namespace ptv2_fast
