// Host-side view of the Hopper (sm_90a, wgmma) forward kernel: which calls it takes, and its launcher
// (defined in fwd_hopper_kernel.cuh, instantiated in csrc/fwd/inst/fwd_hopper_hd<N>_<dtype>.cu).
#pragma once
#include <cuda_runtime.h>

#include "../fwd_params.h"

namespace flashserve {

// Features only (the caller checks the GPU, the build and FLASHSERVE_FWD_HOPPER): head-dim classes 64,
// 128, 256; no softcap, ALiBi, dropout, return_softmax or split-KV (those stay on the mma.sync kernel).
inline bool fwd_hopper_supports(const FwdParams& p, int hd_class) {
  return (hd_class == 64 || hd_class == 128 || hd_class == 256) && p.softcap <= 0.f && p.alibi == nullptr &&
         p.p_drop <= 0.f && p.s_dmask == nullptr && p.num_splits <= 1;
}

template <typename T, int HD>
void launch_fwd_hopper(const FwdParams& p, cudaStream_t stream);

}  // namespace flashserve
