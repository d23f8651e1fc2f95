// The C++ wrapper against include/lora.h (run by `make check-cpp`): reads the header
// text given as argv[1] and checks that every enum of lora.h is bound. Typed enums
// (lora::Target, lora::Rope, ...) must hold exactly the header's enumerators and
// values; every LORA_CFG_* parameter must have a named lora::Config setter that sets
// that parameter. Exits 1 and says what is missing otherwise.
#include "lora.hpp"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using Enums = std::map<std::string, std::map<std::string, long>>;

std::string strip_comments(const std::string &text) {
    static const std::regex comment(R"(/\*[\s\S]*?\*/|//[^\n]*)");
    return std::regex_replace(text, comment, "");
}

// {C enum type: {enumerator: value}} of every `typedef enum ... { ... } name;`.
Enums header_enums(const std::string &code) {
    static const std::regex decl(R"(typedef\s+enum\s+\w*\s*\{([^}]*)\}\s*(\w+)\s*;)");
    static const std::regex item(R"(\s*(LORA_\w+)\s*=\s*(-?\d+)\s*)");
    Enums enums;
    for (std::sregex_iterator it(code.begin(), code.end(), decl), end; it != end; ++it) {
        std::stringstream body((*it)[1].str());
        std::string part;
        auto &members = enums[(*it)[2].str()];
        while (std::getline(body, part, ',')) {
            std::smatch m;
            if (std::regex_match(part, m, item))
                members[m[1].str()] = std::stol(m[2].str());
        }
    }
    return enums;
}

int failures = 0;

void fail(const std::string &what) {
    std::fprintf(stderr, "constants_test: %s\n", what.c_str());
    failures++;
}

template <class E> std::pair<std::string, long> member(const char *c_name, E value) {
    return {c_name, static_cast<long>(value)};
}

// The typed enums of lora.hpp, by the C enum they bind.
std::map<std::string, std::map<std::string, long>> typed_enums() {
    using namespace lora;
    return {
        {"lora_target",
         {member("LORA_TARGET_Q", Target::Q), member("LORA_TARGET_K", Target::K),
          member("LORA_TARGET_V", Target::V), member("LORA_TARGET_O", Target::O)}},
        {"lora_factor", {member("LORA_A", Factor::A), member("LORA_B", Factor::B)}},
        {"lora_backend",
         {member("LORA_BACKEND_AUTO", Backend::Auto), member("LORA_BACKEND_EXACT", Backend::Exact),
          member("LORA_BACKEND_POLY", Backend::Poly)}},
        {"lora_init",
         {member("LORA_INIT_KAIMING_ZERO", Init::KaimingZero),
          member("LORA_INIT_GAUSSIAN", Init::Gaussian), member("LORA_INIT_ZERO", Init::Zero)}},
        {"lora_rope",
         {member("LORA_ROPE_NONE", Rope::None), member("LORA_ROPE_HALF", Rope::Half),
          member("LORA_ROPE_INTERLEAVED", Rope::Interleaved)}},
        {"lora_compute",
         {member("LORA_COMPUTE_F32", Compute::F32), member("LORA_COMPUTE_BF16", Compute::Bf16)}},
        {"lora_dtype",
         {member("LORA_DTYPE_F32", Dtype::F32), member("LORA_DTYPE_BF16", Dtype::Bf16),
          member("LORA_DTYPE_F16", Dtype::F16)}},
        {"lora_forward_flag", {member("LORA_FWD_INFER", ForwardFlag::Infer)}},
        {"lora_optimizer_kind",
         {member("LORA_OPTIMIZER_ADAMW", OptimizerKind::AdamW),
          member("LORA_OPTIMIZER_SGD", OptimizerKind::Sgd)}},
    };
}

// A named setter per parameter: it sets a value other than the default, which reads back.
struct Setter {
    std::function<void(lora::Config &)> set;
    bool is_double;
    double value;
};

std::map<std::string, Setter> config_setters() {
    using lora::Config;
    return {
        {"LORA_CFG_D_MODEL", {[](Config &c) { c.set_int(LORA_CFG_D_MODEL, 48); }, false, 48}},
        {"LORA_CFG_N_HEADS", {[](Config &c) { c.n_heads(4); }, false, 4}},
        {"LORA_CFG_N_KV_HEADS", {[](Config &c) { c.n_kv_heads(2); }, false, 2}},
        {"LORA_CFG_HEAD_DIM", {[](Config &c) { c.head_dim(6); }, false, 6}},
        {"LORA_CFG_TARGETS", {[](Config &c) { c.targets({lora::Target::K}); }, false, 2}},
        {"LORA_CFG_RANK", {[](Config &c) { c.rank(3); }, false, 3}},
        {"LORA_CFG_ALPHA", {[](Config &c) { c.alpha(5.5); }, true, 5.5}},
        {"LORA_CFG_RSLORA", {[](Config &c) { c.rslora(true); }, false, 1}},
        {"LORA_CFG_SOFTMAX_SCALE", {[](Config &c) { c.softmax_scale(0.25); }, true, 0.25}},
        {"LORA_CFG_CAUSAL", {[](Config &c) { c.causal(true); }, false, 1}},
        {"LORA_CFG_BACKEND", {[](Config &c) { c.backend(lora::Backend::Poly); }, false, 2}},
        {"LORA_CFG_TOLERANCE", {[](Config &c) { c.tolerance(0.01); }, true, 0.01}},
        {"LORA_CFG_POLY_DEGREE", {[](Config &c) { c.poly_degree(4); }, false, 4}},
        {"LORA_CFG_THREADS", {[](Config &c) { c.threads(3); }, false, 3}},
        {"LORA_CFG_SEED", {[](Config &c) { c.seed(77); }, false, 77}},
        {"LORA_CFG_INIT", {[](Config &c) { c.init(lora::Init::Zero); }, false, 2}},
        {"LORA_CFG_OUT_PROJ", {[](Config &c) { c.out_proj(true); }, false, 1}},
        {"LORA_CFG_MEASURE_ROWS", {[](Config &c) { c.measure_rows(5); }, false, 5}},
        {"LORA_CFG_ROPE", {[](Config &c) { c.rope(lora::Rope::Half); }, false, 1}},
        {"LORA_CFG_ROPE_THETA", {[](Config &c) { c.rope_theta(5e5); }, true, 5e5}},
        {"LORA_CFG_ROPE_DIM", {[](Config &c) { c.rope_dim(4); }, false, 4}},
        {"LORA_CFG_WINDOW", {[](Config &c) { c.window(128); }, false, 128}},
        {"LORA_CFG_SOFTCAP", {[](Config &c) { c.softcap(30.0); }, true, 30.0}},
        {"LORA_CFG_DROPOUT", {[](Config &c) { c.dropout(0.125); }, true, 0.125}},
        {"LORA_CFG_COMPUTE", {[](Config &c) { c.compute(lora::Compute::Bf16); }, false, 1}},
    };
}

void check_typed(const Enums &header) {
    for (const auto &[type, cpp] : typed_enums()) {
        auto it = header.find(type);
        if (it == header.end()) {
            fail("lora.hpp binds " + type + ", which lora.h does not declare");
            continue;
        }
        if (it->second != cpp)
            fail("lora.hpp's enum for " + type + " differs from lora.h's enumerators");
    }
}

void check_config(const std::map<std::string, long> &params) {
    const auto setters = config_setters();
    for (const auto &[name, number] : params) {
        auto it = setters.find(name);
        if (it == setters.end()) {
            fail(name + " has no lora::Config setter");
            continue;
        }
        lora::Config cfg(16);
        it->second.set(cfg);
        const int p = static_cast<int>(number);
        const double got = it->second.is_double ? cfg.get_double(p)
                                                : static_cast<double>(cfg.get_int(p));
        if (got != it->second.value)
            fail("the setter for " + name + " does not set parameter " + std::to_string(number));
    }
    for (const auto &entry : setters)
        if (!params.count(entry.first))
            fail("a lora::Config setter is listed for " + entry.first +
                 ", which lora.h does not declare");
}

} // namespace

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s path/to/lora.h\n", argv[0]);
        return 2;
    }
    std::ifstream in(argv[1]);
    std::stringstream text;
    text << in.rdbuf();
    const Enums header = header_enums(strip_comments(text.str()));
    if (!in || header.size() < 5 || header.count("lora_config_param") == 0) {
        std::fprintf(stderr, "constants_test: cannot parse %s\n", argv[1]);
        return 2;
    }
    // Status codes and optimizer parameters are used as lora.h's own constants.
    const std::vector<std::string> untyped = {"lora_status", "lora_config_param",
                                              "lora_optimizer_param"};
    const auto typed = typed_enums();
    for (const auto &entry : header)
        if (!typed.count(entry.first) &&
            std::find(untyped.begin(), untyped.end(), entry.first) == untyped.end())
            fail("lora.h enum " + entry.first + " has no lora.hpp binding");
    check_typed(header);
    try {
        check_config(header.at("lora_config_param"));
    } catch (const lora::Error &e) {
        fail(e.what());
    }
    if (failures)
        return 1;
    std::printf("constants_test: %zu enums of lora.h checked against lora.hpp\n",
                header.size());
    return 0;
}
