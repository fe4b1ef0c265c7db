// Warp-specialized variant of the Hopper forward kernel (fwd_hopper_kernel.cuh has the math):
// warpgroup 0 is the producer (cp.async of Q, K, V into the swizzled tiles, 56 registers), warpgroups 1
// and 2 are consumers of 64 query rows each (224 registers). Stages hand over through mbarriers instead
// of block-wide barriers, so the two consumers drift apart and one's softmax overlaps the other's GEMMs.
//
//   full[K|V][stage]  count 128: every producer thread arrives after its own copies landed (and a proxy
//                     fence: cp.async writes are generic, wgmma reads are async-proxy).
//   empty[K|V][stage] count 8: lane 0 of each consumer warp arrives once its wgmma reading it completed.
// The i-th visited key block uses stage i & 1; waits use the phase parity (i >> 1) & 1.
// kPingPong: the consumers take turns issuing their GEMMs (named barriers 3 and 4), so the tensor cores
// run one warpgroup's S / P V while the other does its softmax.
#pragma once
#include "fwd_hopper_kernel.cuh"

namespace flashserve {
namespace hopper {

template <int HD_, int BN_>
struct WsTraits {
  static constexpr int HD = HD_, BM = 128, BN = BN_, kThreads = 384;
  static constexpr int kQBytes = BM * HD * 2, kKVBytes = BN * HD * 2;
  static constexpr int kBarOffset = kQBytes + 4 * kKVBytes;
  static constexpr int kSmemBytes = kBarOffset + 128 + 1024;  // 9 mbarriers, 1024 B alignment slack
  static constexpr int kProducerRegs = 56, kConsumerRegs = 224;  // 128 * 56 + 256 * 224 <= 64K
};

#ifndef FS_HOPPER_PINGPONG
#define FS_HOPPER_PINGPONG 0  // measured neutral (+-2%, NOTES.md); kept as an option
#endif

template <int HD> struct WsConfig;
template <> struct WsConfig<64> { using Traits = WsTraits<64, FS_HOPPER_BN_64>; };
template <> struct WsConfig<128> { using Traits = WsTraits<128, FS_HOPPER_BN_128>; };
template <> struct WsConfig<256> { using Traits = WsTraits<256, FS_HOPPER_BN_256>; };

template <typename T, typename Tr, bool kPingPong>
__global__ void __launch_bounds__(Tr::kThreads, 1) fwd_hopper_ws_kernel(const FwdParams p) {
#ifdef FS_HOPPER_DEVICE
  constexpr int HD = Tr::HD, BM = Tr::BM, BN = Tr::BN, DT = HD / 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_a = ptx::smem_addr(smem_raw);
  const uint32_t sQ = (raw_a + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (sQ - raw_a);
  auto sK = [&](int st) { return sQ + Tr::kQBytes + st * 2 * Tr::kKVBytes; };
  auto sV = [&](int st) { return sQ + Tr::kQBytes + st * 2 * Tr::kKVBytes + Tr::kKVBytes; };
  const uint32_t bar = sQ + Tr::kBarOffset;
  const uint32_t bar_q = bar;
  auto bar_kf = [&](int st) { return bar + 8 + 8 * st; };
  auto bar_vf = [&](int st) { return bar + 24 + 8 * st; };
  auto bar_ke = [&](int st) { return bar + 40 + 8 * st; };
  auto bar_ve = [&](int st) { return bar + 56 + 8 * st; };

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
  const int diag = sk - sq;
  const int wl = p.window_left, wr = p.window_right;
  int key_lo = 0, key_hi = sk;
  if (wr >= 0) key_hi = min(sk, m0 + m_valid - 1 + diag + wr + 1);
  if (wl >= 0) key_lo = max(0, m0 + diag - wl);
  const int nb_min = key_lo / BN;
  const int nb_max = key_hi > key_lo ? ceil_div(key_hi, BN) : nb_min;
  const int tid = threadIdx.x, wg = tid / 128, ltid = tid % 128;

  if (nb_max <= nb_min) {  // no visible key for any row
    write_empty<T, HD>(p, q_start, m0, m_valid, head, tid, Tr::kThreads);
    return;
  }
  const int n_blocks = nb_max - nb_min;

  if (tid == 0) {
    mbar_init(bar_q, 128);
    for (int st = 0; st < 2; ++st) {
      mbar_init(bar_kf(st), 128);
      mbar_init(bar_vf(st), 128);
      mbar_init(bar_ke(st), 8);
      mbar_init(bar_ve(st), 8);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    setmaxnreg_dec<Tr::kProducerRegs>();
    const T* gQ = static_cast<const T*>(p.q) + int64_t(q_start + m0) * p.q_row_stride + head * p.q_head_stride;
    const T* gK = static_cast<const T*>(p.k) + int64_t(k_start) * p.k_row_stride + head_k * p.k_head_stride;
    const T* gV = static_cast<const T*>(p.v) + int64_t(k_start) * p.v_row_stride + head_k * p.v_head_stride;
    auto load_k = [&](int i) {
      const int n0 = (nb_max - 1 - i) * BN;
      load_swz<T, BN, HD, 128>(sK(i & 1), gK + int64_t(n0) * p.k_row_stride, p.k_row_stride, sk - n0, p.d, p.k,
                               ltid);
      ptx::cp_async_commit();
    };
    auto load_v = [&](int i) {
      const int n0 = (nb_max - 1 - i) * BN;
      load_swz<T, BN, HD, 128>(sV(i & 1), gV + int64_t(n0) * p.v_row_stride, p.v_row_stride, sk - n0, p.d, p.v,
                               ltid);
      ptx::cp_async_commit();
    };
    load_swz<T, BM, HD, 128>(sQ, gQ, p.q_row_stride, m_valid, p.d, p.q, ltid);
    ptx::cp_async_commit();
    load_k(0);
    for (int i = 0; i < n_blocks; ++i) {
      // In flight: K_i (and Q when i == 0). K_i first: the consumers need it before V_i.
      ptx::cp_async_wait<0>();
      fence_proxy_async();
      if (i == 0) mbar_arrive(bar_q);
      mbar_arrive(bar_kf(i & 1));
      if (i >= 2) mbar_wait(bar_ve(i & 1), ((i >> 1) - 1) & 1);  // V_{i-2} released
      load_v(i);
      if (i + 1 < n_blocks) {
        if (i >= 1) mbar_wait(bar_ke((i + 1) & 1), ((i - 1) >> 1) & 1);  // K_{i-1} released
        load_k(i + 1);
        ptx::cp_async_wait<1>();  // V_i landed, K_{i+1} may still fly
      } else {
        ptx::cp_async_wait<0>();
      }
      fence_proxy_async();
      mbar_arrive(bar_vf(i & 1));
    }
  } else {
    // ---------------------------------------------------------------- consumers
    setmaxnreg_inc<Tr::kConsumerRegs>();
    const int cw = wg - 1, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
    const int warp_row0 = cw * 64 + (warp & 3) * 16;
    const float sl2 = p.scale * float(M_LOG2E);
    float acc_o[HD / 2];
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) acc_o[i] = 0.f;
    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
    uint32_t pa[BN / 16][4];

    auto issue_pv = [&](int st) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint64_t dv = make_desc(sV(st) + kk * 16 * 128, BN * 128, 1024);
        Wgmma<T, HD>::template rs<1>(acc_o, pa[kk], dv, 1);
      }
      wgmma_commit();
    };

    mbar_wait(bar_q, 0);
    if (kPingPong && cw == 1) named_arrive(3, 256);  // warpgroup 1 goes first
    for (int i = 0; i < n_blocks; ++i) {
      const int st = i & 1, n0 = (nb_max - 1 - i) * BN;
      mbar_wait(bar_kf(st), (i >> 1) & 1);
      if (kPingPong) named_sync(3 + cw, 256);  // my turn
      // Hand the turn over after issuing (warpgroup 2's last hand-over would have no taker).
      const bool hand_over = cw == 0 || i + 1 < n_blocks;
      float s[BN / 2];
      fence_regs(acc_o);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < HD / 16; ++ks) {
        const uint32_t koff = (ks & 3) * 32;
        const uint64_t da = make_desc(sQ + (ks >> 2) * BM * 128 + cw * 64 * 128 + koff, 16, 1024);
        const uint64_t db = make_desc(sK(st) + (ks >> 2) * BN * 128 + koff, 16, 1024);
        Wgmma<T, BN>::template ss<0, 0>(s, da, db, ks > 0 ? 1 : 0);
      }
      wgmma_commit();
      if (i > 0) {
        mbar_wait(bar_vf(st ^ 1), ((i - 1) >> 1) & 1);
        issue_pv(st ^ 1);
        if (kPingPong && hand_over) named_arrive(3 + (cw ^ 1), 256);
        wgmma_wait<1>();
      } else {
        if (kPingPong && hand_over) named_arrive(3 + (cw ^ 1), 256);
        wgmma_wait<0>();
      }
      fence_regs(s);
      if (lane == 0) mbar_arrive(bar_ke(st));  // this warp is done with K_i

      const bool need_mask = (n0 + BN > sk) || (wr >= 0 && n0 + BN - 1 > m0 + diag + wr) ||
                             (wl >= 0 && n0 < m0 + BM - 1 + diag - wl);
      if (need_mask) mask_block<BN>(s, m0 + warp_row0 + g, n0, diag, sk, wl, wr, t);
      float alpha[2];
      online_softmax<BN>(s, row_m, row_l, alpha, sl2);

      wgmma_wait<0>();
      fence_regs(acc_o);
      if (i > 0 && lane == 0) mbar_arrive(bar_ve(st ^ 1));  // done with V_{i-1}
      rescale_o<HD>(acc_o, alpha);
      pack_p<T, BN>(pa, s);
    }
    {
      const int last = n_blocks - 1;
      mbar_wait(bar_vf(last & 1), (last >> 1) & 1);
      fence_regs(acc_o);
      issue_pv(last & 1);
      wgmma_wait<0>();
      fence_regs(acc_o);
    }

    float inv_l[2], lse_v[2];
    finish_rows(row_m, row_l, p.scale, inv_l, lse_v);
    // O through this warpgroup's rows of the Q tile (no other warpgroup touches them).
    named_sync(1 + cw, 128);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_row0 + g + hf * 8;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(smem + swz_offset<BM>(row, dt) + 4 * t) =
            ptx::pack2<T>(acc_o[4 * dt + 2 * hf] * inv_l[hf], acc_o[4 * dt + 2 * hf + 1] * inv_l[hf]);
      if (t == 0 && row < m_valid) p.lse[int64_t(head) * p.total_q + q_start + m0 + row] = lse_v[hf];
    }
    named_sync(1 + cw, 128);
    T* gO = static_cast<T*>(p.o) + int64_t(q_start + m0) * p.o_row_stride + head * p.o_head_stride;
#pragma unroll
    for (int j = 0; j < 64 * DT / 128; ++j) {
      const int c = ltid + j * 128;
      const int row = cw * 64 + c / DT, ch = c % DT;
      if (row < m_valid && ch * 8 < p.d)
        *reinterpret_cast<uint4*>(gO + int64_t(row) * p.o_row_stride + ch * 8) =
            *reinterpret_cast<const uint4*>(smem + swz_offset<BM>(row, ch));
    }
  }
#endif
}

}  // namespace hopper

template <typename T, int HD, bool kPingPong = FS_HOPPER_PINGPONG>
void launch_fwd_hopper_ws(const FwdParams& p, cudaStream_t stream) {
  using Tr = typename hopper::WsConfig<HD>::Traits;
  auto kernel = hopper::fwd_hopper_ws_kernel<T, Tr, kPingPong>;
  constexpr int smem = Tr::kSmemBytes;
  raise_smem_limit_once<hopper::fwd_hopper_ws_kernel<T, Tr, kPingPong>>(smem,
      "cudaFuncSetAttribute(max dynamic shared memory, hopper ws)");
  dim3 grid(ceil_div(p.max_seqlen_q, Tr::BM), p.h, p.b);
  if (grid.x == 0 || p.b == 0) return;
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  fwd_check(cudaGetLastError(), "hopper ws forward kernel launch");
}

}  // namespace flashserve
