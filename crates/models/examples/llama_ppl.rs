//! Perplexity and greedy generation on a model, for measurements without the CLI:
//! `cargo run -p quantlab-models --example llama_ppl -- MODEL TEXT [CTX] [MAX_WINDOWS]`.

use quantlab_models::{
    generate_chat, perplexity_of_file, GenerateParams, LlamaModel, LlamaTokenizer, PplParams,
};

fn main() -> quantlab_models::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: llama_ppl MODEL TEXT [CTX] [MAX_WINDOWS]");
        std::process::exit(2);
    }
    let ctx = args
        .get(3)
        .map_or(512, |s| s.parse().expect("CTX is a number"));
    let max_windows = args
        .get(4)
        .map(|s| s.parse().expect("MAX_WINDOWS is a number"));
    let t = std::time::Instant::now();
    let model = LlamaModel::load(&args[1])?;
    let tok = LlamaTokenizer::load(&args[1])?;
    eprintln!("loaded in {:.2} s", t.elapsed().as_secs_f64());
    let r = perplexity_of_file(
        &model,
        &tok,
        args[2].as_ref(),
        None,
        &PplParams { ctx, max_windows },
    )?;
    println!(
        "ppl {:.4} nll {:.5} windows {} scored {} seconds {:.2} tokens/s {:.1} peak_rss_mb {:?}",
        r.ppl, r.nll, r.windows, r.tokens_scored, r.seconds, r.tokens_per_second, r.peak_rss_mb
    );
    let g = generate_chat(
        &model,
        &tok,
        "What is the capital of France?",
        &GenerateParams {
            max_tokens: 32,
            ..Default::default()
        },
    )?;
    println!(
        "generated {:?} ({:.1} tokens/s)",
        g.text, g.tokens_per_second
    );
    Ok(())
}
