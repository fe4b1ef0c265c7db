// Backward main kernel for head-dim class 192, fp16 (compiled when the build selects both).
#include "../bwd_kernel.cuh"
#if defined(FLASHSERVE_HD_192) && defined(FLASHSERVE_DT_FP16)
namespace flashserve {
namespace bwd {
cudaError_t run_main_hd192_fp16(const BwdParams& p, cudaStream_t stream, size_t smem_optin) {
  return run_main_impl<__half, 192>(p, stream, smem_optin);
}
}  // namespace bwd
}  // namespace flashserve
#endif
