// FlashAttention backward, main kernel: one thread block per (K/V column block, query head, sequence).
//
// The block keeps K_j and V_j (Bc keys x D) in shared memory and dK_j, dV_j in fp32 registers, and loops
// over the query blocks i that can see any of its keys (Br rows each; Q_i, dO_i, LSE_i, D_i double-buffered
// with cp.async where shared memory allows):
//   S^T = K_j Q_i^T,  P^T = exp2(S^T * scale * log2e - LSE_i * log2e)   (softcap / ALiBi / masks folded in)
//   dP^T = V_j dO_i^T
//   dS^T = P^T o (dP^T o M / (1 - p) - D_i)            (M: dropout keep mask; no dropout: M / (1-p) = 1)
//   dV_j += (P o M / (1 - p))^T dO_i,  dK_j += dS^T Q_i,  dQ_i += dS K_j  (fp32 atomics into dq_accum)
// Computing the transposed score tile lets each warp own 16 keys: the rows of dK_j / dV_j it accumulates.
// P^T and dS^T go through shared memory (bf16/fp16) because dQ needs dS with the other orientation.
//
// Deterministic mode: gridDim.x = num_splits; block x handles K/V blocks x, x + num_splits, ... one after
// the other and adds into its own slice of dq_accum, so each dq_accum element has one writer thread (program
// order fixes the summation order); the postprocess sums the slices in a fixed order.
//
// All warp-level matrix math is mma.sync.m16n8k16 (fp32 accumulate) fed by ldmatrix: sm_80 and sm_90.
#pragma once
#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/dropout.cuh"
#include "../common/ptx.cuh"
#include "bwd_params.h"

namespace flashserve {
namespace bwd {

__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// ------------------------------------------------------------------------------------------------
// Tile shapes per head-dim class. 8 warps as WK x WD; warp w owns keys KW*(w % WK) .. +KW of the block (MT
// m-tiles of 16) and, for dK/dV, head-dim columns DW*(w / WK) .. +DW; in S^T / dP^T it computes its keys x
// QW queries starting at QW*(w / WK).
template <int kD_, int kStages_>
struct Traits {
  static constexpr int kD = kD_;
  static constexpr int kStages = kStages_;  // Q/dO buffers: 2 = prefetch the next query block
  static constexpr bool kBig = kD > 128;
  static constexpr int Bc = kBig ? 64 : 128;  // keys per block
  static constexpr int Br = 64;               // queries per iteration
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int WK = kBig ? 2 : 4;  // 32 keys per warp either way
  static constexpr int WD = kWarps / WK;
  static constexpr int KW = Bc / WK;  // keys per warp
  static constexpr int MT = KW / 16;  // m-tiles per warp
  static constexpr int QW = Br / WD;  // queries per warp in S^T / dP^T
  static constexpr int DW = kD / WD;  // dK/dV columns per warp
  static constexpr int MQ = Br / 16;  // warps along query rows in dQ
  static constexpr int NQ = kWarps / MQ;
  static constexpr int DQW = kD / NQ;                      // dQ columns per warp
  static constexpr int DQC = DQW > 64 ? 32 : DQW;  // dQ columns per pass (register bound)
  static constexpr int kRow = kD + 8;                      // smem row stride (elements): 16 B pad, no bank conflicts
  static constexpr int kPRow = Br + 8;
  static_assert(WK * WD == kWarps, "warp layout");
  static_assert(QW % 16 == 0 && DW % 16 == 0 && DQC % 16 == 0 && DQW % DQC == 0, "tile shape");

  // Shared memory, in elements of 2 bytes, then two fp32 arrays per stage.
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + Bc * kRow;
  static constexpr int kOffQ = kOffV + Bc * kRow;
  static constexpr int kOffdO = kOffQ + kStages * Br * kRow;
  static constexpr int kOffP = kOffdO + kStages * Br * kRow;
  static constexpr int kOffdS = kOffP + Bc * kPRow;
  static constexpr int kElems = kOffdS + Bc * kPRow;
  static constexpr int kSmemBytes = kElems * 2 + kStages * Br * 2 * 4;
};

// ------------------------------------------------------------------------------------------------
template <typename T, int kD, int kStages, bool kExtras>
__global__ void __launch_bounds__(256, 1) bwd_main_kernel(const BwdParams p) {
  using Tr = Traits<kD, kStages>;
  constexpr int Bc = Tr::Bc, Br = Tr::Br, kRow = Tr::kRow, kPRow = Tr::kPRow;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  float* sLse = reinterpret_cast<float*>(smem_raw + Tr::kElems * 2);  // [kStages][Br]
  float* sDs = sLse + kStages * Br;                                    // [kStages][Br]
  const uint32_t sK = ptx::smem_addr(smem + Tr::kOffK), sV = ptx::smem_addr(smem + Tr::kOffV);
  const uint32_t sQ0 = ptx::smem_addr(smem + Tr::kOffQ), sdO0 = ptx::smem_addr(smem + Tr::kOffdO);
  const uint32_t sP = ptx::smem_addr(smem + Tr::kOffP), sdS = ptx::smem_addr(smem + Tr::kOffdS);
  T* sP_ptr = smem + Tr::kOffP;
  T* sdS_ptr = smem + Tr::kOffdS;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int group = p.h / p.h_k;
  const int hk = h / group;

  const int q_start = p.cu_seqlens_q[b], sq = p.cu_seqlens_q[b + 1] - q_start;
  const int k_start = p.cu_seqlens_k[b], sk = p.cu_seqlens_k[b + 1] - k_start;
  const int nkb = (sk + Bc - 1) / Bc;
  const int diag = sk - sq;  // key j is on query i's diagonal when j == i + diag
  const int wl = p.window_left, wr = p.window_right;

  const T* qg = reinterpret_cast<const T*>(p.q) + (int64_t)q_start * p.q_row_stride + (int64_t)h * p.q_head_stride;
  const T* dog =
      reinterpret_cast<const T*>(p.dout) + (int64_t)q_start * p.do_row_stride + (int64_t)h * p.do_head_stride;
  const T* kg = reinterpret_cast<const T*>(p.k) + (int64_t)k_start * p.k_row_stride + (int64_t)hk * p.k_head_stride;
  const T* vg = reinterpret_cast<const T*>(p.v) + (int64_t)k_start * p.v_row_stride + (int64_t)hk * p.v_head_stride;
  const float* lseg = p.lse + (int64_t)h * p.total_q + q_start;
  const float* dsg = p.dsum + (int64_t)h * p.total_q + q_start;

  const bool has_softcap = p.softcap > 0.f;
  const float scale_log2 = has_softcap ? p.scale / p.softcap : p.scale * kLog2e;  // softcap: tanh argument
  const float cap_log2 = p.softcap * kLog2e;
  const float alibi_log2 = p.alibi ? p.alibi[(int64_t)b * p.alibi_batch_stride + h] * kLog2e : 0.f;
  const bool has_dropout = p.p_drop > 0.f;
  const float rp = has_dropout ? 1.f / (1.f - p.p_drop) : 1.f;
  const uint32_t keep_thr = dropout_keep_threshold(p.p_drop);
  const uint32_t seq_head = (uint32_t)(b * p.h + h);

  // Warp roles.
  const int wk = warp % Tr::WK, wd = warp / Tr::WK;
  const int kw0 = wk * Tr::KW;    // first key (in block) of this warp
  const int qw0 = wd * Tr::QW;    // first query (in tile) of this warp's S^T slice
  const int dw0 = wd * Tr::DW;    // first dK/dV column of this warp
  const int qm0 = (warp % Tr::MQ) * 16;  // dQ rows of this warp
  const int dq0 = (warp / Tr::MQ) * Tr::DQW;

  // ldmatrix per-lane offsets.
  const int lrow_a = (lane & 7) + ((lane >> 3) & 1) * 8, lcol_a = (lane >> 4) * 8;  // A non-trans, B trans
  const int lrow_b = (lane & 7) + (lane >> 4) * 8, lcol_b = ((lane >> 3) & 1) * 8;  // B non-trans, A trans

  int split = 0, kb_begin = blockIdx.x, kb_step = gridDim.x;
  if (p.deterministic) split = blockIdx.x;
  else kb_step = 1 << 30;  // one block each
  float* dq_acc = p.dq_accum + ((int64_t)split * p.total_q + q_start) * p.h * p.d + (int64_t)h * p.d;
  const int64_t dq_row = (int64_t)p.h * p.d;

  for (int kb = kb_begin; kb < nkb; kb += kb_step) {
    const int j0 = kb * Bc;
    __syncthreads();  // previous K/V block fully consumed

    // Query range that sees any key of [j0, j0 + Bc).
    int i_lo = 0, i_hi = sq;
    if (wr >= 0) i_lo = max(0, j0 - diag - wr);
    if (wl >= 0) i_hi = min(sq, j0 + Bc - 1 - diag + wl + 1);
    const int m_begin = i_lo / Br;
    const int m_end = i_hi > i_lo ? (i_hi + Br - 1) / Br : m_begin;

    // Loaders.
    auto load_kv = [&]() {
      constexpr int kChunks = Bc * (kD / 8);
      for (int c = tid; c < kChunks; c += Tr::kThreads) {
        const int r = c / (kD / 8), col = (c % (kD / 8)) * 8;
        const bool ok = (j0 + r < sk) && (col < p.d);
        const int rr = ok ? j0 + r : 0, cc = ok ? col : 0;
        ptx::cp_async16(sK + (r * kRow + col) * 2, kg + (int64_t)rr * p.k_row_stride + cc, ok ? 16 : 0);
        ptx::cp_async16(sV + (r * kRow + col) * 2, vg + (int64_t)rr * p.v_row_stride + cc, ok ? 16 : 0);
      }
    };
    auto load_q = [&](int m, int stage) {
      const int i0 = m * Br;
      const uint32_t q_s = sQ0 + stage * Br * kRow * 2, do_s = sdO0 + stage * Br * kRow * 2;
      constexpr int kChunks = Br * (kD / 8);
      for (int c = tid; c < kChunks; c += Tr::kThreads) {
        const int r = c / (kD / 8), col = (c % (kD / 8)) * 8;
        const bool ok = (i0 + r < sq) && (col < p.d);
        const int rr = ok ? i0 + r : 0, cc = ok ? col : 0;
        ptx::cp_async16(q_s + (r * kRow + col) * 2, qg + (int64_t)rr * p.q_row_stride + cc, ok ? 16 : 0);
        ptx::cp_async16(do_s + (r * kRow + col) * 2, dog + (int64_t)rr * p.do_row_stride + cc, ok ? 16 : 0);
      }
      if (tid < Br) {
        const bool ok = i0 + tid < sq;
        const int rr = ok ? i0 + tid : 0;
        ptx::cp_async4(ptx::smem_addr(sLse + stage * Br + tid), lseg + rr, ok ? 4 : 0);
        ptx::cp_async4(ptx::smem_addr(sDs + stage * Br + tid), dsg + rr, ok ? 4 : 0);
      }
    };

    float dk[Tr::MT][Tr::DW / 8][4], dv[Tr::MT][Tr::DW / 8][4];
#pragma unroll
    for (int mi = 0; mi < Tr::MT; ++mi)
#pragma unroll
      for (int n = 0; n < Tr::DW / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[mi][n][e] = dv[mi][n][e] = 0.f;

    if (m_begin < m_end) {
      load_kv();
      load_q(m_begin, 0);
      ptx::cp_async_commit();
    }

    for (int m = m_begin; m < m_end; ++m) {
      const int it = m - m_begin;
      int stage = 0;
      if constexpr (kStages == 2) {
        stage = it & 1;
        ptx::cp_async_wait<0>();
        __syncthreads();  // this tile landed; everyone is done with the previous iteration
        if (m + 1 < m_end) load_q(m + 1, stage ^ 1);
        ptx::cp_async_commit();
      } else {
        if (it > 0) {
          __syncthreads();  // everyone is done with the previous tile
          load_q(m, 0);
          ptx::cp_async_commit();
        }
        ptx::cp_async_wait<0>();
        __syncthreads();
      }
      const uint32_t sQ = sQ0 + stage * Br * kRow * 2, sdO = sdO0 + stage * Br * kRow * 2;
      const float* lse_s = sLse + stage * Br;
      const float* ds_s = sDs + stage * Br;
      const int i0 = m * Br;

      // ---- S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x QW queries.
      float s[Tr::MT][Tr::QW / 8][4], dp[Tr::MT][Tr::QW / 8][4];
#pragma unroll
      for (int mi = 0; mi < Tr::MT; ++mi)
#pragma unroll
        for (int n = 0; n < Tr::QW / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][n][e] = dp[mi][n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a[Tr::MT][4], av[Tr::MT][4];
#pragma unroll
        for (int mi = 0; mi < Tr::MT; ++mi) {
          ptx::ldmatrix_x4(a[mi], sK + ((kw0 + mi * 16 + lrow_a) * kRow + kk * 16 + lcol_a) * 2);
          ptx::ldmatrix_x4(av[mi], sV + ((kw0 + mi * 16 + lrow_a) * kRow + kk * 16 + lcol_a) * 2);
        }
#pragma unroll
        for (int np = 0; np < Tr::QW / 16; ++np) {
          uint32_t bq[4], bo[4];
          ptx::ldmatrix_x4(bq, sQ + ((qw0 + np * 16 + lrow_b) * kRow + kk * 16 + lcol_b) * 2);
          ptx::ldmatrix_x4(bo, sdO + ((qw0 + np * 16 + lrow_b) * kRow + kk * 16 + lcol_b) * 2);
#pragma unroll
          for (int mi = 0; mi < Tr::MT; ++mi) {
            ptx::mma16816<T>(s[mi][2 * np], a[mi], bq[0], bq[1]);
            ptx::mma16816<T>(s[mi][2 * np + 1], a[mi], bq[2], bq[3]);
            ptx::mma16816<T>(dp[mi][2 * np], av[mi], bo[0], bo[1]);
            ptx::mma16816<T>(dp[mi][2 * np + 1], av[mi], bo[2], bo[3]);
          }
        }
      }

      // ---- Elementwise: P, masks, dropout, dS. Element (mi, n, e): key kw0 + 16 mi + g + 8 (e / 2), query
      // qw0 + 8 n + 2 t + e % 2 of the tile. Two compile-time variants: interior tiles (no mask) and boundary
      // tiles; softcap / ALiBi / dropout code exists only in kernels compiled with kExtras.
      const bool full = (i0 + Br <= sq) && (j0 + Bc <= sk) && (wr < 0 || j0 + Bc - 1 <= i0 + diag + wr) &&
                        (wl < 0 || j0 >= i0 + Br - 1 + diag - wl);
      auto elementwise = [&](auto full_tag) {
        constexpr bool kFull = decltype(full_tag)::value;
#pragma unroll
        for (int mi = 0; mi < Tr::MT; ++mi) {
#pragma unroll
          for (int n = 0; n < Tr::QW / 8; ++n) {
            const int kr0 = kw0 + mi * 16;       // first key (in block) of this m-tile
            const int ql = qw0 + n * 8 + 2 * t;  // query in tile (and ql + 1)
            const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + ql);
            const float2 dd = *reinterpret_cast<const float2*>(ds_s + ql);
            const float l2[2] = {lse2.x * kLog2e, lse2.y * kLog2e};
            const float dval[2] = {dd.x, dd.y};
            uint32_t keep_bits = 0xF;  // bit (e): element e kept
            if constexpr (kExtras) {
              if (has_dropout) {
                // The 4 lanes with equal (g / 4, t) need the same 4 Philox draws: (query 2t or 2t+1) x (key
                // group of row g or g + 8). Each lane draws one and they exchange.
                const int mine = g & 3;
                const uint32_t grp = (uint32_t)((j0 + kr0) / 4 + (g >> 2) + (mine >> 1) * 2);
                const uint32_t row = (uint32_t)(i0 + ql + (mine & 1));
                const uint32_t bits = dropout_keep4(p.seed, p.offset, seq_head, row, grp, keep_thr);
                keep_bits = 0;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  // element e: query offset e % 2, key half e / 2 -> drawn by the lane with mine = 2 (e/2) + e%2
                  const int src = (((g >> 2) * 4) + (e >> 1) * 2 + (e & 1)) * 4 + t;
                  const uint32_t w = __shfl_sync(0xffffffffu, bits, src);
                  keep_bits |= ((w >> (g & 3)) & 1u) << e;
                }
              }
            }
            float pv[4], dsv[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float x = s[mi][n][e];
              float pr, th = 0.f;
              if constexpr (kExtras) {
                const int kj = j0 + kr0 + g + (e >> 1) * 8;  // key index in sequence
                const int qi = i0 + ql + (e & 1);            // query index in sequence
                float logit;
                if (has_softcap) {
                  th = tanhf(x * scale_log2);  // accurate: P must match the forward's LSE
                  logit = th * cap_log2;
                } else {
                  logit = x * scale_log2;
                }
                if (p.alibi) logit -= alibi_log2 * fabsf((float)(qi + diag - kj));
                pr = ptx::ex2(logit - l2[e & 1]);
              } else {
                pr = ptx::ex2(fmaf(x, scale_log2, -l2[e & 1]));
              }
              if constexpr (!kFull) {
                const int kj = j0 + kr0 + g + (e >> 1) * 8;
                const int qi = i0 + ql + (e & 1);
                const bool vis =
                    kj < sk && qi < sq && (wr < 0 || kj <= qi + diag + wr) && (wl < 0 || kj >= qi + diag - wl);
                if (!vis) pr = 0.f;
              }
              float dpv = dp[mi][n][e];
              float pd = pr;
              if constexpr (kExtras) {
                if (has_dropout) {
                  const bool kept = (keep_bits >> e) & 1u;
                  pd = kept ? pr * rp : 0.f;
                  dpv = kept ? dpv * rp : 0.f;
                }
              }
              float dsx = pr * (dpv - dval[e & 1]);
              if constexpr (kExtras) {
                if (has_softcap) dsx *= (1.f - th * th);
              }
              pv[e] = pd;
              dsv[e] = dsx;
              (void)th;
            }
            (void)keep_bits;
            const int r0 = kr0 + g;
            *reinterpret_cast<uint32_t*>(sP_ptr + r0 * kPRow + ql) = ptx::pack2<T>(pv[0], pv[1]);
            *reinterpret_cast<uint32_t*>(sP_ptr + (r0 + 8) * kPRow + ql) = ptx::pack2<T>(pv[2], pv[3]);
            *reinterpret_cast<uint32_t*>(sdS_ptr + r0 * kPRow + ql) = ptx::pack2<T>(dsv[0], dsv[1]);
            *reinterpret_cast<uint32_t*>(sdS_ptr + (r0 + 8) * kPRow + ql) = ptx::pack2<T>(dsv[2], dsv[3]);
          }
        }
      };
      if (full) elementwise(std::true_type{});
      else elementwise(std::false_type{});
      __syncthreads();

      // ---- dV += P^T dO, dK += dS^T Q (this warp: 16 keys x DW columns), k = all Br queries.
#pragma unroll
      for (int kk = 0; kk < Br / 16; ++kk) {
        uint32_t ap[Tr::MT][4], as[Tr::MT][4];
#pragma unroll
        for (int mi = 0; mi < Tr::MT; ++mi) {
          ptx::ldmatrix_x4(ap[mi], sP + ((kw0 + mi * 16 + lrow_a) * kPRow + kk * 16 + lcol_a) * 2);
          ptx::ldmatrix_x4(as[mi], sdS + ((kw0 + mi * 16 + lrow_a) * kPRow + kk * 16 + lcol_a) * 2);
        }
#pragma unroll
        for (int np = 0; np < Tr::DW / 16; ++np) {
          uint32_t bo[4], bq[4];
          ptx::ldmatrix_x4_trans(bo, sdO + ((kk * 16 + lrow_a) * kRow + dw0 + np * 16 + lcol_a) * 2);
          ptx::ldmatrix_x4_trans(bq, sQ + ((kk * 16 + lrow_a) * kRow + dw0 + np * 16 + lcol_a) * 2);
#pragma unroll
          for (int mi = 0; mi < Tr::MT; ++mi) {
            ptx::mma16816<T>(dv[mi][2 * np], ap[mi], bo[0], bo[1]);
            ptx::mma16816<T>(dv[mi][2 * np + 1], ap[mi], bo[2], bo[3]);
            ptx::mma16816<T>(dk[mi][2 * np], as[mi], bq[0], bq[1]);
            ptx::mma16816<T>(dk[mi][2 * np + 1], as[mi], bq[2], bq[3]);
          }
        }
      }

      // ---- dQ (rows qm0.. +16, columns dq0 .. +DQW) += dS K, into the fp32 accumulator.
#pragma unroll
      for (int c0 = 0; c0 < Tr::DQW; c0 += Tr::DQC) {
        float acc[Tr::DQC / 8][4];
#pragma unroll
        for (int n = 0; n < Tr::DQC / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < Bc / 16; ++kk) {
          uint32_t a[4];
          ptx::ldmatrix_x4_trans(a, sdS + ((kk * 16 + lrow_b) * kPRow + qm0 + lcol_b) * 2);
#pragma unroll
          for (int np = 0; np < Tr::DQC / 16; ++np) {
            uint32_t bk[4];
            ptx::ldmatrix_x4_trans(bk, sK + ((kk * 16 + lrow_a) * kRow + dq0 + c0 + np * 16 + lcol_a) * 2);
            ptx::mma16816<T>(acc[2 * np], a, bk[0], bk[1]);
            ptx::mma16816<T>(acc[2 * np + 1], a, bk[2], bk[3]);
          }
        }
        const int qa = i0 + qm0 + g;
#pragma unroll
        for (int n = 0; n < Tr::DQC / 8; ++n) {
          const int col = dq0 + c0 + n * 8 + 2 * t;
          if (col < p.d) {
            if (qa < sq) atomic_add2(dq_acc + (int64_t)qa * dq_row + col, acc[n][0], acc[n][1]);
            if (qa + 8 < sq) atomic_add2(dq_acc + (int64_t)(qa + 8) * dq_row + col, acc[n][2], acc[n][3]);
          }
        }
      }
    }

    ptx::cp_async_wait<0>();  // nothing in flight past this block (the last prefetch group is empty)

    // ---- Write dK (scaled) and dV for this warp's keys: element (mi, n, e) is key kw0 + 16 mi + g + 8 (e / 2),
    // column dw0 + 8 n + 2 t + e % 2.
    const float sc = p.scale;
#pragma unroll
    for (int mi = 0; mi < Tr::MT; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int ka = j0 + kw0 + mi * 16 + g + half * 8;
        if (ka >= sk) continue;
#pragma unroll
        for (int n = 0; n < Tr::DW / 8; ++n) {
          const int col = dw0 + n * 8 + 2 * t;
          if (col >= p.d) continue;
          const float k0 = dk[mi][n][2 * half] * sc, k1 = dk[mi][n][2 * half + 1] * sc;
          const float v0 = dv[mi][n][2 * half], v1 = dv[mi][n][2 * half + 1];
          if (group == 1) {
            const int64_t off = ((int64_t)(k_start + ka) * p.h_k + hk) * p.d + col;
            *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dk) + off) = ptx::pack2<T>(k0, k1);
            *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dv) + off) = ptx::pack2<T>(v0, v1);
          } else {
            // GQA: fp32 per query head; the postprocess sums the group in a fixed order.
            const int64_t off = ((int64_t)(k_start + ka) * p.h + h) * p.d + col;
            *reinterpret_cast<float2*>(p.dk_accum + off) = make_float2(k0, k1);
            *reinterpret_cast<float2*>(p.dv_accum + off) = make_float2(v0, v1);
          }
        }
      }
    }
  }
}

template <typename T, int kD, int kStages>
cudaError_t launch_main(const BwdParams& p, cudaStream_t stream) {
  using Tr = Traits<kD, kStages>;
  const bool extras = p.softcap > 0.f || p.alibi != nullptr || p.p_drop > 0.f;
  auto kernel = extras ? bwd_main_kernel<T, kD, kStages, true> : bwd_main_kernel<T, kD, kStages, false>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  const int nkb = (p.max_seqlen_k + Tr::Bc - 1) / Tr::Bc;
  const int gx = p.deterministic ? p.num_splits : nkb;
  if (gx == 0 || p.b == 0 || p.h == 0) return cudaSuccess;
  dim3 grid(gx, p.h, p.b);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Picks the Q/dO buffering that fits the device's shared memory (A100: 163 KB per block; H100: 227 KB).
template <typename T, int kD>
cudaError_t run_main_impl(const BwdParams& p, cudaStream_t stream, size_t smem_optin) {
  if constexpr (kD < 128) {
    return launch_main<T, kD, 2>(p, stream);  // fits in 163 KB
  } else {
    if ((size_t)Traits<kD, 2>::kSmemBytes <= smem_optin) return launch_main<T, kD, 2>(p, stream);
    return launch_main<T, kD, 1>(p, stream);
  }
}

// One entry per (head-dim class, dtype), each defined in inst/bwd_hd<D>_<dtype>.cu when that file's class
// is selected by the build (FLASHSERVE_HD_<D> and FLASHSERVE_DT_<DTYPE>).
#define FLASHSERVE_BWD_DECLARE(D)                                                                  \
  cudaError_t run_main_hd##D##_bf16(const BwdParams& p, cudaStream_t stream, size_t smem_optin); \
  cudaError_t run_main_hd##D##_fp16(const BwdParams& p, cudaStream_t stream, size_t smem_optin);
FLASHSERVE_BWD_DECLARE(32)
FLASHSERVE_BWD_DECLARE(64)
FLASHSERVE_BWD_DECLARE(96)
FLASHSERVE_BWD_DECLARE(128)
FLASHSERVE_BWD_DECLARE(192)
FLASHSERVE_BWD_DECLARE(256)
#undef FLASHSERVE_BWD_DECLARE

}  // namespace bwd
}  // namespace flashserve
