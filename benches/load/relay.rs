//! The relay as a child process (the release binary), and what /proc says about it: RSS and CPU time.

use crate::APP_ID;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Relay {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind loopback").local_addr().expect("addr").port()
}

impl Relay {
    /// The relay on the shipped `config.toml` (plus `extra_env`), with a fresh store.
    pub fn start(bin: &Path, heap_port: u16, extra_env: &[(&str, &str)]) -> Relay {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&base).expect("target tmp dir");
        let dir = tempfile::Builder::new().prefix("relay-bench-").tempdir_in(&base).expect("temp dir");
        Self::start_in(bin, heap_port, dir, extra_env)
    }

    /// Stops this relay (SIGTERM) and starts `bin` again on the same store with `extra_env`.
    pub fn restart(mut self, bin: &Path, heap_port: u16, extra_env: &[(&str, &str)]) -> Relay {
        self.terminate();
        let dir = tempfile::Builder::new().prefix("unused-").tempdir().expect("temp dir");
        let dir = std::mem::replace(&mut self.dir, dir);
        Self::start_in(bin, heap_port, dir, extra_env)
    }

    fn start_in(bin: &Path, heap_port: u16, dir: tempfile::TempDir, extra_env: &[(&str, &str)]) -> Relay {
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("relay.log")).expect("log file");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .current_dir(manifest)
            .env("HEAP_RELAY__HEAP__APP_ID", APP_ID)
            .env("HEAP_RELAY__HEAP__BASE_URL", format!("http://127.0.0.1:{heap_port}"))
            .env("HEAP_RELAY__STORE__PATH", dir.path().join("relay.db"))
            .env("HEAP_RELAY__SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("HEAP_RELAY__TEMPLATES__DIR", manifest.join("templates"))
            // Everything else is the shipped config.toml: rate budgets on, request budgets off.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the relay binary");
        let relay = Relay { child, port, dir };
        relay.wait_ready();
        relay
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut buf = [0u8; 32];
                // Any answer means the server is up (/healthz says 503 when the relay runs no delivery workers).
                if s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.1 ")) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the relay did not answer /healthz within 30 s; log: {}", self.dir.path().join("relay.log").display());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A gauge of the relay's `/metrics` (plain HTTP/1.1 on loopback), or `None` if it cannot be read.
    pub fn gauge(&self, name: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn store_bytes(&self) -> u64 {
        ["relay.db", "relay.db-wal", "relay.delivery.db", "relay.delivery.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.dir.path().join(f)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// SIGTERM, then a bounded wait, then SIGKILL.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (VmRSS, VmHWM) of a process in kB.
pub fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system) a process has used so far, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces), counted from the state (0):
    // utime is the 11th, stime the 12th. Every field counts, so none may be dropped: tpgid is -1 for a process with
    // no terminal (a filter on what parses as u64 once dropped it and read stime and cutime instead).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Bytes a process has caused to be written to storage so far (`write_bytes` of /proc/<pid>/io): the WAL, the
/// checkpoints into the database files, the log.
pub fn write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

pub fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Duration, u64)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    pub fn start(pid: u32, every: Duration, on_sample: Option<Box<dyn Fn(Duration, u64) + Send>>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            while !s.load(Ordering::SeqCst) {
                let (rss, _) = rss_kb(pid);
                v.lock().expect("samples").push((t0.elapsed(), rss));
                if let Some(f) = &on_sample {
                    f(t0.elapsed(), rss);
                }
                let until = Instant::now() + every;
                while Instant::now() < until && !s.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Sampler { stop, samples, thread }
    }

    pub fn finish(self) -> Vec<(Duration, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        self.samples.lock().expect("samples").clone()
    }
}
