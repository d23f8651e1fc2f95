//! Safe Rust bindings to liblora: LoRA fine-tuning of one transformer attention layer.
//!
//! [`sys`] has the raw `extern "C"` declarations of `include/lora.h`; the crate root
//! wraps them: a [`Config`] builder, an [`Adapter`] that frees its handle on drop,
//! `Result<_, LoraError>` everywhere (status and the library's message) and slices
//! whose lengths are checked before any pointer reaches C.
//!
//! ```no_run
//! use lora::{Config, Target, Factor, Backend};
//! # fn main() -> Result<(), lora::LoraError> {
//! let mut ad = Config::new(8).n_heads(2).rank(2).backend(Backend::Exact).build()?;
//! let w = vec![0.1f32; 64];
//! for t in [Target::Q, Target::K, Target::V] {
//!     ad.set_base(t, &w, None)?;              // (out, in), like torch.nn.Linear
//! }
//! let x = vec![0.5f32; 2 * 4 * 8];             // (batch 2, seq_len 4, d_model 8)
//! let out = ad.forward(&x, 2, 4)?;
//! let (loss, dout) = lora::mse_loss(&out, &vec![0.0; out.len()])?;
//! ad.backward(&dout, None)?;                   // accumulates the gradients
//! let g = ad.grad(Target::Q, Factor::B)?;
//! # let _ = (loss, g); Ok(()) }
//! ```
//!
//! Tensors are row-major `f32`; shapes are given as in the C header. An [`Adapter`] is
//! `Send` (one thread at a time may use it) but not `Sync`, as the C API requires.

pub mod sys;

use std::ffi::CStr;
use std::fmt;
use std::os::raw::{c_char, c_int};
use std::ptr::{self, NonNull};
use std::sync::Arc;

// ---- errors ----------------------------------------------------------------------------

/// `lora_status` values other than `LORA_OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    InvalidArg,
    Shape,
    NoMem,
    NonFinite,
    Unsupported,
    State,
    Io,
    Format,
    Tolerance,
    /// A code outside the enum this binding knows (a newer library).
    Unknown(i32),
}

impl Status {
    /// The status for a C return code (`None` for `LORA_OK`).
    pub fn from_code(code: i32) -> Option<Status> {
        Some(match code {
            sys::LORA_OK => return None,
            sys::LORA_ERR_INVALID_ARG => Status::InvalidArg,
            sys::LORA_ERR_SHAPE => Status::Shape,
            sys::LORA_ERR_NOMEM => Status::NoMem,
            sys::LORA_ERR_NONFINITE => Status::NonFinite,
            sys::LORA_ERR_UNSUPPORTED => Status::Unsupported,
            sys::LORA_ERR_STATE => Status::State,
            sys::LORA_ERR_IO => Status::Io,
            sys::LORA_ERR_FORMAT => Status::Format,
            sys::LORA_ERR_TOLERANCE => Status::Tolerance,
            c => Status::Unknown(c),
        })
    }

    /// The C value of this status.
    pub fn code(self) -> i32 {
        match self {
            Status::InvalidArg => sys::LORA_ERR_INVALID_ARG,
            Status::Shape => sys::LORA_ERR_SHAPE,
            Status::NoMem => sys::LORA_ERR_NOMEM,
            Status::NonFinite => sys::LORA_ERR_NONFINITE,
            Status::Unsupported => sys::LORA_ERR_UNSUPPORTED,
            Status::State => sys::LORA_ERR_STATE,
            Status::Io => sys::LORA_ERR_IO,
            Status::Format => sys::LORA_ERR_FORMAT,
            Status::Tolerance => sys::LORA_ERR_TOLERANCE,
            Status::Unknown(c) => c,
        }
    }
}

/// A failed liblora call: the status, the library's detail message
/// (`lora_adapter_last_error` / `lora_config_last_error`, or the binding's own check)
/// and the C function (or wrapper method) that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraError {
    pub status: Status,
    pub message: String,
    pub function: &'static str,
}

/// Calls taking their handle as const write no message into it (lora.h, Threads): the
/// handle's last error would be an older call's.
fn takes_const_handle(function: &str) -> bool {
    matches!(
        function,
        "lora_adapter_get_config_int"
            | "lora_adapter_get_config_double"
            | "lora_adapter_param_shape"
            | "lora_adapter_get_param"
            | "lora_adapter_get_grad"
            | "lora_adapter_param_count"
            | "lora_adapter_get_params_flat"
            | "lora_adapter_get_grads_flat"
            | "lora_adapter_merge"
            | "lora_adapter_unmerge"
            | "lora_adapter_get_run_info"
            | "lora_tape_create"
            | "lora_optimizer_create"
            | "lora_optimizer_create_set"
            | "lora_optimizer_get_int"
            | "lora_optimizer_get_double"
    )
}

impl LoraError {
    fn new(status: Status, function: &'static str, message: impl Into<String>) -> Self {
        LoraError {
            status,
            message: message.into(),
            function,
        }
    }
    /// The C status code.
    pub fn code(&self) -> i32 {
        self.status.code()
    }
}

impl fmt::Display for LoraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.function, status_string(self.code()))?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for LoraError {}

pub type Result<T> = std::result::Result<T, LoraError>;

fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the library returns NUL-terminated strings that live at least until the
    // next call on the same handle; we copy at once.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn shape_error(function: &'static str, message: String) -> LoraError {
    LoraError::new(Status::Shape, function, message)
}

// ---- version ---------------------------------------------------------------------------

/// The loaded library's "MAJOR.MINOR.PATCH".
pub fn version_string() -> String {
    cstr(unsafe { sys::lora_version_string() })
}

/// The loaded library's MAJOR*10000 + MINOR*100 + PATCH (compare with
/// [`sys::LORA_VERSION_NUMBER`], the header this crate was written against).
pub fn version_number() -> u32 {
    unsafe { sys::lora_version_number() }
}

/// `lora_status_string`: short English text for a status code.
pub fn status_string(code: i32) -> String {
    cstr(unsafe { sys::lora_status_string(code) })
}

type LossFn = unsafe extern "C" fn(*const f32, *const f32, usize, *mut f64, *mut f32) -> c_int;

fn loss_with(
    f: LossFn,
    function: &'static str,
    out: &[f32],
    target: &[f32],
) -> Result<(f64, Vec<f32>)> {
    if out.len() != target.len() {
        return Err(shape_error(
            function,
            format!("out has {} values, target {}", out.len(), target.len()),
        ));
    }
    let mut dout = vec![0f32; out.len()];
    let mut loss = 0f64;
    let st = unsafe {
        f(
            out.as_ptr(),
            target.as_ptr(),
            out.len(),
            &mut loss,
            dout.as_mut_ptr(),
        )
    };
    match Status::from_code(st) {
        None => Ok((loss, dout)),
        Some(s) => Err(LoraError::new(s, function, status_string(st))),
    }
}

/// The paper's loss, `lora_mse_loss`: `(1/2 * sum((out - target)^2), out - target)`.
pub fn mse_loss(out: &[f32], target: &[f32]) -> Result<(f64, Vec<f32>)> {
    loss_with(sys::lora_mse_loss, "lora_mse_loss", out, target)
}

/// `torch.nn.MSELoss()`'s mean, `lora_mse_loss_mean`:
/// `(mean((out - target)^2), 2 * (out - target) / n)`.
pub fn mse_loss_mean(out: &[f32], target: &[f32]) -> Result<(f64, Vec<f32>)> {
    loss_with(sys::lora_mse_loss_mean, "lora_mse_loss_mean", out, target)
}

// ---- enums -----------------------------------------------------------------------------

/// One projection of the layer (`lora_target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
}

impl Target {
    pub const ALL: [Target; 4] = [Target::Q, Target::K, Target::V, Target::O];
    pub fn code(self) -> c_int {
        match self {
            Target::Q => sys::LORA_TARGET_Q,
            Target::K => sys::LORA_TARGET_K,
            Target::V => sys::LORA_TARGET_V,
            Target::O => sys::LORA_TARGET_O,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
        }
    }
}

/// A LoRA factor: A (rank, in) or B (out, rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Factor {
    A,
    B,
}

impl Factor {
    pub fn code(self) -> c_int {
        match self {
            Factor::A => sys::LORA_A,
            Factor::B => sys::LORA_B,
        }
    }
}

/// Attention backend (`lora_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Auto,
    Exact,
    Poly,
    /// A value this binding does not know (a newer library).
    Other(i32),
}

impl Backend {
    pub fn code(self) -> c_int {
        match self {
            Backend::Auto => sys::LORA_BACKEND_AUTO,
            Backend::Exact => sys::LORA_BACKEND_EXACT,
            Backend::Poly => sys::LORA_BACKEND_POLY,
            Backend::Other(c) => c,
        }
    }
    pub fn from_code(c: i32) -> Backend {
        match c {
            sys::LORA_BACKEND_AUTO => Backend::Auto,
            sys::LORA_BACKEND_EXACT => Backend::Exact,
            sys::LORA_BACKEND_POLY => Backend::Poly,
            c => Backend::Other(c),
        }
    }
}

/// Initialisation of the LoRA factors (`lora_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Init {
    KaimingZero,
    Gaussian,
    Zero,
}

impl Init {
    pub fn code(self) -> c_int {
        match self {
            Init::KaimingZero => sys::LORA_INIT_KAIMING_ZERO,
            Init::Gaussian => sys::LORA_INIT_GAUSSIAN,
            Init::Zero => sys::LORA_INIT_ZERO,
        }
    }
}

// ---- configuration ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    Int(i64),
    Double(f64),
}

/// A builder for [`Adapter`]: the `LORA_CFG_*` parameters, applied in order by
/// [`Config::build`]. Each setter names its parameter; [`Config::set_int`] and
/// [`Config::set_double`] take any parameter code.
#[derive(Debug, Clone)]
pub struct Config {
    values: Vec<(c_int, Value)>,
}

macro_rules! int_setters {
    ($($(#[$m:meta])* $name:ident => $param:ident),* $(,)?) => {$(
        $(#[$m])*
        pub fn $name(self, value: i64) -> Self { self.set_int(sys::$param, value) }
    )*};
}

impl Config {
    /// A configuration with `LORA_CFG_D_MODEL = d_model` and every other default.
    pub fn new(d_model: i64) -> Self {
        Config {
            values: vec![(sys::LORA_CFG_D_MODEL, Value::Int(d_model))],
        }
    }
    /// Sets an integer parameter by its `LORA_CFG_*` code.
    pub fn set_int(mut self, param: c_int, value: i64) -> Self {
        self.values.push((param, Value::Int(value)));
        self
    }
    /// Sets a double parameter by its `LORA_CFG_*` code.
    pub fn set_double(mut self, param: c_int, value: f64) -> Self {
        self.values.push((param, Value::Double(value)));
        self
    }
    int_setters! {
        /// Query heads (default 1).
        n_heads => LORA_CFG_N_HEADS,
        /// Key/value heads dividing n_heads (GQA/MQA), default n_heads.
        n_kv_heads => LORA_CFG_N_KV_HEADS,
        /// Per-head width, default d_model / n_heads.
        head_dim => LORA_CFG_HEAD_DIM,
        /// LoRA rank r (default 8).
        rank => LORA_CFG_RANK,
        /// Even degree >= 2 of the polynomial backend; 0 = from the tolerance.
        poly_degree => LORA_CFG_POLY_DEGREE,
        /// 0 = all cores, else exactly this many threads.
        threads => LORA_CFG_THREADS,
        /// Query rows per (batch, head) checked exactly when POLY runs.
        measure_rows => LORA_CFG_MEASURE_ROWS,
        /// Rotary embedding (`sys::LORA_ROPE_*`), default none.
        rope => LORA_CFG_ROPE,
        /// Even number of rotated dims per head, default head_dim.
        rope_dim => LORA_CFG_ROPE_DIM,
        /// Sliding-window width, 0 = none.
        window => LORA_CFG_WINDOW,
        /// Product precision (`sys::LORA_COMPUTE_*`), default fp32.
        compute => LORA_CFG_COMPUTE,
    }
    /// RoPE base theta (default 10000).
    pub fn rope_theta(self, theta: f64) -> Self {
        self.set_double(sys::LORA_CFG_ROPE_THETA, theta)
    }
    /// Score soft-capping c (S <- c*tanh(S/c)), 0 = none.
    pub fn softcap(self, cap: f64) -> Self {
        self.set_double(sys::LORA_CFG_SOFTCAP, cap)
    }
    /// PEFT's lora_dropout probability in [0, 1).
    pub fn dropout(self, p: f64) -> Self {
        self.set_double(sys::LORA_CFG_DROPOUT, p)
    }
    /// Initialisation seed (stored as uint64).
    pub fn seed(self, seed: u64) -> Self {
        self.set_int(sys::LORA_CFG_SEED, seed as i64)
    }
    /// LoRA alpha (default rank, so s = 1).
    pub fn alpha(self, alpha: f64) -> Self {
        self.set_double(sys::LORA_CFG_ALPHA, alpha)
    }
    /// β of softmax(β·Q·Kᵀ), default 1/sqrt(head_dim).
    pub fn softmax_scale(self, scale: f64) -> Self {
        self.set_double(sys::LORA_CFG_SOFTMAX_SCALE, scale)
    }
    /// Certified bound on the relative error of POLY's attention probabilities.
    pub fn tolerance(self, eta: f64) -> Self {
        self.set_double(sys::LORA_CFG_TOLERANCE, eta)
    }
    /// s = alpha/sqrt(r) instead of alpha/r.
    pub fn rslora(self, on: bool) -> Self {
        self.set_int(sys::LORA_CFG_RSLORA, on as i64)
    }
    /// Causal mask (bottom-right aligned for cross-attention).
    pub fn causal(self, on: bool) -> Self {
        self.set_int(sys::LORA_CFG_CAUSAL, on as i64)
    }
    /// The layer has an output projection W_O.
    pub fn out_proj(self, on: bool) -> Self {
        self.set_int(sys::LORA_CFG_OUT_PROJ, on as i64)
    }
    /// The adapted projections (default Q and V).
    pub fn targets(self, targets: &[Target]) -> Self {
        let mask = targets.iter().fold(0i64, |m, t| m | t.code() as i64);
        self.set_int(sys::LORA_CFG_TARGETS, mask)
    }
    pub fn backend(self, backend: Backend) -> Self {
        self.set_int(sys::LORA_CFG_BACKEND, backend.code() as i64)
    }
    pub fn init(self, init: Init) -> Self {
        self.set_int(sys::LORA_CFG_INIT, init.code() as i64)
    }

    /// A `lora_config` holding these values (destroyed when the guard drops).
    fn raw(&self) -> Result<ConfigHandle> {
        let mut cfg: *mut sys::lora_config = ptr::null_mut();
        let st = unsafe { sys::lora_config_create(&mut cfg) };
        if let Some(s) = Status::from_code(st) {
            return Err(LoraError::new(s, "lora_config_create", status_string(st)));
        }
        let h = ConfigHandle(cfg);
        for &(param, value) in &self.values {
            let (st, f) = match value {
                Value::Int(v) => (
                    unsafe { sys::lora_config_set_int(cfg, param, v) },
                    "lora_config_set_int",
                ),
                Value::Double(v) => (
                    unsafe { sys::lora_config_set_double(cfg, param, v) },
                    "lora_config_set_double",
                ),
            };
            h.check(st, f)?;
        }
        Ok(h)
    }

    /// Creates the adapter. A refused value or combination gives the library's reason.
    pub fn build(&self) -> Result<Adapter> {
        let cfg = self.raw()?;
        let mut h: *mut sys::lora_adapter = ptr::null_mut();
        let st = unsafe { sys::lora_adapter_create(&mut h, cfg.0) };
        if st != sys::LORA_OK {
            // create cannot write into the const config: validate keeps the reason.
            unsafe { sys::lora_config_validate(cfg.0) };
            return Err(cfg.error(st, "lora_adapter_create"));
        }
        drop(cfg);
        Adapter::from_handle(h)
    }
}

/// An owned `lora_config`, destroyed on drop.
struct ConfigHandle(*mut sys::lora_config);

impl Drop for ConfigHandle {
    fn drop(&mut self) {
        unsafe { sys::lora_config_destroy(self.0) }
    }
}

impl ConfigHandle {
    fn error(&self, st: c_int, function: &'static str) -> LoraError {
        LoraError::new(
            Status::from_code(st).unwrap_or(Status::Unknown(st)),
            function,
            cstr(unsafe { sys::lora_config_last_error(self.0) }),
        )
    }
    fn check(&self, st: c_int, function: &'static str) -> Result<()> {
        if st == sys::LORA_OK {
            Ok(())
        } else {
            Err(self.error(st, function))
        }
    }
}

// ---- reports ---------------------------------------------------------------------------

/// What the last forward or backward ran (`lora_run_info`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunInfo {
    pub backend: Backend,
    pub poly_degree: i64,
    pub poly_rank: i64,
    pub error_bound: f64,
    pub grad_bound: f64,
    pub score_bound: f64,
    pub measured_out_error: f64,
    pub measured_dq_error: f64,
    /// kv-head groups that ran POLY (the others ran EXACT).
    pub poly_groups: i64,
    /// Bound on the gradient error against the true loss (dout from `mse_loss`).
    pub loss_grad_bound: f64,
    /// What the EXACT groups' products ran in (`sys::LORA_COMPUTE_*`; POLY is fp32).
    pub attention_compute: i32,
}

/// The threshold statistics of one input (`lora_threshold_report`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdReport {
    pub recommended_backend: Backend,
    pub gamma_q: f64,
    pub gamma_k: f64,
    pub gamma_v: f64,
    pub gamma_ratio: f64,
    pub score_bound: f64,
    pub poly_degree: i64,
    pub poly_rank: i64,
    pub error_bound: f64,
    pub flops_exact: f64,
    pub flops_poly: f64,
    /// kv-head groups AUTO runs on POLY.
    pub poly_groups: i64,
}

// ---- adapter ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Saved {
    None,
    SelfAttn { out: usize, x: usize },
    Cross { out: usize, xq: usize, xkv: usize },
}

/// One attention layer with LoRA factors: a `lora_adapter` handle, freed on drop.
pub struct Adapter {
    h: *mut sys::lora_adapter,
    d_model: usize,
    q_dim: usize,
    kv_dim: usize,
    out_proj: bool,
    targets: Vec<Target>,
    saved: Saved,
    /// Bases used in place (set_base_borrowed), kept alive as long as the C side may
    /// read them; indexed by Target position (Q, K, V, O).
    borrowed: [Option<Borrowed>; 4],
    /// Factor (and gradient) storage handed over by borrow_factor_owned, indexed by
    /// 2 * Target position + (0 for A, 1 for B). Fields drop after `Drop::drop`, so the
    /// memory is freed only after the handle is destroyed.
    owned_factors: [Option<OwnedFactor>; 8],
}

/// Memory the library uses in place for a factor: held as raw pointers (from
/// `Box::into_raw`), since the library writes it while no Rust reference exists.
struct OwnedFactor {
    param: NonNull<[f32]>,
    grad: Option<NonNull<[f32]>>,
}

impl OwnedFactor {
    fn into_boxes(self) -> (Box<[f32]>, Option<Box<[f32]>>) {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: both came from Box::into_raw and are given back once.
        unsafe {
            (
                Box::from_raw(me.param.as_ptr()),
                me.grad.map(|g| Box::from_raw(g.as_ptr())),
            )
        }
    }
}

impl Drop for OwnedFactor {
    fn drop(&mut self) {
        // SAFETY: as into_boxes; the handle that used them is gone or no longer uses them.
        unsafe {
            drop(Box::from_raw(self.param.as_ptr()));
            if let Some(g) = self.grad {
                drop(Box::from_raw(g.as_ptr()));
            }
        }
    }
}

fn factor_index(t: Target, w: Factor) -> usize {
    2 * target_index(t) + matches!(w, Factor::B) as usize
}

/// A borrowed base weight and its optional bias.
type Borrowed = (SharedWeight, Option<Arc<[f32]>>);

/// A base weight to copy, by element type (`lora_dtype`): 16-bit values are bit
/// patterns in host byte order (a safetensors tensor's bytes as stored).
#[derive(Debug, Clone, Copy)]
pub enum TypedWeight<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

/// A base weight used in place (`LORA_BASE_BORROW`): the adapter holds the `Arc`, so
/// the values outlive every use and cannot change.
#[derive(Debug, Clone)]
pub enum SharedWeight {
    F32(Arc<[f32]>),
    Bf16(Arc<[u16]>),
    F16(Arc<[u16]>),
}

impl TypedWeight<'_> {
    /// (pointer, element count, `LORA_DTYPE_*`).
    fn raw(&self) -> (*const std::os::raw::c_void, usize, c_int) {
        match self {
            TypedWeight::F32(w) => (w.as_ptr().cast(), w.len(), sys::LORA_DTYPE_F32),
            TypedWeight::Bf16(w) => (w.as_ptr().cast(), w.len(), sys::LORA_DTYPE_BF16),
            TypedWeight::F16(w) => (w.as_ptr().cast(), w.len(), sys::LORA_DTYPE_F16),
        }
    }
}

impl SharedWeight {
    fn as_typed(&self) -> TypedWeight<'_> {
        match self {
            SharedWeight::F32(w) => TypedWeight::F32(w),
            SharedWeight::Bf16(w) => TypedWeight::Bf16(w),
            SharedWeight::F16(w) => TypedWeight::F16(w),
        }
    }
}

fn target_index(t: Target) -> usize {
    match t {
        Target::Q => 0,
        Target::K => 1,
        Target::V => 2,
        Target::O => 3,
    }
}

// SAFETY: lora.h: "one handle is used by one thread at a time; there is no
// process-global mutable state". &mut self methods and !Sync enforce that.
unsafe impl Send for Adapter {}

impl Drop for Adapter {
    fn drop(&mut self) {
        unsafe { sys::lora_adapter_destroy(self.h) }
    }
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter")
            .field("d_model", &self.d_model)
            .field("q_dim", &self.q_dim)
            .field("kv_dim", &self.kv_dim)
            .field("targets", &self.targets)
            .finish()
    }
}

impl Adapter {
    fn from_handle(h: *mut sys::lora_adapter) -> Result<Adapter> {
        let mut ad = Adapter {
            h,
            d_model: 0,
            q_dim: 0,
            kv_dim: 0,
            out_proj: false,
            targets: Vec::new(),
            saved: Saved::None,
            borrowed: Default::default(),
            owned_factors: Default::default(),
        };
        let head_dim = ad.config_int(sys::LORA_CFG_HEAD_DIM)? as usize;
        ad.d_model = ad.config_int(sys::LORA_CFG_D_MODEL)? as usize;
        ad.q_dim = ad.config_int(sys::LORA_CFG_N_HEADS)? as usize * head_dim;
        ad.kv_dim = ad.config_int(sys::LORA_CFG_N_KV_HEADS)? as usize * head_dim;
        ad.out_proj = ad.config_int(sys::LORA_CFG_OUT_PROJ)? != 0;
        let mask = ad.config_int(sys::LORA_CFG_TARGETS)? as c_int;
        ad.targets = Target::ALL
            .iter()
            .copied()
            .filter(|t| mask & t.code() != 0)
            .collect();
        Ok(ad)
    }

    /// The raw handle, for calls into [`sys`]. It stays owned by this Adapter.
    pub fn as_ptr(&self) -> *mut sys::lora_adapter {
        self.h
    }

    fn check(&self, st: c_int, function: &'static str) -> Result<()> {
        match Status::from_code(st) {
            None => Ok(()),
            Some(s) if takes_const_handle(function) => Err(LoraError::new(s, function, "")),
            Some(s) => Err(LoraError::new(s, function, self.last_error())),
        }
    }

    /// `lora_adapter_last_error`: detail of the last failed call ("" if none).
    pub fn last_error(&self) -> String {
        cstr(unsafe { sys::lora_adapter_last_error(self.h) })
    }

    /// A resolved integer configuration parameter (`LORA_CFG_*` code).
    pub fn config_int(&self, param: c_int) -> Result<i64> {
        let mut v = 0i64;
        self.check(
            unsafe { sys::lora_adapter_get_config_int(self.h, param, &mut v) },
            "lora_adapter_get_config_int",
        )?;
        Ok(v)
    }

    /// A resolved double configuration parameter (ALPHA, SOFTMAX_SCALE, TOLERANCE).
    pub fn config_double(&self, param: c_int) -> Result<f64> {
        let mut v = 0f64;
        self.check(
            unsafe { sys::lora_adapter_get_config_double(self.h, param, &mut v) },
            "lora_adapter_get_config_double",
        )?;
        Ok(v)
    }

    pub fn d_model(&self) -> usize {
        self.d_model
    }
    /// n_heads * head_dim.
    pub fn q_dim(&self) -> usize {
        self.q_dim
    }
    /// n_kv_heads * head_dim.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }
    /// Columns of the forward's output: d_model with an output projection, else q_dim.
    pub fn out_dim(&self) -> usize {
        if self.out_proj {
            self.d_model
        } else {
            self.q_dim
        }
    }
    /// The adapted projections, in Q, K, V, O order.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// (out, in) of the base weight of `target`.
    pub fn base_shape(&self, target: Target) -> (usize, usize) {
        match target {
            Target::Q => (self.q_dim, self.d_model),
            Target::K | Target::V => (self.kv_dim, self.d_model),
            Target::O => (self.d_model, self.q_dim),
        }
    }

    /// Copies a frozen base projection: `weight` (out, in) row-major, `bias` (out).
    pub fn set_base(&mut self, target: Target, weight: &[f32], bias: Option<&[f32]>) -> Result<()> {
        let (o, i) = self.base_shape(target);
        if weight.len() != o * i {
            return Err(shape_error(
                "set_base",
                format!("weight has {} values, expected {}x{}", weight.len(), o, i),
            ));
        }
        if let Some(b) = bias {
            if b.len() != o {
                return Err(shape_error(
                    "set_base",
                    format!("bias has {} values, expected {}", b.len(), o),
                ));
            }
        }
        self.saved = Saved::None;
        let bp = bias.map_or(ptr::null(), |b| b.as_ptr());
        self.check(
            unsafe { sys::lora_adapter_set_base(self.h, target.code(), weight.as_ptr(), bp) },
            "lora_adapter_set_base",
        )?;
        self.borrowed[target_index(target)] = None;
        Ok(())
    }

    /// Uses a shared frozen base projection without copying it (multi-adapter serving):
    /// the adapter holds the `Arc`s, so the buffers outlive every use, and `[f32]`
    /// behind an `Arc` cannot change, as the C lifetime rule requires.
    pub fn set_base_borrowed(
        &mut self,
        target: Target,
        weight: Arc<[f32]>,
        bias: Option<Arc<[f32]>>,
    ) -> Result<()> {
        let (o, i) = self.base_shape(target);
        if weight.len() != o * i {
            return Err(shape_error(
                "set_base_borrowed",
                format!("weight has {} values, expected {}x{}", weight.len(), o, i),
            ));
        }
        if let Some(b) = &bias {
            if b.len() != o {
                return Err(shape_error(
                    "set_base_borrowed",
                    format!("bias has {} values, expected {}", b.len(), o),
                ));
            }
        }
        self.saved = Saved::None;
        let bp = bias.as_ref().map_or(ptr::null(), |b| b.as_ptr());
        self.check(
            unsafe {
                sys::lora_adapter_set_base_borrowed(self.h, target.code(), weight.as_ptr(), bp)
            },
            "lora_adapter_set_base_borrowed",
        )?;
        // Replaces (and releases) any earlier borrow of this target only after the
        // library has switched to the new buffers.
        self.borrowed[target_index(target)] = Some((SharedWeight::F32(weight), bias));
        Ok(())
    }

    /// `lora_adapter_set_base_typed` with flags 0: copies a base weight (out, in) of any
    /// element type (a bf16 copy costs 2 bytes per weight) and a float bias (out).
    pub fn set_base_typed(
        &mut self,
        target: Target,
        weight: TypedWeight<'_>,
        bias: Option<&[f32]>,
    ) -> Result<()> {
        self.set_base_typed_raw(target, weight, bias, 0)?;
        self.borrowed[target_index(target)] = None;
        Ok(())
    }

    /// `lora_adapter_set_base_typed` with `LORA_BASE_BORROW`: uses a shared base weight
    /// of any element type in place (as [`Adapter::set_base_borrowed`] for floats).
    pub fn set_base_typed_borrowed(
        &mut self,
        target: Target,
        weight: SharedWeight,
        bias: Option<Arc<[f32]>>,
    ) -> Result<()> {
        self.set_base_typed_raw(target, weight.as_typed(), bias.as_deref(),
                                sys::LORA_BASE_BORROW)?;
        self.borrowed[target_index(target)] = Some((weight, bias));
        Ok(())
    }

    fn set_base_typed_raw(
        &mut self,
        target: Target,
        weight: TypedWeight<'_>,
        bias: Option<&[f32]>,
        flags: u32,
    ) -> Result<()> {
        let (o, i) = self.base_shape(target);
        let (wp, n, dtype) = weight.raw();
        if n != o * i {
            return Err(shape_error(
                "set_base_typed",
                format!("weight has {n} values, expected {o}x{i}"),
            ));
        }
        if let Some(b) = bias {
            if b.len() != o {
                return Err(shape_error(
                    "set_base_typed",
                    format!("bias has {} values, expected {}", b.len(), o),
                ));
            }
        }
        self.saved = Saved::None;
        let bp = bias.map_or(ptr::null(), |b| b.as_ptr());
        self.check(
            unsafe { sys::lora_adapter_set_base_typed(self.h, target.code(), wp, dtype, bp, flags) },
            "lora_adapter_set_base_typed",
        )
    }

    /// (rows, cols) of a LoRA factor: A is (rank, in), B is (out, rank).
    pub fn param_shape(&self, target: Target, which: Factor) -> Result<(usize, usize)> {
        if !self.targets.contains(&target) {
            let msg = format!("target {target:?} is not adapted");
            return Err(LoraError::new(Status::InvalidArg, "lora_adapter_param_shape", msg));
        }
        let (mut r, mut c) = (0i64, 0i64);
        self.check(
            unsafe {
                sys::lora_adapter_param_shape(self.h, target.code(), which.code(), &mut r, &mut c)
            },
            "lora_adapter_param_shape",
        )?;
        Ok((r as usize, c as usize))
    }

    /// Copies a LoRA factor into `dst` (its exact element count).
    pub fn param_into(&self, target: Target, which: Factor, dst: &mut [f32]) -> Result<()> {
        self.check(
            unsafe {
                sys::lora_adapter_get_param(
                    self.h,
                    target.code(),
                    which.code(),
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            },
            "lora_adapter_get_param",
        )
    }

    /// Copies an accumulated gradient into `dst` (the factor's element count).
    pub fn grad_into(&self, target: Target, which: Factor, dst: &mut [f32]) -> Result<()> {
        self.check(
            unsafe {
                sys::lora_adapter_get_grad(
                    self.h,
                    target.code(),
                    which.code(),
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            },
            "lora_adapter_get_grad",
        )
    }

    /// A copy of a LoRA factor, row-major.
    pub fn param(&self, target: Target, which: Factor) -> Result<Vec<f32>> {
        let (r, c) = self.param_shape(target, which)?;
        let mut v = vec![0f32; r * c];
        self.param_into(target, which, &mut v)?;
        Ok(v)
    }

    /// A copy of the accumulated gradient of a LoRA factor.
    pub fn grad(&self, target: Target, which: Factor) -> Result<Vec<f32>> {
        let (r, c) = self.param_shape(target, which)?;
        let mut v = vec![0f32; r * c];
        self.grad_into(target, which, &mut v)?;
        Ok(v)
    }

    /// Copies `src` (the factor's exact element count) into a LoRA factor.
    pub fn set_param(&mut self, target: Target, which: Factor, src: &[f32]) -> Result<()> {
        self.saved = Saved::None;
        self.check(
            unsafe {
                sys::lora_adapter_set_param(
                    self.h,
                    target.code(),
                    which.code(),
                    src.as_ptr(),
                    src.len(),
                )
            },
            "lora_adapter_set_param",
        )
    }

    /// Uses caller memory as a LoRA factor and (optionally) its gradient, with no copy
    /// (`lora_adapter_borrow_factor`): `param`'s current values become the factor,
    /// `grad`'s the accumulated gradient; each holds the factor's exact element count.
    /// The library then reads and writes them in place (optimizer steps and
    /// `set_param` write `param`; backward and `zero_grad` write `grad`), and notices
    /// changes the caller makes to `param` between calls (a fingerprint). `None` for
    /// both gives the factor back to the adapter's own storage (values copied over).
    ///
    /// # Safety
    /// Until this adapter is dropped or this factor is borrowed again (or given back
    /// with `None`), both buffers must stay allocated, and no Rust reference to them may
    /// be used while a call on this adapter (or an optimizer holding it) runs: the
    /// library writes them through raw pointers. Use [`Adapter::borrow_factor_owned`] or
    /// [`Adapter::with_borrowed_factor`] for the same zero-copy storage without
    /// `unsafe`.
    pub unsafe fn borrow_factor(
        &mut self,
        target: Target,
        which: Factor,
        param: Option<*mut [f32]>,
        grad: Option<*mut [f32]>,
    ) -> Result<()> {
        let count = self.factor_count(target, which)?;
        for (name, b) in [("param", param), ("grad", grad)] {
            if let Some(b) = b {
                if b.len() != count {
                    return Err(shape_error(
                        "borrow_factor",
                        format!("{} has {} values, the factor {}", name, b.len(), count),
                    ));
                }
            }
        }
        let raw = |b: Option<*mut [f32]>| b.map_or(ptr::null_mut(), |b| b as *mut f32);
        self.check(
            sys::lora_adapter_borrow_factor(
                self.h,
                target.code(),
                which.code(),
                raw(param),
                raw(grad),
                count,
            ),
            "lora_adapter_borrow_factor",
        )?;
        if param.is_some() {
            self.saved = Saved::None; // new factor memory is a parameter change
        }
        Ok(())
    }

    fn factor_count(&self, target: Target, which: Factor) -> Result<usize> {
        let (r, c) = self.param_shape(target, which)?;
        Ok(r * c)
    }

    /// The safe, owning form of [`Adapter::borrow_factor`]: the adapter takes the boxes
    /// and uses them in place as the factor (and its gradient) until
    /// [`Adapter::release_factor`] returns them, or drop frees them. Read and change
    /// them in place with [`Adapter::factor_storage`] / [`Adapter::factor_storage_mut`].
    /// On an error the boxes are dropped and nothing changes.
    pub fn borrow_factor_owned(
        &mut self,
        target: Target,
        which: Factor,
        param: Box<[f32]>,
        grad: Option<Box<[f32]>>,
    ) -> Result<()> {
        let owned = OwnedFactor {
            param: NonNull::from(Box::leak(param)),
            grad: grad.map(|g| NonNull::from(Box::leak(g))),
        };
        // SAFETY: the memory is owned by `owned`, kept in self until the library no
        // longer uses it; Rust references to it only come from &self / &mut self.
        unsafe {
            self.borrow_factor(
                target,
                which,
                Some(owned.param.as_ptr()),
                owned.grad.map(|g| g.as_ptr()),
            )?;
        }
        // Frees storage this factor borrowed before, which the library no longer uses.
        self.owned_factors[factor_index(target, which)] = Some(owned);
        Ok(())
    }

    /// Gives the factor back to the adapter's own storage (its current values copied
    /// over) and returns the boxes of [`Adapter::borrow_factor_owned`], or `None` when
    /// the factor does not use owned storage.
    pub fn release_factor(
        &mut self,
        target: Target,
        which: Factor,
    ) -> Result<Option<(Box<[f32]>, Option<Box<[f32]>>)>> {
        if self.owned_factors[factor_index(target, which)].is_none() {
            return Ok(None);
        }
        // SAFETY: None borrows nothing.
        unsafe { self.borrow_factor(target, which, None, None)? };
        Ok(self.owned_factors[factor_index(target, which)]
            .take()
            .map(OwnedFactor::into_boxes))
    }

    /// The factor memory and gradient memory of [`Adapter::borrow_factor_owned`], read in
    /// place (None when the factor does not use owned storage).
    pub fn factor_storage(
        &self,
        target: Target,
        which: Factor,
    ) -> Option<(&[f32], Option<&[f32]>)> {
        self.owned_factors[factor_index(target, which)]
            .as_ref()
            .map(|o| {
                // SAFETY: owned by self; the library writes it only during &mut self calls.
                unsafe {
                    (
                        &*o.param.as_ptr() as &[f32],
                        o.grad.map(|g| &*g.as_ptr() as &[f32]),
                    )
                }
            })
    }

    /// As [`Adapter::factor_storage`], writable: an optimizer of the caller's can step the
    /// factor in place (the library notices the change before it depends on the values).
    pub fn factor_storage_mut(
        &mut self,
        target: Target,
        which: Factor,
    ) -> Option<(&mut [f32], Option<&mut [f32]>)> {
        self.owned_factors[factor_index(target, which)]
            .as_mut()
            .map(|o| {
                // SAFETY: as factor_storage; &mut self excludes every library call meanwhile.
                unsafe { (&mut *o.param.as_ptr(), o.grad.map(|g| &mut *g.as_ptr())) }
            })
    }

    /// Runs `f` with `param` (and `grad`) used in place as a LoRA factor and its
    /// gradient, then gives the factor back to the adapter's own storage (its values
    /// copied over), also when `f` panics. The borrows of the slices last exactly as
    /// long as the library may use them, so this needs no `unsafe`.
    pub fn with_borrowed_factor<R>(
        &mut self,
        target: Target,
        which: Factor,
        param: &mut [f32],
        grad: Option<&mut [f32]>,
        f: impl FnOnce(&mut Adapter) -> R,
    ) -> Result<R> {
        struct GiveBack<'a>(&'a mut Adapter, Target, Factor);
        impl Drop for GiveBack<'_> {
            fn drop(&mut self) {
                // SAFETY: None borrows nothing; a failure cannot happen for a factor
                // that borrow_factor accepted (target and which are valid).
                let _ = unsafe { self.0.borrow_factor(self.1, self.2, None, None) };
            }
        }
        // SAFETY: the slices stay mutably borrowed until GiveBack has returned the
        // factor to own storage, at the latest when this function returns or unwinds.
        unsafe {
            self.borrow_factor(
                target,
                which,
                Some(param as *mut [f32]),
                grad.map(|g| g as *mut [f32]),
            )?
        };
        let guard = GiveBack(self, target, which);
        Ok(f(&mut *guard.0))
    }

    /// Resets every gradient to zero.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.check(
            unsafe { sys::lora_adapter_zero_grad(self.h) },
            "lora_adapter_zero_grad",
        )
    }

    /// Total floats in all LoRA factors.
    pub fn param_count(&self) -> Result<usize> {
        let mut n = 0usize;
        self.check(
            unsafe { sys::lora_adapter_param_count(self.h, &mut n) },
            "lora_adapter_param_count",
        )?;
        Ok(n)
    }

    /// All factors as one vector: targets Q, K, V, O (adapted ones), each A then B,
    /// row-major.
    pub fn params_flat(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.param_count()?];
        self.check(
            unsafe { sys::lora_adapter_get_params_flat(self.h, v.as_mut_ptr(), v.len()) },
            "lora_adapter_get_params_flat",
        )?;
        Ok(v)
    }

    /// Sets all factors from one vector in [`Adapter::params_flat`]'s order.
    pub fn set_params_flat(&mut self, src: &[f32]) -> Result<()> {
        self.saved = Saved::None;
        self.check(
            unsafe { sys::lora_adapter_set_params_flat(self.h, src.as_ptr(), src.len()) },
            "lora_adapter_set_params_flat",
        )
    }

    /// All accumulated gradients into `dst` (param_count floats).
    pub fn grads_flat_into(&self, dst: &mut [f32]) -> Result<()> {
        self.check(
            unsafe { sys::lora_adapter_get_grads_flat(self.h, dst.as_mut_ptr(), dst.len()) },
            "lora_adapter_get_grads_flat",
        )
    }

    /// All accumulated gradients as one vector.
    pub fn grads_flat(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.param_count()?];
        self.grads_flat_into(&mut v)?;
        Ok(v)
    }

    /// Overwrites the accumulated gradients (e.g. with an all-reduced average).
    pub fn set_grads_flat(&mut self, src: &[f32]) -> Result<()> {
        self.check(
            unsafe { sys::lora_adapter_set_grads_flat(self.h, src.as_ptr(), src.len()) },
            "lora_adapter_set_grads_flat",
        )
    }

    /// In place: `weight` ((out, in), holding W) becomes W + s·B·A of `target`. A
    /// NaN/Inf result is `NonFinite` and leaves `weight` untouched.
    pub fn merge(&self, target: Target, weight: &mut [f32]) -> Result<()> {
        self.check(
            unsafe {
                sys::lora_adapter_merge(self.h, target.code(), weight.as_mut_ptr(), weight.len())
            },
            "lora_adapter_merge",
        )
    }

    /// In place: subtracts s·B·A of `target` back (the inverse of [`Adapter::merge`] up
    /// to its documented rounding).
    pub fn unmerge(&self, target: Target, weight: &mut [f32]) -> Result<()> {
        self.check(
            unsafe {
                sys::lora_adapter_unmerge(self.h, target.code(), weight.as_mut_ptr(), weight.len())
            },
            "lora_adapter_unmerge",
        )
    }

    /// Replaces RoPE's inverse frequencies (THETA^(-2i/ROPE_DIM) by default) with
    /// ROPE_DIM/2 finite values >= 0: linear, NTK, Llama 3 or YaRN scaling
    /// (docs/models.md). Drops the saved forward.
    pub fn set_rope_freqs(&mut self, inv_freq: &[f64]) -> Result<()> {
        self.saved = Saved::None;
        self.check(
            unsafe { sys::lora_adapter_set_rope_freqs(self.h, inv_freq.as_ptr(), inv_freq.len()) },
            "lora_adapter_set_rope_freqs",
        )
    }

    /// Hot swap: copies `src`'s factors and scaling into this adapter, keeping its
    /// base weights, settings and gradients.
    pub fn copy_params_from(&mut self, src: &Adapter) -> Result<()> {
        self.saved = Saved::None;
        self.check(
            unsafe { sys::lora_adapter_copy_params(self.h, src.h) },
            "lora_adapter_copy_params",
        )
    }

    /// Inference forward with merged weights (as [`Adapter::forward`] up to rounding);
    /// keeps no activations and leaves the saved forward alone.
    pub fn forward_merged(&mut self, x: &[f32], batch: usize, seq_len: usize) -> Result<Vec<f32>> {
        self.input_len("x", x.len(), batch, seq_len)?;
        let mut out = vec![0f32; batch * seq_len * self.out_dim()];
        self.check(
            unsafe {
                sys::lora_forward_merged(
                    self.h,
                    x.as_ptr(),
                    batch as i64,
                    seq_len as i64,
                    out.as_mut_ptr(),
                )
            },
            "lora_forward_merged",
        )?;
        Ok(out)
    }

    /// Cross-attention with merged weights (see [`Adapter::forward_merged`]).
    pub fn forward_merged_cross(
        &mut self,
        xq: &[f32],
        xkv: &[f32],
        batch: usize,
        len_q: usize,
        len_kv: usize,
    ) -> Result<Vec<f32>> {
        self.input_len("xq", xq.len(), batch, len_q)?;
        self.input_len("xkv", xkv.len(), batch, len_kv)?;
        let mut out = vec![0f32; batch * len_q * self.out_dim()];
        self.check(
            unsafe {
                sys::lora_forward_merged_cross(
                    self.h,
                    xq.as_ptr(),
                    xkv.as_ptr(),
                    batch as i64,
                    len_q as i64,
                    len_kv as i64,
                    out.as_mut_ptr(),
                )
            },
            "lora_forward_merged_cross",
        )?;
        Ok(out)
    }

    fn input_len(&self, name: &str, len: usize, batch: usize, rows: usize) -> Result<usize> {
        if batch == 0 || rows == 0 {
            return Err(shape_error(
                "forward",
                format!("batch = {batch}, length = {rows}: each must be >= 1"),
            ));
        }
        let want = batch
            .checked_mul(rows)
            .and_then(|n| n.checked_mul(self.d_model))
            .ok_or_else(|| shape_error("forward", "sizes overflow".into()))?;
        if len != want {
            return Err(shape_error(
                "forward",
                format!(
                    "{name} has {len} values, expected {batch}x{rows}x{}",
                    self.d_model
                ),
            ));
        }
        Ok(want)
    }

    /// Self-attention forward into `out` ((batch, seq_len, out_dim)); keeps what
    /// backward needs. `x` is (batch, seq_len, d_model).
    pub fn forward_into(
        &mut self,
        x: &[f32],
        batch: usize,
        seq_len: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let xn = self.input_len("x", x.len(), batch, seq_len)?;
        let on = batch * seq_len * self.out_dim();
        if out.len() != on {
            return Err(shape_error(
                "forward",
                format!("out has {} values, expected {on}", out.len()),
            ));
        }
        self.saved = Saved::None;
        self.check(
            unsafe {
                sys::lora_forward(
                    self.h,
                    x.as_ptr(),
                    batch as i64,
                    seq_len as i64,
                    out.as_mut_ptr(),
                )
            },
            "lora_forward",
        )?;
        self.saved = Saved::SelfAttn { out: on, x: xn };
        Ok(())
    }

    /// Self-attention forward; returns out (batch, seq_len, out_dim).
    pub fn forward(&mut self, x: &[f32], batch: usize, seq_len: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; batch.saturating_mul(seq_len).saturating_mul(self.out_dim())];
        self.forward_into(x, batch, seq_len, &mut out)?;
        Ok(out)
    }

    fn no_forward(function: &'static str, what: &str) -> LoraError {
        LoraError::new(
            Status::State,
            function,
            format!("no saved {what} (set_base and set_param drop it)"),
        )
    }

    /// Backward of the last [`Adapter::forward`]: adds dL/dA, dL/dB into the gradients
    /// and writes dL/dx into `dx` when given (x's length).
    pub fn backward(&mut self, dout: &[f32], dx: Option<&mut [f32]>) -> Result<()> {
        let (on, xn) = match self.saved {
            Saved::SelfAttn { out, x } => (out, x),
            _ => return Err(Self::no_forward("backward", "forward")),
        };
        if dout.len() != on {
            return Err(shape_error(
                "backward",
                format!("dout has {} values, expected {on}", dout.len()),
            ));
        }
        let dxp = match dx {
            None => ptr::null_mut(),
            Some(d) if d.len() == xn => d.as_mut_ptr(),
            Some(d) => {
                return Err(shape_error(
                    "backward",
                    format!("dx has {} values, expected {xn}", d.len()),
                ))
            }
        };
        self.check(
            unsafe { sys::lora_backward(self.h, dout.as_ptr(), dxp) },
            "lora_backward",
        )
    }

    /// Cross-attention forward: queries from `xq` (batch, len_q, d_model), keys and
    /// values from `xkv` (batch, len_kv, d_model); returns (batch, len_q, out_dim).
    pub fn forward_cross(
        &mut self,
        xq: &[f32],
        xkv: &[f32],
        batch: usize,
        len_q: usize,
        len_kv: usize,
    ) -> Result<Vec<f32>> {
        let qn = self.input_len("xq", xq.len(), batch, len_q)?;
        let kvn = self.input_len("xkv", xkv.len(), batch, len_kv)?;
        let on = batch * len_q * self.out_dim();
        let mut out = vec![0f32; on];
        self.saved = Saved::None;
        self.check(
            unsafe {
                sys::lora_forward_cross(
                    self.h,
                    xq.as_ptr(),
                    xkv.as_ptr(),
                    batch as i64,
                    len_q as i64,
                    len_kv as i64,
                    out.as_mut_ptr(),
                )
            },
            "lora_forward_cross",
        )?;
        self.saved = Saved::Cross {
            out: on,
            xq: qn,
            xkv: kvn,
        };
        Ok(out)
    }

    /// Backward of the last [`Adapter::forward_cross`]; `dxq`, `dxkv` receive the input
    /// gradients when given.
    pub fn backward_cross(
        &mut self,
        dout: &[f32],
        dxq: Option<&mut [f32]>,
        dxkv: Option<&mut [f32]>,
    ) -> Result<()> {
        let (on, qn, kvn) = match self.saved {
            Saved::Cross { out, xq, xkv } => (out, xq, xkv),
            _ => return Err(Self::no_forward("backward_cross", "forward_cross")),
        };
        if dout.len() != on {
            return Err(shape_error(
                "backward_cross",
                format!("dout has {} values, expected {on}", dout.len()),
            ));
        }
        let p = |d: Option<&mut [f32]>, n: usize, name: &str| -> Result<*mut f32> {
            match d {
                None => Ok(ptr::null_mut()),
                Some(d) if d.len() == n => Ok(d.as_mut_ptr()),
                Some(d) => Err(shape_error(
                    "backward_cross",
                    format!("{name} has {} values, expected {n}", d.len()),
                )),
            }
        };
        let (pq, pkv) = (p(dxq, qn, "dxq")?, p(dxkv, kvn, "dxkv")?);
        self.check(
            unsafe { sys::lora_backward_cross(self.h, dout.as_ptr(), pq, pkv) },
            "lora_backward_cross",
        )
    }

    /// `lora_forward_ex`: self-attention on `xq` when `xkv` is `None` (then `len_kv`
    /// must equal `len_q`), else cross-attention; returns out (batch, len_q, out_dim).
    /// A training forward records into `tape`, or into the adapter's own saved forward
    /// when `tape` is `None` ([`Adapter::backward`] / [`Adapter::backward_cross`] then
    /// read it). `args.infer` saves nothing and touches no tape, parameter or gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_ex(
        &mut self,
        xq: &[f32],
        xkv: Option<&[f32]>,
        batch: usize,
        len_q: usize,
        len_kv: usize,
        args: &AttnArgs<'_>,
        tape: Option<&mut Tape>,
    ) -> Result<Vec<f32>> {
        let qn = self.input_len("xq", xq.len(), batch, len_q)?;
        let kvn = match xkv {
            Some(kv) => self.input_len("xkv", kv.len(), batch, len_kv)?,
            None => qn,
        };
        let mut c = args.to_sys(batch, len_q, len_kv, xkv.is_none())?;
        let on = batch * len_q * self.out_dim();
        let mut out = vec![0f32; on];
        let saved = match xkv {
            None => Saved::SelfAttn { out: on, x: qn },
            Some(_) => Saved::Cross { out: on, xq: qn, xkv: kvn },
        };
        let slot = match tape {
            Some(t) => {
                c.tape = t.h;
                &mut t.saved
            }
            None => &mut self.saved,
        };
        if !args.infer {
            *slot = Saved::None;
        }
        let st = unsafe {
            sys::lora_forward_ex(
                self.h,
                &c,
                xq.as_ptr(),
                xkv.map_or(ptr::null(), |kv| kv.as_ptr()),
                batch as i64,
                len_q as i64,
                len_kv as i64,
                out.as_mut_ptr(),
            )
        };
        if st == sys::LORA_OK && !args.infer {
            *slot = saved;
        }
        self.check(st, "lora_forward_ex")?;
        Ok(out)
    }

    /// `lora_backward_ex`: the backward of the forward recorded in `tape` (`None`: the
    /// adapter's own saved forward, self or cross). Accumulates the gradients. For a
    /// self-attention forward `dxq` receives the whole dL/dx and `dxkv` must be `None`.
    /// A tape may be backwarded more than once; one recorded before a change of
    /// parameters or base weights, or made for another adapter, is `Status::State`.
    pub fn backward_ex(
        &mut self,
        tape: Option<&mut Tape>,
        dout: &[f32],
        dxq: Option<&mut [f32]>,
        dxkv: Option<&mut [f32]>,
    ) -> Result<()> {
        let (saved, th) = match tape {
            Some(t) => (t.saved, t.h),
            None => (self.saved, ptr::null_mut()),
        };
        let (on, qn, kvn) = match saved {
            Saved::SelfAttn { out, x } => (out, x, 0),
            Saved::Cross { out, xq, xkv } => (out, xq, xkv),
            Saved::None => return Err(Self::no_forward("backward_ex", "forward on this tape")),
        };
        if dout.len() != on {
            return Err(shape_error(
                "backward_ex",
                format!("dout has {} values, expected {on}", dout.len()),
            ));
        }
        let p = |d: Option<&mut [f32]>, n: usize, name: &str| -> Result<*mut f32> {
            match d {
                None => Ok(ptr::null_mut()),
                Some(d) if d.len() == n => Ok(d.as_mut_ptr()),
                Some(d) => Err(shape_error(
                    "backward_ex",
                    format!("{name} has {} values, expected {n}", d.len()),
                )),
            }
        };
        let pq = p(dxq, qn, "dxq")?;
        let pkv = match (saved, dxkv) {
            (Saved::SelfAttn { .. }, Some(_)) => {
                return Err(LoraError::new(
                    Status::InvalidArg,
                    "backward_ex",
                    "dxkv must be None: the forward was self-attention (dxq gets dL/dx)",
                ))
            }
            (_, d) => p(d, kvn, "dxkv")?,
        };
        self.check(
            unsafe { sys::lora_backward_ex(self.h, th, dout.as_ptr(), pq, pkv) },
            "lora_backward_ex",
        )
    }

    /// What the last forward/backward ran.
    pub fn run_info(&self) -> Result<RunInfo> {
        let mut s = sys::lora_run_info {
            struct_size: std::mem::size_of::<sys::lora_run_info>() as u32,
            ..Default::default()
        };
        self.check(
            unsafe { sys::lora_adapter_get_run_info(self.h, &mut s) },
            "lora_adapter_get_run_info",
        )?;
        Ok(RunInfo {
            backend: Backend::from_code(s.backend),
            poly_degree: s.poly_degree,
            poly_rank: s.poly_rank,
            error_bound: s.error_bound,
            grad_bound: s.grad_bound,
            score_bound: s.score_bound,
            measured_out_error: s.measured_out_error,
            measured_dq_error: s.measured_dq_error,
            poly_groups: s.poly_groups,
            loss_grad_bound: s.loss_grad_bound,
            attention_compute: s.attention_compute,
        })
    }

    /// The paper's threshold statistics for self-attention on `x` and what AUTO would
    /// run; leaves the saved forward and the gradients alone.
    pub fn threshold_estimate(
        &mut self,
        x: &[f32],
        batch: usize,
        seq_len: usize,
    ) -> Result<ThresholdReport> {
        self.input_len("x", x.len(), batch, seq_len)?;
        let mut s = sys::lora_threshold_report {
            struct_size: std::mem::size_of::<sys::lora_threshold_report>() as u32,
            ..Default::default()
        };
        self.check(
            unsafe {
                sys::lora_threshold_estimate(
                    self.h,
                    x.as_ptr(),
                    batch as i64,
                    seq_len as i64,
                    &mut s,
                )
            },
            "lora_threshold_estimate",
        )?;
        Ok(ThresholdReport::from_sys(&s))
    }

    /// `lora_threshold_estimate_ex`: [`Adapter::threshold_estimate`] for the
    /// self-attention [`Adapter::forward_ex`] with these `args` would run (statistics
    /// over the valid rows, RoPE at the given positions); `args.infer` is ignored.
    pub fn threshold_estimate_ex(
        &mut self,
        x: &[f32],
        batch: usize,
        seq_len: usize,
        args: &AttnArgs<'_>,
    ) -> Result<ThresholdReport> {
        self.input_len("x", x.len(), batch, seq_len)?;
        let c = args.to_sys(batch, seq_len, seq_len, true)?;
        let mut s = sys::lora_threshold_report {
            struct_size: std::mem::size_of::<sys::lora_threshold_report>() as u32,
            ..Default::default()
        };
        self.check(
            unsafe {
                sys::lora_threshold_estimate_ex(
                    self.h,
                    &c,
                    x.as_ptr(),
                    batch as i64,
                    seq_len as i64,
                    &mut s,
                )
            },
            "lora_threshold_estimate_ex",
        )?;
        Ok(ThresholdReport::from_sys(&s))
    }
}

impl ThresholdReport {
    fn from_sys(s: &sys::lora_threshold_report) -> ThresholdReport {
        ThresholdReport {
            recommended_backend: Backend::from_code(s.recommended_backend),
            gamma_q: s.gamma_q,
            gamma_k: s.gamma_k,
            gamma_v: s.gamma_v,
            gamma_ratio: s.gamma_ratio,
            score_bound: s.score_bound,
            poly_degree: s.poly_degree,
            poly_rank: s.poly_rank,
            error_bound: s.error_bound,
            flops_exact: s.flops_exact,
            flops_poly: s.flops_poly,
            poly_groups: s.poly_groups,
        }
    }
}

/// `lora_apply` (through `lora_apply_with_error`, for the message): for every row r
/// whose tenant t = `tenant_of_row[r]` is >= 0, adds tenant t's LoRA delta of `target`
/// to `y` (rows, out): `y[r] += s_t * (x[r] A_t^T) B_t^T`, with x (rows, in). Rows of
/// -1 are left alone; bases and biases are not involved. Every tenant adapts `target`
/// with the same (in, out); ranks and scales may differ. The tenants are only read, so
/// threads may share them. On failure `y` is unchanged.
pub fn apply(
    tenants: &[&Adapter],
    target: Target,
    tenant_of_row: &[i32],
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    let rows = tenant_of_row.len();
    if let Some(first) = tenants.first() {
        let (o, i) = first.base_shape(target);
        if x.len() != rows * i || y.len() != rows * o {
            return Err(shape_error(
                "apply",
                format!(
                    "x has {} values and y {}, expected {rows}x{i} and {rows}x{o}",
                    x.len(),
                    y.len()
                ),
            ));
        }
    }
    let handles: Vec<*const sys::lora_adapter> = tenants.iter().map(|a| a.h.cast_const()).collect();
    let mut err = [0 as c_char; 512];
    let st = unsafe {
        sys::lora_apply_with_error(
            handles.as_ptr(),
            handles.len(),
            target.code(),
            tenant_of_row.as_ptr(),
            x.as_ptr(),
            rows as i64,
            y.as_mut_ptr(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    match Status::from_code(st) {
        None => Ok(()),
        Some(s) => Err(LoraError::new(s, "lora_apply", cstr(err.as_ptr()))),
    }
}

// ---- per-call arguments and tapes --------------------------------------------------------

/// Per-call arguments of [`Adapter::forward_ex`] (`lora_attn_args`); `Default` is every
/// default. The masks: `q_lens`, `kv_lens` (batch), `q_pos` (batch·len_q), `kv_pos`
/// (batch·len_kv), `q_seg`, `kv_seg` of the same lengths; a library without them
/// answers `Status::Unsupported`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnArgs<'a> {
    /// `LORA_FWD_INFER`: save nothing for backward, no dropout.
    pub infer: bool,
    pub q_lens: Option<&'a [i64]>,
    pub kv_lens: Option<&'a [i64]>,
    pub q_pos: Option<&'a [i64]>,
    pub kv_pos: Option<&'a [i64]>,
    pub q_seg: Option<&'a [i32]>,
    pub kv_seg: Option<&'a [i32]>,
}

impl AttnArgs<'_> {
    /// The C struct, after checking each mask's length (tape left NULL).
    fn to_sys(&self, batch: usize, len_q: usize, len_kv: usize, self_attn: bool) -> Result<sys::lora_attn_args> {
        fn ptr_of<T>(v: Option<&[T]>, n: usize, name: &str) -> Result<*const T> {
            match v {
                None => Ok(ptr::null()),
                Some(v) if v.len() == n => Ok(v.as_ptr()),
                Some(v) => Err(shape_error(
                    "forward_ex",
                    format!("{name} has {} values, expected {n}", v.len()),
                )),
            }
        }
        if self_attn && len_kv != len_q {
            return Err(shape_error(
                "forward_ex",
                format!("self-attention (xkv None) needs len_kv ({len_kv}) = len_q ({len_q})"),
            ));
        }
        Ok(sys::lora_attn_args {
            flags: if self.infer { sys::LORA_FWD_INFER as u32 } else { 0 },
            q_lens: ptr_of(self.q_lens, batch, "q_lens")?,
            kv_lens: ptr_of(self.kv_lens, batch, "kv_lens")?,
            q_pos: ptr_of(self.q_pos, batch * len_q, "q_pos")?,
            kv_pos: ptr_of(self.kv_pos, batch * len_kv, "kv_pos")?,
            q_seg: ptr_of(self.q_seg, batch * len_q, "q_seg")?,
            kv_seg: ptr_of(self.kv_seg, batch * len_kv, "kv_seg")?,
            ..Default::default()
        })
    }
}

/// A `lora_tape`: what one training forward keeps for its backward, so several forwards
/// of one adapter can be in flight. Freed on drop (also after its adapter is dropped).
pub struct Tape {
    h: *mut sys::lora_tape,
    saved: Saved,
}

// SAFETY: a tape is only read or written through &mut of it and of its adapter.
unsafe impl Send for Tape {}

impl Drop for Tape {
    fn drop(&mut self) {
        unsafe { sys::lora_tape_destroy(self.h) }
    }
}

impl fmt::Debug for Tape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tape").field("saved", &self.saved).finish()
    }
}

impl Tape {
    /// `lora_tape_create`: an empty tape for `ad`.
    pub fn new(ad: &Adapter) -> Result<Tape> {
        let mut h = ptr::null_mut();
        ad.check(unsafe { sys::lora_tape_create(&mut h, ad.h) }, "lora_tape_create")?;
        Ok(Tape { h, saved: Saved::None })
    }

    /// The raw handle, for calls into [`sys`]. It stays owned by this Tape.
    pub fn as_ptr(&self) -> *mut sys::lora_tape {
        self.h
    }
}

// ---- decoding with a KV cache ---------------------------------------------------------

/// Keys and values of `batch` sequences of up to `capacity` tokens for
/// [`Adapter::decode`] (`lora_kv_cache`, freed on drop). Shaped for the adapter it was
/// made with (kv heads, head_dim; with 0 < WINDOW < capacity a ring of WINDOW tokens).
pub struct KvCache {
    h: *mut sys::lora_kv_cache,
    batch: usize,
}

// SAFETY: a cache is only used through &mut of it (decode) or & (length).
unsafe impl Send for KvCache {}

impl Drop for KvCache {
    fn drop(&mut self) {
        unsafe { sys::lora_kv_cache_destroy(self.h) }
    }
}

impl KvCache {
    /// `lora_kv_cache_create`: every sequence empty.
    pub fn new(ad: &Adapter, batch: usize, capacity: usize) -> Result<KvCache> {
        let mut h = ptr::null_mut();
        let st = unsafe { sys::lora_kv_cache_create(&mut h, ad.h, batch as i64, capacity as i64) };
        match Status::from_code(st) {
            None => Ok(KvCache { h, batch }),
            Some(s) => Err(LoraError::new(
                s,
                "lora_kv_cache_create",
                format!("batch {batch}, capacity {capacity}"),
            )),
        }
    }

    /// Sequences of the cache.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// `lora_kv_cache_reset`: empties sequence `b`, or all with `None`.
    pub fn reset(&mut self, b: Option<usize>) -> Result<()> {
        let st = unsafe { sys::lora_kv_cache_reset(self.h, b.map_or(-1, |b| b as i64)) };
        match Status::from_code(st) {
            None => Ok(()),
            Some(s) => Err(LoraError::new(s, "lora_kv_cache_reset", format!("b = {b:?}"))),
        }
    }

    /// `lora_kv_cache_length`: tokens sequence `b` holds.
    pub fn length(&self, b: usize) -> Result<usize> {
        let mut n = 0i64;
        let st = unsafe { sys::lora_kv_cache_length(self.h, b as i64, &mut n) };
        match Status::from_code(st) {
            None => Ok(n as usize),
            Some(s) => Err(LoraError::new(s, "lora_kv_cache_length", format!("b = {b}"))),
        }
    }
}

impl Adapter {
    /// `lora_decode`: appends `n_new` tokens per sequence (x: batch x n_new x d_model)
    /// to `cache` and returns their outputs (batch x n_new x out_dim). Saves nothing
    /// for backward.
    pub fn decode(&mut self, cache: &mut KvCache, x: &[f32], n_new: usize) -> Result<Vec<f32>> {
        self.decode_ex(cache, x, n_new, None, None)
    }

    /// `lora_decode_ex`: `n_tokens[b]` tokens for sequence b (the rest of its rows are
    /// not read, their outputs 0); `tenants` with the tenant of each sequence (-1: the
    /// base alone) runs each sequence with its tenant's LoRA terms on this adapter's
    /// base.
    pub fn decode_ex(
        &mut self,
        cache: &mut KvCache,
        x: &[f32],
        n_new: usize,
        n_tokens: Option<&[i64]>,
        tenants: Option<(&[&Adapter], &[i32])>,
    ) -> Result<Vec<f32>> {
        let batch = cache.batch;
        self.input_len("x", x.len(), batch, n_new)?;
        if n_tokens.map_or(false, |n| n.len() != batch)
            || tenants.map_or(false, |(_, ids)| ids.len() != batch)
        {
            return Err(shape_error("lora_decode_ex", format!("per-sequence arrays need {batch} entries")));
        }
        let handles: Vec<*const sys::lora_adapter> =
            tenants.map_or(Vec::new(), |(t, _)| t.iter().map(|a| a.h as *const _).collect());
        let mut args = sys::lora_decode_args::default();
        if let Some(n) = n_tokens {
            args.n_tokens = n.as_ptr();
        }
        if let Some((_, ids)) = tenants {
            args.tenants = handles.as_ptr();
            args.n_tenants = handles.len();
            args.tenant_of_seq = ids.as_ptr();
        }
        let mut out = vec![0f32; batch * n_new * self.out_dim()];
        let st = unsafe {
            sys::lora_decode_ex(self.h, &args, cache.h, x.as_ptr(), n_new as i64, out.as_mut_ptr())
        };
        self.check(st, "lora_decode_ex")?;
        Ok(out)
    }
}

// ---- optimizer -------------------------------------------------------------------------

/// Which update rule an [`Optimizer`] applies (`lora_optimizer_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OptimizerKind {
    /// torch.optim.AdamW: decoupled weight decay, bias correction.
    AdamW,
    /// torch.optim.SGD: optional momentum, dampening, Nesterov, L2 weight decay.
    Sgd,
}

/// AdamW or SGD on the LoRA factors of adapters shaped like the one it was created
/// for, or of a set of adapters (a model: [`Optimizer::new_set`], clipping by the
/// global norm over the set). A `lora_optimizer` handle, freed on drop. Parameters are
/// the `LORA_OPT_*` codes in [`sys`]; the common ones have setters.
pub struct Optimizer {
    h: *mut sys::lora_optimizer,
    kind: OptimizerKind,
}

// SAFETY: as Adapter: one thread at a time, no global state.
unsafe impl Send for Optimizer {}

impl Drop for Optimizer {
    fn drop(&mut self) {
        unsafe { sys::lora_optimizer_destroy(self.h) }
    }
}

impl fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Optimizer")
            .field("kind", &self.kind)
            .finish()
    }
}

impl Optimizer {
    /// A new optimizer for adapters shaped like `ad`; state zero, step 0, PyTorch's
    /// defaults (AdamW: lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01).
    pub fn new(ad: &Adapter, kind: OptimizerKind) -> Result<Optimizer> {
        let code = match kind {
            OptimizerKind::AdamW => sys::LORA_OPTIMIZER_ADAMW,
            OptimizerKind::Sgd => sys::LORA_OPTIMIZER_SGD,
        };
        let mut h: *mut sys::lora_optimizer = ptr::null_mut();
        let st = unsafe { sys::lora_optimizer_create(&mut h, ad.h, code) };
        ad.check(st, "lora_optimizer_create")?;
        Ok(Optimizer { h, kind })
    }
    /// One optimizer over a set of adapters (`lora_optimizer_create_set`): one state,
    /// and `max_grad_norm` clips by the global norm over every factor of the set
    /// (PyTorch's `clip_grad_norm_(model.parameters())`). Step with [`Optimizer::step_set`].
    pub fn new_set(adapters: &[&Adapter], kind: OptimizerKind) -> Result<Optimizer> {
        let code = match kind {
            OptimizerKind::AdamW => sys::LORA_OPTIMIZER_ADAMW,
            OptimizerKind::Sgd => sys::LORA_OPTIMIZER_SGD,
        };
        let first = adapters.first().ok_or_else(|| {
            LoraError::new(
                Status::InvalidArg,
                "lora_optimizer_create_set",
                "the adapter set is empty",
            )
        })?;
        let hs: Vec<*const sys::lora_adapter> = adapters.iter().map(|a| a.h as *const _).collect();
        let mut h: *mut sys::lora_optimizer = ptr::null_mut();
        let st = unsafe { sys::lora_optimizer_create_set(&mut h, hs.as_ptr(), hs.len(), code) };
        first.check(st, "lora_optimizer_create_set")?;
        Ok(Optimizer { h, kind })
    }
    pub fn adamw(ad: &Adapter) -> Result<Optimizer> {
        Optimizer::new(ad, OptimizerKind::AdamW)
    }
    pub fn sgd(ad: &Adapter) -> Result<Optimizer> {
        Optimizer::new(ad, OptimizerKind::Sgd)
    }
    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    fn check(&self, st: c_int, function: &'static str) -> Result<()> {
        match Status::from_code(st) {
            None => Ok(()),
            Some(s) if takes_const_handle(function) => Err(LoraError::new(s, function, "")),
            Some(s) => Err(LoraError::new(s, function, self.last_error())),
        }
    }
    /// `lora_optimizer_last_error`.
    pub fn last_error(&self) -> String {
        cstr(unsafe { sys::lora_optimizer_last_error(self.h) })
    }
    pub fn set_double(&mut self, param: c_int, value: f64) -> Result<&mut Self> {
        self.check(
            unsafe { sys::lora_optimizer_set_double(self.h, param, value) },
            "lora_optimizer_set_double",
        )?;
        Ok(self)
    }
    pub fn set_int(&mut self, param: c_int, value: i64) -> Result<&mut Self> {
        self.check(
            unsafe { sys::lora_optimizer_set_int(self.h, param, value) },
            "lora_optimizer_set_int",
        )?;
        Ok(self)
    }
    pub fn get_double(&self, param: c_int) -> Result<f64> {
        let mut v = 0f64;
        self.check(
            unsafe { sys::lora_optimizer_get_double(self.h, param, &mut v) },
            "lora_optimizer_get_double",
        )?;
        Ok(v)
    }
    pub fn get_int(&self, param: c_int) -> Result<i64> {
        let mut v = 0i64;
        self.check(
            unsafe { sys::lora_optimizer_get_int(self.h, param, &mut v) },
            "lora_optimizer_get_int",
        )?;
        Ok(v)
    }
    pub fn lr(&mut self, lr: f64) -> Result<&mut Self> {
        self.set_double(sys::LORA_OPT_LR, lr)
    }
    pub fn betas(&mut self, beta1: f64, beta2: f64) -> Result<&mut Self> {
        self.set_double(sys::LORA_OPT_BETA1, beta1)?
            .set_double(sys::LORA_OPT_BETA2, beta2)
    }
    pub fn eps(&mut self, eps: f64) -> Result<&mut Self> {
        self.set_double(sys::LORA_OPT_EPS, eps)
    }
    pub fn weight_decay(&mut self, wd: f64) -> Result<&mut Self> {
        self.set_double(sys::LORA_OPT_WEIGHT_DECAY, wd)
    }
    pub fn momentum(&mut self, m: f64) -> Result<&mut Self> {
        self.set_double(sys::LORA_OPT_MOMENTUM, m)
    }
    pub fn max_grad_norm(&mut self, max: f64) -> Result<&mut Self> {
        self.set_double(sys::LORA_OPT_MAX_GRAD_NORM, max)
    }
    /// Steps taken since creation or reset.
    pub fn step_count(&self) -> Result<i64> {
        self.get_int(sys::LORA_OPT_STEP)
    }
    /// Global L2 norm of the gradients at the last step, before clipping (-1 before
    /// any step).
    pub fn grad_norm(&self) -> Result<f64> {
        self.get_double(sys::LORA_OPT_GRAD_NORM)
    }
    /// One update of every factor of `ad` from its accumulated gradients (left as they
    /// are: zero them before the next accumulation). Drops ad's saved forward.
    pub fn step(&mut self, ad: &mut Adapter) -> Result<()> {
        ad.saved = Saved::None;
        self.check(
            unsafe { sys::lora_optimizer_step(self.h, ad.h) },
            "lora_optimizer_step",
        )
    }
    /// One update of every factor of the set, in the order given at creation
    /// (`lora_optimizer_step_set`). Drops each adapter's saved forward.
    pub fn step_set(&mut self, adapters: &mut [&mut Adapter]) -> Result<()> {
        let mut hs = Vec::with_capacity(adapters.len());
        for ad in adapters.iter_mut() {
            ad.saved = Saved::None;
            hs.push(ad.h);
        }
        self.check(
            unsafe { sys::lora_optimizer_step_set(self.h, hs.as_ptr(), hs.len()) },
            "lora_optimizer_step_set",
        )
    }
    /// Zeroes the moments / momentum buffers and the step count.
    pub fn reset(&mut self) -> Result<()> {
        self.check(
            unsafe { sys::lora_optimizer_reset(self.h) },
            "lora_optimizer_reset",
        )
    }
}

// ---- adapter files ---------------------------------------------------------------------

fn c_path(p: &std::path::Path, function: &'static str) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| LoraError::new(Status::InvalidArg, function, "path contains a NUL byte"))
}

fn save_set(
    set: &[(i64, &Adapter)],
    function: &'static str,
    call: impl FnOnce(*const *mut sys::lora_adapter, *const i64, usize) -> c_int,
) -> Result<()> {
    let handles: Vec<*mut sys::lora_adapter> = set.iter().map(|(_, a)| a.h).collect();
    let layers: Vec<i64> = set.iter().map(|(l, _)| *l).collect();
    let st = call(handles.as_ptr(), layers.as_ptr(), set.len());
    match Status::from_code(st) {
        None => Ok(()),
        Some(s) => Err(LoraError::new(
            s,
            function,
            set.first().map(|(_, a)| a.last_error()).unwrap_or_default(),
        )),
    }
}

type LoadFn = unsafe extern "C" fn(
    *mut *mut sys::lora_adapter,
    *mut i64,
    usize,
    *mut usize,
    *const c_char,
    *mut sys::lora_config,
) -> c_int;

fn load_set(
    path: &std::path::Path,
    cfg: &Config,
    f: LoadFn,
    function: &'static str,
) -> Result<Vec<(i64, Adapter)>> {
    let p = c_path(path, function)?;
    let c = cfg.raw()?;
    let mut n = 0usize;
    c.check(
        unsafe { f(ptr::null_mut(), ptr::null_mut(), 0, &mut n, p.as_ptr(), c.0) },
        function,
    )?;
    let mut handles = vec![ptr::null_mut(); n.max(1)];
    let mut layers = vec![0i64; n.max(1)];
    let mut got = 0usize;
    c.check(
        unsafe {
            f(
                handles.as_mut_ptr(),
                layers.as_mut_ptr(),
                n,
                &mut got,
                p.as_ptr(),
                c.0,
            )
        },
        function,
    )?;
    let mut out = Vec::with_capacity(got);
    let mut err = None;
    for i in 0..got {
        // Every handle is owned from here on, also when an earlier one failed.
        match Adapter::from_handle(handles[i]) {
            Ok(ad) => out.push((layers[i], ad)),
            Err(e) => err = Some(e),
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Writes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
/// holding `(layer, adapter)` pairs; the adapters must share targets, rank and alpha.
pub fn save_peft(dir: impl AsRef<std::path::Path>, set: &[(i64, &Adapter)]) -> Result<()> {
    let p = c_path(dir.as_ref(), "lora_save_peft")?;
    save_set(set, "lora_save_peft", |a, l, n| unsafe {
        sys::lora_save_peft(p.as_ptr(), a, l, n)
    })
}

/// Reads a PEFT adapter directory: `(layer, adapter)` in increasing layer order. `cfg`
/// supplies what the file does not (d_model, heads, out_proj, backend, ...); rank,
/// alpha, rsLoRA and targets come from the file. Base weights are unset.
pub fn load_peft(dir: impl AsRef<std::path::Path>, cfg: &Config) -> Result<Vec<(i64, Adapter)>> {
    load_set(dir.as_ref(), cfg, sys::lora_load_peft, "lora_load_peft")
}

/// Writes a llama.cpp GGUF LoRA adapter; `architecture` None is "llama".
pub fn save_gguf(
    path: impl AsRef<std::path::Path>,
    set: &[(i64, &Adapter)],
    architecture: Option<&str>,
) -> Result<()> {
    let p = c_path(path.as_ref(), "lora_save_gguf")?;
    let arch = architecture
        .map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| LoraError::new(Status::InvalidArg, "lora_save_gguf", "NUL in architecture"))?;
    let ap = arch.as_ref().map_or(ptr::null(), |a| a.as_ptr());
    save_set(set, "lora_save_gguf", |a, l, n| unsafe {
        sys::lora_save_gguf(p.as_ptr(), a, l, n, ap)
    })
}

/// Options of [`save_peft_with`] and [`save_gguf_with`] (`lora_save_options`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveOptions<'a> {
    /// The model the adapter applies to (a Hugging Face id or a path): PEFT's
    /// `base_model_name_or_path`, GGUF's `general.base_model.*`.
    pub base_model_name_or_path: Option<&'a str>,
    /// GGUF `general.architecture` (None is "llama"); it decides the Q/K row order.
    /// PEFT ignores it.
    pub architecture: Option<&'a str>,
}

fn c_option(s: Option<&str>, function: &'static str) -> Result<Option<std::ffi::CString>> {
    s.map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| LoraError::new(Status::InvalidArg, function, "NUL in a save option"))
}

fn save_with(
    path: &std::path::Path,
    set: &[(i64, &Adapter)],
    options: &SaveOptions,
    function: &'static str,
    call: unsafe extern "C" fn(
        *const c_char,
        *const *mut sys::lora_adapter,
        *const i64,
        usize,
        *const sys::lora_save_options,
    ) -> c_int,
) -> Result<()> {
    let p = c_path(path, function)?;
    let base = c_option(options.base_model_name_or_path, function)?;
    let arch = c_option(options.architecture, function)?;
    let o = sys::lora_save_options {
        struct_size: std::mem::size_of::<sys::lora_save_options>() as u32,
        base_model_name_or_path: base.as_ref().map_or(ptr::null(), |b| b.as_ptr()),
        architecture: arch.as_ref().map_or(ptr::null(), |a| a.as_ptr()),
    };
    save_set(set, function, |a, l, n| unsafe { call(p.as_ptr(), a, l, n, &o) })
}

/// [`save_peft`] with options (`lora_save_peft_ex`).
pub fn save_peft_with(
    dir: impl AsRef<std::path::Path>,
    set: &[(i64, &Adapter)],
    options: &SaveOptions,
) -> Result<()> {
    save_with(dir.as_ref(), set, options, "lora_save_peft_ex", sys::lora_save_peft_ex)
}

/// [`save_gguf`] with options (`lora_save_gguf_ex`).
pub fn save_gguf_with(
    path: impl AsRef<std::path::Path>,
    set: &[(i64, &Adapter)],
    options: &SaveOptions,
) -> Result<()> {
    save_with(path.as_ref(), set, options, "lora_save_gguf_ex", sys::lora_save_gguf_ex)
}

/// Reads a llama.cpp GGUF LoRA adapter (see [`load_peft`]).
pub fn load_gguf(path: impl AsRef<std::path::Path>, cfg: &Config) -> Result<Vec<(i64, Adapter)>> {
    load_set(path.as_ref(), cfg, sys::lora_load_gguf, "lora_load_gguf")
}
