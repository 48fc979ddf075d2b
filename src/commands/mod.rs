//! The CLI subcommands, over the same library functions the server uses. Each returns the process exit code.

pub mod check;
pub mod deliveries;
pub mod render;
pub mod replay;
