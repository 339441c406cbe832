//! The hash chain: each record names the SHA-256 of the previous record's line.

/// The `prev` of the first record of a chain.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hex SHA-256 of one line, without its newline. (ring's SHA-256 uses the CPU's SHA or
/// AVX2 instructions: on the writer thread it is the largest cost per record.)
pub fn line_hash(line: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, line);
    // By table rather than `hex::encode`, which builds the string a char at a time.
    let mut hex = Vec::with_capacity(64);
    for byte in digest.as_ref() {
        hex.push(DIGITS[usize::from(byte >> 4)]);
        hex.push(DIGITS[usize::from(byte & 15)]);
    }
    String::from_utf8(hex).expect("hex digits are ASCII")
}

/// Where a chain stands: the hash of its last line and the next sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub prev: String,
    pub seq: u64,
}

impl Default for ChainHead {
    fn default() -> Self {
        ChainHead {
            prev: ZERO_HASH.to_string(),
            seq: 0,
        }
    }
}

impl ChainHead {
    /// The head after `line` (a record) was written.
    pub fn after(line: &str) -> Option<ChainHead> {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(ChainHead {
            prev: line_hash(line.as_bytes()),
            seq: value.get("seq")?.as_u64()? + 1,
        })
    }
}
