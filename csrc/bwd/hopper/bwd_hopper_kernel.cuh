// FlashAttention backward main kernel for sm_90a (H100): the five products on wgmma.mma_async.
//
// Same decomposition as ../bwd_kernel.cuh (one block per (K/V block of Bc = 128 keys, query head, sequence),
// loop over query blocks of Br = 64 rows (128 at d64), fp32 dQ accumulator with atomics; deterministic mode
// either owns one dQ slice per block, blocks looping over several K/V blocks, or orders the additions per query
// block with a counter: see "K/V-block loop" below), but the block is two consumer warpgroups, warpgroup w
// owning keys 64 w .. 64 w + 63:
//   S^T  = K_w Q^T,  dP^T = V_w dO^T          wgmma SS, both operands K-major (head dim contiguous)
//   P^T, dS^T elementwise in the accumulator registers
//   dV_w += P^T dO,  dK_w += dS^T Q             wgmma RS: the 16-bit P^T / dS^T fragments are the A operand
//                                               straight from the accumulator layout; dO / Q are MN-major B
//   dQ = dS K                                   wgmma SS, A = dS^T from shared memory (MN-major), B = K
//                                               (MN-major), split over the warpgroups by rows (d64) or
//                                               columns (d128); added into dq_accum with float4 atomics
// Shared-memory tiles use the 128-byte swizzle: a tile of R rows x D columns (16-bit) is stored as D / 64
// column panels of R rows x 128 bytes, and 16-byte chunk c of row r sits at chunk c ^ (r % 8). Q / dO / LSE / D
// are double-buffered with cp.async (the next tile loads while this one computes).
// Dropout is not here: the dispatcher keeps such calls on the mma.sync kernel.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "bwd_hopper_common.cuh"

namespace flashserve {
namespace bwd {
namespace hopper {

template <int kD_>
struct HTraits {
  static constexpr int kD = kD_;
  static constexpr int Bc = 128, kThreads = 256;
  // d64: Br = 128 and warpgroup w computes dQ rows 64 w .. 64 w + 63 (all 64 columns); d128: Br = 64 and
  // warpgroup w computes dQ columns 64 w .. 64 w + 63 (one 128-byte swizzle panel of K each).
  static constexpr int Br = kD == 64 ? 128 : 64;
  static constexpr bool kSplitQ = Br == 128;
  static constexpr int kDQ = kSplitQ ? kD : kD / 2;  // dQ columns per warpgroup
  static constexpr int kKV = Bc * kD * 2, kQ = Br * kD * 2, kdS = Bc * Br * 2;
  static constexpr int kOffK = 0, kOffV = kKV, kOffQ = 2 * kKV, kOffdO = kOffQ + 2 * kQ, kOffdS = kOffdO + 2 * kQ;
  static constexpr int kOffLse = kOffdS + kdS, kOffDs = kOffLse + 2 * Br * 4;
  static constexpr int kSmemBytes = kOffDs + 2 * Br * 4 + 1024;  // + alignment slack (swizzle atoms: 1024 B)
  static_assert(kD == 64 || kD == 128, "Hopper backward: head-dim classes 64 and 128");
};

template <typename T, int kD, bool kExtras, bool kDet>
__global__ void __launch_bounds__(256, 1) bwd_hopper_kernel(const BwdParams p, const int chunk) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = HTraits<kD>;
  constexpr int Bc = Tr::Bc, Br = Tr::Br, kDQ = Tr::kDQ;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = ptx::smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* base_ptr = smem_raw + (base - raw);
  const uint32_t sK = base + Tr::kOffK, sV = base + Tr::kOffV;
  const uint32_t sQ0 = base + Tr::kOffQ, sdO0 = base + Tr::kOffdO, sdS = base + Tr::kOffdS;
  unsigned char* sdS_ptr = base_ptr + Tr::kOffdS;
  float* sLse = reinterpret_cast<float*>(base_ptr + Tr::kOffLse);  // [2][Br]
  float* sDs = reinterpret_cast<float*>(base_ptr + Tr::kOffDs);    // [2][Br]

  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, wwarp = (tid >> 5) & 3;  // warpgroup, warp within it
  const int g = lane >> 2, t = lane & 3;
  // Default mode with chunk > 1: the linear block index (blocks start in about this order) maps to (kb, h, b) in
  // chunks of `chunk` (head, sequence) pairs with kb slowest inside a chunk, so under a causal mask the long K/V
  // blocks (far from the diagonal) start first and the grid ends on short ones; chunk = 1: kb = blockIdx.x.
  int bx = (int)blockIdx.x, h = (int)blockIdx.y, b = (int)blockIdx.z;
  if (!kDet && chunk > 1) {
    const int nkbm = (int)gridDim.x, npairs = p.b * p.h, per = chunk * nkbm;
    const int w = bx + nkbm * (h + p.h * b);
    const int c = w / per, r = w - c * per, pair0 = c * chunk, cc = min(chunk, npairs - pair0);
    bx = r / cc;
    const int pair = pair0 + (r - bx * cc);
    b = pair / p.h;
    h = pair - b * p.h;
  }
  const int group = p.h / p.h_k;
  const int hk = h / group;

  const int q_start = p.cu_seqlens_q[b], sq = p.cu_seqlens_q[b + 1] - q_start;
  const int k_start = p.cu_seqlens_k[b], sk = p.cu_seqlens_k[b + 1] - k_start;
  const int nkb = (sk + Bc - 1) / Bc;
  const int diag = sk - sq;
  const int wl = p.window_left, wr = p.window_right;

  const T* qg = reinterpret_cast<const T*>(p.q) + (int64_t)q_start * p.q_row_stride + (int64_t)h * p.q_head_stride;
  const T* dog =
      reinterpret_cast<const T*>(p.dout) + (int64_t)q_start * p.do_row_stride + (int64_t)h * p.do_head_stride;
  const T* kg = reinterpret_cast<const T*>(p.k) + (int64_t)k_start * p.k_row_stride + (int64_t)hk * p.k_head_stride;
  const T* vg = reinterpret_cast<const T*>(p.v) + (int64_t)k_start * p.v_row_stride + (int64_t)hk * p.v_head_stride;
  const float* lseg = p.lse + (int64_t)h * p.total_q + q_start;
  const float* dsg = p.dsum + (int64_t)h * p.total_q + q_start;

  const bool has_softcap = kExtras && p.softcap > 0.f;
  const float scale_log2 = has_softcap ? p.scale / p.softcap : p.scale * kLog2e;
  const float cap_log2 = p.softcap * kLog2e;
  const float alibi_log2 = (kExtras && p.alibi) ? p.alibi[(int64_t)b * p.alibi_batch_stride + h] * kLog2e : 0.f;

  // One K/V block per CTA, except in deterministic-by-ownership mode (below). Deterministic mode with counters
  // (kDet) orders the dQ additions with one counter per (slice, sequence, head, query block).
  constexpr bool det = kDet;
  const int64_t dq_row = (int64_t)p.h * p.d;

  // Query blocks [lo, hi) that see any key of K/V block kbx.
  auto m_range = [&](int kbx, int& lo, int& hi) { query_block_range<Bc, Br>(kbx, sq, diag, wl, wr, lo, hi); };

  // This thread's rows in the m64 accumulator tiles: key (in block) of S^T / dK / dV rows, query of dQ rows.
  const int row0 = wwarp * 16 + g;  // and row0 + 8
  const int key0 = wg * 64 + row0;

  // Deterministic with a diagonal bound (causal, window_right >= 0): K/V block kb = nkb - 1 - blockIdx.x and
  // additions in decreasing kb: the block nearest the diagonal reaches a query block first. Either way a block
  // waits only for blocks of lower blockIdx.x (started before it: no deadlock).
  const bool rev = det && wr >= 0;
  // Deterministic: K/V block kb adds into dQ slice kb % num_splits (summed in order by the postprocess), so
  // the chain of blocks that wait for each other at a query block is num_splits times shorter.
  const int ns = det ? p.num_splits : 1;
  // K/V-block loop (p.loop_blocks = S > 0, the default-mode code): S blocks per (head, sequence), block x running
  // K/V blocks x, 2S - 1 - x, 2S + x, ... one after the other (the zigzag evens out causal lengths). Deterministic
  // by ownership (deterministic with loop_blocks = num_splits) is this with S dQ slices: block x alone adds into slice x, in that fixed order, so
  // every dQ element sees the same additions in the same order on every run.
  const bool looped = !kDet && p.loop_blocks > 0;  // K/V-block loop (see bwd_params.h)
  const int nsplit = looped ? (int)gridDim.x : 1;
  // dQ slice: looped, bx (own slices) or 0; else (one K/V block) kb % num_splits with counters, 0 by default.
  const int kb_single = rev ? nkb - 1 - bx : bx;
  const int slice = looped ? (p.num_splits > 1 ? bx : 0) : (det && kb_single > 0 ? kb_single % ns : 0);
  int* sem = det ? p.dq_sem + (((int64_t)slice * p.b + b) * p.h + h) * p.dq_sem_stride : nullptr;
  float* dq_acc = p.dq_accum + (int64_t)slice * p.total_q * p.h * p.d + (int64_t)q_start * p.h * p.d +
                  (int64_t)h * p.d;
  for (int it = 0;; ++it) {
    int kb;
    if (looped) {
      kb = it * nsplit + ((it & 1) ? nsplit - 1 - bx : bx);
      if (kb >= nkb) break;
      __syncthreads();  // the previous K/V block's reads of K, V and dS^T (wgmma included) are done
    } else {
      kb = kb_single;
      if (it > 0 || kb < 0 || kb >= nkb) break;
    }
    const int j0 = kb * Bc;
    int m_begin, m_end;
    m_range(kb, m_begin, m_end);

    auto load_kv = [&]() {
      load_tile_pair<Bc, kD, Tr::kThreads>(sK, kg, p.k_row_stride, sV, vg, p.v_row_stride, j0, sk, p.d, tid);
    };
    auto load_q = [&](int m, int stage) {
      const int i0 = m * Br;
      load_tile_pair<Br, kD, Tr::kThreads>(sQ0 + stage * Tr::kQ, qg, p.q_row_stride, sdO0 + stage * Tr::kQ, dog,
                                           p.do_row_stride, i0, sq, p.d, tid);
      load_row_stats<Br>(sLse + stage * Br, sDs + stage * Br, lseg, dsg, i0, sq, tid);
    };

    float dk[kD / 2], dv[kD / 2];
#pragma unroll
    for (int i = 0; i < kD / 2; ++i) dk[i] = dv[i] = 0.f;

    if (m_begin < m_end) {
      load_kv();
      load_q(m_begin, 0);
      ptx::cp_async_commit();
    }

    int pending = -1;  // deterministic: query block whose dQ additions are issued but not yet released
    int first = rev ? kb : 0;  // deterministic: see the wait below
    for (int m = m_begin; m < m_end; ++m) {
      const int stage = (m - m_begin) & 1;
      ptx::cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();  // tile m landed for everyone; iteration m - 1 (its wgmma reads included) is done
      if (m + 1 < m_end) load_q(m + 1, stage ^ 1);
      ptx::cp_async_commit();
      const uint32_t sQ = sQ0 + stage * Tr::kQ, sdO = sdO0 + stage * Tr::kQ;
      const float* lse_s = sLse + stage * Br;
      const float* ds_s = sDs + stage * Br;
      const int i0 = m * Br;

      // ---- S^T = K_w Q^T, dP^T = V_w dO^T (64 keys x Br queries each), two wgmma groups: P is computed while
      // the tensor cores work on dP^T, and dV's products run while dS is computed.
      float s[Br / 2], dp[Br / 2];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t ka = (kk >> 2) * Bc * 128 + wg * 64 * 128 + (kk & 3) * 32;
        const uint32_t qa = (kk >> 2) * Br * 128 + (kk & 3) * 32;
        Wgmma<T, Br>::template ss<0, 0>(s, make_desc(sK + ka, 16, 1024), make_desc(sQ + qa, 16, 1024), kk > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t ka = (kk >> 2) * Bc * 128 + wg * 64 * 128 + (kk & 3) * 32;
        const uint32_t qa = (kk >> 2) * Br * 128 + (kk & 3) * 32;
        Wgmma<T, Br>::template ss<0, 0>(dp, make_desc(sV + ka, 16, 1024), make_desc(sdO + qa, 16, 1024), kk > 0);
      }
      wgmma_commit();
      if (det && pending >= 0) {
        // Deterministic: release the previous query block. Every thread issued its additions before this
        // iteration's __syncthreads; the fence (cumulative, as in a grid barrier) waits for them while the
        // tensor cores run S^T / dP^T.
        if (tid == 0) release_dq_block(sem, pending);
        pending = -1;
      }
      wgmma_wait<1>();
      fence_regs(s);

      // ---- P^T (packed for dV) and P^T o softcap' (in place of S^T, for dS). Accumulator element e: key
      // key0 + 8 ((e / 2) % 2), query 8 (e / 4) + 2 t + e % 2.
      const bool full = (i0 + Br <= sq) && (j0 + Bc <= sk) && (wr < 0 || j0 + Bc - 1 <= i0 + diag + wr) &&
                        (wl < 0 || j0 >= i0 + Br - 1 + diag - wl);
      uint32_t pf[Br / 16][4], dsf[Br / 16][4];  // A fragments (k-chunk of 16 queries)
      auto softmax = [&](auto full_tag) {
        constexpr bool kFull = decltype(full_tag)::value;
#pragma unroll
        for (int n = 0; n < Br / 8; ++n) {
          const int ql = n * 8 + 2 * t;
          const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + ql);
          const float l2[2] = {lse2.x * kLog2e, lse2.y * kLog2e};
          float pv[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = s[n * 4 + e];
            float grad = 1.f;  // softcap: d(cap tanh(x / cap)) / dx = 1 - tanh^2
            const int kj = j0 + key0 + (e >> 1) * 8;  // key index in sequence
            const int qi = i0 + ql + (e & 1);         // query index in sequence
            float pr;
            if constexpr (kExtras) {
              float logit, th = 0.f;
              if (has_softcap) {
                th = tanhf(x * scale_log2);
                logit = th * cap_log2;
              } else {
                logit = x * scale_log2;
              }
              if (p.alibi) logit -= alibi_log2 * fabsf((float)(qi + diag - kj));
              pr = ptx::ex2(logit - l2[e & 1]);
              grad = 1.f - th * th;
            } else {
              pr = ptx::ex2(fmaf(x, scale_log2, -l2[e & 1]));
            }
            if constexpr (!kFull) {
              const bool vis =
                  kj < sk && qi < sq && (wr < 0 || kj <= qi + diag + wr) && (wl < 0 || kj >= qi + diag - wl);
              if (!vis) pr = 0.f;
            }
            pv[e] = pr;
            s[n * 4 + e] = pr * grad;
            (void)grad;
            (void)kj;
            (void)qi;
          }
          // A fragment of k-chunk n / 2: regs {0,1} from n-block 2c (rows g, g + 8), {2,3} from 2c + 1.
          const int c = n >> 1, hi = (n & 1) * 2;
          pf[c][hi] = ptx::pack2<T>(pv[0], pv[1]);
          pf[c][hi + 1] = ptx::pack2<T>(pv[2], pv[3]);
        }
      };
      if (full) softmax(std::true_type{});
      else softmax(std::false_type{});

      // ---- dV += P^T dO (k = Br queries; B = dO, MN-major: panels of 64 head-dim columns).
      fence_regs(dv);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Br / 16; ++kk)
        Wgmma<T, kD>::template rs<1>(dv, pf[kk], make_desc(sdO + kk * 2048, Br * 128, 1024), 1);
      wgmma_commit();
      wgmma_wait<1>();
      fence_regs(dp);

      // ---- dS^T = P^T o (dP^T - D) (o softcap'), as A fragments and into shared memory (row = key).
#pragma unroll
      for (int n = 0; n < Br / 8; ++n) {
        const int ql = n * 8 + 2 * t;
        const float2 dd = *reinterpret_cast<const float2*>(ds_s + ql);
        const float dval[2] = {dd.x, dd.y};
        float dsv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) dsv[e] = s[n * 4 + e] * (dp[n * 4 + e] - dval[e & 1]);
        const int c = n >> 1, hi = (n & 1) * 2;
        dsf[c][hi] = ptx::pack2<T>(dsv[0], dsv[1]);
        dsf[c][hi + 1] = ptx::pack2<T>(dsv[2], dsv[3]);
        *reinterpret_cast<uint32_t*>(sdS_ptr + swz(Bc, key0, ql)) = dsf[c][hi];
        *reinterpret_cast<uint32_t*>(sdS_ptr + swz(Bc, key0 + 8, ql)) = dsf[c][hi + 1];
      }
      fence_proxy_async();

      // ---- dK += dS^T Q.
      fence_regs(dk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Br / 16; ++kk)
        Wgmma<T, kD>::template rs<1>(dk, dsf[kk], make_desc(sQ + kk * 2048, Br * 128, 1024), 1);
      wgmma_commit();

      // ---- dQ (this warpgroup's 64 rows x kDQ columns) = dS K (k = 128 keys): A = dS^T tile (MN-major: a
      // 64-query panel), B = K (MN-major: 64-column panels).
      named_sync(1, 256);  // every warpgroup's dS^T is in shared memory
      float dq[kDQ / 2];
      const uint32_t a_off = Tr::kSplitQ ? wg * Bc * 128 : 0;  // query panel of this warpgroup
      const uint32_t b_off = Tr::kSplitQ ? 0 : wg * Bc * 128;  // column panel of this warpgroup
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Bc / 16; ++kk)
        Wgmma<T, kDQ>::template ss<1, 1>(dq, make_desc(sdS + a_off + kk * 2048, Bc * 128, 1024),
                                         make_desc(sK + b_off + kk * 2048, Bc * 128, 1024), kk > 0);
      wgmma_commit();
      if (det) {
        // Deterministic: the K/V blocks covering query block m add into it one at a time, in a fixed order.
        if (tid == 0) {
          // The K/V blocks covering m form a range; those adding before this one are (kb, first] (rev) or
          // [first, kb). `first` only moves forward as m grows, so this costs O(1) per query block.
          int lo, hi;
          if (rev) {
            while (first + 1 < nkb && (m_range(first + 1, lo, hi), m >= lo && m < hi)) ++first;
          } else {
            while ((m_range(first, lo, hi), m < lo || m >= hi)) ++first;
          }
          const int target = (rev ? first - kb : kb - first) / ns;  // earlier blocks of this slice
          while (ld_acquire(sem + m) != target) __nanosleep(32);
        }
        named_sync(1, 256);
      }
      wgmma_wait<0>();
      fence_regs(dq);
      fence_regs(dv);
      fence_regs(dk);
      fence_regs(pf);
      fence_regs(dsf);

      const int qrow = i0 + (Tr::kSplitQ ? wg * 64 : 0) + row0 + (t & 1) * 8;
      const int col0 = Tr::kSplitQ ? 0 : wg * kDQ;
      atomic_add_dq<kDQ / 8>(dq, dq_acc, dq_row, qrow, col0, sq, p.d, t);
      if (det) pending = m;
    }
    if (det && pending >= 0) {
      named_sync(1, 256);
      if (tid == 0) release_dq_block(sem, pending);
    }

    ptx::cp_async_wait<0>();

    // ---- dK (scaled) and dV: rows key0, key0 + 8 of this warpgroup's 64 keys, all kD columns.
    store_dk_dv<T, kD / 8>(p, dk, dv, j0 + key0, 0, sk, k_start, group, h, hk, t);
  }
#endif  // sm_90a
}

// Launches the Hopper kernel for head-dim class kD (probe: only says whether it would).
template <typename T, int kD>
cudaError_t run_hopper_impl(const BwdParams& p, cudaStream_t stream, bool* used, bool probe) {
  const bool extras = p.softcap > 0.f || p.alibi != nullptr;
  const bool counters = p.deterministic && p.loop_blocks == 0;  // by ownership: the default-mode code
  auto kernel = extras ? (counters ? bwd_hopper_kernel<T, kD, true, true> : bwd_hopper_kernel<T, kD, true, false>)
                       : (counters ? bwd_hopper_kernel<T, kD, false, true> : bwd_hopper_kernel<T, kD, false, false>);
  // Block order (default mode): at d128 with a diagonal bound (the K/V blocks differ in length there) and at most
  // 16 K/V blocks, chunks of about two waves of blocks; else the plain order (measured on the H200, NOTES.md,
  // session 6: +2.6-3.8% at d128 1k / 2k causal; d64 and longer rows gained nothing consistent or lost).
  // FLASHSERVE_BWD_SCHED_CHUNK=C forces C (A/B).
  int chunk = 1;
  if (!p.deterministic && p.loop_blocks == 0) {  // (the K/V-block loop keeps chunk = 1)
    const int nkb = std::max(1, (p.max_seqlen_k + HTraits<kD>::Bc - 1) / HTraits<kD>::Bc);
    const int sms = p.num_sms > 0 ? p.num_sms : 132;
    if (kD == 128 && p.window_right >= 0 && nkb <= 16) chunk = (2 * sms + nkb - 1) / nkb;
    if (const char* ce = std::getenv("FLASHSERVE_BWD_SCHED_CHUNK")) chunk = std::atoi(ce);
    chunk = std::max(1, std::min(chunk, std::max(1, p.b * p.h)));
  }
  return launch_hopper_bwd<HTraits<kD>>(kernel, p, stream, used, probe, chunk);
}

}  // namespace hopper
}  // namespace bwd
}  // namespace flashserve
