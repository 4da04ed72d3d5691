// The one binding file: exposes the CUDA core to Python with pybind11. Pointers and streams arrive
// as integers (tensor.data_ptr(), stream.cuda_stream): no torch headers, so the binary depends on
// the CUDA runtime only and works with any torch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "geomoe_core.h"
#ifdef GEOMOE_EMULATION
#include <cuda_runtime.h>  // the emulated runtime (csrc/emulation/): its TMA count
#endif

namespace py = pybind11;
using namespace pybind11::literals;  // "name"_a: every argument is named, and Python passes each by its name
using geomoe::DType;

namespace {

template <typename T> T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
cudaStream_t stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

#ifdef GEOMOE_EMULATION
constexpr const char* kCore = "geomoe emulated CUDA core: ";
#else
constexpr const char* kCore = "geomoe CUDA core: ";
#endif

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(kCore) + what + ": " + cudaGetErrorString(err));
}

#ifndef GEOMOE_CUDA_ARCHS
#define GEOMOE_CUDA_ARCHS "unknown"
#endif

}  // namespace

// The same binding serves the emulated core (csrc/emulation/), built by the host compiler.
#ifndef GEOMOE_MODULE
#define GEOMOE_MODULE _cuda_core
#endif

PYBIND11_MODULE(GEOMOE_MODULE, m) {
  m.doc() = "geomoe CUDA core: MoE gating, routing, permutation, grouped GEMM and combine; masked depthwise conv";
  m.def("architectures", [] { return std::string(GEOMOE_CUDA_ARCHS); });
#ifdef GEOMOE_EMULATION
  // the TMA boxes (cp.async.bulk.tensor) the emulated kernels have issued in this process
  m.def("emulated_tma_boxes", [] { return geomoe_emu::runtime().tma_boxes; });
#endif
  m.def("gating_tokens_per_block", &geomoe::gating_tokens_per_block);
  m.def("route_histogram", [](std::uintptr_t ids, int64_t n, int E, int block, std::uintptr_t per_block, std::uintptr_t s) {
    check(geomoe::route_histogram(ptr<const int64_t>(ids), n, E, block, ptr<int64_t>(per_block), stream(s)), "route_histogram");
  }, "ids"_a, "n"_a, "num_experts"_a, "block"_a, "per_block"_a, "stream"_a);
  m.def("route_scatter", [](std::uintptr_t ids, int64_t n, int E, int block, std::uintptr_t base, std::uintptr_t r2f,
                            std::uintptr_t f2r, std::uintptr_t s) {
    check(geomoe::route_scatter(ptr<const int64_t>(ids), n, E, block, ptr<const int64_t>(base), ptr<int64_t>(r2f),
                                ptr<int64_t>(f2r), stream(s)), "route_scatter");
  }, "ids"_a, "n"_a, "num_experts"_a, "block"_a, "base"_a, "row_to_flat"_a, "flat_to_row"_a, "stream"_a);
  m.def("permute", [](int dtype, std::uintptr_t x, int64_t ldx, std::uintptr_t r2f, std::uintptr_t w, int64_t rows,
                      int64_t d, int top_k, std::uintptr_t out, int64_t ldo, std::uintptr_t s) {
    check(geomoe::permute(static_cast<DType>(dtype), ptr<const void>(x), ldx, ptr<const int64_t>(r2f), ptr<const float>(w),
                          rows, d, top_k, ptr<void>(out), ldo, stream(s)), "permute");
  }, "dtype"_a, "x"_a, "ldx"_a, "row_to_flat"_a, "weights"_a, "rows"_a, "d"_a, "top_k"_a, "out"_a, "ldo"_a,
        "stream"_a);
  m.def("unpermute", [](int dtype, std::uintptr_t rows, int64_t ldr, std::uintptr_t f2r, std::uintptr_t w,
                        std::uintptr_t shared, int64_t lds, int64_t tokens, int64_t d, int top_k, std::uintptr_t out,
                        int64_t ldo, std::uintptr_t s) {
    check(geomoe::unpermute(static_cast<DType>(dtype), ptr<const void>(rows), ldr, ptr<const int64_t>(f2r),
                            ptr<const float>(w), ptr<const void>(shared), lds, tokens, d, top_k, ptr<void>(out), ldo,
                            stream(s)), "unpermute");
  }, "dtype"_a, "rows"_a, "ldr"_a, "flat_to_row"_a, "weights"_a, "shared"_a, "lds"_a, "tokens"_a, "d"_a, "top_k"_a,
        "out"_a, "ldo"_a, "stream"_a);
  m.def("unpermute_weight_grad", [](int dtype, std::uintptr_t g, int64_t ldg, std::uintptr_t rows, int64_t ldr,
                                    std::uintptr_t f2r, int64_t tokens, int64_t d, int top_k, std::uintptr_t out,
                                    std::uintptr_t s) {
    check(geomoe::unpermute_weight_grad(static_cast<DType>(dtype), ptr<const void>(g), ldg, ptr<const void>(rows), ldr,
                                        ptr<const int64_t>(f2r), tokens, d, top_k, ptr<float>(out), stream(s)),
          "unpermute_weight_grad");
  }, "dtype"_a, "grad_out"_a, "ldg"_a, "rows"_a, "ldr"_a, "flat_to_row"_a, "tokens"_a, "d"_a, "top_k"_a, "grad_w"_a,
        "stream"_a);
  m.def("topk_gating", [](std::uintptr_t logits, int64_t T, int E, std::uintptr_t bias, int k, bool softmax, bool renorm,
                          std::uintptr_t w, std::uintptr_t ids, std::uintptr_t counts, std::uintptr_t partial,
                          std::uintptr_t s) {
    check(geomoe::topk_gating(ptr<const float>(logits), T, E, ptr<const float>(bias), k, softmax, renorm, ptr<float>(w),
                              ptr<int64_t>(ids), ptr<int64_t>(counts), ptr<float>(partial), stream(s)), "topk_gating");
  }, "logits"_a, "tokens"_a, "num_experts"_a, "bias"_a, "top_k"_a, "softmax"_a, "renormalize"_a, "weights"_a, "ids"_a,
        "counts"_a, "partial"_a, "stream"_a);
  m.def("gate_route", [](std::uintptr_t logits, int64_t T, int E, std::uintptr_t bias, int k, int S, bool softmax,
                         bool renorm, bool has_aux, float aux_coef, std::uintptr_t w, std::uintptr_t ids,
                         std::uintptr_t hist, std::uintptr_t partial, std::uintptr_t load, std::uintptr_t prob_mean,
                         std::uintptr_t offsets, std::uintptr_t aux, std::uintptr_t ticket, std::uintptr_t s) {
    check(geomoe::gate_route(ptr<const float>(logits), T, E, ptr<const float>(bias), k, S, softmax, renorm, has_aux,
                             aux_coef, ptr<float>(w), ptr<int64_t>(ids), ptr<int64_t>(hist), ptr<float>(partial),
                             ptr<int64_t>(load), ptr<float>(prob_mean), ptr<int64_t>(offsets), ptr<float>(aux),
                             ptr<unsigned int>(ticket), stream(s)), "gate_route");
  }, "logits"_a, "tokens"_a, "num_experts"_a, "bias"_a, "top_k"_a, "shared"_a, "softmax"_a, "renormalize"_a,
        "has_aux"_a, "aux_coef"_a, "weights"_a, "ids"_a, "hist"_a, "partial"_a, "load"_a, "prob_mean"_a, "offsets"_a,
        "aux"_a, "ticket"_a, "stream"_a);
  m.def("gate_scatter", [](std::uintptr_t ids, int64_t n, int E, int nb, int64_t blocks, std::uintptr_t prefix,
                           std::uintptr_t offsets, std::uintptr_t r2f, std::uintptr_t f2r, std::uintptr_t s) {
    check(geomoe::gate_scatter(ptr<const int64_t>(ids), n, E, nb, blocks, ptr<const int64_t>(prefix),
                               ptr<const int64_t>(offsets), ptr<int64_t>(r2f), ptr<int64_t>(f2r), stream(s)),
          "gate_scatter");
  }, "ids"_a, "n"_a, "num_experts"_a, "entries_per_block"_a, "blocks"_a, "prefix"_a, "offsets"_a, "row_to_flat"_a,
        "flat_to_row"_a, "stream"_a);
  m.def("gate_route_backward", [](std::uintptr_t logits, int64_t T, int E, std::uintptr_t ids, int k, int64_t ld,
                                  std::uintptr_t gw, std::uintptr_t load, std::uintptr_t grad_aux, float aux_coef,
                                  bool softmax, bool renorm, std::uintptr_t grad, std::uintptr_t s) {
    check(geomoe::gate_route_backward(ptr<const float>(logits), T, E, ptr<const int64_t>(ids), k, ld,
                                      ptr<const float>(gw), ptr<const int64_t>(load), ptr<const float>(grad_aux),
                                      aux_coef, softmax, renorm, ptr<float>(grad), stream(s)), "gate_route_backward");
  }, "logits"_a, "tokens"_a, "num_experts"_a, "ids"_a, "top_k"_a, "ld"_a, "grad_weights"_a, "load"_a, "grad_aux"_a,
        "aux_coef"_a, "softmax"_a, "renormalize"_a, "grad_logits"_a, "stream"_a);
  m.def("pack", [](int src_dtype, int out_dtype, py::list srcs, py::list sizes, std::uintptr_t out, std::uintptr_t s) {
    const void* p[8] = {};
    int64_t n[8] = {};
    const size_t count = py::len(srcs);
    if (count < 1 || count > 8 || py::len(sizes) != count)
      throw std::invalid_argument("pack: srcs and sizes expected the same length, 1 to 8");
    for (size_t i = 0; i < count; ++i) {
      p[i] = ptr<const void>(srcs[i].cast<std::uintptr_t>());
      n[i] = sizes[i].cast<int64_t>();
    }
    check(geomoe::pack(static_cast<DType>(src_dtype), static_cast<DType>(out_dtype), static_cast<int>(count), p, n,
                       ptr<void>(out), stream(s)), "pack");
  }, "src_dtype"_a, "out_dtype"_a, "srcs"_a, "sizes"_a, "out"_a, "stream"_a);
  m.def("dwconv_grad_rows_per_block", &geomoe::dwconv_grad_rows_per_block);
  m.def("masked_depthwise_conv", [](int dtype, std::uintptr_t x, int64_t ldx, std::uintptr_t nbr, int kk, std::uintptr_t w,
                                    std::uintptr_t bias, int64_t rows, int64_t channels, bool flip, std::uintptr_t out,
                                    int64_t ldo, std::uintptr_t s) {
    check(geomoe::masked_depthwise_conv(static_cast<DType>(dtype), ptr<const void>(x), ldx, ptr<const int64_t>(nbr), kk,
                                        ptr<const void>(w), ptr<const void>(bias), rows, channels, flip, ptr<void>(out), ldo,
                                        stream(s)), "masked_depthwise_conv");
  }, "dtype"_a, "x"_a, "ldx"_a, "neighbors"_a, "kk"_a, "weight"_a, "bias"_a, "rows"_a, "channels"_a, "flip"_a,
        "out"_a, "ldo"_a, "stream"_a);
  m.def("masked_depthwise_conv_wgrad", [](int dtype, std::uintptr_t x, int64_t ldx, std::uintptr_t g, int64_t ldg,
                                          std::uintptr_t nbr, int kk, int64_t rows, int64_t channels, std::uintptr_t dw,
                                          std::uintptr_t db, std::uintptr_t s) {
    check(geomoe::masked_depthwise_conv_wgrad(static_cast<DType>(dtype), ptr<const void>(x), ldx, ptr<const void>(g), ldg,
                                              ptr<const int64_t>(nbr), kk, rows, channels, ptr<float>(dw), ptr<float>(db),
                                              stream(s)), "masked_depthwise_conv_wgrad");
  }, "dtype"_a, "x"_a, "ldx"_a, "grad_out"_a, "ldg"_a, "neighbors"_a, "kk"_a, "rows"_a, "channels"_a, "dw_partial"_a,
        "db_partial"_a, "stream"_a);
  m.def("grouped_mm_block_rows", &geomoe::grouped_mm_block_rows);
  m.def("grouped_mm_kernels", &geomoe::grouped_mm_kernels);
  m.def("grouped_mm_kernels_for", &geomoe::grouped_mm_kernels_for, "probe_threads"_a);
  m.def("grouped_mm", [](int dtype, std::uintptr_t a, int64_t lda, std::uintptr_t gather, int top_k, std::uintptr_t w,
                         int64_t K, int64_t N, int64_t ldw, int64_t stride_we, bool trans_w, std::uintptr_t bias,
                         int64_t blocks, std::uintptr_t offsets, int num_experts, int act,
                         std::uintptr_t out, int64_t ldo, std::uintptr_t pre, int64_t ldp, int grad_act, int64_t rounds,
                         std::uintptr_t s, bool interleaved, std::uintptr_t route_weights, std::uintptr_t partial,
                         int64_t ldq, std::uintptr_t route_b2, int64_t a_rows) {
    geomoe::RoutedDgrad route;
    route.weights = ptr<const float>(route_weights), route.partial = ptr<float>(partial), route.ldq = ldq;
    route.b2 = ptr<const void>(route_b2);
    check(geomoe::grouped_mm(static_cast<DType>(dtype), ptr<const void>(a), lda, ptr<const int64_t>(gather), top_k,
                             ptr<const void>(w), K, N, ldw, stride_we, trans_w, ptr<const void>(bias),
                             blocks, ptr<const int64_t>(offsets), num_experts,
                             act, ptr<void>(out), ldo, ptr<void>(pre), ldp, grad_act, rounds, interleaved, stream(s), route,
                             a_rows),
          "grouped_mm");
  }, "dtype"_a, "a"_a, "lda"_a, "gather"_a, "top_k"_a, "w"_a, "K"_a, "N"_a, "ldw"_a, "stride_we"_a, "trans_w"_a,
        "bias"_a, "blocks"_a, "offsets"_a, "num_experts"_a, "act"_a, "out"_a, "ldo"_a, "pre"_a, "ldp"_a,
        "grad_act"_a, "rounds"_a, "stream"_a, "swiglu_interleaved"_a = false, "route_weights"_a = 0, "partial"_a = 0,
        "ldq"_a = 0, "route_b2"_a = 0, "a_rows"_a = 0);
  m.def("grouped_mm_wgrad", [](int dtype, std::uintptr_t a, int64_t lda, int64_t a_rows, std::uintptr_t gather, int top_k,
                               std::uintptr_t g, int64_t ldg, int64_t g_rows, std::uintptr_t offsets, int64_t E, int64_t K,
                               int64_t N, int splits, int a_act, std::uintptr_t partial, std::uintptr_t partial_db,
                               std::uintptr_t s, bool interleaved) {
    check(geomoe::grouped_mm_wgrad(static_cast<DType>(dtype), ptr<const void>(a), lda, a_rows, ptr<const int64_t>(gather),
                                   top_k, ptr<const void>(g), ldg, g_rows, ptr<const int64_t>(offsets), E, K, N, splits,
                                   a_act, ptr<float>(partial), ptr<float>(partial_db), interleaved, stream(s)),
          "grouped_mm_wgrad");
  }, "dtype"_a, "a"_a, "lda"_a, "a_rows"_a, "gather"_a, "top_k"_a, "g"_a, "ldg"_a, "g_rows"_a, "offsets"_a,
        "num_experts"_a, "K"_a, "N"_a, "splits"_a, "a_act"_a, "partial"_a, "partial_db"_a, "stream"_a,
        "swiglu_interleaved"_a = false);
  m.def("topk_gating_backward", [](std::uintptr_t logits, int64_t T, int E, std::uintptr_t ids, int k, std::uintptr_t gw,
                                   std::uintptr_t gp, bool softmax, bool renorm, std::uintptr_t grad, std::uintptr_t s) {
    check(geomoe::topk_gating_backward(ptr<const float>(logits), T, E, ptr<const int64_t>(ids), k, ptr<const float>(gw),
                                       ptr<const float>(gp), softmax, renorm, ptr<float>(grad), stream(s)),
          "topk_gating_backward");
  }, "logits"_a, "tokens"_a, "num_experts"_a, "ids"_a, "top_k"_a, "grad_weights"_a, "grad_prob_mean"_a, "softmax"_a,
        "renormalize"_a, "grad_logits"_a, "stream"_a);
}
