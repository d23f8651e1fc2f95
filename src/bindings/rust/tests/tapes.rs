//! Tapes: several forwards in flight, stale and foreign tapes, inference forwards.
use lora::{AttnArgs, Backend, Config, Factor, Status, Tape, Target};

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

fn layer() -> lora::Adapter {
    let mut ad = Config::new(8)
        .n_heads(2)
        .rank(2)
        .targets(&[Target::Q, Target::K, Target::V])
        .causal(true)
        .threads(1)
        .backend(Backend::Exact)
        .build()
        .unwrap();
    for (i, t) in [Target::Q, Target::K, Target::V].into_iter().enumerate() {
        let (o, n) = ad.base_shape(t);
        ad.set_base(t, &rnd(o * n, 1 + i as u64, 0.5), None).unwrap();
        for f in [Factor::A, Factor::B] {
            let (r, c) = ad.param_shape(t, f).unwrap();
            ad.set_param(t, f, &rnd(r * c, 10 + 2 * i as u64 + f as u64, 0.3)).unwrap();
        }
    }
    ad
}

/// Gradients of one forward + backward done back to back with the 0.1 calls.
fn sequential(x: &[f32], dout: &[f32], len: usize) -> Vec<f32> {
    let mut ad = layer();
    ad.forward(x, 2, len).unwrap();
    ad.backward(dout, None).unwrap();
    ad.grads_flat().unwrap()
}

#[test]
fn two_forwards_then_backwards_in_reverse_order() {
    let mut ad = layer();
    let (x1, x2) = (rnd(2 * 5 * 8, 21, 1.0), rnd(2 * 3 * 8, 22, 1.0));
    let (d1, d2) = (rnd(2 * 5 * 8, 23, 1.0), rnd(2 * 3 * 8, 24, 1.0));
    let (mut t1, mut t2) = (Tape::new(&ad).unwrap(), Tape::new(&ad).unwrap());
    let none = AttnArgs::default();
    let y1 = ad.forward_ex(&x1, None, 2, 5, 5, &none, Some(&mut t1)).unwrap();
    ad.forward_ex(&x2, None, 2, 3, 3, &none, Some(&mut t2)).unwrap();
    ad.backward_ex(Some(&mut t2), &d2, None, None).unwrap();
    assert_eq!(ad.grads_flat().unwrap(), sequential(&x2, &d2, 3));
    ad.zero_grad().unwrap();
    let mut dx = vec![0f32; x1.len()];
    ad.backward_ex(Some(&mut t1), &d1, Some(&mut dx), None).unwrap();
    assert_eq!(ad.grads_flat().unwrap(), sequential(&x1, &d1, 5));
    // args NULL-equivalent defaults equal lora_forward bitwise
    let mut plain = layer();
    assert_eq!(plain.forward(&x1, 2, 5).unwrap(), y1);
    let mut dx_plain = vec![0f32; x1.len()];
    plain.backward(&d1, Some(&mut dx_plain)).unwrap();
    assert_eq!(dx, dx_plain);
    // a self-attention tape takes no dxkv
    let mut dxkv = vec![0f32; x1.len()];
    let e = ad
        .backward_ex(Some(&mut t1), &d1, None, Some(&mut dxkv))
        .unwrap_err();
    assert_eq!(e.status, Status::InvalidArg);
}

#[test]
fn stale_and_foreign_tapes_are_state() {
    let mut ad = layer();
    let mut other = layer();
    let x = rnd(2 * 4 * 8, 31, 1.0);
    let d = rnd(2 * 4 * 8, 32, 1.0);
    let mut t = Tape::new(&ad).unwrap();
    let args = AttnArgs::default();
    ad.forward_ex(&x, None, 2, 4, 4, &args, Some(&mut t)).unwrap();
    let e = other.backward_ex(Some(&mut t), &d, None, None).unwrap_err();
    assert_eq!(e.status, Status::State);
    let e = other
        .forward_ex(&x, None, 2, 4, 4, &args, Some(&mut t))
        .unwrap_err();
    assert_eq!(e.status, Status::State);
    let a = ad.param(Target::Q, Factor::A).unwrap();
    ad.set_param(Target::Q, Factor::A, &a).unwrap();
    let e = ad.backward_ex(Some(&mut t), &d, None, None).unwrap_err();
    assert_eq!(e.status, Status::State);
    drop(ad); // before its tape: allowed
    drop(t);
}

#[test]
fn infer_keeps_the_saved_forward() {
    let mut ad = layer();
    let x = rnd(2 * 4 * 8, 41, 1.0);
    let x2 = rnd(2 * 2 * 8, 42, 1.0);
    let d = rnd(2 * 4 * 8, 43, 1.0);
    ad.forward(&x, 2, 4).unwrap();
    let infer = AttnArgs { infer: true, ..Default::default() };
    let y = ad.forward_ex(&x2, None, 2, 2, 2, &infer, None).unwrap();
    ad.backward(&d, None).unwrap(); // still x's forward
    assert_eq!(ad.grads_flat().unwrap(), sequential(&x, &d, 4));
    assert_eq!(ad.forward(&x2, 2, 2).unwrap(), y);
    let lens = [2i64];
    let masked = AttnArgs { q_lens: Some(&lens), ..Default::default() };
    let e = ad.forward_ex(&x2, None, 2, 2, 2, &masked, None).unwrap_err();
    assert_eq!(e.status, Status::Shape); // one length for a batch of 2
}
