//! Startup parameters: which ones pass upstream, and the `options` string's `-c` settings.
//! A parameter that could change who the session is upstream (role, session_authorization,
//! replication, ...) is refused, whatever the configuration says.

use pgbastion_config::{FORBIDDEN_STARTUP_PARAMETERS, RESERVED_SETTING_PREFIX};
use pgbastion_policy::safe_client_encoding;
use std::collections::BTreeSet;

/// The parameters to send upstream, or the reason the startup is refused.
pub fn filter(
    parameters: &[(String, String)],
    allowed: &BTreeSet<String>,
) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in parameters {
        match name.as_str() {
            "user" | "database" => continue,
            "replication" => {
                if matches!(value.as_str(), "false" | "off" | "no" | "0") {
                    continue;
                }
                return Err("replication connections are not allowed through pgbastion".into());
            }
            "options" => {
                for (name, value) in parse_options(value)? {
                    check(&name, allowed, "setting in options")?;
                    check_value(&name, &value)?;
                    out.push((name, value));
                }
            }
            // Protocol extensions are answered by NegotiateProtocolVersion, not passed on.
            name if name.starts_with("_pq_.") => continue,
            _ => {
                check(name, allowed, "startup parameter")?;
                check_value(name, value)?;
                out.push((name.clone(), value.clone()));
            }
        }
    }
    Ok(out)
}

/// The search_path the session starts with: the client's startup setting, else PostgreSQL's
/// default `"$user", public`; `$user` becomes the role.
pub fn search_path(parameters: &[(String, String)], role: &str) -> Vec<String> {
    let value = parameters
        .iter()
        .rev()
        .find(|(name, _)| name.eq_ignore_ascii_case("search_path"))
        .map(|(_, value)| value.as_str())
        .unwrap_or("\"$user\", public");
    value
        .split(',')
        .map(|part| {
            let part = part.trim();
            match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => part.to_ascii_lowercase(),
            }
        })
        .map(|schema| {
            if schema == "$user" {
                role.to_string()
            } else {
                schema
            }
        })
        .filter(|schema| !schema.is_empty())
        .collect()
}

fn check_value(name: &str, value: &str) -> Result<(), String> {
    if name.eq_ignore_ascii_case("client_encoding") && !safe_client_encoding(value) {
        return Err(format!(
            "client_encoding \"{value}\" is not allowed by pgbastion: PostgreSQL could read statements in it differently from the proxy; use UTF8"
        ));
    }
    Ok(())
}

fn check(name: &str, allowed: &BTreeSet<String>, what: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    if FORBIDDEN_STARTUP_PARAMETERS.contains(&lower.as_str())
        || lower.starts_with(RESERVED_SETTING_PREFIX)
        || !allowed.contains(&lower)
    {
        return Err(format!("{what} \"{name}\" is not allowed by pgbastion"));
    }
    Ok(())
}

/// Parses libpq's `options` string: whitespace-separated arguments with backslash escapes,
/// accepting only `-c name=value`, `-cname=value` and `--name=value`.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let args = split_args(options);
    let mut settings = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let setting = if arg == "-c" {
            iter.next()
                .ok_or_else(|| "options: -c needs a name=value setting".to_string())?
                .as_str()
        } else if let Some(rest) = arg.strip_prefix("--") {
            rest
        } else if let Some(rest) = arg.strip_prefix("-c") {
            rest
        } else {
            return Err(format!(
                "options: \"{arg}\" is not allowed; only -c name=value settings are accepted"
            ));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("options: \"{setting}\" is not of the form name=value"))?;
        // PostgreSQL treats '-' in option names as '_' (--statement-timeout=...).
        settings.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(settings)
}

fn split_args(text: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    let mut in_arg = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    current.push(next);
                    in_arg = true;
                }
            }
            c if c.is_whitespace() => {
                if in_arg {
                    args.push(std::mem::take(&mut current));
                    in_arg = false;
                }
            }
            c => {
                current.push(c);
                in_arg = true;
            }
        }
    }
    if in_arg {
        args.push(current);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed() -> BTreeSet<String> {
        [
            "application_name",
            "client_encoding",
            "search_path",
            "statement_timeout",
            "datestyle",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn harmless_parameters_pass_and_identity_ones_are_dropped() {
        let out = filter(
            &params(&[
                ("user", "alice"),
                ("database", "app"),
                ("application_name", "psql"),
                ("DateStyle", "ISO"),
            ]),
            &allowed(),
        )
        .unwrap();
        assert_eq!(
            out,
            params(&[("application_name", "psql"), ("DateStyle", "ISO")])
        );
    }

    #[test]
    fn client_encodings_the_proxy_could_misread_are_refused() {
        for value in [
            "SJIS",
            "Shift_JIS",
            "big5",
            "GBK",
            "win-936",
            "GB18030",
            "johab",
        ] {
            let err = filter(&params(&[("client_encoding", value)]), &allowed()).unwrap_err();
            assert!(
                err.starts_with(&format!("client_encoding \"{value}\"")),
                "{err}"
            );
            let options = format!("-c client_encoding={value}");
            assert!(filter(&params(&[("options", &options)]), &allowed()).is_err());
        }
        for value in ["UTF8", "utf-8", "LATIN1", "EUC_JP", "WIN1252", "SQL_ASCII"] {
            assert!(filter(&params(&[("client_encoding", value)]), &allowed()).is_ok());
        }
    }

    #[test]
    fn role_and_replication_are_refused() {
        let err = filter(&params(&[("role", "postgres")]), &allowed()).unwrap_err();
        assert_eq!(
            err,
            "startup parameter \"role\" is not allowed by pgbastion"
        );
        let err = filter(&params(&[("replication", "database")]), &allowed()).unwrap_err();
        assert!(err.contains("replication"), "{err}");
        assert!(filter(&params(&[("replication", "false")]), &allowed())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn options_may_only_carry_allowed_settings() {
        let out = filter(
            &params(&[(
                "options",
                "-c search_path=app -cstatement_timeout=5s --statement-timeout=1s",
            )]),
            &allowed(),
        )
        .unwrap();
        assert_eq!(
            out,
            params(&[
                ("search_path", "app"),
                ("statement_timeout", "5s"),
                ("statement_timeout", "1s")
            ])
        );
        for bad in [
            "-c role=postgres",
            "-c session_authorization=x",
            "-c work_mem=1GB",
            "-d 5",
            "-c",
        ] {
            assert!(
                filter(&params(&[("options", bad)]), &allowed()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_search_path_defaults_to_user_then_public() {
        assert_eq!(search_path(&[], "analyst"), ["analyst", "public"]);
        let given = params(&[("search_path", "App, \"Mixed\", $user")]);
        assert_eq!(search_path(&given, "analyst"), ["app", "Mixed", "analyst"]);
    }

    #[test]
    fn escaped_spaces_stay_inside_one_argument() {
        let settings = parse_options(r"-c search_path=a\ b").unwrap();
        assert_eq!(settings, [("search_path".to_string(), "a b".to_string())]);
    }
}
