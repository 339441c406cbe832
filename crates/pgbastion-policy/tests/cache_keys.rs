//! The decision key of plain statements (a scan of the text) against the tokenizer's: on
//! generated statements, two texts with the same plain key always have the same tokenizer
//! key (a plain key never lets a decision serve a statement the tokenizer would tell apart),
//! and the plain redaction is the tokenizer's.

use pgbastion_policy::{decision_key, decision_key_and_redacted, redact, tokenizer_key};
use proptest::prelude::*;

const PIECES: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "t",
    "t1",
    "x",
    "int4",
    "a_b",
    "ssn",
    "pg_sleep",
    "set_config",
    "1",
    "2",
    "42",
    "007",
    "1.5",
    "10.25",
    "'a'",
    "'1'",
    "'2'",
    "'it''s'",
    "''",
    "\"T1\"",
    "\"a\"\"b\"",
    "\"1\"",
    "$1",
    "$2",
    "=",
    "<>",
    "::",
    "(",
    ")",
    ",",
    ".",
    "-",
    "+",
    ";",
    "*",
    "&",
    "#",
    "?",
    "@",
    "~",
    "!",
    "^",
    "|",
    "`",
    "%",
    "[",
    "]",
    ":",
    "{",
    "}",
    "e",
    "E",
    "U",
    "_",
    "$",
    "'",
    "\"",
    "--",
    "/*",
    "*/",
    "\\",
    "é",
    " ",
    "  ",
    "\n",
    "\t",
];

fn pieces() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..PIECES.len(), 1..24)
}

fn text(pieces: &[usize], separator: &str) -> String {
    pieces
        .iter()
        .map(|&i| PIECES[i])
        .collect::<Vec<_>>()
        .join(separator)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn equal_keys_mean_equal_tokenizer_keys(
        a in pieces(),
        b in pieces(),
        tight in any::<bool>(),
    ) {
        let separator = if tight { "" } else { " " };
        let (a, b) = (text(&a, separator), text(&b, separator));
        if let (Some(key_a), Some(key_b)) = (decision_key(&a), decision_key(&b)) {
            if key_a == key_b {
                prop_assert_eq!(tokenizer_key(&a), tokenizer_key(&b), "{:?} / {:?}", a, b);
            }
        }
    }

    #[test]
    fn numbers_changed_keep_the_key_and_the_tokenizer_agrees(
        a in pieces(),
        numbers in prop::collection::vec(0..4usize, 24),
        tight in any::<bool>(),
    ) {
        let separator = if tight { "" } else { " " };
        // The same statement with other numbers where it had numbers.
        let swapped: Vec<usize> = a
            .iter()
            .zip(&numbers)
            .map(|(&i, &n)| match PIECES[i] {
                "1" | "2" | "42" | "007" | "1.5" | "10.25" => {
                    PIECES.iter().position(|p| *p == ["2", "99", "0.5", "3"][n]).unwrap_or(i)
                }
                _ => i,
            })
            .collect();
        let (a, b) = (text(&a, separator), text(&swapped, separator));
        if let (Some(key_a), Some(key_b)) = (decision_key(&a), decision_key(&b)) {
            if key_a == key_b {
                prop_assert_eq!(tokenizer_key(&a), tokenizer_key(&b), "{:?} / {:?}", a, b);
            }
        }
    }

    #[test]
    fn one_pass_redaction_is_the_tokenizers(a in pieces(), tight in any::<bool>()) {
        let sql = text(&a, if tight { "" } else { " " });
        match decision_key_and_redacted(&sql) {
            Some((key, redacted)) => {
                prop_assert_eq!(Some(key), decision_key(&sql));
                prop_assert_eq!(redacted, redact(&sql), "{:?}", sql);
                // What has a key tokenizes.
                prop_assert!(tokenizer_key(&sql).is_some(), "{:?}", sql);
            }
            None => prop_assert_eq!(tokenizer_key(&sql), None),
        }
    }
}
