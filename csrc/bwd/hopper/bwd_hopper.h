// Entry points of the sm_90a (wgmma) backward main kernel, one per (head-dim class, dtype); each is defined in
// bwd_hopper_hd<D>_<dtype>.cu when the build selects that class and dtype. *used = false when the binary holds
// no sm_90a code for the kernel (then nothing was launched and the caller runs the mma.sync kernel); probe:
// only answer that, launch nothing.
#pragma once
#include <cuda_runtime.h>

#include "../bwd_params.h"

namespace flashserve {
namespace bwd {

cudaError_t run_hopper_hd64_bf16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe);
cudaError_t run_hopper_hd64_fp16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe);
cudaError_t run_hopper_hd128_bf16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe);
cudaError_t run_hopper_hd128_fp16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe);
cudaError_t run_hopper_hd256_bf16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe);
cudaError_t run_hopper_hd256_fp16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe);

}  // namespace bwd
}  // namespace flashserve
