// Fused CPU kernels for MUNBaOptimizer's two passes (contract: munba_kernels/backends/base.py).
//
//   gram  : the packed Gram [K(K+1)/2] of K players' gradients (K = 2: [ff, fr, rr]), in float64.
//   adamw : one pass per tensor: d = sum_k c_k*(s_k*g_k), then torch.optim.AdamW's update.
//   sgd   : one pass per tensor: the same d, then torch.optim.SGD's update.
//
// d lives only in registers (or an L1 tile for K >= 3) in the math type, never rounded to the
// gradient dtype: the fused step is more precise than feeding d to torch.optim as .grad.
//
// The s are powers of two that keep huge or tiny bargaining coefficients inside the math
// type's range (backends/base.py: kernel_coefficients); s = 1 gives the same bits as c*g.
//
// The direction d lives only in registers, so the update reads g_f, g_r, p and the states
// once and writes p and the states once, rounding once on store.  Math is in
// at::opmath_type<T> (fp32 for fp32/bf16/fp16, fp64 for fp64), as in torch's fused kernels.
// Optimizer states are stored in the parameter dtype T or, for bf16/fp16 parameters, in fp32
// (state type S): keeping them in fp32 stops small updates from rounding away in bf16 states.
//
// Work is split into fixed-size chunks of kChunk elements (never straddling two tensors) so
// that every tensor size, from 1 element to hundreds of millions, load-balances over ATen's
// thread pool, and so that the Gram's summation order depends only on the tensor sizes,
// never on the number of threads or on scheduling: the result is bitwise reproducible.
//
// Build flags (setup.py): -O3 vectorises the plain loops below for the baseline x86-64 ISA,
// and the hot loops are also cloned for AVX2 / AVX-512, picked at load time (target_clones;
// IEEE +, *, /, sqrt round identically in every clone, so results do not depend on the CPU);
// -ffp-contract=off keeps a*b+c as two roundings (as in the reference backend, and the same
// on every machine); -fno-math-errno lets std::sqrt vectorise; -fopenmp powers at::parallel_for.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using OptTensors = std::vector<std::optional<Tensor>>;

// 32768 elements: 128 KiB of fp32 per stream, so the five streams of an AdamW chunk stay
// in L2, while a 20M-element model still yields ~600 chunks to balance across threads.
constexpr int64_t kChunk = int64_t(1) << 15;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < int64_t(numels.size()); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      chunks.push_back({t, b, std::min(b + kChunk, numels[t])});
    }
  }
  return chunks;
}

// Runs fn(chunk_index) for every chunk on ATen's thread pool.  grain_size 2: a single chunk
// runs inline, because waking the pool costs more than 32K elements of work.
template <typename F>
void parallel_chunks(const std::vector<Chunk>& chunks, const F& fn) {
  at::parallel_for(0, int64_t(chunks.size()), 2, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      fn(c);
    }
  });
}

// bf16 <-> fp32 with integer bit operations, the same bits as c10::BFloat16's conversions
// (round to nearest even; NaN stays NaN) but branch-free, so conversion loops vectorise.
inline float bf16_to_float(at::BFloat16 x) {
  return __builtin_bit_cast(float, uint32_t(x.x) << 16);
}

inline at::BFloat16 float_to_bf16(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return at::BFloat16(uint16_t(nan ? 0x7FC0u : rounded), at::BFloat16::from_bits());
}

// Widen on load: T -> opmath (exact) -> acc_t (exact for float -> double).
template <typename acc_t, typename T>
inline acc_t load(T x) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return static_cast<acc_t>(bf16_to_float(x));
  } else {
    return static_cast<acc_t>(static_cast<at::opmath_type<T>>(x));
  }
}

// Round once on store, from the math type to the storage type T.
template <typename T, typename op_t>
inline T store(op_t x) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return float_to_bf16(x);
  } else {
    return static_cast<T>(x);
  }
}

// Elements can be walked linearly in memory when the tensor is dense; two tensors can be
// walked in lockstep when they also share strides (or are both contiguous).
bool same_dense_layout(const Tensor& a, const Tensor& b) {
  return a.is_non_overlapping_and_dense() &&
      ((a.is_contiguous() && b.is_contiguous()) || a.strides() == b.strides());
}

// A gradient in the layout of `like` (dense): itself when it already is, else a copy.
// Autograd produces gradients in the parameter's layout, so the copy is the rare path.
Tensor in_layout_of(const Tensor& g, const Tensor& like) {
  if (same_dense_layout(g, like)) {
    return g;
  }
  return at::empty_like(like).copy_(g);
}

void check_gradient(const Tensor& g, const Tensor& like, const char* which, size_t i) {
  TORCH_CHECK(g.device().is_cpu(), "munba_cpu: ", which, "[", i, "] is on ", g.device(), ", expected CPU");
  TORCH_CHECK(!g.is_sparse(), "munba_cpu: ", which, "[", i, "] is sparse");
  TORCH_CHECK(g.scalar_type() == like.scalar_type() && g.sizes() == like.sizes(), "munba_cpu: ", which, "[",
              i, "] has dtype/shape ", g.scalar_type(), "/", g.sizes(), ", expected ", like.scalar_type(),
              "/", like.sizes());
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// ------------------------------------------------------------------- bf16 chunks in fp32 tiles
//
// GCC 12 does not vectorise a loop that mixes 16-bit loads and stores with fp32 math, but it
// does vectorise plain widening and narrowing loops.  So the update kernels run on bf16
// chunks as fp32 kernels over tiles widened into L1-resident buffers, whose results are
// narrowed back: the same bits as a direct bf16 loop (fp32 math either way, one rounding on
// store), about 6x faster.
constexpr int64_t kTile = 256;

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void widen(float* out, const T* in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = load<float>(in[i]);
  }
}

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void narrow(T* out, const float* in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = store<T>(in[i]);
  }
}

// One array of a chunk as an fp32 kernel sees it: itself when it is fp32, else a tile buffer
// (widened on the way in, narrowed on the way out when the array is written).  Null stays null.
template <typename E>
struct Fp32Tile {
  E* base;
  float buffer[kTile];

  float* in(int64_t begin, int64_t len) {
    if constexpr (std::is_same_v<std::remove_const_t<E>, float>) {
      return base ? const_cast<float*>(base) + begin : nullptr;
    } else {
      if (!base) return nullptr;
      widen(buffer, base + begin, len);
      return buffer;
    }
  }
  void out(int64_t begin, int64_t len) {
    if constexpr (!std::is_const_v<E> && !std::is_same_v<E, float>) {
      if (base) narrow(base + begin, buffer, len);
    }
  }
};

// Runs run(p, f, r, n, states...) on one chunk: directly, or for bf16 over fp32 tiles.  The
// gradients' type G is T, or float (a direction combined in the math type, K >= 3).
template <typename T, typename G, typename Run, typename... States>
void on_chunk(const Run& run, int64_t n, T* p, const G* f, const G* r, States*... states) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    Fp32Tile<T> tp{p};
    Fp32Tile<const G> tf{f}, tr{r};
    std::tuple<Fp32Tile<States>...> ts{Fp32Tile<States>{states}...};
    for (int64_t b = 0; b < n; b += kTile) {
      const int64_t len = std::min(kTile, n - b);
      std::apply([&](auto&... t) { run(tp.in(b, len), tf.in(b, len), tr.in(b, len), len, t.in(b, len)...); }, ts);
      tp.out(b, len);
      std::apply([&](auto&... t) { (t.out(b, len), ...); }, ts);
    }
  } else {
    run(p, f, r, n, states...);
  }
}

// ------------------------------------------------------------------------------ pass 1: Gram

// Sums of f*f, f*r, r*r over n elements (a missing gradient, kF/kR false, counts as zero).
// Eight float64 lanes per sum, lane k holding elements i ≡ k (mod 8), then a fixed pairwise
// fold: the summation order is explicit, so the result does not depend on how the compiler
// vectorises.  Products of fp32/bf16/fp16 values are exact in float64; only additions round.
//
// The lanes are two 4-wide GCC vector values per sum rather than arrays: with arrays GCC
// kept the accumulators on the stack (a store-forwarding chain per add, 2.5x slower).
// Widening to float64 makes the loop compute-bound at the baseline ISA's two double lanes,
// so it is also compiled for AVX2 and AVX-512 and picked at load time (target_clones).
// -ffp-contract=off keeps every clone from fusing a*b+c: all clones give the same bits.
using v4d = double __attribute__((vector_size(32)));

template <typename T>
inline v4d load4(const T* x) {
  if constexpr (std::is_same_v<T, float>) {  // one vector load and one widening convert
    using v4f = float __attribute__((vector_size(16)));
    v4f v;
    std::memcpy(&v, x, sizeof v);
    return __builtin_convertvector(v, v4d);
  } else {
    return v4d{load<double>(x[0]), load<double>(x[1]), load<double>(x[2]), load<double>(x[3])};
  }
}

template <typename T, bool kF, bool kR>
__attribute__((target_clones("avx512f", "avx2", "default")))
void gram_chunk(const T* f, const T* r, int64_t n, double out[3]) {
  v4d ff0{}, ff1{}, fr0{}, fr1{}, rr0{}, rr1{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v4d a0{}, a1{}, b0{}, b1{};
    if constexpr (kF) {
      a0 = load4(f + i);
      a1 = load4(f + i + 4);
      ff0 += a0 * a0;
      ff1 += a1 * a1;
    }
    if constexpr (kR) {
      b0 = load4(r + i);
      b1 = load4(r + i + 4);
      rr0 += b0 * b0;
      rr1 += b1 * b1;
    }
    if constexpr (kF && kR) {
      fr0 += a0 * b0;
      fr1 += a1 * b1;
    }
  }
  double ff[8], fr[8], rr[8];
  for (int k = 0; k < 4; ++k) {
    ff[k] = ff0[k], ff[k + 4] = ff1[k];
    fr[k] = fr0[k], fr[k + 4] = fr1[k];
    rr[k] = rr0[k], rr[k + 4] = rr1[k];
  }
  for (int lane = 0; i < n; ++i, ++lane) {  // the tail continues lanes 0, 1, ...
    const double a = kF ? load<double>(f[i]) : 0.0;
    const double b = kR ? load<double>(r[i]) : 0.0;
    if constexpr (kF) ff[lane] += a * a;
    if constexpr (kF && kR) fr[lane] += a * b;
    if constexpr (kR) rr[lane] += b * b;
  }
  auto pairwise = [](const double* x) {
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
  };
  out[0] = pairwise(ff);
  out[1] = pairwise(fr);
  out[2] = pairwise(rr);
}

// Sums of a*b over n elements in the lanes and fold of gram_chunk, so that dot_chunk(f, f)
// is bitwise gram_chunk's ff and dot_chunk(f, r) its fr: the K >= 3 Gram sums each pair
// with it (the chunk is in cache, so re-reading it per pair costs no memory traffic).
template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
double dot_chunk(const T* a, const T* b, int64_t n) {
  v4d s0{}, s1{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    s0 += load4(a + i) * load4(b + i);
    s1 += load4(a + i + 4) * load4(b + i + 4);
  }
  double lanes[8];
  for (int k = 0; k < 4; ++k) {
    lanes[k] = s0[k], lanes[k + 4] = s1[k];
  }
  for (int lane = 0; i < n; ++i, ++lane) {
    lanes[lane] += load<double>(a[i]) * load<double>(b[i]);
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Every pair's dot_chunk for K players in one read of the chunk, when every player has a
// gradient there (K = 3, 4).  Pair q = (x, y) of the packed upper triangle keeps dot_chunk's
// lanes and fold, so the sums are bitwise dot_chunk's; only the reads are shared (six or ten
// independent accumulator chains instead of two also keep the FMA-less adds busy).
template <typename T, int K>
__attribute__((target_clones("avx512f", "avx2", "default")))
void gram_chunk_k(const T* const* g, int64_t n, double* out) {
  constexpr int P = K * (K + 1) / 2;
  v4d lo[P] = {}, hi[P] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v4d a[K], b[K];
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      a[k] = load4(g[k] + i);
      b[k] = load4(g[k] + i + 4);
    }
    int q = 0;
#pragma GCC unroll 4
    for (int x = 0; x < K; ++x) {
#pragma GCC unroll 4
      for (int y = x; y < K; ++y, ++q) {
        lo[q] += a[x] * a[y];
        hi[q] += b[x] * b[y];
      }
    }
  }
  double lanes[P][8];
  for (int q = 0; q < P; ++q) {
    for (int k = 0; k < 4; ++k) {
      lanes[q][k] = lo[q][k], lanes[q][k + 4] = hi[q][k];
    }
  }
  for (int lane = 0; i < n; ++i, ++lane) {
    int q = 0;
    for (int x = 0; x < K; ++x) {
      for (int y = x; y < K; ++y, ++q) {
        lanes[q][lane] += load<double>(g[x][i]) * load<double>(g[y][i]);
      }
    }
  }
  for (int q = 0; q < P; ++q) {
    const double* l = lanes[q];
    out[q] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
}

// grads[k][i]: player k's gradient of tensor i (nullopt or undefined = missing).
using Players = std::vector<OptTensors>;

bool present(const OptTensors& grads, size_t i) {
  return grads[i].has_value() && grads[i]->defined();
}

size_t tensor_count(const Players& grads, const char* where) {
  TORCH_CHECK(grads.size() >= 2, where, ": ", grads.size(), " players, expected at least 2");
  for (const auto& player : grads) {
    TORCH_CHECK(player.size() == grads[0].size(), where, ": players with ", grads[0].size(), " and ",
                player.size(), " gradients");
  }
  return grads[0].size();
}

// The chunk partials [n_chunks, K(K+1)/2] of the packed Gram, chunks in tensor then memory
// order; gram() is their sum in chunk order.  Exposed on its own so that partials computed
// tensor by tensor (during backward, as each gradient is accumulated) add up to gram()'s bits.
Tensor gram_partials(const Players& grads) {
  const size_t count = tensor_count(grads, "munba_cpu.gram");
  const size_t players = grads.size();
  std::vector<std::pair<size_t, size_t>> pairs;  // packed order: the upper triangle, row by row
  for (size_t i = 0; i < players; ++i) {
    for (size_t j = i; j < players; ++j) {
      pairs.emplace_back(i, j);
    }
  }
  std::vector<std::vector<Tensor>> gs(players, std::vector<Tensor>(count));
  std::vector<int64_t> numels(count);
  for (size_t i = 0; i < count; ++i) {
    size_t first = players;
    for (size_t k = players; k-- > 0;) {
      if (present(grads[k], i)) first = k;
    }
    TORCH_CHECK(first < players, "munba_cpu.gram: tensor ", i, " has no gradient");
    Tensor like = *grads[first][i];
    for (size_t k = 0; k < players; ++k) {
      if (present(grads[k], i)) check_gradient(*grads[k][i], like, "gradient", i);
    }
    TORCH_CHECK(is_supported_dtype(like.scalar_type()), "munba_cpu.gram: unsupported dtype ",
                like.scalar_type());
    if (!like.is_non_overlapping_and_dense()) {
      like = like.contiguous();
    }
    for (size_t k = 0; k < players; ++k) {
      if (present(grads[k], i)) gs[k][i] = in_layout_of(*grads[k][i], like);
    }
    numels[i] = like.numel();
  }

  const size_t width = pairs.size();
  const std::vector<Chunk> chunks = split_into_chunks(numels);
  auto result = at::empty({int64_t(chunks.size()), int64_t(width)}, at::TensorOptions().dtype(at::kDouble));
  double* partials = result.data_ptr<double>();
  parallel_chunks(chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    double* out = &partials[width * c];
    at::ScalarType dtype = at::kFloat;
    for (size_t k = 0; k < players; ++k) {
      if (gs[k][ch.tensor].defined()) dtype = gs[k][ch.tensor].scalar_type();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "munba_cpu_gram", [&] {
      auto slice = [&](size_t k) -> const scalar_t* {
        const Tensor& g = gs[k][ch.tensor];
        return g.defined() ? g.const_data_ptr<scalar_t>() + ch.begin : nullptr;
      };
      const int64_t n = ch.end - ch.begin;
      if (players == 2) {  // one fused read of both gradients
        const scalar_t *fp = slice(0), *rp = slice(1);
        if (fp && rp) {
          gram_chunk<scalar_t, true, true>(fp, rp, n, out);
        } else if (fp) {
          gram_chunk<scalar_t, true, false>(fp, rp, n, out);
        } else {
          gram_chunk<scalar_t, false, true>(fp, rp, n, out);
        }
        return;
      }
      const scalar_t* all[4] = {};
      bool every = players <= 4;
      for (size_t k = 0; every && k < players; ++k) {
        all[k] = slice(k);
        every = all[k] != nullptr;
      }
      if (every && players == 3) {
        gram_chunk_k<scalar_t, 3>(all, n, out);
        return;
      }
      if (every && players == 4) {
        gram_chunk_k<scalar_t, 4>(all, n, out);
        return;
      }
      for (size_t q = 0; q < width; ++q) {  // a missing player, or K > 4: pair by pair (same bits)
        const scalar_t *a = slice(pairs[q].first), *b = slice(pairs[q].second);
        out[q] = a && b ? dot_chunk(a, b, n) : 0.0;
      }
    });
  });

  return result;
}

// Rows of [n, width] float64 partials added in row order, from 0.0: deterministic for any
// thread count, and the same bits however the rows were produced.
Tensor sum_partials(const Tensor& partials) {
  TORCH_CHECK(partials.dim() == 2 && partials.scalar_type() == at::kDouble && partials.is_contiguous() &&
                  partials.device().is_cpu(),
              "munba_cpu.sum_partials: expected a contiguous CPU float64 [n, width] tensor");
  const int64_t rows = partials.size(0), width = partials.size(1);
  auto result = at::zeros({width}, at::TensorOptions().dtype(at::kDouble));
  double* total = result.data_ptr<double>();
  const double* p = partials.const_data_ptr<double>();
  for (int64_t c = 0; c < rows; ++c) {
    for (int64_t q = 0; q < width; ++q) {
      total[q] += p[width * c + q];
    }
  }
  return result;
}

Tensor gram(const Players& grads) { return sum_partials(gram_partials(grads)); }

// ---------------------------------------------------------------------- pass 2: the update

// The tensors of one bucket, validated and laid out so that every stream of tensor t can be
// walked linearly over [0, numel) in lockstep with the parameter.
struct Bucket {
  std::vector<Tensor> params;
  std::vector<std::vector<Tensor>> grads;  // [player][tensor]; undefined = missing
  std::vector<int64_t> numels;
  at::ScalarType dtype = at::kFloat;
  at::ScalarType state_dtype = at::kFloat;  // dtype of every state tensor (no states: dtype)
};

Bucket make_bucket(const std::vector<Tensor>& params, const Players& grads,
                   const std::vector<const std::vector<Tensor>*>& states) {
  const size_t count = params.size();
  TORCH_CHECK(tensor_count(grads, "munba_cpu") == count, "munba_cpu: ", count, " params but ",
              grads[0].size(), " gradients per player");
  Bucket b;
  b.dtype = count ? params[0].scalar_type() : at::kFloat;
  TORCH_CHECK(is_supported_dtype(b.dtype), "munba_cpu: unsupported dtype ", b.dtype);
  for (const auto* s : states) {
    TORCH_CHECK(s->size() == count, "munba_cpu: ", count, " params but ", s->size(), " state tensors");
  }
  b.state_dtype = count && !states.empty() ? (*states[0])[0].scalar_type() : b.dtype;
  const bool low_precision = b.dtype == at::kBFloat16 || b.dtype == at::kHalf;
  TORCH_CHECK(b.state_dtype == b.dtype || (low_precision && b.state_dtype == at::kFloat),
              "munba_cpu: states of dtype ", b.state_dtype, " for ", b.dtype,
              " parameters (expected the parameter dtype, or float32 for bfloat16/float16)");
  b.grads.assign(grads.size(), {});
  for (size_t i = 0; i < count; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == b.dtype, "munba_cpu: params[", i,
                "] must be a CPU tensor of dtype ", b.dtype, ", got ", p.scalar_type(), " on ", p.device());
    // Parameters and states are updated in place, so they cannot be copied into a layout.
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "munba_cpu: params[", i,
                "] is not dense (a strided view); use backend='torch'");
    for (const auto* s : states) {
      const Tensor& st = (*s)[i];
      TORCH_CHECK(st.scalar_type() == b.state_dtype && st.sizes() == p.sizes() && same_dense_layout(p, st),
                  "munba_cpu: the state of params[", i, "] does not match the bucket's state dtype ",
                  b.state_dtype, " or the parameter's shape/layout");
    }
    bool any = false;
    for (size_t k = 0; k < grads.size(); ++k) {
      if (present(grads[k], i)) {
        check_gradient(*grads[k][i], p, "gradient", i);
        b.grads[k].push_back(in_layout_of(*grads[k][i], p));
        any = true;
      } else {
        b.grads[k].emplace_back();
      }
    }
    TORCH_CHECK(any, "munba_cpu: params[", i, "] has no gradient");
    b.params.push_back(p);
    b.numels.push_back(p.numel());
  }
  return b;
}

// Host scalars read once per call: the coefficients [c_1..c_K, s_1..s_K] (float64) and the skip flag.
struct Direction {
  std::vector<double> c, s;
};

std::optional<Direction> read_direction(const Tensor& coefficients, size_t players, const Tensor& skip,
                                        bool maximize) {
  TORCH_CHECK(coefficients.device().is_cpu() && coefficients.scalar_type() == at::kDouble &&
                  coefficients.numel() == int64_t(2 * players),
              "munba_cpu: coefficients must be a float64 CPU tensor [c_1..c_K, s_1..s_K] of ", 2 * players,
              " elements");
  TORCH_CHECK(skip.device().is_cpu() && skip.numel() == 1, "munba_cpu: skip must be a 1-element CPU tensor");
  // As torch's fused optimizers' found_inf: exactly 1.0 skips the whole step.
  if (skip.item<float>() == 1.0f) {
    return std::nullopt;
  }
  const Tensor c = coefficients.contiguous();
  const double* cp = c.const_data_ptr<double>();
  // maximize (d = -d) is folded into the coefficients: negation is exact, so
  // (-c_1)*g_1 + (-c_2)*g_2 rounds to exactly -(c_1*g_1 + c_2*g_2).
  const double sign = maximize ? -1.0 : 1.0;
  Direction dir;
  for (size_t k = 0; k < players; ++k) {
    dir.c.push_back(sign * cp[k]);
    dir.s.push_back(cp[players + k]);
  }
  return dir;
}

// d = c_f*(s_f*g_f) + c_r*(s_r*g_r) in op_t, with the same operation order as the reference backend.
template <bool kF, bool kR, typename op_t, typename G>
inline op_t direction(const G* f, const G* r, int64_t i, op_t cf, op_t cr, op_t sf, op_t sr) {
  if constexpr (kF && kR) {
    return (load<op_t>(f[i]) * sf) * cf + (load<op_t>(r[i]) * sr) * cr;
  } else if constexpr (kF) {
    return (load<op_t>(f[i]) * sf) * cf;
  } else {
    return (load<op_t>(r[i]) * sr) * cr;
  }
}

// Calls body(has_f, has_r) with compile-time booleans for the presence pattern of one
// tensor's gradients, so the inner loops carry no per-element branch on it.
template <typename Body>
void with_presence(bool has_f, bool has_r, const Body& body) {
  using yes = std::true_type;
  using no = std::false_type;
  if (has_f && has_r) {
    body(yes{}, yes{});
  } else if (has_f) {
    body(yes{}, no{});
  } else {
    body(no{}, yes{});
  }
}

// Calls body(state_t{}) with the bucket's state type: the parameter type T, or float for
// bf16/fp16 parameters with fp32 states (the only mixed pair make_bucket accepts).
template <typename T, typename Body>
void with_state_type(at::ScalarType state_dtype, const Body& body) {
  if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
    if (state_dtype == at::kFloat) {
      body(float{});
      return;
    }
  }
  body(T{});
}

// sum[i] (+)= (g[i]·s)·c over one tile: one player's term of a K >= 3 direction, added in
// player order (``first``: the tile's first present player sets it).
template <typename T, typename op_t>
__attribute__((target_clones("avx512f", "avx2", "default")))
void add_player_term(op_t* sum, const T* g, int64_t n, op_t s, op_t c, bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) sum[i] = (load<op_t>(g[i]) * s) * c;
  } else {
    for (int64_t i = 0; i < n; ++i) sum[i] = sum[i] + (load<op_t>(g[i]) * s) * c;
  }
}

// Calls body(kF, kR, p, f, r, n) for one update chunk, with f, r the first and last player's
// gradient slices and c, s their coefficients (so that the two-player fused loops serve
// every K).  With K >= 3 players the direction is combined tile by tile into an L1 buffer in
// the math type (players added in order, as the reference), which then acts as the only
// gradient, with coefficient 1 — no per-presence-pattern instances are needed.
template <typename T, typename Body>
void for_update_chunk(const Bucket& b, const Chunk& ch, const Direction& dir, const Body& body) {
  using op_t = at::opmath_type<T>;
  T* p = b.params[ch.tensor].data_ptr<T>() + ch.begin;
  auto slice = [&](size_t k) -> const T* {
    const Tensor& g = b.grads[k][ch.tensor];
    return g.defined() ? g.const_data_ptr<T>() + ch.begin : nullptr;
  };
  const int64_t n = ch.end - ch.begin;
  if (b.grads.size() == 2) {
    const T *fp = slice(0), *rp = slice(1);
    with_presence(fp != nullptr, rp != nullptr, [&](auto kF, auto kR) {
      body(kF, kR, p, fp, rp, n, op_t(dir.c[0]), op_t(dir.c[1]), op_t(dir.s[0]), op_t(dir.s[1]), int64_t(0));
    });
    return;
  }
  // 2048 fp32 (8 KiB, 16 KiB in fp64) stay in L1 beside the streams' lines and amortise the
  // K + 1 calls per tile.
  constexpr int64_t kDirectionTile = 2048;
  op_t sum[kDirectionTile];
  for (int64_t begin = 0; begin < n; begin += kDirectionTile) {
    const int64_t len = std::min(kDirectionTile, n - begin);
    bool first = true;
    for (size_t k = 0; k < b.grads.size(); ++k) {
      const T* g = slice(k);
      if (!g) continue;
      add_player_term(sum, g + begin, len, op_t(dir.c[k]), op_t(dir.s[k]), first);
      first = false;
    }
    body(std::true_type{}, std::false_type{}, p + begin, static_cast<const op_t*>(sum),
         static_cast<const op_t*>(nullptr), len, op_t(1), op_t(0), op_t(1), op_t(1), begin);
  }
}

// Per-tensor AdamW constants (bias corrections depend on the tensor's own step count).
template <typename op_t>
struct AdamTensorConsts {
  op_t decay, step_size, bias_correction2_sqrt;
};

template <typename op_t>
struct AdamConsts {
  op_t cf, cr, sf, sr, lerp_weight, beta2, one_minus_beta2, eps;
  bool lerp_from_grad;  // |1 - beta1| >= 0.5: torch's lerp then computes from the far end
};

// torch.optim.AdamW (fused CPU kernel's formulas and operation order; it uses one FMA in
// the lerp where this uses a multiply and an add, so fp32 results may differ by one ulp).
// G is the gradients' type: T, or the math type for a direction combined over K >= 3 players.
template <bool kF, bool kR, typename T, typename G, typename S, typename op_t>
__attribute__((target_clones("avx512f", "avx2", "default")))  // sqrt and two divides per element
void adamw_chunk(T* p, S* m, S* v, const G* f, const G* r, int64_t n, const AdamConsts<op_t>& k,
                 const AdamTensorConsts<op_t>& t) {
  // Constants are copied into locals: the stores below could alias `k` and `t` as far as the
  // compiler knows, which would force a reload each iteration and block vectorisation.
  const op_t cf = k.cf, cr = k.cr, sf = k.sf, sr = k.sr;
  const op_t beta2 = k.beta2, one_minus_beta2 = k.one_minus_beta2, eps = k.eps;
  const op_t decay = t.decay, step_size = t.step_size, bc2_sqrt = t.bias_correction2_sqrt;
  // lerp(m, d, w) = m + w*(d - m), or d - (1 - w)*(d - m) for large w, as torch; both are
  // base + coeff*(d - m), with the base chosen by a select so the loop has no branch.
  const bool from_grad = k.lerp_from_grad;
  const op_t coeff = from_grad ? k.lerp_weight - op_t(1) : k.lerp_weight;
  for (int64_t i = 0; i < n; ++i) {
    const op_t d = direction<kF, kR>(f, r, i, cf, cr, sf, sr);
    const op_t param = load<op_t>(p[i]) * decay;
    const op_t m_old = load<op_t>(m[i]);
    const op_t m_new = (from_grad ? d : m_old) + coeff * (d - m_old);
    const op_t v_new = load<op_t>(v[i]) * beta2 + one_minus_beta2 * d * d;
    m[i] = store<S>(m_new);
    v[i] = store<S>(v_new);
    // As torch: the update uses the unrounded moments.
    const op_t denom = std::sqrt(v_new) / bc2_sqrt + eps;
    p[i] = store<T>(param - step_size * m_new / denom);
  }
}

void check_steps(const std::vector<Tensor>& steps, size_t count, const char* where) {
  TORCH_CHECK(steps.size() == count, where, ": ", count, " params but ", steps.size(), " step counts");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device().is_cpu() && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1,
                where, ": state['step'] of params[", i, "] must be a float32 CPU scalar tensor");
  }
}

void adamw(const std::vector<Tensor>& params, const Players& grads, const std::vector<Tensor>& exp_avgs,
           const std::vector<Tensor>& exp_avg_sqs, const std::vector<Tensor>& steps, const Tensor& coefficients,
           const Tensor& skip, double lr, double beta1, double beta2, double eps, double weight_decay,
           bool maximize) {
  const Bucket b = make_bucket(params, grads, {&exp_avgs, &exp_avg_sqs});
  check_steps(steps, params.size(), "munba_cpu.adamw");
  const std::optional<Direction> dir = read_direction(coefficients, grads.size(), skip, maximize);
  if (!dir) {
    return;  // skipped: nothing is written, step counts included
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.dtype, "munba_cpu_adamw", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const AdamConsts<op_t> base{0, 0, 0, 0, op_t(1 - beta1), op_t(beta2), op_t(1 - beta2), op_t(eps),
                                std::abs(1 - beta1) >= 0.5};
    // Step counts advance first; bias corrections in double from the float32 count, as torch.
    std::vector<AdamTensorConsts<op_t>> per_tensor;
    for (const Tensor& s : steps) {
      float* count = s.data_ptr<float>();
      *count += 1.0f;
      const double step = *count;
      const double bias_correction1 = 1 - std::pow(beta1, step);
      const double bias_correction2 = 1 - std::pow(beta2, step);
      per_tensor.push_back(
          {op_t(1 - lr * weight_decay), op_t(lr / bias_correction1), op_t(std::sqrt(bias_correction2))});
    }
    const std::vector<Chunk> chunks = split_into_chunks(b.numels);
    with_state_type<scalar_t>(b.state_dtype, [&](auto state_tag) {
      using state_t = decltype(state_tag);
      parallel_chunks(chunks, [&](int64_t c) {
        const Chunk& ch = chunks[c];
        state_t* m = exp_avgs[ch.tensor].data_ptr<state_t>() + ch.begin;
        state_t* v = exp_avg_sqs[ch.tensor].data_ptr<state_t>() + ch.begin;
        for_update_chunk<scalar_t>(
            b, ch, *dir,
            [&](auto kF, auto kR, auto* p, auto* fp, auto* rp, int64_t n, op_t cf, op_t cr, op_t sf, op_t sr,
                int64_t offset) {
              AdamConsts<op_t> k = base;
              k.cf = cf, k.cr = cr, k.sf = sf, k.sr = sr;
              auto run = [&](auto* p_, auto* f_, auto* r_, int64_t len, auto* m_, auto* v_) {
                adamw_chunk<decltype(kF)::value, decltype(kR)::value>(p_, m_, v_, f_, r_, len, k,
                                                                        per_tensor[ch.tensor]);
              };
              on_chunk(run, n, p, fp, rp, m + offset, v + offset);
            });
      });
    });
  });
}

template <typename op_t>
struct SgdConsts {
  op_t cf, cr, sf, sr, weight_decay, momentum, one_minus_dampening, lr;
  bool has_weight_decay, first_step, nesterov;
};

// torch.optim.SGD (fused CPU kernel's formulas and operation order).  Without momentum
// there is no buffer (kMomentum false, buf unused).  G: as adamw_chunk's.
template <bool kF, bool kR, bool kMomentum, typename T, typename G, typename S, typename op_t>
__attribute__((target_clones("avx512f", "avx2", "default")))
void sgd_chunk(T* p, S* buf, const G* f, const G* r, int64_t n, const SgdConsts<op_t>& k) {
  // Locals, not k's fields: see adamw_chunk.
  const op_t cf = k.cf, cr = k.cr, sf = k.sf, sr = k.sr, weight_decay = k.weight_decay, momentum = k.momentum;
  const op_t one_minus_dampening = k.one_minus_dampening, lr = k.lr;
  const bool has_weight_decay = k.has_weight_decay, first_step = k.first_step, nesterov = k.nesterov;
  for (int64_t i = 0; i < n; ++i) {
    op_t d = direction<kF, kR>(f, r, i, cf, cr, sf, sr);
    const op_t param = load<op_t>(p[i]);
    // A select rather than d + 0*p, which would turn an infinite parameter into NaN.
    d = has_weight_decay ? d + param * weight_decay : d;
    if constexpr (kMomentum) {
      // The optimizer allocates the buffer zeroed, so reading it on the first step is safe.
      const op_t b_new = first_step ? d : load<op_t>(buf[i]) * momentum + d * one_minus_dampening;
      buf[i] = store<S>(b_new);
      d = nesterov ? d + b_new * momentum : b_new;
    }
    p[i] = store<T>(param - d * lr);
  }
}

void sgd(const std::vector<Tensor>& params, const Players& grads, const std::vector<Tensor>& momentum_buffers,
         const std::vector<Tensor>& steps, const Tensor& coefficients, const Tensor& skip, double lr,
         double momentum, double dampening, bool nesterov, double weight_decay, bool maximize) {
  const bool has_momentum = momentum != 0;
  std::vector<const std::vector<Tensor>*> states;
  if (has_momentum) {
    states.push_back(&momentum_buffers);
    check_steps(steps, params.size(), "munba_cpu.sgd");
  }
  const Bucket b = make_bucket(params, grads, states);
  const std::optional<Direction> dir = read_direction(coefficients, grads.size(), skip, maximize);
  if (!dir) {
    return;  // skipped: nothing is written, step counts included
  }
  // A tensor's first step (torch's "buf is None" branch) is one whose count was 0: counted
  // here, so that a skipped first step leaves the next one first.
  std::vector<char> first(params.size(), 0);
  for (size_t i = 0; i < steps.size() && has_momentum; ++i) {
    float* count = steps[i].data_ptr<float>();
    first[i] = *count == 0.0f;
    *count += 1.0f;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, b.dtype, "munba_cpu_sgd", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const SgdConsts<op_t> base{0,                  0,
                               0,                  0,
                               op_t(weight_decay), op_t(momentum),
                               op_t(1 - dampening), op_t(lr),
                               weight_decay != 0,  false,
                               nesterov};
    const std::vector<Chunk> chunks = split_into_chunks(b.numels);
    with_state_type<scalar_t>(b.state_dtype, [&](auto state_tag) {
      using state_t = decltype(state_tag);
      parallel_chunks(chunks, [&](int64_t c) {
        const Chunk& ch = chunks[c];
        state_t* buf = has_momentum ? momentum_buffers[ch.tensor].data_ptr<state_t>() + ch.begin : nullptr;
        for_update_chunk<scalar_t>(
            b, ch, *dir,
            [&](auto kF, auto kR, auto* p, auto* fp, auto* rp, int64_t n, op_t cf, op_t cr, op_t sf, op_t sr,
                int64_t offset) {
              SgdConsts<op_t> k = base;
              k.cf = cf, k.cr = cr, k.sf = sf, k.sr = sr, k.first_step = first[ch.tensor];
              auto run = [&](auto* p_, auto* f_, auto* r_, int64_t len, auto* buf_) {
                if (has_momentum) {
                  sgd_chunk<decltype(kF)::value, decltype(kR)::value, true>(p_, buf_, f_, r_, len, k);
                } else {
                  sgd_chunk<decltype(kF)::value, decltype(kR)::value, false>(p_, buf_, f_, r_, len, k);
                }
              };
              on_chunk(run, n, p, fp, rp, buf ? buf + offset : buf);
            });
      });
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "munba_kernels fused CPU kernels: Gram pass and bargained AdamW/SGD update pass, K players";
  // The kernels touch no Python objects, so other Python threads may run meanwhile.  The
  // scalar arguments follow the field order of AdamWHyper / SGDHyper (backends/base.py).
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gram_partials", &gram_partials, "chunk partials [n_chunks, K(K+1)/2] of gram(), in chunk order");
  m.def("sum_partials", &sum_partials, "the rows of [n, width] float64 partials summed in order");
  m.def("gram", &gram, "packed float64 Gram [K(K+1)/2] of grads[player][tensor] (None = zero)",
        py::arg("grads"), nogil);
  m.def("adamw", &adamw, "bargained AdamW update, in place", py::arg("params"), py::arg("grads"),
        py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"), py::arg("coefficients"), py::arg("skip"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("maximize"), nogil);
  m.def("sgd", &sgd, "bargained SGD update, in place", py::arg("params"), py::arg("grads"),
        py::arg("momentum_buffer"), py::arg("step"), py::arg("coefficients"), py::arg("skip"), py::arg("lr"),
        py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"), py::arg("weight_decay"),
        py::arg("maximize"), nogil);
}
