//! Timing of the block stages the quantization driver runs, on a batch of calibration-sized
//! windows: `stage_bench MODEL [BATCH] [SEQLEN]`.

use std::time::Instant;

use quantlab_models::LlamaModel;

fn main() -> quantlab_models::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: stage_bench MODEL [BATCH] [SEQLEN]");
    let b: usize = args.next().map_or(8, |s| s.parse().expect("BATCH"));
    let n: usize = args.next().map_or(512, |s| s.parse().expect("SEQLEN"));
    let model = LlamaModel::load(&path)?;
    let c = model.config().clone();
    let toks: Vec<Vec<u32>> = (0..b)
        .map(|s| {
            (0..n as u32)
                .map(|i| (i * 7919 + s as u32 * 131) % c.vocab_size as u32)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = toks.iter().map(|t| t.as_slice()).collect();
    let h = model.embed(&refs)?;
    let d = c.hidden_size;
    let qo = c.num_attention_heads * c.head_dim;
    let kvo = c.num_key_value_heads * c.head_dim;
    let f = c.intermediate_size;
    let rows = (b * n) as f64;
    let lin = |i: usize, o: usize| 2.0 * rows * i as f64 * o as f64;
    let attn_flops = 2.0 * 2.0 * (b as f64) * c.num_attention_heads as f64 * (n * n) as f64 / 2.0
        * c.head_dim as f64;
    let mut tot = [0f64; 6];
    let reps = 3;
    for _ in 0..reps {
        let t = Instant::now();
        let x = model.block_attn_input(0, &h)?;
        tot[0] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let a = model.block_attention(0, &x, b)?;
        tot[1] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (r, x2) = model.block_mlp_input(0, &h, &a)?;
        tot[2] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let act = model.block_mlp_act(0, &x2)?;
        tot[3] += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _o = model.block_output(0, &r, &act)?;
        tot[4] += t.elapsed().as_secs_f64();
    }
    let flops = [
        0.0,
        lin(d, qo) + 2.0 * lin(d, kvo) + attn_flops,
        lin(qo, d),
        2.0 * lin(d, f),
        lin(f, d),
    ];
    let names = [
        "attn_input (norm)",
        "attention (qkv+sdpa)",
        "mlp_input (o+add+norm)",
        "mlp_act (gate,up,silu)",
        "output (down+add)",
    ];
    let mut sum = 0.0;
    let mut fsum = 0.0;
    for k in 0..5 {
        let s = tot[k] / reps as f64;
        sum += s;
        fsum += flops[k];
        println!(
            "{:<26} {:8.1} ms  {:6.1} GFLOP/s",
            names[k],
            s * 1e3,
            flops[k] / s / 1e9
        );
    }
    println!(
        "{:<26} {:8.1} ms  {:6.1} GFLOP/s  ({b} x {n})",
        "block",
        sum * 1e3,
        fsum / sum / 1e9
    );
    // linears alone: q, k, v on the normed input, gate on the post-attention one
    let x = model.block_attn_input(0, &h)?;
    let x2 = model
        .block_mlp_input(0, &h, &model.block_attention(0, &x, b)?)?
        .1;
    for (j, input) in [(0, &x), (1, &x), (2, &x), (4, &x2)] {
        let l = model.block(0).linear(j);
        let t = Instant::now();
        let _ = l.forward(input)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "  {:<10} {:8.1} ms  {:6.1} GFLOP/s",
            model
                .block(0)
                .linear_name(j)
                .rsplit('.')
                .next()
                .unwrap_or(""),
            s * 1e3,
            lin(l.in_features(), l.out_features()) / s / 1e9
        );
    }
    Ok(())
}
