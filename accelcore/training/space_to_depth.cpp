// 2x2 space-to-depth of a channels_last float32 image batch, optionally rounded to bfloat16.
//
// [N, C, H, W] -> [N, 4C, H/2, W/2], both channels_last: output pixel (i, j) holds input pixels
// (2i, 2j), (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1) in that order, C values each. In memory an
// output row is built from two input rows by moving C-value pieces, one pass over the data
// where torch.cat of four strided slices runs four slow generic copies; with bfloat16 output
// the cast the next convolution would make under autocast happens in the same pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// Round to nearest even, as torch's float -> bfloat16 conversion (finite inputs: pixels).
void to_bfloat16(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(in + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        reinterpret_cast<const __m256i&>(packed));
  }
#endif
  for (; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, in + i, sizeof(bits));
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    out[i] = static_cast<uint16_t>(bits >> 16);
  }
}

// One output row (Wo pixels of 4C values) from input rows `top` and `bottom`.
template <int64_t kC>
inline void gather_row(const float* __restrict__ top, const float* __restrict__ bottom,
                       float* __restrict__ out, int64_t Wo, int64_t C) {
  const int64_t c = kC > 0 ? kC : C;
  for (int64_t j = 0; j < Wo; ++j) {
    const float* t = top + 2 * j * c;
    const float* b = bottom + 2 * j * c;
    float* o = out + 4 * j * c;
    for (int64_t k = 0; k < c; ++k) {
      o[k] = t[k];
      o[c + k] = b[k];
      o[2 * c + k] = t[c + k];
      o[3 * c + k] = b[c + k];
    }
  }
}

}  // namespace

torch::Tensor space_to_depth(const torch::Tensor& x, bool bfloat16_out) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32,
              "space_to_depth: expected a 4-D float32 tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "space_to_depth: expected a channels_last tensor");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0, "space_to_depth: height and width must be even");
  const int64_t Ho = H / 2, Wo = W / 2, row_values = Wo * 4 * C;
  auto out = torch::empty({N, 4 * C, Ho, Wo},
                          x.options()
                              .dtype(bfloat16_out ? torch::kBFloat16 : torch::kFloat32)
                              .memory_format(at::MemoryFormat::ChannelsLast));
  const float* in = x.data_ptr<float>();
  void* dst = out.data_ptr();
  at::parallel_for(0, N * Ho, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> staging(bfloat16_out ? row_values : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / Ho, i = r % Ho;
      const float* top = in + (n * H + 2 * i) * W * C;
      const float* bottom = top + W * C;
      float* row = bfloat16_out ? staging.data() : static_cast<float*>(dst) + r * row_values;
      if (C == 3) {
        gather_row<3>(top, bottom, row, Wo, C);  // images: the case that matters
      } else {
        gather_row<0>(top, bottom, row, Wo, C);
      }
      if (bfloat16_out) {
        to_bfloat16(row, static_cast<uint16_t*>(dst) + r * row_values, row_values);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("space_to_depth", &space_to_depth,
        "2x2 space-to-depth (YOLOX Focus order) of a channels_last float32 batch");
}
