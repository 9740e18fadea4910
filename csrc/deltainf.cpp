// The extension module deltainf._C: a pybind11 module for build metadata, and one TORCH_LIBRARY
// holding every op schema. Kernels register per dispatch key in cpu/*_cpu.cpp and cuda/*_cuda.cpp,
// so a CPU-only build simply has no CUDA kernels and no #ifdef is needed here.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define DELTAINF_HAS_MXCSR 1
#endif

#ifndef DELTAINF_TORCH_VERSION
#define DELTAINF_TORCH_VERSION "unknown"
#endif
#ifndef DELTAINF_CUDA_VERSION
#define DELTAINF_CUDA_VERSION ""
#endif
#ifndef DELTAINF_CUDA_ARCH_LIST
#define DELTAINF_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(deltainf, m) {
  // 1. Fused per-example gradient projection R_i = sum_t (U^T g_it)(V^T a_it)^T and its epilogues.
  m.def("kron_project(Tensor a, Tensor g, Tensor U, Tensor V) -> Tensor");
  m.def("kron_project_square_sum(Tensor a, Tensor g, Tensor U, Tensor V) -> Tensor");
  m.def("kron_project_score(Tensor a, Tensor g, Tensor U, Tensor V, Tensor P) -> Tensor");
  // Dense JL projection with Omega generated on the fly from (seed, row, column).
  m.def("jl_project(Tensor x, int k, int seed, str dist=\"rademacher\", int offset=0) -> Tensor");
  // 2. Kronecker eigenbasis inverse-Hessian product, batched over queries.
  m.def("kron_ihvp(Tensor G, Tensor Q_S, Tensor Q_A, Tensor lam, float damping, bool eigenbasis=False) -> Tensor");
  // 3. Batched sign vote, and its combination across affected test points.
  m.def("sign_vote(Tensor base, Tensor transformed, float threshold=0.0, *, int min_votes) -> (Tensor, Tensor)");
  m.def("combine_flags(Tensor flags, int min_points) -> Tensor");
}

namespace {

bool has_kernel(const char* op, c10::DispatchKey key) {
  auto handle = c10::Dispatcher::singleton().findSchema({op, ""});
  return handle.has_value() && handle->hasKernelForDispatchKey(key);
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = DELTAINF_TORCH_VERSION;
  info["cuda_version"] = DELTAINF_CUDA_VERSION;
  info["cuda_arch_list"] = DELTAINF_CUDA_ARCH_LIST;
  pybind11::list backends;
  if (has_kernel("deltainf::sign_vote", c10::DispatchKey::CPU)) backends.append("cpu");
  if (has_kernel("deltainf::sign_vote", c10::DispatchKey::CUDA)) backends.append("cuda");
  info["backends"] = backends;
  return info;
}

#ifdef DELTAINF_HAS_MXCSR
constexpr unsigned kFlushBits = 0x8040;  // MXCSR: flush-to-zero (bit 15) and denormals-are-zero (bit 6)

void set_flush(bool on) {
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(on ? (csr | kFlushBits) : (csr & ~kFlushBits));
}
#endif

// Subnormal operands, and products that underflow to subnormals inside a GEMM, cost a microcode assist per
// operation on x86: a trained network's tiny gradients made one 768-input linear layer's scores 50x slower.
// The mode is per thread, so it is set on the calling thread and on every thread of ATen's intra-op pool (one
// chunk of the range per thread), which MKL's and oneDNN's GEMMs share. Returns the calling thread's previous
// mode, or None where the CPU has no such mode.
pybind11::object flush_denormals(bool on) {
#ifdef DELTAINF_HAS_MXCSR
  const bool was = (_mm_getcsr() & kFlushBits) == kFlushBits;
  set_flush(on);
  const int64_t threads = at::get_num_threads();
  if (threads > 1) at::parallel_for(0, threads, 1, [on](int64_t, int64_t) { set_flush(on); });
  return pybind11::bool_(was);
#else
  (void)on;
  return pybind11::none();
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deltainf kernels (ops live in torch.ops.deltainf)";
  m.def("build_info", &build_info, "Versions and backends this extension was built with.");
  m.def("flush_denormals", &flush_denormals, pybind11::arg("on"),
        "Flush subnormal floats to zero (on=True) or not, on this thread and ATen's CPU threads; returns the "
        "previous mode, None where the CPU has none.");
}
