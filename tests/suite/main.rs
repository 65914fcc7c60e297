//! The integration tests of the whole workspace, in one binary (each binary that links
//! LLVM and MLIR is large and slow to link).

/// `$m!(ARGS… bert, bloom, …)`: every fixture in tests/fixtures/hf, the one list a new
/// fixture is added to (`import::every_fixture_folder_is_listed` keeps it complete).
macro_rules! with_fixtures {
    ($m:ident $(, $($arg:tt)*)?) => {
        $m! { $($($arg)*)? bert, bloom, cohere, cohere_qk, distilbert, falcon, falcon_alibi, falcon_new, gemma, gemma2, gemma3, gpt2, gpt_neox, gptj, granite, llama, llama31, llama_dynamic, llama_linear, mistral, olmo, olmo2, opt_postln, phi, phi3, qwen2, qwen2_swa, qwen2_yarn, qwen3, roberta, stablelm, stablelm_qk, starcoder2, starcoder2_swa, xglm, xlm_roberta}
    };
}

/// The fixtures with a mixture of experts: the interpreter and the LLVM backend run them;
/// the MLIR backends refuse them with an error naming the op.
macro_rules! with_moe_fixtures {
    ($m:ident $(, $($arg:tt)*)?) => {
        $m! { $($($arg)*)? deepseek_v2, deepseek_v3, deepseek_v3_yarn, gpt_oss, granitemoe, mixtral, olmoe, qwen2_moe, qwen3_moe }
    };
}

mod backends;
mod checkpoint;
mod common;
mod diagnostics;
mod equivalence;
mod fixtures;
mod fuzz;
mod gguf;
mod gpu;
mod import;
mod passes;
mod robustness;
pub mod serve;
mod smollm2;
mod stages;
mod toolchain;
