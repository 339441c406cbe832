//! The auditor: sessions queue records; one writer thread chains, formats and writes them.
//!
//! The queue is bounded. When it is full, `block` makes the session wait (nothing is lost)
//! and `drop` discards the record, counts it and logs it. A sink that fails keeps its batch
//! and retries every second, so with `block` statements wait until the sink recovers.

use crate::chain::{line_hash, ChainHead};
use crate::record::{Event, Record};
use crate::sink::{FileSink, Sink};
use pgbastion_config::{Audit, AuditSink, OnAuditFull, StatementText};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Replaces the literals of a statement by placeholders.
pub type Redactor = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Most records written in one batch.
const BATCH: usize = 512;
/// How long the writer lets records gather after a partial batch.
const GATHER: Duration = Duration::from_millis(2);
/// Redacted texts remembered (prepared statements repeat the same text).
const REDACTED_MEMO: usize = 4096;

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    failures: AtomicU64,
}

/// The handle sessions hold. Cloning is cheap.
#[derive(Clone)]
pub struct Auditor {
    queue: Option<mpsc::Sender<Record>>,
    capacity: usize,
    on_full: OnAuditFull,
    redact: bool,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("enabled", &self.queue.is_some())
            .field("on_full", &self.on_full)
            .finish()
    }
}

/// Ends the writer: waits until every queued record is written.
#[derive(Debug)]
pub struct WriterHandle(Option<std::thread::JoinHandle<()>>);

impl WriterHandle {
    pub fn finish(mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

impl Auditor {
    /// An auditor that records nothing.
    pub fn off() -> Auditor {
        Auditor {
            queue: None,
            capacity: 0,
            on_full: OnAuditFull::Drop,
            redact: false,
            counters: Arc::default(),
        }
    }

    /// Opens the sink and starts the writer thread. The thread ends once every clone of the
    /// auditor is dropped and the queue is written.
    pub fn start(config: &Audit, redactor: Redactor) -> std::io::Result<(Auditor, WriterHandle)> {
        let (sink, head) = match config.sink {
            AuditSink::Off => return Ok((Auditor::off(), WriterHandle(None))),
            AuditSink::Stdout => (Sink::Stdout, ChainHead::default()),
            AuditSink::File => {
                let path = config.path.as_ref().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "audit.path is required")
                })?;
                let (file, head) = FileSink::open(path, config.max_file_bytes)?;
                (Sink::File(file), head)
            }
        };
        let (tx, rx) = mpsc::channel(config.queue);
        let counters = Arc::new(Counters::default());
        let redact = config.statement_text == StatementText::Redacted;
        let writer = Writer {
            sink,
            head,
            rx,
            redactor,
            redact,
            memo: HashMap::new(),
            counters: counters.clone(),
            out: Vec::with_capacity(BATCH * 640),
        };
        let thread = std::thread::Builder::new()
            .name("pgbastion-audit".into())
            .spawn(move || writer.run())?;
        Ok((
            Auditor {
                queue: Some(tx),
                capacity: config.queue,
                on_full: config.on_full,
                redact,
                counters,
            },
            WriterHandle(Some(thread)),
        ))
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Whether statement text is redacted before it is written.
    pub fn redacts(&self) -> bool {
        self.redact
    }

    /// Queues a record; with `on_full = "block"` waits for room.
    pub async fn record(&self, record: Record) {
        let Some(queue) = &self.queue else { return };
        match self.on_full {
            OnAuditFull::Block => match queue.send(record).await {
                Ok(()) => {
                    self.counters.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => self.lost("the audit writer has stopped"),
            },
            OnAuditFull::Drop => {
                if let Err(err) = queue.try_send(record).inspect(|()| {
                    self.counters.queued.fetch_add(1, Ordering::Relaxed);
                }) {
                    match err {
                        mpsc::error::TrySendError::Full(_) => self.lost("the audit queue is full"),
                        mpsc::error::TrySendError::Closed(_) => {
                            self.lost("the audit writer has stopped")
                        }
                    }
                }
            }
        }
    }

    fn lost(&self, why: &str) {
        let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // One log line per thousand, not one per record, when the sink cannot keep up.
        if dropped % 1000 == 1 {
            tracing::error!(dropped, "audit record dropped: {why}");
        }
    }

    /// Records waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| self.capacity - q.capacity())
    }

    /// Whether every record queued so far is written.
    pub fn flushed(&self) -> bool {
        self.counters.written.load(Ordering::Relaxed)
            >= self.counters.queued.load(Ordering::Relaxed)
    }

    /// Waits until every record queued so far is written, for at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.flushed() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Failed writes to the sink (each retried).
    pub fn failures(&self) -> u64 {
        self.counters.failures.load(Ordering::Relaxed)
    }
}

struct Writer {
    sink: Sink,
    head: ChainHead,
    rx: mpsc::Receiver<Record>,
    redactor: Redactor,
    /// `statement_text = "redacted"`; with "full" texts are written as sent.
    redact: bool,
    memo: HashMap<Arc<str>, Arc<str>>,
    counters: Arc<Counters>,
    /// The batch's lines, kept between batches for its capacity.
    out: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(record) = self.rx.blocking_recv() {
            batch.push(record);
            while batch.len() < BATCH {
                match self.rx.try_recv() {
                    Ok(record) => batch.push(record),
                    Err(_) => break,
                }
            }
            let full = batch.len() == BATCH;
            self.write(&mut batch);
            if !full {
                // Let records gather: one wake-up and one write per few milliseconds rather than
                // per statement, which on a busy proxy costs more CPU than the records do.
                std::thread::sleep(GATHER);
            }
        }
    }

    /// Writes a batch, retrying until the sink takes it. Lines are encoded in place in the
    /// batch's buffer and hashed there.
    fn write(&mut self, batch: &mut Vec<Record>) {
        let mut out = std::mem::take(&mut self.out);
        let mut head = self.head.clone();
        let mut pending = 0;
        for mut record in batch.drain(..) {
            self.redact(&mut record);
            let start = out.len();
            record.encode(head.seq, &head.prev, &mut out);
            let len = (out.len() - start) as u64 + 1;
            if !self.sink.fits(start as u64, len) {
                // The line starts the next file: what comes before it goes to this one.
                let line = out.split_off(start);
                self.commit(&mut out, &head, pending);
                pending = 0;
                self.retry(|sink| sink.rotate());
                out = line;
            }
            let start = out.len() - (len as usize - 1);
            head = ChainHead {
                prev: line_hash(&out[start..]),
                seq: head.seq + 1,
            };
            out.push(b'\n');
            pending += 1;
        }
        self.commit(&mut out, &head, pending);
        self.out = out;
    }

    fn commit(&mut self, out: &mut Vec<u8>, head: &ChainHead, records: u64) {
        if out.is_empty() {
            return;
        }
        let mut done = 0;
        self.retry(|sink| sink.write(out, &mut done));
        out.clear();
        self.head = head.clone();
        self.counters.written.fetch_add(records, Ordering::Relaxed);
    }

    fn retry(&mut self, mut op: impl FnMut(&mut Sink) -> std::io::Result<()>) {
        loop {
            match op(&mut self.sink) {
                Ok(()) => return,
                Err(err) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %err, "audit sink failed; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn redact(&mut self, record: &mut Record) {
        let Event::Statement(statement) = &mut record.event else {
            return;
        };
        if !(self.redact && statement.redact) {
            return;
        }
        statement.redact = false;
        if let Some(redacted) = self.memo.get(&statement.text) {
            statement.text = redacted.clone();
            return;
        }
        if self.memo.len() >= REDACTED_MEMO {
            self.memo.clear();
        }
        let redacted: Arc<str> = (self.redactor)(&statement.text).into();
        self.memo.insert(statement.text.clone(), redacted.clone());
        statement.text = redacted;
    }
}
