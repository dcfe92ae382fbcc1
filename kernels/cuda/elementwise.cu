// Element-wise and reduction kernels: MinMax forward/backward, the fused Adam
// step, the L2 norm/normalise used by the power method, and a one-block fused
// power-iteration step for small dense layers.  float and double.

__device__ __forceinline__ float gl_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double gl_sqrt(double v) { return sqrt(v); }

// ------------------------------------------------------------------ MinMax
// x viewed as (N, C, inner) with C even: channels (2k, 2k+1) -> (min, max).
// One thread per pair.  A pair is kept in order when x[2k] <= x[2k+1] (ties
// included), so the backward rule "gy[2k] -> 2k, gy[2k+1] -> 2k+1 on ties"
// matches the forward exactly.  A NaN in a pair makes both outputs NaN (np.minimum
// semantics); its gradient is routed as for an unordered pair (swapped), as the oracle does.

// 64-bit indices: activations (N, C, H, W) may hold 2^31 elements or more.
template <typename T>
__global__ void minmax_fwd(const T* __restrict__ x, T* __restrict__ y, long long npairs, long long inner)
{
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < npairs;
         t += (long long)gridDim.x * blockDim.x) {
        // t = (n*C/2 + k)*inner + r, and x[n, 2k, r] sits at (n*C + 2k)*inner + r = 2*nk*inner + r
        const long long r = t % inner, nk = t / inner;
        const long long a = (2 * nk) * inner + r, b = a + inner;  // x[n, 2k, r], x[n, 2k+1, r]
        const T xa = x[a], xb = x[b];
        const bool keep = xa <= xb;
        const bool nan = xa != xa || xb != xb;  // a NaN poisons both, as np.minimum/np.maximum
        y[a] = nan ? xa + xb : (keep ? xa : xb);
        y[b] = nan ? xa + xb : (keep ? xb : xa);
    }
}

template <typename T>
__global__ void minmax_bwd(const T* __restrict__ x, const T* __restrict__ gy, T* __restrict__ gx,
                           long long npairs, long long inner)
{
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < npairs;
         t += (long long)gridDim.x * blockDim.x) {
        const long long r = t % inner, nk = t / inner;
        const long long a = (2 * nk) * inner + r, b = a + inner;
        const bool keep = x[a] <= x[b];
        const T ga = gy[a], gb = gy[b];
        gx[a] = keep ? ga : gb;  // the min's gradient goes to whichever input was the min
        gx[b] = keep ? gb : ga;
    }
}

// ------------------------------------------------------------------ Adam
// In place: m <- b1 m + (1-b1) g ; v <- b2 v + (1-b2) g^2 ; p <- p - lr_t m / (sqrt(v) + eps).
// One read of p, g, m, v and one write of p, m, v per element (four NumPy passes fused).

template <typename T>
__global__ void adam_step(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                          T* __restrict__ v, T lr_t, T b1, T b2, T eps, long long n)
{
    const T c1 = T(1) - b1, c2 = T(1) - b2;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const T gi = g[i];
        const T mi = b1 * m[i] + c1 * gi;
        const T vi = b2 * v[i] + c2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr_t * mi / (gl_sqrt(vi) + eps);
    }
}

// ------------------------------------------------------------------ block reductions

#define RED_THREADS 1024

// Sum of one double per thread over the block; every thread gets the total.
__device__ double block_sum(double s, double* sh)
{
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0) sh[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (blockDim.x + 31) / 32 ? sh[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) sh[32] = s;
    }
    __syncthreads();
    return sh[32];
}

// norm_out[0] = ||a|| (accumulated in double).  When scale != 0 also a <- a / ||a||
// (left as is when the norm is exactly 0: no epsilon, see docs/GLORO.md).
// Launch with ONE block of RED_THREADS threads: the vectors are power iterates
// (one sample), for which one launch beats a multi-block reduction plus a scale.
template <typename T>
__global__ void __launch_bounds__(RED_THREADS)
l2_normalize(T* __restrict__ a, T* __restrict__ norm_out, int n, int scale)
{
    __shared__ double sh[33];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double v = (double)a[i];
        s += v * v;
    }
    const double nrm = sqrt(block_sum(s, sh));
    if (threadIdx.x == 0) norm_out[0] = (T)nrm;
    if (scale && nrm > 0.0) {
        const T inv = (T)(1.0 / nrm);
        for (int i = threadIdx.x; i < n; i += blockDim.x) a[i] *= inv;
    }
}

// ------------------------------------------------------------------ fused dense power step
// One block does a whole power-iteration step for W (O, I) and a unit iterate v (I,):
//   u = W v ; sigma = ||u|| ; z = W^T u ; v_out = z / ||z||.
// u goes through global scratch (visible to the whole block after __syncthreads).
// Pays for small layers (the host uses it when O*I is modest), where four
// separate launches would cost more than the arithmetic.
template <typename T>
__global__ void __launch_bounds__(RED_THREADS)
dense_power_step(const T* __restrict__ w, const T* __restrict__ v, T* __restrict__ u,
                 T* __restrict__ v_out, T* __restrict__ sigma, int O, int I)
{
    __shared__ double sh[33];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    // u = W v: one warp per row, lanes stride the row (coalesced)
    double su = 0.0;
    for (int o = warp; o < O; o += nwarps) {
        T acc = T(0);
        for (int i = lane; i < I; i += 32) acc += w[o * I + i] * v[i];
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) {
            u[o] = acc;
            su += (double)acc * (double)acc;
        }
    }
    const double sig = sqrt(block_sum(su, sh));  // contains the __syncthreads that publishes u
    if (threadIdx.x == 0) sigma[0] = (T)sig;
    // z = W^T u: one thread per column, rows walked in order (coalesced across threads)
    double sz = 0.0;
    for (int i = threadIdx.x; i < I; i += blockDim.x) {
        T acc = T(0);
        for (int o = 0; o < O; ++o) acc += w[o * I + i] * u[o];
        v_out[i] = acc;
        sz += (double)acc * (double)acc;
    }
    const double nz = sqrt(block_sum(sz, sh));
    if (nz > 0.0) {
        const T inv = (T)(1.0 / nz);
        for (int i = threadIdx.x; i < I; i += blockDim.x) v_out[i] *= inv;  // own elements only
    }
}
