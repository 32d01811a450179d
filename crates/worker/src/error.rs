//! The SDK's one error type: what can go wrong before or while a worker talks to a coordinator.
//! Failures of a task are not errors of the SDK: a handler returns [`crate::TaskFailure`].

use std::path::Path;

/// Why a worker or client could not be set up or could not reach the coordinator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting that cannot work (an address without a scheme, a CA without `https://`, half a
    /// client certificate): fix the configuration.
    #[error("{0}")]
    Config(String),
    /// A file named by the configuration (token, CA, certificate, key) could not be read.
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The channel could not be built or could not connect.
    #[error("{context}")]
    Transport {
        context: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The coordinator answered a call with an error status.
    #[error("the coordinator answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// A persistent prover process could not be started.
    #[error("prover process {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// `e` and its causes on one line, `outer: cause: root`, each text given by `text` (for
/// instance `ToString::to_string`). A cause whose text the one before it already contains is
/// dropped: transport errors repeat their inner error in their own text (`tcp connect error:
/// tcp connect error: ...`).
pub fn one_line_with(
    e: &(dyn std::error::Error + 'static),
    text: impl Fn(&(dyn std::error::Error + 'static)) -> String,
) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let t = text(err);
        if !t.is_empty() && !parts.last().is_some_and(|p| p.contains(&t)) {
            parts.push(t);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// [`one_line_with`] each error's own `Display`.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    one_line_with(e, |e| e.to_string())
}

/// Whether an error line says the connection under the call was closed by the other end (a
/// broken pipe, a reset, a close), as a server does that refuses a handshake.
pub fn connection_closed(line: &str) -> bool {
    line.contains("transport error")
        && ["broken pipe", "connection closed", "connection reset", "Connection reset"]
            .iter()
            .any(|c| line.contains(c))
}

/// What to add to an error line that may show TLS and plaintext crossed (`tls`: the client
/// used an https:// URL): a plaintext client reads a TLS server's first bytes as an HTTP/2 frame
/// of a wrong size, or finds the connection closed under its first call; a TLS client reads a
/// plaintext answer as a broken TLS record. Empty for any other line.
pub fn scheme_hint(line: &str, tls: bool) -> &'static str {
    let closed = connection_closed(line);
    if !tls && (line.contains("frame with invalid size") || closed) {
        " (if the coordinator serves TLS, use an https:// URL and its CA file)"
    } else if tls && line.contains("InvalidContentType") {
        " (the address does not speak TLS: use an http:// URL, or turn tls.enabled on at the coordinator)"
    } else {
        ""
    }
}

/// Whether an error line shows the coordinator's certificate was signed by a CA this client does
/// not trust (a CA of the operator's own, not given).
pub fn untrusted_certificate(line: &str) -> bool {
    line.contains("UnknownIssuer")
}

/// What to add to a worker's error line that [`untrusted_certificate`] explains. Empty for any
/// other line.
pub fn untrusted_hint(line: &str) -> &'static str {
    if untrusted_certificate(line) {
        " (the coordinator's certificate is signed by a CA this worker does not trust: give that \
         CA's certificate, --ca-file or the CA file of its ClientSecurity)"
    } else {
        ""
    }
}

/// The coordinator's default gRPC port, named when a client reached its HTTP port instead.
const DEFAULT_GRPC_PORT: u16 = 9090;

/// A gRPC status as `Code: message`, or, when the answer came from a plain HTTP server (the
/// coordinator's HTTP port given where its gRPC port belongs), a line that says so.
pub fn status_line(s: &tonic::Status) -> String {
    let m = s.message();
    // Refused here before it was sent: the request is over this client's own message limit.
    if s.code() == tonic::Code::OutOfRange && m.starts_with("Error, encoded message length too large") {
        let found = m.split("found ").nth(1).and_then(|r| r.split(' ').next()).unwrap_or("?");
        return format!(
            "OutOfRange: the request ({found} bytes) is over this client's message limit and was not \
             sent (raise --max-message-size; the coordinator takes payloads up to its \
             tasks.max_payload_size)"
        );
    }
    if is_http_answer(s) {
        let grpc = DEFAULT_GRPC_PORT;
        return format!(
            "the address answered as a plain HTTP server, not gRPC: this looks like the coordinator's \
             HTTP port; gRPC listens on coordinator.grpc_port, default {grpc}"
        );
    }
    // tonic says only "transport error" for a connection that failed under the call; what
    // failed is in its causes (a refused handshake, a reset).
    match std::error::Error::source(s) {
        Some(cause) => {
            let cause = one_line(cause);
            if cause.is_empty() || m.contains(&cause) {
                format!("{:?}: {m}", s.code())
            } else if cause.contains(m) {
                // `tcp connect error` over `transport error: tcp connect error: Connection refused`.
                format!("{:?}: {cause}", s.code())
            } else {
                format!("{:?}: {m}: {cause}", s.code())
            }
        }
        None => format!("{:?}: {m}", s.code()),
    }
}

/// Whether `s` is how tonic reports an answer from a plain HTTP server, not a gRPC status.
pub(crate) fn is_http_answer(s: &tonic::Status) -> bool {
    let m = s.message();
    m.contains("while receiving response with status:")
        || m.contains("mapped from HTTP status code")
        || m.contains("invalid compression flag")
}

impl Error {
    pub(crate) fn file(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::File { what, path: path.display().to_string(), source }
    }

    /// Whether trying again later can help (the coordinator was unreachable or busy), as
    /// opposed to a mistake in the configuration.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted
            ),
            Error::Config(_) | Error::File { .. } | Error::Spawn { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request over the client's own limit is named as such, not in the codec's words.
    #[test]
    fn a_request_over_the_client_s_limit_says_so() {
        let s = tonic::Status::out_of_range(
            "Error, encoded message length too large: found 12000013 bytes, the limit is: 10485760 bytes",
        );
        let line = status_line(&s);
        assert!(line.starts_with("OutOfRange: the request (12000013 bytes) is over this client's"), "{line}");
        assert!(line.contains("--max-message-size"), "{line}");
        let server = tonic::Status::out_of_range("payload: 5000000 bytes is over the limit of 4194304 bytes");
        assert_eq!(status_line(&server), format!("OutOfRange: {}", server.message()));
    }

    #[test]
    fn a_certificate_from_an_untrusted_ca_asks_for_the_ca_file() {
        let line = "Unavailable: transport error: invalid peer certificate: UnknownIssuer";
        assert!(untrusted_hint(line).contains("--ca-file"), "{line}");
        assert_eq!(untrusted_hint("Unavailable: tcp connect error: Connection refused (os error 111)"), "");
    }

    #[test]
    fn a_message_its_cause_repeats_is_given_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error: tcp connect error: Connection refused (os error 111)")]
        struct Cause;
        let mut s = tonic::Status::unavailable("tcp connect error");
        s.set_source(std::sync::Arc::new(Cause));
        assert_eq!(
            status_line(&s),
            "Unavailable: transport error: tcp connect error: Connection refused (os error 111)"
        );
    }
}
