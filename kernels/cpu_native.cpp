// Native CPU kernels for bfloat16 inference on x86-64 with AVX-512 BF16 (Zen 4, Sapphire Rapids and later).
//
// Built once per machine by kernels/cpu_native.py with the system C++ compiler and called through ctypes:
// plain C entry points over raw pointers, no torch headers (they would make the build take 20 s instead
// of 2). Only the kernels carry the AVX-512 target attribute; pd_cpu_supported() tells the loader whether
// this CPU can run them. Threads come from OpenMP, whose runtime torch has already loaded.
//
// Every kernel computes one output row with the same sequence of operations whatever the number of rows
// in the call and the number of threads, so a sequence's results do not depend on what it is batched with.

#include <immintrin.h>
#include <stdint.h>

#include <cmath>
#include <cstring>
#include <vector>

#define PD_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

// ---------------------------------------------------------------------------------------------------------
// Linear layers: y[M, N] = x[M, K] W^T + b, W packed as [N / 32, K / 2, 32, 2] (see pack_linear_weight in
// cpu_native.py): for each block of 32 output features, the weights of input pair k sit next to each other,
// so one block is read as a single sequential stream and one vdpbf16ps multiplies a pair of inputs by 16
// features at once. Accumulation is float32, in input order, rounded to bfloat16 once at the end.

constexpr int kFeatureBlock = 32;

// Two adjacent bfloat16 values as one 32-bit lane (memcpy: any alignment, no aliasing assumption).
inline int32_t load_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return pair;
}
constexpr int kRowTile = 8;

template <int Rows>
PD_KERNEL inline void linear_tile(const uint16_t* block, const uint16_t* x, int64_t ldx, const float* bias,
                                  uint16_t* y, int64_t ldy, int64_t K, __mmask16 mask_lo, __mmask16 mask_hi) {
  __m512 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  for (int64_t k2 = 0; k2 < K / 2; ++k2) {
    const uint16_t* w = block + k2 * 2 * kFeatureBlock;
    const __m512bh w_lo = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w_hi = (__m512bh)_mm512_loadu_si512(w + kFeatureBlock);
    for (int r = 0; r < Rows; ++r) {
      const __m512bh pair = (__m512bh)_mm512_set1_epi32(load_pair(x + r * ldx + 2 * k2));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w_lo, pair);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w_hi, pair);
    }
  }
  __m512 b_lo = _mm512_setzero_ps(), b_hi = _mm512_setzero_ps();
  if (bias != nullptr) {
    b_lo = _mm512_maskz_loadu_ps(mask_lo, bias);
    b_hi = _mm512_maskz_loadu_ps(mask_hi, bias + 16);
  }
  for (int r = 0; r < Rows; ++r) {
    _mm256_mask_storeu_epi16(y + r * ldy, mask_lo, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][0], b_lo)));
    _mm256_mask_storeu_epi16(y + r * ldy + 16, mask_hi, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][1], b_hi)));
  }
}

PD_KERNEL void linear_feature_block(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* packed, int64_t N,
                                    int64_t K, const float* bias, uint16_t* y, int64_t ldy, int64_t nb) {
  const uint16_t* block = packed + nb * K * kFeatureBlock;
  const int64_t first = nb * kFeatureBlock;
  const int64_t width = N - first < kFeatureBlock ? N - first : kFeatureBlock;
  const __mmask16 mask_lo = width >= 16 ? 0xFFFF : (__mmask16)((1u << width) - 1);
  const __mmask16 mask_hi = width <= 16 ? 0 : width >= 32 ? 0xFFFF : (__mmask16)((1u << (width - 16)) - 1);
  const float* b = bias != nullptr ? bias + first : nullptr;
  int64_t m = 0;
  for (; m + kRowTile <= M; m += kRowTile)
    linear_tile<kRowTile>(block, x + m * ldx, ldx, b, y + m * ldy + first, ldy, K, mask_lo, mask_hi);
  const uint16_t* xr = x + m * ldx;
  uint16_t* yr = y + m * ldy + first;
  switch (M - m) {
    case 1: linear_tile<1>(block, xr, ldx, b, yr, ldy, K, mask_lo, mask_hi); break;
    case 2: linear_tile<2>(block, xr, ldx, b, yr, ldy, K, mask_lo, mask_hi); break;
    case 3: linear_tile<3>(block, xr, ldx, b, yr, ldy, K, mask_lo, mask_hi); break;
    case 4: linear_tile<4>(block, xr, ldx, b, yr, ldy, K, mask_lo, mask_hi); break;
    case 5: linear_tile<5>(block, xr, ldx, b, yr, ldy, K, mask_lo, mask_hi); break;
    case 6: linear_tile<6>(block, xr, ldx, b, yr, ldy, K, mask_lo, mask_hi); break;
    case 7: linear_tile<7>(block, xr, ldx, b, yr, ldy, K, mask_lo, mask_hi); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Decode attention over a paged cache: one query token per sequence, every query head of a KV head's group
// handled together so that each cached key and value is read once. Scores, softmax and the weighted sum of
// values are float32 (the products of bfloat16 values are exact in float32).

PD_KERNEL inline __m512 exp_ps(__m512 x) {
  // e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2; e^r by a degree-6 polynomial (rel. error < 2e-7).
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  // x as the second operand of min and max, which return it when it is NaN: NaN in, NaN out
  x = _mm512_max_ps(_mm512_set1_ps(-87.3365478515625f), _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

PD_KERNEL inline __m512 bf16_to_ps(const uint16_t* src) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)src)), 16));
}

// Sixteen vectors -> one: lane i of the result is the sum of the lanes of a[i].
PD_KERNEL inline __m512 sum_lanes_of_16(__m512 a[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // b[i]: 8 partial sums of a[2i] | 8 of a[2i + 1]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // c[i]: quarter j holds 4 partial sums of a[4i + j]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // d[i]: quarter j holds 2 partial sums of a[8i + j], then 2 of a[8i + 4 + j]
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x88), _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xDD));
  // lane 4j + t holds the sum of a[4t + j]; put it in lane 4t + j
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, e);
}

// One (sequence, KV head) with head dim 16 * VD: scores [group, length] in scratch, then out [group, D] for
// the group's query heads.
template <int VD>
PD_KERNEL void decode_attention_group(const uint16_t* q, int64_t q_head_stride, const uint16_t* key_cache,
                                      const uint16_t* value_cache, int64_t block_stride, int64_t slot_stride,
                                      const int32_t* block_table, int64_t length, int64_t block_size,
                                      int64_t group, float scale, uint16_t* out, int64_t out_head_stride,
                                      std::vector<float>& scratch) {
  constexpr int64_t D = 16 * VD;
  constexpr int kChunks = (VD + 1) / 2;  // 32 bfloat16 per vdpbf16ps; the last chunk half-masked when VD is odd
  constexpr __mmask32 kLastChunk = VD % 2 ? 0xFFFF : 0xFFFFFFFF;
  const int64_t padded = (length + 15) & ~int64_t(15);
  scratch.resize(group * padded);
  float* scores = scratch.data();
  for (int64_t s0 = 0; s0 < padded; s0 += 16) {
    const uint16_t* keys[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t s = s0 + i < length ? s0 + i : length - 1;  // past the end: any valid key, masked below
      keys[i] = key_cache + (int64_t)block_table[s / block_size] * block_stride + (s % block_size) * slot_stride;
    }
    for (int64_t g = 0; g < group; ++g) {
      const uint16_t* qg = q + g * q_head_stride;
      __m512bh qv[kChunks];
      for (int c = 0; c < kChunks; ++c)
        qv[c] = (__m512bh)_mm512_maskz_loadu_epi16(c == kChunks - 1 ? kLastChunk : 0xFFFFFFFF, qg + 32 * c);
      __m512 dots[16];
      for (int i = 0; i < 16; ++i) {
        dots[i] = _mm512_setzero_ps();
        for (int c = 0; c < kChunks; ++c)
          dots[i] = _mm512_dpbf16_ps(dots[i], (__m512bh)_mm512_maskz_loadu_epi16(
                                                   c == kChunks - 1 ? kLastChunk : 0xFFFFFFFF, keys[i] + 32 * c), qv[c]);
      }
      const __mmask16 valid = s0 + 16 <= length ? 0xFFFF : (__mmask16)((1u << (length - s0)) - 1);
      _mm512_storeu_ps(scores + g * padded + s0, _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY),
                                                                        _mm512_mul_ps(sum_lanes_of_16(dots), _mm512_set1_ps(scale))));
    }
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax in place; masked slots become 0
    float* row = scores + g * padded;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < padded; s += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(row + s));
    const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t s = 0; s < padded; s += 16) {
      const __mmask16 valid = s + 16 <= length ? 0xFFFF : (__mmask16)((1u << (length - s)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + s), row_max)));
      _mm512_storeu_ps(row + s, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    const __m512 inv_sum = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int64_t s = 0; s < padded; s += 16) _mm512_storeu_ps(row + s, _mm512_mul_ps(_mm512_loadu_ps(row + s), inv_sum));
  }
  constexpr int64_t kHeadsAtOnce = VD >= 16 ? 1 : 16 / VD;  // accumulators: kHeadsAtOnce * VD zmm registers
  for (int64_t g0 = 0; g0 < group; g0 += kHeadsAtOnce) {
    const int64_t heads = group - g0 < kHeadsAtOnce ? group - g0 : kHeadsAtOnce;
    __m512 acc[kHeadsAtOnce][VD];
    for (int h = 0; h < kHeadsAtOnce; ++h)
      for (int v = 0; v < VD; ++v) acc[h][v] = _mm512_setzero_ps();
    for (int64_t s = 0; s < length; ++s) {
      const uint16_t* value = value_cache + (int64_t)block_table[s / block_size] * block_stride + (s % block_size) * slot_stride;
      __m512 vd[VD];
      for (int v = 0; v < VD; ++v) vd[v] = bf16_to_ps(value + 16 * v);
      for (int h = 0; h < kHeadsAtOnce; ++h) {
        if (h >= heads) break;
        const __m512 p = _mm512_set1_ps(scores[(g0 + h) * padded + s]);
        for (int v = 0; v < VD; ++v) acc[h][v] = _mm512_fmadd_ps(p, vd[v], acc[h][v]);
      }
    }
    for (int h = 0; h < heads; ++h)
      for (int v = 0; v < VD; ++v)
        _mm256_storeu_si256((__m256i*)(out + (g0 + h) * out_head_stride + 16 * v), (__m256i)_mm512_cvtneps_pbh(acc[h][v]));
  }
}

using DecodeAttentionGroup = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, int64_t,
                                      const int32_t*, int64_t, int64_t, int64_t, float, uint16_t*, int64_t,
                                      std::vector<float>&);

DecodeAttentionGroup decode_attention_for(int64_t head_dim) {
  switch (head_dim) {
    case 16: return decode_attention_group<1>;
    case 32: return decode_attention_group<2>;
    case 64: return decode_attention_group<4>;
    case 128: return decode_attention_group<8>;
    case 256: return decode_attention_group<16>;
    default: return nullptr;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise steps of a decoder layer, each one pass over its rows instead of PyTorch's several.

PD_KERNEL inline void store_bf16(uint16_t* dst, __m512 v) { _mm256_storeu_si256((__m256i*)dst, (__m256i)_mm512_cvtneps_pbh(v)); }

PD_KERNEL inline __m512 round_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }

PD_KERNEL void silu_and_mul_row(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t width) {
  for (int64_t i = 0; i < width; i += 16) {
    const __m512 g = bf16_to_ps(gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store_bf16(out + i, _mm512_mul_ps(silu, bf16_to_ps(up + i)));
  }
}

// residual_out = x + residual (rounded to bfloat16, as the model's dtype holds it); normed = weight *
// bf16(r * rsqrt(mean(r^2) + eps)) with r = residual_out in float32, the order of Hugging Face's RMSNorm.
PD_KERNEL void rms_norm_row(const uint16_t* x, const uint16_t* residual, const uint16_t* weight, float eps,
                            uint16_t* normed, uint16_t* residual_out, int64_t width) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < width; i += 16) {
    __m512 r = bf16_to_ps(x + i);
    if (residual != nullptr) {
      r = round_bf16(_mm512_add_ps(r, bf16_to_ps(residual + i)));
      store_bf16(residual_out + i, r);
    }
    squares = _mm512_fmadd_ps(r, r, squares);
  }
  const __m512 inv_rms = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / (float)width + eps));
  const uint16_t* r_src = residual != nullptr ? residual_out : x;
  for (int64_t i = 0; i < width; i += 16) {
    const __m512 n = round_bf16(_mm512_mul_ps(bf16_to_ps(r_src + i), inv_rms));
    store_bf16(normed + i, _mm512_mul_ps(bf16_to_ps(weight + i), n));
  }
}

// Rotate-half rotary embedding of one token's heads in place: x[:D/2], x[D/2:] -> x1 cos - x2 sin, x2 cos + x1 sin.
PD_KERNEL void rotary_heads(uint16_t* x, int64_t heads, int64_t head_stride, const float* cos, const float* sin,
                            int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    uint16_t* head = x + h * head_stride;
    for (int64_t i = 0; i < half; i += 16) {
      const __m512 x1 = bf16_to_ps(head + i), x2 = bf16_to_ps(head + half + i);
      const __m512 c = _mm512_loadu_ps(cos + i), s = _mm512_loadu_ps(sin + i);
      store_bf16(head + i, _mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, s)));
      store_bf16(head + half + i, _mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, s)));
    }
  }
}

}  // namespace

extern "C" {

// 1 when this CPU has the instructions the kernels use, else 0.
int pd_cpu_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) W^T + bias; W packed [ceil(N / 32), K / 2, 32, 2]
// bfloat16 (features past N zero), bias float32 [N] or null. K must be even.
void pd_linear_bf16(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* packed, int64_t N, int64_t K,
                    const float* bias, uint16_t* y, int64_t ldy, int num_threads) {
  const int64_t blocks = (N + kFeatureBlock - 1) / kFeatureBlock;
  if (num_threads <= 1) {
    for (int64_t nb = 0; nb < blocks; ++nb) linear_feature_block(x, M, ldx, packed, N, K, bias, y, ldy, nb);
    return;
  }
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t nb = 0; nb < blocks; ++nb) linear_feature_block(x, M, ldx, packed, N, K, bias, y, ldy, nb);
}

// Decode attention of `rows` single-token queries. query [T, H, D] and out [T, H, D] bfloat16 (strides in
// elements: token, head); row r reads query token tokens[r] and its lengths[r] >= 1 cached tokens through
// block_tables[r * table_stride ...]; caches [NB, BS, KVH, D] bfloat16, contiguous; D in {16, 32, 64, 128, 256}.
// Returns 0, or -1 for a head dim it does not handle.
int pd_decode_attention_bf16(const uint16_t* query, int64_t q_token_stride, int64_t q_head_stride,
                             const uint16_t* key_cache, const uint16_t* value_cache, int64_t block_size,
                             int64_t num_kv_heads, int64_t D, int64_t num_heads, const int32_t* tokens,
                             const int32_t* lengths, const int32_t* block_tables, int64_t table_stride,
                             int64_t rows, float scale, uint16_t* out, int64_t out_token_stride,
                             int64_t out_head_stride, int num_threads) {
  const DecodeAttentionGroup kernel = decode_attention_for(D);
  if (kernel == nullptr) return -1;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t slot_stride = num_kv_heads * D, block_stride = block_size * slot_stride;
  // One task per sequence when there are enough of them for the threads: its blocks are first read once
  // in address order (when they fit in L2), so that its KV heads' passes find them in cache instead of each
  // fetching every slot's share of one head from memory. Otherwise one task per (sequence, KV head).
  const bool per_sequence = rows >= (num_threads > 1 ? num_threads : 1);
  const int64_t tasks = per_sequence ? rows : rows * num_kv_heads;
  constexpr int64_t kPreReadBytes = 768 * 1024;
#pragma omp parallel num_threads(num_threads > 1 ? num_threads : 1) if (num_threads > 1)
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t r = per_sequence ? task : task / num_kv_heads;
      const int64_t blocks = (lengths[r] + block_size - 1) / block_size;
      const int32_t* table = block_tables + r * table_stride;
      if (per_sequence && blocks * block_stride * 2 * (int64_t)sizeof(uint16_t) <= kPreReadBytes) {
        uint32_t touched = 0;
        for (int64_t b = 0; b < blocks; ++b)
          for (const uint16_t* cache : {key_cache, value_cache}) {
            const uint16_t* block = cache + (int64_t)table[b] * block_stride;
            for (int64_t i = 0; i < block_stride; i += 32) touched += block[i];  // one read per 64-byte line
          }
        asm volatile("" : : "r"(touched));
      }
      const int64_t token = tokens[r];
      const int64_t first = per_sequence ? 0 : task % num_kv_heads, last = per_sequence ? num_kv_heads : first + 1;
      for (int64_t h = first; h < last; ++h)
        kernel(query + token * q_token_stride + h * group * q_head_stride, q_head_stride, key_cache + h * D,
               value_cache + h * D, block_stride, slot_stride, table, lengths[r], block_size, group, scale,
               out + token * out_token_stride + h * group * out_head_stride, out_head_stride, scratch);
    }
  }
  return 0;
}

// out[T, I] = silu(gate_up[:, :I]) * gate_up[:, I:], in float32, rounded once; rows strided (elements). I % 16 == 0.
void pd_silu_and_mul_bf16(const uint16_t* gate_up, int64_t rows, int64_t in_stride, int64_t width, uint16_t* out,
                          int64_t out_stride, int num_threads) {
#pragma omp parallel for num_threads(num_threads > 1 ? num_threads : 1) if (num_threads > 1 && rows > 1)
  for (int64_t r = 0; r < rows; ++r)
    silu_and_mul_row(gate_up + r * in_stride, gate_up + r * in_stride + width, out + r * out_stride, width);
}

// RMSNorm of rows [T, W] (x; plus residual when not null, the sum written to residual_out) into normed [T, W];
// all contiguous bfloat16 rows, weight [W]. W % 16 == 0.
void pd_rms_norm_bf16(const uint16_t* x, const uint16_t* residual, const uint16_t* weight, float eps, int64_t rows,
                      int64_t width, uint16_t* normed, uint16_t* residual_out, int num_threads) {
#pragma omp parallel for num_threads(num_threads > 1 ? num_threads : 1) if (num_threads > 1 && rows > 1)
  for (int64_t r = 0; r < rows; ++r)
    rms_norm_row(x + r * width, residual != nullptr ? residual + r * width : nullptr, weight, eps, normed + r * width,
                 residual_out != nullptr ? residual_out + r * width : nullptr, width);
}

// Rotary embedding in place on q [T, H, D] and k [T, KVH, D] (strides in elements: token, head; last dim
// contiguous) at positions [T], from cos_sin [max_positions, D] float32 ([cos | sin] of the D/2 frequencies).
// D % 32 == 0.
void pd_rotary_bf16(uint16_t* q, int64_t q_token_stride, int64_t q_head_stride, int64_t num_heads, uint16_t* k,
                    int64_t k_token_stride, int64_t k_head_stride, int64_t num_kv_heads, const int64_t* positions,
                    int64_t tokens, const float* cos_sin, int64_t D, int num_threads) {
  const int64_t half = D / 2;
#pragma omp parallel for num_threads(num_threads > 1 ? num_threads : 1) if (num_threads > 1 && tokens > 1)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* cos = cos_sin + positions[t] * D;
    rotary_heads(q + t * q_token_stride, num_heads, q_head_stride, cos, cos + half, half);
    rotary_heads(k + t * k_token_stride, num_kv_heads, k_head_stride, cos, cos + half, half);
  }
}

// Store key/value [T, KVH, D] bfloat16 (strides in elements: token, head; last dim contiguous) into the caches
// [NB * BS slots, KVH, D] at slots[t]; a slot < 0 is skipped.
void pd_write_kv_bf16(const uint16_t* key, int64_t k_token_stride, int64_t k_head_stride, const uint16_t* value,
                      int64_t v_token_stride, int64_t v_head_stride, uint16_t* key_cache, uint16_t* value_cache,
                      const int64_t* slots, int64_t tokens, int64_t num_kv_heads, int64_t D) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(key_cache + (slots[t] * num_kv_heads + h) * D, key + t * k_token_stride + h * k_head_stride, 2 * D);
      std::memcpy(value_cache + (slots[t] * num_kv_heads + h) * D, value + t * v_token_stride + h * v_head_stride, 2 * D);
    }
  }
}

}  // extern "C"
