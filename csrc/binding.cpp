// flashserve._C: the one torch/pybind11 file. Kernels live in torch-free .cu/.cuh files.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "bwd/bwd_params.h"
#include "fwd/fwd_api.h"

namespace {

// Error messages are built without iostreams: on the lent H100 image, streaming an integer into
// c10's message stream from this extension segfaulted (ostream<<long), so pieces are converted here.
inline std::string fs_piece(const char* s) { return s; }
inline std::string fs_piece(const std::string& s) { return s; }
inline std::string fs_piece(int64_t v) { return std::to_string(v); }
inline std::string fs_piece(double v) { return std::to_string(v); }
inline std::string fs_piece(c10::ScalarType t) { return c10::toString(t); }
template <typename... Args>
std::string fs_message(const Args&... args) {
  std::string out = "flashserve._C: ";
  ((out += fs_piece(args)), ...);
  return out;
}
#define FS_CHECK(cond, ...)                                   \
  do {                                                        \
    if (!(cond)) throw std::runtime_error(fs_message(__VA_ARGS__)); \
  } while (0)

int num_sms(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (!cached[device]) {
    int n = 0;
    cudaError_t e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    FS_CHECK(e == cudaSuccess, "cudaDeviceGetAttribute: ", cudaGetErrorString(e));
    cached[device] = n;
  }
  return cached[device];
}

// Test hook: fill every output with NaN before the launch, so tests can check every element was written.
bool g_poison = false;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Inputs must have a contiguous last dim, 16-byte aligned rows and head offsets.
at::Tensor prepare(const at::Tensor& x, int64_t d_pad) {
  at::Tensor y = x;
  if (y.size(2) != d_pad) y = at::constant_pad_nd(y, {0, d_pad - y.size(2)}, 0);
  const bool aligned = y.stride(2) == 1 && y.stride(0) % 8 == 0 && y.stride(1) % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0;
  return aligned ? y : y.contiguous();
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    double dropout_p, int64_t seed, int64_t offset, bool return_softmax, int64_t num_splits) {
  FS_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "q, k, v must be CUDA tensors");
  FS_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (tokens, heads, head_dim)");
  const auto dtype = q.scalar_type();
  FS_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "q must be float16 or bfloat16, got ", dtype);
  FS_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "q, k, v must share one dtype");
  FS_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  const int64_t total_q = q.size(0), h = q.size(1), d = q.size(2);
  const int64_t total_k = k.size(0), h_k = k.size(1);
  FS_CHECK(k.size(2) == d, "q and k must have the same head_dim");
  FS_CHECK(d >= 1 && d <= 256, "head_dim must be in [1, 256], got ", std::to_string(d));
  FS_CHECK(h_k >= 1 && h % h_k == 0, "heads of q (", std::to_string(h), ") must be a multiple of heads of k/v (",
           std::to_string(h_k), ")");
  FS_CHECK(cu_seqlens_q.is_cuda() && cu_seqlens_k.is_cuda() && cu_seqlens_q.scalar_type() == at::kInt &&
               cu_seqlens_k.scalar_type() == at::kInt && cu_seqlens_q.dim() == 1 && cu_seqlens_k.dim() == 1,
           "cu_seqlens_q/k must be int32 CUDA vectors");
  FS_CHECK(cu_seqlens_q.numel() == cu_seqlens_k.numel() && cu_seqlens_q.numel() >= 1,
           "cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries");
  FS_CHECK(q.device() == k.device() && q.device() == v.device() && q.device() == cu_seqlens_q.device() &&
               q.device() == cu_seqlens_k.device(),
           "all tensors must be on one device");
  FS_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen must be >= 0");
  FS_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1)");
  FS_CHECK(softcap >= 0.0, "softcap must be >= 0");
  FS_CHECK(num_splits >= 0, "num_splits must be >= 0 (0 = auto)");
  FS_CHECK(total_q < (int64_t(1) << 31) && total_k < (int64_t(1) << 31), "too many tokens");

  c10::cuda::CUDAGuard guard(q.device());
  const int64_t b = cu_seqlens_q.numel() - 1;
  const int64_t d_pad = round_up(d, 8);
  at::Tensor qp = prepare(q, d_pad), kp = prepare(k, d_pad), vp = prepare(v, d_pad);
  at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();

  auto opts = q.options();
  at::Tensor out = at::empty({total_q, h, d_pad}, opts);
  at::Tensor lse = at::empty({h, total_q}, opts.dtype(at::kFloat));

  if (causal) window_right = 0;
  // A window wider than any sequence pair is unbounded (keeps the fast unmasked path).
  if (window_left >= max_seqlen_k + max_seqlen_q) window_left = -1;
  if (window_right >= max_seqlen_k + max_seqlen_q) window_right = -1;
  if (window_left < -1 || window_right < -1) FS_CHECK(false, "window sizes must be >= -1");

  flashserve::FwdParams p{};
  p.q = qp.data_ptr();
  p.k = kp.data_ptr();
  p.v = vp.data_ptr();
  p.q_row_stride = qp.stride(0);
  p.q_head_stride = qp.stride(1);
  p.k_row_stride = kp.stride(0);
  p.k_head_stride = kp.stride(1);
  p.v_row_stride = vp.stride(0);
  p.v_head_stride = vp.stride(1);
  p.cu_seqlens_q = cu_q.data_ptr<int>();
  p.cu_seqlens_k = cu_k.data_ptr<int>();
  p.o = out.data_ptr();
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.lse = lse.data_ptr<float>();
  p.total_q = int(total_q);
  p.b = int(b);
  p.h = int(h);
  p.h_k = int(h_k);
  p.d = int(d_pad);
  p.max_seqlen_q = int(max_seqlen_q);
  p.max_seqlen_k = int(max_seqlen_k);
  p.dtype = dtype == at::kBFloat16 ? flashserve::DType::kBFloat16 : flashserve::DType::kFloat16;
  p.scale = float(softmax_scale);
  p.softcap = float(softcap);
  p.window_left = int(window_left);
  p.window_right = int(window_right);

  at::Tensor alibi;
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    alibi = alibi_slopes->contiguous();
    FS_CHECK(alibi.is_cuda() && alibi.device() == q.device() && alibi.scalar_type() == at::kFloat,
             "alibi_slopes must be a float32 tensor on q's device");
    FS_CHECK((alibi.dim() == 1 && alibi.size(0) == h) || (alibi.dim() == 2 && alibi.size(0) == b && alibi.size(1) == h),
             "alibi_slopes must be (heads_q,) or (batch, heads_q)");
    p.alibi = alibi.data_ptr<float>();
    p.alibi_batch_stride = alibi.dim() == 2 ? alibi.stride(0) : 0;
  }

  p.p_drop = float(dropout_p);
  p.seed = uint64_t(seed);
  p.offset = uint64_t(offset);

  std::optional<at::Tensor> s_dmask;
  if (return_softmax) {
    at::Tensor s = at::zeros({b, h, round_up(max_seqlen_q, 128), round_up(max_seqlen_k, 128)}, opts);
    p.s_dmask = s.data_ptr();
    p.s_batch_stride = s.stride(0);
    p.s_head_stride = s.stride(1);
    p.s_row_stride = s.stride(2);
    s_dmask = s;
  }

  p.num_sms = num_sms(q.get_device());
  int splits = int(num_splits == 0 ? flashserve::fwd_auto_num_splits(p) : std::min<int64_t>(num_splits, 256));
  if (return_softmax) splits = 1;
  p.num_splits = splits;
  at::Tensor o_accum, lse_accum;
  if (splits > 1) {
    const int hd_class = flashserve::fwd_head_dim_class(int(d_pad));
    o_accum = at::empty({splits, total_q, h, hd_class}, opts.dtype(at::kFloat));
    lse_accum = at::empty({splits, h, total_q}, opts.dtype(at::kFloat));
    p.o_accum = o_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }

  if (g_poison) {
    out.fill_(NAN);
    lse.fill_(NAN);
    if (s_dmask.has_value()) s_dmask->fill_(NAN);
    if (splits > 1) {
      o_accum.fill_(NAN);
      lse_accum.fill_(NAN);
    }
  }
  if (total_q > 0 && b > 0) {
    try {
      flashserve::fwd_run(p, c10::cuda::getCurrentCUDAStream().stream());
    } catch (const std::exception& e) {
      FS_CHECK(false, e.what());
    }
  }
  if (d_pad != d) out = out.narrow(2, 0, d).contiguous();
  return {out, lse, s_dmask};
}

py::dict compiled_configs() {
  py::dict r;
  r["head_dims"] = flashserve::fwd_compiled_head_dims();
  r["dtypes"] = flashserve::fwd_compiled_dtypes();
  r["max_head_dim"] = 256;
  return r;
}

// ---- backward (csrc/bwd/) ----
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& softmax_lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
    int64_t seed, int64_t offset, bool deterministic) {
  FS_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && out.is_cuda() && dout.is_cuda() && softmax_lse.is_cuda(),
           "bwd: dout, q, k, v, out, softmax_lse must be CUDA tensors");
  FS_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "bwd: q, k, v must be (tokens, heads, head_dim)");
  const auto dtype = q.scalar_type();
  FS_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "bwd: q must be float16 or bfloat16, got ", dtype);
  FS_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && out.scalar_type() == dtype &&
               dout.scalar_type() == dtype,
           "bwd: dout, q, k, v, out must share one dtype");
  FS_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "bwd: out and dout must have q's shape");
  FS_CHECK(k.sizes() == v.sizes(), "bwd: k and v must have the same shape");
  const int64_t total_q = q.size(0), h = q.size(1), d = q.size(2);
  const int64_t total_k = k.size(0), h_k = k.size(1);
  FS_CHECK(k.size(2) == d, "bwd: q and k must have the same head_dim");
  FS_CHECK(d >= 1 && d <= 256, "bwd: head_dim must be in [1, 256], got ", d);
  FS_CHECK(h_k >= 1 && h % h_k == 0, "bwd: heads of q (", h, ") must be a multiple of heads of k/v (", h_k, ")");
  FS_CHECK(softmax_lse.scalar_type() == at::kFloat && softmax_lse.dim() == 2 && softmax_lse.size(0) == h &&
               softmax_lse.size(1) == total_q,
           "bwd: softmax_lse must be float32 (heads_q, total_q)");
  FS_CHECK(cu_seqlens_q.is_cuda() && cu_seqlens_k.is_cuda() && cu_seqlens_q.scalar_type() == at::kInt &&
               cu_seqlens_k.scalar_type() == at::kInt && cu_seqlens_q.dim() == 1 &&
               cu_seqlens_q.numel() == cu_seqlens_k.numel() && cu_seqlens_q.numel() >= 1,
           "bwd: cu_seqlens_q/k must be int32 CUDA vectors of length batch + 1");
  FS_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "bwd: dropout_p must be in [0, 1)");
  const int64_t batch = cu_seqlens_q.numel() - 1;
  c10::cuda::CUDAGuard guard(q.device());

  const int64_t d_pad = round_up(d, 8);
  const at::Tensor qp = prepare(q, d_pad), kp = prepare(k, d_pad), vp = prepare(v, d_pad);
  const at::Tensor op = prepare(out, d_pad), dop = prepare(dout, d_pad);
  const at::Tensor lse = softmax_lse.contiguous();
  const at::Tensor cuq = cu_seqlens_q.contiguous(), cuk = cu_seqlens_k.contiguous();
  at::Tensor dq = at::empty({total_q, h, d_pad}, q.options());
  at::Tensor dk = at::empty({total_k, h_k, d_pad}, q.options());
  at::Tensor dv = at::empty({total_k, h_k, d_pad}, q.options());
  if (g_poison) {
    dq.fill_(NAN);
    dk.fill_(NAN);
    dv.fill_(NAN);
  }

  flashserve::bwd::BwdParams p{};
  p.q = qp.data_ptr(); p.k = kp.data_ptr(); p.v = vp.data_ptr(); p.o = op.data_ptr(); p.dout = dop.data_ptr();
  p.q_row_stride = qp.stride(0); p.q_head_stride = qp.stride(1);
  p.k_row_stride = kp.stride(0); p.k_head_stride = kp.stride(1);
  p.v_row_stride = vp.stride(0); p.v_head_stride = vp.stride(1);
  p.o_row_stride = op.stride(0); p.o_head_stride = op.stride(1);
  p.do_row_stride = dop.stride(0); p.do_head_stride = dop.stride(1);
  p.lse = lse.data_ptr<float>();
  p.cu_seqlens_q = cuq.data_ptr<int>(); p.cu_seqlens_k = cuk.data_ptr<int>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.total_q = (int)total_q; p.total_k = (int)total_k;
  p.b = (int)batch; p.h = (int)h; p.h_k = (int)h_k; p.d = (int)d_pad;
  p.max_seqlen_q = (int)max_seqlen_q; p.max_seqlen_k = (int)max_seqlen_k;
  p.is_bf16 = dtype == at::kBFloat16;
  p.scale = (float)softmax_scale;
  p.softcap = (float)softcap;
  p.window_left = window_left < 0 ? -1 : (int)window_left;
  p.window_right = causal ? 0 : (window_right < 0 ? -1 : (int)window_right);
  at::Tensor alibi;
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    alibi = alibi_slopes->contiguous();
    FS_CHECK(alibi.is_cuda() && alibi.scalar_type() == at::kFloat, "bwd: alibi_slopes must be float32 on the GPU");
    FS_CHECK((alibi.dim() == 1 && alibi.size(0) == h) ||
                 (alibi.dim() == 2 && alibi.size(0) == batch && alibi.size(1) == h),
             "bwd: alibi_slopes must be (heads_q,) or (batch, heads_q)");
    p.alibi = alibi.data_ptr<float>();
    p.alibi_batch_stride = alibi.dim() == 2 ? h : 0;
  }
  p.p_drop = (float)dropout_p;
  p.seed = (uint64_t)seed;
  p.offset = (uint64_t)offset;
  p.deterministic = deterministic;
  p.num_sms = num_sms(q.get_device());

  flashserve::bwd::BwdWorkspace ws{};
  std::string msg = flashserve::bwd::plan(p, &ws);
  FS_CHECK(msg.empty(), msg);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dsum = at::empty({(int64_t)ws.dsum_floats}, f32);
  at::Tensor dq_accum = at::empty({(int64_t)ws.dq_accum_floats}, f32);
  at::Tensor dk_accum, dv_accum;
  p.dsum = dsum.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  if (ws.dkv_accum_floats) {
    dk_accum = at::empty({(int64_t)ws.dkv_accum_floats}, f32);
    dv_accum = at::empty({(int64_t)ws.dkv_accum_floats}, f32);
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
  }
  msg = flashserve::bwd::run(p, c10::cuda::getCurrentCUDAStream().stream());
  FS_CHECK(msg.empty(), msg);
  if (d_pad != d) {
    dq = dq.narrow(2, 0, d);
    dk = dk.narrow(2, 0, d);
    dv = dv.narrow(2, 0, d);
  }
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashserve CUDA kernels";
  m.def("fwd", &fwd,
        "FlashAttention forward, packed varlen layout -> (out, softmax_lse, s_dmask or None)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("softmax_scale"), py::arg("causal"), py::arg("window_left") = -1,
        py::arg("window_right") = -1, py::arg("softcap") = 0.0, py::arg("alibi_slopes") = py::none(),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("offset") = 0, py::arg("return_softmax") = false,
        py::arg("num_splits") = 0);
  m.def("compiled_configs", &compiled_configs, "head dims / dtypes this build contains");
  m.def("debug_poison_outputs", [](bool on) { g_poison = on; },
        "testing: fill outputs with NaN before each forward launch");

  // ---- backward ----
  m.def("bwd", &bwd, "FlashAttention backward, packed varlen layout -> (dq, dk, dv)", py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("softmax_lse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("softmax_scale"),
        py::arg("causal"), py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("softcap") = 0.0,
        py::arg("alibi_slopes") = py::none(), py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("offset") = 0,
        py::arg("deterministic") = false);
}
