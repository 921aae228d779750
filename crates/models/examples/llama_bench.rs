//! Timing of the forward pieces on a model: `llama_bench MODEL`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use quantlab_models::{KvCache, LlamaModel};

fn main() -> quantlab_models::Result<()> {
    let path = std::env::args().nth(1).expect("usage: llama_bench MODEL");
    let model = LlamaModel::load(&path)?;
    // raw matmul throughput at the MLP shape
    let x = Tensor::randn(0f32, 1.0, (512, 576), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1.0, (576, 1536), &Device::Cpu)?;
    let wt = w.t()?.contiguous()?; // [1536, 576]
    for (name, rhs) in [
        ("pre-transposed [in,out]", w.clone()),
        ("transposed view of [out,in]", wt.t()?),
    ] {
        let _ = x.matmul(&rhs)?;
        let t = Instant::now();
        for _ in 0..20 {
            let _ = x.matmul(&rhs)?;
        }
        let s = t.elapsed().as_secs_f64() / 20.0;
        println!(
            "matmul 512x576x1536 {name}: {:.1} GFLOP/s",
            2.0 * 512.0 * 576.0 * 1536.0 / s / 1e9
        );
    }
    let toks: Vec<u32> = (0..512u32).map(|i| (i * 7919) % 49152).collect();
    let t = Instant::now();
    let mut h = model.embed(&[&toks])?;
    let mut block_s = 0.0;
    for i in 0..model.n_blocks() {
        let tb = Instant::now();
        h = model.block_forward(i, &h, 0, None, None)?;
        block_s += tb.elapsed().as_secs_f64();
    }
    let th = Instant::now();
    let _l = model.head(&h.narrow(1, 0, 511)?, None)?;
    let head_s = th.elapsed().as_secs_f64();
    println!(
        "512-token window: {:.3} s total, blocks {:.3} s, head {:.3} s",
        t.elapsed().as_secs_f64(),
        block_s,
        head_s
    );
    let mut cache = KvCache::new(model.n_blocks());
    model.forward_cached(&toks[..16], &mut cache)?;
    let t = Instant::now();
    for i in 0..16 {
        model.forward_cached(&toks[16 + i..17 + i], &mut cache)?;
    }
    println!(
        "decode: {:.1} ms/token",
        t.elapsed().as_secs_f64() / 16.0 * 1e3
    );
    Ok(())
}
