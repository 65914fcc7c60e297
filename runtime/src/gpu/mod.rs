//! GPU builds of a model: the program format and the device paths that run it.

pub mod program;
