// Backward main kernel for head-dim class 64, bf16 (compiled when the build selects both).
#include "../bwd_kernel.cuh"
#if defined(FLASHSERVE_HD_64) && defined(FLASHSERVE_DT_BF16)
namespace flashserve {
namespace bwd {
cudaError_t run_main_hd64_bf16(const BwdParams& p, cudaStream_t stream, size_t smem_optin) {
  return run_main_impl<__nv_bfloat16, 64>(p, stream, smem_optin);
}
}  // namespace bwd
}  // namespace flashserve
#endif
