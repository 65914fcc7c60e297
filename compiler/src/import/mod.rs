//! Importers from other model descriptions.
pub mod gguf;
pub mod hf;
