// Runtime dispatch from (dtype, head-dim class, features, split) to the instantiated launchers
// (csrc/fwd/inst/*.cu). FLASHSERVE_HD_<n> / FLASHSERVE_DT_<FP16|BF16> say what was compiled;
// FLASHSERVE_FWD_HOPPER says the sm_90a wgmma kernel (csrc/fwd/hopper/) was built too.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fwd_api.h"
#include "fwd_kernel.cuh"
#include "hopper/fwd_hopper.h"

namespace flashserve {

// Declared here, defined (explicitly instantiated) in the generated files.
#define FS_DECLARE(T, HD)                                                             \
  extern template void launch_fwd<T, HD, false, false>(const FwdParams&, cudaStream_t); \
  extern template void launch_fwd<T, HD, false, true>(const FwdParams&, cudaStream_t);  \
  extern template void launch_fwd<T, HD, true, false>(const FwdParams&, cudaStream_t);  \
  extern template void launch_fwd<T, HD, true, true>(const FwdParams&, cudaStream_t);

#define FS_FOR_DTYPES(HD)                                   \
  FS_IF_FP16(FS_DECLARE(__half, HD)) FS_IF_BF16(FS_DECLARE(__nv_bfloat16, HD))

#ifdef FLASHSERVE_DT_FP16
#define FS_IF_FP16(x) x
#else
#define FS_IF_FP16(x)
#endif
#ifdef FLASHSERVE_DT_BF16
#define FS_IF_BF16(x) x
#else
#define FS_IF_BF16(x)
#endif

#ifdef FLASHSERVE_HD_32
FS_FOR_DTYPES(32)
#endif
#ifdef FLASHSERVE_HD_64
FS_FOR_DTYPES(64)
#endif
#ifdef FLASHSERVE_HD_96
FS_FOR_DTYPES(96)
#endif
#ifdef FLASHSERVE_HD_128
FS_FOR_DTYPES(128)
#endif
#ifdef FLASHSERVE_HD_192
FS_FOR_DTYPES(192)
#endif
#ifdef FLASHSERVE_HD_256
FS_FOR_DTYPES(256)
#endif

#ifdef FLASHSERVE_FWD_HOPPER
#define FS_DECLARE_HOPPER(T, HD) extern template void launch_fwd_hopper<T, HD>(const FwdParams&, cudaStream_t);
#define FS_HOPPER_DTYPES(HD) FS_IF_FP16(FS_DECLARE_HOPPER(__half, HD)) FS_IF_BF16(FS_DECLARE_HOPPER(__nv_bfloat16, HD))
#ifdef FLASHSERVE_HD_64
FS_HOPPER_DTYPES(64)
#endif
#ifdef FLASHSERVE_HD_128
FS_HOPPER_DTYPES(128)
#endif
#ifdef FLASHSERVE_HD_256
FS_HOPPER_DTYPES(256)
#endif
#endif

static const int kClasses[] = {32, 64, 96, 128, 192, 256};

int fwd_head_dim_class(int d) {
  for (int c : kClasses)
    if (d <= c) return c;
  return -1;
}

std::vector<int> fwd_compiled_head_dims() {
  std::vector<int> v;
#ifdef FLASHSERVE_HD_32
  v.push_back(32);
#endif
#ifdef FLASHSERVE_HD_64
  v.push_back(64);
#endif
#ifdef FLASHSERVE_HD_96
  v.push_back(96);
#endif
#ifdef FLASHSERVE_HD_128
  v.push_back(128);
#endif
#ifdef FLASHSERVE_HD_192
  v.push_back(192);
#endif
#ifdef FLASHSERVE_HD_256
  v.push_back(256);
#endif
  return v;
}

std::vector<std::string> fwd_compiled_dtypes() {
  std::vector<std::string> v;
#ifdef FLASHSERVE_DT_FP16
  v.push_back("float16");
#endif
#ifdef FLASHSERVE_DT_BF16
  v.push_back("bfloat16");
#endif
  return v;
}

template <int HD>
static void tile_shape(int& bm, int& bn, int& blocks_per_sm) {
  using Tr = typename FwdConfig<HD>::Traits;
  bm = Tr::BM;
  bn = Tr::BN;
  blocks_per_sm = Tr::kMinBlocks;
}

static void tile_shape_of(int hd, int& bm, int& bn, int& bps) {
  switch (hd) {
    case 32: tile_shape<32>(bm, bn, bps); break;
    case 64: tile_shape<64>(bm, bn, bps); break;
    case 96: tile_shape<96>(bm, bn, bps); break;
    case 128: tile_shape<128>(bm, bn, bps); break;
    case 192: tile_shape<192>(bm, bn, bps); break;
    default: tile_shape<256>(bm, bn, bps); break;
  }
}

int fwd_auto_num_splits(const FwdParams& p) {
  const int hd = fwd_head_dim_class(p.d);
  if (hd < 0) return 1;
  int bm, bn, bps;
  tile_shape_of(hd, bm, bn, bps);
  if (p.max_seqlen_q <= 64 && bm > 64) {  // the split launch takes FwdDecodeTraits (64 rows, 4 warps)
    bm = 64;
    bps = 2;
  }
  const int64_t work = int64_t(p.b) * p.h * ceil_div(p.max_seqlen_q, bm);
  const int n_blocks = ceil_div(p.max_seqlen_k, bn);
  const int64_t slots = int64_t(std::max(p.num_sms, 1)) * bps;
  if (work * 5 >= slots * 4 || n_blocks < 4) return 1;  // already ~a full wave, or too few key blocks
  // Each split keeps at least 2 key blocks; pick the smallest count within 85% of the best wave efficiency.
  const int max_splits = std::min<int>(128, n_blocks / 2);
  auto efficiency = [&](int s) {
    const double waves = double(work * s) / double(slots);
    return waves / std::ceil(waves);
  };
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) best = std::max(best, efficiency(s));
  for (int s = 1; s <= max_splits; ++s) {
    // Skip counts that leave the same blocks per split as a smaller count (no extra parallelism).
    if (s > 1 && ceil_div(n_blocks, s) == ceil_div(n_blocks, s - 1)) continue;
    if (efficiency(s) >= 0.85 * best) return s;
  }
  return 1;
}

// The wgmma kernel runs only on sm_90 (its cubin is sm_90a), when built, and unless
// FLASHSERVE_FWD_HOPPER=0 (read per call, so tests can compare both paths in one process).
#ifdef FLASHSERVE_FWD_HOPPER
static bool use_hopper(const FwdParams& p, int hd) {
  if (!fwd_hopper_supports(p, hd)) return false;
  const char* env = std::getenv("FLASHSERVE_FWD_HOPPER");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  static int is_sm90[64] = {0};  // 0 unknown, 1 yes, 2 no; per device
  int dev = 0;
  fwd_check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) return false;
  if (is_sm90[dev] == 0) {
    int major = 0, minor = 0;
    fwd_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
    fwd_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
    is_sm90[dev] = (major == 9 && minor == 0) ? 1 : 2;
  }
  return is_sm90[dev] == 1;
}
#endif

template <typename T, int HD>
static void run_typed(const FwdParams& p, cudaStream_t stream) {
#ifdef FLASHSERVE_FWD_HOPPER
  if constexpr (HD == 64 || HD == 128 || HD == 256) {
    if (use_hopper(p, HD)) {
      launch_fwd_hopper<T, HD>(p, stream);
      return;
    }
  }
#endif
  const bool full = p.softcap > 0.f || p.alibi != nullptr || p.p_drop > 0.f || p.s_dmask != nullptr;
  const bool split = p.num_splits > 1;
  if (full) {
    if (split) launch_fwd<T, HD, true, true>(p, stream);
    else launch_fwd<T, HD, true, false>(p, stream);
  } else {
    if (split) launch_fwd<T, HD, false, true>(p, stream);
    else launch_fwd<T, HD, false, false>(p, stream);
  }
}

template <typename T>
static bool run_hd(const FwdParams& p, int hd, cudaStream_t stream) {
  switch (hd) {
#ifdef FLASHSERVE_HD_32
    case 32: run_typed<T, 32>(p, stream); return true;
#endif
#ifdef FLASHSERVE_HD_64
    case 64: run_typed<T, 64>(p, stream); return true;
#endif
#ifdef FLASHSERVE_HD_96
    case 96: run_typed<T, 96>(p, stream); return true;
#endif
#ifdef FLASHSERVE_HD_128
    case 128: run_typed<T, 128>(p, stream); return true;
#endif
#ifdef FLASHSERVE_HD_192
    case 192: run_typed<T, 192>(p, stream); return true;
#endif
#ifdef FLASHSERVE_HD_256
    case 256: run_typed<T, 256>(p, stream); return true;
#endif
    default: return false;
  }
}

void fwd_run(const FwdParams& p, cudaStream_t stream) {
  const int hd = fwd_head_dim_class(p.d);
  if (hd < 0) throw std::runtime_error("flashserve fwd: head_dim " + std::to_string(p.d) + " > 256 is not supported");
  if (p.s_dmask != nullptr && p.num_splits > 1)
    throw std::runtime_error("flashserve fwd: return_softmax needs num_splits == 1");
  bool ok = false;
  const char* dt = p.dtype == DType::kBFloat16 ? "bfloat16" : "float16";
  if (p.dtype == DType::kBFloat16) {
#ifdef FLASHSERVE_DT_BF16
    ok = run_hd<__nv_bfloat16>(p, hd, stream);
#endif
  } else {
#ifdef FLASHSERVE_DT_FP16
    ok = run_hd<__half>(p, hd, stream);
#endif
  }
  if (!ok)
    throw std::runtime_error(std::string("flashserve fwd: no kernel compiled for dtype ") + dt + ", head-dim class " +
                             std::to_string(hd) + " (head_dim " + std::to_string(p.d) +
                             "); rebuild with FLASHSERVE_HEADDIMS / FLASHSERVE_DTYPES including it");
}

}  // namespace flashserve
