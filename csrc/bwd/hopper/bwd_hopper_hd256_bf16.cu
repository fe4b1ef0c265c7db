// Hopper (sm_90a) backward main kernel for head-dim class 256, bf16 (compiled when the build selects both).
#include "bwd_hopper.h"
#include "bwd_hopper_d256.cuh"
#if defined(FLASHSERVE_HD_256) && defined(FLASHSERVE_DT_BF16)
namespace flashserve {
namespace bwd {
cudaError_t run_hopper_hd256_bf16(const BwdParams& p, cudaStream_t stream, bool* used, bool probe) {
  return hopper::run_hopper_d256_impl<__nv_bfloat16>(p, stream, used, probe);
}
}  // namespace bwd
}  // namespace flashserve
#endif
