// The one registration file: schemas of torch.ops.ptv2_fast.* and their CPU / CUDA implementations.
// Fake (meta) implementations are registered from Python (ptv2_fast/_ext.py) so torch.compile can trace.

#include "prefix_attention_api.h"

#include <torch/library.h>

TORCH_LIBRARY(ptv2_fast, m) {
  m.def("prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor? prefix_index, Tensor? prefix_lens, Tensor? kv_lens, Tensor? key_padding_mask, bool causal, "
        "float scale, float dropout_p=0., int seed=0, int offset=0) -> (Tensor out, Tensor lse)");
  m.def("prefix_attention_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor prefix_k, "
        "Tensor prefix_v, Tensor? prefix_index, Tensor? prefix_lens, Tensor? kv_lens, Tensor? key_padding_mask, "
        "Tensor out, Tensor lse, bool causal, float scale, float dropout_p=0., int seed=0, int offset=0) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, Tensor dprefix_v)");
  m.def("prefix_attention_merge_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor? prefix_index, Tensor? prefix_lens, Tensor? kv_lens, Tensor? key_padding_mask, bool causal, "
        "float scale, Tensor(a!) out, Tensor seq_lse) -> Tensor lse");
  m.def("prefix_attention_merge_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
        "Tensor? prefix_index, Tensor? prefix_lens, Tensor out, Tensor lse, float scale, Tensor(a!) dq) "
        "-> (Tensor dprefix_k, Tensor dprefix_v)");
  m.def("prefix_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
        "Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, Tensor? prefix_lens, Tensor? page_table, "
        "bool causal, float scale, int num_splits) -> (Tensor out, Tensor lse)");
  m.def("dropout_keep_mask(int B, int Hq, int L, int S, int P, float dropout_p, int seed, int offset) -> Tensor",
        &ptv2_fast::dropout_keep_mask_cpu);
  m.def("build_info() -> str", &ptv2_fast::build_info);
}

// Differentiable through a C++ autograd Function (no Python node per call); the backward op is first order only.
TORCH_LIBRARY_IMPL(ptv2_fast, Autograd, m) {
  m.impl("prefix_attention_fwd", &ptv2_fast::prefix_attention_fwd_autograd);
  m.impl("prefix_attention_bwd", torch::CppFunction::makeFallthrough());
  // the sdpa backend's internal steps, called below its autograd
  m.impl("prefix_attention_merge_fwd", torch::CppFunction::makeFallthrough());
  m.impl("prefix_attention_merge_bwd", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(ptv2_fast, CPU, m) {
  m.impl("prefix_attention_fwd", &ptv2_fast::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd", &ptv2_fast::prefix_attention_bwd_cpu);
  m.impl("prefix_attention_merge_fwd", &ptv2_fast::prefix_attention_merge_fwd_cpu);
  m.impl("prefix_attention_merge_bwd", &ptv2_fast::prefix_attention_merge_bwd_cpu);
  m.impl("prefix_decode_attention", &ptv2_fast::prefix_decode_attention);
}

#ifdef PTV2_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ptv2_fast, CUDA, m) {
  m.impl("prefix_decode_attention", &ptv2_fast::prefix_decode_attention);
}
#endif
