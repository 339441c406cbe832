//! JSON written straight into the writer's buffer: a record becomes its line without
//! intermediate values or strings (serde_json's `Value` and `format!` cost more than the rest
//! of a record's journey together).
//!
//! Strings escape what JSON requires (`"`, `\` and controls below 0x20) and also DEL and the
//! C1 controls (U+0080..U+009F), which can drive terminals and log tools: a client's
//! `application_name` or statement text cannot forge a line or a terminal sequence.

/// An object being written; `close` ends it.
pub(crate) struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    pub(crate) fn open(out: &'a mut Vec<u8>) -> Object<'a> {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// Continues an object whose opening and first field `out` already holds.
    pub(crate) fn resume(out: &'a mut Vec<u8>) -> Object<'a> {
        Object { out, empty: false }
    }

    pub(crate) fn close(self) {
        self.out.push(b'}');
    }

    /// Keys are fixed ASCII names: written as they are.
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    pub(crate) fn str(&mut self, key: &str, value: &str) -> &mut Self {
        string(self.key(key), value);
        self
    }

    /// `null` when absent.
    pub(crate) fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.str(key, value),
            None => self.raw(key, "null"),
        }
    }

    pub(crate) fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        number(self.key(key), value);
        self
    }

    /// `null` when absent.
    pub(crate) fn opt_u64(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        match value {
            Some(value) => self.u64(key, value),
            None => self.raw(key, "null"),
        }
    }

    /// `null` for what JSON cannot hold (NaN, infinities).
    pub(crate) fn f64(&mut self, key: &str, value: f64) -> &mut Self {
        if value.is_finite() {
            // Display never uses an exponent, so the digits are a valid JSON number.
            let text = value.to_string();
            self.raw(key, &text)
        } else {
            self.raw(key, "null")
        }
    }

    pub(crate) fn strs<'s>(
        &mut self,
        key: &str,
        values: impl IntoIterator<Item = &'s str>,
    ) -> &mut Self {
        let out = self.key(key);
        out.push(b'[');
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, value);
        }
        out.push(b']');
        self
    }

    /// A value that is JSON already (built by this module).
    pub(crate) fn raw(&mut self, key: &str, json: &str) -> &mut Self {
        self.key(key).extend_from_slice(json.as_bytes());
        self
    }
}

/// Bytes that may need an escape: controls, `"`, `\\`, DEL and 0xC2 (which starts C1 controls).
const ATTENTION: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table[0x7f] = true;
    table[0xc2] = true;
    table
};

/// A quoted, escaped JSON string.
pub(crate) fn string(out: &mut Vec<u8>, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Runs of bytes that need no escape are copied whole.
    let mut clean = 0;
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if !ATTENTION[usize::from(byte)] {
            i += 1;
            continue;
        }
        // C1 controls are U+0080..U+009F: 0xC2 0x80..0x9F in UTF-8.
        let c1 = byte == 0xc2
            && bytes
                .get(i + 1)
                .is_some_and(|next| (0x80..0xa0).contains(next));
        if byte == 0xc2 && !c1 {
            i += 1;
            continue;
        }
        out.extend_from_slice(&bytes[clean..i]);
        let (code, width) = if c1 { (bytes[i + 1], 2) } else { (byte, 1) };
        match code {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(code >> 4)],
                HEX[usize::from(code & 15)],
            ]),
        }
        i += width;
        clean = i;
    }
    out.extend_from_slice(&bytes[clean..]);
    out.push(b'"');
}

/// A decimal number.
pub(crate) fn number(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(value: &str) -> String {
        let mut out = Vec::new();
        string(&mut out, value);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_round_trip_and_controls_are_escaped() {
        let nasty = "a\"b\\c\nd\re\tf\u{1}\u{1b}[31m\u{7f}\u{80}\u{9b}\u{9f}\u{a0}é€😀 end";
        let json = quoted(nasty);
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), nasty);
        for forbidden in ['\n', '\r', '\u{1b}', '\u{7f}', '\u{80}', '\u{9b}', '\u{9f}'] {
            assert!(!json.contains(forbidden), "{forbidden:?} left in {json}");
        }
        // U+00A0 and above are not controls: written as they are.
        assert!(json.contains("\u{a0}é€😀 end"));
        assert_eq!(quoted(""), "\"\"");
        assert_eq!(quoted("plain"), "\"plain\"");
    }

    #[test]
    fn numbers_and_objects() {
        for value in [0, 7, 10, 1234567890, u64::MAX] {
            let mut out = Vec::new();
            number(&mut out, value);
            assert_eq!(String::from_utf8(out).unwrap(), value.to_string());
        }
        let mut out = Vec::new();
        let mut object = Object::open(&mut out);
        object
            .str("a", "x")
            .opt_str("b", None)
            .u64("c", 3)
            .opt_u64("d", None)
            .f64("e", 0.25)
            .f64("f", f64::NAN)
            .strs("g", ["p", "q"])
            .raw("h", "{}");
        object.close();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"a":"x","b":null,"c":3,"d":null,"e":0.25,"f":null,"g":["p","q"],"h":{}})
        );
    }
}
