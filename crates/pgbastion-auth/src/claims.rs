//! Reading claims by path. A claim name may itself contain dots (URL-named claims such as
//! `https://example.com/groups`), so the whole name is tried before splitting at a dot.

use serde_json::Value;

pub fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    let object = claims.as_object()?;
    if let Some(value) = object.get(path) {
        return Some(value);
    }
    // Split at each dot, longest head first, so `a.b.c` finds {"a.b": {"c": ..}} and {"a": {"b.c": ..}}.
    for (i, _) in path.match_indices('.').rev() {
        let (head, tail) = (&path[..i], &path[i + 1..]);
        if let Some(inner) = object.get(head) {
            if let Some(found) = lookup(inner, tail) {
                return Some(found);
            }
        }
    }
    None
}

/// A claim's string values: a string is one value, an array yields its strings.
pub fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Scopes from `scope` (space-separated string, RFC 9068) or `scp` (string or array).
pub fn scopes(claims: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => out.extend(s.split_whitespace().map(str::to_string)),
            Some(Value::Array(items)) => {
                out.extend(items.iter().filter_map(|v| v.as_str().map(str::to_string)))
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_paths_reach_nested_claims() {
        let claims = json!({"realm_access": {"roles": ["a", "b"]}, "https://x.io/groups": ["g"]});
        assert_eq!(strings(lookup(&claims, "realm_access.roles")), ["a", "b"]);
        assert_eq!(strings(lookup(&claims, "https://x.io/groups")), ["g"]);
        assert!(lookup(&claims, "realm_access.missing").is_none());
    }

    #[test]
    fn scopes_come_from_scope_or_scp() {
        assert_eq!(
            scopes(&json!({"scope": "db:read  openid"})),
            ["db:read", "openid"]
        );
        assert_eq!(scopes(&json!({"scp": ["db:read"]})), ["db:read"]);
    }
}
