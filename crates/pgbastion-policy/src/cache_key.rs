//! The key under which a decision may be reused: the statement's tokens with every numeric
//! literal replaced. No rule of `decide` depends on the value of a number (classes, names,
//! settings, string arguments and WHERE structure do not change with it), so
//! `SELECT ... WHERE aid = 1` and `... WHERE aid = 2` share one decision. A rule that ever
//! looks at a number's value (a LIMIT cap, say) must change this key.

use crate::plain_text::plain_key;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};
use std::fmt::Write;

/// None when the text does not tokenize (it will not parse either, and is decided uncached).
/// A plain statement's key comes from a scan of its text (`plain_text`), others' from the
/// tokenizer.
pub fn decision_key(sql: &str) -> Option<String> {
    match plain_key(sql, false) {
        Some((key, _)) => Some(key),
        None => tokenizer_key(sql),
    }
}

/// The decision key and the redacted text (`crate::redact`) from one pass, which is most of
/// the cost of either: for a session that audits redacted statements.
pub fn decision_key_and_redacted(sql: &str) -> Option<(String, String)> {
    if let Some((key, Some(redacted))) = plain_key(sql, true) {
        return Some((key, redacted));
    }
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    Some((
        key_of(sql, &tokens),
        crate::redact::redact_tokens(sql, &tokens),
    ))
}

/// The key from the tokenizer (what `decision_key` falls back to).
pub fn tokenizer_key(sql: &str) -> Option<String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    Some(key_of(sql, &tokens))
}

fn key_of(sql: &str, tokens: &[Token]) -> String {
    let mut key = String::with_capacity(sql.len() + 16);
    let mut after_space = false;
    for token in tokens {
        match token {
            // Whitespace and comments: how much does not matter, whether there is any does
            // (`U&"x"` is one identifier, `U &"x"` an expression).
            Token::Whitespace(_) => {
                // Before the first token and after the last, whitespace separates nothing.
                if !after_space && !key.is_empty() {
                    key.push_str(" \0");
                    after_space = true;
                }
                continue;
            }
            Token::Number(..) => key.push('#'),
            // The two commonest kinds, written directly (formatting costs more than the
            // tokenizer here). Lower-case tags: Debug output below starts upper-case.
            Token::Word(word) => {
                key.push('w');
                key.push(word.quote_style.unwrap_or('-'));
                key.push_str(&word.value);
            }
            Token::SingleQuotedString(text) => {
                key.push('s');
                key.push_str(text);
            }
            // Debug names the kind of token and escapes its text: unambiguous.
            other => {
                let _ = write!(key, "{other:?}");
            }
        }
        // NUL cannot occur in a statement's text (messages carry C strings).
        key.push('\0');
        after_space = false;
    }
    if key.ends_with(" \0") {
        key.truncate(key.len() - 2);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_gives_the_key_and_the_redaction() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            "UPDATE t SET note = 'x' WHERE id = 7 -- why",
            "SELECT $$a$$, E'b', 1.5e3",
        ] {
            let (key, redacted) = decision_key_and_redacted(sql).unwrap();
            assert_eq!(key, decision_key(sql).unwrap());
            assert_eq!(redacted, crate::redact(sql));
        }
        assert_eq!(decision_key_and_redacted("SELECT 'open"), None);
    }

    #[test]
    fn numbers_share_a_key_and_everything_else_does_not() {
        // The tokenizer's key; plain statements' keys are in plain_text.rs.
        let key = |sql| tokenizer_key(sql).unwrap();
        assert_eq!(
            key("SELECT * FROM t WHERE id = 1"),
            key("SELECT  *  FROM t WHERE id = 42 -- x")
        );
        assert_eq!(key("SELECT 1.5e3"), key("SELECT 7"));
        assert_ne!(
            key("SELECT * FROM t WHERE id = 1"),
            key("SELECT * FROM u WHERE id = 1")
        );
        assert_ne!(key("SELECT 'a', 'b'"), key("SELECT 'a'', ''b'"));
        assert_ne!(key("SET x = 'a'"), key("SET x = 'b'"));
        assert_ne!(
            key("SELECT set_config('jit', '1', false)"),
            key("SELECT set_config('role', '1', false)")
        );
        assert_ne!(key("SELECT \"T\""), key("SELECT t"));
        assert_ne!(key("SELECT \"t\""), key("SELECT t"));
        assert_ne!(key("SELECT 'a'"), key("SELECT a"));
        assert_ne!(key("SELECT 'a'"), key("SELECT E'a'"));
        assert_ne!(key("SELECT a b"), key("SELECT ab"));
        assert_ne!(key("SELECT U&\"x\""), key("SELECT U &\"x\""));
        assert_eq!(key("SELECT  a /* c */ b"), key("SELECT a b"));
        assert_ne!(key("SELECT $1"), key("SELECT $2"));
    }

    #[test]
    fn text_that_does_not_tokenize_has_no_key() {
        assert_eq!(decision_key("SELECT 'unterminated"), None);
    }
}
