// Fused CPU kernels for MirrorLA's per-sample step (mirrorla/ops/fused.py calls them; mirrorla/backend.py builds this file with
// torch.utils.cpp_extension and falls back to the pure-PyTorch reference when it cannot be built).
//
// Eager PyTorch needs separate passes over memory for "rotate the channel pairs" and "ReLU" (and two for
// the token moments); these kernels do each in one pass, so the map costs about what ReLU costs plus one
// read of the keys for the variance statistic (docs/benchmarks.md).
//
// Layout: x is [B, H, N, d] with a unit stride on d (any strides elsewhere); angles are given as cos and
// sin [Ba, H, d/2] with Ba = 1 (shared) or B. Pair i is channels (2i, 2i+1) ("adjacent") or (i, i + d/2)
// ("half"). Accumulation is in the op-math type (fp32 for fp16/bf16/fp32, fp64 for fp64).

#if !defined(MIRRORLA_DELTA_TANH_LOG) || !defined(MIRRORLA_DELTA_LOG) || !defined(MIRRORLA_DELTA_RSQRT)
#error "build through mirrorla.backend, which defines the MIRRORLA_DELTA_* codes"
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kTokenChunk = 512;  // tokens per task of the reductions: a task's partial sums stay in L1

struct Layout {
  int64_t B, H, N, d, half;
  int64_t sb, sh, sn;  // strides of x in elements
  int64_t angle_batch;  // 1 or B
};

Layout check(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must have rank 4 ([B, H, N, d]), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU");
  TORCH_CHECK(x.size(3) % 2 == 0, op, ": x must have an even last dimension, got ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1, op, ": x must have a unit stride on its last dimension");
  Layout l{x.size(0), x.size(1), x.size(2), x.size(3), x.size(3) / 2, x.stride(0), x.stride(1), x.stride(2), 1};
  if (cos.defined()) {
    TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.size(1) == l.H && cos.size(2) == l.half &&
                    (cos.size(0) == 1 || cos.size(0) == l.B),
                op, ": cos and sin must be [1 or B, H, d/2] = [1 or ", l.B, ", ", l.H, ", ", l.half, "], got ",
                cos.sizes(), " and ", sin.sizes());
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), op, ": cos and sin must be contiguous");
    l.angle_batch = cos.size(0);
  }
  return l;
}

inline int64_t partner_offset(bool half, int64_t i, int64_t half_d) { return half ? i + half_d : 2 * i + 1; }
inline int64_t first_offset(bool half, int64_t i) { return half ? i : 2 * i; }

// Per-channel coefficients of the rotation, so that y[j] = cc[j]·x[j] + ss[j]·x[partner(j)] has no
// per-pair branching: for pair (i0, i1), cc = (c, c) and ss = (−s, s).
template <typename opmath_t>
void pair_coefficients(const opmath_t* c, const opmath_t* s, bool half, int64_t half_d, opmath_t* cc,
                       opmath_t* ss) {
  for (int64_t i = 0; i < half_d; ++i) {
    const int64_t i0 = first_offset(half, i), i1 = partner_offset(half, i, half_d);
    cc[i0] = c[i];
    cc[i1] = c[i];
    ss[i0] = -s[i];
    ss[i1] = s[i];
  }
}

// Fixed-width lanes: loops of a compile-time length with a constant shuffle (t ^ 1) are what compilers
// turn into SIMD code; a plain loop over interleaved pairs stays scalar.
constexpr int64_t kLanes = 16;

template <typename opmath_t>
inline opmath_t relu(opmath_t v) { return v > opmath_t(0) ? v : opmath_t(0); }

// out[j] = ReLU(y[j]) with y = R x for one token; x in its storage type, the rest in op-math.
template <bool half, typename scalar_t, typename opmath_t>
inline void rotate_relu_row(const scalar_t* __restrict__ x, const opmath_t* __restrict__ cc,
                            const opmath_t* __restrict__ ss, opmath_t* __restrict__ out, int64_t d) {
  if constexpr (half) {
    const int64_t h = d / 2;
    for (int64_t j = 0; j < h; ++j) {
      const opmath_t x0 = static_cast<opmath_t>(x[j]), x1 = static_cast<opmath_t>(x[j + h]);
      out[j] = relu(cc[j] * x0 + ss[j] * x1);
      out[j + h] = relu(cc[j + h] * x1 + ss[j + h] * x0);
    }
    return;
  }
  int64_t j0 = 0;
  for (; j0 + kLanes <= d; j0 += kLanes) {
    opmath_t xv[kLanes], sw[kLanes];
    for (int64_t t = 0; t < kLanes; ++t) xv[t] = static_cast<opmath_t>(x[j0 + t]);
    for (int64_t t = 0; t < kLanes; ++t) sw[t] = xv[t ^ 1];
    for (int64_t t = 0; t < kLanes; ++t) out[j0 + t] = relu(cc[j0 + t] * xv[t] + ss[j0 + t] * sw[t]);
  }
  for (int64_t j = j0; j < d; ++j) {
    out[j] = relu(cc[j] * static_cast<opmath_t>(x[j]) + ss[j] * static_cast<opmath_t>(x[j ^ 1]));
  }
}

// ReLU(R x) for the flat token rows [begin, end) of x (row r = (b·H + h)·N + n), into the contiguous out.
// Serial: callers split the rows across threads.
template <typename scalar_t, typename opmath_t>
void rotate_relu_rows(const scalar_t* xp, const Layout& l, const opmath_t* cp, const opmath_t* sp, bool half,
                      opmath_t* op, int64_t begin, int64_t end) {
  std::vector<opmath_t> coef(static_cast<size_t>(2 * l.d));
  const opmath_t* cc = coef.data();
  const opmath_t* ss = coef.data() + l.d;
  for (int64_t r = begin; r < end;) {
    const int64_t bh = r / l.N, b = bh / l.H, h = bh % l.H, n0 = r % l.N, n1 = std::min(l.N, n0 + (end - r));
    const int64_t a_off = ((l.angle_batch == 1 ? 0 : b) * l.H + h) * l.half;
    pair_coefficients(cp + a_off, sp + a_off, half, l.half, coef.data(), coef.data() + l.d);
    const scalar_t* xr = xp + b * l.sb + h * l.sh + n0 * l.sn;
    opmath_t* o = op + r * l.d;
    if (half) {
      for (int64_t n = n0; n < n1; ++n, xr += l.sn, o += l.d) rotate_relu_row<true>(xr, cc, ss, o, l.d);
    } else {
      for (int64_t n = n0; n < n1; ++n, xr += l.sn, o += l.d) rotate_relu_row<false>(xr, cc, ss, o, l.d);
    }
    r += n1 - n0;
  }
}

constexpr int64_t kRowGrain = 2048;  // token rows per thread task at least: fewer would cost more to schedule

// out = ReLU(R(angle) x), contiguous, in the op-math type.
at::Tensor rotate_relu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool half) {
  const Layout l = check(x, cos, sin, "rotate_relu");
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(cos.scalar_type() == acc && sin.scalar_type() == acc, "rotate_relu: cos and sin must be ", acc);
  at::Tensor out = at::empty({l.B, l.H, l.N, l.d}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotate_relu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const opmath_t* cp = cos.const_data_ptr<opmath_t>();
    const opmath_t* sp = sin.const_data_ptr<opmath_t>();
    opmath_t* op = out.mutable_data_ptr<opmath_t>();
    at::parallel_for(0, l.B * l.H * l.N, kRowGrain, [&](int64_t begin, int64_t end) {
      rotate_relu_rows<scalar_t, opmath_t>(xp, l, cp, sp, half, op, begin, end);
    });
  });
  return out;
}

// Sum per task (bh, token chunk) into partials [tasks, width]; then combine each bh's tasks in double.
template <typename opmath_t, typename Fn>
void chunked_token_reduce(const Layout& l, int64_t width, opmath_t* result, Fn&& accumulate) {
  const int64_t chunks = (l.N + kTokenChunk - 1) / kTokenChunk;
  const int64_t tasks = l.B * l.H * chunks;
  std::vector<opmath_t> partial(static_cast<size_t>(tasks * width), opmath_t(0));
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / chunks, chunk = t % chunks;
      const int64_t n0 = chunk * kTokenChunk, n1 = std::min(l.N, n0 + kTokenChunk);
      accumulate(bh / l.H, bh % l.H, n0, n1, partial.data() + t * width);
    }
  });
  for (int64_t bh = 0; bh < l.B * l.H; ++bh) {
    for (int64_t j = 0; j < width; ++j) {
      double total = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[(bh * chunks + chunk) * width + j];
      result[bh * width + j] = static_cast<opmath_t>(total);
    }
  }
}

// The backward of out = ReLU(R x) for one token: dx = Rᵀ(g ⊙ [y > 0]) in x's storage type, and into dpair[i]
// pair i's term of its angle's gradient, g'₁·y₀ − g'₀·y₁ (g' = g ⊙ [y > 0]; dy₀/dα = −y₁, dy₁/dα = y₀). y is
// recomputed from x, so the forward saves nothing but x. A loop over pairs, both pairings alike.
template <bool half, typename scalar_t, typename opmath_t>
inline void rotate_relu_backward_row(const scalar_t* __restrict__ x, const opmath_t* __restrict__ g,
                                     const opmath_t* __restrict__ cc, const opmath_t* __restrict__ ss,
                                     scalar_t* __restrict__ dx, opmath_t* __restrict__ dpair, int64_t half_d) {
  for (int64_t i = 0; i < half_d; ++i) {
    const int64_t j0 = half ? i : 2 * i, j1 = half ? i + half_d : 2 * i + 1;
    const opmath_t x0 = static_cast<opmath_t>(x[j0]), x1 = static_cast<opmath_t>(x[j1]);
    const opmath_t y0 = cc[j0] * x0 + ss[j0] * x1, y1 = cc[j1] * x1 + ss[j1] * x0;
    // both gradients loaded whatever the ReLU does: a load under the condition compiled to a branch per channel,
    // which random signs mispredict half the time (3 ns per channel, 10x the half pairing's vector code)
    const opmath_t gv0 = g[j0], gv1 = g[j1];
    const opmath_t g0 = y0 > opmath_t(0) ? gv0 : opmath_t(0), g1 = y1 > opmath_t(0) ? gv1 : opmath_t(0);
    dx[j0] = static_cast<scalar_t>(cc[j0] * g0 - ss[j0] * g1);
    dx[j1] = static_cast<scalar_t>(cc[j1] * g1 - ss[j1] * g0);
    dpair[i] += g1 * y0 - g0 * y1;
  }
}

// Backward of rotate_relu: dx [B, H, N, d] (x's dtype and order of dimensions) and the angles' gradient per sample
// [B, H, d/2] (op-math type; the caller sums it over B where the angles are shared). grad is the gradient of
// rotate_relu's output: contiguous, op-math type. One pass over x and grad; the sums over tokens in a fixed order.
std::tuple<at::Tensor, at::Tensor> rotate_relu_backward(const at::Tensor& x, const at::Tensor& grad,
                                                        const at::Tensor& cos, const at::Tensor& sin, bool half) {
  const Layout l = check(x, cos, sin, "rotate_relu_backward");
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(cos.scalar_type() == acc && sin.scalar_type() == acc, "rotate_relu_backward: cos and sin must be ",
              acc);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == acc && grad.is_contiguous(),
              "rotate_relu_backward: grad must be a contiguous ", acc, " tensor of x's shape ", x.sizes(), ", got ",
              grad.scalar_type(), " ", grad.sizes());
  // dx dense in x's order of dimensions, as autograd's element-wise backward (the reference's) lays it out: for x a
  // view of a [B, N, 3, H, d] qkv projection, [B, N, H, d] order, the projection's gradient's own
  at::Tensor dx = at::empty_like(x);
  TORCH_CHECK(dx.stride(3) == 1, "rotate_relu_backward: dx must have a unit stride on its last dimension");
  const int64_t db = dx.stride(0), dh = dx.stride(1), dn = dx.stride(2);
  at::Tensor dangle = at::empty({l.B, l.H, l.half}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotate_relu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const opmath_t* gp = grad.const_data_ptr<opmath_t>();
    const opmath_t* cp = cos.const_data_ptr<opmath_t>();
    const opmath_t* sp = sin.const_data_ptr<opmath_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    chunked_token_reduce<opmath_t>(l, l.half, dangle.mutable_data_ptr<opmath_t>(),
        [&](int64_t b, int64_t h, int64_t n0, int64_t n1, opmath_t* dpair) {
          std::vector<opmath_t> coef(static_cast<size_t>(2 * l.d));
          const int64_t a_off = ((l.angle_batch == 1 ? 0 : b) * l.H + h) * l.half;
          pair_coefficients(cp + a_off, sp + a_off, half, l.half, coef.data(), coef.data() + l.d);
          const opmath_t* cc = coef.data();
          const opmath_t* ss = coef.data() + l.d;
          const scalar_t* xr = xp + b * l.sb + h * l.sh + n0 * l.sn;
          const opmath_t* gr = gp + ((b * l.H + h) * l.N + n0) * l.d;
          scalar_t* dxr = dxp + b * db + h * dh + n0 * dn;
          if (half) {
            for (int64_t n = n0; n < n1; ++n, xr += l.sn, gr += l.d, dxr += dn)
              rotate_relu_backward_row<true>(xr, gr, cc, ss, dxr, dpair, l.half);
          } else {
            for (int64_t n = n0; n < n1; ++n, xr += l.sn, gr += l.d, dxr += dn)
              rotate_relu_backward_row<false>(xr, gr, cc, ss, dxr, dpair, l.half);
          }
        });
  });
  return {dx, dangle};
}

// Per-channel sum and sum of squares over the tokens of x into sums [B·H, 2, d], one pass over x.
template <typename scalar_t, typename opmath_t>
void token_sums_into(const at::Tensor& x, const Layout& l, opmath_t* result) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  chunked_token_reduce<opmath_t>(l, 2 * l.d, result,
      [&](int64_t b, int64_t h, int64_t n0, int64_t n1, opmath_t* sums) {
        // a lane of channels held in registers across the tokens of the chunk
        for (int64_t j0 = 0; j0 < l.d; j0 += kLanes) {
          const int64_t width = std::min(kLanes, l.d - j0);
          opmath_t s1[kLanes] = {}, s2[kLanes] = {};
          if (width == kLanes) {
            for (int64_t n = n0; n < n1; ++n) {
              const scalar_t* __restrict__ xr = xp + b * l.sb + h * l.sh + n * l.sn + j0;
              for (int64_t t = 0; t < kLanes; ++t) {
                const opmath_t v = static_cast<opmath_t>(xr[t]);
                s1[t] += v;
                s2[t] += v * v;
              }
            }
          } else {
            for (int64_t n = n0; n < n1; ++n) {
              const scalar_t* xr = xp + b * l.sb + h * l.sh + n * l.sn + j0;
              for (int64_t t = 0; t < width; ++t) {
                const opmath_t v = static_cast<opmath_t>(xr[t]);
                s1[t] += v;
                s2[t] += v * v;
              }
            }
          }
          for (int64_t t = 0; t < width; ++t) {
            sums[j0 + t] = s1[t];
            sums[l.d + j0 + t] = s2[t];
          }
        }
      });
}

// Per-channel sum and sum of squares over tokens: [B, H, 2, d] (op-math type).
at::Tensor token_sums(const at::Tensor& x) {
  const Layout l = check(x, at::Tensor(), at::Tensor(), "token_sums");
  at::Tensor out = at::empty({l.B, l.H, 2, l.d}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_sums", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    token_sums_into<scalar_t, opmath_t>(x, l, out.mutable_data_ptr<opmath_t>());
  });
  return out;
}

// The whole per-sample step of the folded MirrorLA map (mirrorla.ops.folded_mirror_map), for inference:
// σ² of the unfolded keys from the folded keys' token sums, Θ = θ + Δα(σ²), then ReLU(R(2Θ)·) on q and k.
// delta_form: the codes of mirrorla.backend.DELTA_FORM_CODES, handed to the build as MIRRORLA_DELTA_* macros:
// TANH_LOG = γ·tanh(log(σ² + ε)), LOG = γ·log(σ² + ε), RSQRT = γ/√(σ² + ε) (mirrorla.ops.DELTA_FORMS).
std::tuple<at::Tensor, at::Tensor> folded_mirror_map(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& theta, const at::Tensor& gamma, double eps,
                                                     int64_t delta_form, bool half) {
  const Layout lk = check(k, at::Tensor(), at::Tensor(), "folded_mirror_map (k)");
  Layout lq = check(q, at::Tensor(), at::Tensor(), "folded_mirror_map (q)");
  TORCH_CHECK(q.size(0) == lk.B && q.size(1) == lk.H && q.size(3) == lk.d && q.scalar_type() == k.scalar_type(),
              "folded_mirror_map: q and k must share batch, heads, head dim and dtype, got ", q.sizes(), " and ",
              k.sizes());
  const auto acc = at::toOpMathType(k.scalar_type());
  TORCH_CHECK(theta.sizes() == gamma.sizes() && theta.dim() == 2 && theta.size(0) == lk.H &&
                  theta.size(1) == lk.half && theta.scalar_type() == acc && gamma.scalar_type() == acc &&
                  theta.is_contiguous() && gamma.is_contiguous(),
              "folded_mirror_map: theta and gamma must be contiguous ", acc, " [H, d/2] = [", lk.H, ", ", lk.half,
              "]");
  TORCH_CHECK(delta_form == MIRRORLA_DELTA_TANH_LOG || delta_form == MIRRORLA_DELTA_LOG ||
                  delta_form == MIRRORLA_DELTA_RSQRT,
              "folded_mirror_map: unknown delta_form code ", delta_form);
  at::Tensor out_q = at::empty({lq.B, lq.H, lq.N, lq.d}, q.options().dtype(acc));
  at::Tensor out_k = at::empty({lk.B, lk.H, lk.N, lk.d}, k.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "folded_mirror_map", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const int64_t BH = lk.B * lk.H;
    std::vector<opmath_t> sums(static_cast<size_t>(BH * 2 * lk.d));
    token_sums_into<scalar_t, opmath_t>(k, lk, sums.data());
    std::vector<opmath_t> cos(static_cast<size_t>(BH * lk.half)), sin(cos.size());
    const opmath_t* th = theta.const_data_ptr<opmath_t>();
    const opmath_t* ga = gamma.const_data_ptr<opmath_t>();
    const opmath_t inv_n = opmath_t(1) / static_cast<opmath_t>(lk.N);
    for (int64_t bh = 0; bh < BH; ++bh) {
      const opmath_t* s1 = sums.data() + bh * 2 * lk.d;
      const opmath_t* s2 = s1 + lk.d;
      for (int64_t i = 0; i < lk.half; ++i) {
        const int64_t i0 = first_offset(half, i), i1 = partner_offset(half, i, lk.half);
        // H(0) negated the first channel of the pair: the unfolded block mean is (m₁ − m₀)/2
        const opmath_t diff = (s1[i1] - s1[i0]) * inv_n;
        const opmath_t var = std::max(opmath_t(0.5) * ((s2[i0] + s2[i1]) * inv_n - opmath_t(0.5) * diff * diff),
                                      opmath_t(0));
        const opmath_t shifted = var + static_cast<opmath_t>(eps);
        const opmath_t g = ga[(bh % lk.H) * lk.half + i];
        const opmath_t delta = delta_form == MIRRORLA_DELTA_TANH_LOG ? g * std::tanh(std::log(shifted))
                               : delta_form == MIRRORLA_DELTA_LOG    ? g * std::log(shifted)
                                                                     : g / std::sqrt(shifted);
        const opmath_t angle = opmath_t(2) * (th[(bh % lk.H) * lk.half + i] + delta);
        cos[bh * lk.half + i] = std::cos(angle);
        sin[bh * lk.half + i] = std::sin(angle);
      }
    }
    lq.angle_batch = lk.B;
    Layout lk_rot = lk;
    lk_rot.angle_batch = lk.B;
    // q and k in one parallel region, each thread taking the same share of both: a thread then writes the
    // parts of φ(q) and φ(k) that the core's matmuls (split the same way) read on its own core, and the k
    // rows it rotates are the ones it has just summed (still in its cache)
    const int64_t rows_q = lq.B * lq.H * lq.N, rows_k = lk.B * lk.H * lk.N, rows = std::max(rows_q, rows_k);
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    opmath_t* oq = out_q.mutable_data_ptr<opmath_t>();
    opmath_t* ok = out_k.mutable_data_ptr<opmath_t>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      rotate_relu_rows<scalar_t, opmath_t>(qp, lq, cos.data(), sin.data(), half, oq, begin * rows_q / rows,
                                           end * rows_q / rows);
      rotate_relu_rows<scalar_t, opmath_t>(kp, lk_rot, cos.data(), sin.data(), half, ok, begin * rows_k / rows,
                                           end * rows_k / rows);
    });
  });
  return {out_q, out_k};
}

}  // namespace

TORCH_LIBRARY(mirrorla_cpu, m) {
  m.def("rotate_relu(Tensor x, Tensor cos, Tensor sin, bool half) -> Tensor");
  m.def("rotate_relu_backward(Tensor x, Tensor grad, Tensor cos, Tensor sin, bool half) -> (Tensor, Tensor)");
  m.def("token_sums(Tensor x) -> Tensor");
  m.def("folded_mirror_map(Tensor q, Tensor k, Tensor theta, Tensor gamma, float eps, int delta_form, bool half) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mirrorla_cpu, CPU, m) {
  m.impl("rotate_relu", &rotate_relu);
  m.impl("rotate_relu_backward", &rotate_relu_backward);
  m.impl("token_sums", &token_sums);
  m.impl("folded_mirror_map", &folded_mirror_map);
}
