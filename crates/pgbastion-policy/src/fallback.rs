//! Statements sqlparser does not parse but real clients send, recognised from their tokens.
//!
//! When a message does not parse as a whole, it is split at top-level semicolons (the
//! tokenizer knows quoting and dollar quoting), each statement is parsed on its own, and the
//! few that still fail are matched here. The forms are closed: keywords and numbers only, no
//! expressions and no names of relations, so nothing they could do escapes the analysis.
//! Anything else remains unparsed and is denied.
//!
//! Also here: Unicode-escaped identifiers (`U&"..."`), which sqlparser reads as an expression
//! `U & "..."`. Any text holding `&"` is parsed from tokens in which they are decoded first, so
//! the proxy and PostgreSQL see the same names.

use pgbastion_config::StatementClass;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::analyze::{analyze_statement, StatementInfo};
use crate::names::Name;
use sqlparser::ast::{Ident, ObjectName};
use sqlparser::tokenizer::Span;

/// The analysis of each statement of `sql`, or None when one is neither parsed nor recognised.
pub fn analyze_pieces(sql: &str) -> Option<Vec<StatementInfo>> {
    let dialect = PostgreSqlDialect {};
    let tokens = tokens(sql).ok()?;
    let mut out = Vec::new();
    for statement in tokens.split(|t| *t == Token::SemiColon) {
        let significant: Vec<&Token> = statement
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        if significant.is_empty() {
            continue;
        }
        let parsed = Parser::new(&dialect)
            .with_tokens(statement.to_vec())
            .parse_statements();
        match parsed {
            Ok(statements) if statements.len() == 1 => out.push(analyze_statement(&statements[0])),
            _ => out.push(recognise(&significant)?),
        }
    }
    Some(out)
}

/// The statement's tokens, with Unicode-escaped identifiers decoded.
pub fn tokens(sql: &str) -> Result<Vec<Token>, String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize()
        .map_err(|err| err.to_string())?;
    decode_unicode_identifiers(tokens)
        .ok_or_else(|| "invalid Unicode escape in a U&\"...\" identifier".to_string())
}

/// Whether `sql` may hold a Unicode-escaped identifier (`U&"`), which sqlparser would read as
/// `U & "..."` — an expression — where PostgreSQL reads one identifier.
pub fn has_unicode_identifier(sql: &str) -> bool {
    sql.contains("&\"")
}

/// `U&"d\0061t\+000061"` and `U&"d!0061t" UESCAPE '!'`, which sqlparser reads as `U`, `&`
/// and a quoted identifier, become the quoted identifier PostgreSQL decodes them to. None when
/// an escape is malformed (PostgreSQL refuses those too).
fn decode_unicode_identifiers(tokens: Vec<Token>) -> Option<Vec<Token>> {
    let mut out: Vec<Token> = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let prefix = matches!(&tokens[i], Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("u"))
            && tokens.get(i + 1) == Some(&Token::Ampersand);
        let quoted = match tokens.get(i + 2) {
            Some(Token::Word(w)) if prefix && w.quote_style == Some('"') => Some(w),
            _ => None,
        };
        let Some(word) = quoted else {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        };
        i += 3;
        // An optional UESCAPE 'c' after whitespace.
        let mut escape = '\\';
        let mut j = i;
        while matches!(tokens.get(j), Some(Token::Whitespace(_))) {
            j += 1;
        }
        if matches!(tokens.get(j), Some(Token::Word(w)) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("uescape"))
        {
            let mut k = j + 1;
            while matches!(tokens.get(k), Some(Token::Whitespace(_))) {
                k += 1;
            }
            match tokens.get(k) {
                Some(Token::SingleQuotedString(c)) if c.chars().count() == 1 => {
                    escape = c.chars().next()?;
                    if escape.is_ascii_hexdigit()
                        || matches!(escape, '+' | '\'' | '"')
                        || escape.is_whitespace()
                    {
                        return None;
                    }
                    i = k + 1;
                }
                _ => return None,
            }
        }
        let mut decoded = word.clone();
        decoded.value = decode_unicode_escapes(&word.value, escape)?;
        decoded.keyword = sqlparser::keywords::Keyword::NoKeyword;
        out.push(Token::Word(decoded));
    }
    Some(out)
}

/// `\XXXX` (4 hex digits), `\+XXXXXX` (6) and a doubled escape character, with UTF-16
/// surrogate pairs joined, as PostgreSQL's scanner decodes them.
fn decode_unicode_escapes(text: &str, escape: char) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut pending_high: Option<u32> = None;
    while let Some(c) = chars.next() {
        if c != escape {
            if pending_high.is_some() {
                return None;
            }
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&escape) {
            chars.next();
            if pending_high.is_some() {
                return None;
            }
            out.push(escape);
            continue;
        }
        let digits = if chars.peek() == Some(&'+') {
            chars.next();
            6
        } else {
            4
        };
        let hex: String = (0..digits).filter_map(|_| chars.next()).collect();
        if hex.len() != digits || !hex.chars().all(|h| h.is_ascii_hexdigit()) {
            return None;
        }
        let code = u32::from_str_radix(&hex, 16).ok()?;
        match (pending_high.take(), code) {
            (None, 0xD800..=0xDBFF) => pending_high = Some(code),
            (Some(high), 0xDC00..=0xDFFF) => out.push(char::from_u32(
                0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00),
            )?),
            (Some(_), _) => return None,
            (None, 0) => return None,
            (None, code) => out.push(char::from_u32(code)?),
        }
    }
    match pending_high {
        Some(_) => None,
        None => Some(out),
    }
}

/// The upper-cased keyword of an unquoted word, or None for anything else.
fn keyword(token: &Token) -> Option<String> {
    match token {
        Token::Word(word) if word.quote_style.is_none() => Some(word.value.to_ascii_uppercase()),
        _ => None,
    }
}

fn recognise(tokens: &[&Token]) -> Option<StatementInfo> {
    let words: Vec<Option<String>> = tokens.iter().map(|t| keyword(t)).collect();
    let word = |i: usize| words.get(i).and_then(|w| w.as_deref());
    match word(0)? {
        "BEGIN" => {
            let start = usize::from(matches!(word(1), Some("WORK" | "TRANSACTION")));
            transaction_modes(&tokens[1 + start..], &words[1 + start..])
        }
        "START" if word(1) == Some("TRANSACTION") => transaction_modes(&tokens[2..], &words[2..]),
        "SET" if word(1) == Some("TRANSACTION") => transaction_modes(&tokens[2..], &words[2..]),
        "MOVE" => cursor_move(&tokens[1..]),
        "TABLE" => table(&tokens[1..]),
        _ => None,
    }
}

/// `ISOLATION LEVEL ...`, `READ ONLY`, `READ WRITE`, `[NOT] DEFERRABLE`, separated by commas
/// or spaces, as PostgreSQL's grammar allows.
fn transaction_modes(tokens: &[&Token], words: &[Option<String>]) -> Option<StatementInfo> {
    let mut info = StatementInfo::default();
    info.classes.insert(StatementClass::Transaction);
    let word = |i: usize| words.get(i).and_then(|w| w.as_deref());
    let mut i = 0;
    while i < tokens.len() {
        if *tokens[i] == Token::Comma {
            i += 1;
            continue;
        }
        let taken = match (word(i)?, word(i + 1), word(i + 2)) {
            ("ISOLATION", Some("LEVEL"), Some("SERIALIZABLE")) => 3,
            ("ISOLATION", Some("LEVEL"), Some("REPEATABLE" | "READ")) => {
                match (word(i + 2), word(i + 3)) {
                    (Some("REPEATABLE"), Some("READ")) => 4,
                    (Some("READ"), Some("COMMITTED" | "UNCOMMITTED")) => 4,
                    _ => return None,
                }
            }
            ("READ", Some("ONLY"), _) => 2,
            ("READ", Some("WRITE"), _) => {
                info.read_write = true;
                2
            }
            ("DEFERRABLE", _, _) => 1,
            ("NOT", Some("DEFERRABLE"), _) => 2,
            _ => return None,
        };
        i += taken;
    }
    Some(info)
}

/// `TABLE [ONLY] name [*]`: SQL's shorthand for `SELECT * FROM name`.
fn table(tokens: &[&Token]) -> Option<StatementInfo> {
    let start = usize::from(tokens.first().and_then(|t| keyword(t)).as_deref() == Some("ONLY"));
    let mut rest = &tokens[start..];
    if rest.last() == Some(&&Token::Mul) {
        rest = &rest[..rest.len() - 1];
    }
    // name or schema.name: words separated by single periods.
    let mut parts = Vec::new();
    for (i, token) in rest.iter().enumerate() {
        match (i % 2, token) {
            (0, Token::Word(word)) => parts.push(Ident {
                value: word.value.clone(),
                quote_style: word.quote_style,
                span: Span::empty(),
            }),
            (1, Token::Period) => {}
            _ => return None,
        }
    }
    if rest.len().is_multiple_of(2) {
        return None;
    }
    let name = Name::from_object(&ObjectName::from(parts))?;
    let mut info = StatementInfo::default();
    info.classes.insert(StatementClass::Read);
    info.wildcards.push(None);
    info.aliases.insert(name.name.clone(), name.clone());
    info.reads.insert(name);
    Some(info)
}

/// `MOVE [direction] [FROM | IN] cursor`: repositions a cursor and returns no rows.
fn cursor_move(tokens: &[&Token]) -> Option<StatementInfo> {
    let closed = tokens.iter().all(|t| {
        matches!(
            t,
            Token::Word(_) | Token::Number(..) | Token::Minus | Token::Plus
        )
    });
    closed.then(|| {
        let mut info = StatementInfo::default();
        info.classes.insert(StatementClass::Read);
        info
    })
}
