// geomoe CUDA core: kernels and their launchers, depending on the CUDA runtime only (no torch).
// Every launcher takes raw device pointers, sizes, leading dimensions and a stream, launches
// asynchronously and returns the launch's cudaError_t. Row x leading-dimension products are int64.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// Every launch is GEOMOE_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) (the kernel last:
// its template arguments may hold commas). nvcc sees <<<...>>>; the host compiler's emulated build
// (csrc/emulation/) runs the kernel on the CPU.
#ifdef GEOMOE_EMULATION
#define GEOMOE_LAUNCH(grid, block, smem, stream, ...) \
  ::geomoe_emu::launcher(#__VA_ARGS__, __VA_ARGS__, grid, block, smem, stream)
#else
#define GEOMOE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace geomoe {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The activation codes of the grouped GEMM's act, grad_act and a_act arguments: the same table as
// geomoe_kernels/activations.py's Activation (tests/test_activation_codes.py checks that they agree).
// kSwigluInterleaved names the ops' interleaved SwiGLU; this core takes it as kSwiglu with its
// `interleaved` flag (geomoe_kernels/cuda.py maps it), never as a code of its own.
enum class Activation : int { kNone = 0, kGelu = 1, kSilu = 2, kSwiglu = 3, kSwigluInterleaved = 4 };

// Routing: per-block expert histograms [blocks, E], then (after an exclusive prefix `base` over
// blocks and experts, computed by the caller) a stable scatter of the flat ids into expert-major rows.
cudaError_t route_histogram(const int64_t* ids, int64_t n, int num_experts, int block, int64_t* per_block,
                            cudaStream_t stream);
cudaError_t route_scatter(const int64_t* ids, int64_t n, int num_experts, int block, const int64_t* base,
                          int64_t* row_to_flat, int64_t* flat_to_row, cudaStream_t stream);

// out[r] = x[row_to_flat[r] / top_k] * (weights ? weights[row_to_flat[r]] : 1)
cudaError_t permute(DType dtype, const void* x, int64_t ldx, const int64_t* row_to_flat, const float* weights,
                    int64_t rows, int64_t d, int top_k, void* out, int64_t ldo, cudaStream_t stream);
// out[t] = shared[t] + sum_j weights[t, j] * rows[flat_to_row[t * top_k + j]], float32 accumulation, slot order
cudaError_t unpermute(DType dtype, const void* rows, int64_t ldr, const int64_t* flat_to_row, const float* weights,
                      const void* shared, int64_t lds, int64_t tokens, int64_t d, int top_k, void* out, int64_t ldo,
                      cudaStream_t stream);
// grad_w[t, j] = <grad_out[t], rows[flat_to_row[t * top_k + j]]>
cudaError_t unpermute_weight_grad(DType dtype, const void* grad_out, int64_t ldg, const void* rows, int64_t ldr,
                                  const int64_t* flat_to_row, int64_t tokens, int64_t d, int top_k, float* grad_w,
                                  cudaStream_t stream);

// Fused top-k gating on float32 logits [T, E] (E <= 1024, 1 <= top_k <= min(8, E)): scores, top-k of
// score + bias (NaN after every number, ties to the lower expert: k distinct ids in [0, E)), weights
// (renormalised or not), counts (atomics on integers: exact) and per-block sums of s / sum(s) in
// `partial` [blocks, E] (the caller sums them in order).
int gating_tokens_per_block();
// The MoE layer plan's gating + routing pair (see gating.cu's gate_route_kernel and permute.cu's
// gate_scatter_kernel): weights, ids [T, top_k + shared]; hist [blocks, E + shared] (int64, then
// each block's exclusive running count), partial [blocks, E]; load, prob_mean [E], offsets
// [E + shared + 1], aux []; ticket: an unsigned counter that is 0 before and after a launch.
cudaError_t gate_route(const float* logits, int64_t tokens, int num_experts, const float* bias, int top_k, int shared,
                       bool softmax, bool renormalize, bool has_aux, float aux_coef, float* weights, int64_t* ids,
                       int64_t* hist, float* partial, int64_t* load, float* prob_mean, int64_t* offsets, float* aux,
                       unsigned int* ticket, cudaStream_t stream);
cudaError_t gate_scatter(const int64_t* ids, int64_t n, int num_experts, int entries_per_block, int64_t blocks,
                         const int64_t* prefix, const int64_t* offsets, int64_t* row_to_flat, int64_t* flat_to_row,
                         cudaStream_t stream);
// The layer plan's weight pack: count (1..8) contiguous tensors of src_dtype, sizes[i] elements each,
// cast to out_dtype one after another into out (sum(sizes) elements).
cudaError_t pack(DType src_dtype, DType out_dtype, int count, const void* const* srcs, const int64_t* sizes, void* out,
                 cudaStream_t stream);
// topk_gating_backward on the first top_k of ld columns of ids and grad_weights, prob_mean's gradient
// the aux loss's (grad_aux * load_e * aux_coef) where grad_aux is not null.
cudaError_t gate_route_backward(const float* logits, int64_t tokens, int num_experts, const int64_t* ids, int top_k,
                                int64_t ld, const float* grad_weights, const int64_t* load, const float* grad_aux,
                                float aux_coef, bool softmax, bool renormalize, float* grad_logits,
                                cudaStream_t stream);
cudaError_t topk_gating(const float* logits, int64_t tokens, int num_experts, const float* bias, int top_k,
                        bool softmax, bool renormalize, float* weights, int64_t* ids, int64_t* counts, float* partial,
                        cudaStream_t stream);
cudaError_t topk_gating_backward(const float* logits, int64_t tokens, int num_experts, const int64_t* ids, int top_k,
                                 const float* grad_weights, const float* grad_prob_mean, bool softmax, bool renormalize,
                                 float* grad_logits, cudaStream_t stream);

// Submanifold depthwise conv on visible rows [rows, channels] with a neighbour table [rows, kk]
// (-1 reads as zero) and weight [channels, kk]; flip reads the kernel reversed (dx of a symmetric table).
cudaError_t masked_depthwise_conv(DType dtype, const void* x, int64_t ldx, const int64_t* neighbors, int kk,
                                  const void* weight, const void* bias, int64_t rows, int64_t channels, bool flip,
                                  void* out, int64_t ldo, cudaStream_t stream);
// Per-block partial sums: dw_partial [blocks, channels, kk], db_partial [blocks, channels], blocks =
// ceil(rows / dwconv_grad_rows_per_block()); the caller sums them over blocks in order.
int dwconv_grad_rows_per_block();
cudaError_t masked_depthwise_conv_wgrad(DType dtype, const void* x, int64_t ldx, const void* grad_out, int64_t ldg,
                                        const int64_t* neighbors, int kk, int64_t rows, int64_t channels,
                                        float* dw_partial, float* db_partial, cudaStream_t stream);

// Tensor-core grouped GEMM (fp16 / bf16, fp32 accumulation) over expert-major rows, in row blocks of
// grouped_mm_block_rows() rows: expert e owns ceil(count_e / rows) consecutive blocks, each block
// finds its own from offsets[0..num_experts], and blocks is a bound (the surplus blocks exit).
// act: an Activation code; SwiGLU (forward, N = 2H even) writes H columns and keeps all 2H in pre, its
// halves [gate | up] or, with interleaved, [g0, u0, g1, u1, ...]; pre (nullable) keeps the pre-activation; gather
// (nullable) reads A row r as a[gather[r] / top_k]; trans_w reads W[e] as [N, K] with leading dimension ldw.
// grad_act (trans_w only): pre is read instead, and out = (A @ W^T) * act'(pre) (SwiGLU: pre and out
// have 2N columns in the layout `interleaved` says: d gate and d up).
// rounds > 0 (a gathered forward only): the row blocks run interleaved across experts in that many
// rounds (ceil(M / rows)), token order, instead of one expert after another (rounds == 0).
// a_rows: the rows a holds (0: not known); where A is not gathered the sm_90a kernel reads it by TMA
// through a tensor map of that many rows (no row past them addressed).
int grouped_mm_block_rows();
// The kernels grouped_mm and grouped_mm_wgrad launch on the current device: "wgmma" (sm_90a: wgmma,
// TMA, mbarriers; a 9.0 device that loaded the build's sm_90a code) or "mma.sync" (every other code,
// where the wgmma kernels trap).
const char* grouped_mm_kernels();
// The same choice for a device whose probe kernel (grouped_gemm.cu: its __launch_bounds__ tell the
// sm_90a cubin, 64 threads, from every other code, 32) reports `probe_threads` (0: no code loaded).
const char* grouped_mm_kernels_for(int probe_threads);

// The down-projection dgrad of rows combined with routing weights (docs/host_path.md, step 5): with
// partial set (trans_w, gather and grad_act too), row r reads the combined tokens' gradient g through
// gather, d hidden = weights[gather[r]] * (g @ W^T) before act', and partial[gather[r] * ldq + c] =
// the sum over hidden columns 8c .. 8c + 7 of (g @ W^T) * act(pre) (act(pre) rounded to the dtype),
// column ceil(N / 8) = <g, b2[e]> (b2 [E, K] contiguous; 0 without): each a fixed-order sum.
struct RoutedDgrad {
  const float* weights = nullptr;
  float* partial = nullptr;
  int64_t ldq = 0;
  const void* b2 = nullptr;
};
cudaError_t grouped_mm(DType dtype, const void* a, int64_t lda, const int64_t* gather, int top_k, const void* w,
                       int64_t K, int64_t N, int64_t ldw, int64_t stride_we, bool trans_w, const void* bias,
                       int64_t blocks, const int64_t* offsets, int num_experts, int act, void* out, int64_t ldo,
                       void* pre, int64_t ldp, int grad_act, int64_t rounds, bool interleaved, cudaStream_t stream,
                       RoutedDgrad route = {}, int64_t a_rows = 0);
// dW partials [splits, E, K, N] (fp32) of A_e^T G_e, each expert's rows split `splits` ways, and
// (partial_db nullable) db partials [splits, E, N] of G_e's row sums; every element is written
// (zeros for experts without rows). a_act (an Activation code, as act) uses act(A) for A (SwiGLU: a has
// 2K columns in the layout `interleaved` says). a_rows and g_rows: the rows a and g hold (the sm_90a
// kernel's tensor maps address no row past them).
cudaError_t grouped_mm_wgrad(DType dtype, const void* a, int64_t lda, int64_t a_rows, const int64_t* gather, int top_k,
                             const void* g, int64_t ldg, int64_t g_rows, const int64_t* offsets, int64_t num_experts,
                             int64_t K, int64_t N, int splits, int a_act, float* partial, float* partial_db,
                             bool interleaved, cudaStream_t stream);

}  // namespace geomoe
