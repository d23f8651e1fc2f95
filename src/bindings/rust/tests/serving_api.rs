//! Typed (bf16/f16) bases, multi-tenant `lora::apply` and `threshold_estimate_ex`.
use lora::{AttnArgs, Config, Factor, SharedWeight, Status, Target, TypedWeight};
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

/// float -> bfloat16 bits, rounded to nearest even.
fn bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

fn layer(rank: i64, alpha: f64, seed: u64) -> lora::Adapter {
    let mut ad = Config::new(16).n_heads(2).rank(rank).alpha(alpha).threads(1).build().unwrap();
    for (i, t) in [Target::Q, Target::K, Target::V].into_iter().enumerate() {
        ad.set_base(t, &rnd(256, seed + i as u64, 0.5), None).unwrap();
    }
    let n = ad.param_count().unwrap();
    ad.set_params_flat(&rnd(n, seed + 10, 0.3)).unwrap();
    ad
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "[{i}] {x} vs {y}");
    }
}

#[test]
fn bf16_base_equals_float_base_of_rounded_values() {
    let w = rnd(256, 40, 0.5);
    let bits: Vec<u16> = w.iter().map(|&v| bf16_bits(v)).collect();
    let rounded: Vec<f32> = bits.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
    assert_ne!(rounded, w);
    let bias = rnd(16, 41, 0.1);
    let x = rnd(2 * 5 * 16, 42, 1.0);
    let mut ad = layer(2, 4.0, 1);
    ad.set_base(Target::Q, &rounded, Some(&bias)).unwrap();
    let want = ad.forward(&x, 2, 5).unwrap();
    ad.set_base_typed(Target::Q, TypedWeight::Bf16(&bits), Some(&bias)).unwrap();
    close(&ad.forward(&x, 2, 5).unwrap(), &want, 1e-5);
    let shared: Arc<[u16]> = bits.clone().into();
    ad.set_base_typed_borrowed(Target::Q, SharedWeight::Bf16(shared), Some(bias.clone().into()))
        .unwrap();
    close(&ad.forward(&x, 2, 5).unwrap(), &want, 1e-5);
    ad.set_base_typed(Target::Q, TypedWeight::F32(&w), Some(&bias)).unwrap();
    assert!(ad.forward(&x, 2, 5).unwrap().iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-6));
    let e = ad.set_base_typed(Target::Q, TypedWeight::F16(&bits[..10]), None).unwrap_err();
    assert_eq!(e.status, Status::Shape);
    let nan = vec![0x7FC0u16; 256];
    let e = ad.set_base_typed(Target::Q, TypedWeight::Bf16(&nan), None).unwrap_err();
    assert_eq!(e.status, Status::NonFinite);
}

#[test]
fn apply_equals_reference_with_mixed_ranks_and_skipped_rows() {
    let tenants = [layer(2, 4.0, 100), layer(4, 8.0, 200), layer(8, 3.0, 300)];
    let refs: Vec<&lora::Adapter> = tenants.iter().collect();
    let ids = [2, -1, 0, 1, 2, -1, 0, 1i32];
    let rows = ids.len();
    let x = rnd(rows * 16, 50, 1.0);
    let y0 = rnd(rows * 16, 51, 1.0);
    let mut want: Vec<f64> = y0.iter().map(|&v| v as f64).collect();
    for (r, &t) in ids.iter().enumerate() {
        if t < 0 {
            continue;
        }
        let ad = &tenants[t as usize];
        let a = ad.param(Target::V, Factor::A).unwrap();
        let b = ad.param(Target::V, Factor::B).unwrap();
        let rank = a.len() / 16;
        let s = ad.config_double(lora::sys::LORA_CFG_ALPHA).unwrap() / rank as f64;
        let xa: Vec<f64> = (0..rank)
            .map(|k| (0..16).map(|i| x[r * 16 + i] as f64 * a[k * 16 + i] as f64).sum())
            .collect();
        for o in 0..16 {
            let d: f64 = (0..rank).map(|k| xa[k] * b[o * rank + k] as f64).sum();
            want[r * 16 + o] += s * d;
        }
    }
    let mut y = y0.clone();
    lora::apply(&refs, Target::V, &ids, &x, &mut y).unwrap();
    let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    close(&y, &want32, 1e-5);
    assert_eq!(&y[16..32], &y0[16..32]); // a row of -1 is not written
    let mut y2 = y0.clone();
    let e = lora::apply(&refs, Target::V, &[0, 3, 1, 1, 1, 1, 1, 1], &x, &mut y2).unwrap_err();
    assert_eq!(e.status, Status::InvalidArg);
    assert!(!e.message.is_empty(), "lora_apply_with_error gave no message");
    assert_eq!(y2, y0);
    let e = lora::apply(&refs, Target::V, &ids[..3], &x, &mut y2).unwrap_err();
    assert_eq!(e.status, Status::Shape);
}

#[test]
fn threshold_estimate_ex_with_lengths_equals_estimate_on_valid_rows() {
    let mut ad = layer(2, 4.0, 7);
    let (len, valid) = (9usize, 6usize);
    let x = rnd(len * 16, 60, 1.0);
    let want = ad.threshold_estimate(&x[..valid * 16], 1, valid).unwrap();
    let mut padded = x.clone();
    padded[valid * 16..].iter_mut().for_each(|v| *v = 1e3);
    let lens = [valid as i64];
    let args = AttnArgs { q_lens: Some(&lens), ..Default::default() };
    let got = ad.threshold_estimate_ex(&padded, 1, len, &args).unwrap();
    for (g, w) in [
        (got.gamma_q, want.gamma_q),
        (got.gamma_k, want.gamma_k),
        (got.gamma_v, want.gamma_v),
        (got.score_bound, want.score_bound),
        (got.flops_exact, want.flops_exact),
    ] {
        assert!((g - w).abs() <= 1e-6 * w.abs(), "{g} vs {w}");
    }
    let all = ad.threshold_estimate_ex(&padded, 1, len, &AttnArgs::default()).unwrap();
    assert!(all.gamma_q > want.gamma_q);
    let e = ad.threshold_estimate_ex(&x, 1, len, &AttnArgs { q_lens: Some(&[1, 2]), ..Default::default() });
    assert_eq!(e.unwrap_err().status, Status::Shape);
}
