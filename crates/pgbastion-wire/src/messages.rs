//! Messages pgbastion composes itself (errors, notices, authentication, key data) and
//! decoders for the client messages it must read (startup, password, query, parse).
//! Everything else is relayed as bytes.

use crate::frame::Fields;
use crate::{Result, WireError};
use bytes::{BufMut, BytesMut};
use pgwire::messages::response::{ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};
use pgwire::messages::Message;

/// Severity of an error or notice. FATAL ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Warning,
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
        }
    }
}

/// The fields of an ErrorResponse or NoticeResponse pgbastion sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl Report {
    pub fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        Report {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    fn fields(&self) -> Vec<(u8, String)> {
        let mut fields = vec![
            (b'S', self.severity.as_str().to_string()),
            (b'V', self.severity.as_str().to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(detail) = &self.detail {
            fields.push((b'D', detail.clone()));
        }
        if let Some(hint) = &self.hint {
            fields.push((b'H', hint.clone()));
        }
        fields
    }

    /// Appends the report as an ErrorResponse (ERROR, FATAL) or NoticeResponse (others).
    pub fn encode(&self, out: &mut BytesMut) {
        let fields = self.fields();
        let result = match self.severity {
            Severity::Error | Severity::Fatal => ErrorResponse::new(fields).encode(out),
            Severity::Warning | Severity::Notice => NoticeResponse::new(fields).encode(out),
        };
        result.expect("error fields have no size limit");
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out
    }
}

pub fn auth_cleartext_password(out: &mut BytesMut) {
    Authentication::CleartextPassword
        .encode(out)
        .expect("fixed-size message");
}

pub fn auth_ok(out: &mut BytesMut) {
    Authentication::Ok.encode(out).expect("fixed-size message");
}

pub fn backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    BackendKeyData::new(pid, SecretKey::I32(secret))
        .encode(out)
        .expect("fixed-size message");
}

pub fn parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    ParameterStatus::new(name.to_string(), value.to_string())
        .encode(out)
        .expect("parameter names and values are short");
}

/// ReadyForQuery with the transaction status byte ('I', 'T' or 'E').
pub fn ready_for_query(status: u8, out: &mut BytesMut) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    ReadyForQuery::new(status)
        .encode(out)
        .expect("fixed-size message");
}

/// NegotiateProtocolVersion: the newest minor version we speak (0) and the `_pq_.` options
/// we do not know. <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>
pub fn negotiate_protocol_version(newest_minor: i32, unknown: Vec<String>, out: &mut BytesMut) {
    NegotiateProtocolVersion::new(newest_minor, unknown)
        .encode(out)
        .expect("startup option names are capped by the startup packet size");
}

/// Writes a complete message with `tag` and `body`.
pub fn raw(tag: u8, body: &[u8], out: &mut BytesMut) {
    out.reserve(5 + body.len());
    out.put_u8(tag);
    out.put_i32(4 + body.len() as i32);
    out.put_slice(body);
}

/// The text of a Query ('Q') message body.
pub fn query_text(body: &[u8]) -> Result<&str> {
    Fields::new(body).cstr()
}

/// A Parse ('P') message: statement name and query text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseMessage<'a> {
    pub statement: &'a str,
    pub query: &'a str,
}

pub fn parse_message(body: &[u8]) -> Result<ParseMessage<'_>> {
    let mut fields = Fields::new(body);
    Ok(ParseMessage {
        statement: fields.cstr()?,
        query: fields.cstr()?,
    })
}

/// A FunctionCall ('F') message's function OID.
pub fn function_call_oid(body: &[u8]) -> Result<u32> {
    Ok(Fields::new(body).i32()? as u32)
}

/// The password in a PasswordMessage ('p') body, without its NUL terminator.
pub fn password(body: &[u8]) -> Result<&str> {
    let mut fields = Fields::new(body);
    let password = fields.cstr_bytes()?;
    std::str::from_utf8(password).map_err(|_| WireError::protocol("password is not valid UTF-8"))
}

/// The fields of an ErrorResponse or NoticeResponse body, as (code, value) pairs.
pub fn error_fields(body: &[u8]) -> Result<Vec<(u8, String)>> {
    let mut fields = Fields::new(body);
    let mut out = Vec::new();
    loop {
        let code = fields.take(1)?[0];
        if code == 0 {
            return Ok(out);
        }
        let value = String::from_utf8_lossy(fields.cstr_bytes()?).into_owned();
        out.push((code, value));
    }
}

/// The value of one field of an ErrorResponse body ('C' SQLSTATE, 'M' message, ...).
pub fn error_field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_through_error_fields() {
        let report = Report::new(
            Severity::Fatal,
            crate::codes::INVALID_PASSWORD,
            "token expired",
        )
        .hint("get a fresh token");
        let bytes = report.to_bytes();
        assert_eq!(bytes[0], b'E');
        let fields = error_fields(&bytes[5..]).unwrap();
        assert_eq!(error_field(&fields, b'C'), Some("28P01"));
        assert_eq!(error_field(&fields, b'S'), Some("FATAL"));
        assert_eq!(error_field(&fields, b'M'), Some("token expired"));
        assert_eq!(error_field(&fields, b'H'), Some("get a fresh token"));
    }

    #[test]
    fn notices_are_notice_responses() {
        let bytes = Report::new(Severity::Warning, crate::codes::WARNING, "soon").to_bytes();
        assert_eq!(bytes[0], b'N');
    }

    #[test]
    fn parse_messages_decode_name_and_query() {
        let parsed = parse_message(b"s1\0SELECT 1\0\0\0").unwrap();
        assert_eq!(parsed.statement, "s1");
        assert_eq!(parsed.query, "SELECT 1");
    }

    #[test]
    fn query_text_must_be_utf8() {
        assert!(query_text(b"SELECT '\xff'\0").is_err());
        assert_eq!(query_text(b"SELECT 1\0").unwrap(), "SELECT 1");
    }
}
