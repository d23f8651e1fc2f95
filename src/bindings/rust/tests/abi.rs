//! The hand-written declarations in `lora::sys` against the C header and library.
use lora::sys;
use std::mem::size_of;
use std::process::Command;

/// Sizes, offsets and constants as a C compiler sees lora.h: compiles and runs a probe
/// program with $CC (default `cc`). Skipped with a message when no compiler or header.
#[test]
fn layouts_and_constants_match_c_compiler() {
    let inc = env!("LORA_INCLUDE_DIR");
    if inc.is_empty() {
        eprintln!("skipped: lora.h not found next to the crate");
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = std::env::temp_dir().join(format!("lora-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("probe.c");
    let exe = dir.join("probe");
    let mut c = String::from("#include <stdio.h>\n#include <stddef.h>\n#include <lora.h>\n");
    c.push_str("#define S(t) printf(#t \" %zu\\n\", sizeof(t));\n");
    c.push_str("#define O(t, f) printf(#t \".\" #f \" %zu\\n\", offsetof(t, f));\n");
    c.push_str("#define V(n) printf(#n \" %ld\\n\", (long)(n));\nint main(void){\n");
    c.push_str("S(lora_run_info) S(lora_threshold_report) S(lora_allocator)\n");
    c.push_str("S(lora_attn_args)\n");
    for f in attn_args_fields() {
        c.push_str(&format!("O(lora_attn_args, {})\n", f.0));
    }
    c.push_str("S(lora_decode_args)\n");
    for f in decode_args_fields() {
        c.push_str(&format!("O(lora_decode_args, {})\n", f.0));
    }
    c.push_str("S(lora_save_options)\n");
    for f in save_options_fields() {
        c.push_str(&format!("O(lora_save_options, {})\n", f.0));
    }
    for f in run_info_fields() {
        c.push_str(&format!("O(lora_run_info, {})\n", f.0));
    }
    for f in report_fields() {
        c.push_str(&format!("O(lora_threshold_report, {})\n", f.0));
    }
    for f in allocator_fields() {
        c.push_str(&format!("O(lora_allocator, {})\n", f.0));
    }
    for (n, _) in constants() {
        c.push_str(&format!("V({n})\n"));
    }
    c.push_str("return 0;}\n");
    std::fs::write(&src, c).unwrap();
    let status = Command::new(&cc)
        .args(["-std=c99", "-I", inc, "-o"])
        .arg(&exe)
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("skipped: {cc} could not compile the probe ({other:?})");
            return;
        }
    }
    let out = String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let c_val = |key: &str| -> i64 {
        out.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{key} missing from the probe's output"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        c_val("lora_run_info") as usize,
        size_of::<sys::lora_run_info>()
    );
    assert_eq!(
        c_val("lora_threshold_report") as usize,
        size_of::<sys::lora_threshold_report>()
    );
    for (f, rust_off) in run_info_fields() {
        assert_eq!(
            c_val(&format!("lora_run_info.{f}")) as usize,
            rust_off,
            "lora_run_info.{f}"
        );
    }
    for (f, rust_off) in report_fields() {
        assert_eq!(
            c_val(&format!("lora_threshold_report.{f}")) as usize,
            rust_off,
            "lora_threshold_report.{f}"
        );
    }
    assert_eq!(
        c_val("lora_allocator") as usize,
        size_of::<sys::lora_allocator>()
    );
    for (f, rust_off) in allocator_fields() {
        assert_eq!(
            c_val(&format!("lora_allocator.{f}")) as usize,
            rust_off,
            "lora_allocator.{f}"
        );
    }
    assert_eq!(
        c_val("lora_attn_args") as usize,
        size_of::<sys::lora_attn_args>()
    );
    for (f, rust_off) in attn_args_fields() {
        assert_eq!(
            c_val(&format!("lora_attn_args.{f}")) as usize,
            rust_off,
            "lora_attn_args.{f}"
        );
    }
    assert_eq!(
        c_val("lora_decode_args") as usize,
        size_of::<sys::lora_decode_args>()
    );
    for (f, rust_off) in decode_args_fields() {
        assert_eq!(
            c_val(&format!("lora_decode_args.{f}")) as usize,
            rust_off,
            "lora_decode_args.{f}"
        );
    }
    assert_eq!(
        c_val("lora_save_options") as usize,
        size_of::<sys::lora_save_options>()
    );
    for (f, rust_off) in save_options_fields() {
        assert_eq!(
            c_val(&format!("lora_save_options.{f}")) as usize,
            rust_off,
            "lora_save_options.{f}"
        );
    }
    let n = constants().len();
    for (name, v) in constants() {
        assert_eq!(c_val(name), v, "{name}");
    }
    println!(
        "abi: 7 struct sizes, {} offsets, {n} constants match the C compiler",
        run_info_fields().len()
            + report_fields().len()
            + allocator_fields().len()
            + attn_args_fields().len()
            + decode_args_fields().len()
            + save_options_fields().len()
    );
}

/// Byte offset of a field (`std::mem::offset_of!` needs Rust 1.77; Debian 12 has 1.63).
macro_rules! offset_of {
    ($t:ty, $f:ident) => {{
        let u = std::mem::MaybeUninit::<$t>::uninit();
        let base = u.as_ptr();
        // SAFETY: addr_of! takes the field's address without reading the value.
        let field = unsafe { std::ptr::addr_of!((*base).$f) };
        field as usize - base as usize
    }};
}

/// (name, Rust offset) of each listed field of a `sys` struct.
macro_rules! fields {
    ($t:ty: $($f:ident),* $(,)?) => { vec![$((stringify!($f), offset_of!($t, $f))),*] };
}

fn run_info_fields() -> Vec<(&'static str, usize)> {
    fields!(sys::lora_run_info: struct_size, backend, poly_degree, poly_rank, error_bound,
            grad_bound, score_bound, measured_out_error, measured_dq_error, poly_groups,
            loss_grad_bound, attention_compute)
}

fn report_fields() -> Vec<(&'static str, usize)> {
    fields!(sys::lora_threshold_report: struct_size, recommended_backend, gamma_q, gamma_k,
            gamma_v, gamma_ratio, score_bound, poly_degree, poly_rank, error_bound,
            flops_exact, flops_poly, poly_groups)
}

fn attn_args_fields() -> Vec<(&'static str, usize)> {
    fields!(sys::lora_attn_args: struct_size, flags, q_lens, kv_lens, q_pos, kv_pos, q_seg,
            kv_seg, tape)
}

fn decode_args_fields() -> Vec<(&'static str, usize)> {
    fields!(sys::lora_decode_args: struct_size, flags, n_tokens, tenants, n_tenants,
            tenant_of_seq)
}

fn save_options_fields() -> Vec<(&'static str, usize)> {
    fields!(sys::lora_save_options: struct_size, base_model_name_or_path, architecture)
}

fn allocator_fields() -> Vec<(&'static str, usize)> {
    fields!(sys::lora_allocator: alloc, free, user_data)
}

fn constants() -> Vec<(&'static str, i64)> {
    macro_rules! c {
        ($($n:ident),* $(,)?) => { vec![$((stringify!($n), sys::$n as i64)),*] };
    }
    c![
        LORA_VERSION_MAJOR,
        LORA_VERSION_MINOR,
        LORA_VERSION_PATCH,
        LORA_VERSION_NUMBER,
        LORA_OK,
        LORA_ERR_INVALID_ARG,
        LORA_ERR_SHAPE,
        LORA_ERR_NOMEM,
        LORA_ERR_NONFINITE,
        LORA_ERR_UNSUPPORTED,
        LORA_ERR_STATE,
        LORA_ERR_IO,
        LORA_ERR_FORMAT,
        LORA_ERR_TOLERANCE,
        LORA_CFG_D_MODEL,
        LORA_CFG_N_HEADS,
        LORA_CFG_N_KV_HEADS,
        LORA_CFG_HEAD_DIM,
        LORA_CFG_TARGETS,
        LORA_CFG_RANK,
        LORA_CFG_ALPHA,
        LORA_CFG_RSLORA,
        LORA_CFG_SOFTMAX_SCALE,
        LORA_CFG_CAUSAL,
        LORA_CFG_BACKEND,
        LORA_CFG_TOLERANCE,
        LORA_CFG_POLY_DEGREE,
        LORA_CFG_THREADS,
        LORA_CFG_SEED,
        LORA_CFG_INIT,
        LORA_CFG_OUT_PROJ,
        LORA_CFG_MEASURE_ROWS,
        LORA_CFG_ROPE,
        LORA_CFG_ROPE_THETA,
        LORA_CFG_ROPE_DIM,
        LORA_CFG_WINDOW,
        LORA_CFG_SOFTCAP,
        LORA_CFG_DROPOUT,
        LORA_CFG_COMPUTE,
        LORA_TARGET_Q,
        LORA_TARGET_K,
        LORA_TARGET_V,
        LORA_TARGET_O,
        LORA_BACKEND_AUTO,
        LORA_BACKEND_EXACT,
        LORA_BACKEND_POLY,
        LORA_ROPE_NONE,
        LORA_ROPE_HALF,
        LORA_ROPE_INTERLEAVED,
        LORA_COMPUTE_F32,
        LORA_COMPUTE_BF16,
        LORA_DTYPE_F32,
        LORA_DTYPE_BF16,
        LORA_DTYPE_F16,
        LORA_INIT_KAIMING_ZERO,
        LORA_INIT_GAUSSIAN,
        LORA_INIT_ZERO,
        LORA_A,
        LORA_B,
        LORA_FWD_INFER,
        LORA_OPTIMIZER_ADAMW,
        LORA_OPTIMIZER_SGD,
        LORA_OPT_LR,
        LORA_OPT_BETA1,
        LORA_OPT_BETA2,
        LORA_OPT_EPS,
        LORA_OPT_WEIGHT_DECAY,
        LORA_OPT_MOMENTUM,
        LORA_OPT_DAMPENING,
        LORA_OPT_NESTEROV,
        LORA_OPT_MAX_GRAD_NORM,
        LORA_OPT_STEP,
        LORA_OPT_GRAD_NORM,
    ]
}

/// Every enumerator and version macro of lora.h, read from the header text: the
/// hand-written `sys` constants must cover them all (the test above checks the values).
#[test]
fn constants_cover_every_header_enumerator() {
    let inc = env!("LORA_INCLUDE_DIR");
    if inc.is_empty() {
        eprintln!("skipped: lora.h not found next to the crate");
        return;
    }
    let text = std::fs::read_to_string(std::path::Path::new(inc).join("lora.h")).unwrap();
    let code = strip_comments(&text);
    let mut names = Vec::new();
    for body in enum_bodies(&code) {
        for item in body.split(',') {
            let name = item.split('=').next().unwrap().trim();
            if !name.is_empty() {
                names.push(name.to_string());
            }
        }
    }
    for line in code.lines() {
        let mut w = line.split_whitespace();
        if let (Some("#define"), Some(n)) = (w.next(), w.next()) {
            if n.starts_with("LORA_VERSION_") {
                names.push(n.to_string());
            }
        }
    }
    assert!(names.len() > 40, "parsed only {} names from lora.h", names.len());
    let have: Vec<&str> = constants().iter().map(|c| c.0).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !have.contains(&n.as_str())).collect();
    assert!(missing.is_empty(), "lora.h names missing from sys / constants(): {missing:?}");
    println!("abi: the {} enumerators and version macros of lora.h are bound", names.len());
}

fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = &rest[i + 2..];
        rest = &rest[rest.find("*/").map_or(rest.len(), |j| j + 2)..];
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text between the braces of every `typedef enum ... { ... }`.
fn enum_bodies(code: &str) -> Vec<&str> {
    let mut bodies = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("typedef enum") {
        rest = &rest[i..];
        let open = rest.find('{').unwrap();
        let close = rest.find('}').unwrap();
        bodies.push(&rest[open + 1..close]);
        rest = &rest[close..];
    }
    bodies
}

/// The library itself: it writes back min(struct_size, its sizeof), so a large
/// struct_size reads the library's size; sentinel values check a few offsets.
#[test]
fn library_agrees_on_struct_sizes() {
    let ad = lora::Config::new(4).build().unwrap();
    #[repr(C)]
    struct Big {
        info: sys::lora_run_info,
        pad: [u8; 256],
    }
    let mut big = Big {
        info: sys::lora_run_info::default(),
        pad: [0xAB; 256],
    };
    big.info.struct_size = size_of::<Big>() as u32;
    big.info.backend = 77;
    big.info.measured_out_error = 5.0;
    let st = unsafe { sys::lora_adapter_get_run_info(ad.as_ptr(), &mut big.info) };
    assert_eq!(st, sys::LORA_OK);
    assert_eq!(
        big.info.struct_size as usize,
        size_of::<sys::lora_run_info>()
    );
    assert_eq!(big.info.backend, 0); // no forward yet
    assert_eq!(big.info.measured_out_error, -1.0);
    assert_eq!(big.info.measured_dq_error, -1.0);
    assert!(big.pad.iter().all(|&b| b == 0xAB));
    // A struct_size below the first version is refused.
    let mut small = sys::lora_run_info {
        struct_size: 8,
        ..Default::default()
    };
    let st = unsafe { sys::lora_adapter_get_run_info(ad.as_ptr(), &mut small) };
    assert_eq!(st, sys::LORA_ERR_INVALID_ARG);
}

#[test]
fn library_agrees_on_report_size() {
    let mut ad = lora::Config::new(4).build().unwrap();
    let w = vec![0.1f32; 16];
    for t in [lora::Target::Q, lora::Target::K, lora::Target::V] {
        ad.set_base(t, &w, None).unwrap();
    }
    #[repr(C)]
    struct Big {
        rep: sys::lora_threshold_report,
        pad: [u8; 256],
    }
    let mut big = Big {
        rep: sys::lora_threshold_report::default(),
        pad: [0xCD; 256],
    };
    big.rep.struct_size = size_of::<Big>() as u32;
    let x = [0.5f32; 3 * 4];
    let st = unsafe { sys::lora_threshold_estimate(ad.as_ptr(), x.as_ptr(), 1, 3, &mut big.rep) };
    assert_eq!(st, sys::LORA_OK);
    assert_eq!(
        big.rep.struct_size as usize,
        size_of::<sys::lora_threshold_report>()
    );
    assert!(big.rep.flops_exact > 0.0 && big.rep.gamma_q > 0.0);
    assert!(big.pad.iter().all(|&b| b == 0xCD));
}

#[test]
fn version_matches_header() {
    assert_eq!(lora::version_number() / 10000, sys::LORA_VERSION_MAJOR);
    assert!(lora::version_number() >= sys::LORA_VERSION_NUMBER);
    let v = lora::version_string();
    let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(
        parts[0] * 10000 + parts[1] * 100 + parts[2],
        lora::version_number()
    );
}

/// Every `LORA_API` function of lora.h, read from the header text, has an `extern "C"`
/// declaration in `sys` (so a new C function without a binding fails here).
#[test]
fn sys_declares_every_header_function() {
    let inc = env!("LORA_INCLUDE_DIR");
    if inc.is_empty() {
        eprintln!("skipped: lora.h not found next to the crate");
        return;
    }
    let text = std::fs::read_to_string(std::path::Path::new(inc).join("lora.h")).unwrap();
    let code = strip_comments(&text);
    let sys_src = include_str!("../src/sys.rs");
    let mut names = Vec::new();
    for decl in code.split("LORA_API").skip(1) {
        let head = decl.split('(').next().unwrap();
        if head.contains(';') || head.contains('#') || head.len() == decl.len() {
            continue; // the macro's own definition, not a declaration
        }
        let words = head.split(|c: char| !(c.is_alphanumeric() || c == '_'));
        let name = words.filter(|w| !w.is_empty()).last().unwrap_or("");
        if name.starts_with("lora_") {
            names.push(name.to_string());
        }
    }
    assert!(names.len() > 60, "parsed only {} functions from lora.h", names.len());
    let missing: Vec<_> =
        names.iter().filter(|n| !sys_src.contains(&format!("pub fn {n}("))).collect();
    assert!(missing.is_empty(), "lora.h functions not declared in sys: {missing:?}");
}
