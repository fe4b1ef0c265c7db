// launch_fwd_hopper: the Hopper forward kernel chosen per head-dim class (measured on H100, NOTES.md):
// hd64 the plain kernel (two warpgroups, 2 blocks per SM), hd128 / hd256 the warp-specialized one.
// Tuning builds may flip a class with -DFS_HOPPER_WS_<hd>=0|1.
#pragma once
#include "fwd_hopper.h"
#include "fwd_hopper_kernel.cuh"
#include "fwd_hopper_ws.cuh"

#ifndef FS_HOPPER_WS_64
#define FS_HOPPER_WS_64 0
#endif
#ifndef FS_HOPPER_WS_128
#define FS_HOPPER_WS_128 1
#endif
#ifndef FS_HOPPER_WS_256
#define FS_HOPPER_WS_256 1
#endif

namespace flashserve {

template <typename T, int HD>
void launch_fwd_hopper(const FwdParams& p, cudaStream_t stream) {
  constexpr bool ws = HD == 64 ? FS_HOPPER_WS_64 : HD == 128 ? FS_HOPPER_WS_128 : FS_HOPPER_WS_256;
  if constexpr (ws) launch_fwd_hopper_ws<T, HD>(p, stream);
  else launch_fwd_hopper_plain<T, HD>(p, stream);
}

}  // namespace flashserve
