use std::io;

/// Everything that can go wrong on the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol; the connection cannot continue.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A message larger than the configured limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
}

pub type Result<T, E = WireError> = std::result::Result<T, E>;

impl WireError {
    pub fn protocol(message: impl Into<String>) -> Self {
        WireError::Protocol(message.into())
    }
}
