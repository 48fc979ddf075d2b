//! What the relay exposes, decided at start: a public bind with an unauthenticated source is refused (unless the
//! operator opts in), the connection cap follows the open-file limit (a cap above it only turns into `Too many
//! open files` at accept time), and URLs shown in the start log lose their credentials.

use crate::settings::Settings;
use anyhow::anyhow;

/// Refuses to start when a non-loopback bind serves a source without authentication, unless the operator opted in
/// (`server.allow_unauthenticated_public_bind`); anyone who could reach the relay could write into Heap through it.
pub fn check_public_bind(settings: &Settings, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let open = settings.unauthenticated_sources();
    if addr.ip().is_loopback() || open.is_empty() {
        return Ok(());
    }
    if !settings.server.allow_unauthenticated_public_bind {
        return Err(anyhow!(
            "server.bind {addr} is not a loopback address and these sources accept requests without \
             authentication: {}. Set [sources.<name>.auth] for each (docs/security.md), disable the source, or \
             set server.allow_unauthenticated_public_bind = true if a firewall already limits who can reach the relay",
            open.join(", ")
        ));
    }
    tracing::warn!(
        bind = %addr,
        sources = %open.join(", "),
        "these sources accept requests without authentication on a non-loopback address \
         (server.allow_unauthenticated_public_bind = true)"
    );
    Ok(())
}

/// The connection cap and why it is what it is (said in the log at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionCap {
    pub connections: usize,
    pub open_files: Option<u64>,
    pub why: String,
}

/// Descriptors kept for everything but client connections: the store, its WAL, template files, Heap's pool,
/// PostgreSQL connections, the listeners.
const RESERVED_FILES: u64 = 64;

/// `configured` (0: automatic) against the soft open-file limit: a cap above it only turns into `Too many open
/// files` at accept time, so it is lowered to the limit minus `RESERVED_FILES`.
pub fn connection_cap(configured: usize, open_files: Option<u64>) -> ConnectionCap {
    let room = open_files.map(|n| n.saturating_sub(RESERVED_FILES).max(16) as usize);
    let (connections, why) = match (configured, room) {
        (0, Some(r)) => (r, format!("connection cap follows the open-file limit (minus {RESERVED_FILES} reserved)")),
        (0, None) => (1000, "open-file limit unknown; connection cap 1000".to_owned()),
        (c, Some(r)) if c > r => {
            tracing::warn!(
                configured = c,
                lowered_to = r,
                "server.max_connections is above what the open-file limit allows; lowered (raise `ulimit -n` to \
                 allow more)"
            );
            (r, "server.max_connections, lowered to the open-file limit".to_owned())
        }
        (c, _) => (c, "connection cap from server.max_connections".to_owned()),
    };
    ConnectionCap { connections, open_files, why }
}

/// The soft RLIMIT_NOFILE of this process.
pub fn open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own; no other memory is touched.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// A URL for the log: no user, password or query (they may hold credentials).
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_follows_the_open_file_limit() {
        assert_eq!(connection_cap(0, Some(1024)).connections, 960);
        assert_eq!(connection_cap(10_000, Some(1024)).connections, 960, "lowered to what the limit allows");
        assert_eq!(connection_cap(500, Some(1024)).connections, 500);
        assert_eq!(connection_cap(0, None).connections, 1000);
        assert_eq!(connection_cap(0, Some(10)).connections, 16);
    }

    #[test]
    fn urls_in_the_log_lose_their_credentials() {
        assert_eq!(redact_url("https://user:pa55@heap.example.com/x?key=k3y"), "https://heap.example.com/x");
        assert!(!redact_url("not a url pa55").contains("pa55"));
    }
}
