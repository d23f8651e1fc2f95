//! KvCache and Adapter::decode: token by token equals one inference forward; tenants.
use lora::{AttnArgs, Backend, Config, Factor, KvCache, Status, Target};

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

fn layer(rank: i64, seed: u64) -> lora::Adapter {
    let mut ad = Config::new(8)
        .n_heads(2)
        .rank(rank)
        .targets(&[Target::Q, Target::K, Target::V])
        .causal(true)
        .threads(1)
        .backend(Backend::Exact)
        .build()
        .unwrap();
    for (i, t) in [Target::Q, Target::K, Target::V].into_iter().enumerate() {
        let (o, n) = ad.base_shape(t);
        ad.set_base(t, &rnd(o * n, 1 + i as u64, 0.5), None)
            .unwrap();
        for f in [Factor::A, Factor::B] {
            let (r, c) = ad.param_shape(t, f).unwrap();
            ad.set_param(t, f, &rnd(r * c, seed + 2 * i as u64 + f as u64, 0.3))
                .unwrap();
        }
    }
    ad
}

fn close(a: &[f32], b: &[f32]) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn token_by_token_equals_forward() {
    let mut ad = layer(2, 10);
    let x = rnd(2 * 5 * 8, 3, 1.0);
    let args = AttnArgs {
        infer: true,
        ..Default::default()
    };
    let full = ad.forward_ex(&x, None, 2, 5, 5, &args, None).unwrap();
    let mut cache = KvCache::new(&ad, 2, 5).unwrap();
    for i in 0..5 {
        let step: Vec<f32> = (0..2)
            .flat_map(|b| x[(b * 5 + i) * 8..(b * 5 + i + 1) * 8].to_vec())
            .collect();
        let out = ad.decode(&mut cache, &step, 1).unwrap();
        for b in 0..2 {
            close(
                &out[b * 8..(b + 1) * 8],
                &full[(b * 5 + i) * 8..(b * 5 + i + 1) * 8],
            );
        }
    }
    assert_eq!(cache.length(1).unwrap(), 5);
    let err = ad.decode(&mut cache, &x[..16], 1).unwrap_err();
    assert_eq!(err.status, Status::Shape);
    cache.reset(None).unwrap();
    assert_eq!(cache.length(0).unwrap(), 0);
    assert!(cache.reset(Some(2)).is_err());
}

#[test]
fn tenants_equal_alone() {
    let mut base = layer(1, 20);
    let mut t1 = layer(2, 30);
    let x = rnd(2 * 3 * 8, 4, 1.0);
    let mut cache = KvCache::new(&base, 2, 4).unwrap();
    let out = {
        let tenants = [&t1];
        base.decode_ex(&mut cache, &x, 3, Some(&[3, 1]), Some((&tenants, &[0, -1])))
            .unwrap()
    };
    assert!(out[3 * 8 + 8..].iter().all(|v| *v == 0.0));
    let mut own = KvCache::new(&t1, 1, 4).unwrap();
    let alone = t1.decode(&mut own, &x[..24], 3).unwrap();
    close(&out[..24], &alone);
}
