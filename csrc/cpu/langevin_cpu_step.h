// The one-call step op, torch.ops.vaebm.langevin_step_, and the per-sample sums it needs.
// Included once, by langevin_cpu.cpp, inside its namespace vaebm::cpu { namespace {, after the
// work items, dispatchers and update (no include guard: it uses that file's definitions).

// Per-sample sums (langevin_ref.reduce_ref columns 0 and 1: clipped |g|^2 and the non-finite
// count) over every tensor, one thread per sample row, each row summed in a fixed order.
template <class T>
void reduce_rows(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& gs,
                 const Params& p, double* acc /* B x 4 */) {
  const int64_t B = xs[0].size(0);
  int64_t total = 0;
  for (const auto& x : xs) total += x.numel();
  const size_t K = xs.size();
  std::vector<const T*> xp(K), gp(K);
  std::vector<int64_t> ns(K);
  for (size_t k = 0; k < K; ++k) {  // (tensor accessors cost ns per call: hoisted out of rows)
    xp[k] = xs[k].const_data_ptr<T>();
    gp[k] = gs[k].const_data_ptr<T>();
    ns[k] = xs[k].numel() / B;
  }
  // a sample's sums live in locals and reach acc once, at its end (a loop over rows of a few
  // elements was bound by read-modify-write stores into acc); same order of additions as before
  auto body = [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
      for (size_t k = 0; k < K; ++k) {
        const int64_t n = ns[k], row = i * n;
        const T* x = xp[k] + row;
        const T* g = gp[k] + row;
        if (n < kNarrow || kIsa == Isa::kScalar) {  // columns 0 and 1 only: a tight loop
          double g2 = 0.0;
          int64_t nb = 0;
          for (int64_t j = 0; j < n; ++j) {
            const float xv = float(x[j]), graw = float(g[j]);
            nb += !(std::fabs(xv) <= FLT_MAX) + !(std::fabs(graw) <= FLT_MAX);
            const float gv = p.cv > 0.f ? clamp_keep_nan(graw, -p.cv, p.cv) : graw;
            g2 += double(gv) * gv;
          }
          s0 += g2;
          s1 += double(nb);
          continue;
        }
        double t[4] = {s0, s1, s2, s3};
        for (int64_t j = 0; j < n; j += kChunk) {
          const Span sp{j, std::min(n, j + kChunk), 0u, uint32_t(k), 1.f, int(kModeUpdate)};
          reduce_step_span_any(x, g, sp, p, t);
        }
        s0 = t[0], s1 = t[1], s2 = t[2], s3 = t[3];
      }
      double* a = acc + 4 * i;
      a[0] = s0, a[1] = s1, a[2] = s2, a[3] = s3;
    }
  };
  if (total < 4 * kChunk)
    body(0, B);
  else
    at::parallel_for(0, B, 1, body);
}

// The step's sums of a state whose rows are all narrow (fewer than kNarrow elements): G2[i] =
// sum clip(g)^2 in float32, BAD[i] = any x or raw g non-finite, tensor by tensor; the loops
// (narrow_sums_n, in langevin_cpu_simd.h, compiled per ISA) run over samples with the row
// length a constant where it is small, so that the compiler vectorises across samples (a
// per-sample loop over the tensors and a row of 2 elements, summed in double, cost half of a
// (2000, 2) step).
template <class T, int N>
void narrow_sums_any(const T* x, const T* g, int64_t i0, int64_t i1, int64_t n, float cv,
                     bool first, float* G2, float* Z) {
  switch (kIsa) {
    case Isa::kAvx512: return avx512::narrow_sums_row<T, N>(x, g, i0, i1, n, cv, first, G2, Z);
    case Isa::kAvx2: return avx2::narrow_sums_row<T, N>(x, g, i0, i1, n, cv, first, G2, Z);
    default: return narrow_sums_row<T, N>(x, g, i0, i1, n, cv, first, G2, Z);
  }
}

template <class T>
void narrow_sums(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& gs,
                 const Params& p, float* G2, float* Z) {
  const int64_t B = xs[0].size(0);
  int64_t total = 0;
  for (const auto& x : xs) total += x.numel();
  auto body = [&](int64_t i0, int64_t i1) {
    for (size_t k = 0; k < xs.size(); ++k) {
      const T* x = xs[k].const_data_ptr<T>();
      const T* g = gs[k].const_data_ptr<T>();
      const int64_t n = xs[k].numel() / B;
      const bool first = k == 0;
      switch (n) {
        case 1: narrow_sums_any<T, 1>(x, g, i0, i1, n, p.cv, first, G2, Z); break;
        case 2: narrow_sums_any<T, 2>(x, g, i0, i1, n, p.cv, first, G2, Z); break;
        case 3: narrow_sums_any<T, 3>(x, g, i0, i1, n, p.cv, first, G2, Z); break;
        case 4: narrow_sums_any<T, 4>(x, g, i0, i1, n, p.cv, first, G2, Z); break;
        default: narrow_sums_any<T, 0>(x, g, i0, i1, n, p.cv, first, G2, Z);
      }
    }
  };
  if (total < 4 * kChunk)
    body(0, B);
  else
    at::parallel_for(0, B, 1024, body);
}

// One whole unadjusted step of FusedLangevin in one call (spec: langevin_ref.step_ref):
//   per sample i: g2_i = sum clip(g)^2, bad_i = E_i or any x, g non-finite;
//   s_i = min(1, clip_norm / (sqrt(g2_i) + 1e-12)) (clip_norm > 0), mode_i from bad_i and guard
//   (0: none, 1: keep the old state, 2: restart from N(0, I));
//   x <- the update of langevin_update_ with (s_i, mode_i), in place;
//   the statistics row step % capacity gets E_i (NaN where non-finite), sqrt(g2_i), accepted =
//   !guarded_i, guarded_i; n_guarded += sum guarded_i; then step += 1.
// The per-sample verdict needs all of a sample's gradient before the first element is written;
// on wide states the sums of sample i + 1 are taken while sample i is updated (one sweep, the
// second read from cache), elsewhere in a reduction pass before the update.
void langevin_step_(at::TensorList states, at::TensorList grads,
                    const std::optional<at::Tensor>& energy, const at::Tensor& step,
                    int64_t seed_lo, int64_t seed_hi, int64_t sample_offset,
                    const std::optional<at::Tensor>& chain_ids, double a, double b, double lam,
                    double clip_value, double clip_norm, double lo, double hi, int64_t guard,
                    const std::optional<at::Tensor>& rec,
                    const std::optional<at::Tensor>& n_guarded) {
  const std::vector<at::Tensor> xs = states.vec(), gs = grads.vec();
  check_lists(xs, gs, nullptr);
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu() && step.scalar_type() == at::kLong &&
                  step.is_contiguous(),
              "step must be a 1-element int64 CPU tensor");
  TORCH_CHECK(guard >= 0 && guard <= 2, "guard must be 0 (none), 1 (keep) or 2 (reset)");
  const int64_t B = xs[0].size(0);
  const float* ep = opt_ptr_f32(energy, B, "energy");
  const int64_t* cid = chain_ids_ptr(chain_ids, B);
  int64_t cap = 0;
  if (rec) {
    TORCH_CHECK(n_guarded && n_guarded->scalar_type() == at::kLong && n_guarded->numel() == 1,
                "n_guarded must be a 1-element int64 tensor");
    TORCH_CHECK(rec->dim() == 3 && rec->size(1) == 4 && rec->size(2) == B &&
                    rec->scalar_type() == at::kFloat && rec->is_contiguous() &&
                    rec->device().is_cpu() && rec->size(0) > 0,
                "rec must be a contiguous float32 CPU (rows, 4, B) tensor");
    cap = rec->size(0);
  }
  int64_t* stepp = step.data_ptr<int64_t>();
  Params p{uint32_t(seed_lo), uint32_t(seed_hi), uint32_t(*stepp),
           float(a), float(b), float(lam), float(clip_value), float(lo), float(hi),
           std::isfinite(lo) || std::isfinite(hi), {}};
  p.schedule_keys();
  const bool need = guard != 0 || clip_norm > 0 || rec;
  // per-sample scratch, every entry written before it is read: left uninitialised (zeroing
  // 64 KB of sums cost a tenth of a (2000, 2) step)
  bool wide = kIsa != Isa::kScalar, all_narrow = true;
  int64_t total = 0;
  for (const auto& x : xs) {
    wide = wide && x.numel() / B >= kNarrow;
    all_narrow = all_narrow && x.numel() / B < kNarrow;
    total += x.numel();
  }
  // (an all-narrow state needs one float per sample here: Z of narrow_sums)
  std::unique_ptr<double[]> acc(need ? new double[all_narrow ? size_t(B + 1) / 2 : size_t(B) * 4]
                                     : nullptr);
  std::unique_ptr<float[]> gsv(clip_norm > 0 ? new float[B] : nullptr);
  std::unique_ptr<float[]> g2f(need ? new float[B] : nullptr);
  std::unique_ptr<int32_t[]> modev(guard != 0 ? new int32_t[B] : nullptr);
  std::unique_ptr<uint8_t[]> bad(need ? new uint8_t[B] : nullptr);
  int64_t n_bad = 0;
  // the verdicts of samples [i0, i1) from their sums (acc rows): straight loops over raw
  // pointers, so that the compiler vectorises them (a lambda over the vectors did not: with the
  // statistics row below they cost as much as the update itself on a (2000, 2) state)
  const double* A = acc.get();
  float* G2 = g2f.get();
  float* GS = gsv.get();
  uint8_t* BAD = bad.get();
  int32_t* MD = modev.get();
  const float cn = float(clip_norm);
  const int32_t md_bad = guard == 2 ? int32_t(kModeReset) : int32_t(kModeKeep);
  // clipping scale and mode from G2 and BAD
  auto decide = [=](int64_t i0, int64_t i1) {
    if (cn > 0)
      for (int64_t i = i0; i < i1; ++i) {
        const float s = cn / (std::sqrt(G2[i]) + 1e-12f);
        GS[i] = (s < 1.f || std::isnan(s)) ? s : 1.f;  // clamp(max=1): NaN stays NaN
      }
    if (guard != 0)
      for (int64_t i = i0; i < i1; ++i) MD[i] = BAD[i] ? md_bad : int32_t(kModeUpdate);
  };
  auto verdicts = [=](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      G2[i] = float(A[4 * i]);
      BAD[i] = uint8_t((ep != nullptr && !(std::fabs(ep[i]) <= FLT_MAX)) | (A[4 * i + 1] > 0));
    }
    decide(i0, i1);
  };
  const auto sid = sample_ids(B, sample_offset, cid);
  dispatch_dtype(xs[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const float* gsp = clip_norm > 0 ? gsv.get() : nullptr;
    const int32_t* mp = guard != 0 ? modev.get() : nullptr;
    static const bool one_pass = !std::getenv("VAEBM_STEP_TWO_PASS");  // A/B switch
    const bool sweep = one_pass && need && wide && total >= 4 * kChunk &&
                       B >= at::get_num_threads();
    // a sample's sums, over all its tensors (rows of sample i), into acc row i
    auto sums = [&](int64_t i) {
      double* a = acc.get() + 4 * i;
      a[0] = a[1] = a[2] = a[3] = 0.0;
      for (size_t k = 0; k < xs.size(); ++k) {
        const int64_t n = xs[k].numel() / B;
        const T* x = xs[k].const_data_ptr<T>() + i * n;
        const T* g = gs[k].const_data_ptr<T>() + i * n;
        for (int64_t j = 0; j < n; j += kChunk) {
          const Span sp{j, std::min(n, j + kChunk), 0u, uint32_t(k), 1.f, int(kModeUpdate)};
          reduce_step_span_any(x, g, sp, p, a);
        }
      }
    };
    // sample i's update with the modes and gradient scales decided (mp, gsp)
    auto update_sample = [&](int64_t i) {
      for (size_t k = 0; k < xs.size(); ++k) {
        const int64_t n = xs[k].numel() / B;
        T* x = xs[k].data_ptr<T>() + i * n;
        const T* g = gs[k].const_data_ptr<T>() + i * n;
        for (int64_t j = 0; j < n; j += kChunk)
          update_span_any(x, g, x, span_of(Item{int64_t(k), i, j, std::min(n, j + kChunk)},
                                           sid.data(), gsp, mp), p);
      }
    };
    if (sweep && clip_norm > 0) {
      // the gradient scale needs the sample's norm before its first element is written: one
      // pass per sample, its sums, then its update while its rows are still in cache
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) {
          sums(i);
          verdicts(i, i + 1);
          update_sample(i);
        }
      });
    } else if (sweep) {
      // one sweep: every sample is updated as if good, its sums taken from the x and g the
      // update loads (update_span<T, true>); a sample found bad afterwards (rare) gets its saved
      // rows back (guard keep: copied aside per thread just before they are overwritten) or is
      // restarted (guard reset). A sample whose energy is already non-finite is not updated.
      int64_t row_len = 0;
      for (const auto& x : xs) row_len += x.numel() / B;
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        // the per-thread copy of a sample's old rows, kept between calls (a fresh block of a
        // CIFAR-10 sample's 0.6 MB was mapped, page-faulted and unmapped every step)
        thread_local std::vector<T> save_buf;
        if (guard == 1 && save_buf.size() < size_t(row_len)) save_buf.resize(size_t(row_len));
        T* const save_ptr = guard == 1 ? save_buf.data() : nullptr;
        for (int64_t i = b0; i < b1; ++i) {
          if (guard != 0 && ep != nullptr && !(std::fabs(ep[i]) <= FLT_MAX)) {
            sums(i);
            verdicts(i, i + 1);  // bad: keep or reset
            update_sample(i);
            continue;
          }
          double* a = acc.get() + 4 * i;
          a[0] = a[1] = a[2] = a[3] = 0.0;
          int64_t off = 0;
          for (size_t k = 0; k < xs.size(); ++k) {
            const int64_t n = xs[k].numel() / B;
            T* x = xs[k].data_ptr<T>() + i * n;
            const T* g = gs[k].const_data_ptr<T>() + i * n;
            for (int64_t j = 0; j < n; j += kChunk) {
              const Span sp{j, std::min(n, j + kChunk), sid[i], uint32_t(k), 1.f,
                            int(kModeUpdate)};
              update_checked_span_any(x, g, x, sp, p, save_ptr ? save_ptr + off : nullptr, a);
            }
            off += n;
          }
          if (p.cv == 0.f && !(std::fabs(a[0]) <= DBL_MAX)) {
            // a non-finite sum of squares: a non-finite g, or an overflow (not a broken chain);
            // recount g exactly (rare), like the reduction pass, which checks g itself
            int64_t nb = 0;
            for (size_t k = 0; k < xs.size(); ++k) {
              const int64_t n = xs[k].numel() / B;
              const T* g = gs[k].const_data_ptr<T>() + i * n;
              for (int64_t j = 0; j < n; ++j) nb += !(std::fabs(float(g[j])) <= FLT_MAX);
            }
            a[1] += double(nb > 0);
          }
          verdicts(i, i + 1);
          if (guard == 0 || !BAD[i]) continue;
          if (guard == 2) {
            update_sample(i);  // MD[i] = reset: fresh noise, whatever was written
            continue;
          }
          off = 0;  // guard keep: the old rows back
          for (size_t k = 0; k < xs.size(); ++k) {
            const int64_t n = xs[k].numel() / B;
            std::memcpy(xs[k].data_ptr<T>() + i * n, save_ptr + off, size_t(n) * sizeof(T));
            off += n;
          }
        }
      });
    } else {
      if (need && all_narrow) {
        float* Z = reinterpret_cast<float*>(acc.get());  // (scratch of B * 4 doubles)
        narrow_sums<T>(xs, gs, p, G2, Z);
        if (kIsa == Isa::kAvx512)
          avx512::narrow_bad(Z, ep, B, BAD);
        else if (kIsa == Isa::kAvx2)
          avx2::narrow_bad(Z, ep, B, BAD);
        else
          narrow_bad(Z, ep, B, BAD);
        decide(0, B);
      } else if (need) {
        reduce_rows<T>(xs, gs, p, acc.get());
        verdicts(0, B);
      }
      update_impl<T>(xs, gs, xs, p, sid.data(), gsp, mp);
    }
  });
  if (guard != 0)
    for (int64_t i = 0; i < B; ++i) n_bad += BAD[i];
  if (rec) {
    const int64_t row = ((*stepp % cap) + cap) % cap;
    float* r = rec->data_ptr<float>() + row * 4 * B;  // energy, grad norm, accepted, guarded
    float *re = r, *rg = r + B, *ra = r + 2 * B, *rd = r + 3 * B;
    if (ep)
      for (int64_t i = 0; i < B; ++i) re[i] = std::fabs(ep[i]) <= FLT_MAX ? ep[i] : NAN;
    else
      std::fill(re, re + B, 0.f);
    for (int64_t i = 0; i < B; ++i) rg[i] = std::sqrt(G2[i]);
    if (guard != 0)
      for (int64_t i = 0; i < B; ++i) {
        rd[i] = float(BAD[i]);
        ra[i] = 1.f - rd[i];
      }
    else {
      std::fill(ra, ra + B, 1.f);
      std::fill(rd, rd + B, 0.f);
    }
    *n_guarded->data_ptr<int64_t>() += n_bad;
  }
  *stepp += 1;
}

