// Fused top-k gating: one warp per token, the token's scores spread over the lanes (E <= 1024).
#include <cfloat>
#include <type_traits>

#include "geomoe_core.h"

namespace geomoe {
namespace {

constexpr int kWarps = 8;  // tokens per block
constexpr int kMaxPerLane = 32;  // 32 lanes x 32 = 1024 experts
constexpr int kMaxTopK = 8;
// PER_LANE (experts per lane, a power of two) and fully unrolled loops keep every per-token array
// in registers: no local memory.

__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The selection order, the same on every backend: larger score + bias first, NaN after every number
// (-inf included), equal values (-0.0 and 0.0 too) to the lower expert. order_key maps a float to an
// int in that order (-0x7f800000 for -inf up to 0x7f800000 for +inf); the keys below all of those
// mark NaN, an expert already chosen and a padding slot past E, so that no real value (a -inf or
// -FLT_MAX bias) can be taken for a chosen expert, and a padding slot is never chosen while any
// expert is left.
constexpr int kNanKey = -0x7f800001;
constexpr int kChosenKey = kNanKey - 1;
constexpr int kPadKey = kNanKey - 2;

__device__ inline int order_key(float v) {
  const int bits = __float_as_int(v);
  const int mag = bits & 0x7fffffff;
  if (mag > 0x7f800000) return kNanKey;
  return bits < 0 ? -mag : mag;
}

// (key, index) of the largest key, the lower index among equals: a total order, so every lane ends
// with the same pair
__device__ inline void warp_argmax(int& k, int& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const int ok = __shfl_xor_sync(0xffffffffu, k, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ok > k || (ok == k && oi < i)) { k = ok; i = oi; }
  }
}

// Scores of token t into s[] (lane-strided: expert e = lane + 32 * j); padding slots are 0.
template <int PER_LANE>
__device__ inline void scores(const float* __restrict__ logits, int64_t t, int E, bool softmax, int lane,
                              float (&s)[PER_LANE]) {
  const float* row = logits + t * E;
  float mx = -FLT_MAX;
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int e = lane + 32 * j;
    s[j] = e < E ? row[e] : -FLT_MAX;
    mx = fmaxf(mx, s[j]);
  }
  if (softmax) {
    mx = warp_max(mx);
    float z = 0.f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int e = lane + 32 * j;
      s[j] = e < E ? expf(s[j] - mx) : 0.f;  // exact expf, not __expf: ties in top-k must match the reference
      z += s[j];
    }
    z = warp_sum(z);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) s[j] /= z;
  } else {
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) s[j] = (lane + 32 * j) < E ? 1.f / (1.f + expf(-s[j])) : 0.f;
  }
}

template <int PER_LANE>
__global__ void gating_kernel(const float* __restrict__ logits, int64_t T, int E, const float* __restrict__ bias,
                              int top_k, bool softmax, bool renorm, float* __restrict__ weights,
                              int64_t* __restrict__ ids, unsigned long long* __restrict__ counts,
                              float* __restrict__ partial) {
  extern __shared__ float q_smem[];  // [kWarps][E]: per-warp normalised scores, summed in warp order
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  float s[PER_LANE];
  float* q = q_smem + warp * E;
  if (t < T) {
    scores<PER_LANE>(logits, t, E, softmax, lane, s);
    int key[PER_LANE];
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int e = lane + 32 * j;
      key[j] = e < E ? order_key(bias ? s[j] + bias[e] : s[j]) : kPadKey;
      total += s[j];
    }
    total = warp_sum(total);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int e = lane + 32 * j;
      if (e < E) q[e] = s[j] / total;
    }
    float chosen_sum = 0.f, chosen[kMaxTopK];
#pragma unroll
    for (int r = 0; r < kMaxTopK; ++r) {
      if (r >= top_k) break;
      // best_e starts at a slot of this lane and is only ever replaced by another slot; an expert
      // (key >= kChosenKey) outranks every padding slot, so with E >= 1 it is always in [0, E)
      int best = key[0], best_e = lane;
#pragma unroll
      for (int j = 1; j < PER_LANE; ++j)
        if (key[j] > best) { best = key[j]; best_e = lane + 32 * j; }
      warp_argmax(best, best_e);
      float sv = 0.f;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j)
        if (lane + 32 * j == best_e) { sv = s[j]; key[j] = kChosenKey; }
      sv = warp_sum(sv);  // exactly one lane holds it
      chosen[r] = sv;
      chosen_sum += sv;
      if (lane == 0) {
        ids[t * top_k + r] = best_e;
        atomicAdd(counts + best_e, 1ull);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kMaxTopK; ++r)
        if (r < top_k) weights[t * top_k + r] = renorm ? chosen[r] / chosen_sum : chosen[r];
    }
  } else {
    for (int e = lane; e < E; e += 32) q[e] = 0.f;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float acc = 0.f;
    for (int w = 0; w < kWarps; ++w) acc += q_smem[w * E + e];
    partial[static_cast<int64_t>(blockIdx.x) * E + e] = acc;
  }
}

template <int PER_LANE>
__global__ void gating_backward_kernel(const float* __restrict__ logits, int64_t T, int E,
                                       const int64_t* __restrict__ ids, int top_k, int64_t ld,
                                       const float* __restrict__ gw, const float* __restrict__ gp,
                                       const int64_t* __restrict__ load, const float* __restrict__ grad_aux,
                                       float aux_coef, bool softmax, bool renorm, float* __restrict__ grad) {
  // ids and gw: rows of ld entries, the first top_k read. With load (and then gp null): prob_mean's
  // gradient is the aux loss's, grad_aux * (load_e * aux_coef).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= T) return;
  float s[PER_LANE], g[PER_LANE];
  scores<PER_LANE>(logits, t, E, softmax, lane, s);
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) g[j] = 0.f;
  if (gw) {
    float sel_sum = 0.f, dot = 0.f, sel[kMaxTopK];
#pragma unroll
    for (int r = 0; r < kMaxTopK; ++r) {
      sel[r] = 0.f;
      if (r >= top_k) continue;
      const int64_t e = ids[t * ld + r];
      float v = 0.f;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j)
        if (lane + 32 * j == e) v = s[j];
      sel[r] = warp_sum(v);
      sel_sum += sel[r];
    }
#pragma unroll
    for (int r = 0; r < kMaxTopK; ++r)
      if (r < top_k) dot += gw[t * ld + r] * sel[r] / sel_sum;
#pragma unroll
    for (int r = 0; r < kMaxTopK; ++r) {
      if (r >= top_k) continue;
      const int64_t e = ids[t * ld + r];
      const float gr = renorm ? (gw[t * ld + r] - dot) / sel_sum : gw[t * ld + r];
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j)
        if (lane + 32 * j == e) g[j] += gr;
    }
  }
  if (gp || load) {  // prob_mean = mean_t s / sum(s)
    const float da = load ? *grad_aux : 0.f;
    auto gpe = [&](int e) { return load ? static_cast<float>(load[e]) * aux_coef * da : gp[e]; };
    float z = 0.f, gq_q = 0.f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) z += s[j];
    z = warp_sum(z);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int e = lane + 32 * j;
      if (e < E) gq_q += gpe(e) / T * s[j] / z;
    }
    gq_q = warp_sum(gq_q);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int e = lane + 32 * j;
      if (e < E) g[j] += (gpe(e) / T - gq_q) / z;
    }
  }
  float gs_s = 0.f;
  if (softmax) {
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) gs_s += g[j] * s[j];
    gs_s = warp_sum(gs_s);
  }
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) {
    const int e = lane + 32 * j;
    if (e < E) grad[t * E + e] = softmax ? s[j] * (g[j] - gs_s) : g[j] * s[j] * (1.f - s[j]);
  }
}

// gating_kernel for the MoE layer's plan, with routing's first half and the reductions fused in.
// weights and ids are [T, K = top_k + S] (each token's S shared experts E..E+S-1 at weight 1 after
// its top_k); each block writes its row of hist [blocks, EA = E + S] (its tokens' entries per
// expert: shared-memory atomics on integers, exact) and of partial [blocks, E]. The block that
// finishes last (a ticket on `ticket`, 0 before the launch, put back by that block) then reduces
// in a fixed order (threads in G groups of EA, group g over a run of blocks, the groups summed in
// order): load [E], prob_mean [E] (sum / T), offsets [EA + 1], hist overwritten by each block's
// exclusive running count per expert, and with has_aux, aux = sum_e prob_mean_e * load_e * aux_coef
// (in expert order). Shared memory: max(kWarps * E floats, G * EA int64 + G * E floats), then EA
// unsigned counters.
__host__ __device__ inline int gate_route_groups(int EA, int threads) { return EA <= threads ? threads / EA : 1; }
__host__ __device__ inline int64_t gate_route_region(int E, int EA, int threads) {
  const int64_t G = gate_route_groups(EA, threads);
  const int64_t a = static_cast<int64_t>(kWarps) * E * 4, b = G * EA * 8 + G * E * 4;
  return ((a > b ? a : b) + 15) / 16 * 16;
}

template <int PER_LANE>
__global__ void gate_route_kernel(const float* __restrict__ logits, int64_t T, int E, const float* __restrict__ bias,
                                  int top_k, int S, bool softmax, bool renorm, bool has_aux, float aux_coef,
                                  float* __restrict__ weights, int64_t* __restrict__ ids, int64_t* hist, float* partial,
                                  int64_t* __restrict__ load, float* __restrict__ prob_mean, int64_t* offsets,
                                  float* __restrict__ aux, unsigned int* ticket) {
  extern __shared__ __align__(16) unsigned char gr_smem[];
  __shared__ bool is_last;
  const int EA = E + S, K = top_k + S;
  const int64_t region = gate_route_region(E, EA, blockDim.x);
  float* q_smem = reinterpret_cast<float*>(gr_smem);  // [kWarps][E], as gating_kernel's
  unsigned int* hcount = reinterpret_cast<unsigned int*>(gr_smem + region);  // [EA]
  for (int e = threadIdx.x; e < EA; e += blockDim.x) hcount[e] = 0;
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  float s[PER_LANE];
  float* q = q_smem + warp * E;
  if (t < T) {
    scores<PER_LANE>(logits, t, E, softmax, lane, s);
    int key[PER_LANE];
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int e = lane + 32 * j;
      key[j] = e < E ? order_key(bias ? s[j] + bias[e] : s[j]) : kPadKey;
      total += s[j];
    }
    total = warp_sum(total);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int e = lane + 32 * j;
      if (e < E) q[e] = s[j] / total;
    }
    float chosen_sum = 0.f, chosen[kMaxTopK];
#pragma unroll
    for (int r = 0; r < kMaxTopK; ++r) {
      if (r >= top_k) break;
      int best = key[0], best_e = lane;
#pragma unroll
      for (int j = 1; j < PER_LANE; ++j)
        if (key[j] > best) { best = key[j]; best_e = lane + 32 * j; }
      warp_argmax(best, best_e);
      float sv = 0.f;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j)
        if (lane + 32 * j == best_e) { sv = s[j]; key[j] = kChosenKey; }
      sv = warp_sum(sv);
      chosen[r] = sv;
      chosen_sum += sv;
      if (lane == 0) {
        ids[t * K + r] = best_e;
        atomicAdd(hcount + best_e, 1u);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kMaxTopK; ++r)
        if (r < top_k) weights[t * K + r] = renorm ? chosen[r] / chosen_sum : chosen[r];
    }
    for (int j = lane; j < S; j += 32) {
      weights[t * K + top_k + j] = 1.f;
      ids[t * K + top_k + j] = E + j;
    }
  } else {
    for (int e = lane; e < E; e += 32) q[e] = 0.f;
  }
  __syncthreads();
  const int64_t b = blockIdx.x;
  const int64_t first = b * kWarps;
  const unsigned int n_valid = static_cast<unsigned int>(T - first < kWarps ? T - first : kWarps);
  for (int e = threadIdx.x; e < EA; e += blockDim.x) {
    if (e < E) {
      float acc = 0.f;
      for (int w = 0; w < kWarps; ++w) acc += q_smem[w * E + e];
      partial[b * E + e] = acc;
    }
    hist[b * EA + e] = e < E ? hcount[e] : n_valid;
  }
  // every thread's rows stored and made visible device-wide before the block's ticket
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int64_t nb = gridDim.x;
  const int G = gate_route_groups(EA, blockDim.x);
  const int64_t per = (nb + G - 1) / G;
  long long* gsum = reinterpret_cast<long long*>(gr_smem);  // [G][EA] (q_smem is done with)
  float* fsum = reinterpret_cast<float*>(gr_smem + static_cast<int64_t>(G) * EA * 8);  // [G][E]
  const volatile int64_t* vhist = hist;  // the other blocks' rows: read past L1
  const volatile float* vpartial = partial;
  for (int i = threadIdx.x; i < G * EA; i += blockDim.x) {
    const int g = i / EA, e = i % EA;
    const int64_t b0 = g * per, b1 = b0 + per < nb ? b0 + per : nb;
    long long h = 0;
    float f = 0.f;
    for (int64_t r = b0; r < b1; ++r) {
      h += vhist[r * EA + e];
      if (e < E) f += vpartial[r * E + e];
    }
    gsum[i] = h;
    if (e < E) fsum[g * E + e] = f;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < EA; e += blockDim.x) {
    long long run = 0;
    float f = 0.f;
    for (int g = 0; g < G; ++g) {
      const long long h = gsum[g * EA + e];
      gsum[g * EA + e] = run;  // group g's start
      run += h;
      if (e < E) f += fsum[g * E + e];
    }
    offsets[e + 1] = run;  // the expert's count, scanned below
    if (e < E) {
      load[e] = run;
      prob_mean[e] = f / static_cast<float>(T);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    long long run = 0;
    offsets[0] = 0;
    for (int e = 0; e < EA; ++e) {
      run += offsets[e + 1];
      offsets[e + 1] = run;
    }
    if (has_aux) {
      float a = 0.f;
      for (int e = 0; e < E; ++e) a += prob_mean[e] * (static_cast<float>(load[e]) * aux_coef);
      *aux = a;
    }
    *ticket = 0u;
  }
  for (int i = threadIdx.x; i < G * EA; i += blockDim.x) {
    const int g = i / EA, e = i % EA;
    const int64_t b0 = g * per, b1 = b0 + per < nb ? b0 + per : nb;
    long long run = gsum[i];
    for (int64_t r = b0; r < b1; ++r) {
      const long long h = vhist[r * EA + e];
      hist[r * EA + e] = run;
      run += h;
    }
  }
}

// Calls f(std::integral_constant<int, P>) with P the power of two >= ceil(E / 32).
template <typename F>
cudaError_t by_per_lane(int E, F&& f) {
  const int need = (E + 31) / 32;
  if (need <= 1) return f(std::integral_constant<int, 1>{});
  if (need <= 2) return f(std::integral_constant<int, 2>{});
  if (need <= 4) return f(std::integral_constant<int, 4>{});
  if (need <= 8) return f(std::integral_constant<int, 8>{});
  if (need <= 16) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 32>{});
}

}  // namespace

int gating_tokens_per_block() { return kWarps; }

cudaError_t topk_gating(const float* logits, int64_t tokens, int num_experts, const float* bias, int top_k,
                        bool softmax, bool renormalize, float* weights, int64_t* ids, int64_t* counts, float* partial,
                        cudaStream_t stream) {
  // k distinct experts need k <= E
  if (tokens < 0 || num_experts < 1 || num_experts > 32 * kMaxPerLane || top_k < 1 || top_k > kMaxTopK ||
      top_k > num_experts)
    return cudaErrorInvalidValue;
  const int64_t blocks = (tokens + kWarps - 1) / kWarps;
  if (blocks == 0) return cudaSuccess;
  return by_per_lane(num_experts, [&](auto p) {
    GEOMOE_LAUNCH(blocks, kWarps * 32, kWarps * num_experts * sizeof(float), stream, gating_kernel<decltype(p)::value>)(
        logits, tokens, num_experts, bias, top_k, softmax, renormalize, weights, ids,
        reinterpret_cast<unsigned long long*>(counts), partial);
    return cudaGetLastError();
  });
}

cudaError_t gate_route(const float* logits, int64_t tokens, int num_experts, const float* bias, int top_k, int shared,
                       bool softmax, bool renormalize, bool has_aux, float aux_coef, float* weights, int64_t* ids,
                       int64_t* hist, float* partial, int64_t* load, float* prob_mean, int64_t* offsets, float* aux,
                       unsigned int* ticket, cudaStream_t stream) {
  if (tokens < 0 || num_experts < 1 || num_experts > 32 * kMaxPerLane || top_k < 1 || top_k > kMaxTopK ||
      top_k > num_experts || shared < 0 || shared > 32)
    return cudaErrorInvalidValue;
  const int64_t blocks = (tokens + kWarps - 1) / kWarps;
  if (blocks == 0) return cudaSuccess;
  const int threads = kWarps * 32, EA = num_experts + shared;
  const int64_t smem = gate_route_region(num_experts, EA, threads) + static_cast<int64_t>(EA) * 4;
  return by_per_lane(num_experts, [&](auto p) {
    GEOMOE_LAUNCH(blocks, threads, smem, stream, gate_route_kernel<decltype(p)::value>)(
        logits, tokens, num_experts, bias, top_k, shared, softmax, renormalize, has_aux, aux_coef, weights, ids, hist,
        partial, load, prob_mean, offsets, aux, ticket);
    return cudaGetLastError();
  });
}

cudaError_t gate_route_backward(const float* logits, int64_t tokens, int num_experts, const int64_t* ids, int top_k,
                                int64_t ld, const float* grad_weights, const int64_t* load, const float* grad_aux,
                                float aux_coef, bool softmax, bool renormalize, float* grad_logits,
                                cudaStream_t stream) {
  if (tokens < 0 || num_experts < 1 || num_experts > 32 * kMaxPerLane || top_k < 1 || top_k > kMaxTopK ||
      top_k > num_experts || ld < top_k)
    return cudaErrorInvalidValue;
  const int64_t blocks = (tokens + kWarps - 1) / kWarps;
  if (blocks == 0) return cudaSuccess;
  return by_per_lane(num_experts, [&](auto p) {
    GEOMOE_LAUNCH(blocks, kWarps * 32, 0, stream, gating_backward_kernel<decltype(p)::value>)(
        logits, tokens, num_experts, ids, top_k, ld, grad_weights, nullptr, grad_aux ? load : nullptr, grad_aux,
        aux_coef, softmax, renormalize, grad_logits);
    return cudaGetLastError();
  });
}

cudaError_t topk_gating_backward(const float* logits, int64_t tokens, int num_experts, const int64_t* ids, int top_k,
                                 const float* grad_weights, const float* grad_prob_mean, bool softmax,
                                 bool renormalize, float* grad_logits, cudaStream_t stream) {
  if (tokens < 0 || num_experts < 1 || num_experts > 32 * kMaxPerLane || top_k < 1 || top_k > kMaxTopK ||
      top_k > num_experts)
    return cudaErrorInvalidValue;
  const int64_t blocks = (tokens + kWarps - 1) / kWarps;
  if (blocks == 0) return cudaSuccess;
  return by_per_lane(num_experts, [&](auto p) {
    GEOMOE_LAUNCH(blocks, kWarps * 32, 0, stream, gating_backward_kernel<decltype(p)::value>)(
        logits, tokens, num_experts, ids, top_k, top_k, grad_weights, grad_prob_mean, nullptr, nullptr, 0.f, softmax,
        renormalize, grad_logits);
    return cudaGetLastError();
  });
}

}  // namespace geomoe
