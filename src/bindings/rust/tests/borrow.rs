//! Caller-owned factor and gradient storage (lora_adapter_borrow_factor) through the
//! unsafe call, the owning variant and the scoped variant.
use lora::{Config, Factor, Optimizer, Target};

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

/// Two identical layers (d_model 8, 2 heads, rank 2, Q and V adapted).
fn layer() -> lora::Adapter {
    let mut ad = Config::new(8)
        .n_heads(2)
        .rank(2)
        .threads(1)
        .build()
        .unwrap();
    for (i, t) in [Target::Q, Target::K, Target::V].into_iter().enumerate() {
        ad.set_base(t, &rnd(64, 1 + i as u64, 0.5), None).unwrap();
    }
    let n = ad.param_count().unwrap();
    ad.set_params_flat(&rnd(n, 10, 0.3)).unwrap();
    ad
}

/// One forward and backward of a fixed problem (batch 1, L 3): accumulates gradients.
fn train_step(ad: &mut lora::Adapter) {
    let x = rnd(24, 20, 1.0);
    ad.forward(&x, 1, 3).unwrap();
    ad.backward(&rnd(24, 21, 1.0), None).unwrap();
}

#[test]
fn owned_storage_is_used_in_place() {
    let mut copy = layer();
    let mut ad = layer();
    let (r, c) = ad.param_shape(Target::Q, Factor::B).unwrap();
    let start = ad.param(Target::Q, Factor::B).unwrap();
    ad.borrow_factor_owned(
        Target::Q,
        Factor::B,
        start.clone().into_boxed_slice(),
        Some(vec![0f32; r * c].into_boxed_slice()),
    )
    .unwrap();
    // The gradient accumulates into the owned box, as into the copy's own storage.
    train_step(&mut copy);
    train_step(&mut ad);
    let want = copy.grad(Target::Q, Factor::B).unwrap();
    let (p, g) = ad.factor_storage(Target::Q, Factor::B).unwrap();
    assert_eq!(p, &start[..]);
    assert_eq!(g.unwrap(), &want[..]);
    // An optimizer step writes the factor in place.
    let mut opt = Optimizer::sgd(&ad).unwrap();
    opt.lr(0.5).unwrap();
    opt.step(&mut ad).unwrap();
    let stepped = ad.param(Target::Q, Factor::B).unwrap();
    assert_ne!(stepped, start);
    assert_eq!(
        ad.factor_storage(Target::Q, Factor::B).unwrap().0,
        &stepped[..]
    );
    // Changes made in place are the factor's values (the library notices them).
    ad.factor_storage_mut(Target::Q, Factor::B).unwrap().0[0] = 7.0;
    assert_eq!(ad.param(Target::Q, Factor::B).unwrap()[0], 7.0);
    // Released: the boxes come back with the values; the adapter keeps a copy.
    let (p, g) = ad.release_factor(Target::Q, Factor::B).unwrap().unwrap();
    assert_eq!(p[0], 7.0);
    assert_eq!(g.unwrap().len(), r * c);
    assert!(ad.factor_storage(Target::Q, Factor::B).is_none());
    assert_eq!(ad.param(Target::Q, Factor::B).unwrap()[0], 7.0);
    assert!(ad.release_factor(Target::Q, Factor::B).unwrap().is_none());
}

#[test]
fn owned_storage_of_a_wrong_size_is_refused() {
    let mut ad = layer();
    let err = ad
        .borrow_factor_owned(Target::Q, Factor::A, vec![0f32; 3].into_boxed_slice(), None)
        .unwrap_err();
    assert_eq!(err.status, lora::Status::Shape);
    assert!(ad.factor_storage(Target::Q, Factor::A).is_none());
    // A target the adapter does not adapt (K) is the library's INVALID_ARG.
    assert!(ad
        .borrow_factor_owned(
            Target::K,
            Factor::A,
            vec![0f32; 16].into_boxed_slice(),
            None
        )
        .is_err());
}

#[test]
fn scoped_borrow_gives_the_factor_back() {
    let mut copy = layer();
    let mut ad = layer();
    let mut param = ad.param(Target::V, Factor::A).unwrap();
    let mut grad = vec![0f32; param.len()];
    let out = ad
        .with_borrowed_factor(Target::V, Factor::A, &mut param, Some(&mut grad), |ad| {
            train_step(ad);
            ad.set_param(Target::V, Factor::A, &vec![0.25f32; 16])
                .unwrap();
            42
        })
        .unwrap();
    assert_eq!(out, 42);
    train_step(&mut copy);
    assert_eq!(grad, copy.grad(Target::V, Factor::A).unwrap()); // written in place
    assert!(param.iter().all(|&v| v == 0.25)); // set_param wrote the caller's memory
                                               // The adapter uses its own storage again, holding the last values.
    param[0] = -1.0;
    assert!(ad
        .param(Target::V, Factor::A)
        .unwrap()
        .iter()
        .all(|&v| v == 0.25));
}

#[test]
fn raw_borrow_uses_the_callers_memory() {
    let mut ad = layer();
    let mut param = vec![0.5f32; 16];
    let mut grad = vec![3.0f32; 16];
    unsafe {
        ad.borrow_factor(
            Target::Q,
            Factor::A,
            Some(&mut param[..] as *mut [f32]),
            Some(&mut grad[..] as *mut [f32]),
        )
        .unwrap();
    }
    assert_eq!(ad.grad(Target::Q, Factor::A).unwrap(), vec![3.0f32; 16]);
    ad.zero_grad().unwrap();
    ad.set_param(Target::Q, Factor::A, &vec![1.5f32; 16])
        .unwrap();
    unsafe { ad.borrow_factor(Target::Q, Factor::A, None, None).unwrap() };
    assert_eq!(grad, vec![0f32; 16]);
    assert_eq!(param, vec![1.5f32; 16]);
    let mut short = vec![0f32; 15];
    let err = unsafe {
        ad.borrow_factor(
            Target::Q,
            Factor::A,
            Some(&mut short[..] as *mut [f32]),
            None,
        )
    }
    .unwrap_err();
    assert_eq!(err.status, lora::Status::Shape);
}
