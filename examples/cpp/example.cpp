// example.cpp: lora.hpp in use. A student adapter (LoRA rank 4 on Q and V) learns the
// output of a teacher layer whose W_Q, W_V carry a hidden low-rank update, with the
// library's AdamW; merged inference is checked against the LoRA forward; a second
// adapter borrows the same base (no copy) and takes the trained factors by hot swap;
// two forwards are kept in flight on tapes; caller vectors serve as a factor and its
// gradient (borrowed, no copy); then two mistakes are caught as lora::Error; a bf16
// base, multi-tenant lora::apply and threshold_estimate_ex are checked.
//
// Build and run: make check-cpp  (or: c++ -std=c++17 -Wall -Wextra -Werror -Iinclude
//   -Iexamples/cpp examples/cpp/example.cpp -Llib -Wl,-rpath,$PWD/lib -llora)
#include "lora.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr std::size_t kDModel = 32, kHeads = 4, kRank = 4, kBatch = 4, kSeqLen = 16;

std::vector<float> randn(std::size_t n, float scale, std::mt19937 &gen) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (float &x : v)
        x = d(gen);
    return v;
}

// A builder returned from a function: setters on a temporary return Config&&.
lora::Config layer_config(std::size_t d_model, std::size_t heads) {
    return lora::Config(static_cast<std::int64_t>(d_model))
        .n_heads(static_cast<std::int64_t>(heads))
        .threads(1);
}

// Copies of a Config are independent and keep derived defaults derived.
bool config_copies_work() {
    const lora::Config base = layer_config(kDModel, kHeads);
    lora::Config wider = base;
    wider.n_heads(2).rank(3);
    lora::Config assigned(8);
    assigned = wider;
    return base.get_int(LORA_CFG_HEAD_DIM) == static_cast<std::int64_t>(kDModel / kHeads) &&
           base.get_int(LORA_CFG_RANK) == 8 && wider.get_int(LORA_CFG_HEAD_DIM) == 16 &&
           wider.get_int(LORA_CFG_RANK) == 3 && assigned.get_int(LORA_CFG_D_MODEL) == 32 &&
           assigned.get_int(LORA_CFG_HEAD_DIM) == 16;
}

// Tapes: two forwards in flight, backwarded in reverse order, give each forward's own
// gradients (as a forward immediately followed by its backward); a parameter change
// makes a tape stale (LORA_ERR_STATE, never a wrong gradient).
bool tapes_work(lora::Adapter &ad, const std::vector<float> &x1,
                const std::vector<float> &x2) {
    auto grads_of = [&](const std::vector<float> &x) {
        ad.zero_grad();
        const std::vector<float> y = ad.forward(x, kBatch, kSeqLen);
        ad.backward(y, false); // loss 1/2 |y|^2: dout = y
        return ad.grads_flat();
    };
    const std::vector<float> g1 = grads_of(x1), g2 = grads_of(x2);
    lora::Tape t1(ad), t2(ad);
    const std::vector<float> y1 = ad.forward_ex(x1, {}, kBatch, kSeqLen, kSeqLen, {}, &t1);
    const std::vector<float> y2 = ad.forward_ex(x2, {}, kBatch, kSeqLen, kSeqLen, {}, &t2);
    ad.zero_grad();
    ad.backward_ex(y2, &t2, false);
    bool ok = ad.grads_flat() == g2;
    ad.zero_grad();
    ad.backward_ex(y1, &t1, false);
    ok = ok && ad.grads_flat() == g1;
    ad.set_params_flat(ad.params_flat());
    try {
        ad.backward_ex(y1, &t1, false);
        ok = false;
    } catch (const lora::Error &e) {
        ok = ok && e.status() == LORA_ERR_STATE;
    }
    std::printf("tapes: two forwards in flight, backwards in reverse order %s\n",
                ok ? "match" : "DIFFER");
    return ok;
}

// Borrowed factors: caller vectors as a factor and its gradient, used in place (the
// gradient lands in the caller's vector, an optimizer step writes the caller's factor,
// the caller's own writes are seen); FactorBorrow gives the factor back at scope end.
bool borrowed_factors_work(const lora::Adapter &trained, lora::Adapter &copy,
                           lora::Adapter &ad, const std::vector<float> &x) {
    ad.copy_params_from(trained);
    copy.copy_params_from(trained);
    const lora::Target q = lora::Target::Q;
    const lora::Factor b = lora::Factor::B;
    std::vector<float> param = ad.param(q, b), grad(param.size(), 0.0f);
    bool ok = true;
    {
        lora::FactorBorrow lend(ad, q, b, param, grad);
        for (lora::Adapter *a : {&ad, &copy}) {
            a->zero_grad();
            const std::vector<float> y = a->forward(x, kBatch, kSeqLen);
            a->backward(y, false);
        }
        ok = grad == copy.grad(q, b);
        lora::Optimizer sgd(ad, lora::OptimizerKind::Sgd);
        sgd.lr(0.1);
        const std::vector<float> before = param;
        sgd.step(ad);
        ok = ok && param != before && param == ad.param(q, b);
        param[0] = 7.0f;
        ok = ok && ad.param(q, b)[0] == 7.0f;
    }
    param[0] = -1.0f; // given back: the adapter holds its own copy again
    ok = ok && ad.param(q, b)[0] == 7.0f;
    try {
        std::vector<float> short_buf(param.size() - 1);
        ad.borrow_factor(q, b, short_buf);
        ok = false;
    } catch (const lora::Error &e) {
        ok = ok && e.status() == LORA_ERR_SHAPE;
    }
    std::printf("borrowed factor and gradient: used in place %s\n", ok ? "yes" : "NO");
    return ok;
}

// Serving entry points: a bf16 base equals a float base holding the rounded values;
// lora::apply over tenants of ranks 2 and 4 (a row of -1 untouched) equals each tenant's
// x A^T B^T scaled; threshold_estimate_ex with lengths equals the estimate of the valid
// rows.
bool serving_api_works(const std::vector<float> &w, const std::vector<float> &x,
                       std::mt19937 &gen) {
    auto build = [&](std::int64_t rank) {
        lora::Adapter ad = layer_config(kDModel, kHeads).rank(rank).build();
        for (lora::Target t : {lora::Target::Q, lora::Target::K, lora::Target::V})
            ad.set_base(t, w);
        ad.set_params_flat(randn(ad.param_count(), 0.3f, gen));
        return ad;
    };
    lora::Adapter a2 = build(2), a4 = build(4);
    std::vector<std::uint16_t> bits(w.size());
    std::vector<float> rounded(w.size());
    for (std::size_t i = 0; i < w.size(); i++) {
        std::uint32_t u;
        std::memcpy(&u, &w[i], 4);
        bits[i] = static_cast<std::uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
        const std::uint32_t back = static_cast<std::uint32_t>(bits[i]) << 16;
        std::memcpy(&rounded[i], &back, 4);
    }
    a2.set_base(lora::Target::K, rounded);
    const std::vector<float> want = a2.forward(x, kBatch, kSeqLen);
    a2.set_base_typed(lora::Target::K, bits, lora::Dtype::Bf16);
    const std::vector<float> got = a2.forward(x, kBatch, kSeqLen);
    a4.set_base(lora::Target::K, rounded);
    const std::vector<float> want4 = a4.forward(x, kBatch, kSeqLen);
    a4.set_base_typed_borrowed(lora::Target::K,
                               std::make_shared<const std::vector<std::uint16_t>>(bits),
                               lora::Dtype::Bf16);
    const std::vector<float> got4 = a4.forward(x, kBatch, kSeqLen);
    double typed_diff = rounded == w ? 1.0 : 0.0;
    for (std::size_t i = 0; i < got.size(); i++)
        typed_diff = std::max({typed_diff, (double)std::fabs(got[i] - want[i]),
                               (double)std::fabs(got4[i] - want4[i])});

    const std::vector<std::int32_t> ids{1, -1, 0, 1};
    const std::vector<float> xr(x.begin(), x.begin() + ids.size() * kDModel);
    std::vector<float> y(ids.size() * kDModel, 1.0f);
    const std::vector<const lora::Adapter *> tenants{&a2, &a4};
    lora::apply(tenants, lora::Target::V, ids, xr, y);
    double apply_diff = 0;
    for (std::size_t r = 0; r < ids.size(); r++) {
        std::vector<float> ref(kDModel, 1.0f);
        if (ids[r] >= 0) {
            const lora::Adapter &t = *tenants[static_cast<std::size_t>(ids[r])];
            const std::vector<float> A = t.param(lora::Target::V, lora::Factor::A);
            const std::vector<float> B = t.param(lora::Target::V, lora::Factor::B);
            const std::size_t rank = A.size() / kDModel;
            const double s = t.config_double(LORA_CFG_ALPHA) / (double)rank;
            for (std::size_t o = 0; o < kDModel; o++) {
                double d = 0;
                for (std::size_t k = 0; k < rank; k++) {
                    double xa = 0;
                    for (std::size_t i = 0; i < kDModel; i++)
                        xa += (double)xr[r * kDModel + i] * A[k * kDModel + i];
                    d += xa * B[o * rank + k];
                }
                ref[o] = (float)(1.0 + s * d);
            }
        }
        for (std::size_t o = 0; o < kDModel; o++)
            apply_diff = std::max(apply_diff, (double)std::fabs(y[r * kDModel + o] - ref[o]));
    }
    bool apply_error = false;
    try {
        lora::apply(tenants, lora::Target::V, std::vector<std::int32_t>{0, 2, 0, 0}, xr, y);
    } catch (const lora::Error &e) {
        apply_error = e.status() == LORA_ERR_INVALID_ARG && !e.message().empty();
    }

    const std::vector<float> x1(x.begin(), x.begin() + kSeqLen * kDModel);
    const std::vector<float> valid(x1.begin(), x1.begin() + 10 * kDModel);
    const lora_threshold_report whole = a4.threshold_estimate(valid, 1, 10);
    const std::vector<std::int64_t> lens{10};
    lora::AttnArgs args;
    args.q_lens = lens;
    const lora_threshold_report part = a4.threshold_estimate_ex(x1, 1, kSeqLen, args);
    const bool estimate_same = std::fabs(part.gamma_q - whole.gamma_q) <= 1e-6 * whole.gamma_q &&
                               std::fabs(part.score_bound - whole.score_bound) <=
                                   1e-6 * whole.score_bound;
    std::printf("bf16 base %.3g, apply %.3g off the reference; apply error %s; "
                "estimate_ex on valid rows %s\n",
                typed_diff, apply_diff, apply_error ? "caught" : "MISSED",
                estimate_same ? "matches" : "DIFFERS");
    return typed_diff <= 1e-4 && apply_diff <= 1e-4 && apply_error && estimate_same;
}

} // namespace

int main() {
    try {
        std::printf("liblora %s (C++ wrapper example)\n", lora::version().c_str());
        std::mt19937 gen(7);
        const std::vector<float> wq = randn(kDModel * kDModel, 0.2f, gen);
        const std::vector<float> wk = randn(kDModel * kDModel, 0.2f, gen);
        const std::vector<float> wv = randn(kDModel * kDModel, 0.2f, gen);

        auto base = [&](lora::Adapter &ad) {
            ad.set_base(lora::Target::Q, wq);
            ad.set_base(lora::Target::K, wk);
            ad.set_base(lora::Target::V, wv);
        };

        // Teacher: same base, random non-zero factors (the hidden update).
        lora::Adapter teacher = lora::Config(kDModel).n_heads(kHeads).rank(kRank).threads(1).build();
        base(teacher);
        for (lora::Target t : {lora::Target::Q, lora::Target::V}) {
            teacher.set_param(t, lora::Factor::A, randn(kRank * kDModel, 0.3f, gen));
            teacher.set_param(t, lora::Factor::B, randn(kDModel * kRank, 0.3f, gen));
        }
        const std::vector<float> x = randn(kBatch * kSeqLen * kDModel, 1.0f, gen);
        const std::vector<float> target = teacher.forward(x, kBatch, kSeqLen);

        // Student: PEFT initialisation (A Kaiming-uniform, B = 0), trained by AdamW.
        lora::Adapter student = lora::Config(kDModel)
                                    .n_heads(kHeads)
                                    .rank(kRank)
                                    .targets({lora::Target::Q, lora::Target::V})
                                    .backend(lora::Backend::Exact)
                                    .threads(1)
                                    .seed(1)
                                    .build();
        base(student);
        lora::Optimizer opt(student, lora::OptimizerKind::AdamW);
        opt.lr(0.03).weight_decay(0.0).max_grad_norm(10.0);
        double first = 0, last = 0;
        std::vector<float> dout(target.size());
        for (int step = 0; step < 60; step++) {
            const std::vector<float> out = student.forward(x, kBatch, kSeqLen);
            const double loss = lora::mse_loss(out, target, dout);
            student.zero_grad();
            student.backward(dout, /*want_dx=*/false);
            opt.step(student);
            if (step == 0)
                first = loss;
            last = loss;
            if (step % 10 == 0)
                std::printf("step %2d  loss %.6f\n", step, loss);
        }
        const lora_run_info info = student.run_info();
        std::printf("loss %.6f -> %.6f after %lld AdamW steps; backend %s\n", first, last,
                    static_cast<long long>(opt.step_count()),
                    info.backend == LORA_BACKEND_EXACT ? "exact" : "poly");

        // Merged inference: x*(W + s*B*A)^T, no LoRA branch; same output up to rounding.
        const std::vector<float> lora_out = student.forward(x, kBatch, kSeqLen);
        const std::vector<float> merged_out = student.forward_merged(x, kBatch, kSeqLen);
        double max_diff = 0;
        for (std::size_t i = 0; i < lora_out.size(); i++)
            max_diff = std::fmax(max_diff, std::fabs(double(lora_out[i]) - merged_out[i]));
        std::printf("merged vs LoRA forward: max |diff| = %.2g\n", max_diff);

        // Serving: a tenant borrows one shared base (no copy) and hot-swaps the factors in.
        auto shared_q = std::make_shared<const std::vector<float>>(wq);
        auto shared_k = std::make_shared<const std::vector<float>>(wk);
        auto shared_v = std::make_shared<const std::vector<float>>(wv);
        lora::Adapter tenant = lora::Config(kDModel).n_heads(kHeads).rank(kRank).threads(1).build();
        tenant.set_base_borrowed(lora::Target::Q, shared_q);
        tenant.set_base_borrowed(lora::Target::K, shared_k);
        tenant.set_base_borrowed(lora::Target::V, shared_v);
        tenant.copy_params_from(student);
        const std::vector<float> tenant_out = tenant.forward(x, kBatch, kSeqLen);
        double tenant_diff = 0;
        for (std::size_t i = 0; i < lora_out.size(); i++)
            tenant_diff = std::fmax(tenant_diff, std::fabs(double(lora_out[i]) - tenant_out[i]));
        std::printf("borrowed-base tenant vs student: max |diff| = %.2g\n", tenant_diff);

        // Adapter files: save the trained factors as a PEFT directory (layer 0), load back.
        const std::string dir =
            (std::filesystem::temp_directory_path() / "lora-cpp-example-peft").string();
        lora::save_peft(dir, {{0, &student}});
        const lora::Config load_cfg = layer_config(kDModel, kHeads); // const is fine
        if (load_cfg.get_int(LORA_CFG_HEAD_DIM) != kDModel / kHeads || !config_copies_work() ||
            !tapes_work(tenant, x, target))
            return 1;
        {
            lora::Adapter copy = lora::Config(kDModel).n_heads(kHeads).rank(kRank).threads(1).build();
            lora::Adapter lender = lora::Config(kDModel).n_heads(kHeads).rank(kRank).threads(1).build();
            base(copy);
            base(lender);
            if (!borrowed_factors_work(student, copy, lender, x))
                return 1;
        }
        auto loaded = lora::load_peft(dir, load_cfg);
        auto again = lora::load_peft(dir, lora::Config(kDModel).n_heads(kHeads)); // temporary
        const bool same_params = loaded.size() == 1 && again.size() == 1 &&
                                 loaded[0].second.params_flat() == student.params_flat() &&
                                 again[0].second.params_flat() == student.params_flat();
        std::printf("PEFT save/load (%s): %zu layer(s), factors %s\n", dir.c_str(),
                    loaded.size(), same_params ? "identical" : "DIFFER");
        // With options: the base model's id lands in adapter_config.json.
        lora::save_peft(dir, {{0, &student}}, lora::SaveOptions{"org/base-model", ""});
        std::ifstream config_file(dir + "/adapter_config.json");
        const std::string config_text((std::istreambuf_iterator<char>(config_file)),
                                      std::istreambuf_iterator<char>());
        const bool base_named = config_text.find("\"org/base-model\"") != std::string::npos;
        std::printf("adapter_config.json names the base model: %s\n", base_named ? "yes" : "NO");
        if (!base_named)
            return 1;
        std::filesystem::remove_all(dir);

        // RoPE with a frequency table of zeros turns nothing: the tenant's output again.
        lora::Adapter rotary =
            lora::Config(kDModel).n_heads(kHeads).rank(kRank).threads(1).rope(lora::Rope::Half)
                .build();
        base(rotary);
        rotary.copy_params_from(student);
        const bool rope_turns = rotary.forward(x, kBatch, kSeqLen) != tenant_out;
        rotary.set_rope_freqs(std::vector<double>(kDModel / kHeads / 2, 0.0));
        const bool zero_table_same = rotary.forward(x, kBatch, kSeqLen) == tenant_out;
        std::printf("RoPE changes the output: %s; a zero frequency table: %s\n",
                    rope_turns ? "yes" : "NO", zero_table_same ? "same as none" : "DIFFERS");

        // Errors carry the status and the library's message.
        try {
            lora::Config(kDModel).n_heads(5).build();
        } catch (const lora::Error &e) {
            std::printf("caught (status %d): %s\n", e.status(), e.what());
        }
        try {
            lora::Adapter bare = lora::Config(kDModel).build();
            bare.forward(x, kBatch, kSeqLen); // no base weights set
        } catch (const lora::Error &e) {
            std::printf("caught (status %d): %s\n", e.status(), e.what());
            if (e.status() != LORA_ERR_STATE)
                return 1;
        }
        // Decoding with a KV cache: token by token equals one causal inference forward;
        // a sequence of the teacher tenant in a batch decoded on dec's base equals the
        // teacher decoding it alone.
        lora::Adapter dec = lora::Config(kDModel).n_heads(kHeads).rank(kRank).causal(true)
                                .threads(1).build();
        base(dec);
        lora::AttnArgs infer;
        infer.infer = true;
        const std::vector<float> x1(x.begin(), x.begin() + kSeqLen * kDModel);
        const std::vector<float> whole = dec.forward_ex(x1, {}, 1, kSeqLen, kSeqLen, infer);
        lora::KvCache cache(dec, 1, kSeqLen);
        double decode_diff = 0;
        for (std::size_t i = 0; i < kSeqLen; i++) {
            const std::vector<float> xi(x1.begin() + i * kDModel, x1.begin() + (i + 1) * kDModel);
            const std::vector<float> yi = dec.decode(cache, xi, 1);
            for (std::size_t j = 0; j < kDModel; j++)
                decode_diff = std::max(decode_diff,
                                       (double)std::fabs(yi[j] - whole[i * kDModel + j]));
        }
        lora::KvCache pair(dec, 2, kSeqLen), alone(teacher, 1, kSeqLen);
        std::vector<float> x2(x1);
        x2.insert(x2.end(), x1.begin(), x1.end());
        const std::vector<const lora::Adapter *> tenants{&teacher};
        const std::vector<std::int32_t> ids{0, -1};
        const std::vector<float> both = dec.decode(pair, x2, kSeqLen, {}, tenants, ids);
        const std::vector<float> own = teacher.decode(alone, x1, kSeqLen);
        for (std::size_t j = 0; j < own.size(); j++)
            decode_diff = std::max(decode_diff, (double)std::fabs(both[j] - own[j]));
        std::printf("decode vs forward, tenants vs alone: max |diff| %.3g\n", decode_diff);
        if (decode_diff > 1e-4) {
            std::fprintf(stderr, "decoding differs from the forward\n");
            return 1;
        }
        if (!serving_api_works(wq, x, gen)) {
            std::fprintf(stderr, "a serving entry point differs from its reference\n");
            return 1;
        }
        if (!(last < 0.1 * first) || max_diff > 1e-4 || tenant_diff != 0 || !same_params ||
            !rope_turns || !zero_table_same) {
            std::fprintf(stderr, "the loss did not fall tenfold, or outputs differ\n");
            return 1;
        }
        std::printf("cpp example: ok\n");
        return 0;
    } catch (const lora::Error &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
