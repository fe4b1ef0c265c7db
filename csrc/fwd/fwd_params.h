// Plain-old-data parameters of one forward call (torch-free; filled by csrc/binding.cpp).
#pragma once
#include <cstdint>

namespace flashserve {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct FwdParams {
  // Inputs, packed varlen layout. Strides in elements; the last dimension is contiguous.
  const void* q;  // (total_q, h, d)
  const void* k;  // (total_k, h_k, d)
  const void* v;  // (total_k, h_k, d)
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  const int* cu_seqlens_q;  // (b + 1)
  const int* cu_seqlens_k;  // (b + 1)

  // Outputs.
  void* o;  // (total_q, h, d)
  int64_t o_row_stride, o_head_stride;
  float* lse;  // (h, total_q)
  int total_q;

  int b, h, h_k, d;  // d: real head dim (multiple of 8), <= the compiled head-dim class
  int max_seqlen_q, max_seqlen_k;
  DType dtype;

  float scale;       // softmax scale
  float softcap;     // 0: off
  int window_left;   // -1: unbounded
  int window_right;  // -1: unbounded (causal: 0)

  const float* alibi;  // nullptr or (h) / (b, h) fp32
  int64_t alibi_batch_stride;  // 0 for (h,)

  // Dropout (csrc/common/dropout.cuh).
  float p_drop;  // 0: off
  uint64_t seed, offset;

  // return_softmax: (b, h, round128(max_q), round128(max_k)) in the input dtype, or nullptr.
  void* s_dmask;
  int64_t s_batch_stride, s_head_stride, s_row_stride;

  // Split-KV: num_splits > 1 writes fp32 partials then combines.
  int num_splits;
  float* o_accum;    // (num_splits, total_q, h, d_class)
  float* lse_accum;  // (num_splits, h, total_q)

  int num_sms;
};

}  // namespace flashserve
