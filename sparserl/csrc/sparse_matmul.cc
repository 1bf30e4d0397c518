// Sparse x dense products for sparserl's `sparsity.compute=sparse`, registered with XLA:CPU via jax.ffi.
//
// A pruned kernel W (in=I, out=O) keeps K weights. Its layout (built in JAX from the boolean mask, see
// sparserl/sparse_kernel.py) holds the kept positions twice, as ordinary int32 arrays:
//   by output column (CSC): col_ptr (O+1), rows (K)            -- the order of the compact values
//   by input row (CSR):     row_ptr (I+1), cols (K), perm (K)  -- perm[k]: CSC position of CSR entry k
// Three products, each touching only the K kept weights:
//   forward   y  = x @ W        y^T[j,:]  = sum_{k in col j} v[k] * x^T[rows[k],:]
//   input     dx = g @ W^T      dx^T[i,:] = sum_{k in row i} v[perm[k]] * g^T[cols[k],:]
//   weight    dv[k] = <x^T[rows[k],:], g^T[j,:]>  (the kernel gradient at kept positions only)
// Activations arrive (B, I) row-major; each call transposes them once into a scratch buffer so that
// the inner loops run along the batch axis: an AXPY of a contiguous batch row into accumulators that
// stay in vector registers (the gather form needs no atomics: every output row has one owner thread).
// Batch 1 (streaming) takes scalar loops instead. Work is split over XLA's intra-op thread pool.
//
// Every operand may carry leading "group" axes (vmap over seeds with vmap_method="expand_dims"): an
// operand's group count is its size over its core size, and must be 1 (shared) or G (the largest).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// 8 lanes: one AVX2 register (the benchmark machine has AVX2, no AVX-512); GCC splits or joins
// these generic vectors for other targets.
typedef float vec __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kLanes = 8;
constexpr int64_t kBlock = 16;  // output rows (columns of y) per work unit

inline float SumLanes(vec a) {
  float total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += a[l];
  return total;
}

// ---------------------------------------------------------------------------------------------
// Threads: units are claimed from an atomic counter by the caller and by helpers scheduled on XLA's
// pool. The caller works too and then waits only for claimed units, so a helper that starts late
// finds nothing to do (its shared state outlives the call) and a busy pool cannot deadlock us.

struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> fn;
};

void RunUnits(Job& job) {
  for (;;) {
    int64_t unit = job.next.fetch_add(1, std::memory_order_relaxed);
    if (unit >= job.total) return;
    job.fn(unit);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

// Below this many multiply-adds a call runs on the calling thread alone: waking a helper costs more
// (streaming's batch-1 products are ~10^5).
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, F&& fn, int64_t work = kMinParallelWork) {
  if (total <= 0) return;
  if (work < kMinParallelWork) {
    for (int64_t unit = 0; unit < total; ++unit) fn(unit);
    return;
  }
  auto job = std::make_shared<Job>();
  job->total = total;
  job->fn = [&fn](int64_t unit) { fn(unit); };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { RunUnits(*job); });
  RunUnits(*job);
  while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

// ---------------------------------------------------------------------------------------------
// Shapes

struct Groups {
  int64_t count = 1;
  bool ok = true;
  // The group index of an operand with `n` groups for overall group g.
  static int64_t Of(int64_t n, int64_t g) { return n == 1 ? 0 : g; }
};

int64_t GroupsOf(const ffi::AnyBuffer& buf, int64_t core_rank) {
  auto dims = buf.dimensions();
  int64_t n = 1;
  for (size_t d = 0; d + core_rank < dims.size(); ++d) n *= dims[d];
  return n;
}

int64_t Dim(const ffi::AnyBuffer& buf, int64_t from_end) {
  auto dims = buf.dimensions();
  return dims[dims.size() - from_end];
}

bool Broadcastable(std::initializer_list<int64_t> counts, int64_t* total) {
  *total = 1;
  for (int64_t n : counts) *total = std::max(*total, n);
  for (int64_t n : counts)
    if (n != 1 && n != *total) return false;
  return true;
}

// Scratch reused across calls by the same thread (a fresh multi-MB allocation per call would fault
// its pages in every time).
float* Scratch(int slot, int64_t floats) {
  thread_local std::vector<float> buffers[3];
  auto& buf = buffers[slot];
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(floats);
  return buf.data();
}

constexpr int64_t kChunk = 8 * kLanes;  // batch columns per pass: 8 accumulator registers

int64_t PaddedBatch(int64_t batch) {
  if (batch >= kChunk) return (batch + kChunk - 1) / kChunk * kChunk;
  int64_t p = kLanes;
  while (p < batch) p *= 2;
  return p;
}

int64_t ChunkOf(int64_t padded) { return std::min<int64_t>(padded, kChunk); }

// a (rows, cols) row-major -> panels of `chunk` batch rows: out[p][c][t] = a[p * chunk + t][c], zero
// past the batch. A panel (cols x chunk floats) is what one pass over the kept weights reads; it stays
// in L2 across all output units, contiguous (no TLB walk per row).
void TransposeInto(ffi::ThreadPool& pool, const float* a, int64_t rows, int64_t cols, int64_t padded,
                   int64_t chunk, float* out) {
  constexpr int64_t kTile = 32;
  int64_t col_tiles = (cols + kTile - 1) / kTile;
  ParallelFor(pool, col_tiles, [&](int64_t t) {
    int64_t c0 = t * kTile, c1 = std::min(cols, c0 + kTile);
    for (int64_t r = 0; r < padded; ++r) {
      float* panel = out + (r / chunk) * cols * chunk + r % chunk;
      if (r < rows) {
        for (int64_t c = c0; c < c1; ++c) panel[c * chunk] = a[r * cols + c];
      } else {
        for (int64_t c = c0; c < c1; ++c) panel[c * chunk] = 0.0f;
      }
    }
  }, rows * cols);
}

// ---------------------------------------------------------------------------------------------
// The gather product shared by forward and input gradient, one panel of batch rows at a time:
//   out[b, u] = sum_{k in ptr[u]..ptr[u+1]} w[k] * src[b, idx[k]]   for u < units, b < batch

template <int64_t NV>
void GatherBlock(const float* panel, int64_t b0, int64_t batch, const int32_t* ptr, const int32_t* idx,
                 const float* w, int64_t u0, int64_t u1, float* out, int64_t out_cols) {
  constexpr int64_t chunk = NV * kLanes;
  alignas(64) float tile[kBlock][chunk];
  for (int64_t u = u0; u < u1; ++u) {
    vec acc[NV];  // stays in registers: every index is a constant after unrolling, no address taken
#pragma GCC unroll 8
    for (int64_t v = 0; v < NV; ++v) acc[v] = vec{};
    for (int32_t k = ptr[u]; k < ptr[u + 1]; ++k) {
      const float wk = w[k];
      const vec* row = reinterpret_cast<const vec*>(panel + static_cast<int64_t>(idx[k]) * chunk);
#pragma GCC unroll 8
      for (int64_t v = 0; v < NV; ++v) acc[v] += wk * row[v];
    }
#pragma GCC unroll 8
    for (int64_t v = 0; v < NV; ++v) *reinterpret_cast<vec*>(&tile[u - u0][v * kLanes]) = acc[v];
  }
  int64_t rows = std::min(chunk, batch - b0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t u = u0; u < u1; ++u) out[(b0 + r) * out_cols + u] = tile[u - u0][r];
}

// Batch 1: y[u] = sum_k w[k] * src[idx[k]], eight kept entries per step with AVX2's gather.
void GatherScalar(const float* src, const int32_t* ptr, const int32_t* idx, const float* w, int64_t u0,
                  int64_t u1, float* out) {
  for (int64_t u = u0; u < u1; ++u) {
    int32_t k = ptr[u];
    const int32_t end = ptr[u + 1];
    float total = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; k + 16 <= end; k += 16) {
      __m256i i0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k));
      __m256i i1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k + 8));
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_i32gather_ps(src, i0, 4), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_i32gather_ps(src, i1, 4), acc1);
    }
    total = SumLanes((vec)_mm256_add_ps(acc0, acc1));
#endif
    float a0 = 0, a1 = 0;
    for (; k + 1 < end; k += 2) {
      a0 += w[k] * src[idx[k]];
      a1 += w[k + 1] * src[idx[k + 1]];
    }
    if (k < end) a0 += w[k] * src[idx[k]];
    out[u] = total + a0 + a1;
  }
}

// Batch 1, both gradients in one pass over the kept entries by column (no CSR permutation: at batch 1
// it would cost as much as the products): dv[k] = x[rows[k]] * g[j] (skipped when dv is null) and
// dx[rows[k]] += v[k] * g[j]. The columns are split between threads, each adding into its own dx.
void BackwardOne(ffi::ThreadPool& pool, const float* v, const int32_t* col_ptr, const int32_t* rows,
                 const float* x, const float* g, int64_t in, int64_t out, float* dx, float* dv) {
  const int64_t nnz = col_ptr[out];
  const int64_t parts = nnz < (int64_t{1} << 15) ? 1 : std::min<int64_t>(pool.num_threads(), 4);
  std::vector<float> partial((parts - 1) * in);
  ParallelFor(pool, parts, [&](int64_t part) {
    float* acc = part == 0 ? dx : partial.data() + (part - 1) * in;
    std::memset(acc, 0, sizeof(float) * in);
    for (int64_t j = part * out / parts, j1 = (part + 1) * out / parts; j < j1; ++j) {
      const float gj = g[j];
      for (int32_t k = col_ptr[j]; k < col_ptr[j + 1]; ++k) {
        const int32_t i = rows[k];
        if (dv) dv[k] = x[i] * gj;
        acc[i] += v[k] * gj;
      }
    }
  }, parts > 1 ? kMinParallelWork : 0);
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t i = 0; i < in; ++i) dx[i] += partial[(p - 1) * in + i];
}

// `panels`: the source in the layout of TransposeInto (`sources` rows per panel), or for batch 1 the
// source row itself.
void Gather(ffi::ThreadPool& pool, const float* panels, int64_t sources, int64_t padded, int64_t batch,
            const int32_t* ptr, const int32_t* idx, const float* w, int64_t units, float* out) {
  int64_t blocks = (units + kBlock - 1) / kBlock;
  int64_t chunk = ChunkOf(padded), work = static_cast<int64_t>(ptr[units]) * chunk;
  if (batch == 1) {  // a kept entry costs ~8 multiply-adds' time here (an indexed load each)
    ParallelFor(pool, blocks, [&](int64_t blk) {
      GatherScalar(panels, ptr, idx, w, blk * kBlock, std::min(units, (blk + 1) * kBlock), out);
    }, int64_t{8} * ptr[units]);
    return;
  }
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const float* panel = panels + (b0 / chunk) * sources * chunk;
    ParallelFor(pool, blocks, [&](int64_t blk) {
      int64_t u0 = blk * kBlock, u1 = std::min(units, u0 + kBlock);
      switch (chunk) {
        case 8: return GatherBlock<1>(panel, b0, batch, ptr, idx, w, u0, u1, out, units);
        case 16: return GatherBlock<2>(panel, b0, batch, ptr, idx, w, u0, u1, out, units);
        case 32: return GatherBlock<4>(panel, b0, batch, ptr, idx, w, u0, u1, out, units);
        default: return GatherBlock<8>(panel, b0, batch, ptr, idx, w, u0, u1, out, units);
      }
    }, work);
  }
}

// Panels of a (batch, cols) activation: batch 1 needs none (a single row is its own panel).
const float* Panels(ffi::ThreadPool& pool, int slot, const float* a, int64_t batch, int64_t cols, int64_t padded) {
  if (batch == 1) return a;
  float* out = Scratch(slot, cols * padded);
  TransposeInto(pool, a, batch, cols, padded, ChunkOf(padded), out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Handlers

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::AnyBuffer col_ptr, ffi::AnyBuffer rows,
                   ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  const int64_t batch = Dim(x, 2), in = Dim(x, 1), out = Dim(*y, 1), nnz = Dim(values, 1);
  int64_t gv = GroupsOf(values, 1), gp = GroupsOf(col_ptr, 1), gr = GroupsOf(rows, 1), gx = GroupsOf(x, 2), g;
  if (!Broadcastable({gv, gp, gr, gx}, &g) || GroupsOf(*y, 2) != g)
    return ffi::Error::InvalidArgument("sparserl sparse matmul: operands' leading (vmap) axes do not match");
  const int64_t padded = batch == 1 ? 1 : PaddedBatch(batch);
  for (int64_t i = 0; i < g; ++i) {
    const float* v = values.typed_data<float>() + Groups::Of(gv, i) * nnz;
    const int32_t* p = col_ptr.typed_data<int32_t>() + Groups::Of(gp, i) * (out + 1);
    const int32_t* r = rows.typed_data<int32_t>() + Groups::Of(gr, i) * nnz;
    const float* xp = Panels(pool, 0, x.typed_data<float>() + Groups::Of(gx, i) * batch * in, batch, in, padded);
    Gather(pool, xp, in, padded, batch, p, r, v, out, y->typed_data<float>() + i * batch * out);
  }
  return ffi::Error::Success();
}

// dv[k] (+)= <x panel row rows[k], g panel row j> for the entries of columns [j0, j1).
//
// Column j's gradient row stays in registers (NV vectors); its kept entries go eight at a time, each
// with its own accumulator (eight independent FMA chains, x read as memory operands), and the eight
// accumulators are reduced together into one vector of eight sums (a transposing add tree: one
// reduction step per entry instead of a horizontal sum each).

inline vec SumLanes8(const vec (&acc)[8]) {
#if defined(__AVX__)
  __m256 t0 = _mm256_hadd_ps((__m256)acc[0], (__m256)acc[1]);
  __m256 t1 = _mm256_hadd_ps((__m256)acc[2], (__m256)acc[3]);
  __m256 t2 = _mm256_hadd_ps((__m256)acc[4], (__m256)acc[5]);
  __m256 t3 = _mm256_hadd_ps((__m256)acc[6], (__m256)acc[7]);
  __m256 u0 = _mm256_hadd_ps(t0, t1);  // lanes: sums of acc 0-3 over lanes 0-3, then over lanes 4-7
  __m256 u1 = _mm256_hadd_ps(t2, t3);
  __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  return (vec)sums;
#else
  vec out;
  for (int i = 0; i < 8; ++i) {
    float total = 0;
    for (int64_t l = 0; l < kLanes; ++l) total += acc[i][l];
    out[i] = total;
  }
  return out;
#endif
}

template <int64_t NV>
void WeightGradBlock(const float* xp, const float* gp, const int32_t* col_ptr, const int32_t* rows, int64_t j0,
                     int64_t j1, bool accumulate, float* dv) {
  constexpr int64_t chunk = NV * kLanes;
  for (int64_t j = j0; j < j1; ++j) {
    vec g[NV];
#pragma GCC unroll 8
    for (int64_t v = 0; v < NV; ++v) g[v] = *reinterpret_cast<const vec*>(gp + j * chunk + v * kLanes);
    int32_t k = col_ptr[j];
    const int32_t end = col_ptr[j + 1];
    for (; k + 8 <= end; k += 8) {
      const vec* x[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) x[i] = reinterpret_cast<const vec*>(xp + static_cast<int64_t>(rows[k + i]) * chunk);
      vec acc[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = g[0] * x[i][0];
#pragma GCC unroll 8
      for (int64_t v = 1; v < NV; ++v) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) acc[i] += g[v] * x[i][v];
      }
      vec sums = SumLanes8(acc);
      vec* out = reinterpret_cast<vec*>(dv + k);  // vec is 4-byte aligned: an unaligned store
      *out = accumulate ? *out + sums : sums;
    }
    for (; k < end; ++k) {
      const vec* xi = reinterpret_cast<const vec*>(xp + static_cast<int64_t>(rows[k]) * chunk);
      vec a = g[0] * xi[0];
#pragma GCC unroll 8
      for (int64_t v = 1; v < NV; ++v) a += g[v] * xi[v];
      float total = SumLanes(a);
      dv[k] = accumulate ? dv[k] + total : total;
    }
  }
}

// dx = g @ W^T from g's panels: the weights in CSR order (read once per panel), then the gather by rows.
void InputGradient(ffi::ThreadPool& pool, const float* v, const int32_t* rp, const int32_t* c, const int32_t* pm,
                   const float* gp, int64_t padded, int64_t batch, int64_t in, int64_t out, int64_t nnz, float* dx) {
  float* v_csr = Scratch(2, nnz);
  ParallelFor(pool, (nnz + 65535) / 65536, [&](int64_t u) {
    for (int64_t k = u * 65536, end = std::min(nnz, k + 65536); k < end; ++k) v_csr[k] = v[pm[k]];
  }, nnz);
  Gather(pool, gp, out, padded, batch, rp, c, v_csr, in, dx);
}

// Both backward handlers: dx always; dv (the kernel gradient at kept positions) when `dv` is given, and
// then `x` too (a kernel held fixed needs neither).
ffi::Error BackwardProducts(ffi::ThreadPool& pool, ffi::AnyBuffer values, ffi::AnyBuffer col_ptr, ffi::AnyBuffer rows,
                            ffi::AnyBuffer row_ptr, ffi::AnyBuffer cols, ffi::AnyBuffer perm, const ffi::AnyBuffer* x,
                            ffi::AnyBuffer gy, ffi::AnyBuffer& dx, ffi::AnyBuffer* dv) {
  const int64_t batch = Dim(gy, 2), in = Dim(dx, 1), out = Dim(gy, 1), nnz = Dim(values, 1);
  int64_t gv = GroupsOf(values, 1), gcp = GroupsOf(col_ptr, 1), gr = GroupsOf(rows, 1);
  int64_t grp = GroupsOf(row_ptr, 1), gc = GroupsOf(cols, 1), gpm = GroupsOf(perm, 1);
  int64_t gx = x ? GroupsOf(*x, 2) : 1, gg = GroupsOf(gy, 2), g;
  if (!Broadcastable({gv, gcp, gr, grp, gc, gpm, gx, gg}, &g) || GroupsOf(dx, 2) != g || (dv && GroupsOf(*dv, 1) != g))
    return ffi::Error::InvalidArgument("sparserl sparse matmul: operands' leading (vmap) axes do not match");
  const int64_t padded = batch == 1 ? 1 : PaddedBatch(batch), chunk = batch == 1 ? 1 : ChunkOf(padded);
  for (int64_t i = 0; i < g; ++i) {
    const float* v = values.typed_data<float>() + Groups::Of(gv, i) * nnz;
    const int32_t* cp = col_ptr.typed_data<int32_t>() + Groups::Of(gcp, i) * (out + 1);
    const int32_t* r = rows.typed_data<int32_t>() + Groups::Of(gr, i) * nnz;
    const int32_t* rp = row_ptr.typed_data<int32_t>() + Groups::Of(grp, i) * (in + 1);
    const int32_t* c = cols.typed_data<int32_t>() + Groups::Of(gc, i) * nnz;
    const int32_t* pm = perm.typed_data<int32_t>() + Groups::Of(gpm, i) * nnz;
    const float* xi = x ? x->typed_data<float>() + Groups::Of(gx, i) * batch * in : nullptr;
    const float* gi = gy.typed_data<float>() + Groups::Of(gg, i) * batch * out;
    float* dxi = dx.typed_data<float>() + i * batch * in;
    float* dvi = dv ? dv->typed_data<float>() + i * nnz : nullptr;
    if (batch == 1) {
      BackwardOne(pool, v, cp, r, xi, gi, in, out, dxi, dvi);
      continue;
    }
    const float* gp = Panels(pool, 1, gi, batch, out, padded);
    InputGradient(pool, v, rp, c, pm, gp, padded, batch, in, out, nnz, dxi);
    if (!dv) continue;
    const float* xp = Panels(pool, 0, xi, batch, in, padded);
    int64_t blocks = (out + kBlock - 1) / kBlock;
    for (int64_t b0 = 0; b0 < padded; b0 += chunk) {
      const float* xpanel = xp + (b0 / chunk) * in * chunk;
      const float* gpanel = gp + (b0 / chunk) * out * chunk;
      ParallelFor(pool, blocks, [&](int64_t blk) {
        const int64_t j0 = blk * kBlock, j1 = std::min(out, (blk + 1) * kBlock);
        switch (chunk) {
          case 8: return WeightGradBlock<1>(xpanel, gpanel, cp, r, j0, j1, b0 > 0, dvi);
          case 16: return WeightGradBlock<2>(xpanel, gpanel, cp, r, j0, j1, b0 > 0, dvi);
          case 32: return WeightGradBlock<4>(xpanel, gpanel, cp, r, j0, j1, b0 > 0, dvi);
          default: return WeightGradBlock<8>(xpanel, gpanel, cp, r, j0, j1, b0 > 0, dvi);
        }
      }, nnz * chunk);
    }
  }
  return ffi::Error::Success();
}

// The input gradient alone, for a kernel held fixed (e.g. the critic inside the actor's loss): the
// weight gradient would be computed and thrown away.
ffi::Error InputGrad(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::AnyBuffer col_ptr, ffi::AnyBuffer rows,
                     ffi::AnyBuffer row_ptr, ffi::AnyBuffer cols, ffi::AnyBuffer perm, ffi::AnyBuffer gy,
                     ffi::Result<ffi::AnyBuffer> dx) {
  return BackwardProducts(pool, values, col_ptr, rows, row_ptr, cols, perm, nullptr, gy, *dx, nullptr);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::AnyBuffer col_ptr, ffi::AnyBuffer rows,
                    ffi::AnyBuffer row_ptr, ffi::AnyBuffer cols, ffi::AnyBuffer perm, ffi::AnyBuffer x,
                    ffi::AnyBuffer gy, ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dv) {
  return BackwardProducts(pool, values, col_ptr, rows, row_ptr, cols, perm, &x, gy, *dx, &(*dv));
}

// ---------------------------------------------------------------------------------------------
// Dense <-> compact: values[k] = kernel[i, j] for the k-th kept (i, j), and its transpose (zeros,
// then the kept entries). Both walk the kernel row by row (CSR order, through perm into the compact
// values): in compact (CSC) order consecutive entries lie a whole kernel row apart, one cache line
// and one TLB entry each. XLA:CPU's own gather and scatter are serial element loops.

constexpr int64_t kRowsPerUnit = 64;

struct CsrView {
  const int32_t* row_ptr;
  const int32_t* cols;
  const int32_t* perm;
};

template <typename F>
void ForKept(ffi::ThreadPool& pool, int64_t in, int64_t nnz, F&& fn) {
  ParallelFor(pool, (in + kRowsPerUnit - 1) / kRowsPerUnit, [&](int64_t u) {
    for (int64_t i = u * kRowsPerUnit, end = std::min(in, (u + 1) * kRowsPerUnit); i < end; ++i) fn(i);
  }, nnz);
}

ffi::Error GatherValues(ffi::ThreadPool pool, ffi::AnyBuffer dense, ffi::AnyBuffer row_ptr, ffi::AnyBuffer cols,
                        ffi::AnyBuffer perm, ffi::Result<ffi::AnyBuffer> values) {
  const int64_t in = Dim(dense, 2), out = Dim(dense, 1), nnz = Dim(cols, 1);
  int64_t gd = GroupsOf(dense, 2), grp = GroupsOf(row_ptr, 1), gc = GroupsOf(cols, 1), gp = GroupsOf(perm, 1), g;
  if (!Broadcastable({gd, grp, gc, gp}, &g) || GroupsOf(*values, 1) != g)
    return ffi::Error::InvalidArgument("sparserl gather: operands' leading (vmap) axes do not match");
  for (int64_t i = 0; i < g; ++i) {
    const float* d = dense.typed_data<float>() + Groups::Of(gd, i) * in * out;
    const int32_t* rp = row_ptr.typed_data<int32_t>() + Groups::Of(grp, i) * (in + 1);
    const int32_t* c = cols.typed_data<int32_t>() + Groups::Of(gc, i) * nnz;
    const int32_t* pm = perm.typed_data<int32_t>() + Groups::Of(gp, i) * nnz;
    float* v = values->typed_data<float>() + i * nnz;
    ForKept(pool, in, nnz, [&](int64_t r) {
      for (int32_t k = rp[r]; k < rp[r + 1]; ++k) v[pm[k]] = d[r * out + c[k]];
    });
  }
  return ffi::Error::Success();
}

ffi::Error ScatterValues(ffi::ThreadPool pool, ffi::AnyBuffer values, ffi::AnyBuffer row_ptr, ffi::AnyBuffer cols,
                         ffi::AnyBuffer perm, ffi::Result<ffi::AnyBuffer> dense) {
  const int64_t in = Dim(*dense, 2), out = Dim(*dense, 1), nnz = Dim(cols, 1);
  int64_t gv = GroupsOf(values, 1), grp = GroupsOf(row_ptr, 1), gc = GroupsOf(cols, 1), gp = GroupsOf(perm, 1), g;
  if (!Broadcastable({gv, grp, gc, gp}, &g) || GroupsOf(*dense, 2) != g)
    return ffi::Error::InvalidArgument("sparserl scatter: operands' leading (vmap) axes do not match");
  for (int64_t i = 0; i < g; ++i) {
    const float* v = values.typed_data<float>() + Groups::Of(gv, i) * nnz;
    const int32_t* rp = row_ptr.typed_data<int32_t>() + Groups::Of(grp, i) * (in + 1);
    const int32_t* c = cols.typed_data<int32_t>() + Groups::Of(gc, i) * nnz;
    const int32_t* pm = perm.typed_data<int32_t>() + Groups::Of(gp, i) * nnz;
    float* d = dense->typed_data<float>() + i * in * out;
    ForKept(pool, in, in * out, [&](int64_t r) {  // each row zeroed, then filled, while in cache
      float* row = d + r * out;
      std::memset(row, 0, sizeof(float) * out);
      for (int32_t k = rp[r]; k < rp[r + 1]; ++k) row[c[k]] = v[pm[k]];
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparserlSparseMatmulForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // values (..., K) float32, CSC order
                                  .Arg<ffi::AnyBuffer>()  // col_ptr (..., O+1) int32
                                  .Arg<ffi::AnyBuffer>()  // rows (..., K) int32
                                  .Arg<ffi::AnyBuffer>()  // x (..., B, I) float32
                                  .Ret<ffi::AnyBuffer>()  // y (..., B, O) float32
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparserlSparseMatmulBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // values (..., K)
                                  .Arg<ffi::AnyBuffer>()  // col_ptr (..., O+1)
                                  .Arg<ffi::AnyBuffer>()  // rows (..., K)
                                  .Arg<ffi::AnyBuffer>()  // row_ptr (..., I+1)
                                  .Arg<ffi::AnyBuffer>()  // cols (..., K)
                                  .Arg<ffi::AnyBuffer>()  // perm (..., K)
                                  .Arg<ffi::AnyBuffer>()  // x (..., B, I)
                                  .Arg<ffi::AnyBuffer>()  // g (..., B, O)
                                  .Ret<ffi::AnyBuffer>()  // dx (..., B, I)
                                  .Ret<ffi::AnyBuffer>()  // dvalues (..., K)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparserlSparseMatmulInputGrad, InputGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // values (..., K)
                                  .Arg<ffi::AnyBuffer>()  // col_ptr (..., O+1)
                                  .Arg<ffi::AnyBuffer>()  // rows (..., K)
                                  .Arg<ffi::AnyBuffer>()  // row_ptr (..., I+1)
                                  .Arg<ffi::AnyBuffer>()  // cols (..., K)
                                  .Arg<ffi::AnyBuffer>()  // perm (..., K)
                                  .Arg<ffi::AnyBuffer>()  // g (..., B, O)
                                  .Ret<ffi::AnyBuffer>()  // dx (..., B, I)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparserlGather, GatherValues,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dense kernel (..., I, O) float32
                                  .Arg<ffi::AnyBuffer>()  // row_ptr (..., I+1) int32
                                  .Arg<ffi::AnyBuffer>()  // cols (..., K) int32
                                  .Arg<ffi::AnyBuffer>()  // perm (..., K) int32
                                  .Ret<ffi::AnyBuffer>()  // values (..., K) float32
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparserlScatter, ScatterValues,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // values (..., K) float32
                                  .Arg<ffi::AnyBuffer>()  // row_ptr (..., I+1) int32
                                  .Arg<ffi::AnyBuffer>()  // cols (..., K) int32
                                  .Arg<ffi::AnyBuffer>()  // perm (..., K) int32
                                  .Ret<ffi::AnyBuffer>()  // dense kernel (..., I, O) float32, zero off flat
);
