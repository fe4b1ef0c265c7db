// FlashAttention forward (FA2-style, mma.sync m16n8k16, runs on sm_80 and sm_90).
//
// One thread block = (query block of BM rows, query head, sequence[, KV split]). Each warp owns
// MT = BM / (16 * NW) m16 tiles of rows. Q is loaded once into shared memory; K_j and V_j go
// through single shared buffers with cp.async, V_j's load overlapping S = Q K_j^T and K_{j-1}'s
// load overlapping O += P V_j. Keys are visited from the last visible block down, so the blocks
// that need a mask (sequence end, causal diagonal, window) come first and the rest run unmasked.
// P stays in registers: the fp32 accumulator fragment of S is the A fragment of P V.
//
// kFull adds softcap, ALiBi, dropout and return_softmax (runtime-checked); the fast path has
// none of them. kSplit writes fp32 partial O and LSE per KV split; fwd_combine_kernel merges.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "../common/dropout.cuh"
#include "fwd_params.h"
#include "../common/ptx.cuh"

namespace flashserve {

template <int HD_, int BM_, int BN_, int NW_>
struct FwdTraits {
  static constexpr int HD = HD_, BM = BM_, BN = BN_, NW = NW_;
  static constexpr int kThreads = NW * 32;
  static constexpr int MT = BM / (16 * NW);  // m16 row tiles per warp
  static constexpr int kStride = HD + 8;     // smem row stride (elements): +16 B makes ldmatrix conflict-free
  static constexpr int kSmemQ = BM * kStride;
  static constexpr int kSmemKV = BN * kStride;
  static constexpr int kSmemBytes = (kSmemQ + 2 * kSmemKV) * 2;
  static constexpr int kMinBlocks = NW == 4 ? 2 : 1;
  static_assert(BM % (16 * NW) == 0, "BM must be a multiple of 16 * warps");
  static_assert(HD % 16 == 0 && BN % 16 == 0, "tile shapes");
};

// Head-dim classes and their tiles (BM, BN, warps). Tuning builds may override one class with
// -DFS_BM_<hd>=.. -DFS_BN_<hd>=.. -DFS_NW_<hd>=.. (nvcc splits -D values at commas, hence three macros).
#ifndef FS_BM_32
#define FS_BM_32 128
#endif
#ifndef FS_BN_32
#define FS_BN_32 128
#endif
#ifndef FS_NW_32
#define FS_NW_32 4
#endif
#ifndef FS_BM_64
#define FS_BM_64 128
#endif
#ifndef FS_BN_64
#define FS_BN_64 128
#endif
#ifndef FS_NW_64
#define FS_NW_64 4
#endif
#ifndef FS_BM_96
#define FS_BM_96 128
#endif
#ifndef FS_BN_96
#define FS_BN_96 64
#endif
#ifndef FS_NW_96
#define FS_NW_96 4
#endif
#ifndef FS_BM_128
#define FS_BM_128 128
#endif
#ifndef FS_BN_128
#define FS_BN_128 64
#endif
#ifndef FS_NW_128
#define FS_NW_128 4
#endif
#ifndef FS_BM_192
#define FS_BM_192 128
#endif
#ifndef FS_BN_192
#define FS_BN_192 64
#endif
#ifndef FS_NW_192
#define FS_NW_192 8
#endif
#ifndef FS_BM_256
#define FS_BM_256 64  // 64x64x4 (2 blocks/SM): 1.02-1.16x the 128x64x8 tile on H100, same output bits (NOTES.md)
#endif
#ifndef FS_BN_256
#define FS_BN_256 64
#endif
#ifndef FS_NW_256
#define FS_NW_256 4
#endif
template <int HD> struct FwdConfig;
template <> struct FwdConfig<32> { using Traits = FwdTraits<32, FS_BM_32, FS_BN_32, FS_NW_32>; };
template <> struct FwdConfig<64> { using Traits = FwdTraits<64, FS_BM_64, FS_BN_64, FS_NW_64>; };
template <> struct FwdConfig<96> { using Traits = FwdTraits<96, FS_BM_96, FS_BN_96, FS_NW_96>; };
template <> struct FwdConfig<128> { using Traits = FwdTraits<128, FS_BM_128, FS_BN_128, FS_NW_128>; };
template <> struct FwdConfig<192> { using Traits = FwdTraits<192, FS_BM_192, FS_BN_192, FS_NW_192>; };
template <> struct FwdConfig<256> { using Traits = FwdTraits<256, FS_BM_256, FS_BN_256, FS_NW_256>; };

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Copy a ROWS x HD tile (rows_valid real rows, d real columns) into shared memory, zero-filling the rest.
template <typename T, typename Tr, int ROWS>
__device__ __forceinline__ void load_tile(uint32_t s_base, const T* g, int64_t row_stride, int rows_valid,
                                          int d, const void* safe_ptr, int tid) {
  constexpr int CPR = Tr::HD / 8;
  constexpr int TOTAL = ROWS * CPR;
  if constexpr (Tr::kThreads % CPR == 0) {
    // Each pass covers kThreads / CPR whole rows: one pointer, advanced by a constant row step.
    constexpr int RSTEP = Tr::kThreads / CPR;
    const int row0 = tid / CPR, col = (tid % CPR) * 8;
    const T* src = g + row0 * row_stride + col;
    const uint32_t dst = s_base + (row0 * Tr::kStride + col) * 2;
    const bool col_ok = col < d;
#pragma unroll
    for (int i = 0; i < ROWS / RSTEP; ++i) {
      const bool ok = col_ok && row0 + i * RSTEP < rows_valid;
      ptx::cp_async16(dst + i * RSTEP * Tr::kStride * 2, ok ? static_cast<const void*>(src) : safe_ptr, ok ? 16 : 0);
      src += RSTEP * row_stride;
    }
  } else {
#pragma unroll
    for (int i = 0; i < ceil_div(TOTAL, Tr::kThreads); ++i) {
      const int c = tid + i * Tr::kThreads;
      if (TOTAL % Tr::kThreads == 0 || c < TOTAL) {
        const int row = c / CPR, col = (c % CPR) * 8;
        const bool ok = row < rows_valid && col < d;
        const void* src = ok ? static_cast<const void*>(g + row * row_stride + col) : safe_ptr;
        ptx::cp_async16(s_base + (row * Tr::kStride + col) * 2, src, ok ? 16 : 0);
      }
    }
  }
}

template <typename T, typename Tr, bool kFull, bool kSplit>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) fwd_kernel(const FwdParams p) {
  constexpr int HD = Tr::HD, BM = Tr::BM, BN = Tr::BN, MT = Tr::MT, NT = BN / 8, DT = HD / 8;
  constexpr int kStride = Tr::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  const uint32_t sQ_a = ptx::smem_addr(sQ);
  const uint32_t sK_a = sQ_a + Tr::kSmemQ * 2;
  const uint32_t sV_a = sK_a + Tr::kSmemKV * 2;

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) query blocks first
  const int head = blockIdx.y;
  const int bidb = kSplit ? blockIdx.z / p.num_splits : blockIdx.z;
  const int split = kSplit ? blockIdx.z % p.num_splits : 0;

  const int q_start = p.cu_seqlens_q[bidb];
  const int sq = p.cu_seqlens_q[bidb + 1] - q_start;
  const int k_start = p.cu_seqlens_k[bidb];
  const int sk = p.cu_seqlens_k[bidb + 1] - k_start;
  const int m0 = m_block * BM;
  if (m0 >= sq) return;
  const int m_valid = min(BM, sq - m0);
  const int head_k = head / (p.h / p.h_k);
  const int diag = sk - sq;  // query i sees key j iff i + diag - wl <= j <= i + diag + wr
  const int wl = p.window_left, wr = p.window_right;

  // Visible key range of this query block, then this split's share of it.
  int key_lo = 0, key_hi = sk;
  if (wr >= 0) key_hi = min(sk, m0 + m_valid - 1 + diag + wr + 1);
  if (wl >= 0) key_lo = max(0, m0 + diag - wl);
  int nb_min = key_lo / BN;
  int nb_max = key_hi > key_lo ? ceil_div(key_hi, BN) : nb_min;
  if (kSplit) {
    const int per_split = ceil_div(ceil_div(p.max_seqlen_k, BN), p.num_splits);
    nb_min = max(nb_min, split * per_split);
    nb_max = min(nb_max, (split + 1) * per_split);
  }

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = warp * 16 * MT;

  const bool write_softmax = kFull && !kSplit && p.s_dmask != nullptr;
  if (nb_max <= nb_min && !write_softmax) {
    // No visible key for any row of this block (in this split): O = 0, LSE = +inf (-inf for partials).
    for (int c = tid; c < m_valid * (HD / 4); c += Tr::kThreads) {
      const int row = c / (HD / 4), col = (c % (HD / 4)) * 4;
      const int tok = q_start + m0 + row;
      if (kSplit) {
        float* dst = p.o_accum + ((int64_t(split) * p.total_q + tok) * p.h + head) * HD + col;
        *reinterpret_cast<float4*>(dst) = make_float4(0.f, 0.f, 0.f, 0.f);
      } else if (col < p.d) {
        T* dst = static_cast<T*>(p.o) + tok * p.o_row_stride + head * p.o_head_stride + col;
        *reinterpret_cast<uint2*>(dst) = make_uint2(0u, 0u);
      }
    }
    for (int row = tid; row < m_valid; row += Tr::kThreads) {
      const int tok = q_start + m0 + row;
      if (kSplit) p.lse_accum[(int64_t(split) * p.h + head) * p.total_q + tok] = -INFINITY;
      else p.lse[int64_t(head) * p.total_q + tok] = INFINITY;
    }
    return;
  }

  const T* gQ = static_cast<const T*>(p.q) + int64_t(q_start + m0) * p.q_row_stride + head * p.q_head_stride;
  const T* gK = static_cast<const T*>(p.k) + int64_t(k_start) * p.k_row_stride + head_k * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + int64_t(k_start) * p.v_row_stride + head_k * p.v_head_stride;

  // ldmatrix lane addresses (bytes).
  uint32_t q_addr[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    q_addr[mt] = sQ_a + ((warp_row0 + mt * 16 + (lane & 15)) * kStride + (lane >> 4) * 8) * 2;
  const uint32_t k_off = (((lane & 7) + ((lane >> 4) << 3)) * kStride + ((lane >> 3) & 1) * 8) * 2;
  const uint32_t v_off = (((lane & 7) + (((lane >> 3) & 1) << 3)) * kStride + (lane >> 4) * 8) * 2;

  load_tile<T, Tr, BM>(sQ_a, gQ, p.q_row_stride, m_valid, p.d, p.q, tid);
  if (nb_max > nb_min) {
    const int n0 = (nb_max - 1) * BN;
    load_tile<T, Tr, BN>(sK_a, gK + int64_t(n0) * p.k_row_stride, p.k_row_stride, sk - n0, p.d, p.k, tid);
  }
  ptx::cp_async_commit();

  // Softmax bookkeeping. Fast path: S stays raw, exp2(S * sl2 - m * sl2). kFull: S becomes the final
  // logits (scale, softcap, ALiBi applied) and sl2 = log2(e).
  const float sl2 = kFull ? float(M_LOG2E) : p.scale * float(M_LOG2E);
  float slope = 0.f;
  if (kFull && p.alibi != nullptr) slope = p.alibi[bidb * p.alibi_batch_stride + head];
  const bool use_dropout = kFull && p.p_drop > 0.f;
  const uint32_t drop_thr = use_dropout ? dropout_keep_threshold(p.p_drop) : 0u;
  const uint32_t seq_head = uint32_t(bidb) * uint32_t(p.h) + uint32_t(head);

  float acc_o[MT][DT][4];
  float row_m[MT][2], row_l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    row_m[mt][0] = row_m[mt][1] = -INFINITY;
    row_l[mt][0] = row_l[mt][1] = 0.f;
  }

  // S = Q K^T for the K tile in shared memory.
  auto compute_s = [&](float (&s)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ptx::ldmatrix_x4(qa[mt], q_addr[mt] + kk * 32);
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t kb[4];
        ptx::ldmatrix_x4(kb, sK_a + k_off + nn * 16 * kStride * 2 + kk * 32);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          ptx::mma16816<T>(s[mt][2 * nn], qa[mt], kb[0], kb[1]);
          ptx::mma16816<T>(s[mt][2 * nn + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }
  };

  // Logit transform (kFull) and mask (boundary blocks only).
  auto transform_mask = [&](float (&s)[MT][NT][4], int n0, bool need_mask) {
    if (kFull) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = m0 + warp_row0 + mt * 16 + g + (e >> 1) * 8;
            const int j = n0 + nt * 8 + 2 * t + (e & 1);
            float x = s[mt][nt][e] * p.scale;
            if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
            if (p.alibi != nullptr) x -= slope * fabsf(float(i + diag - j));
            s[mt][nt][e] = x;
          }
    }
    if (need_mask) {
      // Visible columns of row i: [lo, hi], shifted to this thread's first column so that each element
      // costs two compares against a compile-time column offset.
      const int r0 = m0 + warp_row0 + g + diag - n0 - 2 * t;  // row offset, relative to this thread's column 0
      const int k_hi = sk - 1 - n0 - 2 * t;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int ri = r0 + mt * 16 + hf * 8;
          const int hi = wr >= 0 ? min(k_hi, ri + wr) : k_hi;
          const int lo = wl >= 0 ? ri - wl : -BN;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = nt * 8 + e;
              if (c > hi || c < lo) s[mt][nt][2 * hf + e] = -INFINITY;
            }
        }
    }
  };

  // Dropout keep bits for rows (g, g+8) of tile mt, column group of tile nt (one Philox call per thread,
  // shared with the lane pair: even lanes draw row g, odd lanes row g + 8).
  auto keep_bits = [&](int mt, int nt, int n0, uint32_t& bits_lo, uint32_t& bits_hi) {
    const int row = m0 + warp_row0 + mt * 16 + g + (t & 1) * 8;
    const uint32_t col_group = uint32_t(n0 + nt * 8) / 4u + uint32_t(t >> 1);
    const uint32_t mine = dropout_keep4(p.seed, p.offset, seq_head, uint32_t(row), col_group, drop_thr);
    const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 1);
    bits_lo = (t & 1) ? other : mine;
    bits_hi = (t & 1) ? mine : other;
  };

  for (int nb = nb_max - 1; nb >= nb_min; --nb) {
    const int n0 = nb * BN;
    ptx::cp_async_wait<0>();
    __syncthreads();  // K_nb (and Q) visible; everyone is done with the V buffer
    load_tile<T, Tr, BN>(sV_a, gV + int64_t(n0) * p.v_row_stride, p.v_row_stride, sk - n0, p.d, p.v, tid);
    ptx::cp_async_commit();

    float s[MT][NT][4];
    compute_s(s);

    const bool need_mask = (n0 + BN > sk) || (wr >= 0 && n0 + BN - 1 > m0 + diag + wr) ||
                           (wl >= 0 && n0 < m0 + BM - 1 + diag - wl);
    if (kFull || need_mask) transform_mask(s, n0, need_mask);

    // Online softmax.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = row_m[mt][hf];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
        mx = ptx::quad_max(mx);
        const float m_s = mx == -INFINITY ? 0.f : mx * sl2;
        const float alpha = ptx::ex2(row_m[mt][hf] * sl2 - m_s);
        row_m[mt][hf] = mx;
        row_l[mt][hf] *= alpha;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          acc_o[mt][dt][2 * hf] *= alpha;
          acc_o[mt][dt][2 * hf + 1] *= alpha;
        }
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float p0 = ptx::ex2(fmaf(s[mt][nt][2 * hf], sl2, -m_s));
          const float p1 = ptx::ex2(fmaf(s[mt][nt][2 * hf + 1], sl2, -m_s));
          s[mt][nt][2 * hf] = p0;
          s[mt][nt][2 * hf + 1] = p1;
          sum += p0 + p1;
        }
        row_l[mt][hf] += sum;
      }
    }
    if (use_dropout) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t b_lo, b_hi;
          keep_bits(mt, nt, n0, b_lo, b_hi);
          const int sh = 2 * (t & 1);
          if (!((b_lo >> sh) & 1u)) s[mt][nt][0] = 0.f;
          if (!((b_lo >> (sh + 1)) & 1u)) s[mt][nt][1] = 0.f;
          if (!((b_hi >> sh) & 1u)) s[mt][nt][2] = 0.f;
          if (!((b_hi >> (sh + 1)) & 1u)) s[mt][nt][3] = 0.f;
        }
    }

    ptx::cp_async_wait<0>();
    __syncthreads();  // V_nb visible; everyone is done with the K buffer
    if (nb > nb_min) {
      const int n1 = n0 - BN;
      load_tile<T, Tr, BN>(sK_a, gK + int64_t(n1) * p.k_row_stride, p.k_row_stride, sk - n1, p.d, p.k, tid);
      ptx::cp_async_commit();
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = ptx::pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = ptx::pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = ptx::pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = ptx::pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dd = 0; dd < HD / 16; ++dd) {
        uint32_t vb[4];
        ptx::ldmatrix_x4_trans(vb, sV_a + v_off + kk * 16 * kStride * 2 + dd * 32);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          ptx::mma16816<T>(acc_o[mt][2 * dd], pa[mt], vb[0], vb[1]);
          ptx::mma16816<T>(acc_o[mt][2 * dd + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }

  // Final row statistics.
  const float lse_scale = kFull ? 1.f : p.scale;
  float inv_l[MT][2], lse_v[MT][2], m_s_fin[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float l = ptx::quad_sum(row_l[mt][hf]);
      const bool empty = !(l > 0.f);  // no visible key (or NaN)
      inv_l[mt][hf] = empty ? 0.f : 1.f / l;
      lse_v[mt][hf] = empty ? (kSplit ? -INFINITY : INFINITY) : row_m[mt][hf] * lse_scale + logf(l);
      m_s_fin[mt][hf] = row_m[mt][hf] == -INFINITY ? 0.f : row_m[mt][hf] * sl2;
    }

  if (write_softmax) {
    // return_softmax: a second pass writes the final probabilities (dropped ones negated) over every key
    // block of the sequence, masked ones included (they hold 0).
    T* gS = static_cast<T*>(p.s_dmask) + bidb * p.s_batch_stride + head * p.s_head_stride;
    for (int nb = 0; nb < ceil_div(sk, BN); ++nb) {
      const int n0 = nb * BN;
      __syncthreads();
      load_tile<T, Tr, BN>(sK_a, gK + int64_t(n0) * p.k_row_stride, p.k_row_stride, sk - n0, p.d, p.k, tid);
      ptx::cp_async_commit();
      ptx::cp_async_wait<0>();
      __syncthreads();
      float s[MT][NT][4];
      compute_s(s);
      transform_mask(s, n0, true);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t b_lo = 0xFu, b_hi = 0xFu;
          if (use_dropout) keep_bits(mt, nt, n0, b_lo, b_hi);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int hf = e >> 1;
            const int i = m0 + warp_row0 + mt * 16 + g + hf * 8;
            const int j = n0 + nt * 8 + 2 * t + (e & 1);
            float pr = ptx::ex2(fmaf(s[mt][nt][e], sl2, -m_s_fin[mt][hf])) * inv_l[mt][hf];
            const uint32_t bits = hf ? b_hi : b_lo;
            if (!((bits >> (2 * (t & 1) + (e & 1))) & 1u)) pr = -pr;
            if (i < sq && j < sk) gS[int64_t(i) * p.s_row_stride + j] = T(pr);
          }
        }
    }
  }

  const float out_scale = use_dropout ? 1.f / (1.f - p.p_drop) : 1.f;
  if (kSplit) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = warp_row0 + mt * 16 + g + hf * 8;
        if (row < m_valid) {
          const int tok = q_start + m0 + row;
          float* dst = p.o_accum + ((int64_t(split) * p.total_q + tok) * p.h + head) * HD;
          const float sc = inv_l[mt][hf] * out_scale;
#pragma unroll
          for (int dt = 0; dt < DT; ++dt)
            *reinterpret_cast<float2*>(dst + dt * 8 + 2 * t) =
                make_float2(acc_o[mt][dt][2 * hf] * sc, acc_o[mt][dt][2 * hf + 1] * sc);
          if (t == 0) p.lse_accum[(int64_t(split) * p.h + head) * p.total_q + tok] = lse_v[mt][hf];
        }
      }
    return;
  }

  // O through shared memory (the Q buffer) for 16-byte coalesced stores.
  __syncthreads();
  T* sO = sQ;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_row0 + mt * 16 + g + hf * 8;
      const float sc = inv_l[mt][hf] * out_scale;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(sO + row * kStride + dt * 8 + 2 * t) =
            ptx::pack2<T>(acc_o[mt][dt][2 * hf] * sc, acc_o[mt][dt][2 * hf + 1] * sc);
      if (t == 0 && row < m_valid) p.lse[int64_t(head) * p.total_q + q_start + m0 + row] = lse_v[mt][hf];
    }
  __syncthreads();
  T* gO = static_cast<T*>(p.o) + int64_t(q_start + m0) * p.o_row_stride + head * p.o_head_stride;
  constexpr int CPR = HD / 8;
#pragma unroll
  for (int i = 0; i < ceil_div(BM * CPR, Tr::kThreads); ++i) {
    const int c = tid + i * Tr::kThreads;
    const int row = c / CPR, col = (c % CPR) * 8;
    if (row < m_valid && col < p.d)
      *reinterpret_cast<uint4*>(gO + int64_t(row) * p.o_row_stride + col) =
          *reinterpret_cast<const uint4*>(sO + row * kStride + col);
  }
}

// Merge split partials: LSE = logsumexp_s LSE_s, O = sum_s exp(LSE_s - LSE) O_s. One thread per 4 columns.
template <typename T, int HD>
__global__ void fwd_combine_kernel(const FwdParams p) {
  constexpr int CPR = HD / 4;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = int64_t(p.total_q) * p.h;
  if (idx >= rows * CPR) return;
  const int64_t r = idx / CPR;
  const int col = int(idx % CPR) * 4;
  const int tok = int(r / p.h), head = int(r % p.h);
  if (col >= p.d) return;
  const int64_t lse_stride = int64_t(p.h) * p.total_q;
  const float* lse_p = p.lse_accum + int64_t(head) * p.total_q + tok;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, lse_p[s * lse_stride]);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float lse = INFINITY;
  if (mx != -INFINITY) {
    float sum = 0.f;
    for (int s = 0; s < p.num_splits; ++s) sum += expf(lse_p[s * lse_stride] - mx);
    lse = mx + logf(sum);
    const int64_t o_stride = int64_t(p.total_q) * p.h * HD;
    const float* o_p = p.o_accum + r * HD + col;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = expf(lse_p[s * lse_stride] - lse);
      if (w > 0.f) {
        const float4 v = *reinterpret_cast<const float4*>(o_p + s * o_stride);
        acc.x += w * v.x; acc.y += w * v.y; acc.z += w * v.z; acc.w += w * v.w;
      }
    }
  }
  T* dst = static_cast<T*>(p.o) + int64_t(tok) * p.o_row_stride + int64_t(head) * p.o_head_stride + col;
  uint2 packed = make_uint2(ptx::pack2<T>(acc.x, acc.y), ptx::pack2<T>(acc.z, acc.w));
  *reinterpret_cast<uint2*>(dst) = packed;
  if (col == 0) p.lse[int64_t(head) * p.total_q + tok] = lse;
}

inline void fwd_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("flashserve fwd: ") + what + ": " + cudaGetErrorString(e));
}

// Raises kKernel's dynamic shared-memory limit to smem bytes, once per device: a driver call on every launch
// costs microseconds on short launches. A template argument, so each kernel keeps its own flags.
template <auto kKernel>
void raise_smem_limit_once(int smem, const char* what) {
  static bool done[64] = {false};
  int dev = 0;
  fwd_check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev >= 0 && dev < 64 && done[dev]) return;
  fwd_check(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), what);
  if (dev >= 0 && dev < 64) done[dev] = true;
}

template <typename T, typename Tr, bool kFull, bool kSplit>
void launch_fwd_tr(const FwdParams& p, cudaStream_t stream) {
  constexpr int HD = Tr::HD;
  auto kernel = fwd_kernel<T, Tr, kFull, kSplit>;
  constexpr int smem = Tr::kSmemBytes;
  if (smem > 48 * 1024)
    raise_smem_limit_once<fwd_kernel<T, Tr, kFull, kSplit>>(smem, "cudaFuncSetAttribute(max dynamic shared memory)");
  const int splits = kSplit ? p.num_splits : 1;
  dim3 grid(ceil_div(p.max_seqlen_q, Tr::BM), p.h, p.b * splits);
  if (grid.x == 0 || p.b == 0) return;
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  fwd_check(cudaGetLastError(), "forward kernel launch");
  if (kSplit) {
    const int64_t n = int64_t(p.total_q) * p.h * (HD / 4);
    if (n == 0) return;
    const int threads = 256;
    fwd_combine_kernel<T, HD><<<unsigned((n + threads - 1) / threads), threads, 0, stream>>>(p);
    fwd_check(cudaGetLastError(), "split-KV combine kernel launch");
  }
}

#ifdef FS_TUNE
// Tuning builds (FLASHSERVE_NVCC_FLAGS=-DFS_TUNE): FLASHSERVE_FWD_TILE=<BM>x<BN>x<NW>, read at every launch,
// picks one of a few alternative tiles compiled in for head-dim classes 64, 128 and 256 (else the default).
template <typename T, int HD, bool kFull, bool kSplit, int BM, int BN, int NW>
bool fwd_try_tile(const FwdParams& p, cudaStream_t stream, int bm, int bn, int nw) {
  if (bm != BM || bn != BN || nw != NW) return false;
  launch_fwd_tr<T, FwdTraits<HD, BM, BN, NW>, kFull, kSplit>(p, stream);
  return true;
}

template <typename T, int HD, bool kFull, bool kSplit>
bool fwd_tune_launch(const FwdParams& p, cudaStream_t stream) {
  const char* e = std::getenv("FLASHSERVE_FWD_TILE");
  int bm = 0, bn = 0, nw = 0;
  if (e == nullptr || std::sscanf(e, "%dx%dx%d", &bm, &bn, &nw) != 3) return false;
  if constexpr (HD == 256) {
    return fwd_try_tile<T, HD, kFull, kSplit, 64, 64, 4>(p, stream, bm, bn, nw) ||
           fwd_try_tile<T, HD, kFull, kSplit, 128, 32, 8>(p, stream, bm, bn, nw) ||
           fwd_try_tile<T, HD, kFull, kSplit, 64, 32, 4>(p, stream, bm, bn, nw);
  } else if constexpr (HD == 128) {
    return fwd_try_tile<T, HD, kFull, kSplit, 64, 64, 4>(p, stream, bm, bn, nw) ||
           fwd_try_tile<T, HD, kFull, kSplit, 128, 32, 4>(p, stream, bm, bn, nw);
  } else if constexpr (HD == 64) {
    return fwd_try_tile<T, HD, kFull, kSplit, 128, 64, 4>(p, stream, bm, bn, nw) ||
           fwd_try_tile<T, HD, kFull, kSplit, 64, 64, 4>(p, stream, bm, bn, nw);
  }
  return false;
}
#endif

// Decode-like split-KV calls (at most 64 queries per sequence): a 64-row tile with 4 warps. With the 128-row
// default most of the tensor-core work is on padding rows; at 1 query x 32k keys that padding, not the K/V
// bytes, set the time.
template <int HD>
using FwdDecodeTraits = FwdTraits<HD, 64, FwdConfig<HD>::Traits::BN, 4>;

template <typename T, int HD, bool kFull, bool kSplit>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
#ifdef FS_TUNE
  if (fwd_tune_launch<T, HD, kFull, kSplit>(p, stream)) return;
#endif
  if constexpr (kSplit && FwdConfig<HD>::Traits::BM > 64) {
    if (p.max_seqlen_q <= 64) {
      launch_fwd_tr<T, FwdDecodeTraits<HD>, kFull, kSplit>(p, stream);
      return;
    }
  }
  launch_fwd_tr<T, typename FwdConfig<HD>::Traits, kFull, kSplit>(p, stream);
}

}  // namespace flashserve
