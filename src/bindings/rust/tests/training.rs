//! Optimizer, flat vectors, merge, borrowed bases and hot swap through the safe API.
use lora::{Config, Factor, Optimizer, Status, Target};
use std::sync::Arc;

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

fn layer(seed: u64) -> (lora::Adapter, Vec<Vec<f32>>) {
    let mut ad = Config::new(8)
        .n_heads(2)
        .rank(2)
        .threads(1)
        .build()
        .unwrap();
    let mut bases = Vec::new();
    for (i, t) in [Target::Q, Target::K, Target::V].into_iter().enumerate() {
        let w = rnd(64, seed + i as u64, 0.5);
        ad.set_base(t, &w, None).unwrap();
        bases.push(w);
    }
    let n = ad.param_count().unwrap();
    ad.set_params_flat(&rnd(n, seed + 10, 0.3)).unwrap();
    (ad, bases)
}

#[test]
fn flat_vectors() {
    let (mut ad, _) = layer(1);
    let n = ad.param_count().unwrap();
    assert_eq!(n, 2 * (16 + 16));
    let flat = ad.params_flat().unwrap();
    let mut expect = ad.param(Target::Q, Factor::A).unwrap();
    expect.extend(ad.param(Target::Q, Factor::B).unwrap());
    expect.extend(ad.param(Target::V, Factor::A).unwrap());
    expect.extend(ad.param(Target::V, Factor::B).unwrap());
    assert_eq!(flat, expect);
    let g = rnd(n, 5, 1.0);
    ad.set_grads_flat(&g).unwrap();
    assert_eq!(ad.grads_flat().unwrap(), g);
    assert_eq!(
        ad.set_params_flat(&g[1..]).unwrap_err().status,
        Status::InvalidArg
    );
}

#[test]
fn adamw_follows_pytorch_rule() {
    let (mut ad, _) = layer(2);
    let p0: Vec<f64> = ad
        .params_flat()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let n = p0.len();
    let mut opt = Optimizer::adamw(&ad).unwrap();
    opt.lr(0.01)
        .unwrap()
        .betas(0.8, 0.99)
        .unwrap()
        .eps(1e-6)
        .unwrap()
        .weight_decay(0.1)
        .unwrap();
    assert_eq!(opt.step_count().unwrap(), 0);
    assert_eq!(opt.grad_norm().unwrap(), -1.0);
    let (lr, b1, b2, eps, wd) = (0.01, 0.8, 0.99, 1e-6, 0.1);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0f64; n], vec![0f64; n]);
    for t in 1..=5 {
        let g = rnd(n, 100 + t as u64, 1.0);
        ad.set_grads_flat(&g).unwrap();
        opt.step(&mut ad).unwrap();
        for i in 0..n {
            let gi = g[i] as f64;
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let mhat = m[i] / (1.0 - f64::powi(b1, t));
            let vhat = v[i] / (1.0 - f64::powi(b2, t));
            p[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
    }
    assert_eq!(opt.step_count().unwrap(), 5);
    let got = ad.params_flat().unwrap();
    for i in 0..n {
        assert!(
            (got[i] as f64 - p[i]).abs() <= 1e-6 + 1e-5 * p[i].abs(),
            "{i}: {} {}",
            got[i],
            p[i]
        );
    }
    opt.reset().unwrap();
    assert_eq!(opt.step_count().unwrap(), 0);
}

#[test]
fn sgd_with_momentum_and_errors() {
    let (mut ad, _) = layer(3);
    let p0 = ad.params_flat().unwrap();
    let n = p0.len();
    let mut opt = Optimizer::sgd(&ad).unwrap();
    opt.lr(0.1).unwrap().momentum(0.9).unwrap();
    let g1 = rnd(n, 7, 1.0);
    let g2 = rnd(n, 8, 1.0);
    ad.set_grads_flat(&g1).unwrap();
    opt.step(&mut ad).unwrap();
    ad.set_grads_flat(&g2).unwrap();
    opt.step(&mut ad).unwrap();
    let got = ad.params_flat().unwrap();
    for i in 0..n {
        let buf2 = 0.9 * g1[i] as f64 + g2[i] as f64;
        let want = p0[i] as f64 - 0.1 * g1[i] as f64 - 0.1 * buf2;
        assert!((got[i] as f64 - want).abs() <= 1e-6, "{i}");
    }
    let e = opt.set_double(lora::sys::LORA_OPT_BETA1, 0.9).unwrap_err();
    assert_eq!(
        (e.status, e.function),
        (Status::InvalidArg, "lora_optimizer_set_double")
    );
    assert!(!e.message.is_empty());
    assert_eq!(opt.lr(-1.0).unwrap_err().status, Status::InvalidArg);
    let mut other = Config::new(8).rank(3).build().unwrap();
    assert_eq!(opt.step(&mut other).unwrap_err().status, Status::InvalidArg);
}

#[test]
fn training_loop_with_adamw() {
    let (mut teacher, bases) = layer(4);
    let x = rnd(4 * 6 * 8, 9, 1.0);
    let target = teacher.forward(&x, 4, 6).unwrap();
    let mut student = Config::new(8)
        .n_heads(2)
        .rank(2)
        .threads(1)
        .seed(3)
        .build()
        .unwrap();
    for (t, w) in [Target::Q, Target::K, Target::V].into_iter().zip(&bases) {
        student.set_base(t, w, None).unwrap();
    }
    let mut opt = Optimizer::adamw(&student).unwrap();
    opt.lr(0.02).unwrap().weight_decay(0.0).unwrap();
    let mut losses = Vec::new();
    for _ in 0..60 {
        student.zero_grad().unwrap();
        let out = student.forward(&x, 4, 6).unwrap();
        let (loss, dout) = lora::mse_loss(&out, &target).unwrap();
        student.backward(&dout, None).unwrap();
        opt.step(&mut student).unwrap();
        losses.push(loss);
    }
    assert!(losses[59] < 0.1 * losses[0], "{:?}", losses);
}

#[test]
fn merge_unmerge_and_forward_merged() {
    let (mut ad, bases) = layer(5);
    let mut w = bases[0].clone();
    ad.merge(Target::Q, &mut w).unwrap();
    let (a, b) = (
        ad.param(Target::Q, Factor::A).unwrap(),
        ad.param(Target::Q, Factor::B).unwrap(),
    );
    for o in 0..8 {
        for i in 0..8 {
            let ba: f64 = (0..2)
                .map(|k| b[o * 2 + k] as f64 * a[k * 8 + i] as f64)
                .sum();
            let want = bases[0][o * 8 + i] as f64 + ba; // s = alpha/r = 1
            assert!((w[o * 8 + i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()));
        }
    }
    ad.unmerge(Target::Q, &mut w).unwrap();
    for (x, y) in w.iter().zip(&bases[0]) {
        assert!((x - y).abs() <= 2.0 * f32::EPSILON * (1.0 + y.abs()));
    }
    let mut bad = bases[0].clone();
    bad[3] = f32::NAN;
    assert_eq!(
        ad.merge(Target::Q, &mut bad).unwrap_err().status,
        Status::NonFinite
    );
    assert_eq!(
        ad.merge(Target::K, &mut w).unwrap_err().status,
        Status::InvalidArg
    ); // not adapted
    let x = rnd(2 * 5 * 8, 6, 1.0);
    let out = ad.forward(&x, 2, 5).unwrap();
    let merged = ad.forward_merged(&x, 2, 5).unwrap();
    for (p, q) in out.iter().zip(&merged) {
        assert!((p - q).abs() <= 1e-5);
    }
    ad.backward(&out, None).unwrap(); // forward_merged left the saved forward alone
    let xkv = rnd(2 * 7 * 8, 7, 1.0);
    let c1 = ad.forward_cross(&x, &xkv, 2, 5, 7).unwrap();
    let c2 = ad.forward_merged_cross(&x, &xkv, 2, 5, 7).unwrap();
    assert!(c1.iter().zip(&c2).all(|(p, q)| (p - q).abs() <= 1e-5));
}

#[test]
fn borrowed_shared_base_and_hot_swap() {
    let (mut owner, bases) = layer(6);
    let x = rnd(5 * 8, 11, 1.0);
    let want = owner.forward(&x, 1, 5).unwrap();
    let shared: Vec<Arc<[f32]>> = bases.iter().map(|w| Arc::from(w.as_slice())).collect();
    let mut tenants: Vec<lora::Adapter> = (0..3)
        .map(|_| {
            Config::new(8)
                .n_heads(2)
                .rank(2)
                .threads(1)
                .build()
                .unwrap()
        })
        .collect();
    for ad in &mut tenants {
        for (t, w) in [Target::Q, Target::K, Target::V].into_iter().zip(&shared) {
            ad.set_base_borrowed(t, Arc::clone(w), None).unwrap();
        }
    }
    assert_eq!(Arc::strong_count(&shared[0]), 4);
    drop(shared); // the adapters keep the buffers alive
    for ad in &mut tenants {
        ad.copy_params_from(&owner).unwrap();
        let got = ad.forward(&x, 1, 5).unwrap();
        assert!(got.iter().zip(&want).all(|(p, q)| (p - q).abs() <= 1e-6));
    }
    // tenants run on other threads (Send), each with its own adapter
    let handles: Vec<_> = tenants
        .into_iter()
        .map(|mut ad| {
            let x = x.clone();
            std::thread::spawn(move || ad.forward(&x, 1, 5).unwrap())
        })
        .collect();
    for h in handles {
        let got = h.join().unwrap();
        assert!(got.iter().zip(&want).all(|(p, q)| (p - q).abs() <= 1e-6));
    }
    let other = Config::new(8).rank(3).build().unwrap();
    assert_eq!(
        owner.copy_params_from(&other).unwrap_err().status,
        Status::InvalidArg
    );
    let e = owner
        .set_base_borrowed(Target::Q, Arc::from(vec![0f32; 3]), None)
        .unwrap_err();
    assert_eq!(e.status, Status::Shape);
}

#[test]
fn peft_and_gguf_roundtrip() {
    let dir = std::env::temp_dir().join(format!("lora-rs-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, _) = layer(20);
    let (b, _) = layer(21);
    let set = [(4i64, &a), (1i64, &b)];
    lora::save_peft(dir.join("peft"), &set).unwrap();
    let cfg = Config::new(8).n_heads(2);
    let loaded = lora::load_peft(dir.join("peft"), &cfg).unwrap();
    assert_eq!(
        loaded.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        vec![1, 4]
    );
    assert_eq!(loaded[0].1.params_flat().unwrap(), b.params_flat().unwrap());
    assert_eq!(loaded[1].1.params_flat().unwrap(), a.params_flat().unwrap());
    lora::save_gguf(dir.join("a.gguf"), &set, None).unwrap();
    let g = lora::load_gguf(dir.join("a.gguf"), &cfg).unwrap();
    assert_eq!(g[1].1.params_flat().unwrap(), a.params_flat().unwrap());
    let e = lora::load_peft(dir.join("missing"), &cfg).unwrap_err();
    assert_eq!((e.status, e.function), (Status::Io, "lora_load_peft"));
    assert!(!e.message.is_empty());
    std::fs::write(dir.join("bad.gguf"), b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert_eq!(
        lora::load_gguf(dir.join("bad.gguf"), &cfg)
            .unwrap_err()
            .status,
        Status::Format
    );
    let e = lora::save_peft(dir.join("dup"), &[(1, &a), (1, &b)]).unwrap_err();
    assert_eq!(e.status, Status::InvalidArg);
    // Save options: base_model_name_or_path lands in adapter_config.json.
    let opts = lora::SaveOptions {
        base_model_name_or_path: Some("org/base-model"),
        architecture: None,
    };
    lora::save_peft_with(dir.join("with-base"), &set, &opts).unwrap();
    let json = std::fs::read_to_string(dir.join("with-base/adapter_config.json")).unwrap();
    assert!(json.contains("\"org/base-model\""), "{json}");
    lora::save_gguf_with(dir.join("b.gguf"), &set, &opts).unwrap();
    let gguf = std::fs::read(dir.join("b.gguf")).unwrap();
    let url = b"https://huggingface.co/org/base-model";
    assert!(gguf.windows(url.len()).any(|w| w == url));
    let bad = lora::SaveOptions {
        base_model_name_or_path: Some("tab\there"),
        architecture: None,
    };
    let e = lora::save_gguf_with(dir.join("c.gguf"), &set, &bad).unwrap_err();
    assert_eq!((e.status, e.function), (Status::InvalidArg, "lora_save_gguf_ex"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// One optimizer over two adapters: SGD with the global-norm clip moves both by
/// lr * g * min(1, max / |g|) with |g| the norm of both gradients together.
#[test]
fn set_optimizer_clips_by_global_norm() {
    let (mut a, _) = layer(30);
    let (mut b, _) = layer(40);
    let n = a.param_count().unwrap();
    let ga = rnd(n, 31, 1.0);
    let gb = rnd(n, 41, 3.0);
    a.set_grads_flat(&ga).unwrap();
    b.set_grads_flat(&gb).unwrap();
    let (pa, pb) = (a.params_flat().unwrap(), b.params_flat().unwrap());
    let mut opt = Optimizer::new_set(&[&a, &b], lora::OptimizerKind::Sgd).unwrap();
    opt.lr(0.1).unwrap().max_grad_norm(1.0).unwrap();
    opt.step_set(&mut [&mut a, &mut b]).unwrap();
    let norm: f64 = ga
        .iter()
        .chain(gb.iter())
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    assert!((opt.grad_norm().unwrap() - norm).abs() <= 1e-12 * norm);
    let coef = 1.0 / (norm + 1e-6);
    for (p, p0, g) in [
        (a.params_flat().unwrap(), pa, ga),
        (b.params_flat().unwrap(), pb, gb),
    ] {
        for i in 0..n {
            let want = p0[i] as f64 - 0.1 * coef * g[i] as f64;
            assert!((p[i] as f64 - want).abs() <= 1e-6, "{} vs {}", p[i], want);
        }
    }
    // The set's size and order are checked; the one-adapter step refuses a set.
    let e = opt.step_set(&mut [&mut a]).unwrap_err();
    assert_eq!(e.status, Status::InvalidArg);
    assert!(e.message.contains("made for 2"), "{}", e.message);
    assert_eq!(opt.step(&mut a).unwrap_err().status, Status::InvalidArg);
    assert!(Optimizer::new_set(&[], lora::OptimizerKind::AdamW).is_err());
    assert_eq!(opt.step_count().unwrap(), 1);
}

#[test]
fn mse_loss_mean_is_torch_mseloss() {
    let (loss, dout) = lora::mse_loss_mean(&[1.0, 2.0, 3.0, 4.0], &[0.0, 2.0, 1.0, 8.0]).unwrap();
    assert!((loss - 21.0 / 4.0).abs() < 1e-12);
    assert_eq!(dout, vec![0.5, 0.0, 1.0, -2.0]);
    assert_eq!(
        lora::mse_loss_mean(&[1.0], &[f32::NAN]).unwrap_err().status,
        Status::NonFinite
    );
}
