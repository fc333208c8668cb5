// Fused training-mode BatchNorm2d + SiLU for channels_last CPU tensors (float32 or bfloat16).
//
// A channels_last [N, C, H, W] tensor is a row-major [M, C] matrix with M = N*H*W, so every
// pass below walks rows and keeps per-channel accumulators in a contiguous float row that the
// compiler vectorises across channels. Statistics are accumulated in float per block of rows
// and summed in double, so M in the tens of millions loses no precision.
//
// forward:  2 passes (statistics; normalise + SiLU), writes y only.
// backward: 2 passes (SiLU gradient + sums; input gradient in place), recomputing the SiLU
//           from x instead of reading a saved pre-activation (eager saves one tensor more).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>  // std::integral_constant
#include <vector>

#if (defined(__AVX2__) && defined(__FMA__)) || (defined(__AVX512F__) && defined(__AVX512BF16__))
#include <immintrin.h>
#endif

namespace {

// Elementwise loops run over tiles of whole rows flattened (tile_rows * C values) against
// per-channel constants repeated to the same length: long unit-stride loops the compiler
// vectorises (exp included, through libmvec), where a loop over C (16 for yolox_nano's stem)
// would be too short.
constexpr int64_t kTileValues = 1024;
constexpr int64_t kTilesPerFlush = 64;  // float partial sums go to double this often

// Every pointer in the loops is __restrict__: with float storage the compiler must otherwise
// assume the output may alias the float accumulators and constants, and did not vectorise (the
// float32 backward ran 4.6x slower than the bfloat16 one).
// Storage types: float, or bfloat16 handled as raw bits (round to nearest even).
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  *p = static_cast<uint16_t>(bits >> 16);
}

// exp inlined: unlike a libm call it stays in vector registers inside the loops. Range
// reduction to 2^n * e^r (|r| <= ln2/2, ln2 split in two for an exact r), then one degree-5
// polynomial fitted for least maximum relative error on that interval (2.1e-7, under 2 ulp).
// Why this polynomial: the pass is bound by the sigmoid's arithmetic on AVX2, and 5 FMAs here
// replaced 8 operations of the Cephes form (degree 5 for e^r - 1 - r, then * r^2 + r + 1) at the
// same accuracy against float64 — forward 10-20% faster on a 2-core Zen 3.
// The reduction and polynomial constants, shared with the vector version below.
constexpr float kLog2e = 1.44269504f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln2 = hi + lo, hi exact
constexpr float kExp[6] = {1.0000001f, 9.999997e-1f, 4.9998894e-1f, 1.6667575e-1f,
                           4.191538e-2f, 8.29765e-3f};  // e^r ~ sum of kExp[i] * r^i

inline float exp_inline(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * kLog2e + 0.5f);
  const float r = x - n * kLn2Hi - n * kLn2Lo;
  float p = kExp[5];
  for (int i = 4; i >= 0; --i) p = p * r + kExp[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float z) { return 1.f / (1.f + exp_inline(-z)); }

struct Tiling {
  int64_t channels, rows, tile_rows, tile, tiles;
  Tiling(int64_t c, int64_t m)
      : channels(c), rows(m), tile_rows(std::max<int64_t>(1, kTileValues / c)),
        tile(tile_rows * c), tiles((m + tile_rows - 1) / tile_rows) {}
  int64_t values(int64_t t) const { return std::min(tile_rows, rows - t * tile_rows) * channels; }
  std::vector<float> repeat(const std::vector<float>& per_channel) const {
    std::vector<float> out(tile);
    for (int64_t j = 0; j < tile; ++j) out[j] = per_channel[j % channels];
    return out;
  }
};

// body(offset, values) for every tile, in parallel.
template <typename F>
void for_each_tile(const Tiling& tiling, F body) {
  at::parallel_for(0, tiling.tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) body(t * tiling.tile, tiling.values(t));
  });
}

// Two per-channel sums over every value: body(t, a, b) adds tile t into a[], b[] (tile long).
template <typename F>
std::vector<double> channel_sums(const Tiling& tiling, F body) {
  const int threads = at::get_num_threads();
  const int64_t tile = tiling.tile;
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * tile, 0.0);
  at::parallel_for(0, tiling.tiles, 1, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * 2 * tile;
    std::vector<float> a(tile, 0.f), b(tile, 0.f);
    for (int64_t t = begin; t < end; ++t) {
      body(t, a.data(), b.data());
      if ((t - begin + 1) % kTilesPerFlush == 0 || t + 1 == end) {
        for (int64_t j = 0; j < tile; ++j) {
          mine[j] += a[j];
          mine[tile + j] += b[j];
          a[j] = 0.f;
          b[j] = 0.f;
        }
      }
    }
  });
  std::vector<double> total(2 * tiling.channels, 0.0);
  for (int t = 0; t < threads; ++t) {
    const double* p = partial.data() + static_cast<size_t>(t) * 2 * tile;
    for (int64_t j = 0; j < tile; ++j) {
      total[j % tiling.channels] += p[j];
      total[tiling.channels + j % tiling.channels] += p[tile + j];
    }
  }
  return total;
}

// The four elementwise loops, one tile (n values, whole rows) at a time. The generic versions
// below serve float32 and any CPU; bfloat16 on a CPU with AVX512-BF16 has its own (further down).
template <typename T>
inline void stats_tile(const T* __restrict__ in, const float* __restrict__ o,
                       float* __restrict__ s, float* __restrict__ sq, int64_t n,
                       int64_t /*channels*/) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_float(in[j]) - o[j];
    s[j] += v;
    sq[j] += v * v;
  }
}

template <typename T>
inline void silu_tile(const T* __restrict__ in, const float* __restrict__ k,
                      const float* __restrict__ d, T* __restrict__ out, int64_t n,
                      int64_t /*channels*/) {
  for (int64_t j = 0; j < n; ++j) {
    const float z = to_float(in[j]) * k[j] + d[j];
    store(out + j, z * sigmoid(z));
  }
}

// dz = dy * silu'(z) into out; sums of dz and dz * (x - mean).
template <typename T>
inline void silu_grad_tile(const T* __restrict__ in, const T* __restrict__ g,
                           const float* __restrict__ k, const float* __restrict__ d,
                           const float* __restrict__ m, T* __restrict__ out,
                           float* __restrict__ sdz, float* __restrict__ sdzx, int64_t n,
                           int64_t /*channels*/) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_float(in[j]);
    const float z = v * k[j] + d[j];
    const float s = sigmoid(z);
    const float dz = to_float(g[j]) * s * (1.f + z * (1.f - s));
    store(out + j, dz);
    sdz[j] += dz;
    sdzx[j] += dz * (v - m[j]);
  }
}

// In place: dz -> dx = kdz * dz - koff - kx * (x - mean).
template <typename T>
inline void input_grad_tile(const T* __restrict__ in, T* __restrict__ io,
                            const float* __restrict__ kdz, const float* __restrict__ koff,
                            const float* __restrict__ kx, const float* __restrict__ m, int64_t n,
                            int64_t /*channels*/) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_float(in[j]);
    store(io + j, kdz[j] * to_float(io[j]) - koff[j] - kx[j] * (v - m[j]));
  }
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// float32 on CPUs with AVX2 + FMA and no AVX-512 (Zen 3, Haswell to Alder Lake): there `auto`
// trains in float32, and the sigmoid's arithmetic is a large part of BN+SiLU. Timed on a 2-core
// Zen 3 with a tile in L1, the compiler's loop above took ~13 cycles a vector: the reciprocal as
// rcp + Newton step (what -ffast-math makes of a division; the build passes -mno-recip here) cost
// more than one vdivps, and the clamp, floor, conversion and exponent bias ~4 more. This one
// takes ~9.5; BN+SiLU forward + backward on yolox_nano's batch-64 shapes: 118 -> 99 ms. Same
// accuracy against float64 (the tests check). AVX-512 CPUs keep the loops they were measured
// with (on them `auto` trains in bfloat16 where it is native).
namespace f32x8 {

inline __m256 f(float v) { return _mm256_set1_ps(v); }

// 1 + e^-z. z is clamped to +-87 (where e^-z stays a normal float; the sigmoid is then 0 or 1
// to float precision). n = round(-z / ln2) comes from adding 1.5 * 2^23 + 127: the sum's low
// mantissa bits are then n + 127, which shifted by 23 are the bits of 2^n, so the rounding,
// the conversion and the exponent bias cost one add and one shift. e^r as exp_inline does.
inline __m256 one_plus_exp_neg(__m256 z) {
  const __m256 magic = f(12582912.f + 127.f);
  z = _mm256_min_ps(_mm256_max_ps(z, f(-87.f)), f(87.f));
  const __m256 t = _mm256_fmadd_ps(z, f(-kLog2e), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmsub_ps(n, f(kLn2Hi), z);  // -z - n * ln2
  r = _mm256_fnmadd_ps(n, f(kLn2Lo), r);
  __m256 p = f(kExp[5]);
  for (int i = 4; i >= 0; --i) p = _mm256_fmadd_ps(p, r, f(kExp[i]));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  return _mm256_fmadd_ps(p, two_n, f(1.f));
}

}  // namespace f32x8

inline void silu_tile(const float* __restrict__ in, const float* __restrict__ k,
                      const float* __restrict__ d, float* __restrict__ out, int64_t n,
                      int64_t channels) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 z = _mm256_fmadd_ps(_mm256_loadu_ps(in + j), _mm256_loadu_ps(k + j),
                                     _mm256_loadu_ps(d + j));
    _mm256_storeu_ps(out + j, _mm256_div_ps(z, f32x8::one_plus_exp_neg(z)));
  }
  silu_tile<float>(in + j, k + j, d + j, out + j, n - j, channels);
}

inline void silu_grad_tile(const float* __restrict__ in, const float* __restrict__ g,
                           const float* __restrict__ k, const float* __restrict__ d,
                           const float* __restrict__ m, float* __restrict__ out,
                           float* __restrict__ sdz, float* __restrict__ sdzx, int64_t n,
                           int64_t channels) {
  const __m256 one = f32x8::f(1.f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(in + j);
    const __m256 z = _mm256_fmadd_ps(v, _mm256_loadu_ps(k + j), _mm256_loadu_ps(d + j));
    const __m256 s = _mm256_div_ps(one, f32x8::one_plus_exp_neg(z));
    const __m256 dz = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(g + j), s),
                                    _mm256_fmadd_ps(z, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(out + j, dz);
    _mm256_storeu_ps(sdz + j, _mm256_add_ps(_mm256_loadu_ps(sdz + j), dz));
    _mm256_storeu_ps(sdzx + j, _mm256_fmadd_ps(dz, _mm256_sub_ps(v, _mm256_loadu_ps(m + j)),
                                               _mm256_loadu_ps(sdzx + j)));
  }
  silu_grad_tile<float>(in + j, g + j, k + j, d + j, m + j, out + j, sdz + j, sdzx + j, n - j,
                        channels);
}
#endif  // AVX2 + FMA, no AVX-512

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bfloat16 on a CPU with AVX512-BF16 (Zen 4, Sapphire Rapids and later). Why: the generic loops
// were compute-bound on a Zen 4 in bfloat16 (15-20 GB/s where a copy moves 30-40, while float32
// ran at copy speed): the compiler widened and rounded bfloat16 with shuffles and integer
// arithmetic and computed exp and the reciprocal to float accuracy. Here a conversion is one
// instruction each way (vcvtneps2bf16 rounds to nearest even, as store() does) and exp and the
// reciprocal are only as accurate as a bfloat16 result needs (relative error < 1e-4, against
// bfloat16's 4e-3). Tails shorter than 16 values take the generic loops.
namespace bf16x16 {

inline __m512 load(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store(uint16_t* p, __m512 v) {
  const __m256bh packed = _mm512_cvtneps_pbh(v);
  std::memcpy(p, &packed, sizeof(packed));
}

inline __m512 f(float v) { return _mm512_set1_ps(v); }

// 1 / (1 + e^-z), e^-z = 2^n * p(r) with p a degree-4 Taylor polynomial on |r| <= ln2/2
// (scalef saturates to 0 or inf for large |z|, giving sigmoid 1 or 0), reciprocal from rcp14.
inline __m512 sigmoid(__m512 z) {
  const __m512 x = _mm512_sub_ps(_mm512_setzero_ps(), z);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, f(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, f(0.693359375f), x);
  r = _mm512_fmadd_ps(n, f(2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(f(1.f / 24), r, f(1.f / 6));
  p = _mm512_fmadd_ps(p, r, f(0.5f));
  p = _mm512_fmadd_ps(p, r, f(1.f));
  p = _mm512_fmadd_ps(p, r, f(1.f));
  return _mm512_rcp14_ps(_mm512_add_ps(_mm512_scalef_ps(p, n), f(1.f)));
}

}  // namespace bf16x16

// The per-vector arithmetic, shared by the tile loops and the register-blocked ones below.
namespace bf16x16 {

inline __m512 silu(__m512 v, __m512 k, __m512 d) {
  const __m512 z = _mm512_fmadd_ps(v, k, d);
  return _mm512_mul_ps(z, sigmoid(z));
}

// dz = dy * silu'(z), z = v * k + d.
inline __m512 silu_grad(__m512 v, __m512 g, __m512 k, __m512 d) {
  const __m512 z = _mm512_fmadd_ps(v, k, d);
  const __m512 s = sigmoid(z);
  return _mm512_mul_ps(_mm512_mul_ps(g, s),
                       _mm512_fmadd_ps(z, _mm512_sub_ps(f(1.f), s), f(1.f)));
}

// dx = kdz * dz - koff - kx * (v - m).
inline __m512 input_grad(__m512 v, __m512 dz, __m512 kdz, __m512 koff, __m512 kx, __m512 m) {
  return _mm512_fnmadd_ps(kx, _mm512_sub_ps(v, m), _mm512_fmsub_ps(kdz, dz, koff));
}

}  // namespace bf16x16

// Register-blocked loops for channel counts of 16 * B (B <= 8; yolox_nano has 16-128): a
// tile is whole rows, so per-channel constants and sums stay in registers for the whole tile
// instead of being loaded (and, for sums, stored) with every vector. The tile loops further
// down were bound by those loads and stores: bf16 forward 1.3-1.5x and backward 1.5-2.4x faster
// this way on a 2-core Zen 4 (alternated A/B, batch 64, 16-64 channels). float32 stays on the
// generic loops: `auto` trains in bf16 wherever these instructions exist.
template <int B>
inline void load_rows(const float* p, __m512 out[B]) {
  for (int b = 0; b < B; ++b) out[b] = _mm512_loadu_ps(p + 16 * b);
}

template <int B>
inline void add_rows(float* p, const __m512 v[B]) {
  for (int b = 0; b < B; ++b)
    _mm512_storeu_ps(p + 16 * b, _mm512_add_ps(_mm512_loadu_ps(p + 16 * b), v[b]));
}

template <int B>
inline void stats_rows(const uint16_t* __restrict__ in, const float* __restrict__ o,
                       float* __restrict__ s, float* __restrict__ sq, int64_t n) {
  __m512 acc[B], acc2[B], shift[B];
  load_rows<B>(o, shift);
  for (int b = 0; b < B; ++b) acc[b] = acc2[b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16 * B) {
    for (int b = 0; b < B; ++b) {
      const __m512 v = _mm512_sub_ps(bf16x16::load(in + j + 16 * b), shift[b]);
      acc[b] = _mm512_add_ps(acc[b], v);
      acc2[b] = _mm512_fmadd_ps(v, v, acc2[b]);
    }
  }
  add_rows<B>(s, acc);
  add_rows<B>(sq, acc2);
}

template <int B>
inline void silu_rows(const uint16_t* __restrict__ in, const float* __restrict__ k,
                      const float* __restrict__ d, uint16_t* __restrict__ out, int64_t n) {
  __m512 kk[B], dd[B];
  load_rows<B>(k, kk);
  load_rows<B>(d, dd);
  for (int64_t j = 0; j < n; j += 16 * B)
    for (int b = 0; b < B; ++b) {
      const int64_t at = j + 16 * b;
      bf16x16::store(out + at, bf16x16::silu(bf16x16::load(in + at), kk[b], dd[b]));
    }
}

template <int B>
inline void silu_grad_rows(const uint16_t* __restrict__ in, const uint16_t* __restrict__ g,
                           const float* __restrict__ k, const float* __restrict__ d,
                           const float* __restrict__ m, uint16_t* __restrict__ out,
                           float* __restrict__ sdz, float* __restrict__ sdzx, int64_t n) {
  __m512 kk[B], dd[B], mm[B], a1[B], a2[B];
  load_rows<B>(k, kk);
  load_rows<B>(d, dd);
  load_rows<B>(m, mm);
  for (int b = 0; b < B; ++b) a1[b] = a2[b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16 * B) {
    for (int b = 0; b < B; ++b) {
      const int64_t at = j + 16 * b;
      const __m512 v = bf16x16::load(in + at);
      const __m512 dz = bf16x16::silu_grad(v, bf16x16::load(g + at), kk[b], dd[b]);
      bf16x16::store(out + at, dz);
      a1[b] = _mm512_add_ps(a1[b], dz);
      a2[b] = _mm512_fmadd_ps(dz, _mm512_sub_ps(v, mm[b]), a2[b]);
    }
  }
  add_rows<B>(sdz, a1);
  add_rows<B>(sdzx, a2);
}

template <int B>
inline void input_grad_rows(const uint16_t* __restrict__ in, uint16_t* __restrict__ io,
                            const float* __restrict__ kdz, const float* __restrict__ koff,
                            const float* __restrict__ kx, const float* __restrict__ m,
                            int64_t n) {
  __m512 a[B], c[B], e[B], mm[B];
  load_rows<B>(kdz, a);
  load_rows<B>(koff, c);
  load_rows<B>(kx, e);
  load_rows<B>(m, mm);
  for (int64_t j = 0; j < n; j += 16 * B)
    for (int b = 0; b < B; ++b) {
      const int64_t at = j + 16 * b;
      bf16x16::store(io + at, bf16x16::input_grad(bf16x16::load(in + at), bf16x16::load(io + at),
                                                   a[b], c[b], e[b], mm[b]));
    }
}

// Calls body(std::integral_constant<int, B>) for channels == 16 * B (B in 1..4, 6, 8): the
// register-blocked loops above. False (nothing called) for other channel counts.
template <typename F>
inline bool by_blocks(int64_t channels, F body) {
  switch (channels) {
    case 16: body(std::integral_constant<int, 1>{}); return true;
    case 32: body(std::integral_constant<int, 2>{}); return true;
    case 48: body(std::integral_constant<int, 3>{}); return true;
    case 64: body(std::integral_constant<int, 4>{}); return true;
    case 96: body(std::integral_constant<int, 6>{}); return true;
    case 128: body(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

// The bfloat16 tile loops: the register-blocked ones where the channel count allows, else
// one vector at a time with per-position constants, and the generic loop for the tail.
inline void stats_tile(const uint16_t* __restrict__ in, const float* __restrict__ o,
                       float* __restrict__ s, float* __restrict__ sq, int64_t n,
                       int64_t channels) {
  if (by_blocks(channels, [&](auto blocks) {
        stats_rows<decltype(blocks)::value>(in, o, s, sq, n); }))
    return;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_sub_ps(bf16x16::load(in + j), _mm512_loadu_ps(o + j));
    _mm512_storeu_ps(s + j, _mm512_add_ps(_mm512_loadu_ps(s + j), v));
    _mm512_storeu_ps(sq + j, _mm512_fmadd_ps(v, v, _mm512_loadu_ps(sq + j)));
  }
  stats_tile<uint16_t>(in + j, o + j, s + j, sq + j, n - j, channels);
}

inline void silu_tile(const uint16_t* __restrict__ in, const float* __restrict__ k,
                      const float* __restrict__ d, uint16_t* __restrict__ out, int64_t n,
                      int64_t channels) {
  if (by_blocks(channels, [&](auto blocks) {
        silu_rows<decltype(blocks)::value>(in, k, d, out, n); }))
    return;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    bf16x16::store(out + j, bf16x16::silu(bf16x16::load(in + j), _mm512_loadu_ps(k + j),
                                          _mm512_loadu_ps(d + j)));
  silu_tile<uint16_t>(in + j, k + j, d + j, out + j, n - j, channels);
}

inline void silu_grad_tile(const uint16_t* __restrict__ in, const uint16_t* __restrict__ g,
                           const float* __restrict__ k, const float* __restrict__ d,
                           const float* __restrict__ m, uint16_t* __restrict__ out,
                           float* __restrict__ sdz, float* __restrict__ sdzx, int64_t n,
                           int64_t channels) {
  if (by_blocks(channels, [&](auto blocks) {
        silu_grad_rows<decltype(blocks)::value>(in, g, k, d, m, out, sdz, sdzx, n); }))
    return;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = bf16x16::load(in + j);
    const __m512 dz = bf16x16::silu_grad(v, bf16x16::load(g + j), _mm512_loadu_ps(k + j),
                                         _mm512_loadu_ps(d + j));
    bf16x16::store(out + j, dz);
    _mm512_storeu_ps(sdz + j, _mm512_add_ps(_mm512_loadu_ps(sdz + j), dz));
    _mm512_storeu_ps(sdzx + j, _mm512_fmadd_ps(dz, _mm512_sub_ps(v, _mm512_loadu_ps(m + j)),
                                               _mm512_loadu_ps(sdzx + j)));
  }
  silu_grad_tile<uint16_t>(in + j, g + j, k + j, d + j, m + j, out + j, sdz + j, sdzx + j, n - j,
                           channels);
}

inline void input_grad_tile(const uint16_t* __restrict__ in, uint16_t* __restrict__ io,
                            const float* __restrict__ kdz, const float* __restrict__ koff,
                            const float* __restrict__ kx, const float* __restrict__ m,
                            int64_t n, int64_t channels) {
  if (by_blocks(channels, [&](auto blocks) {
        input_grad_rows<decltype(blocks)::value>(in, io, kdz, koff, kx, m, n); }))
    return;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    bf16x16::store(io + j, bf16x16::input_grad(
        bf16x16::load(in + j), bf16x16::load(io + j), _mm512_loadu_ps(kdz + j),
        _mm512_loadu_ps(koff + j), _mm512_loadu_ps(kx + j), _mm512_loadu_ps(m + j)));
  input_grad_tile<uint16_t>(in + j, io + j, kdz + j, koff + j, kx + j, m + j, n - j, channels);
}
#endif  // AVX512-BF16

// The running statistics are updated here, as nn.BatchNorm2d does in training (unbiased
// variance, the module's momentum): in Python that was five small tensor ops per layer, ~15 ms
// of dispatch in a yolox_nano step.
template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bias, double eps,
                                     at::Tensor& running_mean, at::Tensor& running_var,
                                     double momentum) {
  const Tiling tiling(x.size(1), x.numel() / x.size(1));
  const int64_t channels = tiling.channels, rows = tiling.rows;
  const T* xp = static_cast<const T*>(x.data_ptr());
  // Sums of x - shift, shift = the first row: E[x^2] - E[x]^2 of raw values cancels
  // catastrophically when a channel's mean is large against its spread (float partial sums);
  // shifted by a sample of the same channel the two terms stay small.
  std::vector<float> first(channels);
  for (int64_t c = 0; c < channels; ++c) first[c] = to_float(xp[c]);
  const auto shift_tile = tiling.repeat(first);
  const float* __restrict__ o = shift_tile.data();
  auto sums = channel_sums(tiling, [&](int64_t t, float* s, float* sq) {
    stats_tile(xp + t * tiling.tile, o, s, sq, tiling.values(t), channels);
  });
  auto opts = weight.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({channels}, opts), invstd = at::empty({channels}, opts);
  std::vector<float> scale(channels), shift(channels);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  float* run_mean = running_mean.data_ptr<float>();
  float* run_var = running_var.data_ptr<float>();
  const double unbiased = static_cast<double>(rows) / std::max<int64_t>(rows - 1, 1);
  for (int64_t c = 0; c < channels; ++c) {
    const double shifted = sums[c] / rows;
    const double m = first[c] + shifted;
    const double v = std::max(sums[channels + c] / rows - shifted * shifted, 0.0);
    const double is = 1.0 / std::sqrt(v + eps);
    mean.data_ptr<float>()[c] = static_cast<float>(m);
    invstd.data_ptr<float>()[c] = static_cast<float>(is);
    run_mean[c] = static_cast<float>((1.0 - momentum) * run_mean[c] + momentum * m);
    run_var[c] = static_cast<float>((1.0 - momentum) * run_var[c] + momentum * v * unbiased);
    scale[c] = static_cast<float>(w[c] * is);
    shift[c] = static_cast<float>(b[c] - m * w[c] * is);
  }
  const auto k_tile = tiling.repeat(scale), d_tile = tiling.repeat(shift);
  const float* __restrict__ k = k_tile.data();
  const float* __restrict__ d = d_tile.data();
  at::Tensor y = at::empty_like(x);
  T* yp = static_cast<T*>(y.data_ptr());
  for_each_tile(tiling, [&](int64_t offset, int64_t n) {
    silu_tile(xp + offset, k, d, yp + offset, n, channels);
  });
  return {y, mean, invstd};
}

// grad_y's rows are grad_row_stride values apart: channels for a channels_last tensor, more
// for a channel slice of a wider one (a concatenation's gradient), read in place.
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_y, int64_t grad_row_stride,
                                      const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& weight,
                                      const at::Tensor& bias) {
  const Tiling tiling(x.size(1), x.numel() / x.size(1));
  const int64_t channels = tiling.channels, rows = tiling.rows;
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* gp = static_cast<const T*>(grad_y.data_ptr());
  const float* mu = mean.data_ptr<float>();
  const float* is = invstd.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  std::vector<float> scale(channels), shift(channels), centre(mu, mu + channels);
  for (int64_t c = 0; c < channels; ++c) {
    scale[c] = w[c] * is[c];
    shift[c] = b[c] - mu[c] * scale[c];
  }
  const auto k_tile = tiling.repeat(scale), d_tile = tiling.repeat(shift);
  const auto m_tile = tiling.repeat(centre);
  const float* __restrict__ k = k_tile.data();
  const float* __restrict__ d = d_tile.data();
  const float* __restrict__ m = m_tile.data();
  // Pass 1: dz = dy * silu'(z), z = x * scale + shift, stored (in the storage type, as eager
  // SiLU's backward stores it) in grad_x; per channel: sum dz, sum dz * (x - mean).
  at::Tensor grad_x = at::empty_like(x);
  T* dp = static_cast<T*>(grad_x.data_ptr());
  auto sums = channel_sums(tiling, [&](int64_t t, float* sdz, float* sdzx) {
    const int64_t offset = t * tiling.tile;
    const T* g = gp + offset;
    if (grad_row_stride != channels) {  // gather the tile's rows (into L1) for the flat loops
      thread_local std::vector<T> rows_buffer;
      rows_buffer.resize(tiling.tile);
      const int64_t first_row = t * tiling.tile_rows, count = tiling.values(t) / channels;
      for (int64_t r = 0; r < count; ++r)
        std::memcpy(rows_buffer.data() + r * channels, gp + (first_row + r) * grad_row_stride,
                    channels * sizeof(T));
      g = rows_buffer.data();
    }
    silu_grad_tile(xp + offset, g, k, d, m, dp + offset, sdz, sdzx, tiling.values(t),
                   channels);
  });
  auto opts = weight.options().dtype(at::kFloat);
  at::Tensor grad_weight = at::empty({channels}, opts), grad_bias = at::empty({channels}, opts);
  std::vector<float> c_dz(channels), c_off(channels), c_x(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double sum_dz = sums[c];
    const double sum_dzx = sums[channels + c] * is[c];  // sum of dz * xhat
    grad_bias.data_ptr<float>()[c] = static_cast<float>(sum_dz);
    grad_weight.data_ptr<float>()[c] = static_cast<float>(sum_dzx);
    // dx = w * invstd * (dz - sum_dz / M - xhat * sum_dzx / M)
    c_dz[c] = w[c] * is[c];
    c_off[c] = static_cast<float>(w[c] * is[c] * sum_dz / rows);
    c_x[c] = static_cast<float>(w[c] * is[c] * is[c] * sum_dzx / rows);  // times (x - mean)
  }
  const auto kdz_tile = tiling.repeat(c_dz), koff_tile = tiling.repeat(c_off);
  const auto kx_tile = tiling.repeat(c_x);
  const float* __restrict__ kdz = kdz_tile.data();
  const float* __restrict__ koff = koff_tile.data();
  const float* __restrict__ kx = kx_tile.data();
  // Pass 2, in place: dz -> dx.
  for_each_tile(tiling, [&](int64_t offset, int64_t n) {
    input_grad_tile(xp + offset, dp + offset, kdz, koff, kx, m, n, channels);
  });
  return {grad_x, grad_weight, grad_bias};
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bn_silu: x must be a 4-d channels_last tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "bn_silu: weight and bias must be contiguous float32");
}

// The distance between consecutive pixels' rows of t if t is channels_last or a channel slice
// of a wider channels_last tensor (rows of t.size(1) values, in order); 0 otherwise.
int64_t channel_slice_row_stride(const at::Tensor& t) {
  if (t.dim() != 4 || t.stride(1) != 1) return 0;
  const int64_t ld = t.stride(3), h = t.size(2), w = t.size(3);
  if (ld < t.size(1) || t.stride(2) != w * ld || t.stride(0) != h * w * ld) return 0;
  return ld;
}

// y, mean, invstd; running_mean and running_var (float32, one per channel) updated in place.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, at::Tensor running_mean,
                                at::Tensor running_var, double momentum) {
  check(x, weight);
  for (const at::Tensor* t : {&running_mean, &running_var})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->numel() == x.size(1),
                "bn_silu: running statistics must be contiguous float32, one per channel");
  if (x.scalar_type() == at::kBFloat16)
    return forward_impl<uint16_t>(x, weight, bias, eps, running_mean, running_var, momentum);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "bn_silu: x must be float32 or bfloat16");
  return forward_impl<float>(x, weight, bias, eps, running_mean, running_var, momentum);
}

std::vector<at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& weight, const at::Tensor& bias) {
  check(x, weight);
  at::Tensor g = grad_y;
  int64_t row_stride = channel_slice_row_stride(grad_y);
  if (row_stride == 0 || grad_y.scalar_type() != x.scalar_type()) {
    g = grad_y.contiguous(at::MemoryFormat::ChannelsLast).to(x.scalar_type());
    row_stride = x.size(1);
  }
  if (x.scalar_type() == at::kBFloat16) {
    return backward_impl<uint16_t>(g, row_stride, x, mean, invstd, weight, bias);
  }
  return backward_impl<float>(g, row_stride, x, mean, invstd, weight, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused BatchNorm2d (training statistics) + SiLU, channels_last");
  m.def("backward", &backward, "gradients of the fused BatchNorm2d + SiLU");
}
