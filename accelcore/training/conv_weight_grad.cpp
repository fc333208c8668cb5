// Weight gradient of a dense (groups 1), stride-1, "same"-padded kxk convolution (k odd, 1x1
// included) on channels_last float32 CPU tensors, for CPUs with AVX2 + FMA.
//
// grad_w[o, c, i, j] = sum over n, y, x of grad_y[n, y, x, o] * x[n, y + i - p, x + j - p, c]
// (channels_last indexing, p = (k - 1) / 2). In channels_last memory the k * C inputs that tap
// row i sees at output pixel x are contiguous (x[n, y + i - p, x - p .. x + p, :]), so for every
// output row and tap row the sum is a product of a rows x O block of grad_y and a rows x kC
// block of the input whose rows overlap (row stride C, row length kC); a 1x1 convolution is one
// such product over all pixels. Each is accumulated as 8-wide FMA outer products, 16 outputs
// x up to 6 inputs in twelve registers, grad_y read with vector loads and the input broadcast.
// Why: oneDNN's weight gradient of yolox_nano's 1x1 convolutions ran at 77-141 GFLOP/s on a
// 2-core Zen 3 against 150-180 for their forward and input gradient, and of its 3x3 stem at 91
// against 182 forward.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <immintrin.h>

namespace {

constexpr int64_t kRowBlock = 128;  // grad_y rows per pass over the output tiles (1x1)

// acc[j * ld + v * 8 ...] += sum over r < rows of g[r * ldg + v * 8 ...] * x[r * ldx + j],
// for j < NR input columns and NV vectors of 8 outputs.
template <int NV, int NR>
inline void tile(const float* g, int64_t ldg, const float* x, int64_t ldx, int64_t rows,
                 float* acc, int64_t ld) {
  // One flat array, every loop over it fully unrolled: with a 2-D array GCC kept the
  // accumulators in memory (a store per FMA).
  __m256 c[NR * NV];
#pragma GCC unroll 12
  for (int e = 0; e < NR * NV; ++e) c[e] = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * ldg;
    const float* xr = x + r * ldx;
    const __m256 g0 = _mm256_loadu_ps(gr);
    const __m256 g1 = NV > 1 ? _mm256_loadu_ps(gr + 8) : g0;
#pragma GCC unroll 6
    for (int j = 0; j < NR; ++j) {
      const __m256 b = _mm256_broadcast_ss(xr + j);
      c[j * NV] = _mm256_fmadd_ps(g0, b, c[j * NV]);
      if (NV > 1) c[j * NV + 1] = _mm256_fmadd_ps(g1, b, c[j * NV + 1]);
    }
  }
#pragma GCC unroll 6
  for (int j = 0; j < NR; ++j) {
    float* a = acc + j * ld;
    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), c[j * NV]));
    if (NV > 1) _mm256_storeu_ps(a + 8, _mm256_add_ps(_mm256_loadu_ps(a + 8), c[j * NV + 1]));
  }
}

template <int NV>
inline void tile_columns(const float* g, int64_t ldg, const float* x, int64_t ldx, int64_t rows,
                         int columns, float* acc, int64_t ld) {
  switch (columns) {
    case 6: tile<NV, 6>(g, ldg, x, ldx, rows, acc, ld); break;
    case 5: tile<NV, 5>(g, ldg, x, ldx, rows, acc, ld); break;
    case 4: tile<NV, 4>(g, ldg, x, ldx, rows, acc, ld); break;
    case 3: tile<NV, 3>(g, ldg, x, ldx, rows, acc, ld); break;
    case 2: tile<NV, 2>(g, ldg, x, ldx, rows, acc, ld); break;
    default: tile<NV, 1>(g, ldg, x, ldx, rows, acc, ld); break;
  }
}

// acc[kk][o] += sum over r < rows of g[r * ldg + o] * x[r * ldx + kk], kk < cols, o < outs.
// The grad_y tile (rows x 16) stays in L1 while every input column block passes over it.
void panel(const float* g, int64_t ldg, const float* x, int64_t ldx, int64_t rows, int64_t cols,
           int64_t outs, float* acc) {
  if (rows <= 0) return;
  for (int64_t o = 0; o < outs; o += 16) {
    const bool wide = o + 16 <= outs;  // outs is a multiple of 8
    for (int64_t kk = 0; kk < cols; kk += 6) {
      const int n = static_cast<int>(std::min<int64_t>(6, cols - kk));
      if (wide)
        tile_columns<2>(g + o, ldg, x + kk, ldx, rows, n, acc + kk * outs + o, outs);
      else
        tile_columns<1>(g + o, ldg, x + kk, ldx, rows, n, acc + kk * outs + o, outs);
    }
  }
}

// The taps an output pixel too close to the left or right edge sees (scalar; 2p columns a row).
void edge_pixel(const float* g, const float* xrow, int64_t w, int64_t width, int64_t k,
                int64_t pad, int64_t channels, int64_t outs, float* acc) {
  for (int64_t j = 0; j < k; ++j) {
    const int64_t col = w + j - pad;
    if (col < 0 || col >= width) continue;
    const float* xp = xrow + col * channels;
    for (int64_t c = 0; c < channels; ++c) {
      float* a = acc + (j * channels + c) * outs;
      const float xv = xp[c];
      for (int64_t o = 0; o < outs; ++o) a[o] += g[o] * xv;
    }
  }
}

// panel() for a block of whole pixels (1x1) with 64+ input and output channels, grad_y and
// the input first copied into contiguous tiles (16 outputs / 6 inputs wide, rows in order) so
// that each tile pair streams through L1. Read in place, a block's rows lie a power of two apart
// (256 bytes at 64 channels), its grad_y and input rows fall into the same few L1 sets, and the
// block spills to L2. One core of a Zen 3, GFLOP/s in place / packed: 64 -> 64 channels 58 / 72,
// 128 -> 128 58 / 82; but 32 -> 32 65 / 54, 16 -> 16 47 / 35 (the copies cost more than the
// reads they save), so smaller blocks are read in place.
constexpr int64_t kPackFrom = 64;
constexpr int64_t kInputTile = 6;

int64_t input_tile_stride(int64_t rows) { return rows * kInputTile + 8; }  // 8: see below

void packed_panel(const float* g, const float* x, int64_t rows, int64_t channels, int64_t outs,
                  float* acc, std::vector<float>& gpack, std::vector<float>& xpack) {
  const int64_t xstride = input_tile_stride(rows);
  gpack.resize(static_cast<size_t>(rows * outs));
  xpack.resize(static_cast<size_t>((channels + kInputTile - 1) / kInputTile * xstride));
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * outs;
    for (int64_t o = 0; o < outs; o += 16) {  // tile o: rows x 16 (x 8 at the tail)
      const int64_t width = std::min<int64_t>(16, outs - o);
      float* dst = gpack.data() + rows * o + r * width;
      _mm256_storeu_ps(dst, _mm256_loadu_ps(gr + o));
      if (width == 16) _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(gr + o + 8));
    }
    const float* xr = x + r * channels;
    for (int64_t kk = 0; kk < channels; kk += kInputTile) {  // tile kk: rows x n
      const int64_t n = std::min<int64_t>(kInputTile, channels - kk);
      float* dst = xpack.data() + kk / kInputTile * xstride + r * n;
      // 8 floats for 6: the 2 extra land where the next row goes (written after) or, for the
      // last row, in the tile's 8 floats of padding.
      if (kk + 8 <= channels)
        _mm256_storeu_ps(dst, _mm256_loadu_ps(xr + kk));
      else
        std::copy_n(xr + kk, n, dst);
    }
  }
  for (int64_t o = 0; o < outs; o += 16) {
    const float* gt = gpack.data() + rows * o;
    for (int64_t kk = 0; kk < channels; kk += kInputTile) {
      const int n = static_cast<int>(std::min<int64_t>(kInputTile, channels - kk));
      const float* xt = xpack.data() + kk / kInputTile * xstride;
      if (o + 16 <= outs)
        tile_columns<2>(gt, 16, xt, n, rows, n, acc + kk * outs + o, outs);
      else
        tile_columns<1>(gt, 8, xt, n, rows, n, acc + kk * outs + o, outs);
    }
  }
}

}  // namespace

at::Tensor weight_grad(const at::Tensor& grad_y, const at::Tensor& x, int64_t k) {
  TORCH_CHECK(grad_y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "weight_grad: float32 tensors only");
  TORCH_CHECK(grad_y.dim() == 4 && x.dim() == 4 && k % 2 == 1 && k >= 1, "weight_grad: shapes");
  TORCH_CHECK(grad_y.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "weight_grad: channels_last tensors only");
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t outs = grad_y.size(1);
  TORCH_CHECK(grad_y.size(0) == batch && grad_y.size(2) == height && grad_y.size(3) == width,
              "weight_grad: stride 1, same padding: grad_y and x share batch, height, width");
  TORCH_CHECK(outs % 8 == 0, "weight_grad: output channels must be a multiple of 8");
  const int64_t pad = (k - 1) / 2, cols = k * channels, per_tap_row = cols * outs;
  const float* gp = grad_y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();

  const int threads = std::max(1, at::get_num_threads());
  std::vector<float> partial(static_cast<size_t>(threads) * k * per_tap_row, 0.0f);
  const int64_t rows_total = batch * height;  // output rows (n, y)
  // 1x1: blocks of pixels; kxk: one output row per item.
  const int64_t items = k == 1 ? (rows_total * width + kRowBlock - 1) / kRowBlock : rows_total;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    float* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * k * per_tap_row;
    std::vector<float> gpack, xpack;
    for (int64_t item = begin; item < end; ++item) {
      if (k == 1) {
        const int64_t first = item * kRowBlock;
        const int64_t rows = std::min(kRowBlock, rows_total * width - first);
        if (outs >= kPackFrom && channels >= kPackFrom)
          packed_panel(gp + first * outs, xp + first * channels, rows, channels, outs, acc,
                       gpack, xpack);
        else
          panel(gp + first * outs, outs, xp + first * channels, channels, rows, channels, outs,
                acc);
        continue;
      }
      const int64_t n = item / height, y = item % height;
      const float* grow = gp + (n * height + y) * width * outs;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t iy = y + i - pad;
        if (iy < 0 || iy >= height) continue;  // zero padding above and below
        const float* xrow = xp + (n * height + iy) * width * channels;
        float* acc_i = acc + i * per_tap_row;
        const int64_t inner_end = std::max(pad, width - pad);
        panel(grow + pad * outs, outs, xrow, channels, inner_end - pad, cols, outs, acc_i);
        for (int64_t w = 0; w < std::min(pad, width); ++w)
          edge_pixel(grow + w * outs, xrow, w, width, k, pad, channels, outs, acc_i);
        for (int64_t w = inner_end; w < width; ++w)
          edge_pixel(grow + w * outs, xrow, w, width, k, pad, channels, outs, acc_i);
      }
    }
  });

  for (int t = 1; t < threads; ++t) {
    const float* src = partial.data() + static_cast<size_t>(t) * k * per_tap_row;
    for (int64_t e = 0; e < k * per_tap_row; ++e) partial[e] += src[e];
  }
  // partial[i][j * C + c][o] -> grad_w[o][c][i][j]
  at::Tensor out = at::empty({outs, channels, k, k}, x.options());
  float* op = out.data_ptr<float>();
  for (int64_t o = 0; o < outs; ++o)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j)
          op[((o * channels + c) * k + i) * k + j] =
              partial[i * per_tap_row + (j * channels + c) * outs + o];
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weight_grad", &weight_grad,
        "weight gradient of a dense stride-1 same-padded kxk convolution, channels_last float32",
        py::arg("grad_y"), py::arg("x"), py::arg("k"));
}
