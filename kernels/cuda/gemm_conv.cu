// Implicit-GEMM kernels for conv2d (forward, grad-input, grad-weight) and dense
// (forward, grad-input, grad-weight), float and double.
//
// Every op is C[m, n] = sum_k A(m, k) * B(k, n) where A and B are never
// materialised: a small "loader" functor maps (row, col) to an address in the
// real input (or returns 0 for conv padding / stride holes), and a "store"
// functor writes the result (adding the bias, or atomically accumulating when
// K is split across blocks).  One tiled body serves all six ops:
//   * a block computes a BM x BN tile of C with 256 threads (16 x 16);
//   * K is walked in BK = 16 slices, each slice of A and B staged in shared
//     memory so every loaded element is reused BN (resp. BM) times;
//   * each thread keeps a TM x TN register micro-tile (TM = BM/16, TN = BN/16),
//     its rows/cols strided by 16 so the shared reads are broadcast/conflict
//     free and the final stores are coalesced along n;
//   * blockIdx.z splits K (split-K) when M x N alone gives too few blocks
//     (conv grad-weight: M = O, N = C*kh*kw, K = N*OH*OW); the host zeroes C
//     and the blocks then atomicAdd.
// Loader functors say via k_fast which of their two indices is contiguous in
// memory, and the tile load order follows it so global reads coalesce.
//
// Layouts: x (N, C, H, W), w (O, C, KH, KW), gy (N, O, OH, OW), all C-contiguous.

#define GEMM_THREADS 256
#define GEMM_BK 16
#define CONV_ARGS int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW, \
                  int sh, int sw, int pt, int pl
#define CONV_SHAPE ConvShape{N, C, H, W, O, KH, KW, OH, OW, sh, sw, pt, pl}

// ------------------------------------------------------------------ body

template <typename T, int BM, int BN, typename LA, typename LB, typename ST>
__device__ __forceinline__ void gemm_tile(int M, int N, int K, int kchunk,
                                          const LA& la, const LB& lb, const ST& st)
{
    constexpr int BK = GEMM_BK;
    constexpr int TM = BM / 16;
    constexpr int TN = BN / 16;
    static_assert(BM % 16 == 0 && BN % 16 == 0, "tile must be a multiple of 16");
    static_assert((BM * BK) % GEMM_THREADS == 0 && (BN * BK) % GEMM_THREADS == 0,
                  "tile loads must split evenly over the block");
    // +1 pad: with k-fast loads, consecutive threads write rows BM+1 apart (no bank conflicts)
    __shared__ T As[BK][BM + 1];
    __shared__ T Bs[BK][BN + 1];

    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int kbeg = blockIdx.z * kchunk;
    // in 64 bits: kbeg + kchunk may pass INT_MAX on the last K slice of a long K
    const int kend = (int)min((long long)K, (long long)kbeg + kchunk);

    T acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

    for (int k0 = kbeg; k0 < kend; k0 += BK) {
#pragma unroll
        for (int r = 0; r < (BM * BK) / GEMM_THREADS; ++r) {
            const int e = tid + r * GEMM_THREADS;
            const int kk = LA::k_fast ? e % BK : e / BM;
            const int mm = LA::k_fast ? e / BK : e % BM;
            const int m = m0 + mm, k = k0 + kk;
            As[kk][mm] = (m < M && k < kend) ? la(m, k) : T(0);
        }
#pragma unroll
        for (int r = 0; r < (BN * BK) / GEMM_THREADS; ++r) {
            const int e = tid + r * GEMM_THREADS;
            const int kk = LB::k_fast ? e % BK : e / BN;
            const int nn = LB::k_fast ? e / BK : e % BN;
            const int n = n0 + nn, k = k0 + kk;
            Bs[kk][nn] = (n < N && k < kend) ? lb(k, n) : T(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            T a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }

    const bool atomic = gridDim.z > 1;
    const bool first = blockIdx.z == 0;  // only one K-slice adds the bias
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n < N) st(m, n, acc[i][j], atomic, first);
        }
    }
}

// Store functors index the output with 64 bits: an output may hold 2^31 elements or
// more (conv2d of (1024,3,256,256) with 64 filters) while every input, and every GEMM
// extent M, N, K, stays below 2^31 (checked on the host), so loaders keep int.
template <typename T>
__device__ __forceinline__ void put(T* p, T v, bool atomic)
{
    if (atomic) atomicAdd(p, v);
    else *p = v;
}

// ------------------------------------------------------------------ shapes

// Conv geometry.  Kernels take it as plain ints (what CuPy can pass) and pack it here.
struct ConvShape {
    int N, C, H, W;      // input
    int O, KH, KW;       // weight (O, C, KH, KW)
    int OH, OW;          // output
    int sh, sw, pt, pl;  // stride, top/left padding
};

// ------------------------------------------------------------------ conv forward
// M = O, N = N*OH*OW (pixels), K = C*KH*KW.

template <typename T>
struct ConvFwdA {  // A(o, k) = w[o, k]
    static constexpr bool k_fast = true;
    const T* w; int K;
    __device__ T operator()(int o, int k) const { return w[o * K + k]; }
};

template <typename T>
struct ConvFwdB {  // B(k, p) = x_padded[b, c, i*sh + kh, j*sw + kw]  (im2col, never stored)
    static constexpr bool k_fast = false;
    const T* x; ConvShape s;
    __device__ T operator()(int k, int p) const
    {
        const int q = k % s.KW, t = k / s.KW, r = t % s.KH, c = t / s.KH;
        const int j = p % s.OW, t2 = p / s.OW, i = t2 % s.OH, b = t2 / s.OH;
        const int ih = i * s.sh - s.pt + r, iw = j * s.sw - s.pl + q;
        if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return T(0);
        return x[((b * s.C + c) * s.H + ih) * s.W + iw];
    }
};

template <typename T>
struct ConvFwdStore {  // y[b, o, i, j] = acc + bias[o]
    T* y; const T* bias; ConvShape s;
    __device__ void operator()(int o, int p, T v, bool atomic, bool first) const
    {
        const int ohw = s.OH * s.OW, b = p / ohw, ij = p % ohw;
        if (bias != nullptr && first) v += bias[o];
        put(&y[((long long)b * s.O + o) * ohw + ij], v, atomic);
    }
};

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(GEMM_THREADS)
conv2d_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
           T* __restrict__ y, int has_bias, CONV_ARGS, int kchunk)
{
    const ConvShape s = CONV_SHAPE;
    const int K = s.C * s.KH * s.KW;
    gemm_tile<T, BM, BN>(s.O, s.N * s.OH * s.OW, K, kchunk,
                         ConvFwdA<T>{w, K}, ConvFwdB<T>{x, s}, ConvFwdStore<T>{y, has_bias ? bias : nullptr, s});
}

// ------------------------------------------------------------------ conv grad-input
// gx[b, c, h, v] = sum_{o, r, q} w[o, c, r, q] * gy[b, o, i, j] with
// i*sh + r = h + pt (and the same for columns): the transposed conv, written as
// a gather so each output pixel is owned by one thread (no atomics).
// M = C, N = N*H*W, K = O*KH*KW.

template <typename T>
struct ConvBwdA {  // A(c, k=(o, r, q)) = w[o, c, r, q]
    static constexpr bool k_fast = true;
    const T* w; ConvShape s;
    __device__ T operator()(int c, int k) const
    {
        const int khw = s.KH * s.KW, o = k / khw, rq = k % khw;
        return w[(o * s.C + c) * khw + rq];
    }
};

template <typename T>
struct ConvBwdB {  // B(k=(o, r, q), p=(b, h, v)) = gy[b, o, i, j] or 0 where no window lands
    static constexpr bool k_fast = false;
    const T* gy; ConvShape s;
    __device__ T operator()(int k, int p) const
    {
        const int q = k % s.KW, t = k / s.KW, r = t % s.KH, o = t / s.KH;
        const int v = p % s.W, t2 = p / s.W, h = t2 % s.H, b = t2 / s.H;
        const int hh = h + s.pt - r, vv = v + s.pl - q;
        if (hh < 0 || vv < 0) return T(0);
        const int i = hh / s.sh, j = vv / s.sw;
        if (i * s.sh != hh || j * s.sw != vv || i >= s.OH || j >= s.OW) return T(0);
        return gy[((b * s.O + o) * s.OH + i) * s.OW + j];
    }
};

template <typename T>
struct ConvBwdStore {  // gx[b, c, h, v]
    T* gx; ConvShape s;
    __device__ void operator()(int c, int p, T v, bool atomic, bool) const
    {
        const int hw = s.H * s.W, b = p / hw, r = p % hw;
        put(&gx[((long long)b * s.C + c) * hw + r], v, atomic);
    }
};

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(GEMM_THREADS)
conv2d_bwd_input(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                 CONV_ARGS, int kchunk)
{
    const ConvShape s = CONV_SHAPE;
    gemm_tile<T, BM, BN>(s.C, s.N * s.H * s.W, s.O * s.KH * s.KW, kchunk,
                         ConvBwdA<T>{w, s}, ConvBwdB<T>{gy, s}, ConvBwdStore<T>{gx, s});
}

// ------------------------------------------------------------------ conv grad-weight
// gw[o, (c, r, q)] = sum_{(b, i, j)} gy[b, o, i, j] * x_padded[b, c, i*sh + r, j*sw + q]
// M = O, N = C*KH*KW, K = N*OH*OW (long: split-K).

template <typename T>
struct ConvGwA {  // A(o, k=(b, i, j)) = gy[b, o, i, j]
    static constexpr bool k_fast = true;
    const T* gy; ConvShape s;
    __device__ T operator()(int o, int k) const
    {
        const int ohw = s.OH * s.OW, b = k / ohw, ij = k % ohw;
        return gy[(b * s.O + o) * ohw + ij];
    }
};

template <typename T>
struct ConvGwB {  // B(k=(b, i, j), n=(c, r, q)) = x_padded[b, c, i*sh + r, j*sw + q]
    static constexpr bool k_fast = true;
    const T* x; ConvShape s;
    __device__ T operator()(int k, int n) const
    {
        const int q = n % s.KW, t = n / s.KW, r = t % s.KH, c = t / s.KH;
        const int j = k % s.OW, t2 = k / s.OW, i = t2 % s.OH, b = t2 / s.OH;
        const int ih = i * s.sh - s.pt + r, iw = j * s.sw - s.pl + q;
        if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return T(0);
        return x[((b * s.C + c) * s.H + ih) * s.W + iw];
    }
};

template <typename T>
struct RowMajorStore {  // c[m, n] of a (M, ld) matrix
    T* c; int ld;
    __device__ void operator()(int m, int n, T v, bool atomic, bool) const
    {
        put(&c[(long long)m * ld + n], v, atomic);
    }
};

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(GEMM_THREADS)
conv2d_bwd_weight(const T* __restrict__ x, const T* __restrict__ gy, T* __restrict__ gw,
                  CONV_ARGS, int kchunk)
{
    const ConvShape s = CONV_SHAPE;
    const int Kw = s.C * s.KH * s.KW;
    gemm_tile<T, BM, BN>(s.O, Kw, s.N * s.OH * s.OW, kchunk,
                         ConvGwA<T>{gy, s}, ConvGwB<T>{x, s}, RowMajorStore<T>{gw, Kw});
}

// ------------------------------------------------------------------ dense
// x (Nb, I), w (O, I), gy (Nb, O).

template <typename T, bool KFAST>
struct Strided {  // element (r, c) of a row-major matrix read as r*rs + c*cs
    static constexpr bool k_fast = KFAST;
    const T* a; int rs, cs;
    __device__ T operator()(int r, int c) const { return a[r * rs + c * cs]; }
};

template <typename T>
struct DenseStore {  // y[b, o] = acc + bias[o]
    T* y; const T* bias; int ld;
    __device__ void operator()(int m, int n, T v, bool atomic, bool first) const
    {
        if (bias != nullptr && first) v += bias[n];
        put(&y[(long long)m * ld + n], v, atomic);
    }
};

// y = x w^T + b: M = Nb, N = O, K = I.  A(b, i) = x[b, i] (k fast), B(i, o) = w[o, i] (k fast)
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(GEMM_THREADS)
dense_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
          T* __restrict__ y, int has_bias, int Nb, int I, int O, int kchunk)
{
    gemm_tile<T, BM, BN>(Nb, O, I, kchunk, Strided<T, true>{x, I, 1}, Strided<T, true>{w, 1, I},
                         DenseStore<T>{y, has_bias ? bias : nullptr, O});
}

// gx = gy w: M = Nb, N = I, K = O.  A(b, o) = gy[b, o] (k fast), B(o, i) = w[o, i] (n fast)
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(GEMM_THREADS)
dense_bwd_input(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                int Nb, int I, int O, int kchunk)
{
    gemm_tile<T, BM, BN>(Nb, I, O, kchunk, Strided<T, true>{gy, O, 1}, Strided<T, false>{w, I, 1},
                         RowMajorStore<T>{gx, I});
}

// gw = gy^T x: M = O, N = I, K = Nb.  A(o, b) = gy[b, o] (m fast), B(b, i) = x[b, i] (n fast)
template <typename T, int BM, int BN>
__global__ void __launch_bounds__(GEMM_THREADS)
dense_bwd_weight(const T* __restrict__ x, const T* __restrict__ gy, T* __restrict__ gw,
                 int Nb, int I, int O, int kchunk)
{
    gemm_tile<T, BM, BN>(O, I, Nb, kchunk, Strided<T, false>{gy, 1, O}, Strided<T, false>{x, I, 1},
                         RowMajorStore<T>{gw, I});
}
