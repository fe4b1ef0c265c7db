// Backward pass: preprocess (D = rowsum(dO * O), dQ accumulator zeroing), dispatch of the main kernel,
// postprocess (dQ accumulator -> dq, GQA dK/dV reduction, zeroing of K rows past the last sequence).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bwd_kernel.cuh"
#include "hopper/bwd_hopper.h"

namespace flashserve {
namespace bwd {

namespace {

__device__ __forceinline__ void to_float8(const uint4& raw, bool bf16, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (bf16) {
      __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&w[i]);
      float2 x = __bfloat1622float2(v);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    } else {
      __half2 v = *reinterpret_cast<const __half2*>(&w[i]);
      float2 x = __half22float2(v);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
}

__device__ __forceinline__ uint4 from_float8(const float (&f)[8], bool bf16) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (bf16) {
      __nv_bfloat162 v = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t*>(&v);
    } else {
      __half2 v = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t*>(&v);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// The small kernels below work on "items" of d contiguous columns (a (row, head) pair) with L lanes per item
// and 8 columns (16 bytes of 16-bit data) per lane, L = the smallest power of two >= d / 8 (at least 4), so
// a warp covers 32 / L items and every lane loads: one warp per item left 3/4 of the lanes idle at d64 and ran
// these kernels at half the bandwidth of FlashAttention-2's (bench/bwd_breakdown.py, NOTES.md session 9).
constexpr int kSmallThreads = 256;

template <int L>
struct ItemLane {
  int64_t item;  // (row, head) pair of this lane
  int c;         // first of this lane's 8 columns
  bool valid;    // item < n and c < d
  __device__ ItemLane(int64_t n, int d) {
    const int lane = threadIdx.x & 31;
    item = ((int64_t)blockIdx.x * (kSmallThreads / 32) + (threadIdx.x >> 5)) * (32 / L) + lane / L;
    c = (lane % L) * 8;
    valid = item < n && c < d;
  }
};

inline unsigned small_blocks(int64_t items, int lanes) {
  const int64_t per_block = (kSmallThreads / 32) * (32 / lanes);
  return (unsigned)((items + per_block - 1) / per_block);
}

inline int lanes_for(int d) {
  int l = 4;
  while (l * 8 < d) l *= 2;
  return l;
}

// Per (query row, head): D = sum_d dO * O (fp32), and that row's dq_accum zeroed in every split.
template <int L>
__global__ void __launch_bounds__(kSmallThreads) bwd_preprocess_kernel(const BwdParams p) {
  const ItemLane<L> it((int64_t)p.total_q * p.h, p.d);
  float acc = 0.f;
  const int row = (int)(it.item / p.h), head = (int)(it.item % p.h);
  if (it.valid) {
    const uint4 o = *reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(p.o) +
                                                    row * p.o_row_stride + head * p.o_head_stride + it.c);
    const uint4 g = *reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(p.dout) +
                                                    row * p.do_row_stride + head * p.do_head_stride + it.c);
    float fo[8], fg[8];
    to_float8(o, p.is_bf16, fo);
    to_float8(g, p.is_bf16, fg);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += fo[i] * fg[i];
    const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < p.num_splits; ++s) {
      float4* dst = reinterpret_cast<float4*>(p.dq_accum + ((int64_t)s * p.total_q * p.h + it.item) * p.d + it.c);
      dst[0] = z;
      dst[1] = z;
    }
  }
  // Sum over the item's L lanes (an aligned group: xor offsets below L stay inside it); every lane takes part.
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (it.valid && it.c == 0) p.dsum[(int64_t)head * p.total_q + row] = acc;
}

// Per (query row, head): dq = scale * sum over splits of dq_accum (in split order), in the input dtype.
template <int L>
__global__ void __launch_bounds__(kSmallThreads) bwd_postprocess_dq_kernel(const BwdParams p) {
  const ItemLane<L> it((int64_t)p.total_q * p.h, p.d);
  if (!it.valid) return;
  float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const int64_t split_stride = (int64_t)p.total_q * p.h * p.d;
  for (int s = 0; s < p.num_splits; ++s) {
    const float* src = p.dq_accum + s * split_stride + it.item * p.d + it.c;
    const float4 a = *reinterpret_cast<const float4*>(src), b = *reinterpret_cast<const float4*>(src + 4);
    f[0] += a.x; f[1] += a.y; f[2] += a.z; f[3] += a.w;
    f[4] += b.x; f[5] += b.y; f[6] += b.z; f[7] += b.w;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] *= p.scale;
  *reinterpret_cast<uint4*>(reinterpret_cast<uint16_t*>(p.dq) + it.item * p.d + it.c) = from_float8(f, p.is_bf16);
}

// GQA, per (key row, K/V head): dk/dv = sum over the group's query heads of the fp32 partials (fixed order).
// Rows past cu_seqlens_k[b] belong to no sequence: written as 0.
template <int L>
__global__ void __launch_bounds__(kSmallThreads) bwd_postprocess_dkv_kernel(const BwdParams p) {
  const ItemLane<L> it((int64_t)p.total_k * p.h_k, p.d);
  if (!it.valid) return;
  const int row = (int)(it.item / p.h_k), hk = (int)(it.item % p.h_k);
  const int group = p.h / p.h_k;
  float fk[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, fv[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (row < p.cu_seqlens_k[p.b]) {
    for (int gi = 0; gi < group; ++gi) {
      const int64_t off = ((int64_t)row * p.h + hk * group + gi) * p.d + it.c;
      const float4 a = *reinterpret_cast<const float4*>(p.dk_accum + off);
      const float4 b = *reinterpret_cast<const float4*>(p.dk_accum + off + 4);
      const float4 x = *reinterpret_cast<const float4*>(p.dv_accum + off);
      const float4 y = *reinterpret_cast<const float4*>(p.dv_accum + off + 4);
      fk[0] += a.x; fk[1] += a.y; fk[2] += a.z; fk[3] += a.w;
      fk[4] += b.x; fk[5] += b.y; fk[6] += b.z; fk[7] += b.w;
      fv[0] += x.x; fv[1] += x.y; fv[2] += x.z; fv[3] += x.w;
      fv[4] += y.x; fv[5] += y.y; fv[6] += y.z; fv[7] += y.w;
    }
  }
  *reinterpret_cast<uint4*>(reinterpret_cast<uint16_t*>(p.dk) + it.item * p.d + it.c) = from_float8(fk, p.is_bf16);
  *reinterpret_cast<uint4*>(reinterpret_cast<uint16_t*>(p.dv) + it.item * p.d + it.c) = from_float8(fv, p.is_bf16);
}

// Without GQA the main kernel writes dk/dv of every key in a sequence; this zeroes the rows past
// cu_seqlens_k[b] (read here, on the device). A small grid strides over them: with no such rows (the usual
// case) it costs one launch, where a thread per row cost 37-73 us at 16k keys (NOTES.md session 9).
__global__ void __launch_bounds__(kSmallThreads) bwd_zero_dkv_tail_kernel(const BwdParams p) {
  const int64_t row_vecs = (int64_t)p.h_k * p.d / 8;  // 16-byte vectors per key row (d is a multiple of 8)
  const int64_t begin = (int64_t)p.cu_seqlens_k[p.b] * row_vecs, end = (int64_t)p.total_k * row_vecs;
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t i = begin + (int64_t)blockIdx.x * kSmallThreads + threadIdx.x; i < end;
       i += (int64_t)gridDim.x * kSmallThreads) {
    reinterpret_cast<uint4*>(p.dk)[i] = z;
    reinterpret_cast<uint4*>(p.dv)[i] = z;
  }
}

// Launches kernel<L> for the lane count of head dim d (4, 8, 16 or 32 lanes per item).
#define FS_LAUNCH_SMALL(KERNEL, ITEMS, P, STREAM)                                                          \
  do {                                                                                                    \
    const int lanes_ = lanes_for((P).d);                                                                  \
    const unsigned grid_ = small_blocks((ITEMS), lanes_);                                                 \
    if (lanes_ == 4) KERNEL<4><<<grid_, kSmallThreads, 0, (STREAM)>>>(P);                                 \
    else if (lanes_ == 8) KERNEL<8><<<grid_, kSmallThreads, 0, (STREAM)>>>(P);                            \
    else if (lanes_ == 16) KERNEL<16><<<grid_, kSmallThreads, 0, (STREAM)>>>(P);                          \
    else KERNEL<32><<<grid_, kSmallThreads, 0, (STREAM)>>>(P);                                            \
  } while (0)

int class_for(int d) {
  const int classes[] = {32, 64, 96, 128, 192, 256};
  for (int c : classes)
    if (d <= c) return c;
  return 0;
}

int block_keys_for(int cls) { return cls > 128 ? Traits<192, 1>::Bc : Traits<128, 1>::Bc; }

// The sm_90a (wgmma) kernels cover head-dim classes 64, 128 and 256 and every feature but dropout; they run on
// compute capability 9.0 unless FLASHSERVE_BWD_HOPPER=0 (read at each call: A/B timing in one process).
bool hopper_eligible(const BwdParams& p, int dev) {
  const int c = p.head_dim_class;
  if (p.p_drop > 0.f || (c != 64 && c != 128 && c != 256)) return false;
  const char* env = std::getenv("FLASHSERVE_BWD_HOPPER");
  if (env && std::strcmp(env, "0") == 0) return false;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

// Runs (or with probe, only checks for) the Hopper kernel where this build holds it; *used = false: nothing
// launched, the mma.sync kernel must run.
cudaError_t run_hopper(const BwdParams& p, cudaStream_t stream, bool* used, bool probe) {
  *used = false;
  const bool bf16 = p.is_bf16;
  (void)bf16;
  (void)stream;
  (void)probe;
#if defined(FLASHSERVE_HD_64) && defined(FLASHSERVE_DT_BF16)
  if (p.head_dim_class == 64 && bf16) return run_hopper_hd64_bf16(p, stream, used, probe);
#endif
#if defined(FLASHSERVE_HD_64) && defined(FLASHSERVE_DT_FP16)
  if (p.head_dim_class == 64 && !bf16) return run_hopper_hd64_fp16(p, stream, used, probe);
#endif
#if defined(FLASHSERVE_HD_128) && defined(FLASHSERVE_DT_BF16)
  if (p.head_dim_class == 128 && bf16) return run_hopper_hd128_bf16(p, stream, used, probe);
#endif
#if defined(FLASHSERVE_HD_128) && defined(FLASHSERVE_DT_FP16)
  if (p.head_dim_class == 128 && !bf16) return run_hopper_hd128_fp16(p, stream, used, probe);
#endif
#if defined(FLASHSERVE_HD_256) && defined(FLASHSERVE_DT_BF16)
  if (p.head_dim_class == 256 && bf16) return run_hopper_hd256_bf16(p, stream, used, probe);
#endif
#if defined(FLASHSERVE_HD_256) && defined(FLASHSERVE_DT_FP16)
  if (p.head_dim_class == 256 && !bf16) return run_hopper_hd256_fp16(p, stream, used, probe);
#endif
  return cudaSuccess;
}

std::string cuda_msg(const char* what, cudaError_t e) {
  return std::string("flashserve backward: ") + what + " failed: " + cudaGetErrorName(e) + " (" +
         cudaGetErrorString(e) + ")";
}

}  // namespace

bool class_compiled(int cls, bool bf16) {
  bool hd = false, dt = false;
#if defined(FLASHSERVE_HD_32)
  hd |= cls == 32;
#endif
#if defined(FLASHSERVE_HD_64)
  hd |= cls == 64;
#endif
#if defined(FLASHSERVE_HD_96)
  hd |= cls == 96;
#endif
#if defined(FLASHSERVE_HD_128)
  hd |= cls == 128;
#endif
#if defined(FLASHSERVE_HD_192)
  hd |= cls == 192;
#endif
#if defined(FLASHSERVE_HD_256)
  hd |= cls == 256;
#endif
#if defined(FLASHSERVE_DT_BF16)
  dt |= bf16;
#endif
#if defined(FLASHSERVE_DT_FP16)
  dt |= !bf16;
#endif
  return hd && dt;
}

namespace {

// Blocks per (head, sequence) for a schedule whose blocks each run several K/V blocks one after the other: the S
// minimising (waves of S * bh blocks, one resident per SM) x (K/V blocks per block), the critical path in K/V-block
// steps; ties go to the smaller S (less zeroing and summing of dQ slices). slice_bytes > 0: each block owns a dQ
// slice of that size, and the S slices must fit in 2 GiB (FlashAttention-2's deterministic dQ takes about as much).
// *efficiency: useful block-steps / (SMs x that critical path).
int split_blocks(int nkb, int64_t bh, int64_t sms, size_t slice_bytes, double* efficiency) {
  int best = 1;
  int64_t best_cost = -1;
  for (int sp = 1; sp <= nkb && sp <= 256; ++sp) {
    if (slice_bytes && sp > 1 && (size_t)sp * slice_bytes > ((size_t)2 << 30)) break;
    const int64_t waves = (sp * bh + sms - 1) / sms, per = (nkb + sp - 1) / sp;
    if (best_cost < 0 || waves * per < best_cost) {
      best_cost = waves * per;
      best = sp;
    }
  }
  if (efficiency) *efficiency = best_cost > 0 ? (double)(bh * nkb) / (double)(sms * best_cost) : 1.0;
  return best;
}

// Bytes of the dS tiles of "dQ from dS" (bwd_params.h): one 8 KB tile per (64 query rows, head, 64 keys of the
// longest key sequence); about the attention matrix in the input dtype.
size_t ds_workspace_bytes(const BwdParams& p) {
  return ((size_t)p.total_q / 64 + p.b + 1) * p.h * (size_t)((p.max_seqlen_k + 63) / 64) * 64 * 64 * 2;
}

// "dQ from dS" for class 256 on the Hopper path. Why: at d256 the dQ additions are a third of the main kernel's
// time (Bc = 64: 64 KB of fp32 dQ read-modified-written per 10.5-MFLOP step; an 8 KB dS tile replaces them), and the
// deterministic schemes that order them ran at 0.70-0.84 of default mode. Measured (NOTES.md, session 11, H200):
// 1.31-1.40x torch FA2 and 1.35-1.39x the bulk-reduction kernel at 512-16k tokens per sequence.
// Its workspace grows with total_q x max_seqlen_k (the attention matrix's size in bf16), so it is taken:
// - deterministic mode (opt-in, where the other schemes cost 16-30%): up to max(4 GiB, GPU memory / 8);
// - default mode: only while the workspace is at most 4x the fp32 dQ accumulator it replaces (d256: key sequences
//   up to about 2k tokens), so that default-mode memory stays a small multiple of the inputs', as FlashAttention's
//   does; FLASHSERVE_BWD_DQ_FROM_DS=1 lifts that to the deterministic cap, =0 turns the mode off (both modes).
// A forced deterministic scheme (FLASHSERVE_BWD_DET_MODE=own|counters) or the K/V-block loop (FLASHSERVE_BWD_LOOP)
// also turn it off (A/B).
bool dq_from_ds_fits(const BwdParams& p, int dev) {
  if (p.head_dim_class != 256) return false;
  const char* env = std::getenv("FLASHSERVE_BWD_DQ_FROM_DS");
  if (env && std::strcmp(env, "0") == 0) return false;
  const char* mode = std::getenv("FLASHSERVE_BWD_DET_MODE");
  if (p.deterministic && mode && (std::strcmp(mode, "own") == 0 || std::strcmp(mode, "counters") == 0)) return false;
  if (!p.deterministic && std::getenv("FLASHSERVE_BWD_LOOP")) return false;
  const size_t bytes = ds_workspace_bytes(p);
  if (!p.deterministic && !(env && std::strcmp(env, "1") == 0))
    return bytes <= 4 * (size_t)p.total_q * p.h * p.d * sizeof(float);
  static size_t total_memory[64] = {};  // per device, read once
  if (dev < 0 || dev >= 64) return false;
  if (total_memory[dev] == 0) {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    total_memory[dev] = total_b;
  }
  return bytes <= std::max<size_t>((size_t)4 << 30, total_memory[dev] / 8);
}

}  // namespace

std::string plan(BwdParams& p, BwdWorkspace* ws) {
  if (p.d <= 0 || p.d % 8 != 0 || p.d > 256)
    return "flashserve backward: head dim (padded) must be a multiple of 8 in [8, 256], got " + std::to_string(p.d);
  if (p.h_k <= 0 || p.h % p.h_k != 0)
    return "flashserve backward: heads_q (" + std::to_string(p.h) + ") must be a multiple of heads_k (" +
           std::to_string(p.h_k) + ")";
  if (p.p_drop < 0.f || p.p_drop >= 1.f) return "flashserve backward: dropout_p must be in [0, 1)";
  const int cls = class_for(p.d);
  if (!class_compiled(cls, p.is_bf16))
    return "flashserve backward: head-dim class " + std::to_string(cls) + " / " + (p.is_bf16 ? "bf16" : "fp16") +
           " is not compiled into this build (FLASHSERVE_HEADDIMS / FLASHSERVE_DTYPES)";
  p.head_dim_class = cls;
  p.hopper = false;
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess && hopper_eligible(p, dev)) {
    bool avail = false;
    if (run_hopper(p, nullptr, &avail, true) == cudaSuccess) p.hopper = avail;
  }
  cudaGetLastError();  // a failed probe leaves no sticky state for the caller
  const int bc = block_keys_for(cls);
  const int nkb = (p.max_seqlen_k + bc - 1) / bc;
  p.num_splits = 1;
  // Hopper kernels, deterministic mode, two schemes (FLASHSERVE_BWD_DET_MODE=own|counters forces one, A/B):
  // - by ownership (loop_blocks = num_splits): num_splits blocks per (head, sequence), block x adds alone into dQ slice x, for
  //   K/V blocks x, 2S - 1 - x, ... one after the other; no waiting, but S dQ slices to zero and sum, and each
  //   block revisits its slice's rows once per K/V block. Taken when S blocks per pair fill the GPU's waves well.
  // - with counters: one block per K/V block as in default mode, additions into a query block ordered by a
  //   counter, K/V block kb into slice kb % num_splits (chains num_splits times shorter). Measured (NOTES.md,
  //   H5): 2 slices help without a diagonal bound up to 64 K/V blocks (+5-9% at d64/d256), 4 slices and any
  //   slicing under causal masks cost more (up to -40%) than the shorter chains gain.
  p.dq_sem_stride = (p.max_seqlen_q + 63) / 64;
  p.loop_blocks = 0;
  p.dq_from_ds = false;
  p.ds_kb_stride = 0;
  const int64_t bh = std::max<int64_t>(1, (int64_t)p.b * p.h), sms = p.num_sms > 0 ? p.num_sms : 132;
  const size_t slice_bytes = (size_t)p.total_q * p.h * p.d * sizeof(float);
  if (p.hopper) {
    const int hbc = cls == 256 ? 64 : 128;  // keys per Hopper block
    const int hnkb = std::max(1, (p.max_seqlen_k + hbc - 1) / hbc);
    double loop_eff = 1.0;
    const int loop_s = split_blocks(hnkb, bh, sms, p.deterministic ? slice_bytes : 0, &loop_eff);
    if (dq_from_ds_fits(p, dev)) {
      p.dq_from_ds = true;
      p.ds_kb_stride = (p.max_seqlen_k + 63) / 64;
      p.num_splits = 0;  // no dQ accumulator to zero or sum: the workspace holds the dS tiles
    } else if (!p.deterministic) {
      // FLASHSERVE_BWD_LOOP=auto|S|0 (A/B): the K/V-block loop with split_blocks' S, with S blocks, or off.
      if (const char* env = std::getenv("FLASHSERVE_BWD_LOOP")) {
        if (std::strcmp(env, "auto") == 0) p.loop_blocks = loop_s;
        else p.loop_blocks = std::max(0, std::min(std::atoi(env), hnkb));
      }
    } else {
      bool own = loop_eff >= 0.85;
      if (const char* mode = std::getenv("FLASHSERVE_BWD_DET_MODE")) {
        if (std::strcmp(mode, "own") == 0) own = true;
        if (std::strcmp(mode, "counters") == 0) own = false;
      }
      if (own) {
        p.num_splits = loop_s;
        if (const char* env = std::getenv("FLASHSERVE_BWD_DET_SPLITS")) p.num_splits = std::max(1, std::atoi(env));
        p.num_splits = std::min(p.num_splits, hnkb);
        p.loop_blocks = p.num_splits;
      } else {
        int sp = (p.window_right < 0 && hnkb <= 64) ? 2 : 1;
        if (const char* env = std::getenv("FLASHSERVE_BWD_DET_SPLITS")) sp = std::max(1, std::atoi(env));  // A/B
        while (sp > 1 && (size_t)sp * slice_bytes > ((size_t)1 << 30)) --sp;
        p.num_splits = std::max(1, std::min(sp, hnkb));
      }
    }
  } else if (p.deterministic && nkb > 1) {
    // mma.sync kernel: block x of a head handles K/V blocks x, x + S, ... (S = num_splits) and owns dq_accum slice x.
    p.num_splits = split_blocks(nkb, bh, sms, slice_bytes, nullptr);
  }
  if (ws) {
    ws->dsum_floats = (size_t)p.h * p.total_q;
    ws->dq_accum_floats = (size_t)p.num_splits * p.total_q * p.h * p.d;
    if (p.dq_from_ds) ws->dq_accum_floats = ds_workspace_bytes(p) / sizeof(float);  // the dS tiles
    if (p.hopper && p.deterministic && p.loop_blocks == 0 && !p.dq_from_ds)  // counters
      ws->dq_accum_floats += (size_t)p.num_splits * p.b * p.h * p.dq_sem_stride;
    ws->dkv_accum_floats = p.h != p.h_k ? (size_t)p.total_k * p.h * p.d : 0;
  }
  return "";
}

std::string run(BwdParams& p, cudaStream_t stream) {
  cudaError_t e;
  if (p.total_q > 0 && p.h > 0) {
    FS_LAUNCH_SMALL(bwd_preprocess_kernel, (int64_t)p.total_q * p.h, p, stream);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_msg("preprocess launch", e);
  }
  if (p.b > 0 && p.total_k > 0) {
    int dev = 0;
    int optin = 0;
    if ((e = cudaGetDevice(&dev)) != cudaSuccess) return cuda_msg("cudaGetDevice", e);
    if ((e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess)
      return cuda_msg("cudaDeviceGetAttribute", e);
    bool used = false;
    if (p.hopper) {
      p.dq_sem = nullptr;
      if (p.deterministic && p.loop_blocks == 0 && !p.dq_from_ds) {  // counters
        p.dq_sem = reinterpret_cast<int*>(p.dq_accum + (size_t)p.num_splits * p.total_q * p.h * p.d);
        e = cudaMemsetAsync(p.dq_sem, 0, (size_t)p.num_splits * p.b * p.h * p.dq_sem_stride * sizeof(int), stream);
        if (e != cudaSuccess) return cuda_msg("dQ counter reset", e);
      }
      e = run_hopper(p, stream, &used, false);
      if (e != cudaSuccess) return cuda_msg("Hopper main kernel launch", e);
    }
    e = cudaErrorInvalidValue;
    // Only the dtypes selected at build time exist (FLASHSERVE_DTYPES); plan() has already
    // rejected the others, so an uncompiled one can only be reached by a bug.
#if defined(FLASHSERVE_DT_BF16)
#define FS_CALL_BF16(D) run_main_hd##D##_bf16(p, stream, (size_t)optin)
#else
#define FS_CALL_BF16(D) cudaErrorInvalidValue
#endif
#if defined(FLASHSERVE_DT_FP16)
#define FS_CALL_FP16(D) run_main_hd##D##_fp16(p, stream, (size_t)optin)
#else
#define FS_CALL_FP16(D) cudaErrorInvalidValue
#endif
    switch (used ? -1 : p.head_dim_class) {
      case -1:  // done by the Hopper kernel
        e = cudaSuccess;
        break;
#define FS_DISPATCH(D)                                                            \
  case D:                                                                         \
    e = p.is_bf16 ? FS_CALL_BF16(D) : FS_CALL_FP16(D);                            \
    break;
#if defined(FLASHSERVE_HD_32)
      FS_DISPATCH(32)
#endif
#if defined(FLASHSERVE_HD_64)
      FS_DISPATCH(64)
#endif
#if defined(FLASHSERVE_HD_96)
      FS_DISPATCH(96)
#endif
#if defined(FLASHSERVE_HD_128)
      FS_DISPATCH(128)
#endif
#if defined(FLASHSERVE_HD_192)
      FS_DISPATCH(192)
#endif
#if defined(FLASHSERVE_HD_256)
      FS_DISPATCH(256)
#endif
#undef FS_DISPATCH
#undef FS_CALL_BF16
#undef FS_CALL_FP16
      default:
        return "flashserve backward: head-dim class " + std::to_string(p.head_dim_class) + " not compiled";
    }
    if (e != cudaSuccess) return cuda_msg("main kernel launch", e);
  }
  if (p.dq_from_ds) {  // the Hopper dQ kernel wrote dq, unless no main kernel ran: then every row is 0
    if (p.total_q > 0 && p.h > 0 && !(p.b > 0 && p.total_k > 0) &&
        (e = cudaMemsetAsync(p.dq, 0, (size_t)p.total_q * p.h * p.d * 2, stream)) != cudaSuccess)
      return cuda_msg("dq zeroing", e);
  } else if (p.total_q > 0 && p.h > 0) {
    FS_LAUNCH_SMALL(bwd_postprocess_dq_kernel, (int64_t)p.total_q * p.h, p, stream);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_msg("postprocess dq launch", e);
  }
  if (p.total_k > 0 && p.h_k > 0) {
    if (p.h != p.h_k) {
      FS_LAUNCH_SMALL(bwd_postprocess_dkv_kernel, (int64_t)p.total_k * p.h_k, p, stream);
    } else {
      const int64_t vecs = (int64_t)p.total_k * p.h_k * p.d / 8;
      const int64_t blocks = std::min<int64_t>((vecs + kSmallThreads - 1) / kSmallThreads, 264);
      bwd_zero_dkv_tail_kernel<<<(unsigned)std::max<int64_t>(1, blocks), kSmallThreads, 0, stream>>>(p);
    }
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_msg("postprocess dk/dv launch", e);
  }
  return "";
}

}  // namespace bwd
}  // namespace flashserve
