// Compute kernels of the hard and strict masked heads on CPU, forward and backward.
//
// Textually included inside one namespace per instruction set (see masked_attention_cpu_<isa>.cpp),
// after <algorithm>, <cmath>, <cstdint>, <cstring>, <limits>, <type_traits>, <utility> and <vector>; it includes
// nothing itself, so that no standard-library function gets compiled with the instruction set of
// the including file.
//
// Semantics (those of hmait.ops.masked_attention): a grid query i attends to the keys of its
// mask_size x mask_size box (truncated at the border) and to the P prefix keys, with logits
// s_ij = scale * q_i . k_j. In hard mode every other grid key has logit 0, so the c_i of them add
// exp(-m) * c_i to the denominator and exp(-m) * (sum of all grid v - sum of the box's v) to the
// numerator; the grid value sum is one reduction per (batch, head). In strict mode they are absent.
// Prefix queries attend to every token with plain logits, in both modes.
//
// Inner loops run over the head dimension in vectors (GCC / Clang vector extensions), read q, k, v, grad_out in
// their storage type and convert in registers; all arithmetic is in the accumulation type (float32
// for float32 / bfloat16 / float16, float64 for float64).

// Internal linkage: nothing here is exported, nothing is called through the PLT, and the compiler
// is free to inline.
namespace {

// The small helpers of the inner loops must be inlined whatever the compiler's size heuristics say.
#define HMAIT_INLINE inline __attribute__((always_inline))

// Bit casts through memcpy: well defined, and compiled to plain register moves.
HMAIT_INLINE float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

HMAIT_INLINE uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// bfloat16 is the upper half of a float32.
HMAIT_INLINE float bf16_to_float(uint16_t x) { return bits_to_float(uint32_t(x) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // NaN stays a quiet NaN
  // Round to nearest, ties to even, on the 16 dropped bits.
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// IEEE half to float without branches, so that the loops over the head dimension vectorise.
// Normal halves (and inf / NaN): move exponent and mantissa into float position, which leaves the
// exponent biased by 15 instead of 127, and fix the bias with one exact multiplication by 2^-112.
// Subnormal halves m * 2^-24: place m in the mantissa of 0.5 and subtract 0.5.
HMAIT_INLINE float f16_to_float(uint16_t x) {
  const uint32_t shifted = uint32_t(x) << 16;
  const uint32_t sign = shifted & 0x80000000u;
  const uint32_t unsigned_bits = shifted + shifted;  // sign dropped: exponent in bits 31..27
  const float normal = bits_to_float((unsigned_bits >> 4) + (224u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_to_float((unsigned_bits >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = unsigned_bits < (1u << 27) ? float_to_bits(subnormal) : float_to_bits(normal);
  return bits_to_float(sign | magnitude);
}

// Float to IEEE half, round to nearest even. Called once per stored element, so branches are fine.
inline uint16_t float_to_f16(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to 65520 or more: inf
  if (magnitude >= 0x38800000u) {                                 // a normal half (>= 2^-14)
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return uint16_t(sign | ((rounded >> 13) - (112u << 10)));     // rebias the exponent from 127 to 15
  }
  // Subnormal half: adding 0.5 rounds |f| to a multiple of 2^-24 (the ulp of 0.5), the half's unit.
  return uint16_t(sign | (float_to_bits(bits_to_float(magnitude) + 0.5f) - 0x3f000000u));
}

// Vectors of HMAIT_VECTOR_BYTES bytes (GCC / Clang vector extensions); the including file sets the
// width of its instruction set. Loads go through memcpy, which compiles to unaligned vector loads.
typedef float VecFloat __attribute__((vector_size(HMAIT_VECTOR_BYTES)));
typedef double VecDouble __attribute__((vector_size(HMAIT_VECTOR_BYTES)));
typedef uint32_t VecBits32 __attribute__((vector_size(HMAIT_VECTOR_BYTES)));
typedef uint16_t VecBits16 __attribute__((vector_size(HMAIT_VECTOR_BYTES / 2)));

template <typename To, typename From>
HMAIT_INLINE To bit_cast_to(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_to needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

template <typename V>
HMAIT_INLINE V load_vector(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
HMAIT_INLINE void store_vector(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Sum of the lanes by halving: log2(lanes) shuffles and adds, in registers.
template <typename E, int Bytes>
struct HorizontalSum {
  typedef E Full __attribute__((vector_size(Bytes)));
  static constexpr size_t kHalf = Bytes / sizeof(E) / 2;
  template <size_t... I>
  static HMAIT_INLINE E fold(const Full& v, std::index_sequence<I...>) {
    return HorizontalSum<E, Bytes / 2>::run(__builtin_shufflevector(v, v, I...) +
                                            __builtin_shufflevector(v, v, (I + kHalf)...));
  }
  static HMAIT_INLINE E run(const Full& v) { return fold(v, std::make_index_sequence<kHalf>{}); }
};

template <typename E>
struct HorizontalSum<E, int(2 * sizeof(E))> {
  typedef E Full __attribute__((vector_size(2 * sizeof(E))));
  static HMAIT_INLINE E run(const Full& v) { return v[0] + v[1]; }
};

// Largest lane, by the same halving.
template <typename E, int Bytes>
struct HorizontalMax {
  typedef E Full __attribute__((vector_size(Bytes)));
  static constexpr size_t kHalf = Bytes / sizeof(E) / 2;
  template <size_t... I>
  static HMAIT_INLINE E fold(const Full& v, std::index_sequence<I...>) {
    const auto low = __builtin_shufflevector(v, v, I...);
    const auto high = __builtin_shufflevector(v, v, (I + kHalf)...);
    return HorizontalMax<E, Bytes / 2>::run(low > high ? low : high);
  }
  static HMAIT_INLINE E run(const Full& v) { return fold(v, std::make_index_sequence<kHalf>{}); }
};

template <typename E>
struct HorizontalMax<E, int(2 * sizeof(E))> {
  typedef E Full __attribute__((vector_size(2 * sizeof(E))));
  static HMAIT_INLINE E run(const Full& v) { return v[0] > v[1] ? v[0] : v[1]; }
};

// Sums of the lanes of several float vectors at once (4, 8 or 16 lanes: blocks of four lanes, the
// 128-bit units of SSE / AVX / AVX-512). Two in-block steps map four vectors (a, b, c, d) to one whose
// block k holds the sums of block k of a, b, c, d; then block steps add neighbouring blocks until each
// lane holds a whole sum. For n vectors, lane i of result vector i / lanes is the sum of input i.
// Every step is two shuffles of a kind each instruction set has as one instruction (shufps within
// blocks, a 128-bit permute across them) and an add, shared by two inputs; one horizontal sum per
// vector would cost log2(lanes) shuffles and adds each.
constexpr int in_block_index(int lane, int lanes, int odd) {
  // Lanes 0, 1 of a block: pairs of a's block; lanes 2, 3: pairs of b's (at lanes + ...).
  return (lane % 4 < 2 ? 0 : lanes) + lane / 4 * 4 + 2 * (lane % 2) + odd;
}

constexpr int block_index(int lane, int lanes, int odd) {
  // The low half of the blocks: pairs of a's blocks; the high half: pairs of b's.
  const int half = lanes / 8, block = lane / 4;
  return (block < half ? 8 * block : lanes + 8 * (block - half)) + lane % 4 + 4 * odd;
}

template <typename V, int Lanes, bool InBlock, size_t... I>
HMAIT_INLINE V pair_sums(const V& a, const V& b, std::index_sequence<I...>) {
  if constexpr (InBlock) {
    return __builtin_shufflevector(a, b, in_block_index(int(I), Lanes, 0)...) +
           __builtin_shufflevector(a, b, in_block_index(int(I), Lanes, 1)...);
  } else {
    return __builtin_shufflevector(a, b, block_index(int(I), Lanes, 0)...) +
           __builtin_shufflevector(a, b, block_index(int(I), Lanes, 1)...);
  }
}

// Step is the number of steps done: 0 and 1 in blocks, then across blocks until 2^Step == Lanes.
template <typename V, int Lanes, int N, int Step = 0>
struct LaneSums {
  static_assert(Lanes == 4 || Lanes == 8 || Lanes == 16, "LaneSums works on 4, 8 or 16 float lanes");
  // Reduces v[0..N) in place; the sums end up in v[0 .. ceil(N / Lanes)).
  static HMAIT_INLINE void run(V* v) {
    if constexpr ((1 << Step) < Lanes) {
      constexpr bool in_block = Step < 2;
      const auto lanes = std::make_index_sequence<Lanes>{};
      for (int i = 0; i < N / 2; ++i) v[i] = pair_sums<V, Lanes, in_block>(v[2 * i], v[2 * i + 1], lanes);
      if constexpr (N % 2 == 1) v[N / 2] = pair_sums<V, Lanes, in_block>(v[N - 1], V{}, lanes);
      LaneSums<V, Lanes, (N + 1) / 2, Step + 1>::run(v);
    }
  }
};

// Asks for the cache lines of n elements at p ahead of their use.
template <typename S>
inline void prefetch(const S* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t offset = 0; offset < n * int64_t(sizeof(S)); offset += 64) __builtin_prefetch(bytes + offset, 0, 3);
}

// Sixteen-bit floats to float32 lanes: widen to 32 bits, then the same bit operations as above.
HMAIT_INLINE VecFloat bf16_to_float_vector(const uint16_t* p) {
  return bit_cast_to<VecFloat>(__builtin_convertvector(load_vector<VecBits16>(p), VecBits32) << 16);
}

// float_to_bf16 on whole vectors (round to nearest even, NaN kept quiet): the bfloat16 bits in the low
// half of each 32-bit lane.
HMAIT_INLINE VecBits32 float_to_bf16_lanes(const VecFloat& x) {
  const VecBits32 bits = bit_cast_to<VecBits32>(x);
  const VecBits32 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const VecBits32 nan = (bits >> 16) | 0x40u;
  return (bits & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
}

// ... stored as sixteen-bit lanes.
HMAIT_INLINE void float_to_bf16_vector(uint16_t* p, const VecFloat& x) {
  store_vector(p, __builtin_convertvector(float_to_bf16_lanes(x), VecBits16));
}

HMAIT_INLINE VecFloat f16_to_float_vector(const uint16_t* p) {
  const VecBits32 shifted = __builtin_convertvector(load_vector<VecBits16>(p), VecBits32) << 16;
  const VecBits32 sign = shifted & 0x80000000u;
  const VecBits32 unsigned_bits = shifted + shifted;
  const VecFloat normal = bit_cast_to<VecFloat>((unsigned_bits >> 4) + (224u << 23)) * 0x1.0p-112f;
  const VecFloat subnormal = bit_cast_to<VecFloat>((unsigned_bits >> 17) | (126u << 23)) - 0.5f;
  const VecBits32 magnitude =
      unsigned_bits < (1u << 27) ? bit_cast_to<VecBits32>(subnormal) : bit_cast_to<VecBits32>(normal);
  return bit_cast_to<VecFloat>(sign | magnitude);
}

struct BFloat16Tag {};
struct Float16Tag {};

// Per input dtype: storage type S, accumulation type A, and vector V of A with `lanes` lanes.
template <typename T> struct Traits;

template <> struct Traits<float> {
  using storage = float;
  using acc = float;
  using vec = VecFloat;
  static inline float load(float x) { return x; }
  static HMAIT_INLINE vec load_lanes(const float* p) { return load_vector<VecFloat>(p); }
  static inline float store(float x) { return x; }
  static HMAIT_INLINE void store_lanes(float* p, const vec& v) { store_vector(p, v); }
};

template <> struct Traits<double> {
  using storage = double;
  using acc = double;
  using vec = VecDouble;
  static inline double load(double x) { return x; }
  static HMAIT_INLINE vec load_lanes(const double* p) { return load_vector<VecDouble>(p); }
  static inline double store(double x) { return x; }
  static HMAIT_INLINE void store_lanes(double* p, const vec& v) { store_vector(p, v); }
};

template <> struct Traits<BFloat16Tag> {
  using storage = uint16_t;
  using acc = float;
  using vec = VecFloat;
  static inline float load(uint16_t x) { return bf16_to_float(x); }
  static HMAIT_INLINE vec load_lanes(const uint16_t* p) { return bf16_to_float_vector(p); }
  static inline uint16_t store(float x) { return float_to_bf16(x); }
  static HMAIT_INLINE void store_lanes(uint16_t* p, const vec& v) { float_to_bf16_vector(p, v); }
};

template <> struct Traits<Float16Tag> {
  using storage = uint16_t;
  using acc = float;
  using vec = VecFloat;
  static inline float load(uint16_t x) { return f16_to_float(x); }
  static HMAIT_INLINE vec load_lanes(const uint16_t* p) { return f16_to_float_vector(p); }
  static inline uint16_t store(float x) { return float_to_f16(x); }
  static HMAIT_INLINE void store_lanes(uint16_t* p, const vec& v) {
    for (size_t l = 0; l < sizeof(vec) / sizeof(float); ++l) p[l] = float_to_f16(v[l]);
  }
};

// A per-row buffer in the accumulation type: on the stack when the size is known at compile time.
template <typename A, int64_t D>
struct Row {
  alignas(64) A values[D];
  explicit Row(int64_t) {}
  A* data() { return values; }
};

template <typename A>
struct Row<A, 0> {
  std::vector<A> values;
  explicit Row(int64_t n) : values(n) {}
  A* data() { return values.data(); }
};

// exp in float32 without a library call, so that it vectorises: exp(x) = 2^n * exp(r) with
// n = round(x / ln 2) and |r| <= ln(2) / 2, where a degree-7 Taylor polynomial is accurate to
// about 5e-9 relative. Results below 2^-126 flush to 0; NaN propagates.
HMAIT_INLINE float exp_acc(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
  const float shifter = 12582912.0f;
  const float shifted = clamped * 1.44269504088896341f + shifter;
  const float n = shifted - shifter;
  // ln 2 in two parts (Cody and Waite), the first exact in a few bits, so n * hi has no rounding error.
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent = int32_t(float_to_bits(shifted) - float_to_bits(shifter));
  const float y = p * bits_to_float(uint32_t(exponent + 127) << 23);
  const float flushed = x < -87.0f ? 0.0f : y;
  return x != x ? x : flushed;
}

inline double exp_acc(double x) { return std::exp(x); }
// The same exp on whole vectors of float32.
HMAIT_INLINE VecFloat exp_lanes(const VecFloat& x) {
  const VecFloat low = VecFloat{} - 87.0f, high = VecFloat{} + 88.0f;
  const VecFloat clamped = x < low ? low : (x > high ? high : x);
  const VecFloat shifter = VecFloat{} + 12582912.0f;
  const VecFloat shifted = clamped * 1.44269504088896341f + shifter;
  const VecFloat n = shifted - shifter;
  const VecFloat r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  VecFloat p = VecFloat{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VecBits32 exponent = bit_cast_to<VecBits32>(shifted) - float_to_bits(12582912.0f);
  const VecFloat y = p * bit_cast_to<VecFloat>((exponent + 127u) << 23);
  const VecFloat flushed = x < low ? VecFloat{} : y;
  return x != x ? x : flushed;
}

// values[i] = exp(values[i] - shift) for i < n; the buffer holds a whole number of vectors.
HMAIT_INLINE void exp_shifted(float* values, int64_t n, float shift) {
  constexpr int64_t lanes = HMAIT_VECTOR_BYTES / sizeof(float);
  for (int64_t i = 0; i < n; i += lanes)
    store_vector(values + i, exp_lanes(load_vector<VecFloat>(values + i) - shift));
}

inline void exp_shifted(double* values, int64_t n, double shift) {
  for (int64_t i = 0; i < n; ++i) values[i] = std::exp(values[i] - shift);
}

// Elements of a buffer that exp_shifted and exp_normalise may touch for n values.
inline int64_t padded(int64_t n) {
  constexpr int64_t lanes = HMAIT_VECTOR_BYTES / sizeof(float);
  return (n + lanes - 1) / lanes * lanes;
}

// The softmax of n logits without serial chains: m = max(logits, lower), values = exp(values - m);
// returns the sum of the exponentials. The buffer holds padded(n) elements; the padding is set to
// -inf, so it adds nothing.
HMAIT_INLINE float exp_normalise(float* values, int64_t n, float lower, float& m) {
  constexpr int64_t lanes = HMAIT_VECTOR_BYTES / sizeof(float);
  const int64_t total = padded(n);
  for (int64_t i = n; i < total; ++i) values[i] = -std::numeric_limits<float>::infinity();
  VecFloat largest = VecFloat{} + lower;
  for (int64_t i = 0; i < total; i += lanes) {
    const VecFloat x = load_vector<VecFloat>(values + i);
    largest = x > largest ? x : largest;
  }
  m = HorizontalMax<float, HMAIT_VECTOR_BYTES>::run(largest);
  VecFloat sum = {};
  for (int64_t i = 0; i < total; i += lanes) {
    const VecFloat e = exp_lanes(load_vector<VecFloat>(values + i) - m);
    store_vector(values + i, e);
    sum += e;
  }
  return HorizontalSum<float, HMAIT_VECTOR_BYTES>::run(sum);
}

inline double exp_normalise(double* values, int64_t n, double lower, double& m) {
  m = lower;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, values[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += values[i] = std::exp(values[i] - m);
  return sum;
}

// D > 0: head_dim == value_dim == D known at compile time, so the loops over channels unroll and the
// per-row accumulators live in registers. D == 0: any head and value sizes.
template <typename T, int64_t D>
struct MaskedKernel {
  using Tr = Traits<T>;
  using S = typename Tr::storage;
  using A = typename Tr::acc;
  using V = typename Tr::vec;
  static constexpr int64_t lanes = HMAIT_VECTOR_BYTES / sizeof(A);

  const Args& a;
  const int64_t heads, P, h, w, hw, N, d_, dv_, radius;
  const bool hard;
  const A scale;
  const bool heads_outer;

  explicit MaskedKernel(const Args& args)
      : a(args), heads(args.heads), P(args.num_prefix), h(args.h), w(args.w), hw(args.h * args.w),
        N(args.num_prefix + args.h * args.w), d_(args.head_dim), dv_(args.value_dim), radius(args.mask_size / 2),
        hard(args.hard), scale(A(args.scale)),
        heads_outer(mostly_head_planes(args)) {}

  // Whether most of the tensors a stage touches hold each head as a plane of its own (head stride above
  // token stride, e.g. (B, heads, N, d) tensors seen as (B, N, heads, d)); the grid stages then take the
  // heads outermost, so that consecutive items read and write neighbouring memory.
  static bool mostly_head_planes(const Args& args) {
    int planes = 0, views = 0;
    for (const View* view : {&args.q, &args.k, &args.v, &args.out, &args.grad_out, &args.grad_q, &args.grad_k,
                             &args.grad_v}) {
      if (view->data == nullptr) continue;
      ++views;
      planes += view->stride_h > view->stride_n;
    }
    return 2 * planes > views;
  }

  int64_t d() const { return D > 0 ? D : d_; }
  int64_t dv() const { return D > 0 ? D : dv_; }

  const S* at(const View& view, int64_t b, int64_t token, int64_t head) const {
    return static_cast<const S*>(view.data) + b * view.stride_b + token * view.stride_n + head * view.stride_h;
  }

  // Row (b, token, head) of a tensor the stage writes (an output or a gradient).
  S* at_mut(const View& view, int64_t b, int64_t token, int64_t head) const {
    return const_cast<S*>(at(view, b, token, head));
  }

  A* lse() const { return static_cast<A*>(a.lse); }
  A* delta() const { return static_cast<A*>(a.delta); }
  A* value_sum() const { return static_cast<A*>(a.value_sum); }
  A* outside_prob() const { return static_cast<A*>(a.outside_prob); }

  // Rows [r0, r1] and columns [c0, c1] of the truncated box around grid position (row, col).
  void box(int64_t row, int64_t col, int64_t& r0, int64_t& r1, int64_t& c0, int64_t& c1) const {
    r0 = std::max<int64_t>(row - radius, 0);
    r1 = std::min<int64_t>(row + radius, h - 1);
    c0 = std::max<int64_t>(col - radius, 0);
    c1 = std::min<int64_t>(col + radius, w - 1);
  }

  // Grid positions are visited in vertical strips of kStripWidth columns, row by row inside a strip:
  // the rows around the current one then stay in the core's cache however wide the grid is.
  static constexpr int64_t kStripWidth = 32;

  // A work item of the grid stages: batch b, grid position (row, col), head; strip order with the
  // heads innermost for token-major tensors, outermost (after the batch) for head planes. Advancing it
  // costs no division (the 64-bit divisions of decoding every item from its index were a good part of
  // the per-query cost).
  struct Cursor {
    int64_t b, row, col, head, strip_start, strip_stop;
  };

  Cursor cursor_at(int64_t item) const {
    Cursor c;
    int64_t i;
    if (heads_outer) {
      const int64_t bh = item / hw;
      c.b = bh / heads;
      c.head = bh % heads;
      i = item % hw;
    } else {
      c.head = item % heads;
      c.b = item / heads / hw;
      i = item / heads % hw;
    }
    const int64_t strip_size = h * kStripWidth;
    c.strip_start = i / strip_size * kStripWidth;
    c.strip_stop = std::min(c.strip_start + kStripWidth, w);
    const int64_t width = c.strip_stop - c.strip_start, offset = i % strip_size;
    c.row = offset / width;
    c.col = c.strip_start + offset % width;
    return c;
  }

  void advance(Cursor& c) const {
    if (!heads_outer) {
      if (++c.head < heads) return;
      c.head = 0;
    }
    if (++c.col < c.strip_stop) return;
    c.col = c.strip_start;
    if (++c.row < h) return;
    c.row = 0;
    c.strip_start = c.strip_stop < w ? c.strip_stop : 0;
    c.strip_stop = std::min(c.strip_start + kStripWidth, w);
    c.col = c.strip_start;
    if (c.strip_start != 0) return;
    if (heads_outer && ++c.head < heads) return;
    c.head = 0;
    ++c.b;
  }

  // Whether grid query g has non-neighbour grid tokens (so hard mode gives it an outside term).
  bool has_outside(int64_t g) const {
    int64_t r0, r1, c0, c1;
    box(g / w, g % w, r0, r1, c0, c1);
    return hard && (r1 - r0 + 1) * (c1 - c0 + 1) < hw;
  }

  // ---- vector primitives over the channels ----

  // Loops run over whole vectors up to `full`, then element by element; with a compile-time n that is
  // a multiple of the vector width the element loop disappears.
  static HMAIT_INLINE A dot(const A* x, const S* y, int64_t n) {
    const int64_t full = n - n % lanes;
    V s0 = {}, s1 = {};
    int64_t c = 0;
    for (; c + 2 * lanes <= full; c += 2 * lanes) {
      s0 += load_vector<V>(x + c) * Tr::load_lanes(y + c);
      s1 += load_vector<V>(x + c + lanes) * Tr::load_lanes(y + c + lanes);
    }
    if (c < full) s0 += load_vector<V>(x + c) * Tr::load_lanes(y + c);
    A sum = HorizontalSum<A, HMAIT_VECTOR_BYTES>::run(s0 + s1);
    for (int64_t t = full; t < n; ++t) sum += x[t] * Tr::load(y[t]);
    return sum;
  }

  static HMAIT_INLINE A dot_storage(const S* x, const S* y, int64_t n) {
    const int64_t full = n - n % lanes;
    V s0 = {};
    for (int64_t c = 0; c < full; c += lanes) s0 += Tr::load_lanes(x + c) * Tr::load_lanes(y + c);
    A sum = HorizontalSum<A, HMAIT_VECTOR_BYTES>::run(s0);
    for (int64_t t = full; t < n; ++t) sum += Tr::load(x[t]) * Tr::load(y[t]);
    return sum;
  }

  static HMAIT_INLINE void axpy(A* acc, A alpha, const S* x, int64_t n) {
    const int64_t full = n - n % lanes;
    const V factor = V{} + alpha;
    for (int64_t c = 0; c < full; c += lanes)
      store_vector(acc + c, load_vector<V>(acc + c) + factor * Tr::load_lanes(x + c));
    for (int64_t t = full; t < n; ++t) acc[t] += alpha * Tr::load(x[t]);
  }

  static HMAIT_INLINE void load(A* dst, const S* src, int64_t n) {
    const int64_t full = n - n % lanes;
    for (int64_t c = 0; c < full; c += lanes) store_vector(dst + c, Tr::load_lanes(src + c));
    for (int64_t t = full; t < n; ++t) dst[t] = Tr::load(src[t]);
  }

  static inline void fill(A* dst, A value, int64_t n) {
    for (int64_t c = 0; c < n; ++c) dst[c] = value;
  }

  static HMAIT_INLINE void store(S* dst, const A* src, A factor, int64_t n) {
    const int64_t full = n - n % lanes;
    for (int64_t c = 0; c < full; c += lanes) Tr::store_lanes(dst + c, load_vector<V>(src + c) * factor);
    for (int64_t t = full; t < n; ++t) dst[t] = Tr::store(src[t] * factor);
  }

  // ---- forward ----

  // The key and value that enter the box of grid position (row, col) a few queries from now (the
  // hardware prefetchers miss this pattern: a couple of cache lines per token, a token row apart).
  HMAIT_INLINE void prefetch_box_ahead(int64_t b, int64_t row, int64_t col, int64_t head) const {
    const int64_t ahead = P + std::min(row + radius, h - 1) * w + std::min(col + radius + 2, w - 1);
    prefetch(at(a.k, b, ahead, head), d());
    prefetch(at(a.v, b, ahead, head), dv());
  }

  // Hard mode: the sum of all grid values of (b, head), which every query with non-neighbours needs.
  void value_sum_stage(int64_t begin, int64_t end) const {
    Row<A, D> even(dv()), odd(dv());
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, head = bh % heads;
      // Two accumulators, alternate tokens: half the dependency chain of the adds.
      fill(even.data(), A(0), dv());
      fill(odd.data(), A(0), dv());
      const S* value = at(a.v, b, P, head);
      int64_t g = 0;
      for (; g + 1 < hw; g += 2, value += 2 * a.v.stride_n) {
        axpy(even.data(), A(1), value, dv());
        axpy(odd.data(), A(1), value + a.v.stride_n, dv());
      }
      if (g < hw) axpy(even.data(), A(1), value, dv());
      A* sum = value_sum() + bh * dv();
      for (int64_t c = 0; c < dv(); ++c) sum[c] = even.data()[c] + odd.data()[c];
    }
  }

  // The interior fast path: a 3x3 box that the border does not cut, no prefix tokens, and a head size
  // known at compile time. The nine offsets are constants of the call, q and the accumulator stay in
  // registers, and the nine logits are reduced together (LaneSums).
  static constexpr bool kHasFastPath = std::is_same<A, float>::value && D > 0 && D % lanes == 0;
  static constexpr int64_t kBox = 9;
  static constexpr int64_t kBoxVectors = (kBox + lanes - 1) / lanes;
  // Vectors per row of D channels on the fast path.
  static constexpr int64_t kRowVectors = kHasFastPath ? D / lanes : 1;

  bool fast_path_applies() const { return kHasFastPath && P == 0 && a.mask_size == 3; }

  bool interior(const Cursor& c) const { return c.row >= 1 && c.row + 1 < h && c.col >= 1 && c.col + 1 < w; }

  // Offsets (in elements) of the 3x3 box's tokens from its centre, row-major.
  void box_offsets(const View& view, int64_t* offsets) const {
    for (int64_t dr = -1, j = 0; dr <= 1; ++dr)
      for (int64_t dc = -1; dc <= 1; ++dc, ++j) offsets[j] = (dr * w + dc) * view.stride_n;
  }

  HMAIT_INLINE void forward_interior(const Cursor& c, const int64_t* key_offsets, const int64_t* value_offsets,
                                     A* weight) const {
    constexpr int64_t nv = kRowVectors;
    const int64_t b = c.b, head = c.head, bh = b * heads + head, g = c.row * w + c.col;
    prefetch_box_ahead(b, c.row, c.col, head);
    V q[nv];
    load_row(at(a.q, b, g, head), q);
    // Logits: per key a vector of partial products, then the lane sums of all nine at once.
    V part[kBox];
    box_dots(q, at(a.q, b, g, head), at(a.k, b, g, head), key_offsets, part);
    // Lanes past the ninth logit hold zeros: -inf there keeps them out of the max and the sum.
    const bool with_outside = hard && hw > kBox;
    V largest = V{} + (with_outside ? A(0) : -std::numeric_limits<A>::infinity());
    for (int64_t i = 0; i < kBoxVectors; ++i) {
      V index = {};
      for (int64_t l = 0; l < lanes; ++l) index[l] = A(i * lanes + l);
      part[i] = index < A(kBox) ? part[i] * scale : V{} - std::numeric_limits<A>::infinity();
      largest = part[i] > largest ? part[i] : largest;
    }
    const A m = HorizontalMax<A, HMAIT_VECTOR_BYTES>::run(largest);
    V total = {};
    for (int64_t i = 0; i < kBoxVectors; ++i) {
      const V e = exp_lanes(part[i] - m);
      total += e;
      store_vector(weight + i * lanes, e);
    }
    A denom = HorizontalSum<A, HMAIT_VECTOR_BYTES>::run(total);
    // exp(-m) per non-neighbour, folded into the weights as in the general path.
    const A outside_weight = with_outside ? exp_acc(-m) : A(0);
    denom += outside_weight * A(hw - kBox);
    V acc[nv];
    if (with_outside) {
      load_accumulators(value_sum() + bh * D, outside_weight, acc);
    } else {
      for (int64_t t = 0; t < nv; ++t) acc[t] = V{};
    }
    for (int64_t j = 0; j < kBox; ++j) weight[j] -= outside_weight;
    box_axpy(acc, weight, at(a.v, b, g, head), value_offsets);
    store_row(at_mut(a.out, b, g, head), acc, A(1) / denom);
    lse()[bh * N + g] = m + std::log(denom);
  }

  // ---- rows of D channels in registers, on the fast path ----
  // A row is kRowVectors vectors. bfloat16 rows (kPairs) hold their channels in pairs: a vector of
  // 2 * lanes bfloat16 read at once holds, in each 32-bit lane, an even channel (low half) and the next
  // odd one (high half), so two bit operations give both as float32 (x << 16 and x & 0xffff0000), where
  // widening 16-bit lanes costs a load and two operations per half. Vectors 2t and 2t + 1 of such a
  // row hold the even and the odd channels of channels [2t * lanes, (2t + 2) * lanes). Dot products
  // (a sum over all lanes) do not see the order; loads and stores of rows translate it.
  static constexpr bool kPairs = std::is_same<T, BFloat16Tag>::value && kHasFastPath && kRowVectors % 2 == 0;

  static HMAIT_INLINE void split_pairs(const S* p, V& even, V& odd) {
    const VecBits32 bits = load_vector<VecBits32>(p);
    even = bit_cast_to<V>(bits << 16);
    odd = bit_cast_to<V>(bits & 0xffff0000u);
  }

  // The row at p (storage type) into registers.
  static HMAIT_INLINE void load_row(const S* p, V* x) {
    constexpr int64_t nv = kRowVectors;
    if constexpr (kPairs) {
      for (int64_t t = 0; t < nv / 2; ++t) split_pairs(p + 2 * t * lanes, x[2 * t], x[2 * t + 1]);
    } else {
      for (int64_t t = 0; t < nv; ++t) x[t] = Tr::load_lanes(p + t * lanes);
    }
  }

  template <size_t... I>
  static HMAIT_INLINE V even_lanes(const V& low, const V& high, std::index_sequence<I...>) {
    return __builtin_shufflevector(low, high, int(2 * I)...);
  }
  template <size_t... I>
  static HMAIT_INLINE V odd_lanes(const V& low, const V& high, std::index_sequence<I...>) {
    return __builtin_shufflevector(low, high, int(2 * I + 1)...);
  }

  // acc = factor * the D accumulation-type values at src (channels in order).
  static HMAIT_INLINE void load_accumulators(const A* src, A factor, V* acc) {
    constexpr int64_t nv = kRowVectors;
    for (int64_t t = 0; t < nv; ++t) acc[t] = factor * load_vector<V>(src + t * lanes);
    if constexpr (kPairs) {
      constexpr auto indices = std::make_index_sequence<size_t(lanes)>{};
      for (int64_t t = 0; t < nv / 2; ++t) {
        const V low = acc[2 * t], high = acc[2 * t + 1];
        acc[2 * t] = even_lanes(low, high, indices);
        acc[2 * t + 1] = odd_lanes(low, high, indices);
      }
    }
  }

  // dst = factor * the D accumulators in registers, in the storage type.
  static HMAIT_INLINE void store_row(S* dst, const V* acc, A factor) {
    constexpr int64_t nv = kRowVectors;
    if constexpr (kPairs) {
      // float_to_bf16 of the even and the odd channels, rounded into the halves of each 32-bit lane.
      for (int64_t t = 0; t < nv / 2; ++t) {
        const VecBits32 low = float_to_bf16_lanes(acc[2 * t] * factor);
        const VecBits32 high = float_to_bf16_lanes(acc[2 * t + 1] * factor) << 16;
        store_vector(dst + 2 * t * lanes, high | low);
      }
    } else {
      for (int64_t t = 0; t < nv; ++t) Tr::store_lanes(dst + t * lanes, acc[t] * factor);
    }
  }

  // part[j] = the dot product of x, the row at x_row in registers (load_row), with the row at
  // base + offsets[j], for the nine tokens of the box, reduced together: the products end up in the
  // first nine lanes of part[0..).
  static HMAIT_INLINE void box_dots(const V* x, const S* x_row, const S* base, const int64_t* offsets, V* part) {
    constexpr int64_t nv = kRowVectors;
#ifdef HMAIT_BF16_DOT
    // One bfloat16 dot-product instruction per vector of channel pairs, on the rows as stored.
    VecBits32 x_pairs[kPairs ? nv / 2 : 1];
    if constexpr (kPairs) {
      for (int64_t t = 0; t < nv / 2; ++t) x_pairs[t] = load_vector<VecBits32>(x_row + 2 * t * lanes);
    }
#endif
    for (int64_t j = 0; j < kBox; ++j) {
      const S* y = base + offsets[j];
      V sum;
      if constexpr (kPairs) {
#ifdef HMAIT_BF16_DOT
        sum = HMAIT_BF16_DOT(V{}, x_pairs[0], load_vector<VecBits32>(y));
        for (int64_t t = 1; t < nv / 2; ++t)
          sum = HMAIT_BF16_DOT(sum, x_pairs[t], load_vector<VecBits32>(y + 2 * t * lanes));
#else
        V even, odd;
        split_pairs(y, even, odd);
        sum = x[0] * even + x[1] * odd;
        for (int64_t t = 1; t < nv / 2; ++t) {
          split_pairs(y + 2 * t * lanes, even, odd);
          sum += x[2 * t] * even + x[2 * t + 1] * odd;
        }
#endif
      } else {
        sum = x[0] * Tr::load_lanes(y);
        for (int64_t t = 1; t < nv; ++t) sum += x[t] * Tr::load_lanes(y + t * lanes);
      }
      part[j] = sum;
    }
    LaneSums<V, int(lanes), int(kBox)>::run(part);
  }

  // acc += sum_j weight[j] * (the row at base + offsets[j]), over the nine tokens of the box.
  static HMAIT_INLINE void box_axpy(V* acc, const A* weight, const S* base, const int64_t* offsets) {
    constexpr int64_t nv = kRowVectors;
    for (int64_t j = 0; j < kBox; ++j) {
      const V factor = V{} + weight[j];
      const S* y = base + offsets[j];
      if constexpr (kPairs) {
        for (int64_t t = 0; t < nv / 2; ++t) {
          V even, odd;
          split_pairs(y + 2 * t * lanes, even, odd);
          acc[2 * t] += factor * even;
          acc[2 * t + 1] += factor * odd;
        }
      } else {
        for (int64_t t = 0; t < nv; ++t) acc[t] += factor * Tr::load_lanes(y + t * lanes);
      }
    }
  }

  // Backward of one interior grid position g: grad_q of query g and grad_k, grad_v of key g, as in
  // backward_grid, with the 36 dot products of the box reduced nine at a time.
  // offsets: the box offsets in q, k, v, grad_out and in tokens (box_offsets).
  HMAIT_INLINE void backward_interior(const Cursor& c, const int64_t (*offsets)[kBox], A* buffer) const {
    constexpr int64_t nv = kRowVectors;
    const int64_t* q_offsets = offsets[0];
    const int64_t* k_offsets = offsets[1];
    const int64_t* v_offsets = offsets[2];
    const int64_t* go_offsets = offsets[3];
    const int64_t* token_offsets = offsets[4];
    const int64_t b = c.b, head = c.head, bh = b * heads + head, g = c.row * w + c.col;
    const A* lse_bh = lse() + bh * N;
    const A* delta_bh = delta() + bh * N;
    const S* query = at(a.q, b, g, head);
    const S* key = at(a.k, b, g, head);
    const S* value = at(a.v, b, g, head);
    const S* go = at(a.grad_out, b, g, head);
    A* ds = buffer;                            // kBoxVectors * lanes each
    A* row_lse = buffer + kBoxVectors * lanes;
    A* row_delta = row_lse + kBoxVectors * lanes;
    A* row_outside = row_delta + kBoxVectors * lanes;
    A* weight_v = row_outside + kBoxVectors * lanes;
    V x[nv], y[nv], acc[nv], part[kBox], part2[kBox];

    // grad_q of query g: scale * sum_j p_gj (grad_out_g . v_j - delta_g) k_j.
    load_row(query, x);
    load_row(go, y);
    box_dots(x, query, key, k_offsets, part);
    box_dots(y, go, value, v_offsets, part2);
    const A lse_g = lse_bh[g], delta_g = delta_bh[g];
    for (int64_t i = 0; i < kBoxVectors; ++i)
      store_vector(ds + i * lanes, exp_lanes(part[i] * scale - lse_g) * (part2[i] - delta_g));
    for (int64_t t = 0; t < nv; ++t) acc[t] = V{};
    box_axpy(acc, ds, key, k_offsets);
    store_row(at_mut(a.grad_q, b, g, head), acc, scale);

    // grad_k, grad_v of key g over the queries i of its box: p_ig = exp(scale q_i . k_g - lse_i).
    for (int64_t j = 0; j < kBox; ++j) {
      const int64_t i = g + token_offsets[j];
      row_lse[j] = lse_bh[i];
      row_delta[j] = delta_bh[i];
      if (hard) row_outside[j] = outside_prob()[bh * N + i];
    }
    load_row(key, x);
    load_row(value, y);
    box_dots(x, key, query, q_offsets, part);
    box_dots(y, value, go, go_offsets, part2);
    for (int64_t i = 0; i < kBoxVectors; ++i) {
      const V p = exp_lanes(part[i] * scale - load_vector<V>(row_lse + i * lanes));
      store_vector(ds + i * lanes, p * (part2[i] - load_vector<V>(row_delta + i * lanes)));
      // The shared outside gradient counted v_g as outside for every query; the box's queries see it.
      store_vector(weight_v + i * lanes, hard ? p - load_vector<V>(row_outside + i * lanes) : p);
    }
    for (int64_t t = 0; t < nv; ++t) acc[t] = V{};
    box_axpy(acc, ds, query, q_offsets);
    store_row(at_mut(a.grad_k, b, g, head), acc, scale);
    if (hard) {
      load_accumulators(value_sum() + bh * D, A(1), acc);
    } else {
      for (int64_t t = 0; t < nv; ++t) acc[t] = V{};
    }
    box_axpy(acc, weight_v, go, go_offsets);
    store_row(at_mut(a.grad_v, b, g, head), acc, A(1));
  }

  void forward_grid(int64_t begin, int64_t end) const {
    Row<A, D> q(d()), acc(dv());
    std::vector<A> weight(padded(P + (2 * radius + 1) * (2 * radius + 1)));
    const bool fast = fast_path_applies();
    int64_t key_offsets[kBox], value_offsets[kBox];
    box_offsets(a.k, key_offsets);
    box_offsets(a.v, value_offsets);
    alignas(64) A fast_weight[kBoxVectors * lanes];
    Cursor cursor = cursor_at(begin);
    for (int64_t item = begin; item < end; ++item, advance(cursor)) {
      if constexpr (kHasFastPath) {
        if (fast && interior(cursor)) {
          forward_interior(cursor, key_offsets, value_offsets, fast_weight);
          continue;
        }
      }
      const int64_t b = cursor.b, head = cursor.head, bh = b * heads + head, g = cursor.row * w + cursor.col;
      int64_t r0, r1, c0, c1;
      box(cursor.row, cursor.col, r0, r1, c0, c1);
      prefetch_box_ahead(b, cursor.row, cursor.col, head);
      load(q.data(), at(a.q, b, P + g, head), d());

      // Logits of the prefix keys, then of the box, row by row.
      int64_t count = 0;
      for (int64_t p = 0; p < P; ++p) weight[count++] = scale * dot(q.data(), at(a.k, b, p, head), d());
      for (int64_t r = r0; r <= r1; ++r) {
        const S* key = at(a.k, b, P + r * w + c0, head);
        for (int64_t c = c0; c <= c1; ++c, key += a.k.stride_n) weight[count++] = scale * dot(q.data(), key, d());
      }
      const int64_t outside = hw - (count - P);
      const bool with_outside = hard && outside > 0;

      // Non-neighbours have logit 0: include it in the stabiliser where they exist.
      A m;
      A denom = exp_normalise(weight.data(), count, with_outside ? A(0) : -std::numeric_limits<A>::infinity(), m);
      // exp(-m) per non-neighbour; where there are none it would only risk overflow.
      const A outside_weight = with_outside ? exp_acc(-m) : A(0);
      denom += outside_weight * A(outside);

      // Numerator: exp(-m) * (all grid v - box v) + sum_j w_j v_j = exp(-m) * all + sum_j (w_j - exp(-m)) v_j.
      if (with_outside) {
        const A* sum = value_sum() + bh * dv();
        for (int64_t c = 0; c < dv(); ++c) acc.data()[c] = outside_weight * sum[c];
      } else {
        fill(acc.data(), A(0), dv());
      }
      count = 0;
      for (int64_t p = 0; p < P; ++p) axpy(acc.data(), weight[count++], at(a.v, b, p, head), dv());
      for (int64_t r = r0; r <= r1; ++r) {
        const S* value = at(a.v, b, P + r * w + c0, head);
        for (int64_t c = c0; c <= c1; ++c, value += a.v.stride_n)
          axpy(acc.data(), weight[count++] - outside_weight, value, dv());
      }
      store(at_mut(a.out, b, P + g, head), acc.data(), A(1) / denom, dv());
      lse()[bh * N + P + g] = m + std::log(denom);
    }
  }

  void forward_prefix(int64_t begin, int64_t end) const {
    Row<A, D> q(d()), acc(dv());
    std::vector<A> weight(padded(N));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / P, p = item % P, b = bh / heads, head = bh % heads;
      load(q.data(), at(a.q, b, p, head), d());
      A m = -std::numeric_limits<A>::infinity();
      for (int64_t j = 0; j < N; ++j) {
        weight[j] = scale * dot(q.data(), at(a.k, b, j, head), d());
        m = std::max(m, weight[j]);
      }
      exp_shifted(weight.data(), N, m);
      A denom = 0;
      for (int64_t j = 0; j < N; ++j) denom += weight[j];
      fill(acc.data(), A(0), dv());
      for (int64_t j = 0; j < N; ++j) axpy(acc.data(), weight[j], at(a.v, b, j, head), dv());
      store(at_mut(a.out, b, p, head), acc.data(), A(1) / denom, dv());
      lse()[bh * N + p] = m + std::log(denom);
    }
  }

  // ---- backward ----

  // delta_i = grad_out_i . out_i = sum_j p_ij (grad_out_i . v_j): the softmax-backward correction.
  // Hard mode also keeps exp(-lse_i), the probability of each non-neighbour of query i (0 where
  // there are none), for the two stages below.
  void backward_delta(int64_t begin, int64_t end) const {
    int64_t head = begin % heads, n = begin / heads % N, b = begin / heads / N;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = (b * heads + head) * N + n;
      delta()[row] = dot_storage(at(a.grad_out, b, n, head), at(a.out, b, n, head), dv());
      if (hard) outside_prob()[row] = n >= P && has_outside(n - P) ? exp_acc(-lse()[row]) : A(0);
      if (++head == heads) {
        head = 0;
        if (++n == N) n = 0, ++b;
      }
    }
  }

  // Hard mode: every grid value is in the outside sum of every grid query with non-neighbours,
  // with weight exp(-lse_i); this is that gradient, shared by all grid values of (b, head).
  void outside_grad(int64_t begin, int64_t end) const {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, head = bh % heads;
      A* sum = value_sum() + bh * dv();
      fill(sum, A(0), dv());
      const A* outside = outside_prob() + bh * N;
      for (int64_t g = 0; g < hw; ++g)
        if (outside[P + g] != A(0)) axpy(sum, outside[P + g], at(a.grad_out, b, P + g, head), dv());
    }
  }

  // For grid position g: grad_q of query g (a gather over its keys) and grad_k, grad_v of key g
  // (a gather over the queries that see it). The truncated box is symmetric, i in box(j) exactly when
  // j in box(i), so the queries that read grid key g are the box around g, plus the prefix queries.
  // Probabilities are recomputed from the saved log-sum-exp; nothing per offset is stored.
  void backward_grid(int64_t begin, int64_t end) const {
    Row<A, D> q(d()), grad_out(dv()), grad_q(d()), k(d()), v(dv()), grad_k(d()), grad_v(dv());
    const int64_t neighbours = P + (2 * radius + 1) * (2 * radius + 1);
    std::vector<A> prob(padded(neighbours)), lse_of(neighbours), delta_of(neighbours), outside_of(neighbours);
    std::vector<int64_t> token_of(neighbours);
    const bool fast = fast_path_applies();
    int64_t box_of[5][kBox];
    box_offsets(a.q, box_of[0]);
    box_offsets(a.k, box_of[1]);
    box_offsets(a.v, box_of[2]);
    box_offsets(a.grad_out, box_of[3]);
    View tokens;
    tokens.stride_n = 1;
    box_offsets(tokens, box_of[4]);
    alignas(64) A fast_buffer[5 * kBoxVectors * lanes] = {};
    Cursor cursor = cursor_at(begin);
    for (int64_t item = begin; item < end; ++item, advance(cursor)) {
      if constexpr (kHasFastPath) {
        if (fast && interior(cursor)) {
          backward_interior(cursor, box_of, fast_buffer);
          continue;
        }
      }
      const int64_t b = cursor.b, head = cursor.head, bh = b * heads + head, g = cursor.row * w + cursor.col;
      const A* lse_bh = lse() + bh * N;
      const A* delta_bh = delta() + bh * N;
      int64_t r0, r1, c0, c1;
      box(cursor.row, cursor.col, r0, r1, c0, c1);
      {
        // The token that enters the box a few positions from now, in all four roles.
        const int64_t ahead =
            P + std::min(cursor.row + radius, h - 1) * w + std::min(cursor.col + radius + 2, w - 1);
        prefetch(at(a.q, b, ahead, head), d());
        prefetch(at(a.k, b, ahead, head), d());
        prefetch(at(a.v, b, ahead, head), dv());
        prefetch(at(a.grad_out, b, ahead, head), dv());
      }
      // The tokens around g: the prefix tokens, then the box row by row. As keys of query g and as
      // queries that see key g, they are the same set.
      int64_t count = 0;
      for (int64_t p = 0; p < P; ++p) token_of[count++] = p;
      for (int64_t r = r0; r <= r1; ++r)
        for (int64_t c = c0; c <= c1; ++c) token_of[count++] = P + r * w + c;

      // grad_q of grid query g: scale * sum_j p_ij (grad_out_i . v_j - delta_i) k_j.
      load(q.data(), at(a.q, b, P + g, head), d());
      load(grad_out.data(), at(a.grad_out, b, P + g, head), dv());
      for (int64_t t = 0; t < count; ++t) prob[t] = scale * dot(q.data(), at(a.k, b, token_of[t], head), d());
      exp_shifted(prob.data(), count, lse_bh[P + g]);
      fill(grad_q.data(), A(0), d());
      const A delta_i = delta_bh[P + g];
      for (int64_t t = 0; t < count; ++t) {
        const A ds = prob[t] * (dot(grad_out.data(), at(a.v, b, token_of[t], head), dv()) - delta_i);
        axpy(grad_q.data(), ds, at(a.k, b, token_of[t], head), d());
      }
      store(at_mut(a.grad_q, b, P + g, head), grad_q.data(), scale, d());

      // grad_k, grad_v of grid key g, gathered over the queries that see it.
      load(k.data(), at(a.k, b, P + g, head), d());
      load(v.data(), at(a.v, b, P + g, head), dv());
      for (int64_t t = 0; t < count; ++t) {
        const int64_t i = token_of[t];
        prob[t] = scale * dot(k.data(), at(a.q, b, i, head), d()) - lse_bh[i];
        delta_of[t] = delta_bh[i];
        // The shared outside gradient counted v_g as outside for every grid query with non-neighbours;
        // the queries in its box see it as a neighbour, so take that back.
        outside_of[t] = hard ? outside_prob()[bh * N + i] : A(0);
      }
      exp_shifted(prob.data(), count, A(0));
      fill(grad_k.data(), A(0), d());
      if (hard) {
        const A* shared = value_sum() + bh * dv();
        for (int64_t c = 0; c < dv(); ++c) grad_v.data()[c] = shared[c];
      } else {
        fill(grad_v.data(), A(0), dv());
      }
      for (int64_t t = 0; t < count; ++t) {
        const S* go = at(a.grad_out, b, token_of[t], head);
        const A ds = prob[t] * (dot(v.data(), go, dv()) - delta_of[t]);
        axpy(grad_k.data(), ds, at(a.q, b, token_of[t], head), d());
        axpy(grad_v.data(), prob[t] - outside_of[t], go, dv());
      }
      store(at_mut(a.grad_k, b, P + g, head), grad_k.data(), scale, d());
      store(at_mut(a.grad_v, b, P + g, head), grad_v.data(), A(1), dv());
    }
  }

  // grad_q of prefix query p, which attends to every token.
  void backward_prefix_query(int64_t begin, int64_t end) const {
    Row<A, D> q(d()), grad_out(dv()), grad_q(d());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / P, p = item % P, b = bh / heads, head = bh % heads;
      load(q.data(), at(a.q, b, p, head), d());
      load(grad_out.data(), at(a.grad_out, b, p, head), dv());
      fill(grad_q.data(), A(0), d());
      const A lse_p = lse()[bh * N + p], delta_p = delta()[bh * N + p];
      for (int64_t j = 0; j < N; ++j) {
        const S* key = at(a.k, b, j, head);
        const A prob = exp_acc(scale * dot(q.data(), key, d()) - lse_p);
        axpy(grad_q.data(), prob * (dot(grad_out.data(), at(a.v, b, j, head), dv()) - delta_p), key, d());
      }
      store(at_mut(a.grad_q, b, p, head), grad_q.data(), scale, d());
    }
  }

  // grad_k, grad_v of prefix key p, which every query sees.
  void backward_prefix_key(int64_t begin, int64_t end) const {
    Row<A, D> k(d()), v(dv()), grad_k(d()), grad_v(dv());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / P, p = item % P, b = bh / heads, head = bh % heads;
      load(k.data(), at(a.k, b, p, head), d());
      load(v.data(), at(a.v, b, p, head), dv());
      fill(grad_k.data(), A(0), d());
      fill(grad_v.data(), A(0), dv());
      const A* lse_bh = lse() + bh * N;
      const A* delta_bh = delta() + bh * N;
      for (int64_t i = 0; i < N; ++i) {
        const S* query = at(a.q, b, i, head);
        const S* go = at(a.grad_out, b, i, head);
        const A prob = exp_acc(scale * dot(k.data(), query, d()) - lse_bh[i]);
        axpy(grad_k.data(), prob * (dot(v.data(), go, dv()) - delta_bh[i]), query, d());
        axpy(grad_v.data(), prob, go, dv());
      }
      store(at_mut(a.grad_k, b, p, head), grad_k.data(), scale, d());
      store(at_mut(a.grad_v, b, p, head), grad_v.data(), A(1), dv());
    }
  }

  void run(Stage stage, int64_t begin, int64_t end) const {
    switch (stage) {
      case Stage::kForwardGrid: forward_grid(begin, end); break;
      case Stage::kForwardPrefix: forward_prefix(begin, end); break;
      case Stage::kBackwardDelta: backward_delta(begin, end); break;
      case Stage::kOutsideGrad: outside_grad(begin, end); break;
      case Stage::kBackwardGrid: backward_grid(begin, end); break;
      case Stage::kBackwardPrefixQuery: backward_prefix_query(begin, end); break;
      case Stage::kBackwardPrefixKey: backward_prefix_key(begin, end); break;
      case Stage::kValueSum: value_sum_stage(begin, end); break;
      case Stage::kGlobalForward: break;  // GlobalKernel
      case Stage::kGlobalBackward: break;  // GlobalBackward
    }
  }
};

// ---- The global heads: softmax(scale q . k) v over every key, forward only ----
//
// A work item is a chunk of the queries of one (b, head). Its keys and values are packed once (once for
// consecutive items of one head) in float32: the keys channel-major (channel c of keys j..j+lanes in one vector), so that one query's
// logits against `lanes` keys are D multiply-adds of a broadcast query channel, and the values row by row.
// Queries go kBlock at a time, which reads each packed vector once for the block: their logits, each
// row's softmax (exp_normalise), then the weighted values. With the bfloat16 dot product
// (HMAIT_BF16_DOT) bfloat16 keys are packed as channel pairs instead and each logit vector takes D / 2
// instructions on the stored bits; the products of bfloat16 values are exact in float32, so the logits
// are those of float32 arithmetic on the same inputs. The values are then packed as pairs of keys, and
// the probabilities rounded to bfloat16 (as flash attention and the matmul path do for bfloat16
// inputs), so that one instruction adds two keys' weighted values. Everything else is float32.
// What the global heads' forward and backward share: the sizes, and rows (b, token, head) of the tensors.
template <typename T, int64_t D>
struct GlobalShape {
  using Tr = Traits<T>;
  using S = typename Tr::storage;
  using V = VecFloat;
  static constexpr int64_t lanes = HMAIT_VECTOR_BYTES / sizeof(float);
  static constexpr int64_t kRowVectors = D / lanes;
  static constexpr int kBlock = 4;
  static_assert(D % lanes == 0, "the head size is a whole number of vectors");

  const Args& a;
  const int64_t heads, nq, nk, keys_padded, key_stride;
  const float scale;

  explicit GlobalShape(const Args& args)
      : a(args), heads(args.heads), nq(args.queries), nk(args.keys), keys_padded(padded(args.keys)),
        // One vector more than the padded keys: rows of the packed keys a power of two apart would share
        // cache sets (1024 keys took twice the time of 784 without it).
        key_stride(padded(args.keys) + lanes), scale(float(args.scale)) {}

  const S* at(const View& view, int64_t b, int64_t token, int64_t head) const {
    return static_cast<const S*>(view.data) + b * view.stride_b + token * view.stride_n + head * view.stride_h;
  }
  S* at_mut(const View& view, int64_t b, int64_t token, int64_t head) const {
    return const_cast<S*>(at(view, b, token, head));
  }

  // rows[u][j] = x_u . (column j of the channel-major packed), for the Q rows x (float32, D each).
  template <int Q>
  HMAIT_INLINE void products(const float* x, const float* packed, float* rows) const {
    for (int64_t kb = 0; kb < keys_padded; kb += lanes) {
      V acc[Q];
      for (int u = 0; u < Q; ++u) acc[u] = V{};
      for (int64_t c = 0; c < D; ++c) {
        const V column = load_vector<V>(packed + c * key_stride + kb);
        for (int u = 0; u < Q; ++u) acc[u] += x[u * D + c] * column;
      }
      for (int u = 0; u < Q; ++u) store_vector(rows + u * keys_padded + kb, acc[u]);
    }
  }

  // sum[u] = sum_j weights[u][j] packed_j over the nk rows of packed (float32, D each).
  template <int Q>
  HMAIT_INLINE void weighted_sum(const float* weights, const float* packed, V (*sum)[kRowVectors]) const {
    for (int u = 0; u < Q; ++u)
      for (int64_t t = 0; t < kRowVectors; ++t) sum[u][t] = V{};
    for (int64_t j = 0; j < nk; ++j) {
      V row[kRowVectors];
      for (int64_t t = 0; t < kRowVectors; ++t) row[t] = load_vector<V>(packed + j * D + t * lanes);
      for (int u = 0; u < Q; ++u) {
        const V w = V{} + weights[u * keys_padded + j];
        for (int64_t t = 0; t < kRowVectors; ++t) sum[u][t] += w * row[t];
      }
    }
  }

  // Rows i .. i + Q of (b, head) in view = factor[u] * rows[u], in the storage type.
  template <int Q>
  HMAIT_INLINE void store_rows(const View& view, int64_t b, int64_t i, int64_t head, const V (*rows)[kRowVectors],
                               const float* factor) const {
    for (int u = 0; u < Q; ++u) {
      S* dst = at_mut(view, b, i + u, head);
      for (int64_t t = 0; t < kRowVectors; ++t) Tr::store_lanes(dst + t * lanes, rows[u][t] * factor[u]);
    }
  }
};

// The members of GlobalShape, named in a class template that derives from it.
#define HMAIT_GLOBAL_SHAPE_MEMBERS                                                                     \
  using Base = GlobalShape<T, D>;                                                                      \
  using typename Base::Tr;                                                                             \
  using typename Base::S;                                                                              \
  using typename Base::V;                                                                              \
  using Base::lanes;                                                                                   \
  using Base::kRowVectors;                                                                             \
  using Base::kBlock;                                                                                  \
  using Base::a;                                                                                       \
  using Base::heads;                                                                                   \
  using Base::nq;                                                                                      \
  using Base::nk;                                                                                      \
  using Base::keys_padded;                                                                             \
  using Base::key_stride;                                                                              \
  using Base::scale;                                                                                   \
  using Base::at;                                                                                      \
  using Base::at_mut;                                                                                  \
  using Base::Base;

template <typename T, int64_t D>
struct GlobalKernel : GlobalShape<T, D> {
  HMAIT_GLOBAL_SHAPE_MEMBERS
#ifdef HMAIT_BF16_DOT
  static constexpr bool kPairs = std::is_same<T, BFloat16Tag>::value;
#else
  static constexpr bool kPairs = false;
#endif

  // The keys and values of (b, head) into the packed buffers.
  void pack(int64_t b, int64_t head, float* keys, uint32_t* key_pairs, float* values) const {
    for (int64_t j = 0; j < nk; ++j) {
      const S* k = at(a.k, b, j, head);
      if constexpr (kPairs) {
        for (int64_t c = 0; c < D / 2; ++c)
          key_pairs[c * key_stride + j] = uint32_t(k[2 * c]) | (uint32_t(k[2 * c + 1]) << 16);
      } else {
        for (int64_t c = 0; c < D; ++c) keys[c * key_stride + j] = Tr::load(k[c]);
      }
      const S* v = at(a.v, b, j, head);
      if constexpr (kPairs) {  // key j in the low half of pair j / 2, key j + 1 in its high half
        uint16_t* pairs = reinterpret_cast<uint16_t*>(values) + (j / 2) * 2 * D + j % 2;
        for (int64_t c = 0; c < D; ++c) pairs[2 * c] = v[c];
      } else {
        for (int64_t t = 0; t < kRowVectors; ++t)
          store_vector(values + j * D + t * lanes, Tr::load_lanes(v + t * lanes));
      }
    }
    if (kPairs && nk % 2 == 1) {  // the missing high half of the last pair
      uint16_t* pairs = reinterpret_cast<uint16_t*>(values) + (nk / 2) * 2 * D + 1;
      for (int64_t c = 0; c < D; ++c) pairs[2 * c] = 0;
    }
    for (int64_t j = nk; j < keys_padded; ++j) {  // padding: logits 0 here, set to -inf before the softmax
      if constexpr (kPairs) {
        for (int64_t c = 0; c < D / 2; ++c) key_pairs[c * key_stride + j] = 0;
      } else {
        for (int64_t c = 0; c < D; ++c) keys[c * key_stride + j] = 0.0f;
      }
    }
  }

  // Queries i .. i + Q of (b, head): logits into rows (Q rows of keys_padded), then the output.
  template <int Q>
  HMAIT_INLINE void block(int64_t b, int64_t head, int64_t i, const float* keys, const uint32_t* key_pairs,
                          const float* values, float* query, uint32_t* query_pairs, float* rows) const {
    for (int u = 0; u < Q; ++u) {
      const S* q = at(a.q, b, i + u, head);
      if constexpr (kPairs) {
        for (int64_t c = 0; c < D / 2; ++c)
          query_pairs[u * D + c] = uint32_t(q[2 * c]) | (uint32_t(q[2 * c + 1]) << 16);
      } else {
        for (int64_t c = 0; c < D; ++c) query[u * D + c] = scale * Tr::load(q[c]);
      }
    }
    if constexpr (kPairs) {
#ifdef HMAIT_BF16_DOT
      for (int64_t kb = 0; kb < keys_padded; kb += lanes) {
        V acc[Q];
        for (int u = 0; u < Q; ++u) acc[u] = V{};
        for (int64_t c = 0; c < D / 2; ++c) {
          const VecBits32 k = load_vector<VecBits32>(key_pairs + c * key_stride + kb);
          for (int u = 0; u < Q; ++u) acc[u] = HMAIT_BF16_DOT(acc[u], VecBits32{} + query_pairs[u * D + c], k);
        }
        for (int u = 0; u < Q; ++u) store_vector(rows + u * keys_padded + kb, acc[u] * scale);
      }
#endif
    } else {
      this->template products<Q>(query, keys, rows);
    }
    float inverse[Q];
    for (int u = 0; u < Q; ++u) {
      float m;
      const float sum = exp_normalise(rows + u * keys_padded, nk, -std::numeric_limits<float>::infinity(), m);
      inverse[u] = 1.0f / sum;
      if (a.lse != nullptr) static_cast<float*>(a.lse)[(b * heads + head) * nq + i + u] = m + std::log(sum);
    }
    V out[Q][kRowVectors];
    if constexpr (kPairs) {
      for (int u = 0; u < Q; ++u)
        for (int64_t t = 0; t < kRowVectors; ++t) out[u][t] = V{};
#ifdef HMAIT_BF16_DOT
      // The probabilities as bfloat16 in key order: read as 32-bit words, pairs of keys (the padding's are 0).
      uint16_t* probabilities = reinterpret_cast<uint16_t*>(query);
      for (int u = 0; u < Q; ++u)
        for (int64_t kb = 0; kb < keys_padded; kb += lanes)
          float_to_bf16_vector(probabilities + u * keys_padded + kb, load_vector<V>(rows + u * keys_padded + kb));
      const uint32_t* pair_weights = reinterpret_cast<const uint32_t*>(probabilities);
      const uint32_t* value_pairs = reinterpret_cast<const uint32_t*>(values);
      for (int64_t j = 0; j < (nk + 1) / 2; ++j) {
        VecBits32 v[kRowVectors];
        for (int64_t t = 0; t < kRowVectors; ++t) v[t] = load_vector<VecBits32>(value_pairs + j * D + t * lanes);
        for (int u = 0; u < Q; ++u) {
          const VecBits32 p = VecBits32{} + pair_weights[u * keys_padded / 2 + j];
          for (int64_t t = 0; t < kRowVectors; ++t) out[u][t] = HMAIT_BF16_DOT(out[u][t], p, v[t]);
        }
      }
#endif
    } else {
      this->template weighted_sum<Q>(rows, values, out);
    }
    this->template store_rows<Q>(a.out, b, i, head, out, inverse);
  }

  void forward(int64_t begin, int64_t end) const {
    const int64_t chunk = a.global_chunk, chunks = (nq + chunk - 1) / chunk;
    // query: the block's scaled queries, or with kPairs its bfloat16 probabilities (kBlock * keys_padded / 2
    // words); values: float32 rows, or with kPairs bfloat16 pairs of rows ((nk + 1) / 2 * D words).
    std::vector<float> keys(kPairs ? 0 : D * key_stride), values((nk + 1) / 2 * 2 * D),
        query(kPairs ? kBlock * keys_padded / 2 : kBlock * D), rows(kBlock * keys_padded);
    std::vector<uint32_t> key_pairs(kPairs ? D / 2 * key_stride : 0), query_pairs(kPairs ? kBlock * D : 0);
    int64_t packed = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / chunks, b = bh / heads, head = bh % heads;
      if (bh != packed) {
        pack(b, head, keys.data(), key_pairs.data(), values.data());
        packed = bh;
      }
      const int64_t stop = std::min(nq, (item % chunks + 1) * chunk);
      int64_t i = item % chunks * chunk;
      for (; i + kBlock <= stop; i += kBlock)
        block<kBlock>(b, head, i, keys.data(), key_pairs.data(), values.data(), query.data(), query_pairs.data(),
                      rows.data());
      for (; i < stop; ++i)
        block<1>(b, head, i, keys.data(), key_pairs.data(), values.data(), query.data(), query_pairs.data(),
                 rows.data());
    }
  }
};

// The backward of GlobalKernel, one (b, head) per work item, in float32 whatever the input dtype. Per
// block of kBlock queries it recomputes the probabilities p from the logits and the forward's
// log-sum-exp, then, with dp_ij = grad_out_i . v_j and ds_ij = p_ij (dp_ij - grad_out_i . out_i):
// grad_q_i = scale sum_j ds_ij k_j, and it adds scale ds_ij q_i to grad_k_j and p_ij grad_out_i to
// grad_v_j in float32 accumulators that the item writes out at its end. Keys and values are packed
// channel-major (for the logits and dp, as the forward's keys) and the keys also row by row (for grad_q).
template <typename T, int64_t D>
struct GlobalBackward : GlobalShape<T, D> {
  HMAIT_GLOBAL_SHAPE_MEMBERS

  static HMAIT_INLINE void load_row(const S* p, V* x) {
    for (int64_t t = 0; t < kRowVectors; ++t) x[t] = Tr::load_lanes(p + t * lanes);
  }

  template <int Q>
  HMAIT_INLINE void block(int64_t b, int64_t head, int64_t i, const float* keys_t, const float* values_t,
                          const float* key_rows, float* grad_keys, float* grad_values, float* x, float* rows,
                          float* rows2) const {
    const float* lse = static_cast<const float*>(a.lse) + (b * heads + head) * nq + i;
    float* query = x;                // Q rows: q (unscaled)
    float* grad_out = x + Q * D;     // Q rows: grad_out
    float delta[Q];
    for (int u = 0; u < Q; ++u) {
      V q[kRowVectors], go[kRowVectors], o[kRowVectors];
      load_row(at(a.q, b, i + u, head), q);
      load_row(at(a.grad_out, b, i + u, head), go);
      load_row(at(a.out, b, i + u, head), o);
      V dot = {};
      for (int64_t t = 0; t < kRowVectors; ++t) {
        store_vector(query + u * D + t * lanes, q[t]);
        store_vector(grad_out + u * D + t * lanes, go[t]);
        dot += go[t] * o[t];
      }
      delta[u] = HorizontalSum<float, HMAIT_VECTOR_BYTES>::run(dot);
    }
    this->template products<Q>(query, keys_t, rows);        // q . k (unscaled)
    this->template products<Q>(grad_out, values_t, rows2);  // grad_out . v
    // rows: p = exp(scale q . k - lse); rows2: scale ds = scale p (dp - delta). Padding keys are never read below.
    for (int u = 0; u < Q; ++u) {
      for (int64_t kb = 0; kb < keys_padded; kb += lanes) {
        const V p = exp_lanes(load_vector<V>(rows + u * keys_padded + kb) * scale - lse[u]);
        store_vector(rows + u * keys_padded + kb, p);
        store_vector(rows2 + u * keys_padded + kb,
                     p * (load_vector<V>(rows2 + u * keys_padded + kb) - delta[u]) * scale);
      }
    }
    // grad_q_u = sum_j scale ds_uj k_j.
    V grad_q[Q][kRowVectors];
    this->template weighted_sum<Q>(rows2, key_rows, grad_q);
    float ones[Q];
    for (int u = 0; u < Q; ++u) ones[u] = 1.0f;
    this->template store_rows<Q>(a.grad_q, b, i, head, grad_q, ones);
    // grad_k_j += sum_u scale ds_uj q_u, grad_v_j += sum_u p_uj grad_out_u; the block's rows in registers.
    V qv[Q][kRowVectors], gov[Q][kRowVectors];
    for (int u = 0; u < Q; ++u)
      for (int64_t t = 0; t < kRowVectors; ++t) {
        qv[u][t] = load_vector<V>(query + u * D + t * lanes);
        gov[u][t] = load_vector<V>(grad_out + u * D + t * lanes);
      }
    for (int64_t j = 0; j < nk; ++j) {
      V gk[kRowVectors], gv[kRowVectors];
      for (int64_t t = 0; t < kRowVectors; ++t) {
        gk[t] = load_vector<V>(grad_keys + j * D + t * lanes);
        gv[t] = load_vector<V>(grad_values + j * D + t * lanes);
      }
      for (int u = 0; u < Q; ++u) {
        const V ds = V{} + rows2[u * keys_padded + j], p = V{} + rows[u * keys_padded + j];
        for (int64_t t = 0; t < kRowVectors; ++t) {
          gk[t] += ds * qv[u][t];
          gv[t] += p * gov[u][t];
        }
      }
      for (int64_t t = 0; t < kRowVectors; ++t) {
        store_vector(grad_keys + j * D + t * lanes, gk[t]);
        store_vector(grad_values + j * D + t * lanes, gv[t]);
      }
    }
  }

  void backward(int64_t begin, int64_t end) const {
    std::vector<float> keys_t(D * key_stride), values_t(D * key_stride), key_rows(nk * D), grad_keys(nk * D),
        grad_values(nk * D), x(2 * kBlock * D), rows(kBlock * keys_padded), rows2(kBlock * keys_padded);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, head = bh % heads;
      for (int64_t j = 0; j < keys_padded; ++j) {
        V k[kRowVectors], v[kRowVectors];
        if (j < nk) {
          load_row(at(a.k, b, j, head), k);
          load_row(at(a.v, b, j, head), v);
          for (int64_t t = 0; t < kRowVectors; ++t) store_vector(key_rows.data() + j * D + t * lanes, k[t]);
        } else {
          for (int64_t t = 0; t < kRowVectors; ++t) k[t] = v[t] = V{};
        }
        for (int64_t t = 0; t < kRowVectors; ++t)
          for (int64_t l = 0; l < lanes; ++l) {
            keys_t[(t * lanes + l) * key_stride + j] = k[t][l];
            values_t[(t * lanes + l) * key_stride + j] = v[t][l];
          }
      }
      std::fill(grad_keys.begin(), grad_keys.end(), 0.0f);
      std::fill(grad_values.begin(), grad_values.end(), 0.0f);
      int64_t i = 0;
      for (; i + kBlock <= nq; i += kBlock)
        block<kBlock>(b, head, i, keys_t.data(), values_t.data(), key_rows.data(), grad_keys.data(),
                      grad_values.data(), x.data(), rows.data(), rows2.data());
      for (; i < nq; ++i)
        block<1>(b, head, i, keys_t.data(), values_t.data(), key_rows.data(), grad_keys.data(), grad_values.data(),
                 x.data(), rows.data(), rows2.data());
      for (int64_t j = 0; j < nk; ++j) {
        S* gk = at_mut(a.grad_k, b, j, head);
        S* gv = at_mut(a.grad_v, b, j, head);
        for (int64_t t = 0; t < kRowVectors; ++t) {
          Tr::store_lanes(gk + t * lanes, load_vector<V>(grad_keys.data() + j * D + t * lanes));
          Tr::store_lanes(gv + t * lanes, load_vector<V>(grad_values.data() + j * D + t * lanes));
        }
      }
    }
  }
};

#undef HMAIT_GLOBAL_SHAPE_MEMBERS

template <typename T>
inline void run_global(Stage stage, const Args& args, int64_t begin, int64_t end) {
  const bool backward = stage == Stage::kGlobalBackward;
  if (args.head_dim == 32 && args.value_dim == 32) {
    if (backward) GlobalBackward<T, 32>(args).backward(begin, end);
    else GlobalKernel<T, 32>(args).forward(begin, end);
  } else if (args.head_dim == 64 && args.value_dim == 64) {
    if (backward) GlobalBackward<T, 64>(args).backward(begin, end);
    else GlobalKernel<T, 64>(args).forward(begin, end);
  }
}

// Head sizes with a compile-time specialisation: those of H-MaiT (32) and of most MaiT variants (64).
template <typename T>
inline void run_typed(Stage stage, const Args& args, int64_t begin, int64_t end) {
  if (args.head_dim == args.value_dim && args.head_dim == 32) {
    MaskedKernel<T, 32>(args).run(stage, begin, end);
  } else if (args.head_dim == args.value_dim && args.head_dim == 64) {
    MaskedKernel<T, 64>(args).run(stage, begin, end);
  } else {
    MaskedKernel<T, 0>(args).run(stage, begin, end);
  }
}

inline void run(Stage stage, const Args& args, int64_t begin, int64_t end) {
  if (stage == Stage::kGlobalForward || stage == Stage::kGlobalBackward) {  // the op layer refuses float64
    switch (args.dtype) {
      case DType::kFloat32: run_global<float>(stage, args, begin, end); break;
      case DType::kBFloat16: run_global<BFloat16Tag>(stage, args, begin, end); break;
      case DType::kFloat16: run_global<Float16Tag>(stage, args, begin, end); break;
      case DType::kFloat64: break;
    }
    return;
  }
  switch (args.dtype) {
    case DType::kFloat32: run_typed<float>(stage, args, begin, end); break;
    case DType::kFloat64: run_typed<double>(stage, args, begin, end); break;
    case DType::kBFloat16: run_typed<BFloat16Tag>(stage, args, begin, end); break;
    case DType::kFloat16: run_typed<Float16Tag>(stage, args, begin, end); break;
  }
}

#undef HMAIT_INLINE

}  // namespace
