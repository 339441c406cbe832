//! The decision key and the redaction of a plain statement, written in one scan of its bytes
//! without the SQL tokenizer, which costs more than the rest of a cached decision (for the
//! 200-byte SELECT of crates/pgbastion-proxy/benches/decision_cache.rs: 31.7 us through the
//! tokenizer, 1.6 us for this key and the cache lookup together).
//!
//! Plain means made only of: ASCII words, unsigned numbers (`7`, `1.5`), `$n` parameters,
//! `'...'` strings and `"..."` identifiers without backslashes, the punctuation and operators
//! `( ) , ; . : = < > + - * /`, and whitespace. Anything else — comments, dollar quotes,
//! prefixed strings (`E''`, `B''`, `U&''`, ...), exponents, other operators, non-ASCII text
//! outside quotes, control characters — gives None, and the caller
//! takes the tokenizer's way. Whatever is not certainly a number stays in the key as it is:
//! the key can only be more particular than the tokenizer's, never merge statements that it
//! keeps apart (tests/cache_keys.rs checks this on generated statements).

/// What starts every plain key: tokenizer keys never start with it, so the two never meet.
const PLAIN: char = '\u{1}';

/// What stands for a number in a plain key: a control character, which makes a text not
/// plain, so it cannot come from the text itself (`#`, a PostgreSQL operator, could).
const NUMBER: char = '\u{2}';

/// The key (the text with each number replaced by `NUMBER`) and, when `redact`, the text with
/// each literal replaced by `$0` (as `crate::redact` writes it).
pub(crate) fn plain_key(sql: &str, redact: bool) -> Option<(String, Option<String>)> {
    let bytes = sql.as_bytes();
    let mut key = String::with_capacity(sql.len() + 1);
    key.push(PLAIN);
    let mut redacted = redact.then(|| String::with_capacity(sql.len()));
    // How far `sql` is copied into the key and into the redaction.
    let (mut in_key, mut in_redacted) = (0, 0);
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                while i < bytes.len() && word(bytes[i]) {
                    i += 1;
                }
                // A quote right after a word makes a prefixed string (E'..', X'..', N'..',
                // and to the tokenizer b".."); `U&'..'` and `U&".."` are escaped strings and
                // identifiers.
                match (bytes.get(i), bytes.get(i + 1)) {
                    (Some(b'\'' | b'"'), _) | (Some(b'&'), Some(b'\'' | b'"')) => return None,
                    _ => {}
                }
            }
            b'0'..=b'9' => {
                // `.5` and `t.1` are not plain.
                if i > 0 && bytes[i - 1] == b'.' {
                    return None;
                }
                let start = i;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if bytes.get(i) == Some(&b'.') && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                // `1e5`, `1_000`, `0x1f`, `1.` and `1.5.2` are not plain.
                if bytes.get(i).is_some_and(|&b| word(b) || b == b'.') {
                    return None;
                }
                key.push_str(&sql[in_key..start]);
                key.push(NUMBER);
                in_key = i;
                if let Some(redacted) = &mut redacted {
                    redacted.push_str(&sql[in_redacted..start]);
                    redacted.push_str("$0");
                    in_redacted = i;
                }
            }
            b'$' => {
                // `$n`; anything else after `$` starts a dollar-quoted string.
                i += 1;
                if !bytes.get(i).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
                if bytes.get(i).is_some_and(|&b| word(b)) {
                    return None;
                }
            }
            b'\'' => {
                // The key keeps strings (decisions depend on them); the redaction does not.
                let start = i;
                i = quoted_end(bytes, i, b'\'')?;
                if bytes[start..i].contains(&b'\\') {
                    // What a backslash means depends on standard_conforming_strings.
                    return None;
                }
                if let Some(redacted) = &mut redacted {
                    redacted.push_str(&sql[in_redacted..start]);
                    redacted.push_str("$0");
                    in_redacted = i;
                }
            }
            b'"' => {
                let start = i;
                i = quoted_end(bytes, i, b'"')?;
                // The tokenizer reads a backslash in an identifier as an escape.
                if bytes[start..i].contains(&b'\\') {
                    return None;
                }
            }
            // `.5` is a number, and the tokenizer reads `._` as one too.
            b'.' if bytes
                .get(i + 1)
                .is_some_and(|&b| b.is_ascii_digit() || b == b'_') =>
            {
                return None
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => return None,
            b'/' if bytes.get(i + 1) == Some(&b'*') => return None,
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            // Punctuation and the common operators. Others (`@`, `?`, `#`, `!`, `|`, `~`,
            // ...) the tokenizer reads in ways of its own: not plain.
            b'(' | b')' | b',' | b';' | b'.' | b':' | b'=' | b'<' | b'>' | b'+' | b'-' | b'*'
            | b'/' => i += 1,
            _ => return None,
        }
    }
    key.push_str(&sql[in_key..]);
    if let Some(redacted) = &mut redacted {
        redacted.push_str(&sql[in_redacted..]);
    }
    Some((key, redacted))
}

/// Where the quoted part starting at `start` ends (just after its closing quote; a doubled
/// quote inside is one quote character). None when it is not closed.
fn quoted_end(bytes: &[u8], start: usize, quote: u8) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let at = i + bytes[i..].iter().position(|&b| b == quote)?;
        if bytes.get(at + 1) == Some(&quote) {
            i = at + 2;
        } else {
            return Some(at + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sql: &str) -> Option<String> {
        plain_key(sql, false).map(|(key, _)| key)
    }

    #[test]
    fn numbers_become_placeholders_and_nothing_else_changes() {
        let (whole, redacted) = plain_key(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42 AND x <> 'a''7' AND \"t1\".c = 1.5;",
            true,
        )
        .unwrap();
        assert_eq!(
            whole,
            "\u{1}SELECT abalance FROM pgbench_accounts WHERE aid = \u{2} AND x <> 'a''7' AND \"t1\".c = \u{2};"
        );
        assert_eq!(
            redacted.unwrap(),
            "SELECT abalance FROM pgbench_accounts WHERE aid = $0 AND x <> $0 AND \"t1\".c = $0;"
        );
        assert_eq!(
            key("SELECT t1, $1, x::int4 FROM t2"),
            Some("\u{1}SELECT t1, $1, x::int4 FROM t2".into())
        );
        assert_eq!(key("SELECT 1"), key("SELECT 99"));
        // `#` is an operator: never the same statement as a number.
        assert_ne!(
            key("SELECT 1 ssn FROM people"),
            key("SELECT # ssn FROM people")
        );
        assert_ne!(key("SELECT 1"), key("SELECT  1"));
        assert_ne!(key("SELECT $1"), key("SELECT $2"));
        assert_ne!(key("SELECT 'a'"), key("SELECT 'b'"));
    }

    #[test]
    fn anything_not_plain_takes_the_tokenizer() {
        for sql in [
            "SELECT 1 -- c",
            "SELECT /* c */ 1",
            "SELECT $$a$$",
            "SELECT $tag$a$tag$",
            "SELECT E'a'",
            "SELECT e'\\x'",
            "SELECT X'ff'",
            "SELECT U&'\\0041'",
            "SELECT U&\"x\"",
            "SELECT 'a\\'",
            "SELECT 1e5",
            "SELECT 1.5e3",
            "SELECT .5",
            "SELECT 1.",
            "SELECT 1_000",
            "SELECT 0x1f",
            "SELECT t.1",
            "SELECT 'open",
            "SELECT \"open",
            "SELECT é",
            "SELECT 1\u{0}",
            "SELECT $1a",
            "SELECT \\",
            "SELECT # ssn",
            "SELECT data ? 'k'",
            "SELECT @ x",
        ] {
            assert_eq!(plain_key(sql, true), None, "{sql}");
        }
    }
}
