//! Statement text for the audit log without its data: every literal (numbers and strings in
//! all their forms) becomes the placeholder `$0`. The result still parses, so policy replay
//! can decide it again.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};
use std::fmt::Write;

/// What a statement that does not even tokenize is recorded as: nothing of it is safe to keep.
pub const UNREADABLE: &str = "/* pgbastion: statement not tokenizable, text withheld */";

pub fn redact(sql: &str) -> String {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return UNREADABLE.to_string();
    };
    redact_tokens(sql, &tokens)
}

/// `redact` of `sql` tokenized.
pub(crate) fn redact_tokens(sql: &str, tokens: &[Token]) -> String {
    let mut out = String::with_capacity(sql.len());
    for token in tokens {
        match token {
            Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_) => out.push_str("$0"),
            // Written in place: a String per token would be the redaction's main cost.
            other => {
                let _ = write!(out, "{other}");
            }
        }
    }
    // A trailing `--` comment is written back with a newline the text did not have.
    if out.ends_with('\n') && !sql.ends_with('\n') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_of_every_form_become_placeholders() {
        assert_eq!(
            redact("SELECT * FROM customers WHERE ssn = '078-05-1120' AND id > 42"),
            "SELECT * FROM customers WHERE ssn = $0 AND id > $0"
        );
        assert_eq!(
            redact("SELECT E'a\\'b', $$x$$, $tag$y$tag$, U&'\\0041', X'ff', 1.5e3 -- note"),
            "SELECT $0, $0, $0, $0, $0, $0 -- note"
        );
        assert_eq!(redact("SELECT \"Name\" FROM t"), "SELECT \"Name\" FROM t");
        assert_eq!(redact("SELECT 'unterminated"), UNREADABLE);
    }

    #[test]
    fn redacted_text_still_parses() {
        for sql in [
            "UPDATE orders SET total = 10.5 WHERE id = 7 AND note = 'x'",
            "INSERT INTO t VALUES (1, 'a'), (2, E'b')",
            "SELECT set_config('search_path', 'public', false)",
        ] {
            crate::analyze(&redact(sql)).unwrap_or_else(|err| panic!("{sql}: {err}"));
        }
    }
}
