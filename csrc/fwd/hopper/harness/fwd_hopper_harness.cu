// Standalone (torch-free) check and timing of the Hopper forward kernel against a CPU double reference
// and against the mma.sync kernel (fwd_kernel.cuh), on an sm_90 GPU.
//
//   build: csrc/fwd/hopper/harness/build.sh  (writes build/hopper_fwd/fwd_hopper_harness)
//   run:   fwd_hopper_harness [correct] [time] [hd=64 hd=256 ...]   (default: both, all classes)
//
// Correctness: random inputs, outputs poisoned with NaN before each call, every element checked. The
// mma.sync kernel's error against the reference is the bar: Hopper O error <= 2x it + 1e-5, LSE within
// 1e-3 of max(|lse|, 1), rows with no key O = 0 and LSE = +inf.
// Timing: cudaEvent per call, 3 warm-ups, median of 15, two input sets alternated; 16k tokens per
// launch, heads = 2048 / d, the benchmark grid. TFLOP/s = 4 b h s^2 d / t (halved for causal).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../fwd_hopper_launch.cuh"

using namespace flashserve;

#define CK(x)                                                                                      \
  do {                                                                                             \
    cudaError_t e_ = (x);                                                                          \
    if (e_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); \
      std::exit(2);                                                                                \
    }                                                                                              \
  } while (0)

template <typename T> float to_f(T x);
template <> float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> float to_f(__half x) { return __half2float(x); }
template <typename T> T from_f(float x);
template <> __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __half from_f(float x) { return __float2half(x); }

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static float urand() {  // xorshift64*, uniform in [-1, 1)
  g_rng ^= g_rng >> 12; g_rng ^= g_rng << 25; g_rng ^= g_rng >> 27;
  return float((g_rng * 0x2545F4914F6CDD1Dull) >> 40) / float(1 << 23) - 1.f;
}

struct Case {
  std::string name;
  int d;
  std::vector<int> lq, lk;
  int h, hk;
  int wl, wr;  // -1: unbounded; causal = (-1, 0)
};

// Kernels compared: 0 = mma.sync (fwd_kernel.cuh), 1 = Hopper plain, 2 = Hopper warp-specialized,
// (launch_fwd_hopper, what the extension runs, is one of the two per head-dim class).
// 3 = warp-specialized with ping-pong consumers.
constexpr int kKernels = 4;
static const char* kNames[kKernels] = {"mma", "hopper", "hopper_ws", "ws_pingpong"};
template <typename T, int HD>
void launch(int which, const FwdParams& p) {
  if (which == 1) launch_fwd_hopper_plain<T, HD>(p, 0);
  else if (which == 2) launch_fwd_hopper_ws<T, HD, false>(p, 0);
  else if (which == 3) launch_fwd_hopper_ws<T, HD, true>(p, 0);
  else launch_fwd<T, HD, false, false>(p, 0);
}

struct Dev {
  void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  float* lse = nullptr;
  int *cq = nullptr, *ck = nullptr;
};

template <typename T>
FwdParams make_params(const Dev& m, int b, int h, int hk, int d, int total_q, int max_q, int max_k, int wl, int wr) {
  FwdParams p;
  std::memset(&p, 0, sizeof(p));
  p.q = m.q; p.k = m.k; p.v = m.v; p.o = m.o; p.lse = m.lse;
  p.q_row_stride = int64_t(h) * d; p.q_head_stride = d;
  p.k_row_stride = int64_t(hk) * d; p.k_head_stride = d;
  p.v_row_stride = int64_t(hk) * d; p.v_head_stride = d;
  p.o_row_stride = int64_t(h) * d; p.o_head_stride = d;
  p.cu_seqlens_q = m.cq; p.cu_seqlens_k = m.ck;
  p.total_q = total_q; p.b = b; p.h = h; p.h_k = hk; p.d = d;
  p.max_seqlen_q = max_q; p.max_seqlen_k = max_k;
  p.dtype = sizeof(T) == 2 && std::is_same<T, __nv_bfloat16>::value ? DType::kBFloat16 : DType::kFloat16;
  p.scale = 1.f / std::sqrt(float(d));
  p.window_left = wl; p.window_right = wr;
  p.num_splits = 1;
  p.num_sms = 132;
  return p;
}

template <typename T, int HD>
bool run_case(const Case& c, const char* dt_name) {
  const int b = int(c.lq.size()), h = c.h, hk = c.hk, d = c.d;
  std::vector<int> cq(b + 1, 0), ck(b + 1, 0);
  for (int i = 0; i < b; ++i) { cq[i + 1] = cq[i] + c.lq[i]; ck[i + 1] = ck[i] + c.lk[i]; }
  const int tq = cq[b], tk = ck[b];
  const int max_q = *std::max_element(c.lq.begin(), c.lq.end()), max_k = *std::max_element(c.lk.begin(), c.lk.end());
  std::vector<T> hq(size_t(tq) * h * d), hkk(size_t(tk) * hk * d), hv(size_t(tk) * hk * d);
  for (auto& x : hq) x = from_f<T>(urand() * 2.f);
  for (auto& x : hkk) x = from_f<T>(urand() * 2.f);
  for (auto& x : hv) x = from_f<T>(urand());

  // Reference in double from the rounded inputs.
  std::vector<double> ref_o(size_t(tq) * h * d, 0.0), ref_lse(size_t(h) * tq, 0.0);
  const double scale = 1.0 / std::sqrt(double(d));
  auto ref_rows = [&](int lo, int hi) {
    std::vector<double> sc(max_k > 0 ? max_k : 1);
    for (int r = lo; r < hi; ++r) {
      const int head = r % h, tok = r / h;
      int bi = 0;
      while (cq[bi + 1] <= tok) ++bi;
      const int i = tok - cq[bi], sq = c.lq[bi], sk = c.lk[bi], diag = sk - sq, kh = head / (h / hk);
      int jlo = 0, jhi = sk - 1;
      if (c.wl >= 0) jlo = std::max(jlo, i + diag - c.wl);
      if (c.wr >= 0) jhi = std::min(jhi, i + diag + c.wr);
      double* out = &ref_o[(size_t(tok) * h + head) * d];
      if (jlo > jhi) { ref_lse[size_t(head) * tq + tok] = INFINITY; continue; }
      double mx = -INFINITY;
      for (int j = jlo; j <= jhi; ++j) {
        double s = 0;
        const T* qp = &hq[(size_t(tok) * h + head) * d];
        const T* kp = &hkk[(size_t(ck[bi] + j) * hk + kh) * d];
        for (int x = 0; x < d; ++x) s += double(to_f(qp[x])) * double(to_f(kp[x]));
        sc[j] = s * scale;
        mx = std::max(mx, sc[j]);
      }
      double sum = 0;
      for (int j = jlo; j <= jhi; ++j) { sc[j] = std::exp(sc[j] - mx); sum += sc[j]; }
      for (int j = jlo; j <= jhi; ++j) {
        const T* vp = &hv[(size_t(ck[bi] + j) * hk + kh) * d];
        const double w = sc[j] / sum;
        for (int x = 0; x < d; ++x) out[x] += w * double(to_f(vp[x]));
      }
      ref_lse[size_t(head) * tq + tok] = mx + std::log(sum);
    }
  };
  {
    const int rows = tq * h;
    const int nth = std::max(1u, std::min(32u, std::thread::hardware_concurrency()));
    std::vector<std::thread> th;
    for (int i = 0; i < nth; ++i) th.emplace_back(ref_rows, int(int64_t(rows) * i / nth), int(int64_t(rows) * (i + 1) / nth));
    for (auto& x : th) x.join();
  }

  Dev m;
  CK(cudaMalloc(&m.q, std::max<size_t>(hq.size(), 1) * 2));
  CK(cudaMalloc(&m.k, std::max<size_t>(hkk.size(), 1) * 2));
  CK(cudaMalloc(&m.v, std::max<size_t>(hv.size(), 1) * 2));
  CK(cudaMalloc(&m.o, std::max<size_t>(hq.size(), 1) * 2));
  CK(cudaMalloc(&m.lse, std::max<size_t>(size_t(h) * tq, 1) * 4));
  CK(cudaMalloc(&m.cq, (b + 1) * 4));
  CK(cudaMalloc(&m.ck, (b + 1) * 4));
  CK(cudaMemcpy(m.q, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(m.k, hkk.data(), hkk.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(m.v, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(m.cq, cq.data(), (b + 1) * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(m.ck, ck.data(), (b + 1) * 4, cudaMemcpyHostToDevice));
  const FwdParams p = make_params<T>(m, b, h, hk, d, tq, max_q, max_k, c.wl, c.wr);

  double err_o[kKernels] = {}, err_lse[kKernels] = {};
  long bad[kKernels] = {};
  std::vector<T> out(hq.size());
  std::vector<float> lse(size_t(h) * tq);
  for (int which = 0; which < kKernels; ++which) {
    CK(cudaMemset(m.o, 0xFF, hq.size() * 2));  // NaN in fp16 and bf16
    CK(cudaMemset(m.lse, 0xFF, lse.size() * 4));
    try {
      launch<T, HD>(which, p);
    } catch (const std::exception& e) {
      std::printf("  launch failed: %s\n", e.what());
      return false;
    }
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(out.data(), m.o, out.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(lse.data(), m.lse, lse.size() * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < out.size(); ++i) {
      const float x = to_f(out[i]);
      if (!std::isfinite(x)) { ++bad[which]; continue; }
      err_o[which] = std::max(err_o[which], std::fabs(double(x) - ref_o[i]));
    }
    for (size_t i = 0; i < lse.size(); ++i) {
      const double r = ref_lse[i], x = lse[i];
      if (std::isinf(r)) { if (!(std::isinf(x) && x > 0)) ++bad[which]; continue; }
      if (!std::isfinite(x)) { ++bad[which]; continue; }
      err_lse[which] = std::max(err_lse[which], std::fabs(x - r) / std::max(std::fabs(r), 1.0));
    }
  }
  bool ok = bad[0] == 0;
  for (int w = 1; w < kKernels; ++w) ok = ok && bad[w] == 0 && err_o[w] <= 2 * err_o[0] + 1e-5 && err_lse[w] <= 1e-3;
  std::printf("%-4s %-5s d=%-3d %-30s", ok ? "PASS" : "FAIL", dt_name, d, c.name.c_str());
  for (int w = 0; w < kKernels; ++w)
    std::printf(" | %s O %.2e lse %.1e bad %ld", kNames[w], err_o[w], err_lse[w], bad[w]);
  std::printf("\n");
  cudaFree(m.q); cudaFree(m.k); cudaFree(m.v); cudaFree(m.o); cudaFree(m.lse); cudaFree(m.cq); cudaFree(m.ck);
  return ok;
}

template <typename T, int HD>
bool correct_hd(const char* dt_name) {
  std::vector<int> var = {1, 17, 128, 1000, 4097, 0};
  std::vector<int> vq = {1, 17, 300, 128, 0, 700, 250}, vk = {5, 300, 17, 1000, 64, 0, 250};
  std::vector<Case> cases = {
      {"varlen q=k, gqa 4/2", HD, var, var, 4, 2, -1, -1},
      {"varlen q=k, gqa 4/2, causal", HD, var, var, 4, 2, -1, 0},
      {"q!=k, mqa 3/1", HD, vq, vk, 3, 1, -1, -1},
      {"q!=k, mqa 3/1, causal", HD, vq, vk, 3, 1, -1, 0},
      {"q!=k, 2/2, window (100, 30)", HD, vq, vk, 2, 2, 100, 30},
  };
  if (HD == 128) cases.push_back({"d=120, q!=k, 2/1, causal", 120, vq, vk, 2, 1, -1, 0});
  if (HD == 256) cases.push_back({"d=200, q=k, 2/2", 200, {1, 300, 129}, {1, 300, 129}, 2, 2, -1, -1});
  bool ok = true;
  for (const auto& c : cases) ok = run_case<T, HD>(c, dt_name) && ok;
  return ok;
}

struct TimeRow { int d, s; bool causal; const char* dt; double tf[kKernels], maxdiff[kKernels]; };

template <typename T, int HD>
void time_hd(const char* dt_name, std::vector<TimeRow>& rows) {
  const int tokens = 16384, h = 2048 / HD, d = HD;
  for (int s : {1024, 4096, 16384}) {
    const int b = tokens / s;
    const size_t n = size_t(tokens) * h * d;
    std::vector<int> cu(b + 1);
    for (int i = 0; i <= b; ++i) cu[i] = i * s;
    Dev m[2];
    std::vector<T> hx(n);
    for (int set = 0; set < 2; ++set) {
      CK(cudaMalloc(&m[set].q, n * 2)); CK(cudaMalloc(&m[set].k, n * 2)); CK(cudaMalloc(&m[set].v, n * 2));
      CK(cudaMalloc(&m[set].o, n * 2)); CK(cudaMalloc(&m[set].lse, size_t(h) * tokens * 4));
      CK(cudaMalloc(&m[set].cq, (b + 1) * 4)); m[set].ck = m[set].cq;
      CK(cudaMemcpy(m[set].cq, cu.data(), (b + 1) * 4, cudaMemcpyHostToDevice));
      for (void* ptr : {m[set].q, m[set].k, m[set].v}) {
        for (auto& x : hx) x = from_f<T>(urand() * 2.f);
        CK(cudaMemcpy(ptr, hx.data(), n * 2, cudaMemcpyHostToDevice));
      }
    }
    for (bool causal : {false, true}) {
      FwdParams p[2];
      for (int set = 0; set < 2; ++set) p[set] = make_params<T>(m[set], b, h, h, d, tokens, s, s, -1, causal ? 0 : -1);
      TimeRow row{d, s, causal, dt_name, {}, {}};
      cudaEvent_t e0, e1;
      CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
      std::vector<float> ms[kKernels];
      for (int rep = 0; rep < 18; ++rep)
        for (int which = 0; which < kKernels; ++which) {
          CK(cudaEventRecord(e0));
          launch<T, HD>(which, p[rep & 1]);
          CK(cudaEventRecord(e1));
          CK(cudaEventSynchronize(e1));
          float t = 0;
          CK(cudaEventElapsedTime(&t, e0, e1));
          if (rep >= 3) ms[which].push_back(t);
        }
      for (int which = 0; which < kKernels; ++which) {
        std::sort(ms[which].begin(), ms[which].end());
        const double med = ms[which][ms[which].size() / 2] * 1e-3;
        row.tf[which] = 4.0 * b * h * double(s) * s * d / (causal ? 2 : 1) / med * 1e-12;
      }
      // Same inputs through every kernel: max |O_x - O_mma| (poisoned before each run).
      std::vector<T> o0(n), o1(n);
      launch<T, HD>(0, p[0]);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(o0.data(), m[0].o, n * 2, cudaMemcpyDeviceToHost));
      for (int which = 1; which < kKernels; ++which) {
        CK(cudaMemset(m[0].o, 0xFF, n * 2));
        launch<T, HD>(which, p[0]);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(o1.data(), m[0].o, n * 2, cudaMemcpyDeviceToHost));
        double md = 0;
        for (size_t i = 0; i < n; ++i) {
          const double x = std::fabs(double(to_f(o0[i])) - double(to_f(o1[i])));
          md = std::isfinite(x) ? std::max(md, x) : INFINITY;
        }
        row.maxdiff[which] = md;
      }
      rows.push_back(row);
      std::printf("time %s d=%d s=%d causal=%d:", dt_name, d, s, int(causal));
      for (int w = 0; w < kKernels; ++w) std::printf(" %s %.1f", kNames[w], row.tf[w]);
      std::printf(" TFLOP/s\n");
      std::fflush(stdout);
      CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
    }
    for (int set = 0; set < 2; ++set) {
      cudaFree(m[set].q); cudaFree(m[set].k); cudaFree(m[set].v); cudaFree(m[set].o); cudaFree(m[set].lse);
      cudaFree(m[set].cq);
    }
  }
}

int main(int argc, char** argv) {
  bool do_correct = false, do_time = false;
  std::vector<int> only_hd;  // hd=N (repeatable): restrict to these head-dim classes
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "correct")) do_correct = true;
    if (!std::strcmp(argv[i], "time")) do_time = true;
    if (!std::strncmp(argv[i], "hd=", 3)) only_hd.push_back(std::atoi(argv[i] + 3));
  }
  if (!do_correct && !do_time) do_correct = do_time = true;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s sm_%d%d, %d SMs\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  bool ok = true;
  auto want = [&](int hd) { return only_hd.empty() || std::count(only_hd.begin(), only_hd.end(), hd) > 0; };
  if (do_correct) {
    if (want(64)) { ok &= correct_hd<__nv_bfloat16, 64>("bf16"); ok &= correct_hd<__half, 64>("fp16"); }
    if (want(128)) { ok &= correct_hd<__nv_bfloat16, 128>("bf16"); ok &= correct_hd<__half, 128>("fp16"); }
    if (want(256)) { ok &= correct_hd<__nv_bfloat16, 256>("bf16"); ok &= correct_hd<__half, 256>("fp16"); }
    std::printf("correctness: %s\n", ok ? "ALL PASS" : "FAILURES");
  }
  if (do_time) {
    std::vector<TimeRow> rows;
    if (want(64)) { time_hd<__nv_bfloat16, 64>("bf16", rows); }
    if (want(128)) { time_hd<__nv_bfloat16, 128>("bf16", rows); time_hd<__half, 128>("fp16", rows); }
    if (want(256)) { time_hd<__nv_bfloat16, 256>("bf16", rows); }
    std::printf("\nTFLOP/s (median of 15), max |O - O_mma| in brackets\n| dtype | d | seqlen | causal |");
    for (int w = 0; w < kKernels; ++w) std::printf(" %s |", kNames[w]);
    std::printf("\n|---|---|---|---|");
    for (int w = 0; w < kKernels; ++w) std::printf("---|");
    std::printf("\n");
    for (const auto& r : rows) {
      std::printf("| %s | %d | %d | %s |", r.dt, r.d, r.s, r.causal ? "y" : "n");
      for (int w = 0; w < kKernels; ++w)
        if (w == 0) std::printf(" %.1f |", r.tf[w]);
        else std::printf(" %.1f (%.0e) |", r.tf[w], r.maxdiff[w]);
      std::printf("\n");
    }
  }
  return ok ? 0 : 1;
}
