// YOLOX's HSV jitter of an 8-bit BGR image in one pass: OpenCV's 8-bit BGR -> HSV conversion,
// hue shifted modulo 180, saturation and value shifted with saturation at 0/255, OpenCV's
// 8-bit HSV -> BGR conversion. The reference does this as two cvtColor calls, a split, lookups
// and a merge: ~1 ms of a loader worker per 416 px image, 40% of the augmentation's time.
//
// Each step is OpenCV's arithmetic in OpenCV's order (forward: fixed-point division by its
// tables; back: float sector formula with two fused multiply-adds, truncated to 8 bits in its
// vector body and rounded in its scalar row tail — what opencv-python 5.1 computes, found by
// comparing every colour), so the pixels are the installed cv2's: augment.py checks them on a
// colour probe before it uses the kernel. Built without fast-math so the compiler keeps that
// rounding. Pixels go in blocks through two branch-free loops the compiler vectorises.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kHsvShift = 12;   // OpenCV's fixed-point scale of its division tables
constexpr int kHueRange = 180;  // 8-bit hue: degrees / 2
constexpr int kBlock = 256;

// OpenCV's division tables, round(255 * 4096 / v) and round(180 * 4096 / (6 * diff)), computed
// per pixel: float division rounds to the same integers for every index 1..255 (checked
// exhaustively; no quotient is within 0.0046 of a half), and arithmetic vectorises where a
// table lookup became scalar inserts (no gathers on this build).
inline int32_t saturation_divisor(int v) {
  return static_cast<int32_t>(static_cast<float>(255 << kHsvShift) /
                              static_cast<float>(std::max(v, 1)) + 0.5f);
}

inline int32_t hue_divisor(int diff) {
  return static_cast<int32_t>(static_cast<float>((kHueRange << kHsvShift) / 6) /
                              static_cast<float>(std::max(diff, 1)) + 0.5f);
}

// ``when ? a : b`` on the bits, branch-free.
inline float pick(bool when, float a, float b) {
  const int32_t mask = -static_cast<int32_t>(when);
  int32_t ia, ib;
  std::memcpy(&ia, &a, sizeof ia);
  std::memcpy(&ib, &b, sizeof ib);
  const int32_t bits = (ia & mask) | (ib & ~mask);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

template <bool kRound>
void jitter_block(const uint8_t* __restrict src, uint8_t* __restrict dst, int n, int dh, int ds,
                  int dv) {
  alignas(64) float hue[kBlock], sat[kBlock], val[kBlock];
  constexpr int half = 1 << (kHsvShift - 1);
  for (int i = 0; i < n; ++i) {
    const int b = src[3 * i], g = src[3 * i + 1], r = src[3 * i + 2];
    const int v = std::max(b, std::max(g, r));
    const int diff = v - std::min(b, std::min(g, r));
    const int s = (diff * saturation_divisor(v) + half) >> kHsvShift;
    int h = v == r ? g - b : (v == g ? b - r + 2 * diff : r - g + 4 * diff);
    h = (h * hue_divisor(diff) + half) >> kHsvShift;
    h += h < 0 ? kHueRange : 0;
    h += dh;  // dh in [0, 180): one wrap is enough
    h -= h >= kHueRange ? kHueRange : 0;
    hue[i] = static_cast<float>(h);
    sat[i] = static_cast<float>(std::min(255, std::max(0, s + ds))) * (1.f / 255.f);
    val[i] = static_cast<float>(std::min(255, std::max(0, v + dv))) * (1.f / 255.f);
  }
  const float hscale = 6.f / kHueRange;
  for (int i = 0; i < n; ++i) {
    const float s = sat[i], v = val[i];
    float h = hue[i] * hscale;  // in [0, 6): OpenCV's fmod and range check change nothing
    const float sector = static_cast<float>(static_cast<int>(h));  // h >= 0: floor
    h -= sector;
    // OpenCV's vector code: fused multiply-adds for the two hue-dependent terms.
    const float t0 = v;
    const float t1 = v * (1.f - s);
    const float t2 = v * std::fma(-s, h, 1.f);
    const float t3 = v * std::fma(-s, 1.f - h, 1.f);
    const int k = static_cast<int>(sector);
    // OpenCV's sector table {1,3,0} {1,0,2} {3,0,1} {0,2,1} {0,1,3} {2,1,0} as bitwise
    // selects (ternaries here became branches, and the loop stayed scalar); s == 0 makes
    // t0..t3 all v, OpenCV's grey case.
    float bf = t1, gf = t0, rf = t1;
    bf = pick(k == 2, t3, bf);
    bf = pick((k == 3) | (k == 4), t0, bf);
    bf = pick(k == 5, t2, bf);
    gf = pick(k == 0, t3, gf);
    gf = pick(k == 3, t2, gf);
    gf = pick(k >= 4, t1, gf);
    rf = pick((k == 0) | (k == 5), t0, rf);
    rf = pick(k == 1, t2, rf);
    rf = pick(k == 4, t3, rf);
    // OpenCV's vector body truncates, its scalar tail rounds (to nearest even).
    const float scaled[3] = {bf * 255.f, gf * 255.f, rf * 255.f};
    for (int c = 0; c < 3; ++c) {
      const float x = kRound ? std::nearbyint(scaled[c]) : scaled[c];
      dst[3 * i + c] = static_cast<uint8_t>(std::min(255, static_cast<int>(x)));
    }
  }
}

void jitter_run(const uint8_t* src, uint8_t* dst, int64_t pixels, bool round, int dh, int ds,
                int dv) {
  for (int64_t p = 0; p < pixels; p += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, pixels - p));
    if (round) {
      jitter_block<true>(src + 3 * p, dst + 3 * p, n, dh, ds, dv);
    } else {
      jitter_block<false>(src + 3 * p, dst + 3 * p, n, dh, ds, dv);
    }
  }
}

// ``image`` (uint8 [..., W, 3] BGR) jittered by (dh, ds, dv): a new array. OpenCV converts
// each row's first W - W % vector_pixels pixels with its vector code and the rest with its
// scalar code, which round differently: ``vector_pixels`` is the width of that vector code on
// this CPU (augment.py finds it). NumPy in and out: a read-only cached image needs no copy.
py::array_t<uint8_t> hsv_jitter(
    const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& image, int64_t dh,
    int64_t ds, int64_t dv, int64_t vector_pixels) {
  if (image.ndim() < 2 || image.shape(image.ndim() - 1) != 3 || vector_pixels < 1) {
    throw std::invalid_argument(
        "hsv_jitter: expected a uint8 [..., W, 3] BGR image and vector_pixels >= 1");
  }
  py::array_t<uint8_t> out(std::vector<py::ssize_t>(image.shape(), image.shape() + image.ndim()));
  const int64_t width = image.shape(image.ndim() - 2);
  const int64_t rows = width == 0 ? 0 : image.size() / (3 * width);
  const int64_t body = width / vector_pixels * vector_pixels;
  const int hue_shift = static_cast<int>(((dh % kHueRange) + kHueRange) % kHueRange);
  const int sat_shift = static_cast<int>(std::clamp<int64_t>(ds, -255, 255));
  const int val_shift = static_cast<int>(std::clamp<int64_t>(dv, -255, 255));
  const uint8_t* in = image.data();
  uint8_t* o = out.mutable_data();
  {
    py::gil_scoped_release unlocked;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t start = 3 * r * width;
      jitter_run(in + start, o + start, body, false, hue_shift, sat_shift, val_shift);
      jitter_run(in + start + 3 * body, o + start + 3 * body, width - body, true, hue_shift,
                 sat_shift, val_shift);
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hsv_jitter", &hsv_jitter, "YOLOX HSV jitter of an 8-bit BGR image (OpenCV arithmetic)");
}
