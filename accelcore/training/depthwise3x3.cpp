// Gradients of a 3x3, padding-1 depthwise convolution (stride 1 or 2) on channels_last CPU
// tensors (float32 or bfloat16), for CPUs with AVX-512, or AVX2 + FMA.
//
// weight_grad: grad_w[c, 0, i, j] = sum over n, oy, ox of
//              grad_y[n, c, oy, ox] * x[n, c, s*oy + i - 1, s*ox + j - 1].
//   Per block of kLanes channels the nine sums stay in nine vector registers while a row of
//   grad_y slides along the three input rows it touches: oneDNN's bfloat16 version of this
//   reduction ran at a third of its float32 speed on a Zen 4, its float32 one on a Zen 3 (AVX2)
//   at 1.4x this kernel's time.
// input_grad_s2: grad_x of the stride-2 convolution. Input pixel (iy, ix) is touched by one
//   output row when iy is even (tap row 1) and by two when it is odd (tap rows 0 and 2), the
//   same for columns, so every input row is a gather of at most two grad_y rows. oneDNN's
//   bfloat16 backward of these convolutions took 3-7x its float32 time on a Zen 4.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <immintrin.h>

namespace {

// One vector of kLanes = 16 channels.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec madd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline void store(uint16_t* p, Vec v) {
  // Round to nearest even, as torch's float -> bfloat16 conversion does (NaN stays NaN).
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x00400000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2: a vector of 16 channels is two 8-lane halves, so each pair of loads uses a whole
// 64-byte line (pixels are a row of channels apart). On a 2-core Zen 3, yolox_nano's batch-64
// weight gradients took 0.83x oneDNN's time with 8-channel blocks, 0.73x with these. A tap
// row's three sums, the sliding window and grad_y take 14 of the 16 registers.
constexpr int64_t kLanes = 16;
struct Vec {
  __m256 lo, hi;
};
inline Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec madd(Vec a, Vec b, Vec c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Vec load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 load8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline Vec load(const uint16_t* p) { return {load8(p), load8(p + 8)}; }
inline void store(float* p, Vec v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline void store8(uint16_t* p, __m256 v) {
  // Round to nearest even (NaN stays NaN), as above; pack the eight 16-bit halves in order.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000)),
                               nan);
  const __m256i halves = _mm256_srli_epi32(rounded, 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store(uint16_t* p, Vec v) {
  store8(p, v.lo);
  store8(p + 8, v.hi);
}
#else
#error "depthwise3x3.cpp needs AVX-512, or AVX2 + FMA"
#endif

constexpr int64_t kRowsPerGroup = 4;    // rows of grad_y sharing one pass over the channel blocks
constexpr int64_t kGroupsPerFlush = 16;  // float partial sums go to double this often

struct Geometry {
  int64_t batch, channels, height, width, out_height, out_width;
};

// Adds one grad_y row's contribution for channels [c, c + kLanes) to acc[3][3]. `pixel` is the
// distance between neighbouring pixels (the channel count).
template <int S, typename T>
inline void row_block(const T* g, const T* const x[3], const Geometry& geo, int64_t pixel,
                      Vec acc[9]) {
  for (int i = 0; i < 3; ++i) {
    if (x[i] == nullptr) continue;  // above or below the image: zero padding
    const T* row = x[i];
    Vec a0 = acc[3 * i], a1 = acc[3 * i + 1], a2 = acc[3 * i + 2];
    Vec left = zero(), centre = load(row);
    for (int64_t w = 0; w < geo.out_width; ++w) {
      const int64_t col = S * w;
      if (S != 1 && w > 0) centre = load(row + col * pixel);
      const Vec right = col + 1 < geo.width ? load(row + (col + 1) * pixel) : zero();
      const Vec gv = load(g + w * pixel);
      a0 = madd(gv, left, a0);
      a1 = madd(gv, centre, a1);
      a2 = madd(gv, right, a2);
      left = S == 1 ? centre : right;
      if (S == 1) centre = right;
    }
    acc[3 * i] = a0;
    acc[3 * i + 1] = a1;
    acc[3 * i + 2] = a2;
  }
}

template <int S, typename T>
at::Tensor weight_grad_impl(const at::Tensor& grad_y, const at::Tensor& x, const Geometry& geo) {
  const int64_t channels = geo.channels, rows = geo.batch * geo.out_height;
  const int64_t blocks = channels / kLanes;
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* gp = static_cast<const T*>(grad_y.data_ptr());
  const int64_t sums = 9 * channels;
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * sums, 0.0);
  const int64_t groups = (rows + kRowsPerGroup - 1) / kRowsPerGroup;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    double* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * sums;
    std::vector<float> block_sums(sums, 0.f);  // [block][tap][kLanes]
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * kRowsPerGroup;
      const int64_t last = std::min(rows, first + kRowsPerGroup);
      for (int64_t b = 0; b < blocks; ++b) {
        float* out = block_sums.data() + b * 9 * kLanes;
        Vec acc[9];
        for (int k = 0; k < 9; ++k) acc[k] = load(out + kLanes * k);
        for (int64_t r = first; r < last; ++r) {
          const int64_t n = r / geo.out_height, h = r % geo.out_height;
          const T* x_rows[3];
          for (int i = 0; i < 3; ++i) {
            const int64_t hi = S * h + i - 1;
            const bool inside = hi >= 0 && hi < geo.height;
            x_rows[i] =
                inside ? xp + ((n * geo.height + hi) * geo.width) * channels + b * kLanes
                   : nullptr;
          }
          row_block<S>(gp + r * geo.out_width * channels + b * kLanes, x_rows, geo, channels,
                       acc);
        }
        for (int k = 0; k < 9; ++k) store(out + kLanes * k, acc[k]);
      }
      if ((group - begin + 1) % kGroupsPerFlush == 0 || group + 1 == end) {
        for (int64_t k = 0; k < sums; ++k) {
          mine[k] += block_sums[k];
          block_sums[k] = 0.f;
        }
      }
    }
  });
  at::Tensor out = at::empty({channels, 1, 3, 3}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int k = 0; k < 9; ++k)
      for (int64_t l = 0; l < kLanes; ++l) {
        double s = 0.0;
        for (int t = 0; t < threads; ++t)
          s += partial[static_cast<size_t>(t) * sums + (b * 9 + k) * kLanes + l];
        o[(b * kLanes + l) * 9 + k] = static_cast<float>(s);
      }
  return out;
}

// The output rows (and their tap rows) that touch input row/column `i` of a stride-2 3x3
// convolution: one (tap 1) for even i, up to two (taps 0 and 2) for odd i.
struct Taps {
  int count = 0;
  int tap[2];
  int64_t out[2];
  Taps(int64_t i, int64_t out_size) {
    if (i % 2 == 0) {
      add(1, i / 2, out_size);
    } else {
      add(0, (i + 1) / 2, out_size);
      add(2, (i - 1) / 2, out_size);
    }
  }
  void add(int k, int64_t o, int64_t out_size) {
    if (o >= 0 && o < out_size) {
      tap[count] = k;
      out[count++] = o;
    }
  }
};

template <typename T>
at::Tensor input_grad_s2_impl(const at::Tensor& grad_y, const at::Tensor& weight,
                              const Geometry& geo) {
  const int64_t channels = geo.channels, blocks = channels / kLanes;
  at::Tensor grad_x = at::empty({geo.batch, channels, geo.height, geo.width},
                                grad_y.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* gp = static_cast<const T*>(grad_y.data_ptr());
  T* xp = static_cast<T*>(grad_x.data_ptr());
  // Weights as [tap][channel] floats, so a tap's kLanes channels load as one vector.
  at::Tensor w = weight.to(at::kFloat).reshape({channels, 9}).t().contiguous();
  const float* wp = w.data_ptr<float>();
  std::vector<Taps> columns;  // the same for every row and channel block
  columns.reserve(geo.width);
  for (int64_t ix = 0; ix < geo.width; ++ix) columns.emplace_back(ix, geo.out_width);
  at::parallel_for(0, geo.batch * geo.height, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / geo.height, iy = r % geo.height;
      const Taps rows(iy, geo.out_height);
      T* out_row = xp + r * geo.width * channels;
      if (rows.count == 0) {
        for (int64_t v = 0; v < geo.width * channels; ++v) out_row[v] = T(0);
        continue;
      }
      const T* g_rows[2];
      for (int k = 0; k < rows.count; ++k)
        g_rows[k] = gp + (n * geo.out_height + rows.out[k]) * geo.out_width * channels;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t c = b * kLanes;
        Vec wt[2][3];
        for (int k = 0; k < rows.count; ++k)
          for (int j = 0; j < 3; ++j)
            wt[k][j] = load(wp + (rows.tap[k] * 3 + j) * channels + c);
        for (int64_t ix = 0; ix < geo.width; ++ix) {
          const Taps& cols = columns[ix];
          Vec acc = zero();
          for (int k = 0; k < rows.count; ++k)
            for (int j = 0; j < cols.count; ++j)
              acc = madd(wt[k][cols.tap[j]], load(g_rows[k] + cols.out[j] * channels + c), acc);
          store(out_row + ix * channels + c, acc);
        }
      }
    }
  });
  return grad_x;
}

Geometry geometry(const at::Tensor& grad_y, at::IntArrayRef input_size) {
  return {input_size[0], input_size[1], input_size[2], input_size[3], grad_y.size(2),
          grad_y.size(3)};
}

void check(const at::Tensor& grad_y, at::IntArrayRef input_size, int64_t stride,
           const char* what) {
  TORCH_CHECK(stride == 1 || stride == 2, what, ": stride must be 1 or 2");
  TORCH_CHECK(input_size.size() == 4 && grad_y.dim() == 4 &&
                  grad_y.is_contiguous(at::MemoryFormat::ChannelsLast),
              what, ": a 4-d channels_last grad_y");
  TORCH_CHECK(grad_y.size(0) == input_size[0] && grad_y.size(1) == input_size[1] &&
                  grad_y.size(2) == (input_size[2] - 1) / stride + 1 &&
                  grad_y.size(3) == (input_size[3] - 1) / stride + 1,
              what, ": grad_y does not match the input size and stride");
  TORCH_CHECK(input_size[1] % 16 == 0, what, ": channels must be a multiple of 16");
  TORCH_CHECK(grad_y.scalar_type() == at::kFloat || grad_y.scalar_type() == at::kBFloat16,
              what, ": float32 or bfloat16");
}

at::Tensor weight_grad(const at::Tensor& grad_y, const at::Tensor& x, int64_t stride) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  grad_y.scalar_type() == x.scalar_type(),
              "depthwise weight_grad: channels_last x of grad_y's dtype");
  check(grad_y, x.sizes(), stride, "depthwise weight_grad");
  const Geometry geo = geometry(grad_y, x.sizes());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (stride == 1)
    return bf16 ? weight_grad_impl<1, uint16_t>(grad_y, x, geo)
                : weight_grad_impl<1, float>(grad_y, x, geo);
  return bf16 ? weight_grad_impl<2, uint16_t>(grad_y, x, geo)
              : weight_grad_impl<2, float>(grad_y, x, geo);
}

at::Tensor input_grad_s2(const at::Tensor& grad_y, const at::Tensor& weight,
                         std::vector<int64_t> input_size) {
  check(grad_y, input_size, 2, "depthwise input_grad_s2");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == input_size[1] && weight.size(1) == 1 &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              "depthwise input_grad_s2: weight must be [channels, 1, 3, 3]");
  const Geometry geo = geometry(grad_y, input_size);
  if (grad_y.scalar_type() == at::kBFloat16)
    return input_grad_s2_impl<uint16_t>(grad_y, weight, geo);
  return input_grad_s2_impl<float>(grad_y, weight, geo);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weight_grad", &weight_grad, "weight gradient of a 3x3 depthwise convolution",
        py::arg("grad_y"), py::arg("x"), py::arg("stride") = 1);
  m.def("input_grad_s2", &input_grad_s2,
        "input gradient of a 3x3 stride-2 depthwise convolution");
}
