//! Built-in functions denied unless a policy exempts them (`allow_functions`): they reach
//! outside the SQL privilege model — the server's files, other servers, other sessions, the
//! configuration — or run SQL given as a string, which the policy could not see.

pub const DANGEROUS: &[&str] = &[
    // Server file access.
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_logdir_ls",
    // Large-object import and export read and write server files.
    "lo_import",
    "lo_export",
    // Other servers.
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_send_query",
    "dblink_open",
    "dblink_fetch",
    // Other sessions and the server itself.
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_signal_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_log_backend_memory_contexts",
    // SQL given as a string: the text is run unseen by the policy.
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
];

/// Settings that change who the session is, pgbastion's own namespace, or how PostgreSQL
/// reads string literals (with standard_conforming_strings off, `'a\'...` would end somewhere
/// else for PostgreSQL than for the policy's parser): never changeable.
pub fn always_guarded(setting: &str) -> bool {
    matches!(
        setting,
        "role"
            | "session_authorization"
            | "session_param"
            | "standard_conforming_strings"
            | "backslash_quote"
    ) || setting.starts_with("pgbastion.")
        || setting == "unknown"
}

/// Whether PostgreSQL reads statements in `encoding` (a client_encoding name, any spelling)
/// the way the proxy reads them as UTF-8. The client-only encodings below have multi-byte
/// characters whose second byte can be an ASCII quote or backslash, so a statement's string
/// literals could end where the proxy thinks they do not. Names are compared as PostgreSQL
/// does: letters and digits only, case-insensitive.
pub fn safe_client_encoding(encoding: &str) -> bool {
    let clean: String = encoding
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    !matches!(
        clean.as_str(),
        "sjis"
            | "shiftjis"
            | "mskanji"
            | "win932"
            | "windows932"
            | "shiftjis2004"
            | "big5"
            | "win950"
            | "windows950"
            | "gbk"
            | "win936"
            | "windows936"
            | "cp936"
            | "uhc"
            | "win949"
            | "windows949"
            | "gb18030"
            | "johab"
    )
}
