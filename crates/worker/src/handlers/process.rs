//! Pieces shared by the handlers that run child processes ([`super::exec`] per task,
//! [`crate::persistent`] long-lived): killing a child's whole process group, and keeping the
//! tail of its stderr for failure messages.

use std::process::ExitStatus;

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    process::Child,
};

/// How much of the end of stderr a failure carries.
pub const STDERR_TAIL: usize = 2048;

/// Reads what is there; `None` at the end (or on an error). Pending forever once closed, so
/// a closed pipe drops out of the `select!`.
pub(crate) async fn read_some<R: AsyncRead + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    match pipe {
        Some(p) => match p.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

/// `exited with code N`, `was killed by signal S`, or the status as the platform says it.
pub(crate) fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    format!("ended: {status}")
}

/// The last [`STDERR_TAIL`] bytes of a stream.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    bytes: Vec<u8>,
    dropped: bool,
}

impl Tail {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > 2 * STDERR_TAIL {
            let cut = self.bytes.len() - STDERR_TAIL;
            self.bytes.drain(..cut);
            self.dropped = true;
        }
    }

    fn get(&self) -> &[u8] {
        &self.bytes[self.bytes.len().saturating_sub(STDERR_TAIL)..]
    }

    /// `; stderr: ...` (or nothing if stderr was empty).
    pub(crate) fn describe(&self) -> String {
        let text = String::from_utf8_lossy(self.get());
        let text = text.trim();
        if text.is_empty() {
            return String::new();
        }
        let cut = self.dropped || self.bytes.len() > STDERR_TAIL;
        format!(
            "; stderr{}: {text}",
            if cut { format!(" (last {STDERR_TAIL} bytes)") } else { String::new() }
        )
    }
}

/// Kills the child's process group, explicitly or when dropped while armed.
#[derive(Debug)]
pub(crate) struct GroupKill {
    /// The group id (the child's pid); `None` once dealt with.
    pgid: Option<u32>,
}

impl GroupKill {
    pub(crate) fn new(child: &Child) -> Self {
        Self { pgid: child.id() }
    }

    /// SIGKILL to the group, and to the child itself.
    pub(crate) fn kill(&mut self, child: &mut Child) {
        self.kill_group();
        let _ = child.start_kill();
    }

    pub(crate) fn kill_group(&mut self) {
        let Some(pgid) = self.pgid.take() else { return };
        #[cfg(unix)]
        if let Ok(pgid) = libc::pid_t::try_from(pgid) {
            // SAFETY: kill(2) takes no pointers; a negative pid signals that process group.
            // The group is the child's own: its id is the child's pid, which is not reused while
            // the child is unreaped or any member of the group lives (at worst, just after
            // the child was reaped with no members left, the signal finds no group: ESRCH).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        #[cfg(not(unix))]
        let _ = pgid;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        // Dropped while armed (a future dropped mid-run, say); `kill_on_drop` takes care of
        // the child itself.
        self.kill_group();
    }
}
