// Host entry points of the forward kernels (torch-free). Errors are thrown as std::runtime_error.
#pragma once
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "fwd_params.h"

namespace flashserve {

// Smallest compiled head-dim class >= d (independent of what was compiled), or -1 when d > 256.
int fwd_head_dim_class(int d);
// Split count for num_splits = 0 (auto); p must have b, h, max_seqlen_*, d, num_sms filled.
int fwd_auto_num_splits(const FwdParams& p);
// Runs the forward pass (and the split-KV combine when p.num_splits > 1).
void fwd_run(const FwdParams& p, cudaStream_t stream);
// What this build contains.
std::vector<int> fwd_compiled_head_dims();
std::vector<std::string> fwd_compiled_dtypes();

}  // namespace flashserve
