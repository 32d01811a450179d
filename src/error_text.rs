//! Error text for operators: one line, each cause once, and nothing that reads like a place in
//! the operator's files when it is a place in someone else's (a database server's source line).
//! Used by every binary's last word and by the store's own messages.

use std::error::Error;

/// `e` and its causes on one line, `outer: cause: root`, each cause once, database errors
/// without the server's source line.
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    coordinator_worker::error::one_line_with(e, own_text)
}

/// An `anyhow` error and its causes on one line (see [`one_line`]).
pub fn anyhow_line(e: &anyhow::Error) -> String {
    one_line(&**e)
}

pub use coordinator_worker::error::status_line;

/// One error's own text, with a database error stripped of the server's source line.
fn own_text(e: &(dyn Error + 'static)) -> String {
    if let Some(e) = e.downcast_ref::<sqlx::Error>() {
        return sqlx_text(e);
    }
    if let Some(d) = e.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return d.message().to_owned();
    }
    e.to_string()
}

/// A sqlx error's text. Postgres errors display as `<message> at line <n>`, `n` being a line of
/// the server's C source: it reads like a line of the configuration file, so it is left out.
pub fn sqlx_text(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => format!("error returned from database: {}", d.message()),
        other => other.to_string(),
    }
}

/// A migration error's text, with the same care for database errors as [`sqlx_text`].
pub fn migrate_text(e: &sqlx::migrate::MigrateError) -> String {
    use sqlx::migrate::MigrateError;
    match e {
        MigrateError::Execute(inner) => format!("while executing migrations: {}", sqlx_text(inner)),
        MigrateError::ExecuteMigration(inner, version) => {
            format!("while executing migration {version}: {}", sqlx_text(inner))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Chain {
        text: &'static str,
        #[source]
        source: Option<Box<Chain>>,
    }

    fn chain(texts: &[&'static str]) -> Chain {
        let mut out: Option<Box<Chain>> = None;
        for text in texts.iter().rev() {
            out = Some(Box::new(Chain { text, source: out }));
        }
        *out.expect("at least one text")
    }

    #[test]
    fn a_cause_already_in_the_text_before_it_is_dropped() {
        let e = chain(&[
            "cannot reach the coordinator at http://127.0.0.1:1",
            "transport error",
            "tcp connect error",
            "tcp connect error",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            one_line(&e),
            "cannot reach the coordinator at http://127.0.0.1:1: transport error: tcp connect error: \
             Connection refused (os error 111)"
        );
        let e = chain(&["invalid URL, scheme is missing", "invalid URL, scheme is missing"]);
        assert_eq!(one_line(&e), "invalid URL, scheme is missing");
    }

    #[test]
    fn an_http_answer_to_a_grpc_call_is_named_as_such() {
        let s = tonic::Status::internal(
            "protocol error: received message with invalid compression flag: 123 (valid flags are 0 and 1) \
             while receiving response with status: 404 Not Found",
        );
        let line = status_line(&s);
        assert!(line.contains("HTTP port") && line.contains("gRPC listens on"), "{line}");
        assert_eq!(status_line(&tonic::Status::not_found("task x")), "NotFound: task x");
    }

    #[test]
    fn distinct_causes_are_all_kept() {
        let e = chain(&["a", "b", "c"]);
        assert_eq!(one_line(&e), "a: b: c");
    }
}
