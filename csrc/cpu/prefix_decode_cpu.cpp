// Mixed-task decode on the CPU: the same split-KV schedule and exact merge as the CUDA kernel, one
// (b, query head, split) at a time, so the index maths of prefix_decode_params.h is exercised without a GPU.

#include "../prefix_decode_params.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ptv2_fast {
namespace cpu {
namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <typename T>
float f32(T x) { return static_cast<float>(x); }

template <typename T>
void decode_impl(const PrefixDecodeParams& p) {
  const int64_t D = p.D, G = p.Hq / p.Hkv, NS = p.num_splits;
  at::parallel_for(0, p.B * p.Hq * p.Lq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(D), acc(D), o_split(NS * D), lse_split(NS);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % p.Lq, h = (task / p.Lq) % p.Hq, b = task / (p.Lq * p.Hq), hk = h / G;
      const int64_t t = dec_task(p, b), plen = dec_plen(p, t), seqlen = dec_seqlen(p, b), n = plen + seqlen;
      const T* qp = static_cast<const T*>(p.q) + b * p.q_s[0] + h * p.q_s[1] + i * p.q_s[2];
      for (int64_t d = 0; d < D; ++d) q[d] = f32(qp[d * p.q_s[3]]) * p.scale;
      for (int64_t s = 0; s < NS; ++s) {
        int64_t x0, x1;
        dec_split_range(n, NS, s, &x0, &x1);
        float m = NEG_INF, l = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t x = x0; x < x1; ++x) {
          if (!dec_visible(x, plen, seqlen, p.Lq, i, p.causal)) continue;
          const T *kp, *vp;
          int64_t ksd, vsd;
          if (x < plen) {
            kp = static_cast<const T*>(p.pk) + t * p.pk_s[0] + hk * p.pk_s[1] + x * p.pk_s[2];
            vp = static_cast<const T*>(p.pv) + t * p.pv_s[0] + hk * p.pv_s[1] + x * p.pv_s[2];
            ksd = p.pk_s[3];
            vsd = p.pv_s[3];
          } else {
            kp = static_cast<const T*>(p.kc) + dec_cache_offset(p, p.kc_s, b, hk, x - plen);
            vp = static_cast<const T*>(p.vc) + dec_cache_offset(p, p.vc_s, b, hk, x - plen);
            ksd = p.kc_s[3];
            vsd = p.vc_s[3];
          }
          float sc = 0.0f;
          for (int64_t d = 0; d < D; ++d) sc += q[d] * f32(kp[d * ksd]);
          const float m_new = std::max(m, sc);
          const float alpha = std::exp(m - m_new), w = std::exp(sc - m_new);
          l = l * alpha + w;
          for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * alpha + w * f32(vp[d * vsd]);
          m = m_new;
        }
        for (int64_t d = 0; d < D; ++d) o_split[s * D + d] = l > 0.0f ? acc[d] / l : 0.0f;
        lse_split[s] = l > 0.0f ? m + std::log(l) : NEG_INF;
      }
      // exact merge of the splits (one split: a copy)
      float mx = NEG_INF;
      for (int64_t s = 0; s < NS; ++s) mx = std::max(mx, lse_split[s]);
      const int64_t row = (b * p.Hq + h) * p.Lq + i;
      T* out = static_cast<T*>(p.out) + row * D;
      if (mx == NEG_INF) {
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(0.0f);
        p.lse[row] = NEG_INF;
        continue;
      }
      float total = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < NS; ++s) {
        const float w = std::exp(lse_split[s] - mx);  // exp(-inf) = 0 for empty splits
        total += w;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * o_split[s * D + d];
      }
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] / total);
      p.lse[row] = mx + std::log(total);
    }
  });
}

}  // namespace

void prefix_decode_cpu_float(const PrefixDecodeParams& p) { decode_impl<float>(p); }
void prefix_decode_cpu_bf16(const PrefixDecodeParams& p) { decode_impl<c10::BFloat16>(p); }
void prefix_decode_cpu_half(const PrefixDecodeParams& p) { decode_impl<c10::Half>(p); }

}  // namespace cpu
}  // namespace ptv2_fast
