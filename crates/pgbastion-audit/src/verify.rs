//! Checking a chain across files: every record must name the hash of the record before it
//! and carry the next sequence number.

use crate::chain::{line_hash, ZERO_HASH};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// Whether the first record starts a chain (rather than continuing one from files not given).
    pub from_start: bool,
}

/// Verifies `files` in order (rotated files oldest first, then the current one). Err names the
/// first broken record: file, line and what is wrong.
pub fn verify_files(files: &[PathBuf]) -> Result<Verified, String> {
    let mut prev: Option<(String, u64)> = None;
    let mut records = 0;
    let mut from_start = false;
    for path in files {
        let file = std::fs::File::open(path).map_err(|err| format!("{}: {err}", path.display()))?;
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let at = format!("{}:{}", path.display(), index + 1);
            let line = line.map_err(|err| format!("{at}: {err}"))?;
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|err| format!("{at}: not an audit record ({err})"))?;
            let claimed = value
                .get("prev")
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("{at}: the record has no \"prev\" hash"))?;
            let seq = value
                .get("seq")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| format!("{at}: the record has no \"seq\" number"))?;
            match &prev {
                None => from_start = claimed == ZERO_HASH && seq == 0,
                Some((hash, last_seq)) => {
                    if claimed != hash {
                        return Err(format!(
                            "{at}: record {seq} is not chained to the record before it \
                             (a record was changed, removed or inserted here or just before)"
                        ));
                    }
                    if seq != last_seq + 1 {
                        return Err(format!(
                            "{at}: record {seq} follows record {last_seq} (expected {})",
                            last_seq + 1
                        ));
                    }
                }
            }
            prev = Some((line_hash(line.as_bytes()), seq));
            records += 1;
        }
    }
    Ok(Verified {
        records,
        from_start,
    })
}
