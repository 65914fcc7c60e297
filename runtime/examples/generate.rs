//! Generates tokens with a compiled model through the runtime crate.
//!
//! ```sh
//! tfc compile specs/tiny/llama.tfs -o /tmp/llama
//! cargo run -p tfc-runtime --example generate -- /tmp/llama tests/fixtures/hf/llama 12 188,354,68
//! ```

use std::sync::Arc;

use tfc_runtime::{Checkpoint, Model, Sampler, Session, WeightData};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: {} LIBRARY_DIR CHECKPOINT N_NEW TOKEN,TOKEN,...", args[0]);
        std::process::exit(2);
    }
    let model = Model::load(&args[1])?;
    let checkpoint = Arc::new(Checkpoint::open(&args[2])?);
    let n_new: usize = args[3].parse()?;
    let prompt: Vec<i32> = args[4].split(',').map(str::parse).collect::<Result<_, _>>()?;
    let mut session = Session::new(&model, WeightData::Checkpoint(checkpoint), 0)?;
    let mut sampler = Sampler::Greedy;
    let mut logits = session.prefill(&prompt, None, false)?;
    let mut out = Vec::new();
    for i in 0..n_new {
        let next = sampler.next(&logits) as i32;
        out.push(next.to_string());
        if i + 1 < n_new {
            logits = session.decode(next)?;
        }
    }
    println!("{}", out.join(","));
    Ok(())
}
