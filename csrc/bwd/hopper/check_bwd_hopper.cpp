// Torch-free check and timing of the backward pass (csrc/bwd): the Hopper kernel (FLASHSERVE_BWD_HOPPER=1) and
// the mma.sync kernel (=0) against a float64 CPU reference on random inputs, through bwd::plan / bwd::run.
// Not part of the extension (a .cpp: csrc/build_config.py globs only .cu). Build (see NOTES.md, "Hopper path"):
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -DFLASHSERVE_HD_64
//     -DFLASHSERVE_HD_128 -DFLASHSERVE_HD_256 -DFLASHSERVE_DT_BF16 -DFLASHSERVE_DT_FP16 -Icsrc
//     csrc/bwd/hopper/check_bwd_hopper.cpp csrc/bwd/bwd_api.cu csrc/bwd/inst/bwd_hd{64,128,256}_*.cu
//     csrc/bwd/hopper/bwd_hopper_hd*.cu -o check_bwd_hopper
// FLASHSERVE_BWD_DET_SPLITS=n (read by plan()) forces the Hopper deterministic mode's dQ slice count.
// Usage: check_bwd_hopper check [max_cases] | bench [row]   (env CHECK_FILTER=substring, BENCH_MODES=new,..., BENCH_ITERS=n,
//   BENCH_ROW=d,s,causal,bf16 for one row outside the table)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bwd/bwd_params.h"

using flashserve::bwd::BwdParams;
using flashserve::bwd::BwdWorkspace;

#define CK(x)                                                                                        \
  do {                                                                                               \
    cudaError_t e_ = (x);                                                                            \
    if (e_ != cudaSuccess) {                                                                         \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, \
                   cudaGetErrorString(e_));                                                          \
      std::exit(2);                                                                                  \
    }                                                                                                \
  } while (0)

static uint16_t to16(float x, bool bf16) {
  if (bf16) {
    __nv_bfloat16 v = __float2bfloat16(x);
    return *reinterpret_cast<uint16_t*>(&v);
  }
  __half v = __float2half(x);
  return *reinterpret_cast<uint16_t*>(&v);
}
static float from16(uint16_t x, bool bf16) {
  if (bf16) return __bfloat162float(*reinterpret_cast<__nv_bfloat16*>(&x));
  return __half2float(*reinterpret_cast<__half*>(&x));
}

struct Case {
  std::string name;
  std::vector<int> sq, sk;  // per sequence
  int h, hk, d;
  bool bf16;
  bool causal;
  int wl = -1, wr = -1;
  float softcap = 0.f;
  bool alibi = false;
  bool det = false;
};

struct Buffers {
  int total_q, total_k;
  std::vector<int> cuq, cuk;
  std::vector<uint16_t> q, k, v, o, dout;  // 16-bit
  std::vector<float> lse;                   // (h, total_q)
  std::vector<float> slopes;
  std::vector<double> dq, dk, dv;           // reference
};

// Float64 reference forward (O, LSE) and backward for one case.
static void reference(const Case& c, Buffers& B, float scale) {
  const int nb = (int)c.sq.size(), h = c.h, hk = c.hk, d = c.d, group = h / hk;
  B.o.assign((size_t)B.total_q * h * d, 0);
  B.lse.assign((size_t)h * B.total_q, INFINITY);
  B.dq.assign((size_t)B.total_q * h * d, 0.0);
  std::vector<double> dkh((size_t)B.total_k * h * d, 0.0), dvh((size_t)B.total_k * h * d, 0.0);
  auto f = [&](int bi, int hi) {
    const int q0 = B.cuq[bi], k0 = B.cuk[bi], sq = c.sq[bi], sk = c.sk[bi], kh = hi / group, diag = sk - sq;
    if (sq == 0) return;
    auto Q = [&](int i, int x) { return (double)from16(B.q[((size_t)(q0 + i) * h + hi) * d + x], c.bf16); };
    auto K = [&](int j, int x) { return (double)from16(B.k[((size_t)(k0 + j) * hk + kh) * d + x], c.bf16); };
    auto V = [&](int j, int x) { return (double)from16(B.v[((size_t)(k0 + j) * hk + kh) * d + x], c.bf16); };
    auto G = [&](int i, int x) { return (double)from16(B.dout[((size_t)(q0 + i) * h + hi) * d + x], c.bf16); };
    std::vector<double> P((size_t)sq * sk), T((size_t)sq * sk, 0.0), O((size_t)sq * d);
    std::vector<char> vis((size_t)sq * sk);
    const double slope = c.alibi ? B.slopes[(size_t)bi * h + hi] : 0.0;
    const int wr = c.causal ? 0 : c.wr;
    for (int i = 0; i < sq; ++i) {
      double mx = -INFINITY;
      for (int j = 0; j < sk; ++j) {
        bool ok = (wr < 0 || j <= i + diag + wr) && (c.wl < 0 || j >= i + diag - c.wl);
        vis[(size_t)i * sk + j] = ok;
        double s = 0;
        for (int x = 0; x < d; ++x) s += Q(i, x) * K(j, x);
        s *= scale;
        if (c.softcap > 0) {
          double th = std::tanh(s / c.softcap);
          T[(size_t)i * sk + j] = th;
          s = c.softcap * th;
        }
        s -= slope * std::fabs((double)(i + diag - j));
        P[(size_t)i * sk + j] = s;
        if (ok) mx = std::max(mx, s);
      }
      double sum = 0;
      for (int j = 0; j < sk; ++j) {
        double& e = P[(size_t)i * sk + j];
        e = vis[(size_t)i * sk + j] ? std::exp(e - mx) : 0.0;
        sum += e;
      }
      for (int j = 0; j < sk; ++j) P[(size_t)i * sk + j] = sum > 0 ? P[(size_t)i * sk + j] / sum : 0.0;
      B.lse[(size_t)hi * B.total_q + q0 + i] = sum > 0 ? (float)(mx + std::log(sum)) : INFINITY;
      for (int x = 0; x < d; ++x) {
        double o = 0;
        for (int j = 0; j < sk; ++j) o += P[(size_t)i * sk + j] * V(j, x);
        O[(size_t)i * d + x] = o;
        B.o[((size_t)(q0 + i) * h + hi) * d + x] = to16((float)o, c.bf16);
      }
    }
    for (int i = 0; i < sq; ++i) {
      double Dd = 0;
      for (int x = 0; x < d; ++x) Dd += G(i, x) * O[(size_t)i * d + x];
      for (int j = 0; j < sk; ++j) {
        const double pr = P[(size_t)i * sk + j];
        if (pr == 0.0) continue;
        double dp = 0;
        for (int x = 0; x < d; ++x) dp += G(i, x) * V(j, x);
        double ds = pr * (dp - Dd) * scale;
        if (c.softcap > 0) ds *= 1.0 - T[(size_t)i * sk + j] * T[(size_t)i * sk + j];
        for (int x = 0; x < d; ++x) {
          B.dq[((size_t)(q0 + i) * h + hi) * d + x] += ds * K(j, x);
          dkh[((size_t)(k0 + j) * h + hi) * d + x] += ds * Q(i, x);
          dvh[((size_t)(k0 + j) * h + hi) * d + x] += pr * G(i, x);
        }
      }
    }
  };
  std::vector<std::thread> th;
  const int nthreads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::pair<int, int>> jobs;
  for (int bi = 0; bi < nb; ++bi)
    for (int hi = 0; hi < h; ++hi) jobs.push_back({bi, hi});
  // Jobs write disjoint (sequence, head) slices.
  for (int w = 0; w < nthreads; ++w)
    th.emplace_back([&, w]() {
      for (size_t jb = w; jb < jobs.size(); jb += nthreads) f(jobs[jb].first, jobs[jb].second);
    });
  for (auto& t : th) t.join();
  B.dk.assign((size_t)B.total_k * hk * d, 0.0);
  B.dv.assign((size_t)B.total_k * hk * d, 0.0);
  for (int r = 0; r < B.total_k; ++r)
    for (int hi = 0; hi < h; ++hi)
      for (int x = 0; x < d; ++x) {
        B.dk[((size_t)r * hk + hi / group) * d + x] += dkh[((size_t)r * h + hi) * d + x];
        B.dv[((size_t)r * hk + hi / group) * d + x] += dvh[((size_t)r * h + hi) * d + x];
      }
}

struct Dev {
  void *q, *k, *v, *o, *dout, *dq, *dk, *dv;
  float *lse, *slopes, *dsum = nullptr, *dq_accum = nullptr, *dk_accum = nullptr, *dv_accum = nullptr;
  int *cuq, *cuk;
  size_t nq, nk;
};

template <typename X>
static X* up(const std::vector<X>& v) {
  X* p = nullptr;
  CK(cudaMalloc(&p, std::max<size_t>(1, v.size()) * sizeof(X)));
  if (!v.empty()) CK(cudaMemcpy(p, v.data(), v.size() * sizeof(X), cudaMemcpyHostToDevice));
  return p;
}

static BwdParams make_params(const Case& c, const Buffers& B, Dev& D, float scale, int sms) {
  BwdParams p{};
  p.q = D.q; p.k = D.k; p.v = D.v; p.o = D.o; p.dout = D.dout;
  p.q_row_stride = (int64_t)c.h * c.d; p.q_head_stride = c.d;
  p.k_row_stride = (int64_t)c.hk * c.d; p.k_head_stride = c.d;
  p.v_row_stride = (int64_t)c.hk * c.d; p.v_head_stride = c.d;
  p.o_row_stride = (int64_t)c.h * c.d; p.o_head_stride = c.d;
  p.do_row_stride = (int64_t)c.h * c.d; p.do_head_stride = c.d;
  p.lse = D.lse; p.cu_seqlens_q = D.cuq; p.cu_seqlens_k = D.cuk;
  p.dq = D.dq; p.dk = D.dk; p.dv = D.dv;
  p.total_q = B.total_q; p.total_k = B.total_k;
  p.b = (int)c.sq.size(); p.h = c.h; p.h_k = c.hk; p.d = c.d;
  p.max_seqlen_q = *std::max_element(c.sq.begin(), c.sq.end());
  p.max_seqlen_k = *std::max_element(c.sk.begin(), c.sk.end());
  p.is_bf16 = c.bf16;
  p.scale = scale; p.softcap = c.softcap;
  p.window_left = c.wl; p.window_right = c.causal ? 0 : c.wr;
  p.alibi = c.alibi ? D.slopes : nullptr;
  p.alibi_batch_stride = c.alibi ? c.h : 0;
  p.deterministic = c.det;
  p.num_sms = sms;
  return p;
}

// Runs plan + run into fresh workspaces. Returns the message of run() ("" = ok).
static std::string run_bwd(BwdParams& p, Dev& D) {
  BwdWorkspace ws{};
  std::string msg = flashserve::bwd::plan(p, &ws);
  if (!msg.empty()) return msg;
  auto grow = [](float*& ptr, size_t n) {
    if (ptr) CK(cudaFree(ptr));
    ptr = nullptr;
    if (n) CK(cudaMalloc(&ptr, n * sizeof(float)));
  };
  grow(D.dsum, ws.dsum_floats);
  grow(D.dq_accum, ws.dq_accum_floats);
  grow(D.dk_accum, ws.dkv_accum_floats);
  grow(D.dv_accum, ws.dkv_accum_floats);
  p.dsum = D.dsum; p.dq_accum = D.dq_accum; p.dk_accum = D.dk_accum; p.dv_accum = D.dv_accum;
  msg = flashserve::bwd::run(p, 0);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  return msg;
}

struct Err {
  double max_rel = 0;  // max |out - ref| / max |ref|
  size_t nonfinite = 0;
};
static Err compare(const std::vector<uint16_t>& out, const std::vector<double>& ref, bool bf16) {
  Err e;
  double mref = 1e-30, md = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double o = from16(out[i], bf16);
    if (!std::isfinite(o)) { ++e.nonfinite; continue; }
    md = std::max(md, std::fabs(o - ref[i]));
    mref = std::max(mref, std::fabs(ref[i]));
  }
  e.max_rel = md / mref;
  return e;
}

static int check_case(const Case& c, std::mt19937& rng, int sms) {
  Buffers B;
  B.cuq = {0}; B.cuk = {0};
  for (size_t i = 0; i < c.sq.size(); ++i) {
    B.cuq.push_back(B.cuq.back() + c.sq[i]);
    B.cuk.push_back(B.cuk.back() + c.sk[i]);
  }
  B.total_q = B.cuq.back(); B.total_k = B.cuk.back();
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](std::vector<uint16_t>& v, size_t n) {
    v.resize(n);
    for (auto& x : v) x = to16(nd(rng), c.bf16);
  };
  fill(B.q, (size_t)B.total_q * c.h * c.d);
  fill(B.k, (size_t)B.total_k * c.hk * c.d);
  fill(B.v, (size_t)B.total_k * c.hk * c.d);
  fill(B.dout, (size_t)B.total_q * c.h * c.d);
  B.slopes.resize((size_t)c.sq.size() * c.h);
  for (auto& s : B.slopes) s = 0.05f + 0.2f * std::uniform_real_distribution<float>(0.f, 1.f)(rng);
  const float scale = 1.f / std::sqrt((float)c.d) * (c.softcap > 0 ? 2.f : 1.f);
  reference(c, B, scale);

  Dev D{};
  D.q = up(B.q); D.k = up(B.k); D.v = up(B.v); D.o = up(B.o); D.dout = up(B.dout);
  D.lse = up(B.lse); D.slopes = up(B.slopes); D.cuq = up(B.cuq); D.cuk = up(B.cuk);
  const size_t nq = B.q.size(), nk = B.k.size();
  CK(cudaMalloc(&D.dq, std::max<size_t>(1, nq) * 2));
  CK(cudaMalloc(&D.dk, std::max<size_t>(1, nk) * 2));
  CK(cudaMalloc(&D.dv, std::max<size_t>(1, nk) * 2));
  std::vector<uint16_t> dq(nq), dk(nk), dv(nk);
  Err res[2][3];
  std::vector<uint16_t> first[3], prev[3];
  size_t ndiff = 0;  // elements where the two kernels differ (they round differently: expected > 0)
  bool det_same = true;
  for (int kern = 0; kern < 2; ++kern) {  // 0: mma.sync, 1: Hopper
    setenv("FLASHSERVE_BWD_HOPPER", kern ? "1" : "0", 1);
    const int reps = (c.det && kern >= 1) ? 2 : 1;
    for (int rep = 0; rep < reps; ++rep) {
      CK(cudaMemset(D.dq, 0xFF, nq * 2));  // NaN pattern in both dtypes
      CK(cudaMemset(D.dk, 0xFF, nk * 2));
      CK(cudaMemset(D.dv, 0xFF, nk * 2));
      BwdParams p = make_params(c, B, D, scale, sms);
      std::string msg = run_bwd(p, D);
      if (!msg.empty()) {
        std::printf("FAIL %s: %s\n", c.name.c_str(), msg.c_str());
        return 1;
      }
      CK(cudaMemcpy(dq.data(), D.dq, nq * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(dk.data(), D.dk, nk * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(dv.data(), D.dv, nk * 2, cudaMemcpyDeviceToHost));
      if (kern == 0 && rep == 0) { prev[0] = dq; prev[1] = dk; prev[2] = dv; }
      if (kern >= 1 && rep == 0) {
        const std::vector<uint16_t>* cur[3] = {&dq, &dk, &dv};
        for (int t = 0; t < 3; ++t)
          for (size_t i = 0; i < cur[t]->size(); ++i)
            if ((*cur[t])[i] != prev[t][i]) ++ndiff;
      }
      res[kern][0] = compare(dq, B.dq, c.bf16);
      res[kern][1] = compare(dk, B.dk, c.bf16);
      res[kern][2] = compare(dv, B.dv, c.bf16);
      if (kern >= 1 && c.det) {
        if (rep == 0) { first[0] = dq; first[1] = dk; first[2] = dv; }
        else det_same &= first[0] == dq && first[1] == dk && first[2] == dv;
      }
    }
  }
  bool ok = det_same;
  const char* nm[3] = {"dq", "dk", "dv"};
  std::string line;
  char buf[160];
  for (int t = 0; t < 3; ++t) {
    const double bar = 2.0 * res[0][t].max_rel + 2e-3;
    const bool good =
        res[1][t].nonfinite == 0 && res[0][t].nonfinite == 0 && res[1][t].max_rel <= bar;
    ok &= good;
    std::snprintf(buf, sizeof buf, " %s new %.2e old %.2e%s%s", nm[t], res[1][t].max_rel, res[0][t].max_rel,
                  res[1][t].nonfinite ? " NONFINITE" : "", good ? "" : " <-- BAD");
    line += buf;
  }
  std::printf("%s %-40s%s ndiff %zu%s\n", ok ? "ok  " : "FAIL", c.name.c_str(), line.c_str(), ndiff,
              c.det ? (det_same ? " det-bitwise-same" : " DET-DIFFERS") : "");
  for (void* x : {D.q, D.k, D.v, D.o, D.dout, D.dq, D.dk, D.dv}) CK(cudaFree(x));
  for (float* x : {D.lse, D.slopes, D.dsum, D.dq_accum, D.dk_accum, D.dv_accum})
    if (x) CK(cudaFree(x));
  CK(cudaFree(D.cuq));
  CK(cudaFree(D.cuk));
  return ok ? 0 : 1;
}

static int check_all(int sms, size_t max_cases) {
  std::mt19937 rng(1234);
  std::vector<Case> cs;
  const std::vector<int> var = {1, 17, 128, 1000, 0};
  for (bool bf : {true, false}) {
    for (int d : {64, 128, 256}) {
      const std::string dt = bf ? "bf16" : "fp16", ds = std::to_string(d);
      cs.push_back({"d" + ds + " " + dt + " 256 dense", {256}, {256}, 2, 2, d, bf, false});
      cs.push_back({"d" + ds + " " + dt + " varlen causal gqa4/2", var, var, 4, 2, d, bf, true});
      cs.push_back({"d" + ds + " " + dt + " varlen dense mqa3/1", var, var, 3, 1, d, bf, false});
      cs.push_back({"d" + ds + " " + dt + " sq!=sk causal", {100, 300, 5}, {300, 250, 70}, 2, 2, d, bf, true});
    }
  }
  cs.push_back({"d128 bf16 window(64,32)+softcap", {500}, {500}, 2, 2, 128, true, false, 64, 32, 30.f});
  cs.push_back({"d64 fp16 alibi causal", {333, 200}, {333, 260}, 2, 1, 64, false, true, -1, -1, 0.f, true});
  cs.push_back({"d104 bf16 causal (class 128)", {300}, {300}, 2, 2, 104, true, true});
  cs.push_back({"d40 fp16 dense (class 64)", {200}, {150}, 2, 2, 40, false, false});
  cs.push_back({"d256 fp16 window(64,32)+softcap", {500}, {500}, 2, 2, 256, false, false, 64, 32, 30.f});
  cs.push_back({"d256 bf16 alibi causal", {333, 200}, {333, 260}, 2, 1, 256, true, true, -1, -1, 0.f, true});
  cs.push_back({"d200 bf16 causal (class 256)", {300}, {300}, 2, 2, 200, true, true});
  cs.push_back({"d256 bf16 1100 dense", {1100}, {1100}, 1, 1, 256, true, false});
  Case c1 = {"d128 bf16 det varlen causal gqa", var, var, 4, 2, 128, true, true};
  c1.det = true;
  cs.push_back(c1);
  Case c2 = {"d64 fp16 det 1500 dense", {1500}, {1500}, 2, 2, 64, false, false};
  c2.det = true;
  cs.push_back(c2);
  Case c3 = {"d128 fp16 det 2000 causal", {2000}, {2000}, 1, 1, 128, false, true};
  c3.det = true;
  cs.push_back(c3);
  Case c4 = {"d64 bf16 det sq!=sk causal gqa", {100, 300, 5, 0}, {300, 250, 70, 9}, 4, 2, 64, true, true};
  c4.det = true;
  cs.push_back(c4);
  Case c5 = {"d128 bf16 det window(100,0) 700", {700}, {700}, 2, 2, 128, true, false, 100, 0};
  c5.det = true;
  cs.push_back(c5);
  Case c6 = {"d256 bf16 det varlen causal gqa", var, var, 4, 2, 256, true, true};
  c6.det = true;
  cs.push_back(c6);
  Case c7 = {"d256 fp16 det 1500 dense", {1500}, {1500}, 2, 2, 256, false, false};
  c7.det = true;
  cs.push_back(c7);
  Case c8 = {"d256 bf16 det sq!=sk causal gqa", {100, 300, 5, 0}, {300, 250, 70, 9}, 4, 2, 256, true, true};
  c8.det = true;
  cs.push_back(c8);
  Case c9 = {"d256 bf16 det window(100,0) 700", {700}, {700}, 2, 2, 256, true, false, 100, 0};
  c9.det = true;
  cs.push_back(c9);
  if (const char* f = std::getenv("CHECK_FILTER")) {  // keep the cases whose name contains this
    std::vector<Case> keep;
    for (auto& c : cs)
      if (c.name.find(f) != std::string::npos) keep.push_back(c);
    cs.swap(keep);
  }
  if (cs.size() > max_cases) cs.resize(max_cases);
  int fails = 0;
  for (auto& c : cs) fails += check_case(c, rng, sms);
  std::printf("check: %d case(s) failed of %zu\n", fails, cs.size());
  return fails;
}

// ------------------------------------------------------------------------------------------------
// Timing: 16k tokens per launch, heads = 2048 / d, bf16; LSE set to a plausible constant (speed only).
static int bench_all(int sms, int only_row) {
  struct Row { int d, s; bool causal, bf16; };
  const Row rows[] = {{64, 1024, false, true},   {64, 1024, true, true},    {64, 4096, false, true},
                      {64, 8192, false, true},   {64, 8192, true, true},    {128, 1024, false, true},
                      {128, 1024, true, true},   {128, 4096, false, true},  {128, 8192, false, true},
                      {128, 8192, true, true},   {256, 1024, false, true},  {256, 1024, true, true},
                      {256, 2048, false, true},  {256, 2048, true, true},   {256, 4096, false, true},
                      {256, 4096, true, true},   {256, 8192, false, true},  {256, 8192, true, true},
                      {256, 4096, false, false}, {256, 4096, true, false}};
  // Modes: (FLASHSERVE_BWD_HOPPER, deterministic).
  // Modes: (FLASHSERVE_BWD_HOPPER, deterministic, FLASHSERVE_BWD_DET_SPLITS or "" for plan()'s choice).
  struct Mode { const char* name; const char* hop; bool det; const char* splits; };
  const Mode modes[] = {{"old", "0", false, ""},   {"new", "1", false, ""},   {"old-det", "0", true, ""},
                        {"new-det", "1", true, ""}, {"det-s1", "1", true, "1"}, {"det-s2", "1", true, "2"},
                        {"det-s4", "1", true, "4"}};
  constexpr int kModes = sizeof(modes) / sizeof(modes[0]);
  // BENCH_MODES=new,new-det (comma list of mode names): time only those (others print as 0).
  const char* only_modes = std::getenv("BENCH_MODES");
  auto mode_on = [&](const char* name) {
    if (!only_modes) return true;
    const std::string list = std::string(",") + only_modes + ",";
    return list.find(std::string(",") + name + ",") != std::string::npos;
  };
  std::printf("%-18s", "TFLOP/s");
  for (const Mode& m : modes) std::printf(" %10s", m.name);
  std::printf(" %8s %8s\n", "new/old", "det/new");
  std::mt19937 rng(7);
  // BENCH_ROW=d,s,causal,bf16 (e.g. 64,2048,1,1): time this one row instead of the table.
  std::vector<Row> rowv(rows, rows + sizeof(rows) / sizeof(rows[0]));
  if (const char* br = std::getenv("BENCH_ROW")) {
    Row x{};
    int cz = 0, bz = 1;
    if (std::sscanf(br, "%d,%d,%d,%d", &x.d, &x.s, &cz, &bz) >= 2) {
      x.causal = cz != 0;
      x.bf16 = bz != 0;
      rowv.assign(1, x);
      only_row = -1;
    }
  }
  for (int ri = 0; ri < (int)rowv.size(); ++ri) {
    if (only_row >= 0 && ri != only_row) continue;
    const Row& r = rowv[ri];
    const int tokens = 16384, b = tokens / r.s, h = 2048 / r.d;
    Case c;
    c.sq.assign(b, r.s); c.sk.assign(b, r.s);
    c.h = h; c.hk = h; c.d = r.d; c.bf16 = r.bf16; c.causal = r.causal;
    Buffers B;
    B.total_q = B.total_k = tokens;
    B.cuq.resize(b + 1); B.cuk.resize(b + 1);
    for (int i = 0; i <= b; ++i) B.cuq[i] = B.cuk[i] = i * r.s;
    const size_t n = (size_t)tokens * h * r.d;
    constexpr int kSets = 2;  // rotate inputs so that repeated runs do not hit L2
    std::vector<uint16_t> host(n);
    Dev D[kSets];
    for (int sidx = 0; sidx < kSets; ++sidx) {
      D[sidx] = Dev{};
      for (void** x : {&D[sidx].q, &D[sidx].k, &D[sidx].v, &D[sidx].o, &D[sidx].dout}) {
        // xorshift: fast uniform values in [-1, 1), 16 host threads (one stream each)
        const uint32_t seed = (uint32_t)rng();
        const bool bf = r.bf16;
        std::vector<std::thread> fill;
        for (int w = 0; w < 16; ++w)
          fill.emplace_back([&host, seed, bf, w]() {
            uint32_t st = (seed ^ (0x9E3779B9u * (uint32_t)(w + 1))) | 1u;
            const size_t lo = host.size() * w / 16, hi = host.size() * (w + 1) / 16;
            for (size_t i = lo; i < hi; ++i) {
              st ^= st << 13; st ^= st >> 17; st ^= st << 5;
              host[i] = to16((float)(st >> 8) * (2.f / 16777216.f) - 1.f, bf);
            }
          });
        for (auto& th : fill) th.join();
        *x = up(host);
      }
      std::vector<float> lse((size_t)h * tokens, std::log((float)r.s) + 0.5f);
      D[sidx].lse = up(lse);
      D[sidx].cuq = up(B.cuq); D[sidx].cuk = up(B.cuk);
      CK(cudaMalloc(&D[sidx].dq, n * 2)); CK(cudaMalloc(&D[sidx].dk, n * 2)); CK(cudaMalloc(&D[sidx].dv, n * 2));
      D[sidx].slopes = nullptr;
    }
    const double flops = 2.5 * 4.0 * b * h * (double)r.s * r.s * r.d * (r.causal ? 0.5 : 1.0);
    double tf[kModes];
    for (int mode = 0; mode < kModes; ++mode) {
      tf[mode] = 0.0;
      if (!mode_on(modes[mode].name)) continue;
      setenv("FLASHSERVE_BWD_HOPPER", modes[mode].hop, 1);
      if (modes[mode].splits[0]) setenv("FLASHSERVE_BWD_DET_SPLITS", modes[mode].splits, 1);
      else unsetenv("FLASHSERVE_BWD_DET_SPLITS");
      c.det = modes[mode].det;
      BwdParams ps[kSets];
      for (int sidx = 0; sidx < kSets; ++sidx) {
        ps[sidx] = make_params(c, B, D[sidx], 1.f / std::sqrt((float)r.d), sms);
        std::string msg = run_bwd(ps[sidx], D[sidx]);  // also the warm-up; sizes workspaces
        if (!msg.empty()) { std::printf("FAIL bench: %s\n", msg.c_str()); return 1; }
      }
      std::vector<float> ms;
      cudaEvent_t e0, e1;
      CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
      const int iters = std::getenv("BENCH_ITERS") ? std::max(3, std::atoi(std::getenv("BENCH_ITERS"))) : 11;
      for (int it = 0; it < iters; ++it) {
        BwdParams& p = ps[it % kSets];
        CK(cudaEventRecord(e0));
        std::string msg = flashserve::bwd::run(p, 0);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        if (!msg.empty()) { std::printf("FAIL bench: %s\n", msg.c_str()); return 1; }
        float t;
        CK(cudaEventElapsedTime(&t, e0, e1));
        if (it >= 2) ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      tf[mode] = flops / (ms[ms.size() / 2] * 1e-3) / 1e12;
      CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
    }
    char nm[64];
    std::snprintf(nm, sizeof nm, "d%d %dk%s%s", r.d, r.s / 1024, r.causal ? " causal" : "", r.bf16 ? "" : " fp16");
    std::printf("%-18s", nm);
    for (int mode = 0; mode < kModes; ++mode) std::printf(" %10.1f", tf[mode]);
    std::printf(" %8.2f %8.2f\n", tf[0] > 0 ? tf[1] / tf[0] : 0.0, tf[1] > 0 ? tf[3] / tf[1] : 0.0);
    unsetenv("FLASHSERVE_BWD_DET_SPLITS");
    std::fflush(stdout);
    for (auto& x : D) {
      for (void* y : {x.q, x.k, x.v, x.o, x.dout, x.dq, x.dk, x.dv}) CK(cudaFree(y));
      for (float* y : {x.lse, x.dsum, x.dq_accum, x.dk_accum, x.dv_accum})
        if (y) CK(cudaFree(y));
      CK(cudaFree(x.cuq)); CK(cudaFree(x.cuk));
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, cc %d.%d, %d SMs\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  int rc = 0;
  const size_t max_cases = argc > 2 ? (size_t)std::atoi(argv[2]) : 1000;  // check: first N cases only
  if (mode == "check") rc |= check_all(prop.multiProcessorCount, max_cases);
  if (mode == "bench") rc |= bench_all(prop.multiProcessorCount, argc > 2 ? std::atoi(argv[2]) : -1);
  return rc;
}
