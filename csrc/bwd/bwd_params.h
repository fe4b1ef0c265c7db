// Parameters and host entry points of the backward pass (torch-free; filled by csrc/binding.cpp).
//
// Layout (packed varlen, as the forward): q/out/dout/dq (total_q, h, d), k/v/dk/dv (total_k, h_k, d),
// softmax_lse (h, total_q) fp32 natural-log, cu_seqlens_* int32 (b + 1). d is the padded head dim
// (a multiple of 8, at most 256); the last dimension of every tensor is contiguous.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace flashserve {
namespace bwd {

struct BwdParams {
  // Inputs. Strides in elements.
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t o_row_stride, o_head_stride;
  int64_t do_row_stride, do_head_stride;
  const float* lse;  // (h, total_q)
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;

  // Outputs, contiguous: dq (total_q, h, d), dk/dv (total_k, h_k, d), input dtype.
  void* dq;
  void* dk;
  void* dv;

  // Workspace (fp32), sized by plan(): see BwdWorkspace.
  float* dsum;      // (h, total_q): D = rowsum(dO * O)
  float* dq_accum;  // (num_splits, total_q, h, d), then the Hopper kernel's counters (see dq_sem)
  float* dk_accum;  // (total_k, h, d) when h != h_k, else unused
  float* dv_accum;  // (total_k, h, d) when h != h_k, else unused

  int total_q, total_k;
  int b, h, h_k, d;
  int max_seqlen_q, max_seqlen_k;
  bool is_bf16;

  float scale;       // softmax scale
  float softcap;     // 0: off
  int window_left;   // -1: unbounded
  int window_right;  // -1: unbounded (causal: 0)

  const float* alibi;          // nullptr, or (h) / (b, h) fp32
  int64_t alibi_batch_stride;  // 0 for (h,)

  float p_drop;  // 0: off
  uint64_t seed, offset;

  bool deterministic;
  int num_sms;

  // Filled by plan().
  int head_dim_class;
  int num_splits;
  bool hopper;  // the sm_90a (wgmma) kernel runs this call
  // K/V-block loop (both modes): loop_blocks > 0 launches that many blocks per (head, sequence), block x running
  // K/V blocks x, 2 loop_blocks - 1 - x, 2 loop_blocks + x, ... one after the other (zigzag: even causal
  // lengths), adding into dQ slice x % num_splits; 0 = one block per K/V block. Deterministic mode of the Hopper kernels:
  // loop_blocks = num_splits is "by ownership" (block x alone adds into dQ slice x, no counters), 0 = ordered
  // additions with the counters below.
  int loop_blocks;
  // Filled by run(): deterministic mode of the Hopper kernels, one counter per (dQ slice, sequence, head, 64 query
  // rows), (num_splits, b, h, dq_sem_stride) ints at the end of the dq_accum workspace (plan() counts them in).
  int* dq_sem;
  int dq_sem_stride;
  // Deterministic mode of the class-256 Hopper kernel, "dQ from dS" (plan() chooses it when the workspace fits):
  // the main kernel adds no dQ; it writes each dS^T tile it computes (Bc = 64 keys x Br = 64 queries, input
  // dtype, 8 KB in its shared-memory layout) to the dq_accum workspace, and a second kernel computes
  // dq = scale * dS K per query block, adding the K/V blocks in order (no atomics, no waiting, no dQ slices).
  // Tile (m, kb) of sequence b, head h: index ((cu_seqlens_q[b] / 64 + b + m) * h + h) * ds_kb_stride + kb.
  bool dq_from_ds;
  int ds_kb_stride;  // K/V blocks of 64 keys in the longest sequence
};

struct BwdWorkspace {
  size_t dsum_floats;
  size_t dq_accum_floats;
  size_t dkv_accum_floats;  // each of dk_accum and dv_accum; 0 without GQA
};

// Chooses the head-dim class and the dQ split count; returns the workspace sizes. Empty string on
// success, else a message saying what is unsupported.
std::string plan(BwdParams& p, BwdWorkspace* ws);

// Runs preprocess, main kernel and postprocess on `stream`. Empty string on success, else a message
// (CUDA errors included).
std::string run(BwdParams& p, cudaStream_t stream);

// Head-dim classes compiled into this build (FLASHSERVE_HD_* defines); for error messages.
bool class_compiled(int head_dim_class, bool is_bf16);

}  // namespace bwd
}  // namespace flashserve
