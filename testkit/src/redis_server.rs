//! A `redis-server` of a test's own: a child process on a free local port, no
//! persistence, `noeviction` as production's. A test can kill it (a crash:
//! everything in memory is gone) and start it again, empty, on the same port,
//! without touching the machine's shared Redis. Dropping it kills the process.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start waits for the server to answer `PING`.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How many fresh ports [`OwnRedis::start`] tries (another process may take a
/// chosen port before the server binds it).
const PORT_ATTEMPTS: usize = 5;

/// A running (or killed) `redis-server` child; see the module docs.
pub struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// Starts one on a free port and waits until it answers `PING`.
    pub fn start() -> Self {
        for _ in 0..PORT_ATTEMPTS {
            let mut r = Self {
                port: free_port(),
                child: None,
            };
            if r.try_start() {
                return r;
            }
        }
        panic!("own redis-server did not start on any of {PORT_ATTEMPTS} ports");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`, for `REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port, empty (after [`Self::kill`]), and
    /// waits until it answers.
    pub fn start_again(&mut self) {
        assert!(self.try_start(), "own redis did not start");
    }

    /// Whether it answers `PING` with `PONG` now.
    pub fn answers(&self) -> bool {
        ping(self.port)
    }

    /// SIGKILL: a crash, everything in memory is gone. Waits for the process
    /// to be reaped, so the port is free for [`Self::start_again`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Spawns the server on `self.port`; true once it answers, false if it
    /// exited (the port was taken) or stayed silent past [`READY_WITHIN`].
    fn try_start(&mut self) -> bool {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if self.answers() {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() >= deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on right now (the OS's choice).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// One `PING` over a fresh connection: true on `+PONG` (not while loading or
/// refusing connections).
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_starts_answers_dies_and_comes_back_empty_on_the_same_port() {
        let mut r = OwnRedis::start();
        assert!(r.answers());
        assert_eq!(r.url(), format!("redis://127.0.0.1:{}", r.port()));
        let port = r.port();
        r.kill();
        assert!(!r.answers());
        r.start_again();
        assert!(r.answers());
        assert_eq!(r.port(), port);
        drop(r);
        assert!(!ping(port));
    }
}
