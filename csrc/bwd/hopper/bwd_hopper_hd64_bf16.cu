// Hopper (sm_90a) backward main kernel for head-dim class 64, bf16 (compiled when the build selects both).
#include "bwd_hopper.h"
#include "bwd_hopper_kernel.cuh"
#if defined(FLASHSERVE_HD_64) && defined(FLASHSERVE_DT_BF16)
namespace flashserve {
namespace bwd {
cudaError_t run_hopper_hd64_bf16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe) {
  return hopper::run_hopper_impl<__nv_bfloat16, 64>(p, stream, used, probe);
}
}  // namespace bwd
}  // namespace flashserve
#endif
