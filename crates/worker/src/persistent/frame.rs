//! The framed protocol between the worker and a persistent prover process (spec:
//! `docs/persistent-prover-protocol.md`).
//!
//! A frame is one line of JSON (a header, at most [`MAX_HEADER`] bytes with its `\n`) followed,
//! for `task` and `result`, by exactly `len` raw bytes of body. The header's `type` names the
//! message. Encoding and decoding only: no processes here.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// The protocol version this worker speaks; a child names its own in `ready`.
pub const PROTOCOL: u32 = 1;
/// Longest header line accepted, `\n` included.
pub const MAX_HEADER: usize = 64 * 1024;

/// A message from the worker to the child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToChild {
    /// Run this task; `len` bytes of payload follow the header.
    Task {
        id: String,
        task_type: String,
        attempt: u32,
        /// Milliseconds left until the task's deadline when the frame was sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
        len: u64,
    },
    /// Stop task `id` and answer `failure`.
    Cancel { id: String },
    /// Exit now (the worker is stopping); EOF on stdin means the same.
    Shutdown,
}

impl ToChild {
    /// The header line, `\n` included.
    pub fn encode(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a header always serializes");
        line.push(b'\n');
        line
    }
}

/// A message from the child to the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromChild {
    /// Start-up is done; tasks may come.
    Ready {
        protocol: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    /// Task `id` succeeded; `len` bytes of result follow the header.
    Result { id: String, len: u64 },
    /// Task `id` failed.
    Failure {
        id: String,
        message: String,
        #[serde(default)]
        retriable: bool,
    },
    /// Still working (on task `id`, if given).
    Progress {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Still alive.
    Heartbeat {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

impl FromChild {
    /// The message's `type`, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            FromChild::Ready { .. } => "ready",
            FromChild::Result { .. } => "result",
            FromChild::Failure { .. } => "failure",
            FromChild::Progress { .. } => "progress",
            FromChild::Heartbeat { .. } => "heartbeat",
        }
    }
}

/// A decoded frame: its header and, for `result`, its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: FromChild,
    pub body: Vec<u8>,
}

/// Why a child's stdout could not be read as frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a frame of this protocol (not JSON, an unknown `type`, a missing field, a header
    /// line too long).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A `result` announced more bytes than the worker accepts; nothing was allocated for it.
    #[error("result of {len} bytes exceeds {max} bytes")]
    Oversize { len: u64, max: usize },
    /// stdout ended (or failed) in the middle of a frame.
    #[error("stdout ended inside a frame: {0}")]
    Truncated(String),
}

/// Reads the next frame; `Ok(None)` when stdout ends cleanly between frames. A `result` body
/// longer than `max_body` is refused before anything is allocated for it.
pub async fn read_frame<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_body: usize,
) -> Result<Option<Frame>, FrameError> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_HEADER as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| FrameError::Truncated(e.to_string()))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n >= MAX_HEADER {
            FrameError::Malformed(format!("header line longer than {MAX_HEADER} bytes"))
        } else {
            FrameError::Truncated(format!("{n} bytes of a header line and no newline"))
        });
    }
    let header: FromChild = serde_json::from_slice(&line).map_err(|e| {
        let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).trim_end().to_owned();
        FrameError::Malformed(format!("{e} in header {shown:?}"))
    })?;
    let len = match &header {
        FromChild::Result { len, .. } => *len,
        _ => 0,
    };
    if len > max_body as u64 {
        return Err(FrameError::Oversize { len, max: max_body });
    }
    let mut body = vec![0u8; len as usize];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| FrameError::Truncated(format!("a result body of {len} bytes: {e}")))?;
    Ok(Some(Frame { header, body }))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], max: usize) -> Vec<Result<Option<Frame>, FrameError>> {
        let mut r = input;
        let mut out = Vec::new();
        loop {
            let f = read_frame(&mut r, max).await;
            let stop = !matches!(f, Ok(Some(_)));
            out.push(f);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn reads_headers_and_bodies_in_sequence() {
        let input = b"{\"type\":\"ready\",\"protocol\":1,\"version\":\"v2\"}\n\
                      {\"type\":\"progress\",\"id\":\"t\"}\n\
                      {\"type\":\"result\",\"id\":\"t\",\"len\":5}\nab\ncd\
                      {\"type\":\"failure\",\"id\":\"u\",\"message\":\"bad\",\"extra\":1}\n";
        let f = frames(input, 100).await;
        assert_eq!(f.len(), 5, "{f:?}");
        let header = |i: usize| f[i].clone().unwrap().unwrap().header;
        assert_eq!(header(0), FromChild::Ready { protocol: 1, version: Some("v2".into()) });
        assert_eq!(header(1), FromChild::Progress { id: Some("t".into()) });
        assert_eq!(f[2].clone().unwrap().unwrap().body, b"ab\ncd");
        // `retriable` defaults to false; unknown fields are ignored.
        assert_eq!(header(3), FromChild::Failure { id: "u".into(), message: "bad".into(), retriable: false });
        assert_eq!(f[4], Ok(None));
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_frame() {
        for (input, needle) in [
            (&b"hello\n"[..], "expected value"),
            (b"{\"type\":\"reslt\",\"id\":\"t\"}\n", "unknown variant `reslt`"),
            (b"{\"type\":\"result\",\"id\":\"t\"}\n", "missing field `len`"),
            (b"\n", "EOF while parsing"),
        ] {
            match read_frame(&mut &input[..], 100).await {
                Err(FrameError::Malformed(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{input:?}: {other:?}"),
            }
        }
        let long = vec![b'x'; MAX_HEADER + 10];
        let e = read_frame(&mut &long[..], 100).await.unwrap_err();
        assert!(matches!(&e, FrameError::Malformed(m) if m.contains("longer than")), "{e:?}");
    }

    #[tokio::test]
    async fn an_oversize_result_is_refused_before_its_body_is_read() {
        // A length of 2^60 bytes: refused, not allocated.
        let input = b"{\"type\":\"result\",\"id\":\"t\",\"len\":1152921504606846976}\n";
        let e = read_frame(&mut &input[..], 1000).await.unwrap_err();
        assert_eq!(e, FrameError::Oversize { len: 1 << 60, max: 1000 });
        assert_eq!(e.to_string(), "result of 1152921504606846976 bytes exceeds 1000 bytes");
        // Exactly the limit is fine.
        let input = b"{\"type\":\"result\",\"id\":\"t\",\"len\":3}\nabc";
        assert_eq!(read_frame(&mut &input[..], 3).await.unwrap().unwrap().body, b"abc");
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_truncated() {
        let e = read_frame(&mut &b"{\"type\":\"ready\""[..], 10).await.unwrap_err();
        assert!(matches!(e, FrameError::Truncated(_)), "{e:?}");
        let e =
            read_frame(&mut &b"{\"type\":\"result\",\"id\":\"t\",\"len\":9}\nabc"[..], 10).await.unwrap_err();
        assert!(matches!(&e, FrameError::Truncated(m) if m.contains("9 bytes")), "{e:?}");
    }

    #[test]
    fn worker_messages_encode_as_one_json_line() {
        let task = ToChild::Task {
            id: "t-1".into(),
            task_type: "prove".into(),
            attempt: 2,
            deadline_ms: None,
            len: 7,
        };
        assert_eq!(
            String::from_utf8(task.encode()).unwrap(),
            "{\"type\":\"task\",\"id\":\"t-1\",\"task_type\":\"prove\",\"attempt\":2,\"len\":7}\n"
        );
        assert_eq!(ToChild::Cancel { id: "t-1".into() }.encode(), b"{\"type\":\"cancel\",\"id\":\"t-1\"}\n");
        assert_eq!(ToChild::Shutdown.encode(), b"{\"type\":\"shutdown\"}\n");
    }
}
