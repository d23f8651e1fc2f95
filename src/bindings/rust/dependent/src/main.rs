//! A few AdamW steps on one attention layer through the `lora` crate; prints the loss
//! before and after and fails unless it went down.
use lora::{Config, Optimizer, Target};

fn fill(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn main() -> Result<(), lora::LoraError> {
    let (d, batch, len) = (16usize, 2usize, 6usize);
    let mut ad = Config::new(d as i64).n_heads(2).rank(4).threads(1).seed(1).build()?;
    for (i, t) in [Target::Q, Target::K, Target::V].into_iter().enumerate() {
        ad.set_base(t, &fill(d * d, 10 + i as u32, 0.3), None)?;
    }
    let x = fill(batch * len * d, 20, 1.0);
    let target = fill(batch * len * d, 30, 0.5);
    let mut opt = Optimizer::adamw(&ad)?;
    opt.lr(0.02)?;
    let mut losses = Vec::new();
    for _ in 0..20 {
        ad.zero_grad()?;
        let out = ad.forward(&x, batch, len)?;
        let (loss, dout) = lora::mse_loss_mean(&out, &target)?;
        losses.push(loss);
        ad.backward(&dout, None)?;
        opt.step(&mut ad)?;
    }
    println!(
        "liblora {}: loss {:.6} -> {:.6}",
        lora::version_string(),
        losses[0],
        losses[losses.len() - 1]
    );
    assert!(losses[losses.len() - 1] < losses[0], "the loss did not go down");
    Ok(())
}
