//! The statement policy: (Principal, Request) -> Decision.
//!
//! Owns: the one decision point every Query, Parse and FunctionCall passes through before
//! anything is forwarded upstream. Pure and synchronous: no I/O, no clock, no global state.
//! Must not depend on the wire, auth or proxy crates.
//!
//! Today it allows SQL text and refuses FunctionCall, which bypasses SQL text entirely; the
//! statement analysis (sqlparser) fills in `decide_sql`.

/// Who is asking, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal<'a> {
    pub user: &'a str,
    /// The upstream role the session runs as.
    pub role: &'a str,
    /// The policy the mapping rule assigned.
    pub policy: &'a str,
}

/// What the client asks the upstream to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// A simple Query message: one or more statements run as one implicit transaction.
    Query(&'a str),
    /// An extended-protocol Parse: decided here, before any Bind can run it.
    Parse { statement: &'a str, query: &'a str },
    /// A FunctionCall message: calls a function by OID, with no SQL text to analyse.
    FunctionCall { oid: u32 },
}

/// The verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Denial),
}

/// Why a request was denied, in words for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub policy: String,
    /// The sentence after "policy 'x' denies ...".
    pub reason: String,
    /// The rule that decided.
    pub rule: String,
    /// What would be allowed instead.
    pub hint: Option<String>,
}

impl Denial {
    /// The ErrorResponse message: "policy 'analysts' denies writing to public.orders".
    pub fn message(&self) -> String {
        format!("policy '{}' denies {}", self.policy, self.reason)
    }
}

pub fn decide(principal: &Principal<'_>, request: &Request<'_>) -> Decision {
    match request {
        Request::Query(sql) | Request::Parse { query: sql, .. } => decide_sql(principal, sql),
        Request::FunctionCall { oid } => Decision::Deny(Denial {
            policy: principal.policy.to_string(),
            reason: format!("the fast-path function call of function OID {oid}"),
            rule: "function_call".into(),
            hint: Some("call the function from SQL instead, e.g. SELECT f(...)".into()),
        }),
    }
}

fn decide_sql(_principal: &Principal<'_>, _sql: &str) -> Decision {
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Principal<'static> = Principal {
        user: "alice",
        role: "analyst",
        policy: "analysts",
    };

    #[test]
    fn function_calls_are_denied_with_a_reason() {
        let Decision::Deny(denial) = decide(&ALICE, &Request::FunctionCall { oid: 1598 }) else {
            panic!("FunctionCall must be denied");
        };
        assert_eq!(
            denial.message(),
            "policy 'analysts' denies the fast-path function call of function OID 1598"
        );
    }

    #[test]
    fn sql_text_is_allowed_until_statement_rules_exist() {
        assert_eq!(decide(&ALICE, &Request::Query("SELECT 1")), Decision::Allow);
        let parse = Request::Parse {
            statement: "s1",
            query: "SELECT $1",
        };
        assert_eq!(decide(&ALICE, &parse), Decision::Allow);
    }
}
