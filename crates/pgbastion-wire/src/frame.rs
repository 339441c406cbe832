//! Message framing: `Byte1 tag, Int32 length (including itself), body`.
//! The same layout both ways, but tags mean different things per direction
//! ('S' is Sync from a client, ParameterStatus from upstream), so callers interpret tags.

use crate::{Result, WireError};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of a message header: tag and length.
pub const HEADER_LEN: usize = 5;

/// The tag and the total size (header included) of the message at the start of `buf`,
/// if its header has arrived.
pub fn header(buf: &[u8]) -> Result<Option<(u8, usize)>> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(WireError::protocol(format!(
            "invalid message length {len} for message type '{}'",
            buf[0].escape_ascii()
        )));
    }
    Ok(Some((buf[0], 1 + len as usize)))
}

/// Reads one whole message (used during startup, before the relay's buffering takes over).
/// Returns the tag and the body (without header).
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    what: &'static str,
    max_body: usize,
) -> Result<(u8, BytesMut)> {
    let mut head = [0u8; HEADER_LEN];
    read_exact_or_closed(reader, &mut head).await?;
    let (tag, total) = header(&head)?.expect("header is complete");
    let body_len = total - HEADER_LEN;
    if body_len > max_body {
        return Err(WireError::TooLarge {
            what,
            size: body_len,
            limit: max_body,
        });
    }
    // Grown as the bytes arrive: a length the client only declares costs no memory.
    let mut body = BytesMut::new();
    while body.len() < body_len {
        let missing = body_len - body.len();
        body.reserve(missing.min(READ_CHUNK));
        let read = (&mut *reader)
            .take(missing as u64)
            .read_buf(&mut body)
            .await?;
        if read == 0 {
            return Err(WireError::Closed);
        }
    }
    Ok((tag, body))
}

/// How much more room `read_message` makes for a body at a time.
const READ_CHUNK: usize = 8 * 1024;

pub async fn read_exact_or_closed<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<()> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(err) => Err(err.into()),
    }
}

/// Splits NUL-terminated strings off the front of a message body.
#[derive(Debug)]
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Fields { rest: body }
    }

    /// The next NUL-terminated string as bytes.
    pub fn cstr_bytes(&mut self) -> Result<&'a [u8]> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| WireError::protocol("string is not NUL-terminated"))?;
        let (value, rest) = self.rest.split_at(end);
        self.rest = &rest[1..];
        Ok(value)
    }

    /// The next NUL-terminated string, which must be valid UTF-8.
    pub fn cstr(&mut self) -> Result<&'a str> {
        let bytes = self.cstr_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| {
            WireError::protocol("invalid byte sequence for encoding \"UTF8\" in a message string")
        })
    }

    pub fn i16(&mut self) -> Result<i16> {
        let bytes = self.take(2)?;
        Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub fn i32(&mut self) -> Result<i32> {
        let bytes = self.take(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(WireError::protocol("message is shorter than its contents"));
        }
        let (value, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(value)
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_arriving_in_pieces_is_read_whole_and_a_short_one_is_closed() {
        use tokio::io::AsyncWriteExt;
        let body: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let (mut client, mut server) = tokio::io::duplex(1024);
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            client.write_all(b"p").await.unwrap();
            client
                .write_all(&(sent.len() as u32 + 4).to_be_bytes())
                .await
                .unwrap();
            for piece in sent.chunks(3_000) {
                client.write_all(piece).await.unwrap();
            }
            client
        });
        let (tag, read) = read_message(&mut server, "password", 65_536).await.unwrap();
        assert_eq!((tag, &read[..]), (b'p', &body[..]));
        // A length declared and not sent: the connection closes before the body is complete.
        let mut client = writer.await.unwrap();
        client.write_all(b"p").await.unwrap();
        client.write_all(&60_004u32.to_be_bytes()).await.unwrap();
        client.write_all(&[1; 100]).await.unwrap();
        drop(client);
        assert!(matches!(
            read_message(&mut server, "password", 65_536).await,
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn a_header_gives_tag_and_total_size() {
        assert_eq!(header(b"Z\0\0\0\x05I").unwrap(), Some((b'Z', 6)));
        assert_eq!(header(b"Z\0\0").unwrap(), None);
    }

    #[test]
    fn a_length_below_four_is_a_protocol_violation() {
        assert!(header(b"Q\0\0\0\x03").is_err());
        assert!(header(b"Q\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn fields_refuse_truncated_and_invalid_strings() {
        let mut fields = Fields::new(b"abc\0\xff\0xyz");
        assert_eq!(fields.cstr().unwrap(), "abc");
        assert!(fields.cstr().is_err());
        assert!(fields.cstr().is_err());
        assert!(Fields::new(b"\0\0").i32().is_err());
    }
}
