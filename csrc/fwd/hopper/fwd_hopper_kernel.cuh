// FlashAttention forward for Hopper (sm_90a): wgmma with operands in 128B-swizzled shared memory.
//
// One thread block = (128 query rows, query head, sequence), two warpgroups of 64 rows each. Q is loaded
// once; K and V go through a two-stage cp.async ring (loads are issued right after the barrier that opens
// an iteration, so they overlap all of its math). Per key block j and warpgroup: S_j = Q K_j^T as one
// wgmma chain (m64nBNk16, both operands from shared memory), then O += P_{j-1} V_{j-1} issued behind it
// (A = P from registers, V read MN-major through the descriptor's transpose bit), so the masking and
// online softmax of S_j run while the tensor cores do the previous block's P V; O is rescaled after.
// Keys are visited from the last visible block down (masked blocks first), as in the mma.sync kernel.
//
// Features: varlen, GQA/MQA, any scale, causal / sliding window (bottom-right aligned), LSE, rows with no
// key -> O = 0 and LSE = +inf. Softcap, ALiBi, dropout, return_softmax and split-KV stay on fwd_kernel.cuh
// (fwd_hopper_supports says which calls may come here).
#pragma once
#include "../fwd_kernel.cuh"
#include "../../common/hopper/wgmma.cuh"

namespace flashserve {
namespace hopper {

template <int HD_, int BN_, int MIN_BLOCKS_>
struct HopperTraits {
  static constexpr int HD = HD_, BM = 128, BN = BN_, kThreads = 256, kMinBlocks = MIN_BLOCKS_;
  static constexpr int kQBytes = BM * HD * 2, kKVBytes = BN * HD * 2;
  // Q, then stages {K, V} x 2, plus slack to align the base to 1024 B (swizzle atoms).
  static constexpr int kSmemBytes = kQBytes + 4 * kKVBytes + 1024;
  static_assert(HD % 64 == 0 && BN % 16 == 0, "tile shapes");
};

// Tiles per head-dim class: registers per thread are S (BN/2) + O (HD/2) + P (BN/4) fp32/b32; two
// blocks per SM need <= 128 registers. Tuning builds override with -DFS_HOPPER_BN_<hd>= / _MINB_<hd>=.
// hd64: 128x64 at 2 blocks/SM (121 registers) beat 128x128 at 1 block by 1.07-1.19x (NOTES.md).
#ifndef FS_HOPPER_BN_64
#define FS_HOPPER_BN_64 64
#endif
#ifndef FS_HOPPER_MINB_64
#define FS_HOPPER_MINB_64 2
#endif
#ifndef FS_HOPPER_BN_128
#define FS_HOPPER_BN_128 128
#endif
#ifndef FS_HOPPER_MINB_128
#define FS_HOPPER_MINB_128 1
#endif
#ifndef FS_HOPPER_BN_256
#define FS_HOPPER_BN_256 80  // 128x80 (the warp-specialized kernel: 225 KB smem) beat 128x64 by 1.03-1.10x
#endif
#ifndef FS_HOPPER_MINB_256
#define FS_HOPPER_MINB_256 1
#endif
template <int HD> struct HopperConfig;
template <> struct HopperConfig<64> { using Traits = HopperTraits<64, FS_HOPPER_BN_64, FS_HOPPER_MINB_64>; };
template <> struct HopperConfig<128> { using Traits = HopperTraits<128, FS_HOPPER_BN_128, FS_HOPPER_MINB_128>; };
template <> struct HopperConfig<256> { using Traits = HopperTraits<256, FS_HOPPER_BN_256, FS_HOPPER_MINB_256>; };

// ROWS x HD tile (rows_valid real rows, d real columns) into the swizzled layout, zero-filling the rest.
template <typename T, int ROWS, int HD, int NTHR>
__device__ __forceinline__ void load_swz(uint32_t s_base, const T* g, int64_t row_stride, int rows_valid, int d,
                                         const void* safe_ptr, int tid) {
  constexpr int CPR = HD / 8;  // 16-byte chunks per row
  constexpr int RSTEP = NTHR / CPR;
  static_assert(NTHR % CPR == 0 && ROWS % RSTEP == 0, "load shape");
  const int row0 = tid / CPR, c = tid % CPR;
  const T* src = g + row0 * row_stride + c * 8;
  const bool col_ok = c * 8 < d;
#pragma unroll
  for (int i = 0; i < ROWS / RSTEP; ++i) {
    const int row = row0 + i * RSTEP;
    // With RSTEP % 8 == 0 the swizzle (row & 7) is the same for every pass: a constant step.
    const uint32_t dst = RSTEP % 8 == 0 ? s_base + swz_offset<ROWS>(row0, c) + i * RSTEP * 128
                                        : s_base + swz_offset<ROWS>(row, c);
    const bool ok = col_ok && row < rows_valid;
    ptx::cp_async16(dst, ok ? static_cast<const void*>(src) : safe_ptr, ok ? 16 : 0);
    src += RSTEP * row_stride;
  }
}

template <int BN>
__device__ __forceinline__ void mask_block(float (&s)[BN / 2], int row0, int n0, int diag, int sk, int wl, int wr,
                                           int t) {
  const int r0 = row0 + diag - n0 - 2 * t;  // relative to this thread's first column
  const int k_hi = sk - 1 - n0 - 2 * t;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int ri = r0 + hf * 8;
    const int hi = wr >= 0 ? min(k_hi, ri + wr) : k_hi;
    const int lo = wl >= 0 ? ri - wl : -BN;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = nt * 8 + e;
        if (c > hi || c < lo) s[4 * nt + 2 * hf + e] = -INFINITY;
      }
  }
}

// Online softmax of one block: S becomes P = exp2(S * sl2 - m * sl2), row max / sum updated, alpha = the
// factor the running O must be multiplied by. Rows with no key so far keep m = -inf without NaN.
template <int BN>
__device__ __forceinline__ void online_softmax(float (&s)[BN / 2], float (&row_m)[2], float (&row_l)[2],
                                               float (&alpha)[2], float sl2) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float mx = row_m[hf];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * hf], s[4 * nt + 2 * hf + 1]));
    mx = ptx::quad_max(mx);
    const float m_s = mx == -INFINITY ? 0.f : mx * sl2;
    alpha[hf] = ptx::ex2(row_m[hf] * sl2 - m_s);
    row_m[hf] = mx;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
      const float p0 = ptx::ex2(fmaf(s[4 * nt + 2 * hf], sl2, -m_s));
      const float p1 = ptx::ex2(fmaf(s[4 * nt + 2 * hf + 1], sl2, -m_s));
      s[4 * nt + 2 * hf] = p0;
      s[4 * nt + 2 * hf + 1] = p1;
      sum += p0 + p1;
    }
    row_l[hf] = row_l[hf] * alpha[hf] + sum;
  }
}

template <int HD>
__device__ __forceinline__ void rescale_o(float (&acc_o)[HD / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int dt = 0; dt < HD / 8; ++dt) {
    acc_o[4 * dt + 0] *= alpha[0];
    acc_o[4 * dt + 1] *= alpha[0];
    acc_o[4 * dt + 2] *= alpha[1];
    acc_o[4 * dt + 3] *= alpha[1];
  }
}

// P (fp32 accumulator layout) -> 16-bit A fragments of m64k16 (rows g, g+8; keys 2t.., 2t+8..).
template <typename T, int BN>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[BN / 16][4], const float (&s)[BN / 2]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    pa[kk][0] = ptx::pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    pa[kk][1] = ptx::pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = ptx::pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = ptx::pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// Final row statistics: 1/l (0 for rows without keys) and LSE (+inf for them).
__device__ __forceinline__ void finish_rows(const float (&row_m)[2], const float (&row_l)[2], float scale,
                                            float (&inv_l)[2], float (&lse)[2]) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = ptx::quad_sum(row_l[hf]);
    const bool empty = !(l > 0.f);
    inv_l[hf] = empty ? 0.f : 1.f / l;
    lse[hf] = empty ? INFINITY : row_m[hf] * scale + logf(l);
  }
}

// Blocks whose rows all see no key: O = 0, LSE = +inf.
template <typename T, int HD>
__device__ __forceinline__ void write_empty(const FwdParams& p, int q_start, int m0, int m_valid, int head, int tid,
                                            int nthr) {
  for (int c = tid; c < m_valid * (HD / 4); c += nthr) {
    const int row = c / (HD / 4), col = (c % (HD / 4)) * 4;
    if (col < p.d) {
      T* dst = static_cast<T*>(p.o) + int64_t(q_start + m0 + row) * p.o_row_stride + head * p.o_head_stride + col;
      *reinterpret_cast<uint2*>(dst) = make_uint2(0u, 0u);
    }
  }
  for (int row = tid; row < m_valid; row += nthr) p.lse[int64_t(head) * p.total_q + q_start + m0 + row] = INFINITY;
}

template <typename T, typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) fwd_hopper_kernel(const FwdParams p) {
#ifdef FS_HOPPER_DEVICE
  constexpr int HD = Tr::HD, BM = Tr::BM, BN = Tr::BN, DT = HD / 8, NTHR = Tr::kThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_a = ptx::smem_addr(smem_raw);
  const uint32_t sQ = (raw_a + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (sQ - raw_a);
  auto sK = [&](int st) { return sQ + Tr::kQBytes + st * 2 * Tr::kKVBytes; };
  auto sV = [&](int st) { return sQ + Tr::kQBytes + st * 2 * Tr::kKVBytes + Tr::kKVBytes; };

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) query blocks first
  const int head = blockIdx.y, bidb = blockIdx.z;
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

  int key_lo = 0, key_hi = sk;
  if (wr >= 0) key_hi = min(sk, m0 + m_valid - 1 + diag + wr + 1);
  if (wl >= 0) key_lo = max(0, m0 + diag - wl);
  const int nb_min = key_lo / BN;
  const int nb_max = key_hi > key_lo ? ceil_div(key_hi, BN) : nb_min;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wg = tid / 128, g = lane >> 2, t = lane & 3;
  const int warp_row0 = wg * 64 + (warp & 3) * 16;

  if (nb_max <= nb_min) {  // no visible key for any row
    write_empty<T, HD>(p, q_start, m0, m_valid, head, tid, NTHR);
    return;
  }

  const T* gQ = static_cast<const T*>(p.q) + int64_t(q_start + m0) * p.q_row_stride + head * p.q_head_stride;
  const T* gK = static_cast<const T*>(p.k) + int64_t(k_start) * p.k_row_stride + head_k * p.k_head_stride;
  const T* gV = static_cast<const T*>(p.v) + int64_t(k_start) * p.v_row_stride + head_k * p.v_head_stride;
  // K_i and V_i (i-th visited block) live in stage i & 1; V_i is loaded one iteration after K_i because
  // P_i V_i runs in iteration i + 1, overlapped with the softmax of block i + 1.
  auto load_k = [&](int nb, int st) {
    const int n0 = nb * BN;
    load_swz<T, BN, HD, NTHR>(sK(st), gK + int64_t(n0) * p.k_row_stride, p.k_row_stride, sk - n0, p.d, p.k, tid);
  };
  auto load_v = [&](int nb, int st) {
    const int n0 = nb * BN;
    load_swz<T, BN, HD, NTHR>(sV(st), gV + int64_t(n0) * p.v_row_stride, p.v_row_stride, sk - n0, p.d, p.v, tid);
  };
  load_swz<T, BM, HD, NTHR>(sQ, gQ, p.q_row_stride, m_valid, p.d, p.q, tid);
  load_k(nb_max - 1, 0);
  ptx::cp_async_commit();

  const float sl2 = p.scale * float(M_LOG2E);
  float acc_o[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) acc_o[i] = 0.f;
  float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
  uint32_t pa[BN / 16][4];  // P of the previous block, A fragments of P V

  // O += P V for the block in stage st (issued, not waited).
  auto issue_pv = [&](int st) {
    wgmma_fence();  // pa was written since the last fence
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t dv = make_desc(sV(st) + kk * 16 * 128, BN * 128, 1024);
      Wgmma<T, HD>::template rs<1>(acc_o, pa[kk], dv, 1);
    }
    wgmma_commit();
  };

  int it = 0;
  for (int nb = nb_max - 1; nb >= nb_min; --nb, ++it) {
    const int st = it & 1, n0 = nb * BN;
    ptx::cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // K_it, V_{it-1} visible; everyone is done with K_{it-1} and V_{it-2}
    load_v(nb, st);
    if (nb > nb_min) load_k(nb - 1, st ^ 1);
    ptx::cp_async_commit();

    // S = Q K^T (this warpgroup's 64 rows, head dim in steps of 16), then P_{it-1} V_{it-1} behind it.
    float s[BN / 2];
    fence_regs(acc_o);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
      const uint32_t koff = (ks & 3) * 32;  // 16 columns = 32 B inside a 64-column block
      const uint64_t da = make_desc(sQ + (ks >> 2) * BM * 128 + wg * 64 * 128 + koff, 16, 1024);
      const uint64_t db = make_desc(sK(st) + (ks >> 2) * BN * 128 + koff, 16, 1024);
      Wgmma<T, BN>::template ss<0, 0>(s, da, db, ks > 0 ? 1 : 0);
    }
    wgmma_commit();
    if (it > 0) {
      issue_pv(st ^ 1);
      wgmma_wait<1>();  // S done; P V may still run
    } else {
      wgmma_wait<0>();
    }
    fence_regs(s);

    const bool need_mask = (n0 + BN > sk) || (wr >= 0 && n0 + BN - 1 > m0 + diag + wr) ||
                           (wl >= 0 && n0 < m0 + BM - 1 + diag - wl);
    if (need_mask) mask_block<BN>(s, m0 + warp_row0 + g, n0, diag, sk, wl, wr, t);
    float alpha[2];
    online_softmax<BN>(s, row_m, row_l, alpha, sl2);

    // The previous P V must finish before O is rescaled and pa is overwritten.
    wgmma_wait<0>();
    fence_regs(acc_o);
    rescale_o<HD>(acc_o, alpha);
    pack_p<T, BN>(pa, s);
  }
  // The last block's P V (its V was loaded in the last iteration).
  ptx::cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  fence_regs(acc_o);
  issue_pv((it - 1) & 1);
  wgmma_wait<0>();
  fence_regs(acc_o);

  float inv_l[2], lse_v[2];
  finish_rows(row_m, row_l, p.scale, inv_l, lse_v);

  // O through shared memory (the Q tile, same swizzle) for 16-byte coalesced stores.
  __syncthreads();
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = warp_row0 + g + hf * 8;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *reinterpret_cast<uint32_t*>(smem + swz_offset<BM>(row, dt) + 4 * t) =
          ptx::pack2<T>(acc_o[4 * dt + 2 * hf] * inv_l[hf], acc_o[4 * dt + 2 * hf + 1] * inv_l[hf]);
    if (t == 0 && row < m_valid) p.lse[int64_t(head) * p.total_q + q_start + m0 + row] = lse_v[hf];
  }
  __syncthreads();
  T* gO = static_cast<T*>(p.o) + int64_t(q_start + m0) * p.o_row_stride + head * p.o_head_stride;
#pragma unroll
  for (int i = 0; i < BM * DT / NTHR; ++i) {
    const int c = tid + i * NTHR;
    const int row = c / DT, ch = c % DT;
    if (row < m_valid && ch * 8 < p.d)
      *reinterpret_cast<uint4*>(gO + int64_t(row) * p.o_row_stride + ch * 8) =
          *reinterpret_cast<const uint4*>(smem + swz_offset<BM>(row, ch));
  }
#endif
}

}  // namespace hopper

template <typename T, int HD>
void launch_fwd_hopper_plain(const FwdParams& p, cudaStream_t stream) {
  using Tr = typename hopper::HopperConfig<HD>::Traits;
  auto kernel = hopper::fwd_hopper_kernel<T, Tr>;
  constexpr int smem = Tr::kSmemBytes;
  raise_smem_limit_once<hopper::fwd_hopper_kernel<T, Tr>>(smem,
      "cudaFuncSetAttribute(max dynamic shared memory, hopper)");
  dim3 grid(ceil_div(p.max_seqlen_q, Tr::BM), p.h, p.b);
  if (grid.x == 0 || p.b == 0) return;
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  fwd_check(cudaGetLastError(), "hopper forward kernel launch");
}

}  // namespace flashserve
