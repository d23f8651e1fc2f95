//! The safe wrapper: behaviour, errors and a finite-difference gradient check.
use lora::{Backend, Config, Factor, LoraError, Status, Target};

/// Deterministic pseudo-random values in [-scale, scale].
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

fn layer(cfg: Config) -> lora::Adapter {
    let mut ad = cfg.threads(1).backend(Backend::Exact).build().unwrap();
    let mut seed = 1;
    for t in Target::ALL {
        if t == Target::O && ad.config_int(lora::sys::LORA_CFG_OUT_PROJ).unwrap() == 0 {
            continue;
        }
        let (o, i) = ad.base_shape(t);
        ad.set_base(t, &rnd(o * i, seed, 0.5), Some(&rnd(o, seed + 100, 0.1)))
            .unwrap();
        seed += 1;
    }
    for t in ad.targets().to_vec() {
        for f in [Factor::A, Factor::B] {
            let (r, c) = ad.param_shape(t, f).unwrap();
            ad.set_param(t, f, &rnd(r * c, seed, 0.3)).unwrap();
            seed += 1;
        }
    }
    ad
}

#[test]
fn config_readback_and_shapes() {
    let ad = Config::new(16)
        .n_heads(4)
        .n_kv_heads(2)
        .rank(3)
        .alpha(6.0)
        .targets(&[Target::Q, Target::K, Target::V, Target::O])
        .out_proj(true)
        .build()
        .unwrap();
    assert_eq!(ad.targets(), &[Target::Q, Target::K, Target::V, Target::O]);
    assert_eq!(
        (ad.d_model(), ad.q_dim(), ad.kv_dim(), ad.out_dim()),
        (16, 16, 8, 16)
    );
    assert_eq!(ad.config_int(lora::sys::LORA_CFG_RANK).unwrap(), 3);
    assert_eq!(ad.config_double(lora::sys::LORA_CFG_ALPHA).unwrap(), 6.0);
    assert_eq!(ad.param_shape(Target::K, Factor::A).unwrap(), (3, 16));
    assert_eq!(ad.param_shape(Target::K, Factor::B).unwrap(), (8, 3));
    let def = Config::new(8).build().unwrap();
    assert_eq!(def.targets(), &[Target::Q, Target::V]);
    assert!(def
        .param(Target::Q, Factor::B)
        .unwrap()
        .iter()
        .all(|&b| b == 0.0));
}

#[test]
fn params_roundtrip_and_seed() {
    let a = Config::new(8).rank(2).seed(5).build().unwrap();
    let b = Config::new(8).rank(2).seed(5).build().unwrap();
    assert_eq!(
        a.param(Target::V, Factor::A).unwrap(),
        b.param(Target::V, Factor::A).unwrap()
    );
    let mut a = a;
    let v = rnd(16, 9, 1.0);
    a.set_param(Target::Q, Factor::B, &v).unwrap();
    assert_eq!(a.param(Target::Q, Factor::B).unwrap(), v);
    let mut buf = [0f32; 16];
    a.param_into(Target::Q, Factor::B, &mut buf).unwrap();
    assert_eq!(&buf[..], &v[..]);
}

#[test]
fn forward_backward_and_reports() {
    let mut ad = layer(Config::new(8).n_heads(2).rank(2));
    let (b, l) = (2, 5);
    let x = rnd(b * l * 8, 3, 1.0);
    assert_eq!(ad.run_info().unwrap().backend, Backend::Auto); // 0 before any forward
    let out = ad.forward(&x, b, l).unwrap();
    assert_eq!(out.len(), b * l * 8);
    let (loss, dout) = lora::mse_loss(&out, &vec![0.0; out.len()]).unwrap();
    assert!(loss > 0.0);
    let mut dx = vec![0f32; x.len()];
    ad.backward(&dout, Some(&mut dx)).unwrap();
    assert!(dx.iter().any(|&v| v != 0.0));
    let g1 = ad.grad(Target::Q, Factor::A).unwrap();
    ad.backward(&dout, None).unwrap();
    let g2 = ad.grad(Target::Q, Factor::A).unwrap();
    for (a, b) in g1.iter().zip(&g2) {
        assert!((2.0 * a - b).abs() <= 1e-5 * (1.0 + b.abs()));
    }
    let info = ad.run_info().unwrap();
    assert_eq!(info.backend, Backend::Exact);
    assert_eq!(info.measured_out_error, -1.0);
    assert!(info.score_bound > 0.0);
    let rep = ad.threshold_estimate(&x, b, l).unwrap();
    assert!((rep.score_bound - info.score_bound).abs() <= 1e-6 * info.score_bound);
    assert!(matches!(
        rep.recommended_backend,
        Backend::Exact | Backend::Poly
    ));
    ad.zero_grad().unwrap();
    assert!(ad
        .grad(Target::Q, Factor::A)
        .unwrap()
        .iter()
        .all(|&g| g == 0.0));
}

#[test]
fn cross_attention() {
    let mut ad = layer(Config::new(8).n_heads(2).rank(2).causal(true));
    let (xq, xkv) = (rnd(2 * 3 * 8, 4, 1.0), rnd(2 * 6 * 8, 5, 1.0));
    let out = ad.forward_cross(&xq, &xkv, 2, 3, 6).unwrap();
    let (mut dxq, mut dxkv) = (vec![0f32; xq.len()], vec![0f32; xkv.len()]);
    ad.backward_cross(&out, Some(&mut dxq), Some(&mut dxkv))
        .unwrap();
    assert!(dxkv.iter().any(|&v| v != 0.0));
    // backward after forward_cross is refused by the wrapper
    assert_eq!(ad.backward(&out, None).unwrap_err().status, Status::State);
    // causal with len_q > len_kv is refused by the library, with its message
    let e = ad.forward_cross(&xkv, &xq, 2, 6, 3).unwrap_err();
    assert_eq!(e.status, Status::Shape);
    assert_eq!(e.function, "lora_forward_cross");
    assert!(e.message.contains("len_q"), "{e}");
}

#[test]
fn errors_carry_status_and_message() {
    let e: LoraError = Config::new(8).n_heads(3).build().unwrap_err();
    assert_eq!((e.status, e.code()), (Status::InvalidArg, 1));
    assert_eq!(e.function, "lora_adapter_create");
    assert!(e.message.contains("N_HEADS"), "{e}");
    assert!(e.to_string().contains("invalid argument") || !e.to_string().is_empty());

    let e = Config::new(-3).build().unwrap_err();
    assert_eq!(e.function, "lora_config_set_int");
    let e = Config::new(8).alpha(f64::NAN).build().unwrap_err();
    assert_eq!(e.status, Status::NonFinite);
    let e = Config::new(8).targets(&[Target::O]).build().unwrap_err();
    assert_eq!(e.status, Status::InvalidArg);

    let mut ad = Config::new(8).rank(2).build().unwrap();
    let e = ad.forward(&[0.0; 16], 1, 2).unwrap_err();
    assert_eq!(e.status, Status::State);
    assert!(e.message.contains("W_Q"), "{e}");
    assert_eq!(ad.last_error(), e.message);

    let e = ad.set_param(Target::Q, Factor::A, &[0.0; 3]).unwrap_err();
    assert_eq!(
        (e.status, e.function),
        (Status::InvalidArg, "lora_adapter_set_param")
    );
    let e = ad.param(Target::K, Factor::A).unwrap_err();
    assert!(e.message.contains("not adapted"), "{e}");
    let e = ad
        .set_param(Target::Q, Factor::A, &[f32::NAN; 16])
        .unwrap_err();
    assert_eq!(e.status, Status::NonFinite);
    let e = ad.set_base(Target::Q, &[0.0; 63], None).unwrap_err();
    assert_eq!(e.status, Status::Shape);
    let e = ad
        .set_base(Target::Q, &[0.0; 64], Some(&[0.0; 7]))
        .unwrap_err();
    assert_eq!(e.status, Status::Shape);
    assert_eq!(
        ad.backward(&[0.0; 8], None).unwrap_err().status,
        Status::State
    );

    let mut ad = layer(Config::new(8).rank(2));
    assert_eq!(
        ad.forward(&[0.0; 15], 1, 2).unwrap_err().status,
        Status::Shape
    );
    assert_eq!(ad.forward(&[], 0, 2).unwrap_err().status, Status::Shape);
    let mut x = vec![0.5f32; 16];
    x[5] = f32::INFINITY;
    let e = ad.forward(&x, 1, 2).unwrap_err();
    assert_eq!(e.status, Status::NonFinite);
    assert!(e.message.contains("index 5"), "{e}");
    let out = ad.forward(&[0.5; 16], 1, 2).unwrap();
    assert_eq!(
        ad.backward(&out[1..], None).unwrap_err().status,
        Status::Shape
    );
    let mut small = [0f32; 3];
    assert_eq!(
        ad.backward(&out, Some(&mut small)).unwrap_err().status,
        Status::Shape
    );
    ad.set_base(Target::K, &[0.1; 64], None).unwrap();
    assert_eq!(ad.backward(&out, None).unwrap_err().status, Status::State);

    assert_eq!(
        lora::mse_loss(&[1.0], &[1.0, 2.0]).unwrap_err().status,
        Status::Shape
    );
    assert_eq!(
        lora::mse_loss(&[f32::NAN], &[1.0]).unwrap_err().status,
        Status::NonFinite
    );
    assert_eq!(Status::from_code(42), Some(Status::Unknown(42)));
    assert_eq!(Status::from_code(0), None);
}

/// dL/dθ from the library against central differences of its own double-accumulated
/// loss (float32 forward: step 1e-2, tolerance 1e-2 relative).
#[test]
fn gradients_match_finite_differences() {
    let cfg = || {
        Config::new(6)
            .n_heads(2)
            .head_dim(4)
            .rank(2)
            .out_proj(true)
            .causal(true)
            .targets(&[Target::Q, Target::K, Target::V, Target::O])
    };
    let mut ad = layer(cfg());
    let (b, l) = (2, 4);
    let x = rnd(b * l * 6, 11, 1.0);
    let target = rnd(b * l * 6, 12, 1.0);
    let out = ad.forward(&x, b, l).unwrap();
    let (_, dout) = lora::mse_loss(&out, &target).unwrap();
    let mut dx = vec![0f32; x.len()];
    ad.backward(&dout, Some(&mut dx)).unwrap();
    let h = 1e-2f32;
    let mut checked = 0;
    for t in [Target::Q, Target::K, Target::V, Target::O] {
        for f in [Factor::A, Factor::B] {
            let g = ad.grad(t, f).unwrap();
            let p0 = ad.param(t, f).unwrap();
            for i in (0..p0.len()).step_by(5) {
                let mut loss_at = |d: f32| {
                    let mut p = p0.clone();
                    p[i] += d;
                    ad.set_param(t, f, &p).unwrap();
                    let o = ad.forward(&x, b, l).unwrap();
                    lora::mse_loss(&o, &target).unwrap().0
                };
                let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
                assert!(
                    (fd - g[i] as f64).abs() <= 1e-2 * fd.abs().max(1.0),
                    "{t:?}.{f:?}[{i}]: fd {fd} lib {}",
                    g[i]
                );
                checked += 1;
            }
            ad.set_param(t, f, &p0).unwrap();
        }
    }
    for i in (0..x.len()).step_by(7) {
        let mut loss_at = |d: f32| {
            let mut xx = x.clone();
            xx[i] += d;
            let o = ad.forward(&xx, b, l).unwrap();
            lora::mse_loss(&o, &target).unwrap().0
        };
        let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
        assert!(
            (fd - dx[i] as f64).abs() <= 1e-2 * fd.abs().max(1.0),
            "dx[{i}]: {fd} {}",
            dx[i]
        );
        checked += 1;
    }
    assert!(checked > 20);
}

#[test]
fn adapter_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<lora::Adapter>();
    let ad = Config::new(4).build().unwrap();
    let h = std::thread::spawn(move || ad.param(Target::Q, Factor::A).unwrap().len());
    assert_eq!(h.join().unwrap(), 8 * 4);
}

#[test]
fn rope_zero_freqs_equal_no_rope() {
    let x = rnd(2 * 5 * 8, 77, 1.0);
    let mut plain = layer(Config::new(8).n_heads(2));
    let mut rope = layer(Config::new(8).n_heads(2).rope(lora::sys::LORA_ROPE_HALF as i64));
    let want = plain.forward(&x, 2, 5).unwrap();
    assert_ne!(rope.forward(&x, 2, 5).unwrap(), want);
    rope.set_rope_freqs(&[0.0, 0.0]).unwrap();
    assert_eq!(rope.forward(&x, 2, 5).unwrap(), want);
    assert_eq!(
        rope.set_rope_freqs(&[1.0, 0.5, 0.25]).unwrap_err().status,
        Status::InvalidArg
    );
    assert_eq!(plain.set_rope_freqs(&[1.0, 0.5]).unwrap_err().status, Status::InvalidArg);
}
