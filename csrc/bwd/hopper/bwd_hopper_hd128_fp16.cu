// Hopper (sm_90a) backward main kernel for head-dim class 128, fp16 (compiled when the build selects both).
#include "bwd_hopper.h"
#include "bwd_hopper_kernel.cuh"
#if defined(FLASHSERVE_HD_128) && defined(FLASHSERVE_DT_FP16)
namespace flashserve {
namespace bwd {
cudaError_t run_hopper_hd128_fp16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe) {
  return hopper::run_hopper_impl<__half, 128>(p, stream, used, probe);
}
}  // namespace bwd
}  // namespace flashserve
#endif
