//! Names as PostgreSQL resolves them: unquoted identifiers fold to lower case, quoted ones keep
//! their case, every identifier is truncated to 63 bytes (NAMEDATALEN - 1).
//! <https://www.postgresql.org/docs/current/sql-syntax-lexical.html#SQL-SYNTAX-IDENTIFIERS>

use sqlparser::ast::{Ident, ObjectName, ObjectNamePart};
use std::fmt;

const MAX_IDENTIFIER_BYTES: usize = 63;

/// An identifier normalised the way PostgreSQL does.
pub fn ident(ident: &Ident) -> String {
    let mut value = if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        // PostgreSQL folds only ASCII letters in UTF-8 databases.
        ident.value.to_ascii_lowercase()
    };
    if value.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

/// A possibly schema-qualified relation or function name, normalised.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name {
    pub schema: Option<String>,
    pub name: String,
}

impl Name {
    /// From a parsed name: `name`, `schema.name` or `database.schema.name`.
    pub fn from_object(object: &ObjectName) -> Option<Name> {
        let parts: Vec<String> = object
            .0
            .iter()
            .map(|part| match part {
                ObjectNamePart::Identifier(i) => Some(ident(i)),
                ObjectNamePart::Function(_) => None,
            })
            .collect::<Option<_>>()?;
        match parts.as_slice() {
            [name] => Some(Name {
                schema: None,
                name: name.clone(),
            }),
            [.., schema, name] => Some(Name {
                schema: Some(schema.clone()),
                name: name.clone(),
            }),
            [] => None,
        }
    }

    /// The schemas an unqualified name may resolve to. `pg_catalog` is always searched first
    /// by PostgreSQL; `$user` in the search path is the session's role.
    pub fn candidates(&self, search_path: &[String]) -> Vec<String> {
        match &self.schema {
            Some(schema) => vec![format!("{schema}.{}", self.name)],
            None => std::iter::once("pg_catalog")
                .chain(search_path.iter().map(String::as_str))
                .map(|schema| format!("{schema}.{}", self.name))
                .collect(),
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_fold_unless_quoted_and_truncate_at_63_bytes() {
        assert_eq!(ident(&Ident::new("Orders")), "orders");
        assert_eq!(ident(&Ident::with_quote('"', "Orders")), "Orders");
        assert_eq!(ident(&Ident::new("a".repeat(70))), "a".repeat(63));
        let long = "é".repeat(40);
        assert_eq!(ident(&Ident::with_quote('"', long)).len(), 62);
    }

    #[test]
    fn globs_match_schema_table_patterns() {
        assert!(glob("public.*", "public.orders"));
        assert!(glob("*.secrets", "hr.secrets"));
        assert!(glob("public.sec*s", "public.secrets"));
        assert!(!glob("public.*", "private.orders"));
        assert!(!glob("public.orders", "public.orders2"));
    }

    #[test]
    fn unqualified_names_may_resolve_to_any_schema_of_the_path() {
        let name = Name {
            schema: None,
            name: "orders".into(),
        };
        assert_eq!(
            name.candidates(&["app".into(), "public".into()]),
            ["pg_catalog.orders", "app.orders", "public.orders"]
        );
    }
}
