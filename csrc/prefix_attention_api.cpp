// Input checks, device guard, stream and output allocation for the kernels; nothing here computes.
// Every check names the argument; index and length values are range-checked on the CPU (no sync there),
// and the kernels clamp them anyway so that no input can read outside a tensor.

#include "prefix_attention_api.h"

#include "prefix_attention_params.h"
#include "prefix_decode_params.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <c10/core/DeviceGuard.h>

#ifdef PTV2_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace ptv2_fast {

namespace cpu {
void prefix_attention_fwd_cpu_float(const PrefixAttentionFwdParams& p);
void prefix_attention_fwd_cpu_bf16(const PrefixAttentionFwdParams& p);
void prefix_attention_fwd_cpu_half(const PrefixAttentionFwdParams& p);
void prefix_attention_bwd_cpu_float(const PrefixAttentionBwdParams& p);
void prefix_attention_bwd_cpu_bf16(const PrefixAttentionBwdParams& p);
void prefix_attention_bwd_cpu_half(const PrefixAttentionBwdParams& p);
void dropout_keep_mask_cpu(const PrefixAttentionFwdParams& p, bool* keep);
void prefix_decode_cpu_float(const PrefixDecodeParams& p);
void prefix_decode_cpu_bf16(const PrefixDecodeParams& p);
void prefix_decode_cpu_half(const PrefixDecodeParams& p);
}  // namespace cpu

#ifdef PTV2_FAST_WITH_CUDA
namespace cuda {
cudaError_t prefix_decode_cuda(const PrefixDecodeParams& p, int dtype, cudaStream_t stream);
}
#endif

namespace {

constexpr int64_t kMinHeadDim = 16, kMaxHeadDim = 256, kMaxDecodeQueries = 16;

void copy_strides(int64_t* dst, const at::Tensor& t) {
  for (int64_t i = 0; i < t.dim(); ++i) dst[i] = t.stride(i);
}

void check_q_dtype(const char* op, const at::Tensor& q, const char* hint) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt, hint);
}

void check_float_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

// An optional int32/int64 vector of length n, returned as contiguous int64 on q's device (or undefined).
at::Tensor int_vector(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t n,
                      const char* n_name, const at::Tensor& q) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const at::Tensor& x = *t;
  TORCH_CHECK(x.scalar_type() == at::kInt || x.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, op, ": ", name, " must have shape [", n_name, "] = [", n, "], got ",
              x.sizes());
  TORCH_CHECK(x.device() == q.device(), op, ": ", name, " is on ", x.device(), " but q is on ", q.device());
  return x.to(at::kLong).contiguous();
}

// On the CPU a range check costs nothing: do it. On CUDA it would sync; the kernels clamp instead.
void check_range(const char* op, const char* name, const at::Tensor& x, int64_t lo, int64_t hi) {
  if (!x.defined() || !x.device().is_cpu() || x.numel() == 0) return;
  const int64_t* d = x.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < x.numel(); ++i)
    TORCH_CHECK(d[i] >= lo && d[i] <= hi, op, ": ", name, " has value ", d[i], " at position ", i,
                ", outside [", lo, ", ", hi, "]");
}

const int64_t* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }

struct AttnInputs {
  at::Tensor prefix_index, prefix_lens, kv_lens, kpm;
};

AttnInputs check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& pk, const at::Tensor& pv, const std::optional<at::Tensor>& prefix_index,
                           const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& kv_lens,
                           const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, Hq, L, D], got shape ", q.sizes());
  TORCH_CHECK(q.device().is_cpu(), op, ": this implementation runs on CPU tensors, q is on ", q.device());
  check_q_dtype(op, q, " (float64: use backend='reference')");
  check_float_tensor(op, "k", k, 4, q);
  check_float_tensor(op, "v", v, 4, q);
  check_float_tensor(op, "prefix_k", pk, 4, q);
  check_float_tensor(op, "prefix_v", pv, 4, q);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t T = pk.size(0), P = pk.size(2);
  TORCH_CHECK(D >= kMinHeadDim && D <= kMaxHeadDim, op, ": head dim D=", D, " must be in [", kMinHeadDim, ", ",
              kMaxHeadDim, "]");
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, op, ": k must be [B, Hkv, S, D] with B=", B, ", D=", D, ", got ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v has shape ", v.sizes(), " but k has ", k.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": q has ", Hq, " heads, not a multiple of the ", Hkv, " heads of k");
  TORCH_CHECK(T >= 1 && pk.size(1) == Hkv && pk.size(3) == D, op, ": prefix_k must be [T, Hkv, P, D] with T >= 1, "
              "Hkv=", Hkv, ", D=", D, ", got ", pk.sizes());
  TORCH_CHECK(pv.sizes() == pk.sizes(), op, ": prefix_v has shape ", pv.sizes(), " but prefix_k has ", pk.sizes());
  AttnInputs in;
  in.prefix_index = int_vector(op, "prefix_index", prefix_index, B, "B", q);
  TORCH_CHECK(in.prefix_index.defined() || T == 1, op, ": prefix_index is None but the bank has T=", T, " rows");
  in.prefix_lens = int_vector(op, "prefix_lens", prefix_lens, T, "T", q);
  in.kv_lens = int_vector(op, "kv_lens", kv_lens, B, "B", q);
  check_range(op, "prefix_index", in.prefix_index, 0, T - 1);
  check_range(op, "prefix_lens", in.prefix_lens, 0, P);
  check_range(op, "kv_lens", in.kv_lens, 0, S);
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(!in.kv_lens.defined(), op, ": pass either kv_lens or key_padding_mask, not both");
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool (True = attend), got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == S, op, ": key_padding_mask must be [B, S] = [", B,
                ", ", S, "], got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), op, ": key_padding_mask is on ", m.device(), " but q is on ", q.device());
    in.kpm = m;
  }
  return in;
}

void fill_common(PrefixAttentionFwdParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& pk, const at::Tensor& pv, const AttnInputs& in, bool causal, double scale) {
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.L = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.S = k.size(2);
  p.T = pk.size(0);
  p.P = pk.size(2);
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.pk = pk.const_data_ptr();
  p.pv = pv.const_data_ptr();
  copy_strides(p.q_s, q);
  copy_strides(p.k_s, k);
  copy_strides(p.v_s, v);
  copy_strides(p.pk_s, pk);
  copy_strides(p.pv_s, pv);
  p.prefix_index = ptr_or_null(in.prefix_index);
  p.prefix_lens = ptr_or_null(in.prefix_lens);
  p.kv_lens = ptr_or_null(in.kv_lens);
  p.kpm = in.kpm.defined() ? in.kpm.const_data_ptr<bool>() : nullptr;
  p.kpm_s[0] = in.kpm.defined() ? in.kpm.stride(0) : 0;
  p.kpm_s[1] = in.kpm.defined() ? in.kpm.stride(1) : 0;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
}

void check_scale(const char* op, double scale) {
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), op, ": scale must be positive and finite, got ", scale);
}

void set_dropout(const char* op, PrefixAttentionFwdParams& p, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double dropout_p, int64_t seed,
    int64_t offset) {
  const char* op = "ptv2_fast.prefix_attention_fwd";
  check_scale(op, scale);
  const AttnInputs in = check_attention(op, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                        key_padding_mask);
  at::Tensor out = at::empty_like(q);  // q's layout where q is dense (the op's layout contract)
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  PrefixAttentionFwdParams p{};
  fill_common(p, q, k, v, prefix_k, prefix_v, in, causal, scale);
  set_dropout(op, p, dropout_p, seed, offset);
  p.out = out.data_ptr();
  copy_strides(p.out_s, out);
  p.lse = lse.data_ptr<float>();
  switch (q.scalar_type()) {
    case at::kFloat: cpu::prefix_attention_fwd_cpu_float(p); break;
    case at::kBFloat16: cpu::prefix_attention_fwd_cpu_bf16(p); break;
    default: cpu::prefix_attention_fwd_cpu_half(p); break;
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& prefix_lens,
    const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, double dropout_p, int64_t seed,
    int64_t offset) {
  const char* op = "ptv2_fast.prefix_attention_bwd";
  check_scale(op, scale);
  const AttnInputs in = check_attention(op, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                        key_padding_mask);
  check_float_tensor(op, "dout", dout, 4, q);
  check_float_tensor(op, "out", out, 4, q);
  TORCH_CHECK(dout.sizes() == q.sizes(), op, ": dout has shape ", dout.sizes(), " but q has ", q.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out has shape ", out.sizes(), " but q has ", q.sizes());
  const std::vector<int64_t> row_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(row_shape) && lse.device() == q.device(), op,
              ": lse must be [B, Hq, L] on q's device, got ", lse.sizes(), " on ", lse.device());
  const at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  at::Tensor dlse_f;
  if (dlse.has_value() && dlse->defined()) {
    TORCH_CHECK(dlse->sizes() == at::IntArrayRef(row_shape) && dlse->device() == q.device(), op,
                ": dlse must be [B, Hq, L] on q's device, got ", dlse->sizes(), " on ", dlse->device());
    dlse_f = dlse->to(at::kFloat).contiguous();
  }
  // each gradient laid out like its input (empty_like: a dense input's strides are kept)
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::zeros_like(k);  // keys no query sees keep a zero gradient
  at::Tensor dv = at::zeros_like(v);
  at::Tensor dpk = at::zeros_like(prefix_k);  // unused bank rows keep a zero gradient
  at::Tensor dpv = at::zeros_like(prefix_v);
  PrefixAttentionBwdParams p{};
  fill_common(p, q, k, v, prefix_k, prefix_v, in, causal, scale);
  set_dropout(op, p, dropout_p, seed, offset);
  p.out = const_cast<void*>(out.const_data_ptr());
  copy_strides(p.out_s, out);
  p.lse = const_cast<float*>(lse_f.const_data_ptr<float>());
  p.dout = dout.const_data_ptr();
  copy_strides(p.dout_s, dout);
  p.dlse = dlse_f.defined() ? dlse_f.const_data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dpk = dpk.data_ptr();
  p.dpv = dpv.data_ptr();
  copy_strides(p.dq_s, dq);
  copy_strides(p.dk_s, dk);
  copy_strides(p.dv_s, dv);
  copy_strides(p.dpk_s, dpk);
  copy_strides(p.dpv_s, dpv);
  switch (q.scalar_type()) {
    case at::kFloat: cpu::prefix_attention_bwd_cpu_float(p); break;
    case at::kBFloat16: cpu::prefix_attention_bwd_cpu_bf16(p); break;
    default: cpu::prefix_attention_bwd_cpu_half(p); break;
  }
  return {dq, dk, dv, dpk, dpv};
}

at::Tensor prefix_attention_merge_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, at::Tensor& out,
    const at::Tensor& seq_lse) {
  const char* op = "ptv2_fast.prefix_attention_merge_fwd";
  check_scale(op, scale);
  const AttnInputs in = check_attention(op, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                        key_padding_mask);
  check_float_tensor(op, "out", out, 4, q);
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out has shape ", out.sizes(), " but q has ", q.sizes());
  const std::vector<int64_t> row_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(seq_lse.sizes() == at::IntArrayRef(row_shape) && seq_lse.scalar_type() == at::kFloat &&
              seq_lse.device() == q.device(), op, ": seq_lse must be float32 [B, Hq, L] on q's device, got ",
              seq_lse.scalar_type(), " ", seq_lse.sizes(), " on ", seq_lse.device());
  at::Tensor lse = at::empty(row_shape, q.options().dtype(at::kFloat));
  PrefixAttentionFwdParams p{};
  fill_common(p, q, k, v, prefix_k, prefix_v, in, causal, scale);
  p.out = out.data_ptr();
  copy_strides(p.out_s, out);
  p.lse = lse.data_ptr<float>();
  p.merge = true;
  p.seq_lse = seq_lse.const_data_ptr<float>();
  copy_strides(p.seq_lse_s, seq_lse);
  switch (q.scalar_type()) {
    case at::kFloat: cpu::prefix_attention_fwd_cpu_float(p); break;
    case at::kBFloat16: cpu::prefix_attention_fwd_cpu_bf16(p); break;
    default: cpu::prefix_attention_fwd_cpu_half(p); break;
  }
  return lse;
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_merge_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const at::Tensor& out, const at::Tensor& lse, double scale,
    at::Tensor& dq) {
  const char* op = "ptv2_fast.prefix_attention_merge_bwd";
  check_scale(op, scale);
  const AttnInputs in = check_attention(op, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, std::nullopt,
                                        std::nullopt);
  check_float_tensor(op, "dout", dout, 4, q);
  check_float_tensor(op, "out", out, 4, q);
  check_float_tensor(op, "dq", dq, 4, q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dq.sizes() == q.sizes(), op,
              ": dout, out and dq must have q's shape ", q.sizes());
  const std::vector<int64_t> row_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(row_shape) && lse.device() == q.device(), op,
              ": lse must be [B, Hq, L] on q's device, got ", lse.sizes(), " on ", lse.device());
  const at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  at::Tensor dpk = at::zeros_like(prefix_k);  // unused bank rows keep a zero gradient
  at::Tensor dpv = at::zeros_like(prefix_v);
  PrefixAttentionBwdParams p{};
  fill_common(p, q, k, v, prefix_k, prefix_v, in, false, scale);
  p.merge = true;  // prefix keys only; dq accumulates
  p.out = const_cast<void*>(out.const_data_ptr());
  copy_strides(p.out_s, out);
  p.lse = const_cast<float*>(lse_f.const_data_ptr<float>());
  p.dout = dout.const_data_ptr();
  copy_strides(p.dout_s, dout);
  p.dq = dq.data_ptr();
  copy_strides(p.dq_s, dq);
  p.dpk = dpk.data_ptr();
  p.dpv = dpv.data_ptr();
  copy_strides(p.dpk_s, dpk);
  copy_strides(p.dpv_s, dpv);
  switch (q.scalar_type()) {
    case at::kFloat: cpu::prefix_attention_bwd_cpu_float(p); break;
    case at::kBFloat16: cpu::prefix_attention_bwd_cpu_bf16(p); break;
    default: cpu::prefix_attention_bwd_cpu_half(p); break;
  }
  return {dpk, dpv};
}

std::tuple<at::Tensor, at::Tensor> prefix_decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& page_table, bool causal,
    double scale, int64_t num_splits) {
  const char* op = "ptv2_fast.prefix_decode_attention";
  check_scale(op, scale);
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, Hq, Lq, D], got shape ", q.sizes());
  check_q_dtype(op, q, "");
  const auto dt = q.scalar_type();
  check_float_tensor(op, "k_cache", k_cache, 4, q);
  check_float_tensor(op, "v_cache", v_cache, 4, q);
  check_float_tensor(op, "prefix_k", prefix_k, 4, q);
  check_float_tensor(op, "prefix_v", prefix_v, 4, q);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3), Hkv = k_cache.size(1);
  const int64_t T = prefix_k.size(0), P = prefix_k.size(2);
  const bool on_cuda = q.is_cuda();
  TORCH_CHECK(Lq >= 1 && Lq <= kMaxDecodeQueries, op, ": q must hold 1 to ", kMaxDecodeQueries,
              " new tokens per row, got Lq=", Lq);
  if (on_cuda) {
    TORCH_CHECK(D == 64 || D == 128, op, ": the CUDA kernel supports head dims 64 and 128, got D=", D);
  } else {
    TORCH_CHECK(D >= kMinHeadDim && D <= kMaxHeadDim, op, ": head dim D=", D, " must be in [", kMinHeadDim, ", ",
                kMaxHeadDim, "]");
  }
  TORCH_CHECK(k_cache.size(3) == D, op, ": k_cache has head dim ", k_cache.size(3), " but q has ", D);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache has shape ", v_cache.sizes(), " but k_cache has ",
              k_cache.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": q has ", Hq, " heads, not a multiple of the ", Hkv,
              " heads of k_cache");
  TORCH_CHECK(T >= 1 && prefix_k.size(1) == Hkv && prefix_k.size(3) == D, op,
              ": prefix_k must be [T, Hkv, P, D] with T >= 1, Hkv=", Hkv, ", D=", D, ", got ", prefix_k.sizes());
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), op, ": prefix_v has shape ", prefix_v.sizes(),
              " but prefix_k has ", prefix_k.sizes());
  TORCH_CHECK(num_splits >= 0 && num_splits <= 256, op, ": num_splits must be in [0, 256] (0: automatic), got ",
              num_splits);

  PrefixDecodeParams p{};
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.D = D; p.T = T; p.P = P;
  at::Tensor pt;
  if (page_table.has_value() && page_table->defined()) {
    pt = *page_table;
    TORCH_CHECK(pt.scalar_type() == at::kInt, op, ": page_table must be int32, got ", pt.scalar_type());
    TORCH_CHECK(pt.dim() == 2 && pt.size(0) == B && pt.size(1) >= 1, op,
                ": page_table must be [B, max_pages] = [", B, ", >=1], got ", pt.sizes());
    TORCH_CHECK(pt.device() == q.device(), op, ": page_table is on ", pt.device(), " but q is on ", q.device());
    pt = pt.contiguous();
    p.page_size = k_cache.size(2);
    p.num_pages = k_cache.size(0);
    TORCH_CHECK(p.num_pages >= 1 && p.page_size >= 1, op, ": a paged k_cache must be [num_pages, Hkv, page_size, D] "
                "with at least one page, got ", k_cache.sizes());
    p.page_table = pt.const_data_ptr<int32_t>();
    p.page_table_stride = pt.stride(0);
    p.s_max = pt.size(1) * p.page_size;
    if (pt.device().is_cpu()) {
      const int32_t* d = p.page_table;
      for (int64_t i = 0; i < pt.numel(); ++i)
        TORCH_CHECK(d[i] >= 0 && d[i] < p.num_pages, op, ": page_table has value ", d[i], ", outside [0, ",
                    p.num_pages, ")");
    }
  } else {
    TORCH_CHECK(k_cache.size(0) == B, op, ": k_cache must be [B, Hkv, S_max, D] with B=", B, " (or pass page_table "
                "for a paged cache), got ", k_cache.sizes());
    p.s_max = k_cache.size(2);
  }
  const at::Tensor seqlens = int_vector(op, "cache_seqlens", cache_seqlens, B, "B", q);
  TORCH_CHECK(seqlens.defined(), op, ": cache_seqlens is required");
  const at::Tensor idx = int_vector(op, "prefix_index", prefix_index, B, "B", q);
  TORCH_CHECK(idx.defined() || T == 1, op, ": prefix_index is None but the bank has T=", T, " rows");
  const at::Tensor plens = int_vector(op, "prefix_lens", prefix_lens, T, "T", q);
  check_range(op, "cache_seqlens", seqlens, 0, p.s_max);
  check_range(op, "prefix_index", idx, 0, T - 1);
  check_range(op, "prefix_lens", plens, 0, P);

  if (q.numel() == 0) {  // nothing to attend: no launch (a zero-sized grid is an invalid configuration)
    return {at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous)),
            at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat))};
  }
  if (num_splits == 0) {  // enough blocks to fill the device, each over at least 256 virtual keys
    num_splits = 1;
#ifdef PTV2_FAST_WITH_CUDA
    if (on_cuda) {
      const int64_t sms = at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount;
      const int64_t blocks = B * Hkv * ((Hq / Hkv * Lq + 15) / 16);
      const int64_t by_work = std::max<int64_t>(1, (P + p.s_max) / 256);
      num_splits = std::max<int64_t>(1, std::min<int64_t>({(2 * sms + blocks - 1) / blocks, by_work, 64}));
    }
#endif
  }
  p.num_splits = num_splits;
  const c10::DeviceGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  at::Tensor o_part, lse_part;
  p.q = q.const_data_ptr();
  copy_strides(p.q_s, q);
  p.kc = k_cache.const_data_ptr();
  copy_strides(p.kc_s, k_cache);
  p.vc = v_cache.const_data_ptr();
  copy_strides(p.vc_s, v_cache);
  p.cache_seqlens = seqlens.const_data_ptr<int64_t>();
  p.pk = prefix_k.const_data_ptr();
  copy_strides(p.pk_s, prefix_k);
  p.pv = prefix_v.const_data_ptr();
  copy_strides(p.pv_s, prefix_v);
  p.prefix_index = ptr_or_null(idx);
  p.prefix_lens = ptr_or_null(plens);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();

  if (!on_cuda) {
    TORCH_CHECK(q.device().is_cpu(), op, ": unsupported device ", q.device());
    switch (dt) {
      case at::kFloat: cpu::prefix_decode_cpu_float(p); break;
      case at::kBFloat16: cpu::prefix_decode_cpu_bf16(p); break;
      default: cpu::prefix_decode_cpu_half(p); break;
    }
    return {out, lse};
  }
#ifdef PTV2_FAST_WITH_CUDA
  TORCH_CHECK(B <= 65535 && Hkv * ((Hq / Hkv * Lq + 15) / 16) <= 65535 && B * Hq * Lq <= INT32_MAX, op,
              ": batch or head count too large for one CUDA launch (B <= 65535)");
  if (num_splits > 1) {
    o_part = at::empty({num_splits, B, Hq, Lq, D}, q.options().dtype(at::kFloat));
    lse_part = at::empty({num_splits, B, Hq, Lq}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  const int code = dt == at::kFloat ? 0 : (dt == at::kHalf ? 1 : 2);
  const cudaError_t err = cuda::prefix_decode_cuda(p, code, at::cuda::getCurrentCUDAStream(q.device().index()));
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {out, lse};
#else
  TORCH_CHECK(false, op, ": this build of the extension has no CUDA kernels (torch without CUDA, or no nvcc)");
#endif
}

at::Tensor dropout_keep_mask_cpu(int64_t B, int64_t Hq, int64_t L, int64_t S, int64_t P, double dropout_p,
                                 int64_t seed, int64_t offset) {
  const char* op = "ptv2_fast.dropout_keep_mask";
  TORCH_CHECK(B >= 0 && Hq >= 0 && L >= 0 && S >= 0 && P >= 0, op, ": sizes must be non-negative");
  PrefixAttentionFwdParams p{};
  p.B = B;
  p.Hq = Hq;
  p.L = L;
  p.S = S;
  p.P = P;
  set_dropout(op, p, dropout_p, seed, offset);
  at::Tensor keep = at::empty({B, Hq, L, P + S}, at::TensorOptions().dtype(at::kBool));
  cpu::dropout_keep_mask_cpu(p, keep.data_ptr<bool>());
  return keep;
}

std::string build_info() {
#ifdef PTV2_FAST_WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

}  // namespace ptv2_fast
