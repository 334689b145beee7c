// Autograd of torch.ops.ptv2_fast.prefix_attention_fwd, in C++: a torch::autograd::Function whose forward and
// backward call the forward and backward ops through the dispatcher (so fake tensors and torch.compile see
// the ops' fakes). On CPU tensors this is what makes a differentiable call cost what SDPA's does on the host:
// no Python autograd.Function node per layer. Registered for the Autograd key in registration.cpp.

#include "prefix_attention_api.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

namespace ptv2_fast {
namespace {

using OptTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                  const OptTensor&, const OptTensor&, const OptTensor&, bool, double,
                                                  double, int64_t, int64_t);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
    const at::Tensor&, bool, double, double, int64_t, int64_t);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ptv2_fast::prefix_attention_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ptv2_fast::prefix_attention_bwd", "").typed<BwdSig>();
  return op;
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

struct PrefixAttentionFn : public torch::autograd::Function<PrefixAttentionFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& pk, const at::Tensor& pv, const OptTensor& prefix_index,
                               const OptTensor& prefix_lens, const OptTensor& kv_lens, const OptTensor& kpm,
                               bool causal, double scale, double dropout_p, int64_t seed, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = fwd_op().call(q, k, v, pk, pv, prefix_index, prefix_lens, kv_lens, kpm, causal, scale,
                                    dropout_p, seed, offset);
    ctx->save_for_backward({q, k, v, pk, pv, out, lse, prefix_index.value_or(at::Tensor()),
                            prefix_lens.value_or(at::Tensor()), kv_lens.value_or(at::Tensor()),
                            kpm.value_or(at::Tensor())});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->set_materialize_grads(false);  // an unused lse must not cost a zero-filled gradient
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // With create_graph=True the gradients would silently lack a graph: refuse instead.
    TORCH_CHECK(!c10::GradMode::is_enabled(),
                "ptv2_fast.prefix_attention is differentiable once: backward with create_graph=True (double "
                "backward, gradient penalties) is not supported");
    const auto s = ctx->get_saved_variables();
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(s[5]);
    auto [dq, dk, dv, dpk, dpv] = bwd_op().call(
        dout, opt(grads[1]), s[0], s[1], s[2], s[3], s[4], opt(s[7]), opt(s[8]), opt(s[9]), opt(s[10]), s[5], s[6],
        ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toInt(), ctx->saved_data["offset"].toInt());
    return {dq, dk, dv, dpk, dpv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double dropout_p, int64_t seed,
    int64_t offset) {
  if (!c10::GradMode::is_enabled() || !(q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                                        prefix_k.requires_grad() || prefix_v.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;  // nothing to differentiate: no node, straight to the kernel
    return fwd_op().call(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal,
                         scale, dropout_p, seed, offset);
  }
  auto r = PrefixAttentionFn::apply(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                    key_padding_mask, causal, scale, dropout_p, seed, offset);
  return {r[0], r[1]};
}

}  // namespace ptv2_fast
