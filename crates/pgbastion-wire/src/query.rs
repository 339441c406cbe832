//! The proxy's own queries on an upstream connection of its own (never a client's): a simple
//! Query, its rows as text, and the connection left idle.

use crate::frame::{read_message, Fields};
use crate::messages::{error_field, error_fields};
use crate::stream::UpstreamStream;
use crate::WireError;
use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

/// Largest row or message accepted for the proxy's own queries.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Runs `sql` (one or more statements) and returns every row of every statement as text.
/// An ErrorResponse becomes `WireError::Protocol` with its SQLSTATE and message.
pub async fn simple_query(
    stream: &mut UpstreamStream,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, WireError> {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    let mut rows = Vec::new();
    let mut failure = None;
    loop {
        let (tag, body) = read_message(stream, "query result", MAX_MESSAGE).await?;
        match tag {
            b'D' => rows.push(data_row(&body)?),
            b'E' => {
                let fields = error_fields(&body)?;
                failure = Some(format!(
                    "{}: {}",
                    error_field(&fields, b'C').unwrap_or(""),
                    error_field(&fields, b'M').unwrap_or("")
                ));
            }
            b'Z' => break,
            // RowDescription, CommandComplete, EmptyQueryResponse, notices, ParameterStatus.
            _ => {}
        }
    }
    match failure {
        Some(message) => Err(WireError::protocol(message)),
        None => Ok(rows),
    }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    let mut fields = Fields::new(body);
    let count = fields.i16()?;
    (0..count)
        .map(|_| {
            let len = fields.i32()?;
            if len < 0 {
                return Ok(None);
            }
            let bytes = fields.take(len as usize)?;
            String::from_utf8(bytes.to_vec())
                .map(Some)
                .map_err(|_| WireError::protocol("a catalog value is not valid UTF-8"))
        })
        .collect()
}
