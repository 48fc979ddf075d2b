//! The CLI subcommands, over the same library functions the server uses. Each returns the process exit code, or
//! an error `main` prints: a usage error exits 2, a failure exits 1.

pub mod check;
pub mod deliveries;
pub mod render;
pub mod replay;
pub mod test;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command line was wrong.
    #[error("{0}")]
    Usage(String),
    /// The command could not do its work.
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

impl CommandError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CommandError::Usage(_) => 2,
            CommandError::Failed(_) => 1,
        }
    }
}
