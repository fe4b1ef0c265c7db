// Backward main kernel for head-dim class 96, fp16 (compiled when the build selects both).
#include "../bwd_kernel.cuh"
#if defined(FLASHSERVE_HD_96) && defined(FLASHSERVE_DT_FP16)
namespace flashserve {
namespace bwd {
cudaError_t run_main_hd96_fp16(const BwdParams& p, cudaStream_t stream, size_t smem_optin) {
  return run_main_impl<__half, 96>(p, stream, smem_optin);
}
}  // namespace bwd
}  // namespace flashserve
#endif
