//! Importers from other model descriptions.
pub mod hf;
