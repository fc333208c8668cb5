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
#include <vector>

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

// exp inlined (range reduction to 2^n * e^r, |r| <= ln2/2, degree-5 minimax polynomial for
// e^r - 1 - r): unlike a libm call it stays in vector registers inside the loops.
inline float exp_inline(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
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

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bias, double eps) {
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
  auto sums = channel_sums(tiling, [&](int64_t t, float* __restrict__ s, float* __restrict__ sq) {
    const T* __restrict__ in = xp + t * tiling.tile;
    const int64_t n = tiling.values(t);
    for (int64_t j = 0; j < n; ++j) {
      const float v = to_float(in[j]) - o[j];
      s[j] += v;
      sq[j] += v * v;
    }
  });
  auto opts = weight.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({channels}, opts), invstd = at::empty({channels}, opts);
  at::Tensor var = at::empty({channels}, opts);
  std::vector<float> scale(channels), shift(channels);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const double shifted = sums[c] / rows;
    const double m = first[c] + shifted;
    const double v = std::max(sums[channels + c] / rows - shifted * shifted, 0.0);
    const double is = 1.0 / std::sqrt(v + eps);
    mean.data_ptr<float>()[c] = static_cast<float>(m);
    var.data_ptr<float>()[c] = static_cast<float>(v);
    invstd.data_ptr<float>()[c] = static_cast<float>(is);
    scale[c] = static_cast<float>(w[c] * is);
    shift[c] = static_cast<float>(b[c] - m * w[c] * is);
  }
  const auto k_tile = tiling.repeat(scale), d_tile = tiling.repeat(shift);
  const float* __restrict__ k = k_tile.data();
  const float* __restrict__ d = d_tile.data();
  at::Tensor y = at::empty_like(x);
  T* yp = static_cast<T*>(y.data_ptr());
  for_each_tile(tiling, [&](int64_t offset, int64_t n) {
    const T* __restrict__ in = xp + offset;
    T* __restrict__ out = yp + offset;
    for (int64_t j = 0; j < n; ++j) {
      const float z = to_float(in[j]) * k[j] + d[j];
      store(out + j, z * sigmoid(z));
    }
  });
  return {y, mean, invstd, var};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& mean, const at::Tensor& invstd,
                                      const at::Tensor& weight, const at::Tensor& bias) {
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
  auto sums = channel_sums(tiling, [&](int64_t t, float* __restrict__ sdz, float* __restrict__ sdzx) {
    const T* __restrict__ in = xp + t * tiling.tile;
    const T* __restrict__ g = gp + t * tiling.tile;
    T* __restrict__ out = dp + t * tiling.tile;
    const int64_t n = tiling.values(t);
    for (int64_t j = 0; j < n; ++j) {
      const float v = to_float(in[j]);
      const float z = v * k[j] + d[j];
      const float s = sigmoid(z);
      const float dz = to_float(g[j]) * s * (1.f + z * (1.f - s));
      store(out + j, dz);
      sdz[j] += dz;
      sdzx[j] += dz * (v - m[j]);
    }
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
    const T* __restrict__ in = xp + offset;
    T* __restrict__ io = dp + offset;
    for (int64_t j = 0; j < n; ++j) {
      const float v = to_float(in[j]);
      store(io + j, kdz[j] * to_float(io[j]) - koff[j] - kx[j] * (v - m[j]));
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "bn_silu: x must be a 4-d channels_last tensor");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "bn_silu: weight and bias must be contiguous float32");
}

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, double eps) {
  check(x, weight);
  if (x.scalar_type() == at::kBFloat16) return forward_impl<uint16_t>(x, weight, bias, eps);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "bn_silu: x must be float32 or bfloat16");
  return forward_impl<float>(x, weight, bias, eps);
}

std::vector<at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& weight, const at::Tensor& bias) {
  check(x, weight);
  at::Tensor g = grad_y.contiguous(at::MemoryFormat::ChannelsLast).to(x.scalar_type());
  if (x.scalar_type() == at::kBFloat16) {
    return backward_impl<uint16_t>(g, x, mean, invstd, weight, bias);
  }
  return backward_impl<float>(g, x, mean, invstd, weight, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused BatchNorm2d (training statistics) + SiLU, channels_last");
  m.def("backward", &backward, "gradients of the fused BatchNorm2d + SiLU");
}
