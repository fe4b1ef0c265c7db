// FlashAttention backward main kernel for sm_90a, head-dim class 256 (wgmma). Companion of
// bwd_hopper_kernel.cuh (classes 64/128); both use the helpers of bwd_hopper_common.cuh.
//
// Budget that shapes it. Registers: dK + dV for 64 keys at d256 are 2 x 64 x 256 fp32 = 128 KB, i.e. 256 per
// thread for one warpgroup, so the two warpgroups split the head dim: warpgroup w owns dK / dV columns
// 128 w .. 128 w + 127 of all 64 keys (128 registers), plus a 64 x 128 dQ tile (64) while it is in flight.
// Shared memory: K, V (64 keys x 256) 64 KB, Q and dO (64 queries) double-buffered 128 KB, P^T and dS^T 16 KB,
// LSE / D 1 KB: 209 KB of the 227 KB a block may have.
// Per query block of Br = 64 rows (block of Bc = 64 keys):
//   S^T = K Q_w^T, dP^T = V dO_w^T    warpgroup w: queries 32 w .. 32 w + 31 (m64n32k16 SS, K-major)
//   P^T, dS^T                         elementwise in registers, stored to shared memory (both warpgroups need
//                                     all 64 queries of them for the next products)
//   dQ_w = dS K_w                     64 queries x columns 128 w.. (SS, A = dS^T MN-major, B = K MN-major),
//                                     issued first; deterministic mode: its atomics overlap dV / dK; default
//                                     mode: staged in shared memory after dV / dK and added by bulk reductions
//   dV_w += P^T dO_w, dK_w += dS^T Q_w  columns 128 w .. (SS, A K-major from shared memory, B MN-major)
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "bwd_hopper_common.cuh"

namespace flashserve {
namespace bwd {
namespace hopper {

struct HTraits256 {
  static constexpr int kD = 256, Bc = 64, Br = 64, kThreads = 256;
  static constexpr int kKV = Bc * kD * 2, kQ = Br * kD * 2, kPS = Bc * Br * 2;
  static constexpr int kOffK = 0, kOffV = kKV, kOffQ = 2 * kKV, kOffdO = kOffQ + 2 * kQ, kOffP = kOffdO + 2 * kQ;
  static constexpr int kOffdS = kOffP + kPS, kOffLse = kOffdS + kPS, kOffDs = kOffLse + 2 * Br * 4;
  // dQ staging (default mode): each warpgroup stages its 64 x 128 fp32 dQ tile (32 KB) in the halves of the Q
  // and dO tiles that only its own dV / dK products read (dead once they complete), 31 rows each, plus 2 rows
  // in a small extra region of kStageX bytes per warpgroup (rows are skewed by 32 (r % 4) bytes: see below).
  static constexpr int kOffX = kOffDs + 2 * Br * 4, kStageX = 1152;
  static constexpr int kSmemBytes = kOffX + 2 * kStageX + 1024;  // + alignment slack (swizzle atoms: 1024 B)
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// "dQ from dS" (bwd_params.h, dq_from_ds): index of dS^T tile (m, kb) of sequence b (first query row q_start),
// head h in the workspace, in tiles of HTraits256::kPS bytes.
__device__ __forceinline__ int64_t ds_tile_index(const BwdParams& p, int q_start, int b, int h, int m, int kb) {
  return (((int64_t)(q_start / HTraits256::Br) + b + m) * p.h + h) * p.ds_kb_stride + kb;
}

// kDsOut: "dQ from dS": no dQ product here; each dS^T tile goes to the workspace for bwd_hopper_d256_dq_kernel
// below.
template <typename T, bool kExtras, bool kDet, bool kDsOut = false>
__global__ void __launch_bounds__(256, 1) bwd_hopper_d256_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = HTraits256;
  constexpr int kD = Tr::kD, Bc = Tr::Bc, Br = Tr::Br;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = ptx::smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* base_ptr = smem_raw + (base - raw);
  const uint32_t sK = base + Tr::kOffK, sV = base + Tr::kOffV;
  const uint32_t sQ0 = base + Tr::kOffQ, sdO0 = base + Tr::kOffdO, sP = base + Tr::kOffP, sdS = base + Tr::kOffdS;
  static_assert(!(kDet && kDsOut), "dQ from dS needs no counters");
  constexpr bool kBulk = !kDet && !kDsOut;  // dQ by bulk reduction; deterministic mode keeps the ordered atomics
  unsigned char* sP_ptr = base_ptr + Tr::kOffP;
  unsigned char* sdS_ptr = base_ptr + Tr::kOffdS;
  float* sLse = reinterpret_cast<float*>(base_ptr + Tr::kOffLse);  // [2][Br]
  float* sDs = reinterpret_cast<float*>(base_ptr + Tr::kOffDs);    // [2][Br]

  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, wwarp = (tid >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
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

  auto m_range = [&](int kbx, int& lo, int& hi) { query_block_range<Bc, Br>(kbx, sq, diag, wl, wr, lo, hi); };

  const int row0 = wwarp * 16 + g;  // key of accumulator rows (and row0 + 8); query row of dQ rows
  const int qc0 = wg * 32;          // this warpgroup's queries in S^T / dP^T
  const int c0 = wg * 128;          // this warpgroup's head-dim columns of dK / dV / dQ

  // Deterministic: see bwd_hopper_kernel.cuh (same counters and order; dQ slice kb % num_splits), and the same
  // K/V-block loop (p.loop_blocks) and deterministic-by-ownership mode (loop_blocks = num_splits: block x of num_splits alone adds
  // into dQ slice x, for K/V blocks x, 2S - 1 - x, 2S + x, ... in that order). Its bulk reductions stay ordered: each
  // staged row has one issuing lane, which waits for all of them to complete (bulk_wait<0>) at the end of a
  // K/V block, before the next block's reductions into the same rows.
  const bool rev = kDet && wr >= 0;
  const int ns = kDet ? p.num_splits : 1;
  const int64_t dq_row = (int64_t)p.h * p.d;
  const uint32_t sX = base + Tr::kOffX + wg * Tr::kStageX;  // this warpgroup's extra staging region
  const bool looped = !kDet && p.loop_blocks > 0;  // K/V-block loop (see bwd_params.h)
  const int bx = (int)blockIdx.x, nsplit = looped ? (int)gridDim.x : 1;
  // dQ slice: looped, bx (own slices) or 0; else (one K/V block) kb % num_splits with counters, 0 by default.
  const int kb_single = rev ? nkb - 1 - bx : bx;
  const int slice = looped ? (p.num_splits > 1 ? bx : 0) : (kDet && kb_single > 0 ? kb_single % ns : 0);
  int* sem = kDet ? p.dq_sem + (((int64_t)slice * p.b + b) * p.h + h) * p.dq_sem_stride : nullptr;
  float* dq_acc = p.dq_accum + (int64_t)slice * p.total_q * p.h * p.d + (int64_t)q_start * p.h * p.d +
                  (int64_t)h * p.d;
  for (int it = 0;; ++it) {
    int kb;
    if (looped) {
      kb = it * nsplit + ((it & 1) ? nsplit - 1 - bx : bx);
      if (kb >= nkb) break;
      __syncthreads();  // the previous K/V block's shared-memory reads (wgmma, bulk reductions) are done
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

    float dk[64], dv[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) dk[i] = dv[i] = 0.f;

    if (m_begin < m_end) {
      load_kv();
      load_q(m_begin, 0);
      ptx::cp_async_commit();
    }

    int pending = -1;
    int first = rev ? kb : 0;
    for (int m = m_begin; m < m_end; ++m) {
      const int stage = (m - m_begin) & 1;
      ptx::cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();  // tile m landed; iteration m - 1 (wgmma reads of Q/dO/P/dS included) is done
      if constexpr (!kBulk) {
        if (m + 1 < m_end) load_q(m + 1, stage ^ 1);
        ptx::cp_async_commit();
      }
      const uint32_t sQ = sQ0 + stage * Tr::kQ, sdO = sdO0 + stage * Tr::kQ;
      const float* lse_s = sLse + stage * Br;
      const float* ds_s = sDs + stage * Br;
      const int i0 = m * Br;

      // ---- S^T = K Q_w^T, dP^T = V dO_w^T: 64 keys x 32 queries each, k = 256 (16 steps), two groups.
      float s[16], dp[16];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t ka = (kk >> 2) * Bc * 128 + (kk & 3) * 32;
        const uint32_t qa = (kk >> 2) * Br * 128 + qc0 * 128 + (kk & 3) * 32;
        Wgmma<T, 32>::template ss<0, 0>(s, make_desc(sK + ka, 16, 1024), make_desc(sQ + qa, 16, 1024), kk > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t ka = (kk >> 2) * Bc * 128 + (kk & 3) * 32;
        const uint32_t qa = (kk >> 2) * Br * 128 + qc0 * 128 + (kk & 3) * 32;
        Wgmma<T, 32>::template ss<0, 0>(dp, make_desc(sV + ka, 16, 1024), make_desc(sdO + qa, 16, 1024),
                                        kk > 0);
      }
      wgmma_commit();
      if (kDet && pending >= 0) {
        if (tid == 0) release_dq_block(sem, pending);
        pending = -1;
      }
      wgmma_wait<1>();
      fence_regs(s);

      // ---- P^T (to shared memory, for dV) and P^T o softcap' (kept in s, for dS). Element e of n-block n:
      // key row0 + 8 ((e / 2) % 2), query qc0 + 8 n + 2 t + e % 2.
      const bool full = (i0 + Br <= sq) && (j0 + Bc <= sk) && (wr < 0 || j0 + Bc - 1 <= i0 + diag + wr) &&
                        (wl < 0 || j0 >= i0 + Br - 1 + diag - wl);
      auto softmax = [&](auto full_tag) {
        constexpr bool kFull = decltype(full_tag)::value;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const int ql = qc0 + n * 8 + 2 * t;
          const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + ql);
          const float l2[2] = {lse2.x * kLog2e, lse2.y * kLog2e};
          float pv[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = s[n * 4 + e];
            float grad = 1.f;
            const int kj = j0 + row0 + (e >> 1) * 8;
            const int qi = i0 + ql + (e & 1);
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
          *reinterpret_cast<uint32_t*>(sP_ptr + swz(Bc, row0, ql)) = ptx::pack2<T>(pv[0], pv[1]);
          *reinterpret_cast<uint32_t*>(sP_ptr + swz(Bc, row0 + 8, ql)) = ptx::pack2<T>(pv[2], pv[3]);
        }
      };
      if (full) softmax(std::true_type{});
      else softmax(std::false_type{});

      wgmma_wait<0>();
      fence_regs(dp);
      // ---- dS^T = P^T o (dP^T - D) (o softcap'), to shared memory (row = key).
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const int ql = qc0 + n * 8 + 2 * t;
        const float2 dd = *reinterpret_cast<const float2*>(ds_s + ql);
        const float dval[2] = {dd.x, dd.y};
        float dsv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) dsv[e] = s[n * 4 + e] * (dp[n * 4 + e] - dval[e & 1]);
        *reinterpret_cast<uint32_t*>(sdS_ptr + swz(Bc, row0, ql)) = ptx::pack2<T>(dsv[0], dsv[1]);
        *reinterpret_cast<uint32_t*>(sdS_ptr + swz(Bc, row0 + 8, ql)) = ptx::pack2<T>(dsv[2], dsv[3]);
      }
      fence_proxy_async();
      // Bulk mode: the other stage's Q / dO still hold step m - 1's staged dQ rows until the bulk reductions
      // have read them; each issuing lane waits for that before the barrier, the next tile loads after it.
      if (kBulk && lane == 0) bulk_wait_read<0>();
      named_sync(1, 256);  // both warpgroups' P^T and dS^T are in shared memory
      if constexpr (kBulk) {
        if (m + 1 < m_end) load_q(m + 1, stage ^ 1);
        ptx::cp_async_commit();
      }

      // ---- dQ_w = dS K_w (64 queries x 128 columns, k = 64 keys): A = dS^T (MN-major), B = K (MN-major,
      // panels 2 w, 2 w + 1).
      float dq[64];
      wgmma_fence();
      if constexpr (!kDsOut) {
#pragma unroll
        for (int kk = 0; kk < Bc / 16; ++kk)
          Wgmma<T, 128>::template ss<1, 1>(dq, make_desc(sdS + kk * 2048, Bc * 128, 1024),
                                           make_desc(sK + 2 * wg * Bc * 128 + kk * 2048, Bc * 128, 1024), kk > 0);
        wgmma_commit();
      }
      // ---- dV_w += P^T dO_w, dK_w += dS^T Q_w (k = 64 queries): A K-major from shared memory, B MN-major.
      fence_regs(dv);
      fence_regs(dk);
#pragma unroll
      for (int kk = 0; kk < Br / 16; ++kk)
        Wgmma<T, 128>::template ss<0, 1>(dv, make_desc(sP + kk * 32, 16, 1024),
                                         make_desc(sdO + 2 * wg * Br * 128 + kk * 2048, Br * 128, 1024), 1);
#pragma unroll
      for (int kk = 0; kk < Br / 16; ++kk)
        Wgmma<T, 128>::template ss<0, 1>(dk, make_desc(sdS + kk * 32, 16, 1024),
                                         make_desc(sQ + 2 * wg * Br * 128 + kk * 2048, Br * 128, 1024), 1);
      wgmma_commit();
      if constexpr (kDsOut) {
        // The dS^T tile (8 KB, both warpgroups' halves: after the named barrier) to the workspace, 32 bytes a
        // thread, while dV / dK run; its byte image is the dQ kernel's shared-memory operand.
        uint4* tile =
            reinterpret_cast<uint4*>(p.dq_accum) + ds_tile_index(p, q_start, b, h, m, kb) * (Tr::kPS / 16);
        const uint4* src = reinterpret_cast<const uint4*>(sdS_ptr);
        tile[2 * tid] = src[2 * tid];
        tile[2 * tid + 1] = src[2 * tid + 1];
      }
      if (kDet) {
        if (tid == 0) {
          int lo, hi;
          if (rev) {
            while (first + 1 < nkb && (m_range(first + 1, lo, hi), m >= lo && m < hi)) ++first;
          } else {
            while ((m_range(first, lo, hi), m < lo || m >= hi)) ++first;
          }
          // Blocks of this slice (kb' = kb mod ns) that add into m before this one.
          const int target = (rev ? first - kb : kb - first) / ns;
          while (ld_acquire(sem + m) != target) __nanosleep(32);
        }
        named_sync(1, 256);
      }
      if constexpr (kBulk) {
        wgmma_wait<0>();
        fence_regs(dq);
        fence_regs(dv);
        fence_regs(dk);
        // Stage the 64 x 128 dQ tile: row r of this warpgroup's tile goes to the slot of index
        // k = 16 (r % 4) + r / 4 (rows sorted by r % 4), slots 0..30 in the Q half, 31..61 in the dO half this
        // warpgroup's dV / dK read (both dead now), 62..63 in sX; row r starts 32 (r % 4) bytes into its 512-byte
        // slot. Skews never decrease from one slot to the next within a region, so rows do not overlap, and the
        // 8 rows (g) of one float2 store instruction fall into 4 distinct 32-byte bank groups: 2 wavefronts per
        // 256 bytes, no conflicts.
        const uint32_t rq = sQ + wg * 16384, rdo = sdO + wg * 16384;
        auto slot = [&](int r) -> uint32_t {
          const int k = (r & 3) * 16 + (r >> 2);
          const uint32_t skew = (uint32_t)(r & 3) * 32;
          return k < 31 ? rq + k * 512 + skew : (k < 62 ? rdo + (k - 31) * 512 + skew : sX + (k - 62) * 512 + skew);
        };
        const uint32_t a0 = slot(row0) + t * 8, a1 = slot(row0 + 8) + t * 8;
#pragma unroll
        for (int n = 0; n < 16; ++n) {
          st_shared_f32x2(a0 + n * 32, dq[n * 4 + 0], dq[n * 4 + 1]);
          st_shared_f32x2(a1 + n * 32, dq[n * 4 + 2], dq[n * 4 + 3]);
        }
        fence_proxy_async();
        __syncwarp();
        if (lane == 0) {
          const int cols = min(128, p.d - c0);
          if (cols > 0) {
#pragma unroll 4
            for (int i = 0; i < 16; ++i) {
              const int r = wwarp * 16 + i;
              if (i0 + r < sq) bulk_reduce_add_f32(dq_acc + (int64_t)(i0 + r) * dq_row + c0, slot(r), cols * 4);
            }
          }
          bulk_commit();
        }
      } else if constexpr (kDsOut) {
        wgmma_wait<0>();
        fence_regs(dv);
        fence_regs(dk);
      } else {
        wgmma_wait<1>();
        fence_regs(dq);

        atomic_add_dq<16>(dq, dq_acc, dq_row, i0 + row0 + (t & 1) * 8, c0, sq, p.d, t);
        if (kDet) pending = m;
        wgmma_wait<0>();
        fence_regs(dv);
        fence_regs(dk);
      }
    }
    if (kDet && pending >= 0) {
      named_sync(1, 256);
      if (tid == 0) release_dq_block(sem, pending);
    }

    ptx::cp_async_wait<0>();

    // ---- dK (scaled) and dV: rows row0, row0 + 8 of the 64 keys, this warpgroup's 128 columns.
    store_dk_dv<T, 16>(p, dk, dv, j0 + row0, c0, sk, k_start, group, h, hk, t);
    if (kBulk && lane == 0) bulk_wait<0>();  // staged rows read and added before the block's memory goes
  }
#endif  // sm_90a
}

// Deterministic "dQ from dS", second kernel: one block per (64 query rows m, head, sequence), two warpgroups,
// warpgroup w owning dq columns 128 w .. 128 w + 127. For the K/V blocks kb that see query block m, in increasing
// order: the dS^T tile (m, kb) the main kernel wrote and K rows of kb go to shared memory (double-buffered,
// cp.async), then dQ_w += dS K_w with the main kernel's own dQ product (same operands, same layouts); dq =
// scale * dQ is written once, in the input dtype. One thread owns each sum and adds in a fixed order: bit-identical
// across runs. Rows past the last sequence are written as 0 (by the blocks of the last sequence's first query block).
struct DqTraits256 {
  static constexpr int kD = HTraits256::kD, Bc = HTraits256::Bc, Br = HTraits256::Br, kThreads = 256;
  static constexpr int kTile = HTraits256::kPS, kK = HTraits256::kKV, kStage = kTile + kK;  // 8 KB + 32 KB
  static constexpr int kSmemBytes = 2 * kStage + 1024;                                // + alignment slack
};

template <typename T>
__global__ void __launch_bounds__(256, 2) bwd_hopper_d256_dq_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tr = DqTraits256;
  constexpr int kD = Tr::kD, Bc = Tr::Bc, Br = Tr::Br;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = ptx::smem_addr(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;

  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, wwarp = (tid >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
  const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;

  if (m == 0 && b == p.b - 1) {  // rows past the last sequence: no sequence's, zero
    const int vecs = p.d / 8;
    const int64_t first = p.cu_seqlens_q[p.b], n = ((int64_t)p.total_q - first) * vecs;
    for (int64_t i = tid; i < n; i += Tr::kThreads) {
      const int64_t row = first + i / vecs;
      *reinterpret_cast<uint4*>(reinterpret_cast<T*>(p.dq) + (row * p.h + h) * p.d + (i % vecs) * 8) =
          make_uint4(0u, 0u, 0u, 0u);
    }
  }
  const int q_start = p.cu_seqlens_q[b], sq = p.cu_seqlens_q[b + 1] - q_start;
  if (m * Br >= sq) return;
  const int k_start = p.cu_seqlens_k[b], sk = p.cu_seqlens_k[b + 1] - k_start;
  // Tiles exist for the K/V blocks the main kernel's grid covered (max_seqlen_k's): never read past them.
  const int nkb = min((sk + Bc - 1) / Bc, p.ds_kb_stride);
  const int diag = sk - sq;
  const int hk = h / (p.h / p.h_k);
  const T* kg = reinterpret_cast<const T*>(p.k) + (int64_t)k_start * p.k_row_stride + (int64_t)hk * p.k_head_stride;
  const uint4* tiles =
      reinterpret_cast<const uint4*>(p.dq_accum) + ds_tile_index(p, q_start, b, h, m, 0) * (Tr::kTile / 16);

  // The K/V blocks whose query range (the main kernel's, query_block_range) holds m: one contiguous run.
  int kb_lo = nkb, kb_hi = nkb;
  for (int kb = 0; kb < nkb; ++kb) {
    int lo, hi;
    query_block_range<Bc, Br>(kb, sq, diag, p.window_left, p.window_right, lo, hi);
    const bool sees = m >= lo && m < hi;
    if (sees && kb_lo == nkb) kb_lo = kb;
    if (!sees && kb_lo < nkb) {
      kb_hi = kb;
      break;
    }
  }

  auto load = [&](int kb, int stage) {
    const uint32_t sT = base + stage * Tr::kStage, sK = sT + Tr::kTile;
    const uint4* src = tiles + (int64_t)kb * (Tr::kTile / 16);
#pragma unroll
    for (int c = tid; c < Tr::kTile / 16; c += Tr::kThreads) ptx::cp_async16(sT + c * 16, src + c, 16);
    load_tile<Bc, kD, Tr::kThreads>(sK, kg, p.k_row_stride, kb * Bc, sk, p.d, tid);
  };

  float dq[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) dq[i] = 0.f;
  if (kb_lo < kb_hi) load(kb_lo, 0);
  ptx::cp_async_commit();
  for (int kb = kb_lo; kb < kb_hi; ++kb) {
    const int stage = (kb - kb_lo) & 1;
    ptx::cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // tile kb landed; every warpgroup's products on the other stage are done
    if (kb + 1 < kb_hi) load(kb + 1, stage ^ 1);
    ptx::cp_async_commit();
    const uint32_t sT = base + stage * Tr::kStage, sK = sT + Tr::kTile;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Bc / 16; ++kk)
      Wgmma<T, 128>::template ss<1, 1>(dq, make_desc(sT + kk * 2048, Bc * 128, 1024),
                                       make_desc(sK + 2 * wg * Bc * 128 + kk * 2048, Bc * 128, 1024), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dq);
  }
  ptx::cp_async_wait<0>();

  // dq rows m * Br + row0 (+ 8), columns c0 + 8 n + 2 t (+ 1): the accumulator layout of the main kernel's dQ.
  const int row0 = wwarp * 16 + g, c0 = wg * 128;
  const float sc = p.scale;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int qi = m * Br + row0 + half * 8;
    if (qi >= sq) continue;
    T* dst = reinterpret_cast<T*>(p.dq) + ((int64_t)(q_start + qi) * p.h + h) * p.d;
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      const int col = c0 + n * 8 + 2 * t;
      if (col < p.d)
        *reinterpret_cast<uint32_t*>(dst + col) =
            ptx::pack2<T>(dq[n * 4 + 2 * half] * sc, dq[n * 4 + 2 * half + 1] * sc);
    }
  }
#endif  // sm_90a
}

template <typename T>
cudaError_t run_hopper_d256_impl(const BwdParams& p, cudaStream_t stream, bool* used, bool probe) {
  const bool extras = p.softcap > 0.f || p.alibi != nullptr;
  if (p.dq_from_ds) {
    auto kernel = extras ? bwd_hopper_d256_kernel<T, true, false, true> : bwd_hopper_d256_kernel<T, false, false, true>;
    cudaError_t e = launch_hopper_bwd<HTraits256>(kernel, p, stream, used, probe);
    if (e != cudaSuccess || probe || !*used) return e;
    auto dq_kernel = bwd_hopper_d256_dq_kernel<T>;
    if ((e = cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, DqTraits256::kSmemBytes)) !=
        cudaSuccess)
      return e;
    // At least one query block: the zeroing of rows past the last sequence rides on block x = 0.
    const int nqb = std::max(1, (p.max_seqlen_q + DqTraits256::Br - 1) / DqTraits256::Br);
    if (p.b == 0 || p.h == 0) return cudaSuccess;
    dq_kernel<<<dim3(nqb, p.h, p.b), DqTraits256::kThreads, DqTraits256::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
  }
  const bool counters = p.deterministic && p.loop_blocks == 0;  // by ownership: the default-mode code
  auto kernel = extras ? (counters ? bwd_hopper_d256_kernel<T, true, true> : bwd_hopper_d256_kernel<T, true, false>)
                       : (counters ? bwd_hopper_d256_kernel<T, false, true> : bwd_hopper_d256_kernel<T, false, false>);
  return launch_hopper_bwd<HTraits256>(kernel, p, stream, used, probe);
}

}  // namespace hopper
}  // namespace bwd
}  // namespace flashserve
