// Small, optional hot loops for megatron_longctx. Each function has a numpy twin in
// megatron_longctx/native.py, and tests check both give identical results.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#ifdef __linux__
#include <sched.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace py = pybind11;

// Count documents and sum their tokens per bin [edges[i], edges[i+1]).
// Lengths below edges[0] or at/above edges[-1] raise: the caller picks edges covering all lengths.
static std::pair<py::array_t<int64_t>, py::array_t<int64_t>> length_histogram(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> edges) {
  auto len = lengths.unchecked<1>();
  auto edg = edges.unchecked<1>();
  const py::ssize_t n_edges = edg.shape(0);
  if (n_edges < 2) throw std::invalid_argument("need at least two bin edges");
  const int64_t *e_begin = edges.data();
  const int64_t *e_end = e_begin + n_edges;
  py::array_t<int64_t> counts(n_edges - 1);
  py::array_t<int64_t> tokens(n_edges - 1);
  auto c = counts.mutable_unchecked<1>();
  auto t = tokens.mutable_unchecked<1>();
  for (py::ssize_t i = 0; i < n_edges - 1; ++i) {
    c(i) = 0;
    t(i) = 0;
  }
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < len.shape(0); ++i) {
      const int64_t v = len(i);
      if (v < e_begin[0] || v >= e_end[-1]) {
        py::gil_scoped_acquire acquire;
        throw std::out_of_range("length outside the histogram edges");
      }
      // upper_bound gives the first edge > v; the bin is the one before it.
      const py::ssize_t b = std::upper_bound(e_begin, e_end, v) - e_begin - 1;
      c(b) += 1;
      t(b) += v;
    }
  }
  return {counts, tokens};
}

// ---------------------------------------------------------------------------------------------
// Mixture-plan index building. The numpy twins in megatron_longctx/native.py use the same RNG and
// the same algorithms, so both backends return bit-identical arrays for the same inputs. Results
// never depend on the number of threads used.
// ---------------------------------------------------------------------------------------------

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;  // splitmix64 increment (2**64 / phi, odd)
constexpr uint64_t kKeySalt = 0x5DEECE66DULL;        // seed ^ salt: per-document selection keys
constexpr int64_t kMaxIndexLength = int64_t{1} << 62;

// splitmix64 finalizer: a bijection on uint64 (xor-shifts and odd multiplications invert), so
// distinct counters always give distinct values.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Counter-based splitmix64: the (counter+1)-th output of the sequential generator seeded `seed`.
inline uint64_t splitmix_at(uint64_t seed, uint64_t counter) {
  return mix64(seed + (counter + 1) * kGolden);
}

// Fisher-Yates from the back: for i = n-1 .. 1 swap a[i] with a[r_i % (i+1)], r_i =
// splitmix_at(seed, i). Because r_i does not depend on earlier draws, the swap partners are
// computed kAhead steps early and their cache lines prefetched: 2.2x faster than a plain loop on
// 6M entries (one cache miss per step otherwise). Callers pass uint32 arrays when the values fit:
// half the footprint keeps ~8M entries inside a 32 MB L3, another ~1.9x.
template <typename T>
void fisher_yates(T *a, uint64_t n, uint64_t seed) {
  if (n < 2) return;
  constexpr uint64_t kAhead = 64;  // power of two; ring slot of step i is i % kAhead
  uint64_t ring[kAhead];
  auto partner = [seed](uint64_t i) { return splitmix_at(seed, i) % (i + 1); };
  for (uint64_t k = 0; k < kAhead && k < n - 1; ++k) {
    const uint64_t i = n - 1 - k;
    ring[i % kAhead] = partner(i);
    __builtin_prefetch(a + ring[i % kAhead], 1);
  }
  for (uint64_t i = n - 1; i >= 1; --i) {
    const uint64_t j = ring[i % kAhead];
    if (i > kAhead) {
      const uint64_t ahead = i - kAhead;
      const uint64_t jj = partner(ahead);
      ring[ahead % kAhead] = jj;
      __builtin_prefetch(a + jj, 1);
    }
    std::swap(a[i], a[j]);
  }
}

// Threads for an O(n) pass: 1 below 2**20 items (starting a thread, ~50 us, would dominate), else
// the CPUs this process may run on, at most 8 (the passes are memory-bound beyond that).
int pass_threads(int64_t n) {
  if (n < (int64_t{1} << 20)) return 1;
  int cpus = static_cast<int>(std::thread::hardware_concurrency());
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
#endif
  return std::clamp(cpus, 1, 8);
}

// fn(t, lo, hi) over n_threads contiguous chunks of [0, n); chunk t is [n*t/T, n*(t+1)/T).
// Exceptions (e.g. bad_alloc) are carried to the caller instead of terminating the process; if a
// thread cannot be started, its chunk runs on the calling thread.
template <typename F>
void parallel_chunks(int n_threads, int64_t n, F &&fn) {
  auto lo = [&](int t) {
    return static_cast<int64_t>((static_cast<__int128>(n) * t) / n_threads);
  };
  std::vector<std::exception_ptr> errors(n_threads);
  auto run = [&](int t) {
    try {
      fn(t, lo(t), lo(t + 1));
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  int started = 1;
  try {
    pool.reserve(n_threads);
    for (; started < n_threads; ++started) pool.emplace_back(run, started);
  } catch (...) {  // no more threads: run the remaining chunks here
  }
  run(0);
  for (int t = started; t < n_threads; ++t) run(t);
  for (auto &th : pool) th.join();
  for (auto &e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// Fill [0, n) with 0..n-1 as T, shuffle, widen into the int64 output.
template <typename T>
void shuffled_arange(int64_t *out, int64_t n, uint64_t seed) {
  if constexpr (std::is_same_v<T, int64_t>) {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
    fisher_yates(out, static_cast<uint64_t>(n), seed);
  } else {
    std::unique_ptr<T[]> work(new T[n]);  // uninitialized: every slot is written next
    for (int64_t i = 0; i < n; ++i) work[i] = static_cast<T>(i);
    fisher_yates(work.get(), static_cast<uint64_t>(n), seed);
    std::copy(work.get(), work.get() + n, out);
  }
}

// The per-thread part of build_document_index.
struct PlanChunk {
  int64_t lo = 0, hi = 0;
  int64_t bad_doc = -1;
  std::vector<int64_t> n_b;                  // documents per bucket in this chunk
  std::vector<int64_t> hist;                 // [bucket][top key bits] counts
  std::vector<std::vector<uint64_t>> in_bin;  // keys in each bucket's window (or its bin)
  int64_t out_begin = 0;                     // first output slot of this chunk
};

// Write the unshuffled index of the documents of `c` (ids in order, copies adjacent) to work.
// Branch-free on the random extra/no-extra decision: `always` is 1 for buckets whose every
// document gets the extra copy, `maybe` for partial ones (other buckets' thresholds are unused).
// With at most kBlock copies per document, kBlock are stored unconditionally and the position
// advances by the real count (never past the chunk's end: the next chunk belongs to another
// thread).
template <typename T, typename B>
void fill_chunk(T *work, const PlanChunk &c, int64_t chunk_end, const B *bucket,
                const std::vector<int64_t> &whole, const std::vector<uint64_t> &always,
                const std::vector<uint64_t> &maybe, const std::vector<uint64_t> &threshold,
                int64_t max_copies, uint64_t key_seed) {
  constexpr int64_t kBlock = 4;
  int64_t pos = c.out_begin;
  for (int64_t d = c.lo; d < c.hi; ++d) {
    const int64_t b = bucket[d];
    const uint64_t chosen = static_cast<uint64_t>(splitmix_at(key_seed, d) <= threshold[b]);
    const int64_t copies = whole[b] + static_cast<int64_t>(always[b] | (maybe[b] & chosen));
    if (max_copies <= kBlock && pos + kBlock <= chunk_end) {
      for (int64_t k = 0; k < kBlock; ++k) work[pos + k] = static_cast<T>(d);
    } else {
      for (int64_t k = 0; k < copies; ++k) work[pos + k] = static_cast<T>(d);
    }
    pos += copies;
  }
}

}  // namespace

// value_i = splitmix_at(seed, counters[i]).
static py::array_t<uint64_t> splitmix64(
    uint64_t seed, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> counters) {
  if (counters.ndim() != 1) throw std::invalid_argument("counters must be 1-D");
  const py::ssize_t n = counters.shape(0);
  py::array_t<uint64_t> out(n);
  const uint64_t *c = counters.data();
  uint64_t *o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < n; ++i) o[i] = splitmix_at(seed, c[i]);
  }
  return out;
}

// A permutation of arange(n) (Fisher-Yates with splitmix64 draws).
static py::array_t<int64_t> shuffle_index(int64_t n, uint64_t seed) {
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  py::array_t<int64_t> out(n);
  int64_t *o = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (n <= int64_t{UINT32_MAX} + 1) {
      shuffled_arange<uint32_t>(o, n, seed);
    } else {
      shuffled_arange<int64_t>(o, n, seed);
    }
  }
  return out;
}

// Upsampled, shuffled document order of a mixture plan; see build_document_index_numpy.
//
// Extras are the extra_b smallest keys of a bucket. Instead of sorting or nth_element over all
// keys (80 MB and ~100 ms for 10M documents), the first pass also histograms each bucket's keys by
// their top `bits` bits; only the bin holding the extra_b-th smallest key needs ordering (~n_b /
// 2**bits keys). Keys are recomputed in each pass over the documents (~1 ns each) rather than
// stored (80 MB written and read back). Measured on 10M documents, 2 cores, 6.2M entries out:
// ~55 ms, of which pass 1 ~17, fill ~11, Fisher-Yates ~20, widening copy ~6.
template <typename B>
static py::array_t<int64_t> build_document_index(
    py::array_t<B, py::array::c_style> bucket_of_doc,
    py::array_t<double, py::array::c_style | py::array::forcecast> repeats, uint64_t seed) {
  if (bucket_of_doc.ndim() != 1) throw std::invalid_argument("bucket_of_doc must be 1-D");
  if (repeats.ndim() != 1) throw std::invalid_argument("repeats must be 1-D");
  const int64_t n_docs = bucket_of_doc.shape(0);
  const int64_t n_buckets = repeats.shape(0);
  const B *bucket = bucket_of_doc.data();
  const double *rep = repeats.data();
  for (int64_t b = 0; b < n_buckets; ++b) {
    if (!std::isfinite(rep[b]) || rep[b] < 0) {
      std::ostringstream msg;
      msg << "repeat factors must be finite and >= 0 (bucket " << b << ": " << rep[b] << ")";
      throw std::invalid_argument(msg.str());
    }
  }
  int bits = 12;  // histogram: <= 2**17 counters (1 MB) per thread, unless buckets are many
  while (bits > 1 && (n_buckets << bits) > (int64_t{1} << 17)) --bits;
  const int shift = 64 - bits;
  const int64_t n_bins = int64_t{1} << bits;
  const uint64_t key_seed = seed ^ kKeySalt;
  const int n_threads = pass_threads(n_docs);
  std::vector<PlanChunk> chunks(n_threads);
  // The threshold key of bucket b sits near quantile frac_b of its keys (the sample quantile
  // deviates by ~0.5 / sqrt(n_b)), so pass 1 also keeps the keys of the bins within 2**-6 of
  // frac_b (3% of the documents). When the threshold's bin is among them, which is certain in
  // practice above ~10K documents per bucket, the second pass over all documents is skipped.
  const uint64_t half_window = std::max<uint64_t>(1, static_cast<uint64_t>(n_bins) >> 6);
  std::vector<uint64_t> window_lo(n_buckets, static_cast<uint64_t>(n_bins));
  std::vector<uint64_t> window_span(n_buckets, 0);
  for (int64_t b = 0; b < n_buckets; ++b) {
    const double frac = rep[b] - std::floor(rep[b]);
    if (frac == 0) continue;  // no extras: an empty window (no bin is >= n_bins)
    const uint64_t center = std::min(static_cast<uint64_t>(frac * n_bins), uint64_t(n_bins) - 1);
    window_lo[b] = center > half_window ? center - half_window : 0;
    window_span[b] = std::min(center + half_window, uint64_t(n_bins) - 1) - window_lo[b];
  }

  // Pass 1: validate bucket ids, count documents and histogram keys per bucket; keep the keys in
  // each bucket's window.
  {
    py::gil_scoped_release release;
    parallel_chunks(n_threads, n_docs, [&](int t, int64_t lo, int64_t hi) {
      PlanChunk &c = chunks[t];
      c.lo = lo;
      c.hi = hi;
      c.n_b.assign(n_buckets, 0);
      c.hist.assign(n_buckets * n_bins, 0);
      c.in_bin.assign(n_buckets, {});
      // Raw pointers in locals: the rare push_back must not make the compiler reload them.
      int64_t *hist = c.hist.data();
      const uint64_t *w_lo = window_lo.data();
      const uint64_t *w_span = window_span.data();
      for (int64_t d = lo; d < hi; ++d) {
        const int64_t b = bucket[d];
        if (b < 0 || b >= n_buckets) {
          c.bad_doc = d;
          return;
        }
        // All buckets are histogrammed (branch-free); the row sums are the document counts,
        // which avoids a serial increment chain on one counter per bucket.
        const uint64_t key = splitmix_at(key_seed, d);
        const uint64_t t = key >> shift;
        ++hist[b * n_bins + static_cast<int64_t>(t)];
        if (__builtin_expect(t - w_lo[b] <= w_span[b], 0)) {  // unsigned: wraps when t < lo
          c.in_bin[b].push_back(key);
        }
      }
      for (int64_t b = 0; b < n_buckets; ++b) {
        for (int64_t t = 0; t < n_bins; ++t) c.n_b[b] += c.hist[b * n_bins + t];
      }
    });
  }
  for (const PlanChunk &c : chunks) {  // chunks are in document order: the first bad is first
    if (c.bad_doc >= 0) {
      throw std::invalid_argument("bucket ids must be in [0, " + std::to_string(n_buckets) +
                                  "): document " + std::to_string(c.bad_doc) + " has bucket " +
                                  std::to_string(static_cast<int64_t>(bucket[c.bad_doc])));
    }
  }
  std::vector<int64_t> n_b(n_buckets, 0), whole(n_buckets), extra(n_buckets);
  for (const PlanChunk &c : chunks) {
    for (int64_t b = 0; b < n_buckets; ++b) n_b[b] += c.n_b[b];
  }
  int64_t total = 0;
  for (int64_t b = 0; b < n_buckets; ++b) {
    const double nb = static_cast<double>(n_b[b]);
    if (rep[b] * nb >= static_cast<double>(kMaxIndexLength)) {
      throw std::invalid_argument("document index too large: bucket " + std::to_string(b) +
                                  " would hold >= 2**62 entries");
    }
    const double w = std::floor(rep[b]);
    // volatile: keep `frac * n_b` rounded to double on its own (no fused multiply-add), as numpy.
    volatile double scaled = (rep[b] - w) * nb;
    whole[b] = static_cast<int64_t>(w);
    extra[b] = static_cast<int64_t>(std::floor(scaled + 0.5));
    total += whole[b] * n_b[b] + extra[b];
    if (total >= kMaxIndexLength) {
      throw std::invalid_argument("document index too large: >= 2**62 entries");
    }
  }

  py::array_t<int64_t> out(total);
  int64_t *o = out.mutable_data();
  {
    py::gil_scoped_release release;
    // partial: some documents get the extra copy; full: all do (e.g. 0.9 x 1 doc rounds to 1).
    std::vector<char> partial(n_buckets, 0);
    std::vector<uint64_t> always(n_buckets, 0), maybe(n_buckets, 0);
    std::vector<uint64_t> bin(n_buckets, 0), threshold(n_buckets, 0);
    std::vector<int64_t> rank(n_buckets, 0);  // 1-based rank of the threshold key in its bin
    int64_t max_copies = 0;
    bool any_partial = false;
    for (int64_t b = 0; b < n_buckets; ++b) {
      partial[b] = extra[b] > 0 && extra[b] < n_b[b];
      always[b] = extra[b] > 0 && extra[b] == n_b[b];
      maybe[b] = partial[b];
      if (n_b[b] > 0) max_copies = std::max(max_copies, whole[b] + (extra[b] > 0 ? 1 : 0));
      if (!partial[b]) continue;
      any_partial = true;
      int64_t below = 0;
      for (int64_t t = 0; t < n_bins; ++t) {
        int64_t h = 0;
        for (const PlanChunk &c : chunks) h += c.hist[b * n_bins + t];
        if (below + h >= extra[b]) {
          bin[b] = static_cast<uint64_t>(t);
          rank[b] = extra[b] - below;
          break;
        }
        below += h;
      }
    }
    // Pass 2, only for buckets whose threshold bin fell outside the window (small buckets):
    // collect the keys of that bin.
    std::vector<char> missed(n_buckets, 0);
    bool any_missed = false;
    for (int64_t b = 0; b < n_buckets; ++b) {
      missed[b] = partial[b] && bin[b] - window_lo[b] > window_span[b];
      any_missed = any_missed || missed[b];
    }
    if (any_missed) {
      parallel_chunks(n_threads, n_docs, [&](int t, int64_t lo, int64_t hi) {
        PlanChunk &c = chunks[t];
        for (int64_t b = 0; b < n_buckets; ++b) {
          if (missed[b]) c.in_bin[b].clear();
        }
        for (int64_t d = lo; d < hi; ++d) {
          const int64_t b = bucket[d];
          if (!missed[b]) continue;
          const uint64_t key = splitmix_at(key_seed, d);
          if ((key >> shift) == bin[b]) c.in_bin[b].push_back(key);
        }
      });
    }
    if (any_partial) {
      // Keys are distinct (splitmix64 is a bijection of distinct counters), so `key <=
      // threshold` selects exactly extra_b documents; a doc-id tie-break can never trigger.
      for (int64_t b = 0; b < n_buckets; ++b) {
        if (!partial[b]) continue;
        std::vector<uint64_t> keys;
        for (const PlanChunk &c : chunks) {
          for (uint64_t key : c.in_bin[b]) {
            if ((key >> shift) == bin[b]) keys.push_back(key);
          }
        }
        int64_t expected = 0;
        for (const PlanChunk &c : chunks) expected += c.hist[b * n_bins + bin[b]];
        if (static_cast<int64_t>(keys.size()) != expected || rank[b] < 1 || rank[b] > expected) {
          throw std::logic_error("build_document_index: threshold bin incomplete (internal bug)");
        }
        auto nth = keys.begin() + (rank[b] - 1);
        std::nth_element(keys.begin(), nth, keys.end());
        threshold[b] = *nth;
      }
    }
    // Output slots per chunk, from its counts: whole copies, full buckets, and partial buckets'
    // keys in bins below the threshold bin plus those in it at or below the threshold.
    int64_t begin = 0;
    for (PlanChunk &c : chunks) {
      c.out_begin = begin;
      for (int64_t b = 0; b < n_buckets; ++b) {
        begin += (whole[b] + static_cast<int64_t>(always[b])) * c.n_b[b];
        if (!partial[b]) continue;
        for (uint64_t t = 0; t < bin[b]; ++t) begin += c.hist[b * n_bins + t];
        for (uint64_t key : c.in_bin[b]) {
          begin += (key >> shift) == bin[b] && key <= threshold[b];
        }
      }
    }
    // Pass 3: the unshuffled index, then one Fisher-Yates over all of it.
    auto build = [&](auto *work) {
      parallel_chunks(n_threads, n_docs, [&](int t, int64_t, int64_t) {
        const int64_t end = t + 1 < n_threads ? chunks[t + 1].out_begin : total;
        fill_chunk(work, chunks[t], end, bucket, whole, always, maybe, threshold, max_copies,
                   key_seed);
      });
      fisher_yates(work, static_cast<uint64_t>(total), seed);
    };
    if (n_docs <= int64_t{UINT32_MAX} + 1) {
      std::unique_ptr<uint32_t[]> work(new uint32_t[total]);  // uninitialized: pass 3 fills it
      build(work.get());
      std::copy(work.get(), work.get() + total, o);
    } else {
      build(o);
    }
  }
  return out;
}

// Megatron GPTDataset sample index over the token stream of `document_index`; see
// build_sample_index_numpy for the exact row semantics.
template <typename L>
static py::array_t<int64_t> build_sample_index(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> document_index,
    py::array_t<L, py::array::c_style> document_lengths, int64_t seq_length, int64_t num_samples,
    bool add_extra_token) {
  if (document_index.ndim() != 1) throw std::invalid_argument("document_index must be 1-D");
  if (document_lengths.ndim() != 1) throw std::invalid_argument("document_lengths must be 1-D");
  if (seq_length < 1) {
    throw std::invalid_argument("seq_length must be >= 1, got " + std::to_string(seq_length));
  }
  if (num_samples < 0) {
    throw std::invalid_argument("num_samples must be >= 0, got " + std::to_string(num_samples));
  }
  const int64_t extra = add_extra_token ? 1 : 0;
  if (num_samples > (INT64_MAX - extra) / seq_length) {
    throw std::invalid_argument("num_samples * seq_length overflows int64");
  }
  const int64_t m = document_index.shape(0);
  const int64_t n_docs = document_lengths.shape(0);
  const int64_t *di = document_index.data();
  const L *len = document_lengths.data();

  const int64_t need = num_samples > 0 ? num_samples * seq_length + extra : 0;
  auto index_error = [&](int64_t k) {
    return std::invalid_argument("document_index[" + std::to_string(k) + "] = " +
                                 std::to_string(di[k]) + " is outside [0, " +
                                 std::to_string(n_docs) + ")");
  };
  auto length_error = [&](int64_t d) {
    return std::invalid_argument("document_lengths must be >= 0: document " + std::to_string(d) +
                                 " has length " + std::to_string(static_cast<int64_t>(len[d])));
  };
  auto short_error = [&](int64_t stream_tokens) {
    const int64_t fit = stream_tokens >= extra ? (stream_tokens - extra) / seq_length : 0;
    return std::invalid_argument("num_samples=" + std::to_string(num_samples) + " needs " +
                                 std::to_string(need) + " tokens but the document stream has " +
                                 std::to_string(stream_tokens) + "; " + std::to_string(fit) +
                                 " samples fit");
  };
  // Errors are raised in the numpy twin's order: bad position, negative length, short stream.
  auto first_bad_position = [&](int64_t from) {
    for (int64_t k = from; k < m; ++k) {
      if (di[k] < 0 || di[k] >= n_docs) return k;
    }
    return int64_t{-1};
  };
  auto stream_total = [&]() {
    int64_t total = 0;
    for (int64_t k = 0; k < m; ++k) total += len[di[k]];
    return total;
  };

  int64_t bad_length = -1;
  int64_t max_length = 0;
  {
    py::gil_scoped_release release;
    for (int64_t d = 0; d < n_docs; ++d) {
      if (len[d] < 0 && bad_length < 0) bad_length = d;
      max_length = std::max<int64_t>(max_length, len[d]);
    }
  }
  // A stream of m documents holds at most m * max_length tokens: asking for more fails here,
  // before allocating num_samples + 1 rows.
  if (static_cast<__int128>(m) * max_length < need) {
    int64_t bad = -1, total = 0;
    {
      py::gil_scoped_release release;
      bad = first_bad_position(0);
      if (bad < 0 && bad_length < 0) total = stream_total();
    }
    if (bad >= 0) throw index_error(bad);
    if (bad_length >= 0) throw length_error(bad_length);
    throw short_error(total);
  }

  py::array_t<int64_t> out({num_samples + 1, int64_t{2}});
  int64_t *o = out.mutable_data();
  bool short_stream = false;
  int64_t bad = -1;
  int64_t total = 0;
  {
    py::gil_scoped_release release;
    o[0] = 0;
    o[1] = 0;
    // The stream is processed in blocks of documents: the block's lengths are gathered (random
    // reads, the cost; prefetched, validated, split over threads), then walked sequentially.
    // Document k covers stream tokens [start, end). Sample i - 1 ends at target = i*seq_length +
    // extra; row i is (first k with end >= target, i*seq_length - start), exactly where Megatron's
    // build_sample_idx stops its walk. Blocks stop once every row is known.
    constexpr int64_t kBlockDocs = int64_t{1} << 20;  // 8 MB of gathered lengths
    constexpr int64_t kAhead = 16;                    // prefetch distance of the gather
    const int n_threads = pass_threads(m);
    std::unique_ptr<int64_t[]> block(new int64_t[std::min(m, kBlockDocs)]);
    std::vector<int64_t> bad_in(n_threads);
    int64_t i = 1;  // next row
    int64_t start = 0, end = 0;
    int64_t walked = 0;  // documents gathered so far (validated)
    while (walked < m && i <= num_samples) {
      const int64_t lo = walked, n = std::min(m - walked, kBlockDocs);
      parallel_chunks(n_threads, n, [&](int t, int64_t a, int64_t b) {
        bad_in[t] = -1;
        for (int64_t k = a; k < b; ++k) {
          const int64_t doc = di[lo + k];
          if (doc < 0 || doc >= n_docs) {
            bad_in[t] = lo + k;
            return;
          }
          if (k + kAhead < b) __builtin_prefetch(len + di[lo + k + kAhead]);  // never faults
          block[k] = len[doc];
        }
      });
      for (int64_t v : bad_in) {
        if (v >= 0) {
          bad = v;
          break;
        }
      }
      if (bad >= 0) break;
      walked += n;
      for (int64_t k = 0; k < n && i <= num_samples; ++k) {
        start = end;
        end += block[k];
        while (i <= num_samples && end >= i * seq_length + extra) {
          o[2 * i] = lo + k;
          o[2 * i + 1] = i * seq_length - start;
          ++i;
        }
      }
    }
    short_stream = bad < 0 && i <= num_samples;
    if (bad < 0) bad = first_bad_position(walked);  // the part of the index not gathered
    if (bad < 0 && bad_length < 0 && short_stream) total = stream_total();
  }
  if (bad >= 0) throw index_error(bad);
  if (bad_length >= 0) throw length_error(bad_length);
  if (short_stream) throw short_error(total);
  return out;
}

PYBIND11_MODULE(_csrc, m) {
  m.doc() = "megatron_longctx hot loops (optional; numpy fallbacks in megatron_longctx.native)";
  m.def("length_histogram", &length_histogram, py::arg("lengths"), py::arg("edges"),
        "Documents and token sums per length bin [edges[i], edges[i+1]).");
  m.def("splitmix64", &splitmix64, py::arg("seed"), py::arg("counters"),
        "Counter-based splitmix64: finalizer of seed + (counter + 1) * 0x9E3779B97F4A7C15.");
  m.def("shuffle_index", &shuffle_index, py::arg("n"), py::arg("seed"),
        "Fisher-Yates permutation of arange(n) with splitmix64 draws.");
  m.def("build_document_index", &build_document_index<int32_t>, py::arg("bucket_of_doc"),
        py::arg("repeats"), py::arg("seed"),
        "Upsampled (per-bucket repeat factors), shuffled document index.");
  m.def("build_document_index", &build_document_index<int64_t>, py::arg("bucket_of_doc"),
        py::arg("repeats"), py::arg("seed"));
  m.def("build_sample_index", &build_sample_index<int32_t>, py::arg("document_index"),
        py::arg("document_lengths"), py::arg("seq_length"), py::arg("num_samples"),
        py::arg("add_extra_token") = true,
        "Megatron GPTDataset sample index, [num_samples + 1, 2] int64.");
  m.def("build_sample_index", &build_sample_index<int64_t>, py::arg("document_index"),
        py::arg("document_lengths"), py::arg("seq_length"), py::arg("num_samples"),
        py::arg("add_extra_token") = true);
}
