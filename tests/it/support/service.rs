//! `provisioner run` as a child process, for faults that need a real process: SIGKILL
//! and SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub struct ServiceProcess {
    child: Child,
    log: PathBuf,
}

impl ServiceProcess {
    /// Starts the binary with `config`; its JSON logs go to `log`.
    pub fn start(config: &Path, log: PathBuf) -> ServiceProcess {
        Self::start_with_environment(config, log, &[])
    }

    /// [`ServiceProcess::start`] with extra environment variables for the child only
    /// (never `std::env::set_var`: the tests run on many threads). `RUST_LOG` is
    /// removed so the configured level holds.
    pub fn start_with_environment(config: &Path, log: PathBuf, environment: &[(&str, &str)]) -> ServiceProcess {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_provisioner"))
            .args(["run", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .envs(environment.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("the service starts");
        ServiceProcess { child, log }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit on its own.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the service did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Where the admin server listens. Configure `admin.listen = "127.0.0.1:0"` and the
    /// OS picks the port; the service logs it in its `Started.` line, read back here.
    pub async fn admin_address(&self) -> SocketAddr {
        crate::support::eventually("the service's Started. line", Duration::from_secs(60), || async {
            self.log_text()
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|entry| entry["message"] == "Started.")
                .find_map(|entry| entry["admin"].as_str()?.parse().ok())
        })
        .await
    }

    /// Whether the process is still running (it has not exited or crashed).
    // Only `devtools` tests use it; without the feature it is unused.
    #[allow(dead_code)]
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `series` (a counter or gauge with exactly these labels) on a service's
/// `/metrics`, if it is there. Its users need the emulators.
#[cfg_attr(not(feature = "devtools"), allow(dead_code))]
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}
