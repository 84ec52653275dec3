// Causal self-attention with key padding on the CPU: the forward and flash attention's backward
// (Dao et al. 2022) as XLA FFI custom calls. Built on first use by ava_jax/kernels/build.py; the
// JAX side, its layout and its tests are in ava_jax/kernels/cpu_attention.py.
//
// Layout (heads-major, as models/attention.py's XLA kernel): q [B, K, G, T, H] already scaled,
// k and v [B, K, T, H], key_valid [B, T]; the G query heads of a key/value head share its keys.
// Query row t attends to keys j <= t that are real, and always to itself (a padding query's row is
// never empty). Scores, softmax and products are float32; a softmax is exact over its row (no
// online rescaling), so values agree with the XLA kernel to float32 rounding.
//
// Why a custom call: on this backend XLA runs attention as separate products and elementwise
// passes over every query block's scores, and for small head dims (TinyStories-260K: 8) those
// passes, not the FLOPs, are the cost. Here each query row's scores live in a buffer the size of
// one row, and R rows go together so each key vector loaded serves R accumulators.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNeg = -1e30f;  // a masked score; exp(kNeg - m) is exactly 0
constexpr int R = 4;            // query rows per micro-block (AccumulateT is written for 4)
constexpr int64_t kVec = 16;    // key loops run over multiples of 16 (one 512-bit vector)

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Runs fn(i) for i in [0, n) on the calling thread and on XLA's intra-op pool. The caller waits
// for the items, never for a helper to start: a helper that starts late finds no item left and
// touches only the shared state, so a pool busy with other work cannot deadlock the call.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  std::function<void(int64_t)> fn;
  std::mutex mu;
  std::condition_variable cv;

  void Run() {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      fn(i);
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
  auto work = std::make_shared<Work>();
  work->n = n;
  work->fn = std::move(fn);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->n; });
}

// exp(x) for x <= 0: Cephes' expf (Cody-Waite reduction, degree-6 polynomial, 2^k through the
// exponent bits), inline so that it vectorises with the loops that call it; 0 below -87.
inline float Exp(float x) {
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t e = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &e, sizeof two_k);  // a bit cast any C++17 compiler takes (and vectorises)
  const float y = p * two_k;
  return x < -87.f ? 0.f : y;
}

// x [T, H] -> xT [H, S], S >= T; the columns past T keep their zeros.
void Transpose(const float* x, int64_t T, int64_t H, int64_t S, float* xT) {
  for (int64_t j = 0; j < T; ++j)
    for (int64_t h = 0; h < H; ++h) xT[h * S + j] = x[j * H + h];
}

// 0 for a real key, kNeg for a padding key or a column past T.
void Bias(const bool* valid, int64_t T, int64_t S, float* bias) {
  for (int64_t j = 0; j < S; ++j) bias[j] = j < T && valid[j] ? 0.f : kNeg;
}

// Rows [t0, t0 + R) of x [T, H] into xb [R, H], zeros past T.
void CopyRows(const float* x, int64_t t0, int64_t T, int64_t H, float* xb) {
  for (int r = 0; r < R; ++r)
    for (int64_t h = 0; h < H; ++h) xb[r * H + h] = t0 + r < T ? x[(t0 + r) * H + h] : 0.f;
}

// s[r][j] = init[j] + x_r . xT[:, j] for r < R and j < n: vectorised over j, h unrolled.
template <int H>
inline void RowsTimesT(const float* __restrict x, const float* __restrict xT,
                       const float* __restrict init, int64_t n, int64_t S, float* __restrict s) {
  for (int64_t j = 0; j < n; ++j) {
    float acc[R];
    for (int r = 0; r < R; ++r) acc[r] = init ? init[j] : 0.f;
    for (int h = 0; h < H; ++h) {
      const float kv = xT[h * S + j];
      for (int r = 0; r < R; ++r) acc[r] += x[r * H + h] * kv;
    }
    for (int r = 0; r < R; ++r) s[r * S + j] = acc[r];
  }
}

// out[r] = sum_j s[r][j] xT[h][j] for each h: out [R, H].
template <int H>
inline void RowsTimes(const float* __restrict s, const float* __restrict xT, int64_t n, int64_t S,
                      float* __restrict out) {
  for (int h = 0; h < H; ++h) {
    const float* __restrict xh = xT + h * S;
    float acc[R] = {};
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < R; ++r) acc[r] += s[r * S + j] * xh[j];
    for (int r = 0; r < R; ++r) out[r * H + h] = acc[r];
  }
}

// acc[j] += sum_r c[r] x[r][j] for j < n.
inline void AccumulateT(const float* __restrict c, const float* __restrict x, int64_t n, int64_t S,
                        float* __restrict acc) {
  const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
  const float *x0 = x, *x1 = x + S, *x2 = x + 2 * S, *x3 = x + 3 * S;
  for (int64_t j = 0; j < n; ++j) acc[j] += c0 * x0[j] + c1 * x1[j] + c2 * x2[j] + c3 * x3[j];
}

// max_j s[j] for j < n (a multiple of kVec), with one vector of kVec running maxima. A float max
// reduction written as one running scalar stays scalar (GCC vectorises it only under
// -ffinite-math-only), and at head dim 8 that chain was the forward's largest cost. A NaN score is
// dropped, as std::max drops it.
typedef float VecF __attribute__((vector_size(kVec * sizeof(float))));

inline float RowMax(const float* __restrict s, int64_t n) {
  VecF lane;
  for (int i = 0; i < kVec; ++i) lane[i] = kNeg;
  for (int64_t j = 0; j < n; j += kVec) {
    VecF x;
    std::memcpy(&x, s + j, sizeof x);
    lane = x > lane ? x : lane;
  }
  float m = kNeg;
  for (int i = 0; i < kVec; ++i) m = std::max(m, lane[i]);
  return m;
}

// Row t's scores past the diagonal masked, its own score unmasked (the scores hold q.k + bias, so
// the own one is recomputed without it: a padding query attends to itself).
template <int H>
inline void CausalFix(const float* q, const float* kT, int64_t t, int64_t n, int64_t S, float* s) {
  float own = 0.f;
  for (int h = 0; h < H; ++h) own += q[h] * kT[h * S + t];
  s[t] = own;
  for (int64_t j = t + 1; j < n; ++j) s[j] = kNeg;
}

// One (batch, key/value head, query head): o [T, H] and lse [T] of q [T, H].
template <int H>
void Forward(const float* q, const float* kT, const float* vT, const float* bias, int64_t T,
             int64_t S, float* o, float* lse, float* s) {
  float qb[R * H], ob[R * H];
  for (int64_t t0 = 0; t0 < T; t0 += R) {
    const int64_t n = RoundUp(t0 + R, kVec);
    CopyRows(q, t0, T, H, qb);
    RowsTimesT<H>(qb, kT, bias, n, S, s);
    float m[R], l[R];
    for (int r = 0; r < R; ++r) {
      float* sr = s + r * S;
      CausalFix<H>(qb + r * H, kT, t0 + r, n, S, sr);
      const float mr = RowMax(sr, n);
      float lr = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        sr[j] = Exp(sr[j] - mr);
        lr += sr[j];
      }
      m[r] = mr;
      l[r] = lr;
    }
    RowsTimes<H>(s, vT, n, S, ob);
    for (int r = 0; r < R && t0 + r < T; ++r) {
      for (int h = 0; h < H; ++h) o[(t0 + r) * H + h] = ob[r * H + h] / l[r];
      lse[t0 + r] = m[r] + std::log(l[r]);
    }
  }
}

// One (batch, key/value head, query head): dq [T, H] of q, and its share of dk^T, dv^T [H, S].
// p = exp(s - lse) is recomputed; ds = p (do.v - do.o); dq = ds k, dk += ds^T q, dv += p^T do.
template <int H>
void Backward(const float* q, const float* kT, const float* vT, const float* bias, const float* o,
              const float* lse, const float* dout, int64_t T, int64_t S, float* dq, float* dkT,
              float* dvT, float* p, float* ds) {
  float qb[R * H], db[R * H], dqb[R * H];
  for (int64_t t0 = 0; t0 < T; t0 += R) {
    const int64_t n = RoundUp(t0 + R, kVec);
    CopyRows(q, t0, T, H, qb);
    CopyRows(dout, t0, T, H, db);
    RowsTimesT<H>(qb, kT, bias, n, S, p);
    RowsTimesT<H>(db, vT, nullptr, n, S, ds);
    for (int r = 0; r < R; ++r) {
      const int64_t t = t0 + r;
      float *pr = p + r * S, *dsr = ds + r * S;
      CausalFix<H>(qb + r * H, kT, t, n, S, pr);
      float delta = 0.f;
      if (t < T)
        for (int h = 0; h < H; ++h) delta += dout[t * H + h] * o[t * H + h];
      const float lt = t < T ? lse[t] : 0.f;  // a row past T has q = do = 0: it adds nothing
      for (int64_t j = 0; j < n; ++j) {
        pr[j] = Exp(pr[j] - lt);
        dsr[j] = pr[j] * (dsr[j] - delta);
      }
    }
    RowsTimes<H>(ds, kT, n, S, dqb);
    for (int r = 0; r < R && t0 + r < T; ++r)
      for (int h = 0; h < H; ++h) dq[(t0 + r) * H + h] = dqb[r * H + h];
    for (int h = 0; h < H; ++h) {
      float cq[R], cd[R];
      for (int r = 0; r < R; ++r) {
        cq[r] = qb[r * H + h];
        cd[r] = db[r * H + h];
      }
      AccumulateT(cq, ds, n, S, dkT + h * S);
      AccumulateT(cd, p, n, S, dvT + h * S);
    }
  }
}

struct Shape {
  int64_t B, K, G, T, H, S;
};

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                       ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& valid, Shape* shape) {
  auto dq = q.dimensions(), dk = k.dimensions(), dv = v.dimensions(), dm = valid.dimensions();
  if (dq.size() != 5 || dk.size() != 4 || dv.size() != 4 || dm.size() != 2)
    return ffi::Error::InvalidArgument("cpu_attention: expected q [B, K, G, T, H], k and v [B, K, T, H], "
                                       "key_valid [B, T]");
  const int64_t B = dq[0], K = dq[1], G = dq[2], T = dq[3], H = dq[4];
  for (auto d : {dk, dv})
    if (d[0] != B || d[1] != K || d[2] != T || d[3] != H)
      return ffi::Error::InvalidArgument("cpu_attention: k or v does not match q's [B, K, T, H]");
  if (dm[0] != B || dm[1] != T) return ffi::Error::InvalidArgument("cpu_attention: key_valid is not [B, T]");
  *shape = {B, K, G, T, H, RoundUp(T, kVec)};
  return ffi::Error::Success();
}

template <int H>
void ForwardAll(ffi::ThreadPool& pool, const Shape& sh, const float* Q, const float* Kp, const float* V,
                const bool* M, float* O, float* L) {
  const int64_t T = sh.T, S = sh.S, G = sh.G, K = sh.K;
  ParallelFor(pool, sh.B * K * G, [&](int64_t i) {  // i = (b, kv head, query head)
    const int64_t b = i / (K * G), kv = i / G;
    std::vector<float> buf((R + 1 + 2 * H) * S, 0.f);
    float *s = buf.data(), *bias = s + R * S, *kT = bias + S, *vT = kT + H * S;
    Transpose(Kp + kv * T * H, T, H, S, kT);
    Transpose(V + kv * T * H, T, H, S, vT);
    Bias(M + b * T, T, S, bias);
    Forward<H>(Q + i * T * H, kT, vT, bias, T, S, O + i * T * H, L + i * T, s);
  });
}

template <int H>
void BackwardAll(ffi::ThreadPool& pool, const Shape& sh, const float* Q, const float* Kp, const float* V,
                 const bool* M, const float* O, const float* L, const float* DO, float* DQ, float* DK,
                 float* DV) {
  const int64_t T = sh.T, S = sh.S, G = sh.G, K = sh.K;
  ParallelFor(pool, sh.B * K, [&](int64_t i) {  // i = (b, kv head): it owns dk and dv of its keys
    const int64_t b = i / K;
    std::vector<float> buf((2 * R + 1 + 4 * H) * S, 0.f);
    float *p = buf.data(), *ds = p + R * S, *bias = ds + R * S;
    float *kT = bias + S, *vT = kT + H * S, *dkT = vT + H * S, *dvT = dkT + H * S;
    Transpose(Kp + i * T * H, T, H, S, kT);
    Transpose(V + i * T * H, T, H, S, vT);
    Bias(M + b * T, T, S, bias);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = (i * G + g) * T;
      Backward<H>(Q + row * H, kT, vT, bias, O + row * H, L + row, DO + row * H, T, S, DQ + row * H,
                  dkT, dvT, p, ds);
    }
    for (int64_t j = 0; j < T; ++j)
      for (int64_t h = 0; h < H; ++h) {
        DK[(i * T + j) * H + h] = dkT[h * S + j];
        DV[(i * T + j) * H + h] = dvT[h * S + j];
      }
  });
}

// Calls F<H>(args...) for the head dims the kernel is built for (models/attention.py asks
// `cpu_attention.supports` first, so another head dim is an error here). "auto" takes only 8: at
// 64 XLA's products beat these row loops (bench/attention_cpu.py shows it), and beyond it more so.
#define AVA_DISPATCH_H(H_VALUE, CALL)                                                     \
  switch (H_VALUE) {                                                                      \
    case 8: CALL(8); break;                                                               \
    case 16: CALL(16); break;                                                             \
    case 32: CALL(32); break;                                                             \
    case 64: CALL(64); break;                                                             \
    default:                                                                              \
      return ffi::Error::InvalidArgument("cpu_attention: head dim " + std::to_string(H_VALUE) + \
                                         " is not one of 8, 16, 32, 64");           \
  }

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid,
                       ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  Shape sh;
  if (auto err = CheckShapes(q, k, v, valid, &sh); err.failure()) return err;
#define AVA_FWD(HH) ForwardAll<HH>(pool, sh, q.typed_data(), k.typed_data(), v.typed_data(), \
                                   valid.typed_data(), o->typed_data(), lse->typed_data())
  AVA_DISPATCH_H(sh.H, AVA_FWD)
#undef AVA_FWD
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid,
                        ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape sh;
  if (auto err = CheckShapes(q, k, v, valid, &sh); err.failure()) return err;
#define AVA_BWD(HH) BackwardAll<HH>(pool, sh, q.typed_data(), k.typed_data(), v.typed_data(),    \
                                    valid.typed_data(), o.typed_data(), lse.typed_data(),      \
                                    dout.typed_data(), dq->typed_data(), dk->typed_data(),     \
                                    dv->typed_data())
  AVA_DISPATCH_H(sh.H, AVA_BWD)
#undef AVA_BWD
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AvaCausalAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // key_valid
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Ret<ffi::Buffer<ffi::F32>>()); // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(AvaCausalAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // key_valid
                                  .Arg<ffi::Buffer<ffi::F32>>()   // o
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // do
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dv
