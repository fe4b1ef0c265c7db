// Backward main kernel for head-dim class 32, bf16 (compiled when the build selects both).
#include "../bwd_kernel.cuh"
#if defined(FLASHSERVE_HD_32) && defined(FLASHSERVE_DT_BF16)
namespace flashserve {
namespace bwd {
cudaError_t run_main_hd32_bf16(const BwdParams& p, cudaStream_t stream, size_t smem_optin) {
  return run_main_impl<__nv_bfloat16, 32>(p, stream, smem_optin);
}
}  // namespace bwd
}  // namespace flashserve
#endif
