// Device helpers shared by the two Hopper backward kernels, bwd_hopper_kernel.cuh (head-dim classes 64 / 128)
// and bwd_hopper_d256.cuh (class 256). The wgmma plumbing itself (descriptors, fences, MMAs) is the forward
// kernel's too and lives in csrc/common/hopper/.
#pragma once
#include <cstdint>

#include "../../common/hopper/wgmma.cuh"
#include "../bwd_kernel.cuh"

namespace flashserve {
namespace bwd {
namespace hopper {

using ::flashserve::hopper::fence_proxy_async;
using ::flashserve::hopper::fence_regs;
using ::flashserve::hopper::make_desc;
using ::flashserve::hopper::named_sync;
using ::flashserve::hopper::Wgmma;
using ::flashserve::hopper::wgmma_commit;
using ::flashserve::hopper::wgmma_fence;
using ::flashserve::hopper::wgmma_wait;

// Byte offset of element (r, c) in a 128B-swizzled tile of `rows` rows (16-bit elements): D / 64 column panels
// of rows x 128 bytes, 16-byte chunk c of row r at chunk c ^ (r % 8).
__device__ __forceinline__ uint32_t swz(int rows, int r, int c) {
  return (uint32_t)((c >> 6) * rows * 128 + r * 128 + ((((c & 63) >> 3) ^ (r & 7)) << 4) + (c & 7) * 2);
}

// Deterministic mode: reads a dQ counter other blocks release with __threadfence + atomicAdd.
__device__ __forceinline__ int ld_acquire(const int* ptr) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// Query blocks [lo, hi) of Br rows that see any key of K/V block kb (Bc keys), for the band
// diag - wl <= key - query <= diag + wr (wl / wr < 0: unbounded), diag = sk - sq.
template <int Bc, int Br>
__device__ __forceinline__ void query_block_range(int kb, int sq, int diag, int wl, int wr, int& lo, int& hi) {
  const int jx = kb * Bc;
  int a = 0, z = sq;
  if (wr >= 0) a = max(0, jx - diag - wr);
  if (wl >= 0) z = min(sq, jx + Bc - 1 - diag + wl + 1);
  lo = a / Br;
  hi = z > a ? (z + Br - 1) / Br : lo;
}

// cp.async of rows row0 .. row0 + ROWS - 1 of two same-shaped global tiles (K and V, or Q and dO; kD columns)
// into 128B-swizzled shared tiles; rows >= nrows and columns >= d are zero-filled. The strides and d are taken by
// reference so that their kernel-parameter loads stay at their uses, where the kernels had them (same SASS).
template <int ROWS, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_tile_pair(uint32_t sa, const T* ga, const int64_t& stride_a, uint32_t sb,
                                               const T* gb, const int64_t& stride_b, int row0, int nrows, const int& d,
                                               int tid) {
  constexpr int kChunks = ROWS * (kD / 8);
#pragma unroll
  for (int c = tid; c < kChunks; c += kThreads) {
    const int r = c / (kD / 8), col = (c % (kD / 8)) * 8;
    const bool ok = (row0 + r < nrows) && (col < d);
    const int rr = ok ? row0 + r : 0, cc = ok ? col : 0;
    const uint32_t off = swz(ROWS, r, col);
    ptx::cp_async16(sa + off, ga + (int64_t)rr * stride_a + cc, ok ? 16 : 0);
    ptx::cp_async16(sb + off, gb + (int64_t)rr * stride_b + cc, ok ? 16 : 0);
  }
}

// cp.async of rows row0 .. row0 + ROWS - 1 of one global tile into a 128B-swizzled shared tile (as load_tile_pair).
template <int ROWS, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_tile(uint32_t sa, const T* ga, const int64_t& stride_a, int row0, int nrows,
                                          const int& d, int tid) {
  constexpr int kChunks = ROWS * (kD / 8);
#pragma unroll
  for (int c = tid; c < kChunks; c += kThreads) {
    const int r = c / (kD / 8), col = (c % (kD / 8)) * 8;
    const bool ok = (row0 + r < nrows) && (col < d);
    const int rr = ok ? row0 + r : 0, cc = ok ? col : 0;
    ptx::cp_async16(sa + swz(ROWS, r, col), ga + (int64_t)rr * stride_a + cc, ok ? 16 : 0);
  }
}

// cp.async of LSE and D (rowsum of dO o O) for query rows row0 .. row0 + ROWS - 1; rows >= nrows read as 0.
template <int ROWS>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_d, const float* lse, const float* dsum,
                                               int row0, int nrows, int tid) {
  if (tid < ROWS) {
    const bool ok = row0 + tid < nrows;
    const int rr = ok ? row0 + tid : 0;
    ptx::cp_async4(ptx::smem_addr(s_lse + tid), lse + rr, ok ? 4 : 0);
    ptx::cp_async4(ptx::smem_addr(s_d + tid), dsum + rr, ok ? 4 : 0);
  }
}

// Deterministic mode, thread 0: releases a query block once this block's dQ additions into it are issued. The
// fence is cumulative (as in a grid barrier): it covers the additions of every thread that synchronized with
// this one since they were issued.
__device__ __forceinline__ void release_dq_block(int* sem, int m) {
  __threadfence();
  atomicAdd(sem + m, 1);
}

// Adds this thread's part of an m64 x (8 kN8) fp32 dQ accumulator into dq_accum with float4 atomics: lanes t,
// t ^ 1 swap halves so that each adds 4 consecutive columns of one row. qrow: this thread's row (row0 + 8 when
// t is odd), col0: the tile's first column.
template <int kN8>
__device__ __forceinline__ void atomic_add_dq(const float (&dq)[kN8 * 4], float* dq_acc, int64_t dq_row, int qrow,
                                              int col0, int sq, int d, int t) {
#pragma unroll
  for (int n = 0; n < kN8; ++n) {
    const float s0 = (t & 1) ? dq[n * 4 + 0] : dq[n * 4 + 2];
    const float s1 = (t & 1) ? dq[n * 4 + 1] : dq[n * 4 + 3];
    const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1);
    const float r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
    const float4 v = (t & 1) ? make_float4(r0, r1, dq[n * 4 + 2], dq[n * 4 + 3])
                             : make_float4(dq[n * 4 + 0], dq[n * 4 + 1], r0, r1);
    const int col = col0 + n * 8 + (t >> 1) * 4;
    if (qrow < sq && col < d) atomicAdd(reinterpret_cast<float4*>(dq_acc + (int64_t)qrow * dq_row + col), v);
  }
}

// dQ by bulk reduction (default mode of the d256 kernel): the fp32 dQ tile is staged in shared memory and one
// lane per warp adds each staged row segment into dq_accum with cp.reduce.async.bulk (the TMA unit performs the
// read-modify-write in L2; no per-element atomics). Addresses 16-byte aligned, sizes multiples of 16 bytes.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void st_shared_f32x2(uint32_t addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void bulk_reduce_add_f32(float* gdst, uint32_t ssrc, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(
                   (uint64_t)__cvta_generic_to_global(gdst)),
               "r"(ssrc), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's bulk groups still read their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until at most N of this thread's bulk groups are incomplete (global writes included).
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
#else
__device__ __forceinline__ void st_shared_f32x2(uint32_t, float, float) {}
__device__ __forceinline__ void bulk_reduce_add_f32(float*, uint32_t, uint32_t) {}
__device__ __forceinline__ void bulk_commit() {}
template <int N>
__device__ __forceinline__ void bulk_wait_read() {}
template <int N>
__device__ __forceinline__ void bulk_wait() {}
#endif

// Writes this thread's dK (times the softmax scale) and dV accumulators, m64 x (8 kN8) tiles: element e of
// n-block n is key key_row + 8 ((e / 2) % 2) (key_row: in the sequence), column col0 + 8 n + 2 t + e % 2.
// Without GQA straight into dk / dv (T); with it into the fp32 per-query-head buffers the postprocess reduces.
template <typename T, int kN8>
__device__ __forceinline__ void store_dk_dv(const BwdParams& p, const float (&dk)[kN8 * 4],
                                            const float (&dv)[kN8 * 4], int key_row, int col0, int sk, int k_start,
                                            int group, int h, int hk, int t) {
  const float sc = p.scale;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int ka = key_row + half * 8;
    if (ka >= sk) continue;
#pragma unroll
    for (int n = 0; n < kN8; ++n) {
      const int col = col0 + n * 8 + 2 * t;
      if (col >= p.d) continue;
      const float k0 = dk[n * 4 + 2 * half] * sc, k1 = dk[n * 4 + 2 * half + 1] * sc;
      const float v0 = dv[n * 4 + 2 * half], v1 = dv[n * 4 + 2 * half + 1];
      if (group == 1) {
        const int64_t off = ((int64_t)(k_start + ka) * p.h_k + hk) * p.d + col;
        *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dk) + off) = ptx::pack2<T>(k0, k1);
        *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dv) + off) = ptx::pack2<T>(v0, v1);
      } else {
        const int64_t off = ((int64_t)(k_start + ka) * p.h + h) * p.d + col;
        *reinterpret_cast<float2*>(p.dk_accum + off) = make_float2(k0, k1);
        *reinterpret_cast<float2*>(p.dv_accum + off) = make_float2(v0, v1);
      }
    }
  }
}

// Launches one instantiation of a Hopper backward kernel with traits Tr (grid: K/V blocks x heads x sequences;
// arguments p, then `extra`);
// probe: only says whether it would. *used = false (and nothing launched) when this binary holds no sm_90a code
// for it.
template <class Tr, class Kernel, class... Extra>
cudaError_t launch_hopper_bwd(Kernel kernel, const BwdParams& p, cudaStream_t stream, bool* used, bool probe,
                              Extra... extra) {
  *used = false;
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  if (e != cudaSuccess || attr.binaryVersion < 90) {
    cudaGetLastError();  // clear
    return cudaSuccess;
  }
  if (probe) {
    *used = true;
    return cudaSuccess;
  }
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (e != cudaSuccess) return e;
  *used = true;
  const int nkb = (p.max_seqlen_k + Tr::Bc - 1) / Tr::Bc;
  if (nkb == 0 || p.b == 0 || p.h == 0) return cudaSuccess;
  // Deterministic mode with counters relies on blocks starting in increasing blockIdx.x (x varies fastest):
  // block kb waits only for blocks kb' < kb of its (head, sequence). K/V-block loop: loop_blocks per pair.
  const int gx = p.loop_blocks > 0 ? p.loop_blocks : nkb;
  kernel<<<dim3(gx, p.h, p.b), Tr::kThreads, Tr::kSmemBytes, stream>>>(p, extra...);
  return cudaGetLastError();
}

}  // namespace hopper
}  // namespace bwd
}  // namespace flashserve
