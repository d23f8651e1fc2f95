// lora.hpp: a header-only C++17 RAII wrapper over liblora's C API (include/lora.h).
//
// - lora::Config builds a lora::Adapter; handles live in std::unique_ptr with the
//   library's destroy functions as deleters, so nothing leaks on any path.
// - Every failing call throws lora::Error (a std::runtime_error) carrying the status
//   code and the library's message (lora_adapter_last_error / lora_config_last_error).
// - Tensors are passed as lora::Span<const float> (pointer + size; a std::vector, a
//   std::array or a raw pointer and length convert to it) and returned as
//   std::vector<float>. Sizes are checked before a pointer reaches C.
//
// Build: c++ -std=c++17 -Iinclude -Iexamples/cpp app.cpp -Llib -llora
// See docs/cpp.md and examples/cpp/example.cpp.
#ifndef LORA_HPP
#define LORA_HPP

#include <lora.h>

#include <array>
#include <initializer_list>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lora {

// ---- errors ----------------------------------------------------------------------------

class Error : public std::runtime_error {
public:
    Error(int status, std::string function, const std::string &message)
        : std::runtime_error(function + ": " + lora_status_string(status) +
                             (message.empty() ? "" : ": " + message)),
          status_(status), function_(std::move(function)), message_(message) {}
    int status() const noexcept { return status_; }
    const std::string &function() const noexcept { return function_; }
    const std::string &message() const noexcept { return message_; }

private:
    int status_;
    std::string function_;
    std::string message_;
};

// ---- a minimal span (std::span is C++20) ------------------------------------------------

template <class T> class Span {
public:
    constexpr Span() noexcept = default;
    constexpr Span(T *data, std::size_t size) noexcept : data_(data), size_(size) {}
    template <class U, class A>
    Span(std::vector<U, A> &v) noexcept : data_(v.data()), size_(v.size()) {}
    template <class U, class A>
    Span(const std::vector<U, A> &v) noexcept : data_(v.data()), size_(v.size()) {}
    template <class U, std::size_t N>
    Span(std::array<U, N> &a) noexcept : data_(a.data()), size_(N) {}
    template <class U, std::size_t N>
    Span(const std::array<U, N> &a) noexcept : data_(a.data()), size_(N) {}
    template <std::size_t N> Span(T (&a)[N]) noexcept : data_(a), size_(N) {}
    constexpr T *data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr bool empty() const noexcept { return size_ == 0; }

private:
    T *data_ = nullptr;
    std::size_t size_ = 0;
};

// ---- enums -----------------------------------------------------------------------------

enum class Target : int { Q = LORA_TARGET_Q, K = LORA_TARGET_K, V = LORA_TARGET_V, O = LORA_TARGET_O };
enum class Factor : int { A = LORA_A, B = LORA_B };
enum class Backend : int { Auto = LORA_BACKEND_AUTO, Exact = LORA_BACKEND_EXACT, Poly = LORA_BACKEND_POLY };
enum class Init : int {
    KaimingZero = LORA_INIT_KAIMING_ZERO,
    Gaussian = LORA_INIT_GAUSSIAN,
    Zero = LORA_INIT_ZERO
};
enum class Rope : int {
    None = LORA_ROPE_NONE,
    Half = LORA_ROPE_HALF,
    Interleaved = LORA_ROPE_INTERLEAVED
};
enum class Compute : int { F32 = LORA_COMPUTE_F32, Bf16 = LORA_COMPUTE_BF16 };
// Element types of base weights (lora_adapter_set_base_typed).
enum class Dtype : int { F32 = LORA_DTYPE_F32, Bf16 = LORA_DTYPE_BF16, F16 = LORA_DTYPE_F16 };
enum class ForwardFlag : int { Infer = LORA_FWD_INFER };

inline std::string version() { return lora_version_string(); }
inline std::uint32_t version_number() { return lora_version_number(); }

namespace detail {
// Calls taking their handle as const write no message into it (lora.h, Threads): the
// handle's last error would be an older call's.
inline const char *message_of(const char *function, const char *last_error) {
    static const std::string const_calls[] = {
        "lora_config_get_int", "lora_config_get_double", "lora_adapter_get_config_int",
        "lora_adapter_get_config_double", "lora_adapter_param_shape", "lora_adapter_get_param",
        "lora_adapter_get_grad", "lora_adapter_param_count", "lora_adapter_get_params_flat",
        "lora_adapter_get_grads_flat", "lora_adapter_merge", "lora_adapter_unmerge",
        "lora_adapter_get_run_info", "lora_tape_create", "lora_optimizer_create",
        "lora_optimizer_create_set", "lora_optimizer_get_int", "lora_optimizer_get_double"};
    for (const std::string &c : const_calls)
        if (c == function)
            return "";
    return last_error;
}
struct ConfigDeleter {
    void operator()(lora_config *c) const noexcept { lora_config_destroy(c); }
};
struct AdapterDeleter {
    void operator()(lora_adapter *a) const noexcept { lora_adapter_destroy(a); }
};
struct OptimizerDeleter {
    void operator()(lora_optimizer *o) const noexcept { lora_optimizer_destroy(o); }
};
struct TapeDeleter {
    void operator()(lora_tape *t) const noexcept { lora_tape_destroy(t); }
};
struct KvCacheDeleter {
    void operator()(lora_kv_cache *c) const noexcept { lora_kv_cache_destroy(c); }
};
// Sizes of the forward a backward reads (the adapter's own, or a tape's).
struct Saved {
    int kind = 0; // 0 none, 1 self, 2 cross
    std::size_t out = 0, x = 0, xkv = 0;
};
inline void shape_check(bool ok, const char *function, const std::string &what) {
    if (!ok)
        throw Error(LORA_ERR_SHAPE, function, what);
}
inline std::string count_msg(const char *name, std::size_t got, std::size_t want) {
    return std::string(name) + " has " + std::to_string(got) + " values, expected " +
           std::to_string(want);
}
} // namespace detail

// The paper's loss: returns 1/2 * sum((out - target)^2) and writes out - target to dout
// when dout is not empty.
inline double mse_loss(Span<const float> out, Span<const float> target,
                       Span<float> dout = {}) {
    detail::shape_check(out.size() == target.size(), "mse_loss",
                        detail::count_msg("target", target.size(), out.size()));
    detail::shape_check(dout.empty() || dout.size() == out.size(), "mse_loss",
                        detail::count_msg("dout", dout.size(), out.size()));
    double loss = 0;
    int st = lora_mse_loss(out.data(), target.data(), out.size(), &loss,
                           dout.empty() ? nullptr : dout.data());
    if (st != LORA_OK)
        throw Error(st, "lora_mse_loss", "");
    return loss;
}

class Adapter;

// Per-call arguments of Adapter::forward_ex (lora_attn_args). The masks: q_lens,
// kv_lens (batch), q_pos (batch*len_q), kv_pos (batch*len_kv), q_seg, kv_seg of the same
// lengths; empty = default. A library without them throws LORA_ERR_UNSUPPORTED.
struct AttnArgs {
    bool infer = false; // LORA_FWD_INFER: save nothing for backward, no dropout
    Span<const std::int64_t> q_lens, kv_lens, q_pos, kv_pos;
    Span<const std::int32_t> q_seg, kv_seg;
};

// What one training forward keeps for its backward (lora_tape), so several forwards of
// one adapter can be in flight. May outlive its adapter (then only its destructor runs).
class Tape {
public:
    explicit Tape(const Adapter &ad);
    lora_tape *get() const noexcept { return tape_.get(); }

private:
    friend class Adapter;
    std::unique_ptr<lora_tape, detail::TapeDeleter> tape_;
    detail::Saved saved_;
};

// Keys and values of `batch` sequences of up to `capacity` tokens for Adapter::decode
// (lora_kv_cache), shaped for the adapter it is made with.
class KvCache {
public:
    KvCache(const Adapter &ad, std::size_t batch, std::size_t capacity);
    lora_kv_cache *get() const noexcept { return cache_.get(); }
    std::size_t batch() const noexcept { return batch_; }
    // Empties sequence b (-1: all).
    void reset(std::int64_t b = -1) {
        const int st = lora_kv_cache_reset(cache_.get(), b);
        if (st != LORA_OK)
            throw Error(st, "lora_kv_cache_reset", "b = " + std::to_string(b));
    }
    std::size_t length(std::size_t b) const {
        std::int64_t n = 0;
        const int st = lora_kv_cache_length(cache_.get(), static_cast<std::int64_t>(b), &n);
        if (st != LORA_OK)
            throw Error(st, "lora_kv_cache_length", "b = " + std::to_string(b));
        return static_cast<std::size_t>(n);
    }

private:
    std::unique_ptr<lora_kv_cache, detail::KvCacheDeleter> cache_;
    std::size_t batch_;
};

// ---- configuration ---------------------------------------------------------------------

// Builder of the LORA_CFG_* parameters; build() creates the adapter. Copyable: a copy
// is a new lora_config with the same parameters set in the same order (derived
// defaults stay derived). Setters chain on lvalues (Config &) and on temporaries
// (Config &&), so `return lora::Config(d).n_heads(h);` moves the builder out.
class Config {
public:
    explicit Config(std::int64_t d_model) : cfg_(create()) {
        set_int(LORA_CFG_D_MODEL, d_model);
    }
    Config(const Config &other) : cfg_(create()) {
        for (const Setting &s : other.settings_)
            apply(s);
    }
    Config(Config &&) noexcept = default;
    Config &operator=(const Config &other) {
        if (this != &other)
            *this = Config(other);
        return *this;
    }
    Config &operator=(Config &&) noexcept = default;
    ~Config() = default;

    Config &set_int(int param, std::int64_t value) & {
        return apply({param, true, value, 0.0});
    }
    Config &set_double(int param, double value) & {
        return apply({param, false, 0, value});
    }
    Config &&set_int(int param, std::int64_t value) && {
        return std::move(set_int(param, value));
    }
    Config &&set_double(int param, double value) && {
        return std::move(set_double(param, value));
    }

// Each named setter, for lvalues and for temporaries.
#define LORA_HPP_SETTER(name, type, call)                                                  \
    Config &name(type v) & { return call; }                                                \
    Config &&name(type v) && { return std::move(call); }
    LORA_HPP_SETTER(n_heads, std::int64_t, set_int(LORA_CFG_N_HEADS, v))
    LORA_HPP_SETTER(n_kv_heads, std::int64_t, set_int(LORA_CFG_N_KV_HEADS, v))
    LORA_HPP_SETTER(head_dim, std::int64_t, set_int(LORA_CFG_HEAD_DIM, v))
    LORA_HPP_SETTER(rank, std::int64_t, set_int(LORA_CFG_RANK, v))
    LORA_HPP_SETTER(alpha, double, set_double(LORA_CFG_ALPHA, v))
    LORA_HPP_SETTER(rslora, bool, set_int(LORA_CFG_RSLORA, v))
    LORA_HPP_SETTER(softmax_scale, double, set_double(LORA_CFG_SOFTMAX_SCALE, v))
    LORA_HPP_SETTER(causal, bool, set_int(LORA_CFG_CAUSAL, v))
    LORA_HPP_SETTER(backend, Backend, set_int(LORA_CFG_BACKEND, static_cast<int>(v)))
    LORA_HPP_SETTER(tolerance, double, set_double(LORA_CFG_TOLERANCE, v))
    LORA_HPP_SETTER(poly_degree, std::int64_t, set_int(LORA_CFG_POLY_DEGREE, v))
    LORA_HPP_SETTER(threads, std::int64_t, set_int(LORA_CFG_THREADS, v))
    LORA_HPP_SETTER(seed, std::uint64_t, set_int(LORA_CFG_SEED, static_cast<std::int64_t>(v)))
    LORA_HPP_SETTER(init, Init, set_int(LORA_CFG_INIT, static_cast<int>(v)))
    LORA_HPP_SETTER(out_proj, bool, set_int(LORA_CFG_OUT_PROJ, v))
    LORA_HPP_SETTER(measure_rows, std::int64_t, set_int(LORA_CFG_MEASURE_ROWS, v))
    LORA_HPP_SETTER(rope, Rope, set_int(LORA_CFG_ROPE, static_cast<int>(v)))
    LORA_HPP_SETTER(rope_theta, double, set_double(LORA_CFG_ROPE_THETA, v))
    LORA_HPP_SETTER(rope_dim, std::int64_t, set_int(LORA_CFG_ROPE_DIM, v))
    LORA_HPP_SETTER(window, std::int64_t, set_int(LORA_CFG_WINDOW, v))
    LORA_HPP_SETTER(softcap, double, set_double(LORA_CFG_SOFTCAP, v))
    LORA_HPP_SETTER(dropout, double, set_double(LORA_CFG_DROPOUT, v))
    LORA_HPP_SETTER(compute, Compute, set_int(LORA_CFG_COMPUTE, static_cast<int>(v)))
    LORA_HPP_SETTER(targets, std::initializer_list<Target>, set_int(LORA_CFG_TARGETS, mask(v)))
#undef LORA_HPP_SETTER

    // Effective values (derived defaults resolved; 0 while they cannot be).
    std::int64_t get_int(int param) const {
        std::int64_t v = 0;
        check(lora_config_get_int(cfg_.get(), param, &v), "lora_config_get_int");
        return v;
    }
    double get_double(int param) const {
        double v = 0;
        check(lora_config_get_double(cfg_.get(), param, &v), "lora_config_get_double");
        return v;
    }
    const lora_config *get() const noexcept { return cfg_.get(); }
    lora_config *get() noexcept { return cfg_.get(); }

    inline Adapter build() const;

private:
    struct Setting {
        int param;
        bool is_int;
        std::int64_t i;
        double d;
    };
    static lora_config *create() {
        lora_config *c = nullptr;
        const int st = lora_config_create(&c);
        if (st != LORA_OK)
            throw Error(st, "lora_config_create", "");
        return c;
    }
    static std::int64_t mask(std::initializer_list<Target> ts) {
        std::int64_t m = 0;
        for (Target t : ts)
            m |= static_cast<int>(t);
        return m;
    }
    // Sets one parameter and remembers it, for copies.
    Config &apply(const Setting &s) {
        if (s.is_int)
            check(lora_config_set_int(cfg_.get(), s.param, s.i), "lora_config_set_int");
        else
            check(lora_config_set_double(cfg_.get(), s.param, s.d), "lora_config_set_double");
        settings_.push_back(s);
        return *this;
    }
    void check(int st, const char *function) const {
        if (st != LORA_OK)
            throw Error(st, function,
                        detail::message_of(function, lora_config_last_error(cfg_.get())));
    }
    std::unique_ptr<lora_config, detail::ConfigDeleter> cfg_;
    std::vector<Setting> settings_;
};

// ---- adapter ---------------------------------------------------------------------------

class Adapter {
public:
    // Takes ownership of a handle from lora_adapter_create.
    explicit Adapter(lora_adapter *handle) : ad_(handle) {
        if (!handle)
            throw Error(LORA_ERR_INVALID_ARG, "Adapter", "null handle");
        const std::int64_t head_dim = config_int(LORA_CFG_HEAD_DIM);
        d_model_ = static_cast<std::size_t>(config_int(LORA_CFG_D_MODEL));
        q_dim_ = static_cast<std::size_t>(config_int(LORA_CFG_N_HEADS) * head_dim);
        kv_dim_ = static_cast<std::size_t>(config_int(LORA_CFG_N_KV_HEADS) * head_dim);
        out_proj_ = config_int(LORA_CFG_OUT_PROJ) != 0;
    }

    lora_adapter *get() const noexcept { return ad_.get(); }
    std::string last_error() const { return lora_adapter_last_error(ad_.get()); }

    std::int64_t config_int(int param) const {
        std::int64_t v = 0;
        check(lora_adapter_get_config_int(ad_.get(), param, &v), "lora_adapter_get_config_int");
        return v;
    }
    double config_double(int param) const {
        double v = 0;
        check(lora_adapter_get_config_double(ad_.get(), param, &v),
              "lora_adapter_get_config_double");
        return v;
    }
    std::size_t d_model() const noexcept { return d_model_; }
    std::size_t out_dim() const noexcept { return out_proj_ ? d_model_ : q_dim_; }

    // (out, in) of target's base weight.
    std::pair<std::size_t, std::size_t> base_shape(Target t) const noexcept {
        switch (t) {
        case Target::Q: return {q_dim_, d_model_};
        case Target::K:
        case Target::V: return {kv_dim_, d_model_};
        case Target::O: break;
        }
        return {d_model_, q_dim_};
    }

    void set_base(Target t, Span<const float> weight, Span<const float> bias = {}) {
        const auto [out, in] = base_shape(t);
        detail::shape_check(weight.size() == out * in, "set_base",
                            detail::count_msg("weight", weight.size(), out * in));
        detail::shape_check(bias.empty() || bias.size() == out, "set_base",
                            detail::count_msg("bias", bias.size(), out));
        saved_ = Saved{};
        check(lora_adapter_set_base(ad_.get(), static_cast<int>(t), weight.data(),
                                    bias.empty() ? nullptr : bias.data()),
              "lora_adapter_set_base");
    }

    std::pair<std::size_t, std::size_t> param_shape(Target t, Factor f) const {
        std::int64_t r = 0, c = 0;
        check(lora_adapter_param_shape(ad_.get(), static_cast<int>(t), static_cast<int>(f), &r,
                                       &c),
              "lora_adapter_param_shape");
        return {static_cast<std::size_t>(r), static_cast<std::size_t>(c)};
    }
    std::vector<float> param(Target t, Factor f) const {
        const auto [r, c] = param_shape(t, f);
        std::vector<float> v(r * c);
        check(lora_adapter_get_param(ad_.get(), static_cast<int>(t), static_cast<int>(f),
                                     v.data(), v.size()),
              "lora_adapter_get_param");
        return v;
    }
    std::vector<float> grad(Target t, Factor f) const {
        const auto [r, c] = param_shape(t, f);
        std::vector<float> v(r * c);
        check(lora_adapter_get_grad(ad_.get(), static_cast<int>(t), static_cast<int>(f),
                                    v.data(), v.size()),
              "lora_adapter_get_grad");
        return v;
    }
    void set_param(Target t, Factor f, Span<const float> v) {
        saved_ = Saved{};
        check(lora_adapter_set_param(ad_.get(), static_cast<int>(t), static_cast<int>(f),
                                     v.data(), v.size()),
              "lora_adapter_set_param");
    }
    void zero_grad() { check(lora_adapter_zero_grad(ad_.get()), "lora_adapter_zero_grad"); }

    // Uses caller memory as LoRA factor f of target t and, when grad is not empty, as its
    // gradient, with no copy (lora_adapter_borrow_factor): param's current values become
    // the factor, grad's the accumulated gradient; each holds the factor's exact element
    // count (param_shape). The library then reads and writes them in place (optimizer
    // steps and set_param write param; backward and zero_grad write grad) and notices
    // writes the caller makes to param between calls (a fingerprint).
    // Lifetime: both buffers must stay valid until this adapter is destroyed, f is
    // borrowed again, or release_factor(t, f) gives it back to the adapter's own storage.
    // Do not resize a std::vector lent here (its data would move). FactorBorrow does the
    // release at the end of a scope.
    void borrow_factor(Target t, Factor f, Span<float> param, Span<float> grad = {}) {
        const auto [r, c] = param_shape(t, f);
        detail::shape_check(param.size() == r * c, "borrow_factor",
                            detail::count_msg("param", param.size(), r * c));
        detail::shape_check(grad.empty() || grad.size() == r * c, "borrow_factor",
                            detail::count_msg("grad", grad.size(), r * c));
        check(lora_adapter_borrow_factor(ad_.get(), static_cast<int>(t), static_cast<int>(f),
                                         param.data(), grad.empty() ? nullptr : grad.data(),
                                         r * c),
              "lora_adapter_borrow_factor");
        saved_ = Saved{}; // new factor memory is a parameter change
    }
    // Gives factor f of t back to the adapter's own storage (the borrowed values are
    // copied over); the caller's buffers are no longer used afterwards.
    void release_factor(Target t, Factor f) {
        const auto [r, c] = param_shape(t, f);
        check(lora_adapter_borrow_factor(ad_.get(), static_cast<int>(t), static_cast<int>(f),
                                         nullptr, nullptr, r * c),
              "lora_adapter_borrow_factor");
    }

    // Uses a shared, caller-owned base without copying it (multi-adapter serving). The
    // adapter keeps the shared_ptrs, so the buffers live as long as it may read them;
    // do not modify them meanwhile (lora.h's lifetime rule).
    void set_base_borrowed(Target t, std::shared_ptr<const std::vector<float>> weight,
                           std::shared_ptr<const std::vector<float>> bias = nullptr) {
        const auto [out, in] = base_shape(t);
        detail::shape_check(weight && weight->size() == out * in, "set_base_borrowed",
                            detail::count_msg("weight", weight ? weight->size() : 0, out * in));
        detail::shape_check(!bias || bias->size() == out, "set_base_borrowed",
                            detail::count_msg("bias", bias ? bias->size() : 0, out));
        saved_ = Saved{};
        check(lora_adapter_set_base_borrowed(ad_.get(), static_cast<int>(t), weight->data(),
                                             bias ? bias->data() : nullptr),
              "lora_adapter_set_base_borrowed");
        borrowed_[index(t)] = {std::move(weight), std::move(bias)};
    }

    // lora_adapter_set_base_typed: a base weight (out, in) stored as bf16 or f16 (16-bit
    // patterns in host byte order, e.g. a safetensors tensor's bytes), copied at 2 bytes
    // per weight; float weights go through set_base. bias (out) float or empty.
    void set_base_typed(Target t, Span<const std::uint16_t> weight, Dtype dtype,
                        Span<const float> bias = {}) {
        typed_base(t, weight.data(), weight.size(), dtype, bias.empty() ? nullptr : bias.data(),
                   bias.size(), 0);
        borrowed_[index(t)] = {};
    }
    // The same with LORA_BASE_BORROW: used in place, kept alive as set_base_borrowed's.
    void set_base_typed_borrowed(Target t, std::shared_ptr<const std::vector<std::uint16_t>> weight,
                                 Dtype dtype,
                                 std::shared_ptr<const std::vector<float>> bias = nullptr) {
        typed_base(t, weight ? weight->data() : nullptr, weight ? weight->size() : 0, dtype,
                   bias ? bias->data() : nullptr, bias ? bias->size() : 0, LORA_BASE_BORROW);
        borrowed_[index(t)] = {std::move(weight), std::move(bias)};
    }

    // All LoRA factors (or gradients) as one vector: targets Q, K, V, O (adapted ones),
    // each A then B, row-major. For one MPI_Allreduce, checkpoints.
    std::size_t param_count() const {
        std::size_t n = 0;
        check(lora_adapter_param_count(ad_.get(), &n), "lora_adapter_param_count");
        return n;
    }
    std::vector<float> params_flat() const {
        std::vector<float> v(param_count());
        check(lora_adapter_get_params_flat(ad_.get(), v.data(), v.size()),
              "lora_adapter_get_params_flat");
        return v;
    }
    void set_params_flat(Span<const float> v) {
        saved_ = Saved{};
        check(lora_adapter_set_params_flat(ad_.get(), v.data(), v.size()),
              "lora_adapter_set_params_flat");
    }
    std::vector<float> grads_flat() const {
        std::vector<float> v(param_count());
        check(lora_adapter_get_grads_flat(ad_.get(), v.data(), v.size()),
              "lora_adapter_get_grads_flat");
        return v;
    }
    void set_grads_flat(Span<const float> v) {
        check(lora_adapter_set_grads_flat(ad_.get(), v.data(), v.size()),
              "lora_adapter_set_grads_flat");
    }

    // In place: weight ((out, in), holding W) becomes W + s*B*A; unmerge subtracts it.
    void merge(Target t, Span<float> weight) const {
        check(lora_adapter_merge(ad_.get(), static_cast<int>(t), weight.data(), weight.size()),
              "lora_adapter_merge");
    }
    void unmerge(Target t, Span<float> weight) const {
        check(lora_adapter_unmerge(ad_.get(), static_cast<int>(t), weight.data(), weight.size()),
              "lora_adapter_unmerge");
    }
    // Hot swap: src's factors and scaling into this adapter (base, settings, gradients kept).
    // Replaces RoPE's inverse frequencies (THETA^(-2i/ROPE_DIM) by default) with
    // ROPE_DIM/2 finite values >= 0: linear, NTK, Llama 3 or YaRN scaling
    // (docs/models.md). Drops the saved forward.
    void set_rope_freqs(const std::vector<double> &inv_freq) {
        saved_ = Saved{};
        check(lora_adapter_set_rope_freqs(ad_.get(), inv_freq.data(), inv_freq.size()),
              "lora_adapter_set_rope_freqs");
    }

    void copy_params_from(const Adapter &src) {
        saved_ = Saved{};
        check(lora_adapter_copy_params(ad_.get(), src.get()), "lora_adapter_copy_params");
    }

    // Self-attention: x is (batch, seq_len, d_model); returns (batch, seq_len, out_dim).
    std::vector<float> forward(Span<const float> x, std::size_t batch, std::size_t seq_len) {
        const std::size_t xn = input(x, batch, seq_len, "x");
        std::vector<float> out(batch * seq_len * out_dim());
        saved_ = Saved{};
        check(lora_forward(ad_.get(), x.data(), static_cast<std::int64_t>(batch),
                           static_cast<std::int64_t>(seq_len), out.data()),
              "lora_forward");
        saved_ = Saved{1, out.size(), xn, 0};
        return out;
    }
    // Backward of the last forward; returns dL/dx (empty when want_dx is false).
    std::vector<float> backward(Span<const float> dout, bool want_dx = true) {
        expect_saved(1, dout, "backward");
        std::vector<float> dx(want_dx ? saved_.x : 0);
        check(lora_backward(ad_.get(), dout.data(), want_dx ? dx.data() : nullptr),
              "lora_backward");
        return dx;
    }
    // Cross-attention: xq (batch, len_q, d_model), xkv (batch, len_kv, d_model).
    std::vector<float> forward_cross(Span<const float> xq, Span<const float> xkv,
                                     std::size_t batch, std::size_t len_q, std::size_t len_kv) {
        const std::size_t qn = input(xq, batch, len_q, "xq");
        const std::size_t kvn = input(xkv, batch, len_kv, "xkv");
        std::vector<float> out(batch * len_q * out_dim());
        saved_ = Saved{};
        check(lora_forward_cross(ad_.get(), xq.data(), xkv.data(),
                                 static_cast<std::int64_t>(batch),
                                 static_cast<std::int64_t>(len_q),
                                 static_cast<std::int64_t>(len_kv), out.data()),
              "lora_forward_cross");
        saved_ = Saved{2, out.size(), qn, kvn};
        return out;
    }
    // Backward of the last forward_cross: returns (dxq, dxkv).
    std::pair<std::vector<float>, std::vector<float>> backward_cross(Span<const float> dout) {
        expect_saved(2, dout, "backward_cross");
        std::vector<float> dxq(saved_.x), dxkv(saved_.xkv);
        check(lora_backward_cross(ad_.get(), dout.data(), dxq.data(), dxkv.data()),
              "lora_backward_cross");
        return {std::move(dxq), std::move(dxkv)};
    }

    // Inference with merged weights: forward's result up to rounding; no activations
    // kept, the saved forward untouched.
    std::vector<float> forward_merged(Span<const float> x, std::size_t batch,
                                      std::size_t seq_len) {
        input(x, batch, seq_len, "x");
        std::vector<float> out(batch * seq_len * out_dim());
        check(lora_forward_merged(ad_.get(), x.data(), static_cast<std::int64_t>(batch),
                                  static_cast<std::int64_t>(seq_len), out.data()),
              "lora_forward_merged");
        return out;
    }
    std::vector<float> forward_merged_cross(Span<const float> xq, Span<const float> xkv,
                                            std::size_t batch, std::size_t len_q,
                                            std::size_t len_kv) {
        input(xq, batch, len_q, "xq");
        input(xkv, batch, len_kv, "xkv");
        std::vector<float> out(batch * len_q * out_dim());
        check(lora_forward_merged_cross(ad_.get(), xq.data(), xkv.data(),
                                        static_cast<std::int64_t>(batch),
                                        static_cast<std::int64_t>(len_q),
                                        static_cast<std::int64_t>(len_kv), out.data()),
              "lora_forward_merged_cross");
        return out;
    }

    // lora_forward_ex: self-attention on xq when xkv is empty (then len_kv must equal
    // len_q), else cross-attention; returns (batch, len_q, out_dim). A training forward
    // records into tape, or into the adapter's own saved forward when tape is null.
    std::vector<float> forward_ex(Span<const float> xq, Span<const float> xkv,
                                  std::size_t batch, std::size_t len_q, std::size_t len_kv,
                                  const AttnArgs &args = {}, Tape *tape = nullptr) {
        const bool self = xkv.empty();
        const std::size_t qn = input(xq, batch, len_q, "xq");
        const std::size_t kvn = self ? qn : input(xkv, batch, len_kv, "xkv");
        detail::shape_check(!self || len_kv == len_q, "forward_ex",
                            "self-attention (xkv empty) needs len_kv = len_q");
        lora_attn_args c{};
        c.struct_size = sizeof c;
        c.flags = args.infer ? LORA_FWD_INFER : 0;
        c.q_lens = mask(args.q_lens, batch, "q_lens");
        c.kv_lens = mask(args.kv_lens, batch, "kv_lens");
        c.q_pos = mask(args.q_pos, batch * len_q, "q_pos");
        c.kv_pos = mask(args.kv_pos, batch * len_kv, "kv_pos");
        c.q_seg = mask(args.q_seg, batch * len_q, "q_seg");
        c.kv_seg = mask(args.kv_seg, batch * len_kv, "kv_seg");
        c.tape = tape ? tape->get() : nullptr;
        detail::Saved &slot = tape ? tape->saved_ : saved_;
        std::vector<float> out(batch * len_q * out_dim());
        if (!args.infer)
            slot = Saved{};
        check(lora_forward_ex(ad_.get(), &c, xq.data(), self ? nullptr : xkv.data(),
                              static_cast<std::int64_t>(batch),
                              static_cast<std::int64_t>(len_q),
                              static_cast<std::int64_t>(len_kv), out.data()),
              "lora_forward_ex");
        if (!args.infer)
            slot = Saved{self ? 1 : 2, out.size(), qn, self ? 0 : kvn};
        return out;
    }
    // lora_decode(_ex): appends n_new tokens per sequence (x: batch*n_new*d_model) to
    // cache, returns their outputs (batch*n_new*out_dim). n_tokens (batch, or empty):
    // tokens per sequence; tenants with tenant_of_seq (batch, -1 = base alone): each
    // sequence's LoRA terms from its tenant, on this adapter's base.
    std::vector<float> decode(KvCache &cache, Span<const float> x, std::size_t n_new,
                              Span<const std::int64_t> n_tokens = {},
                              Span<const Adapter *const> tenants = {},
                              Span<const std::int32_t> tenant_of_seq = {}) {
        const std::size_t batch = cache.batch();
        input(x, batch, n_new, "x");
        detail::shape_check(n_tokens.empty() || n_tokens.size() == batch, "decode",
                            detail::count_msg("n_tokens", n_tokens.size(), batch));
        detail::shape_check(tenants.empty() == tenant_of_seq.empty() &&
                                (tenant_of_seq.empty() || tenant_of_seq.size() == batch),
                            "decode", "tenants need tenant_of_seq (batch entries)");
        std::vector<const lora_adapter *> handles;
        for (std::size_t i = 0; i < tenants.size(); i++)
            handles.push_back(tenants.data()[i]->get());
        lora_decode_args a{};
        a.struct_size = sizeof a;
        a.n_tokens = n_tokens.empty() ? nullptr : n_tokens.data();
        a.tenants = handles.empty() ? nullptr : handles.data();
        a.n_tenants = handles.size();
        a.tenant_of_seq = tenant_of_seq.empty() ? nullptr : tenant_of_seq.data();
        std::vector<float> out(batch * n_new * out_dim());
        check(lora_decode_ex(ad_.get(), &a, cache.get(), x.data(),
                             static_cast<std::int64_t>(n_new), out.data()),
              "lora_decode_ex");
        return out;
    }
    // lora_backward_ex: the backward of tape's forward (null: the adapter's own, self or
    // cross). Returns (dx, {}) for self-attention, (dxq, dxkv) for cross-attention
    // (both empty when want_dx is false). A stale tape or another adapter's throws
    // LORA_ERR_STATE.
    std::pair<std::vector<float>, std::vector<float>> backward_ex(Span<const float> dout,
                                                                  Tape *tape = nullptr,
                                                                  bool want_dx = true) {
        const Saved &s = tape ? tape->saved_ : saved_;
        if (s.kind == 0)
            throw Error(LORA_ERR_STATE, "backward_ex", "no saved forward");
        detail::shape_check(dout.size() == s.out, "backward_ex",
                            detail::count_msg("dout", dout.size(), s.out));
        std::vector<float> dxq(want_dx ? s.x : 0), dxkv(want_dx ? s.xkv : 0);
        check(lora_backward_ex(ad_.get(), tape ? tape->get() : nullptr, dout.data(),
                               want_dx ? dxq.data() : nullptr,
                               want_dx && s.kind == 2 ? dxkv.data() : nullptr),
              "lora_backward_ex");
        return {std::move(dxq), std::move(dxkv)};
    }

    lora_run_info run_info() const {
        lora_run_info info{};
        info.struct_size = sizeof info;
        check(lora_adapter_get_run_info(ad_.get(), &info), "lora_adapter_get_run_info");
        return info;
    }
    lora_threshold_report threshold_estimate(Span<const float> x, std::size_t batch,
                                             std::size_t seq_len) {
        input(x, batch, seq_len, "x");
        lora_threshold_report r{};
        r.struct_size = sizeof r;
        check(lora_threshold_estimate(ad_.get(), x.data(), static_cast<std::int64_t>(batch),
                                      static_cast<std::int64_t>(seq_len), &r),
              "lora_threshold_estimate");
        return r;
    }
    // lora_threshold_estimate_ex: threshold_estimate for the self-attention forward_ex
    // with these args would run (statistics over the valid rows, RoPE at the given
    // positions); args.infer is ignored.
    lora_threshold_report threshold_estimate_ex(Span<const float> x, std::size_t batch,
                                                std::size_t seq_len, const AttnArgs &args) {
        input(x, batch, seq_len, "x");
        lora_attn_args c{};
        c.struct_size = sizeof c;
        c.q_lens = mask(args.q_lens, batch, "q_lens");
        c.kv_lens = mask(args.kv_lens, batch, "kv_lens");
        c.q_pos = mask(args.q_pos, batch * seq_len, "q_pos");
        c.kv_pos = mask(args.kv_pos, batch * seq_len, "kv_pos");
        c.q_seg = mask(args.q_seg, batch * seq_len, "q_seg");
        c.kv_seg = mask(args.kv_seg, batch * seq_len, "kv_seg");
        lora_threshold_report r{};
        r.struct_size = sizeof r;
        check(lora_threshold_estimate_ex(ad_.get(), &c, x.data(),
                                         static_cast<std::int64_t>(batch),
                                         static_cast<std::int64_t>(seq_len), &r),
              "lora_threshold_estimate_ex");
        return r;
    }

private:
    using Saved = detail::Saved;
    void typed_base(Target t, const std::uint16_t *weight, std::size_t n, Dtype dtype,
                    const float *bias, std::size_t nbias, std::uint32_t flags) {
        const auto [out, in] = base_shape(t);
        if (dtype == Dtype::F32)
            throw Error(LORA_ERR_INVALID_ARG, "set_base_typed",
                        "16-bit weights need Dtype::Bf16 or F16 (floats: set_base)");
        detail::shape_check(weight && n == out * in, "set_base_typed",
                            detail::count_msg("weight", n, out * in));
        detail::shape_check(!bias || nbias == out, "set_base_typed",
                            detail::count_msg("bias", nbias, out));
        saved_ = Saved{};
        check(lora_adapter_set_base_typed(ad_.get(), static_cast<int>(t), weight,
                                          static_cast<int>(dtype), bias, flags),
              "lora_adapter_set_base_typed");
    }
    void check(int st, const char *function) const {
        if (st != LORA_OK)
            throw Error(st, function,
                        detail::message_of(function, lora_adapter_last_error(ad_.get())));
    }
    template <class T>
    static const T *mask(Span<const T> m, std::size_t want, const char *name) {
        detail::shape_check(m.empty() || m.size() == want, "forward_ex",
                            detail::count_msg(name, m.size(), want));
        return m.empty() ? nullptr : m.data();
    }
    std::size_t input(Span<const float> x, std::size_t batch, std::size_t rows,
                      const char *name) const {
        const std::size_t want = batch * rows * d_model_;
        detail::shape_check(batch > 0 && rows > 0 && x.size() == want, "forward",
                            detail::count_msg(name, x.size(), want));
        return want;
    }
    void expect_saved(int kind, Span<const float> dout, const char *function) const {
        if (saved_.kind != kind)
            throw Error(LORA_ERR_STATE, function,
                        kind == 1 ? "no saved forward" : "no saved forward_cross");
        detail::shape_check(dout.size() == saved_.out, function,
                            detail::count_msg("dout", dout.size(), saved_.out));
    }

    static std::size_t index(Target t) noexcept {
        switch (t) {
        case Target::Q: return 0;
        case Target::K: return 1;
        case Target::V: return 2;
        case Target::O: break;
        }
        return 3;
    }
    friend class Optimizer;

    // Declared before ad_, so destroyed after it: borrowed buffers outlive the handle.
    struct Borrowed {
        std::shared_ptr<const void> weight; // float or 16-bit elements
        std::shared_ptr<const std::vector<float>> bias;
    };
    std::array<Borrowed, 4> borrowed_{};
    std::unique_ptr<lora_adapter, detail::AdapterDeleter> ad_;
    std::size_t d_model_ = 0, q_dim_ = 0, kv_dim_ = 0;
    bool out_proj_ = false;
    Saved saved_;
};

// lora_apply (through lora_apply_with_error, for the message): for every row r whose
// tenant t = tenant_of_row[r] is >= 0, y[r] += s_t * (x[r] A_t^T) B_t^T of target, with
// x (rows, in) and y (rows, out); rows of -1 are left alone, bases are not involved.
// Tenants adapt target with the same (in, out); ranks and scales may differ. They are
// only read, so threads may share them. On failure y is unchanged.
inline void apply(Span<const Adapter *const> tenants, Target target,
                  Span<const std::int32_t> tenant_of_row, Span<const float> x, Span<float> y) {
    const std::size_t rows = tenant_of_row.size();
    if (!tenants.empty() && tenants.data()[0]) {
        const auto [out, in] = tenants.data()[0]->base_shape(target);
        detail::shape_check(x.size() == rows * in, "apply", detail::count_msg("x", x.size(), rows * in));
        detail::shape_check(y.size() == rows * out, "apply",
                            detail::count_msg("y", y.size(), rows * out));
    }
    std::vector<const lora_adapter *> handles;
    for (std::size_t i = 0; i < tenants.size(); i++)
        handles.push_back(tenants.data()[i] ? tenants.data()[i]->get() : nullptr);
    char error[512];
    const int st = lora_apply_with_error(handles.data(), handles.size(), static_cast<int>(target),
                                         tenant_of_row.data(), x.data(),
                                         static_cast<std::int64_t>(rows), y.data(), error,
                                         sizeof error);
    if (st != LORA_OK)
        throw Error(st, "lora_apply", error);
}

// Lends buffers to an adapter's factor for the lifetime of this object (borrow_factor
// in the constructor, release_factor in the destructor): declare it after the buffers
// and the adapter so that it is destroyed first.
class FactorBorrow {
public:
    FactorBorrow(Adapter &ad, Target t, Factor f, Span<float> param, Span<float> grad = {})
        : ad_(&ad), t_(t), f_(f) {
        ad.borrow_factor(t, f, param, grad);
    }
    ~FactorBorrow() {
        try {
            ad_->release_factor(t_, f_);
        } catch (...) { // cannot fail for a factor borrow_factor accepted
        }
    }
    FactorBorrow(const FactorBorrow &) = delete;
    FactorBorrow &operator=(const FactorBorrow &) = delete;

private:
    Adapter *ad_;
    Target t_;
    Factor f_;
};

inline KvCache::KvCache(const Adapter &ad, std::size_t batch, std::size_t capacity)
    : batch_(batch) {
    lora_kv_cache *c = nullptr;
    const int st = lora_kv_cache_create(&c, ad.get(), static_cast<std::int64_t>(batch),
                                        static_cast<std::int64_t>(capacity));
    if (st != LORA_OK)
        throw Error(st, "lora_kv_cache_create",
                    "batch " + std::to_string(batch) + ", capacity " + std::to_string(capacity));
    cache_.reset(c);
}

inline Tape::Tape(const Adapter &ad) {
    lora_tape *t = nullptr;
    const int st = lora_tape_create(&t, ad.get());
    if (st != LORA_OK)
        throw Error(st, "lora_tape_create", ""); // ad is const: no message
    tape_.reset(t);
}

// ---- optimizer -------------------------------------------------------------------------

enum class OptimizerKind : int { AdamW = LORA_OPTIMIZER_ADAMW, Sgd = LORA_OPTIMIZER_SGD };

// AdamW / SGD with PyTorch's update rules on the factors of adapters shaped like the
// one it was created for (lora_optimizer_*).
class Optimizer {
public:
    Optimizer(const Adapter &ad, OptimizerKind kind) {
        lora_optimizer *o = nullptr;
        int st = lora_optimizer_create(&o, ad.get(), static_cast<int>(kind));
        if (st != LORA_OK)
            throw Error(st, "lora_optimizer_create", ""); // ad is const: no message
        opt_.reset(o);
    }
    Optimizer &set_double(int param, double v) {
        check(lora_optimizer_set_double(opt_.get(), param, v), "lora_optimizer_set_double");
        return *this;
    }
    Optimizer &set_int(int param, std::int64_t v) {
        check(lora_optimizer_set_int(opt_.get(), param, v), "lora_optimizer_set_int");
        return *this;
    }
    double get_double(int param) const {
        double v = 0;
        check(lora_optimizer_get_double(opt_.get(), param, &v), "lora_optimizer_get_double");
        return v;
    }
    std::int64_t get_int(int param) const {
        std::int64_t v = 0;
        check(lora_optimizer_get_int(opt_.get(), param, &v), "lora_optimizer_get_int");
        return v;
    }
    Optimizer &lr(double v) { return set_double(LORA_OPT_LR, v); }
    Optimizer &betas(double b1, double b2) {
        return set_double(LORA_OPT_BETA1, b1).set_double(LORA_OPT_BETA2, b2);
    }
    Optimizer &eps(double v) { return set_double(LORA_OPT_EPS, v); }
    Optimizer &weight_decay(double v) { return set_double(LORA_OPT_WEIGHT_DECAY, v); }
    Optimizer &momentum(double v) { return set_double(LORA_OPT_MOMENTUM, v); }
    Optimizer &max_grad_norm(double v) { return set_double(LORA_OPT_MAX_GRAD_NORM, v); }
    std::int64_t step_count() const { return get_int(LORA_OPT_STEP); }
    double grad_norm() const { return get_double(LORA_OPT_GRAD_NORM); }
    // One update from ad's accumulated gradients (left as they are: zero_grad next).
    void step(Adapter &ad) {
        ad.saved_ = Adapter::Saved{};
        check(lora_optimizer_step(opt_.get(), ad.get()), "lora_optimizer_step");
    }
    void reset() { check(lora_optimizer_reset(opt_.get()), "lora_optimizer_reset"); }
    lora_optimizer *get() const noexcept { return opt_.get(); }

private:
    void check(int st, const char *function) const {
        if (st != LORA_OK)
            throw Error(st, function,
                        detail::message_of(function, lora_optimizer_last_error(opt_.get())));
    }
    std::unique_ptr<lora_optimizer, detail::OptimizerDeleter> opt_;
};

inline Adapter Config::build() const {
    lora_adapter *ad = nullptr;
    int st = lora_adapter_create(&ad, cfg_.get());
    if (st != LORA_OK) {
        // create cannot write into the const config; validate keeps the reason.
        lora_config_validate(cfg_.get());
        throw Error(st, "lora_adapter_create", lora_config_last_error(cfg_.get()));
    }
    return Adapter(ad);
}

// ---- adapter files -----------------------------------------------------------------------

// A layer index and an adapter, for saving an adapter set.
using LayerRef = std::pair<std::int64_t, const Adapter *>;

namespace detail {
template <class F> void save_set(const std::vector<LayerRef> &set, const char *fn, F call) {
    std::vector<lora_adapter *> handles;
    std::vector<std::int64_t> layers;
    for (const LayerRef &l : set) {
        if (!l.second)
            throw Error(LORA_ERR_INVALID_ARG, fn, "null adapter");
        handles.push_back(l.second->get());
        layers.push_back(l.first);
    }
    const int st = call(handles.data(), layers.data(), handles.size());
    if (st != LORA_OK)
        throw Error(st, fn, handles.empty() ? "" : lora_adapter_last_error(handles[0]));
}
template <class F>
std::vector<std::pair<std::int64_t, Adapter>> load_set(const Config &config, const char *fn,
                                                       F call) {
    Config cfg(config); // the C loaders write their message into the config
    std::size_t n = 0;
    int st = call(nullptr, nullptr, 0, &n, cfg.get());
    if (st != LORA_OK)
        throw Error(st, fn, lora_config_last_error(cfg.get()));
    std::vector<lora_adapter *> handles(n ? n : 1, nullptr);
    std::vector<std::int64_t> layers(n ? n : 1, 0);
    std::size_t got = 0;
    st = call(handles.data(), layers.data(), n, &got, cfg.get());
    if (st != LORA_OK)
        throw Error(st, fn, lora_config_last_error(cfg.get()));
    std::vector<std::unique_ptr<lora_adapter, AdapterDeleter>> owned;
    for (std::size_t i = 0; i < got; i++)
        owned.emplace_back(handles[i]); // owned at once, whatever throws below
    std::vector<std::pair<std::int64_t, Adapter>> out;
    for (std::size_t i = 0; i < got; i++)
        out.emplace_back(layers[i], Adapter(owned[i].release()));
    return out;
}
} // namespace detail

// PEFT directory: adapter_config.json + adapter_model.safetensors.
inline void save_peft(const std::string &dir, const std::vector<LayerRef> &set) {
    detail::save_set(set, "lora_save_peft", [&](lora_adapter *const *a, const std::int64_t *l,
                                                std::size_t n) {
        return lora_save_peft(dir.c_str(), a, l, n);
    });
}
// cfg (const: a temporary works) supplies what the file does not (d_model, heads,
// ...); returns (layer, adapter) in increasing layer order, base weights unset.
inline std::vector<std::pair<std::int64_t, Adapter>> load_peft(const std::string &dir,
                                                               const Config &cfg) {
    return detail::load_set(cfg, "lora_load_peft",
                            [&](lora_adapter **a, std::int64_t *l, std::size_t cap,
                                std::size_t *n, lora_config *c) {
                                return lora_load_peft(a, l, cap, n, dir.c_str(), c);
                            });
}
// llama.cpp GGUF LoRA adapter; an empty architecture means "llama".
inline void save_gguf(const std::string &path, const std::vector<LayerRef> &set,
                      const std::string &architecture = "") {
    detail::save_set(set, "lora_save_gguf", [&](lora_adapter *const *a, const std::int64_t *l,
                                                std::size_t n) {
        return lora_save_gguf(path.c_str(), a, l, n,
                              architecture.empty() ? nullptr : architecture.c_str());
    });
}
// Options of the _ex saves (lora_save_options); an empty string means "not set".
struct SaveOptions {
    std::string base_model_name_or_path; // PEFT's key, GGUF's general.base_model.*
    std::string architecture;            // GGUF only; empty means "llama"
};
namespace detail {
inline lora_save_options c_options(const SaveOptions &o) {
    lora_save_options c{};
    c.struct_size = sizeof c;
    c.base_model_name_or_path =
        o.base_model_name_or_path.empty() ? nullptr : o.base_model_name_or_path.c_str();
    c.architecture = o.architecture.empty() ? nullptr : o.architecture.c_str();
    return c;
}
} // namespace detail
inline void save_peft(const std::string &dir, const std::vector<LayerRef> &set,
                      const SaveOptions &options) {
    const lora_save_options c = detail::c_options(options);
    detail::save_set(set, "lora_save_peft_ex", [&](lora_adapter *const *a,
                                                   const std::int64_t *l, std::size_t n) {
        return lora_save_peft_ex(dir.c_str(), a, l, n, &c);
    });
}
inline void save_gguf(const std::string &path, const std::vector<LayerRef> &set,
                      const SaveOptions &options) {
    const lora_save_options c = detail::c_options(options);
    detail::save_set(set, "lora_save_gguf_ex", [&](lora_adapter *const *a,
                                                   const std::int64_t *l, std::size_t n) {
        return lora_save_gguf_ex(path.c_str(), a, l, n, &c);
    });
}
inline std::vector<std::pair<std::int64_t, Adapter>> load_gguf(const std::string &path,
                                                               const Config &cfg) {
    return detail::load_set(cfg, "lora_load_gguf",
                            [&](lora_adapter **a, std::int64_t *l, std::size_t cap,
                                std::size_t *n, lora_config *c) {
                                return lora_load_gguf(a, l, cap, n, path.c_str(), c);
                            });
}

} // namespace lora

#endif // LORA_HPP
