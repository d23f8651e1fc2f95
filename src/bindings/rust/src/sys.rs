//! Raw declarations of include/lora.h, written by hand and kept in the header's order.
//!
//! Everything here is `unsafe` to call and follows the C contract exactly: buffers must
//! hold the element counts the header states. Use the safe wrapper in the crate root
//! unless you need the C API itself. `tests/abi.rs` checks the struct layouts and the
//! constants against the header with a C compiler.
#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_double, c_int, c_void};

// ---- Version ----
pub const LORA_VERSION_MAJOR: u32 = 0;
pub const LORA_VERSION_MINOR: u32 = 1;
pub const LORA_VERSION_PATCH: u32 = 0;
pub const LORA_VERSION_NUMBER: u32 =
    LORA_VERSION_MAJOR * 10000 + LORA_VERSION_MINOR * 100 + LORA_VERSION_PATCH;

// ---- Status codes (enum lora_status) ----
pub type lora_status = c_int;
pub const LORA_OK: c_int = 0;
pub const LORA_ERR_INVALID_ARG: c_int = 1;
pub const LORA_ERR_SHAPE: c_int = 2;
pub const LORA_ERR_NOMEM: c_int = 3;
pub const LORA_ERR_NONFINITE: c_int = 4;
pub const LORA_ERR_UNSUPPORTED: c_int = 5;
pub const LORA_ERR_STATE: c_int = 6;
pub const LORA_ERR_IO: c_int = 7;
pub const LORA_ERR_FORMAT: c_int = 8;
pub const LORA_ERR_TOLERANCE: c_int = 9;

// ---- Configuration ----
/// Opaque `lora_config`.
#[repr(C)]
pub struct lora_config {
    _private: [u8; 0],
}

pub const LORA_CFG_D_MODEL: c_int = 1;
pub const LORA_CFG_N_HEADS: c_int = 2;
pub const LORA_CFG_N_KV_HEADS: c_int = 3;
pub const LORA_CFG_HEAD_DIM: c_int = 4;
pub const LORA_CFG_TARGETS: c_int = 5;
pub const LORA_CFG_RANK: c_int = 6;
pub const LORA_CFG_ALPHA: c_int = 7;
pub const LORA_CFG_RSLORA: c_int = 8;
pub const LORA_CFG_SOFTMAX_SCALE: c_int = 9;
pub const LORA_CFG_CAUSAL: c_int = 10;
pub const LORA_CFG_BACKEND: c_int = 11;
pub const LORA_CFG_TOLERANCE: c_int = 12;
pub const LORA_CFG_POLY_DEGREE: c_int = 13;
pub const LORA_CFG_THREADS: c_int = 14;
pub const LORA_CFG_SEED: c_int = 15;
pub const LORA_CFG_INIT: c_int = 16;
pub const LORA_CFG_OUT_PROJ: c_int = 17;
pub const LORA_CFG_MEASURE_ROWS: c_int = 18;
pub const LORA_CFG_ROPE: c_int = 19;
pub const LORA_CFG_ROPE_THETA: c_int = 20;
pub const LORA_CFG_ROPE_DIM: c_int = 21;
pub const LORA_CFG_WINDOW: c_int = 22;
pub const LORA_CFG_SOFTCAP: c_int = 23;
pub const LORA_CFG_DROPOUT: c_int = 24;
pub const LORA_CFG_COMPUTE: c_int = 25;

pub const LORA_TARGET_Q: c_int = 1;
pub const LORA_TARGET_K: c_int = 2;
pub const LORA_TARGET_V: c_int = 4;
pub const LORA_TARGET_O: c_int = 8;

pub const LORA_BACKEND_AUTO: c_int = 0;
pub const LORA_BACKEND_EXACT: c_int = 1;
pub const LORA_BACKEND_POLY: c_int = 2;

pub const LORA_ROPE_NONE: c_int = 0;
pub const LORA_ROPE_HALF: c_int = 1;
pub const LORA_ROPE_INTERLEAVED: c_int = 2;

pub const LORA_COMPUTE_F32: c_int = 0;
pub const LORA_COMPUTE_BF16: c_int = 1;
pub const LORA_DTYPE_F32: c_int = 0;
pub const LORA_DTYPE_BF16: c_int = 1;
pub const LORA_DTYPE_F16: c_int = 2;

pub const LORA_INIT_KAIMING_ZERO: c_int = 0;
pub const LORA_INIT_GAUSSIAN: c_int = 1;
pub const LORA_INIT_ZERO: c_int = 2;

/// `struct lora_allocator`: memory hooks for a config and its adapters.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lora_allocator {
    pub alloc: Option<unsafe extern "C" fn(user_data: *mut c_void, size: usize) -> *mut c_void>,
    pub free: Option<unsafe extern "C" fn(user_data: *mut c_void, ptr: *mut c_void)>,
    pub user_data: *mut c_void,
}

// ---- Adapter ----
/// Opaque `lora_adapter`.
#[repr(C)]
pub struct lora_adapter {
    _private: [u8; 0],
}

// ---- Optimizer ----
/// Opaque `lora_optimizer`.
#[repr(C)]
pub struct lora_optimizer {
    _private: [u8; 0],
}

pub const LORA_OPTIMIZER_ADAMW: c_int = 0;
pub const LORA_OPTIMIZER_SGD: c_int = 1;

pub const LORA_OPT_LR: c_int = 1;
pub const LORA_OPT_BETA1: c_int = 2;
pub const LORA_OPT_BETA2: c_int = 3;
pub const LORA_OPT_EPS: c_int = 4;
pub const LORA_OPT_WEIGHT_DECAY: c_int = 5;
pub const LORA_OPT_MOMENTUM: c_int = 6;
pub const LORA_OPT_DAMPENING: c_int = 7;
pub const LORA_OPT_NESTEROV: c_int = 8;
pub const LORA_OPT_MAX_GRAD_NORM: c_int = 9;
pub const LORA_OPT_STEP: c_int = 10;
pub const LORA_OPT_GRAD_NORM: c_int = 11;

pub const LORA_A: c_int = 0;
pub const LORA_B: c_int = 1;

/// `lora_forward_flag`: flags of a forward's per-call arguments.
pub const LORA_FWD_INFER: c_int = 1;

/// Flag of `lora_adapter_set_base_typed`: use the caller's buffers without copying.
pub const LORA_BASE_BORROW: u32 = 1;

/// Opaque `lora_tape`: what one training forward saved for its backward.
#[repr(C)]
pub struct lora_tape {
    _private: [u8; 0],
}

/// Opaque `lora_kv_cache`.
#[repr(C)]
pub struct lora_kv_cache {
    _private: [u8; 0],
}

/// `struct lora_decode_args`: extras of `lora_decode_ex` (zero = defaults).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct lora_decode_args {
    pub struct_size: u32,
    pub flags: u32,
    pub n_tokens: *const i64,
    pub tenants: *const *const lora_adapter,
    pub n_tenants: usize,
    pub tenant_of_seq: *const i32,
}

impl Default for lora_decode_args {
    /// Every field zero or NULL, struct_size = size_of::<lora_decode_args>().
    fn default() -> Self {
        lora_decode_args {
            struct_size: std::mem::size_of::<lora_decode_args>() as u32,
            flags: 0,
            n_tokens: std::ptr::null(),
            tenants: std::ptr::null(),
            n_tenants: 0,
            tenant_of_seq: std::ptr::null(),
        }
    }
}

/// `struct lora_attn_args`: per-call arguments of `lora_forward_ex` (zero = defaults).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct lora_attn_args {
    pub struct_size: u32,
    pub flags: u32,
    pub q_lens: *const i64,
    pub kv_lens: *const i64,
    pub q_pos: *const i64,
    pub kv_pos: *const i64,
    pub q_seg: *const i32,
    pub kv_seg: *const i32,
    pub tape: *mut lora_tape,
}

impl Default for lora_attn_args {
    /// Every field zero or NULL, struct_size = size_of::<lora_attn_args>().
    fn default() -> Self {
        lora_attn_args {
            struct_size: std::mem::size_of::<lora_attn_args>() as u32,
            flags: 0,
            q_lens: std::ptr::null(),
            kv_lens: std::ptr::null(),
            q_pos: std::ptr::null(),
            kv_pos: std::ptr::null(),
            q_seg: std::ptr::null(),
            kv_seg: std::ptr::null(),
            tape: std::ptr::null_mut(),
        }
    }
}

/// `struct lora_run_info`: what the last forward or backward ran.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct lora_run_info {
    pub struct_size: u32,
    pub backend: i32,
    pub poly_degree: i64,
    pub poly_rank: i64,
    pub error_bound: c_double,
    pub grad_bound: c_double,
    pub score_bound: c_double,
    pub measured_out_error: c_double,
    pub measured_dq_error: c_double,
    pub poly_groups: i64,
    pub loss_grad_bound: c_double,
    pub attention_compute: i32,
}

/// `struct lora_threshold_report`: the threshold statistics of one input.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct lora_threshold_report {
    pub struct_size: u32,
    pub recommended_backend: i32,
    pub gamma_q: c_double,
    pub gamma_k: c_double,
    pub gamma_v: c_double,
    pub gamma_ratio: c_double,
    pub score_bound: c_double,
    pub poly_degree: i64,
    pub poly_rank: i64,
    pub error_bound: c_double,
    pub flops_exact: c_double,
    pub flops_poly: c_double,
    pub poly_groups: i64,
}

extern "C" {
    pub fn lora_version_number() -> u32;
    pub fn lora_version_string() -> *const c_char;
    pub fn lora_status_string(status: c_int) -> *const c_char;

    pub fn lora_config_create(out: *mut *mut lora_config) -> c_int;
    pub fn lora_config_destroy(cfg: *mut lora_config);
    pub fn lora_config_set_int(cfg: *mut lora_config, param: c_int, value: i64) -> c_int;
    pub fn lora_config_set_double(cfg: *mut lora_config, param: c_int, value: c_double) -> c_int;
    pub fn lora_config_get_int(cfg: *const lora_config, param: c_int, value: *mut i64) -> c_int;
    pub fn lora_config_get_double(
        cfg: *const lora_config,
        param: c_int,
        value: *mut c_double,
    ) -> c_int;
    pub fn lora_config_validate(cfg: *mut lora_config) -> c_int;
    pub fn lora_config_last_error(cfg: *const lora_config) -> *const c_char;
    pub fn lora_config_create_with_allocator(
        out: *mut *mut lora_config,
        allocator: *const lora_allocator,
    ) -> c_int;

    pub fn lora_adapter_create(out: *mut *mut lora_adapter, cfg: *const lora_config) -> c_int;
    pub fn lora_adapter_destroy(ad: *mut lora_adapter);
    pub fn lora_adapter_set_base(
        ad: *mut lora_adapter,
        target: c_int,
        weight: *const f32,
        bias: *const f32,
    ) -> c_int;
    pub fn lora_adapter_set_param(
        ad: *mut lora_adapter,
        target: c_int,
        which: c_int,
        src: *const f32,
        count: usize,
    ) -> c_int;
    pub fn lora_adapter_get_param(
        ad: *const lora_adapter,
        target: c_int,
        which: c_int,
        dst: *mut f32,
        count: usize,
    ) -> c_int;
    pub fn lora_adapter_get_grad(
        ad: *const lora_adapter,
        target: c_int,
        which: c_int,
        dst: *mut f32,
        count: usize,
    ) -> c_int;
    pub fn lora_adapter_param_shape(
        ad: *const lora_adapter,
        target: c_int,
        which: c_int,
        rows: *mut i64,
        cols: *mut i64,
    ) -> c_int;
    pub fn lora_adapter_zero_grad(ad: *mut lora_adapter) -> c_int;
    pub fn lora_adapter_get_config_int(
        ad: *const lora_adapter,
        param: c_int,
        value: *mut i64,
    ) -> c_int;
    pub fn lora_adapter_get_config_double(
        ad: *const lora_adapter,
        param: c_int,
        value: *mut c_double,
    ) -> c_int;
    pub fn lora_adapter_last_error(ad: *const lora_adapter) -> *const c_char;
    pub fn lora_adapter_get_run_info(ad: *const lora_adapter, info: *mut lora_run_info) -> c_int;

    pub fn lora_forward(
        ad: *mut lora_adapter,
        x: *const f32,
        batch: i64,
        seq_len: i64,
        out: *mut f32,
    ) -> c_int;
    pub fn lora_backward(ad: *mut lora_adapter, dout: *const f32, dx: *mut f32) -> c_int;
    pub fn lora_forward_cross(
        ad: *mut lora_adapter,
        xq: *const f32,
        xkv: *const f32,
        batch: i64,
        len_q: i64,
        len_kv: i64,
        out: *mut f32,
    ) -> c_int;
    pub fn lora_backward_cross(
        ad: *mut lora_adapter,
        dout: *const f32,
        dxq: *mut f32,
        dxkv: *mut f32,
    ) -> c_int;
    pub fn lora_adapter_borrow_factor(
        ad: *mut lora_adapter,
        target: c_int,
        which: c_int,
        param: *mut f32,
        grad: *mut f32,
        count: usize,
    ) -> c_int;
    pub fn lora_tape_create(out: *mut *mut lora_tape, ad: *const lora_adapter) -> c_int;
    pub fn lora_tape_destroy(tape: *mut lora_tape);
    pub fn lora_forward_ex(
        ad: *mut lora_adapter,
        args: *const lora_attn_args,
        xq: *const f32,
        xkv: *const f32,
        batch: i64,
        len_q: i64,
        len_kv: i64,
        out: *mut f32,
    ) -> c_int;
    pub fn lora_backward_ex(
        ad: *mut lora_adapter,
        tape: *mut lora_tape,
        dout: *const f32,
        dxq: *mut f32,
        dxkv: *mut f32,
    ) -> c_int;
    pub fn lora_mse_loss(
        out: *const f32,
        target: *const f32,
        n: usize,
        loss: *mut c_double,
        dout: *mut f32,
    ) -> c_int;
    pub fn lora_mse_loss_mean(
        out: *const f32,
        target: *const f32,
        n: usize,
        loss: *mut c_double,
        dout: *mut f32,
    ) -> c_int;

    pub fn lora_threshold_estimate(
        ad: *mut lora_adapter,
        x: *const f32,
        batch: i64,
        seq_len: i64,
        report: *mut lora_threshold_report,
    ) -> c_int;

    // ---- Optimizer ----
    pub fn lora_optimizer_create(
        out: *mut *mut lora_optimizer,
        ad: *const lora_adapter,
        kind: c_int,
    ) -> c_int;
    pub fn lora_optimizer_destroy(opt: *mut lora_optimizer);
    pub fn lora_optimizer_set_int(opt: *mut lora_optimizer, param: c_int, value: i64) -> c_int;
    pub fn lora_optimizer_set_double(
        opt: *mut lora_optimizer,
        param: c_int,
        value: c_double,
    ) -> c_int;
    pub fn lora_optimizer_get_int(
        opt: *const lora_optimizer,
        param: c_int,
        value: *mut i64,
    ) -> c_int;
    pub fn lora_optimizer_get_double(
        opt: *const lora_optimizer,
        param: c_int,
        value: *mut c_double,
    ) -> c_int;
    pub fn lora_optimizer_step(opt: *mut lora_optimizer, ad: *mut lora_adapter) -> c_int;
    pub fn lora_optimizer_reset(opt: *mut lora_optimizer) -> c_int;
    pub fn lora_optimizer_last_error(opt: *const lora_optimizer) -> *const c_char;

    pub fn lora_adapter_param_count(ad: *const lora_adapter, count: *mut usize) -> c_int;
    pub fn lora_adapter_get_params_flat(
        ad: *const lora_adapter,
        dst: *mut f32,
        count: usize,
    ) -> c_int;
    pub fn lora_adapter_set_params_flat(
        ad: *mut lora_adapter,
        src: *const f32,
        count: usize,
    ) -> c_int;
    pub fn lora_adapter_get_grads_flat(
        ad: *const lora_adapter,
        dst: *mut f32,
        count: usize,
    ) -> c_int;
    pub fn lora_adapter_set_grads_flat(
        ad: *mut lora_adapter,
        src: *const f32,
        count: usize,
    ) -> c_int;
    pub fn lora_optimizer_create_set(
        out: *mut *mut lora_optimizer,
        adapters: *const *const lora_adapter,
        n: usize,
        kind: c_int,
    ) -> c_int;
    pub fn lora_optimizer_step_set(
        opt: *mut lora_optimizer,
        adapters: *const *mut lora_adapter,
        n: usize,
    ) -> c_int;

    // ---- Merge and serving ----
    pub fn lora_adapter_merge(
        ad: *const lora_adapter,
        target: c_int,
        weight: *mut f32,
        count: usize,
    ) -> c_int;
    pub fn lora_adapter_unmerge(
        ad: *const lora_adapter,
        target: c_int,
        weight: *mut f32,
        count: usize,
    ) -> c_int;
    pub fn lora_forward_merged(
        ad: *mut lora_adapter,
        x: *const f32,
        batch: i64,
        seq_len: i64,
        out: *mut f32,
    ) -> c_int;
    pub fn lora_forward_merged_cross(
        ad: *mut lora_adapter,
        xq: *const f32,
        xkv: *const f32,
        batch: i64,
        len_q: i64,
        len_kv: i64,
        out: *mut f32,
    ) -> c_int;
    pub fn lora_adapter_set_base_borrowed(
        ad: *mut lora_adapter,
        target: c_int,
        weight: *const f32,
        bias: *const f32,
    ) -> c_int;
    pub fn lora_adapter_copy_params(dst: *mut lora_adapter, src: *const lora_adapter) -> c_int;
    pub fn lora_adapter_set_rope_freqs(ad: *mut lora_adapter, inv_freq: *const f64, n: usize)
        -> c_int;

    // ---- decoding with a KV cache ----
    pub fn lora_kv_cache_create(
        out: *mut *mut lora_kv_cache,
        ad: *const lora_adapter,
        batch: i64,
        capacity: i64,
    ) -> c_int;
    pub fn lora_kv_cache_destroy(cache: *mut lora_kv_cache);
    pub fn lora_kv_cache_reset(cache: *mut lora_kv_cache, b: i64) -> c_int;
    pub fn lora_kv_cache_length(cache: *const lora_kv_cache, b: i64, len: *mut i64) -> c_int;
    pub fn lora_decode(
        ad: *mut lora_adapter,
        cache: *mut lora_kv_cache,
        x: *const f32,
        n_new: i64,
        out: *mut f32,
    ) -> c_int;
    pub fn lora_decode_ex(
        ad: *mut lora_adapter,
        args: *const lora_decode_args,
        cache: *mut lora_kv_cache,
        x: *const f32,
        n_new: i64,
        out: *mut f32,
    ) -> c_int;

    // ---- I/O ----
    pub fn lora_save_peft(
        dir: *const c_char,
        adapters: *const *mut lora_adapter,
        layers: *const i64,
        count: usize,
    ) -> c_int;
    pub fn lora_load_peft(
        adapters: *mut *mut lora_adapter,
        layers: *mut i64,
        capacity: usize,
        count: *mut usize,
        dir: *const c_char,
        cfg: *mut lora_config,
    ) -> c_int;
    pub fn lora_save_gguf(
        path: *const c_char,
        adapters: *const *mut lora_adapter,
        layers: *const i64,
        count: usize,
        architecture: *const c_char,
    ) -> c_int;
    pub fn lora_load_gguf(
        adapters: *mut *mut lora_adapter,
        layers: *mut i64,
        capacity: usize,
        count: *mut usize,
        path: *const c_char,
        cfg: *mut lora_config,
    ) -> c_int;
    pub fn lora_save_peft_ex(
        dir: *const c_char,
        adapters: *const *mut lora_adapter,
        layers: *const i64,
        count: usize,
        options: *const lora_save_options,
    ) -> c_int;
    pub fn lora_save_gguf_ex(
        path: *const c_char,
        adapters: *const *mut lora_adapter,
        layers: *const i64,
        count: usize,
        options: *const lora_save_options,
    ) -> c_int;
    pub fn lora_adapter_set_base_typed(
        ad: *mut lora_adapter,
        target: c_int,
        weight: *const c_void,
        dtype: c_int,
        bias: *const f32,
        flags: u32,
    ) -> c_int;
    pub fn lora_apply(
        tenants: *const *const lora_adapter,
        n_tenants: usize,
        target: c_int,
        tenant_of_row: *const i32,
        x: *const f32,
        rows: i64,
        y: *mut f32,
    ) -> c_int;
    pub fn lora_apply_with_error(
        tenants: *const *const lora_adapter,
        n_tenants: usize,
        target: c_int,
        tenant_of_row: *const i32,
        x: *const f32,
        rows: i64,
        y: *mut f32,
        error: *mut c_char,
        error_size: usize,
    ) -> c_int;
    pub fn lora_threshold_estimate_ex(
        ad: *mut lora_adapter,
        args: *const lora_attn_args,
        x: *const f32,
        batch: i64,
        seq_len: i64,
        report: *mut lora_threshold_report,
    ) -> c_int;
}

/// `struct lora_save_options`: options of `lora_save_peft_ex` / `lora_save_gguf_ex`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lora_save_options {
    pub struct_size: u32,
    pub base_model_name_or_path: *const c_char,
    pub architecture: *const c_char,
}
