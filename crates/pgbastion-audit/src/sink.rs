//! Where lines go: stdout, or a file rotated by size. Rotated files are named
//! `<path>.000001`, `<path>.000002`, ... so that a shell glob lists them in order.

use crate::chain::ChainHead;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Sink {
    Stdout,
    File(FileSink),
}

#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    file: Option<File>,
    size: u64,
}

impl Sink {
    /// Writes `lines[*done..]`, moving `done` past every byte the sink accepts: after a
    /// failure, the retry continues where this write stopped, so no line is written twice
    /// (which would break the chain) and none is lost.
    pub fn write(&mut self, lines: &[u8], done: &mut usize) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                write_counted(&mut out, lines, done)?;
                out.flush()
            }
            Sink::File(file) => file.write(lines, done),
        }
    }

    /// Whether a line of `len` bytes fits in the current file after `pending` bytes not
    /// written yet (always, for stdout; a line longer than a whole file gets a file of its own).
    pub fn fits(&self, pending: u64, len: u64) -> bool {
        match self {
            Sink::Stdout => true,
            Sink::File(file) => {
                let used = file.size + pending;
                used == 0 || used + len <= file.max_bytes
            }
        }
    }

    /// Starts the next file.
    pub fn rotate(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout => Ok(()),
            Sink::File(file) => file.rotate(),
        }
    }
}

impl FileSink {
    /// Opens `path` for appending; returns where its chain stands (the chain continues over
    /// restarts and rotations).
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<(FileSink, ChainHead)> {
        let mut head = ChainHead::default();
        let mut last = None;
        // The newest line decides where the chain stands: the current file's, else the
        // newest rotated file's.
        let mut candidates = rotated(path)?;
        candidates.push(path.to_path_buf());
        for candidate in candidates.iter().rev() {
            if let Some(line) = last_line(candidate)? {
                last = Some(line);
                break;
            }
        }
        if let Some(line) = last {
            head = ChainHead::after(&line).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}: the last line is not an audit record; move the file away to start a new chain",
                        path.display()
                    ),
                )
            })?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok((
            FileSink {
                path: path.to_path_buf(),
                max_bytes,
                file: Some(file),
                size,
            },
            head,
        ))
    }

    fn write(&mut self, lines: &[u8], done: &mut usize) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let file = self.file.as_mut().expect("opened");
        let before = *done;
        let written = write_counted(file, lines, done);
        self.size += (*done - before) as u64;
        written
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
        }
        let next = rotated(&self.path)?
            .last()
            .and_then(|p| suffix(&self.path, p))
            .unwrap_or(0)
            + 1;
        let target = PathBuf::from(format!("{}.{next:06}", self.path.display()));
        match std::fs::rename(&self.path, &target) {
            // Moved away by someone else (an external logrotate): a new file starts anyway.
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        self.size = 0;
        Ok(())
    }
}

/// `write_all` of `lines[*done..]` that counts what was accepted.
fn write_counted(out: &mut impl Write, lines: &[u8], done: &mut usize) -> std::io::Result<()> {
    while *done < lines.len() {
        match out.write(&lines[*done..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => *done += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Rotated files of `path`, oldest first.
fn rotated(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut found: Vec<(u64, PathBuf)> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter_map(|p| suffix(path, &p).map(|n| (n, p)))
            .collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err),
    };
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// N for `<path>.N`.
fn suffix(path: &Path, candidate: &Path) -> Option<u64> {
    let name = candidate.file_name()?.to_str()?;
    let base = path.file_name()?.to_str()?;
    let digits = name.strip_prefix(base)?.strip_prefix('.')?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn last_line(path: &Path) -> std::io::Result<Option<String>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let mut last = None;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `room` bytes, then fails until given more room (a full disk).
    struct Full {
        taken: Vec<u8>,
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf
                .len()
                .min(self.room.saturating_sub(self.taken.len()))
                .min(7);
            if n == 0 {
                return Err(std::io::Error::other("no space left"));
            }
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_retry_continues_where_the_failed_write_stopped() {
        let lines = b"{\"seq\":0}\n{\"seq\":1}\n{\"seq\":2}\n";
        let mut out = Full {
            taken: Vec::new(),
            room: 15,
        };
        let mut done = 0;
        assert!(write_counted(&mut out, lines, &mut done).is_err());
        assert_eq!(done, 15);
        out.room = 1000;
        write_counted(&mut out, lines, &mut done).unwrap();
        assert_eq!(out.taken, lines, "every byte once, in order");
    }
}
