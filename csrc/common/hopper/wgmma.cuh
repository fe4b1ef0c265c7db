// Hopper (sm_90a) plumbing shared by the forward (csrc/fwd/hopper) and backward (csrc/bwd/hopper) kernels:
// shared-memory matrix descriptors for 128-byte-swizzled tiles, warpgroup MMA fences, mbarriers, setmaxnreg,
// named barriers; the MMAs themselves are in the generated wgmma_ops.cuh. Device bodies exist only for the
// sm_90a target (wgmma is arch-specific); other targets get empty ones so that shared code still compiles.
#pragma once
#include <cstdint>

#include "wgmma_ops.cuh"

namespace flashserve {
namespace hopper {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FS_HOPPER_DEVICE 1
#endif

// Tile layout shared by Q, K, V and O in shared memory: the head dim is cut into 64-element (128-byte)
// column blocks, each a [rows][64] array whose 16-byte chunk c of row r sits at chunk c ^ (r % 8)
// (the hardware's 128B swizzle; the tile base must be 1024-byte aligned).
template <int ROWS>
__device__ __forceinline__ uint32_t swz_offset(int row, int chunk) {
  return uint32_t((chunk >> 3) * (ROWS * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// Descriptor of a 128B-swizzled operand, lbo / sbo in bytes. K-major (head dim contiguous, e.g. Q, K of
// S = Q K^T): SBO = stride of 8-row groups (1024 B); LBO unused. MN-major (e.g. V as the B of P V):
// LBO = bytes between 64-element MN panels, SBO = bytes between 8-row K groups.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = uint64_t((saddr & 0x3FFFF) >> 4);
  d |= uint64_t((lbo >> 4) & 0x3FFF) << 16;
  d |= uint64_t((sbo >> 4) & 0x3FFF) << 32;
  d |= uint64_t(1) << 62;  // 128B swizzle
  return d;
}

#ifdef FS_HOPPER_DEVICE
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Generic-proxy shared-memory writes (st.shared, cp.async) made visible to the async proxy (wgmma reads).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// mbarriers (shared::cta) for the producer / consumer warpgroups of the warp-specialized kernel.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Blocks until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
// Barrier among `count` threads (a multiple of 32) on hardware barrier `id` (0 is __syncthreads).
__device__ __forceinline__ void named_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
#else
__device__ __forceinline__ void named_arrive(int, int) {}
__device__ __forceinline__ void mbar_init(uint32_t, int) {}
__device__ __forceinline__ void mbar_init_fence() {}
__device__ __forceinline__ void mbar_arrive(uint32_t) {}
__device__ __forceinline__ void mbar_wait(uint32_t, uint32_t) {}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {}
__device__ __forceinline__ void named_sync(int, int) {}
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
__device__ __forceinline__ void fence_proxy_async() {}
#endif

// Pins accumulator registers in place around asynchronous MMAs (the compiler must neither read them
// before wgmma_wait nor write them after wgmma_fence).
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// Same for register A fragments (N k-chunks of 4 b32) that an in-flight wgmma reads.
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

}  // namespace hopper
}  // namespace flashserve
